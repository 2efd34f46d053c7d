"""open_clip towers: an architecture (``open_clip_model``) and its weights (``open_clip_weights``).

``open_clip_weights`` takes:

- ``null``: random init;
- one of open_clip's pretrained tags of the architecture, as in ``create_model_and_transforms(model,
  pretrained)``: (``ViT-L-14``, ``openai``), (``ViT-B-16``, ``laion2b_s34b_b88k``) ... The file comes
  through open_clip's ``download_pretrained`` and the Hugging Face cache, and the tag's preprocess
  config gives the normalisation. A tag trained with QuickGELU (OpenAI's) builds the architecture with
  it, as open_clip's ``-quickgelu`` names do;
- a local file: a state dict (``.safetensors``, or ``.bin``/``.pt``/``.pth`` read with
  ``weights_only=True``) or one of OpenAI's TorchScript ``.pt`` files, converted on load without
  running it (:mod:`memetrain.models.torchscript`); those need a ``-quickgelu`` architecture.

Loading is strict: every tensor of the architecture, nothing else (after open_clip's own conversions
and position-embedding resizing).
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memetrain.errors import ConfigError
from memetrain.models.hub import cached_hub_file, looks_like_path, missing_weights
from memetrain.models.torchscript import TorchScriptError, is_torchscript, read_torchscript_state_dict
from memetrain.models.weights import TORCH_SUFFIXES, describe_mismatch, reading_weights

log = logging.getLogger(__name__)

OPTION = "method.open_clip_weights"
OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")  # ints in OpenAI's TorchScript state


@dataclass
class OpenClipWeights:
    """The weights of one open_clip model: a pretrained ``tag`` (with open_clip's ``cfg`` for it) or a ``file``."""

    model: str
    tag: str | None = None
    cfg: dict[str, Any] = field(default_factory=dict)
    file: Path | None = None
    option: str = OPTION

    @property
    def local(self) -> bool:
        return self.file is not None

    def describe(self) -> str:
        return f"local file {self.file}" if self.local else f"open_clip {self.model} {self.tag}"

    def hub_location(self) -> tuple[str, tuple[str, ...]]:
        """The hub repository and the file names open_clip tries there (safetensors first)."""
        from open_clip.constants import HF_WEIGHTS_NAME
        from open_clip.pretrained import _get_safe_alternatives

        repo, filename = os.path.split(self.cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        return repo, (*_get_safe_alternatives(filename), filename)

    def cached(self) -> list[Path] | None:
        """The weights file if the disk (cache) holds it; no network."""
        if self.local:
            return [self.file] if self.file.is_file() else None
        if self.cfg.get("hf_hub"):
            found = cached_hub_file(*self.hub_location())
            return None if found is None else [found]
        path = _url_cache() / os.path.basename(self.cfg["url"])
        return [path] if path.is_file() else None

    def fetch(self) -> list[Path]:
        """The weights file, downloaded through open_clip's hub code if the cache lacks it."""
        if self.local:
            if not self.file.is_file():
                raise ConfigError(f"{self.option}: {self.file} not found; check the path")
            return [self.file]
        found = self.cached()
        if found is not None:  # open_clip checks the hub for a newer file first; the cache is enough
            return found
        from open_clip.pretrained import download_pretrained

        if not self.cfg.get("hf_hub") and _offline():  # open_clip's URL download ignores HF_HUB_OFFLINE
            raise missing_weights(self.describe(), self.option, "", cache=_url_cache())
        try:
            return [Path(download_pretrained(self.cfg))]
        except (
            Exception
        ) as err:  # open_clip turns every hub error into FileNotFoundError; URLs raise urllib's
            cache = None if self.cfg.get("hf_hub") else _url_cache()
            raise missing_weights(self.describe(), self.option, str(err), cache=cache) from None

    @property
    def quick_gelu(self) -> bool:
        """Whether the tag was trained with QuickGELU (OpenAI's weights)."""
        return bool(self.cfg.get("quick_gelu"))


def check_model(name: str) -> None:
    """``name`` must be a built-in open_clip CLIP that needs nothing from a hub (its own tokenizer)."""
    import open_clip

    if name not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=6, cutoff=0.5)
        raise ConfigError(
            f"method.open_clip_model={name!r} is not an open_clip architecture; close matches: "
            f"{', '.join(close) or 'none (see open_clip.list_models())'}"
        )
    config = open_clip.get_model_config(name)
    hub_text = {"hf_model_name", "hf_tokenizer_name"} & config["text_cfg"].keys()
    not_clip = {"multimodal_cfg", "init_logit_bias"} & config.keys()  # CoCa, SigLIP
    if hub_text or not_clip:
        raise ConfigError(
            f"open_clip model {name!r} is not a plain CLIP with open_clip's own tokenizer (it is a SigLIP or "
            "CoCa, or needs a Hugging Face text model); choose e.g. ViT-B-32-quickgelu or RN50-quickgelu "
            "(OpenAI weights), ViT-B-32 or ViT-B-16 (LAION weights)"
        )


def resolve(name: str, weights: str | None, option: str = OPTION) -> OpenClipWeights | None:
    """``open_clip_weights`` for the architecture ``name`` (module docstring); None: random init."""
    import open_clip

    check_model(name)
    if weights is None:
        return None
    if not isinstance(weights, str) or not weights:
        raise ConfigError(f"{option}={weights!r}: give a pretrained tag of {name}, a local file, or null")
    if looks_like_path(weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"{option}: {path} not found; check the path")
        if path.suffix not in (".safetensors", *TORCH_SUFFIXES):
            raise ConfigError(
                f"{option}: {path} should be .safetensors or a torch state dict or TorchScript archive "
                f"({', '.join(TORCH_SUFFIXES)})"
            )
        return OpenClipWeights(name, file=path, option=option)
    cfg = open_clip.get_pretrained_cfg(name, weights)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ConfigError(
            f"{option}={weights!r} is neither a local file nor a pretrained tag of open_clip model {name} "
            f"(its tags: {', '.join(tags) or 'none'}; open_clip.list_pretrained() lists every pair)"
        )
    return OpenClipWeights(name, tag=weights, cfg=dict(cfg), option=option)


def create(
    name: str, weights: OpenClipWeights | None, image_size: int | None, init_logit_scale: float
) -> tuple[nn.Module, list[Path]]:
    """The open_clip model with its weights loaded strictly, and the files they came from."""
    import open_clip

    state, files = None, []
    if weights is not None and reading_weights():
        files = weights.fetch()
        state = read_state(files[0], name, weights.option)
        if is_torchscript(files[0]) and not open_clip.get_model_config(name).get("quick_gelu"):
            raise ConfigError(
                f"{weights.option}: {files[0]} is one of OpenAI's TorchScript files, trained with QuickGELU; "
                f"use method.open_clip_model={name}-quickgelu (open_clip's name for the same architecture with it)"
            )
    force_quick_gelu = weights is not None and weights.quick_gelu
    preprocess = {k: v for k, v in weights.cfg.items() if k != "size"} if weights is not None else None
    logging.disable(logging.WARNING)  # create_model warns that it starts from random weights
    try:
        model = open_clip.create_model(
            name,
            force_image_size=image_size,
            force_quick_gelu=force_quick_gelu,
            force_preprocess_cfg=preprocess,
            init_logit_scale=math.log(init_logit_scale),
        )
    finally:
        logging.disable(logging.NOTSET)
    if state is not None:
        load_state(model, state, name, files[0], weights.option)
        log.info(
            "%s: weights from %s%s, logit scale %.1f, mean %s std %s",
            weights.describe(),
            files[0],
            " (QuickGELU, as the tag was trained)" if force_quick_gelu else "",
            model.logit_scale.exp().item(),
            model.visual.preprocess_cfg["mean"],
            model.visual.preprocess_cfg["std"],
        )
    return model, files


def read_state(path: Path, name: str, option: str = OPTION) -> dict[str, torch.Tensor]:
    """A file's tensors for the model ``name``: safetensors, a torch state dict (``weights_only``) or a
    TorchScript archive (its tensors only)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            return load_file(path, device="cpu")
        if is_torchscript(path):
            state = read_torchscript_state_dict(path)
            return {k: v for k, v in state.items() if k not in OPENAI_EXTRAS}
        content = torch.load(path, map_location="cpu", weights_only=True)
    except (
        RuntimeError,
        ValueError,
        EOFError,
        pickle.UnpicklingError,
        SafetensorError,
        TorchScriptError,
    ) as err:
        raise ConfigError(
            f"{option}: {path} cannot be loaded into {name}, it cannot be read safely: "
            f"{' '.join(str(err).split())[:300]}; give a state dict (.safetensors preferred) or one of "
            "OpenAI's TorchScript .pt files"
        ) from None
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise ConfigError(f"{option}: {path} does not hold a state dict (name -> tensor)")
    if next(iter(content), "").startswith("module."):  # saved from a DistributedDataParallel wrapper
        content = {k.removeprefix("module."): v for k, v in content.items()}
    return content


def load_state(model: nn.Module, state: dict[str, torch.Tensor], name: str, path: Path, option: str) -> None:
    """Load ``state`` into the open_clip ``model`` strictly, after open_clip's own conversions."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    own = set(model.state_dict())
    computed = {name for name, _ in model.named_buffers() if name not in own}  # attn_mask: built, not loaded
    # the model is float32; half-precision files (OpenAI's) are widened first, so resizing works on CPU
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items() if k not in computed}
    state = convert_state_dict(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)  # an older layout of the same weights
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    try:
        resize_pos_embed(state, model)
        resize_text_pos_embed(state, model)
        incompatible = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes
        raise ConfigError(
            f"{option}: {path} cannot be loaded into {name}: {' '.join(str(err).split())[:400]}; "
            "check method.open_clip_model"
        ) from None
    if incompatible.missing_keys or incompatible.unexpected_keys:
        raise ConfigError(
            f"{option}: {path} does not fit {name}: "
            f"{describe_mismatch(incompatible.missing_keys, incompatible.unexpected_keys)}; check method.open_clip_model"
        )


def _url_cache() -> Path:
    return Path(os.path.expanduser("~/.cache/clip"))  # open_clip's download_pretrained_from_url default


def _offline() -> bool:
    from memetrain.models.hub import offline

    return offline()
