"""Where a timm image tower's weights come from: ``model.image.name`` and ``model.image.pretrained``
resolved to timm's own pretrained config (mean, std, input size, interpolation, classifier) and
weights file, found through timm's hub code and cache.

``pretrained`` takes:

- ``null`` / ``false``: random init; the name's tag (``vit_small_patch16_224.dino``) or timm's
  default tag still gives the normalisation;
- ``true``: timm's default pretrained tag of ``name`` (or the tag ``name`` carries);
- a tag of ``name`` (``augreg_in21k_ft_in1k``) or a full timm name (``vit_base_patch16_384.augreg_in21k_ft_in1k``);
- ``hf-hub:<org>/<repo>``: a timm repository on the Hugging Face hub (its ``config.json`` gives the
  pretrained config; its architecture must be ``name``'s);
- a local weights file (``.safetensors`` preferred; ``.pth``/``.bin`` read with ``weights_only=True``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
from timm.models import _hub as timm_hub

from memetrain.errors import ConfigError
from memetrain.models.hub import cached_hub_file, looks_like_path, missing_weights, offline

OPTION = "model.image.pretrained"
SUGGESTIONS = 8
HUB_PREFIX = "hf-hub:"


@dataclass
class TimmWeights:
    """One tower's weights source. ``build_name`` is what ``timm.create_model`` gets: ``arch.tag``,
    ``hf-hub:<repo>`` or ``model.image.name`` as given."""

    build_name: str
    arch: str
    tag: str | None = None  # the pretrained tag, or the hub repository of hf-hub:
    cfg: dict[str, Any] = field(default_factory=dict)  # timm's pretrained_cfg of these weights
    hub: str | None = None  # repository id (@revision) holding the weights file
    filenames: tuple[str, ...] = ()  # candidates in that repository, the one timm prefers first
    url: str | None = None  # timm's URL-only weights (torch hub cache)
    file: Path | None = None  # a local file
    option: str = OPTION

    @property
    def loads(self) -> bool:
        """Whether any weights are loaded (not a random init)."""
        return bool(self.hub or self.url or self.file)

    @property
    def local(self) -> bool:
        return self.file is not None

    @property
    def from_hub_repo(self) -> bool:
        return self.build_name.startswith(HUB_PREFIX)

    def describe(self) -> str:
        if self.file is not None:
            return f"local file {self.file}"
        return f"timm {self.build_name.removeprefix(HUB_PREFIX) if self.from_hub_repo else self.build_name}"

    def cached(self) -> list[Path] | None:
        """The files this source needs if the cache (or the disk) holds them; no network."""
        if self.file is not None:
            return [self.file] if self.file.is_file() else None
        if self.url:
            path = Path(timm_hub.get_cache_dir()) / Path(self.url).name
            return [path] if path.is_file() else None
        files = [cached_hub_file(self.hub, ["config.json"])] if self.from_hub_repo else []
        files.append(cached_hub_file(self.hub, self.filenames))
        return None if None in files else files

    def fetch(self) -> list[Path]:
        """The files, downloaded through timm's hub code if the cache lacks them."""
        if self.file is not None:
            if not self.file.is_file():
                raise ConfigError(f"{self.option}: weights file {self.file} not found; check the path")
            return [self.file]
        if self.url:
            return [self._fetch_url()]
        files = []
        if self.from_hub_repo:
            self.resolve_hub_config(download=True)
            files.append(cached_hub_file(self.hub, ["config.json"]))
        return [*files, self._fetch_hub_file()]

    def resolve_hub_config(self, download: bool) -> dict[str, Any]:
        """For ``hf-hub:`` weights, the repository's ``config.json`` (timm's parsing of it): sets
        ``cfg`` and the weights file names, checks the architecture. Returns the model arguments."""
        if not self.from_hub_repo:
            return {}
        if not download and cached_hub_file(self.hub, ["config.json"]) is None:
            raise missing_weights(
                f"config.json of {self.hub}", f"{self.option}=hf-hub:{self.hub}", "not cached"
            )
        try:
            cfg, arch, model_args = timm_hub.load_model_config_from_hf(self.hub)
        except Exception as err:  # huggingface_hub's offline, missing-entry and HTTP errors alike
            raise _hub_error(err, f"config.json of {self.hub}", f"{self.option}=hf-hub:{self.hub}") from None
        if arch != self.arch:
            raise ConfigError(
                f"{self.option}=hf-hub:{self.hub} holds weights of timm model {arch!r}, not of "
                f"model.image.name={self.arch!r}; set model.image.name={arch}"
            )
        self.cfg = dict(cfg)
        if cfg.get("custom_load"):
            raise ConfigError(_custom_load_message(f"hf-hub:{self.hub}", self.option))
        self.filenames = _candidates(cfg.get("hf_hub_filename"))
        return dict(model_args)

    def _fetch_hub_file(self) -> Path:
        found = cached_hub_file(self.hub, self.filenames)
        if found is not None:  # the cached main: no request to the hub at all
            return found
        last_error: Exception | None = None
        for filename in self.filenames:  # as timm does: the safetensors alternative first
            try:
                return Path(timm_hub.download_from_hf(self.hub, filename))
            except Exception as err:  # an EntryNotFoundError means: try the next name
                last_error = err
                if not _entry_not_found(err):
                    break
        raise _hub_error(last_error, self.describe(), self.option) from None

    def _fetch_url(self) -> Path:
        path = Path(timm_hub.get_cache_dir()) / Path(self.url).name
        if path.is_file():
            return path
        if offline():
            raise missing_weights(self.describe(), self.option, "", cache=path.parent)
        try:
            return Path(timm_hub.download_cached_file(self.url, check_hash=True, progress=False))
        except Exception as err:  # urllib's and torch.hub's errors
            raise missing_weights(self.describe(), self.option, str(err), cache=path.parent) from None


def resolve(name: str, pretrained: bool | str | None, option: str = OPTION) -> TimmWeights:
    """``model.image.name`` and ``model.image.pretrained`` to a :class:`TimmWeights` (module docstring)."""
    if not timm.is_model(name):
        raise ConfigError(f"unknown timm model {name!r}; close matches: {', '.join(close_names(name))}")
    arch, _, name_tag = name.partition(".")
    if pretrained is None or pretrained is False:
        return TimmWeights(name, arch, cfg=registry_cfg(name), option=option)
    if pretrained is True:
        full = name
    elif isinstance(pretrained, str) and pretrained.startswith(HUB_PREFIX):
        repo = pretrained.removeprefix(HUB_PREFIX)
        return TimmWeights(pretrained, arch, tag=repo, hub=repo, filenames=_candidates(None), option=option)
    elif isinstance(pretrained, str) and looks_like_path(pretrained):
        return TimmWeights(
            name, arch, cfg=registry_cfg(name), file=Path(pretrained).expanduser(), option=option
        )
    elif isinstance(pretrained, str) and pretrained:
        full = pretrained if "." in pretrained else f"{arch}.{pretrained}"
        if full.partition(".")[0] != arch:
            raise ConfigError(
                f"{option}={pretrained!r} names weights of timm model {full.partition('.')[0]!r}, not of "
                f"model.image.name={name!r}; give a tag of {arch} or change model.image.name"
            )
        if name_tag and full != name:
            raise ConfigError(
                f"model.image.name={name!r} and {option}={pretrained!r} name different pretrained tags; "
                f"give the tag in one of them"
            )
    else:
        raise ConfigError(
            f"{option}={pretrained!r}: give true (timm's default tag), a pretrained tag, hf-hub:<repo>, "
            "a local weights file, or null"
        )
    cfg = registry_cfg(full)
    if not (cfg.get("hf_hub_id") or cfg.get("url")):
        raise ConfigError(
            f"timm model {arch!r} has no pretrained weights in timm ({_tags(arch)}); set {option}=null "
            "or give a local weights file"
        )
    if cfg.get("custom_load"):
        raise ConfigError(_custom_load_message(f"{arch}.{cfg['tag']}", option))
    hub = cfg.get("hf_hub_id")
    return TimmWeights(
        f"{arch}.{cfg['tag']}",
        arch,
        tag=cfg["tag"],
        cfg=cfg,
        hub=hub,
        filenames=_candidates(cfg.get("hf_hub_filename")) if hub else (),
        url=None if hub else cfg.get("url"),
        option=option,
    )


def registry_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained_cfg of ``name`` (its tag, or the default one) as a dict; {} if it has none."""
    try:
        cfg = timm.get_pretrained_cfg(name)
    except RuntimeError:
        arch = name.partition(".")[0]
        raise ConfigError(
            f"timm model {name!r} has an unknown pretrained tag; known: {_tags(arch)}"
        ) from None
    return cfg.to_dict() if cfg is not None else {}


def close_names(name: str) -> list[str]:
    """timm model names that contain ``name`` or look like it."""
    everything = timm.list_models()
    stem = name.split(".")[0]
    found = timm.list_models(f"*{stem}*")[:SUGGESTIONS]
    found += difflib.get_close_matches(stem, everything, n=SUGGESTIONS, cutoff=0.6)
    return list(dict.fromkeys(found))[:SUGGESTIONS] or ["none (see timm.list_models())"]


def _tags(arch: str) -> str:
    return ", ".join(timm.list_pretrained(f"{arch}.*")) or "none"


def _candidates(filename: str | None) -> tuple[str, ...]:
    """The weights file names timm tries in a hub repository, in its order: a safetensors
    alternative of a pickle file first (``model.safetensors`` for the default ``pytorch_model.bin``)."""
    filename = filename or timm_hub.HF_WEIGHTS_NAME
    if filename.endswith(".safetensors"):
        return (filename,)
    return (*timm_hub._get_safe_alternatives(filename), filename)


def _entry_not_found(err: Exception) -> bool:
    from huggingface_hub.errors import EntryNotFoundError

    return isinstance(err, EntryNotFoundError)


def _hub_error(err: Exception | None, what: str, option: str) -> ConfigError:
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    if isinstance(err, GatedRepoError):
        return ConfigError(
            f"{option}: {what} is in a gated repository; accept its terms and log in (hf auth login)"
        )
    if isinstance(err, RepositoryNotFoundError):
        return ConfigError(f"{option}: {what} is not on the Hugging Face hub (check the name)")
    if isinstance(err, LocalEntryNotFoundError) or offline():
        return missing_weights(what, option, str(err))
    return missing_weights(what, option, f"{type(err).__name__}: {err}")


def _custom_load_message(weights: str, option: str) -> str:
    return (
        f"{option}: timm loads {weights} with model-specific code (custom_load), which memetrain does not run; "
        "choose another tag, or convert the weights to a timm state dict and give the file"
    )
