"""Pretrained weights by name, through timm's, transformers' and open_clip's own hub code and cache.

All three download with ``huggingface_hub`` into one cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``
(``~/.cache/huggingface/hub``), one ``models--<org>--<name>/snapshots/<commit>/`` folder per repository.
With ``HF_HUB_OFFLINE=1`` (compute nodes without a network) they read only that cache. Fill it where
the network is with ``python launcher/fetch_weights.py <the run's or sweep's overrides>``; a run that
finds its weights missing stops with one :class:`ConfigError` naming them and that command.
memetrain itself never opens a connection.

Every tower that loads weights remembers where they came from (:func:`remember`), and
:func:`pretrained_weights` lists them for a built method: the run records it in ``provenance.json``.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from memetrain.errors import ConfigError

FETCH = "python launcher/fetch_weights.py"
RECORD = "pretrained_from"  # the attribute of a tower that holds its Pretrained record
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".npz", ".ckpt")


@dataclass(frozen=True)
class Pretrained:
    """Where a tower's weights were read from. ``source``: the library whose hub code found them
    (``timm``, ``transformers``, ``open_clip``), ``file`` (a local file named by a tower's
    ``pretrained``) or ``checkpoint`` (one of our checkpoints: ``method.init``, ``method.clip.weights``).
    ``name``: the architecture or model id (a checkpoint: the module's class). ``tag``: the pretrained
    tag or hub repository (a checkpoint: the prefix read from it), None for a file."""

    source: str
    name: str
    tag: str | None
    files: tuple[Path, ...]


def remember(module: nn.Module, record: Pretrained) -> None:
    """Mark ``module`` as started from ``record`` (replacing what an earlier load left there)."""
    setattr(module, RECORD, record)


def pretrained_weights(module: nn.Module) -> list[dict[str, Any]]:
    """The weights files a built method (or any module) started from, one entry per file:
    ``{"tower", "source", "name", "tag", "file", "sha256", "revision"}``. ``tower`` is the module's
    dotted name in ``module`` (``model.image_encoder``); ``revision`` the hub commit of a cached file.

    Weights loaded over a module replace what its parts were built from (``method.init``, a frozen
    CLIP's checkpoint), so a record hides the records of the modules inside it. Hashing reads every
    file once per process (seconds for a ViT-L).
    """
    found, covered = [], []
    for name, sub in module.named_modules():
        if any(name == c or name.startswith(f"{c}.") or c == "" for c in covered):
            continue
        record = getattr(sub, RECORD, None)
        if record is None:
            continue
        covered.append(name)
        for path in record.files:
            found.append(
                {
                    "tower": name,
                    "source": record.source,
                    "name": record.name,
                    "tag": record.tag,
                    "file": str(path),
                    "sha256": sha256(path),
                    "revision": snapshot_revision(path),
                }
            )
    return found


def image_preprocessing(module: nn.Module) -> dict[str, dict[str, Any]]:
    """What each image tower's weights expect, by tower (``model.image_encoder``): its ``data_config``
    (``input_size``, ``interpolation``, ``mean``, ``std`` ...), from the weights' own pretrained config.
    The normalisation is applied by the tower itself; the size and interpolation are for the data's
    resize (``data.image_size`` may differ: ViT position embeddings are resampled)."""
    return {
        name: dict(sub.data_config) for name, sub in module.named_modules() if hasattr(sub, "data_config")
    }


def resize_interpolation(option: str, module: nn.Module) -> str:
    """``data.interpolation`` for a built method: ``auto`` is the interpolation the weights of its
    image towers were trained with (their pretrained config: timm's ``pretrained_cfg``, open_clip's
    preprocess; bicubic for timm's ImageNet weights and for CLIP), bilinear where no image tower
    loaded weights; any other value is the run's choice."""
    if option != "auto":
        return option
    found = {
        name: sub.data_config["interpolation"]
        for name, sub in module.named_modules()
        if hasattr(sub, "data_config") and getattr(sub, RECORD, None) is not None
    }
    if len(set(found.values())) > 1:
        raise ConfigError(
            f"data.interpolation=auto: the image towers' weights were trained with different interpolations "
            f"({', '.join(f'{name}: {value}' for name, value in found.items())}); set data.interpolation to one"
        )
    return next(iter(found.values()), "bilinear")


_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256(path: Path) -> str:
    """The file's SHA-256 (what the hub lists for an LFS file), cached by path, size and mtime."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            while chunk := file.read(1 << 24):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


# -- the cache ------------------------------------------------------------------------------------


def hub_cache() -> Path:
    """The Hugging Face cache the libraries read and write now (HF_HUB_CACHE, else HF_HOME/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    """Whether HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1) forbids the libraries any download."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_hub_file(repo: str, filenames: Sequence[str]) -> Path | None:
    """The first of ``filenames`` that the cache holds for ``repo`` (``org/name``, optionally
    ``@revision``) at its cached ``main`` (or that revision); None if none. No network."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = repo.partition("@")
    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, revision=revision or None)
        if isinstance(found, str):
            return Path(found)
    return None


def snapshot_revision(path: Path) -> str | None:
    """The hub commit of a file in the cache (``.../snapshots/<commit>/...``), None elsewhere."""
    parts = Path(path).parts
    if "snapshots" in parts[:-1]:
        index = len(parts) - 1 - parts[::-1].index("snapshots")
        if index + 1 < len(parts) - 1:
            return parts[index + 1]
    return None


def looks_like_path(value: str) -> bool:
    """A value meant as a local file or directory rather than a name: it exists, has a separator
    beyond ``org/name``, starts like a path, or ends with a weights suffix."""
    return (
        os.path.exists(os.path.expanduser(value))
        or value.startswith(("/", "./", "../", "~"))
        or value.count("/") > 1
        or value.lower().endswith(WEIGHT_SUFFIXES)
    )


# -- the one error line --------------------------------------------------------------------------


def missing_weights(what: str, option: str, reason: str, cache: Path | None = None) -> ConfigError:
    """The error for weights that are not in the cache and could not be downloaded now."""
    where = cache or hub_cache()
    if offline():
        why = "HF_HUB_OFFLINE=1 keeps them from being downloaded"
    else:
        why = f"downloading them failed ({_one_line(reason)})"
    return ConfigError(
        f"pretrained weights {what} ({option}) are not in the cache {where} and {why}; fetch them where "
        f"the network is, into the same cache (same HF_HOME): {fetch_command()}"
    )


def fetch_command() -> str:
    """``launcher/fetch_weights.py`` with this run's overrides (those of the launcher/train.py
    process running now), or a placeholder outside such a run."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get()
        if hydra.job.config_name != "train":
            raise ValueError
        overrides = [o for o in hydra.overrides.task if not o.lstrip("+~").startswith("hydra.")]
    except (ImportError, ValueError, AttributeError):
        return f"{FETCH} <this run's overrides, or +sweep=<name>>"
    return " ".join([FETCH, *(shlex.quote(o) for o in overrides)])


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
