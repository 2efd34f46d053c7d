"""Read weight files without unpickling arbitrary objects, and load them strictly.

``.safetensors`` files are read with safetensors; ``.pt``, ``.pth`` and ``.bin`` files with
``torch.load(weights_only=True)``, which refuses any pickled object that is not a tensor or a
plain container. Nested dictionaries (a training checkpoint holding ``model``, ``optimizer`` ...)
are flattened to dotted names, so ``prefix="model."`` selects the model's weights from either kind.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from memetrain.errors import ConfigError

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
EXAMPLES = 3


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a weights file, by dotted name, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {path} not found: check the path")
    if path.suffix == ".safetensors":
        return load_file(path, device="cpu")
    if path.suffix not in TORCH_SUFFIXES:
        raise ConfigError(
            f"weights file {path} has an unknown suffix {path.suffix!r}: use .safetensors (preferred), "
            f"or one of {', '.join(TORCH_SUFFIXES)} for a torch.save file"
        )
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ConfigError(
            f"weights file {path} cannot be read safely ({type(err).__name__}: {err}); re-save it as a "
            "plain state dict, ideally with safetensors.torch.save_file"
        ) from None
    if not isinstance(content, Mapping):
        raise ConfigError(f"weights file {path} holds a {type(content).__name__}, not a state dict")
    return _flatten(content)


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, torch.Tensor):
            flat[prefix + str(key)] = value
        elif isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def load_weights(module: nn.Module, path: str | Path, prefix: str = "") -> None:
    """Load ``path`` into ``module`` strictly; with ``prefix``, only the names under it (prefix removed).

    Every parameter and buffer of ``module`` must be in the file with the same shape, and the
    file must hold nothing else under ``prefix`` (but for the names under the module's
    ``dropped_names``: an image encoder's classifier that the saved one kept, as CASS comparing
    classifier outputs does); otherwise a :class:`ConfigError` says what differs.
    """
    if _STRUCTURE_ONLY.get():
        return
    from memetrain.models.hub import Pretrained, remember

    state = read_state_dict(path)
    if prefix:
        names = sorted({name.split(".")[0] + "." for name in state})
        state = {name[len(prefix) :]: value for name, value in state.items() if name.startswith(prefix)}
        if not state:
            raise ConfigError(
                f"weights file {path} has no names under prefix {prefix!r}; its top-level prefixes are "
                f"{_examples(names, 8)}"
            )
    dropped = tuple(getattr(module, "dropped_names", ()))
    skipped = sorted(name for name in state if dropped and name.startswith(dropped))
    if skipped:
        log.info("%s: not loading %s of %s (this model has no classifier)", path, ", ".join(skipped), prefix)
        state = {name: value for name, value in state.items() if name not in skipped}
    expected = module.state_dict()
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    shapes = [
        f"{name} {tuple(state[name].shape)} vs {tuple(value.shape)}"
        for name, value in expected.items()
        if name in state and state[name].shape != value.shape
    ]
    if missing or unexpected or shapes:
        raise ConfigError(
            f"weights file {path} (prefix {prefix!r}) does not fit {type(module).__name__}: "
            + describe_mismatch(missing, unexpected, shapes)
            + "; check the prefix and that the file was saved from the same architecture"
        )
    module.load_state_dict(state, strict=True)
    remember(module, Pretrained("checkpoint", type(module).__name__, prefix or None, (Path(path),)))


def load_encoder_inits(
    encoders: dict[str, nn.Module | None], init: dict[str, dict[str, str] | None] | None
) -> None:
    """``method.init``: start each encoder named in ``init`` (``image``, ``text``) from ``spec["path"]``
    under ``spec["prefix"]``, strictly; a part the model does not have is a :class:`ConfigError`."""
    for part, spec in (init or {}).items():
        if spec is None:
            continue
        encoder = encoders.get(part)
        if encoder is None:
            have = ", ".join(name for name, module in encoders.items() if module is not None)
            raise ConfigError(
                f"method.init.{part} is set but the model has no {part} encoder (it has {have})"
            )
        load_weights(encoder, spec["path"], spec["prefix"])


def describe_mismatch(missing: Iterable[str], unexpected: Iterable[str], shapes: Iterable[str] = ()) -> str:
    """Counts and a few examples of missing names, unexpected names and shape mismatches."""
    parts = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        items = list(items)
        if items:
            parts.append(f"{len(items)} {what} ({_examples(items)})")
    return ", ".join(parts)


def _examples(items: list[str], count: int = EXAMPLES) -> str:
    shown = ", ".join(items[:count])
    return shown + (f", ... {len(items) - count} more" if len(items) > count else "")


_STRUCTURE_ONLY = ContextVar("structure_only", default=False)


@contextmanager
def structure_only() -> Iterator[None]:
    """Build models without reading the weights their config names (a model bundle loads its
    own over them, and the files of the pretraining runs it came from need not exist)."""
    token = _STRUCTURE_ONLY.set(True)
    try:
        yield
    finally:
        _STRUCTURE_ONLY.reset(token)


def reading_weights() -> bool:
    """False inside :func:`structure_only`: builders then skip every weights file and hub download."""
    return not _STRUCTURE_ONLY.get()
