"""``launcher/fetch_weights.py``: every pretrained weight a run or a sweep names, fetched through
timm's, transformers' and open_clip's own hub code into the cache its jobs read, and listed.

A run's weights are those its composed train config names: each timm tower's ``pretrained``
(``model.image``, ``model.cnn``, ``model.vit`` ...), each transformer text tower's ``pretrained``,
and the open_clip weights of ``method`` (``method=clip method.tower=open_clip``) and of a frozen CLIP
(``method.clip``: SemiMemes, CMML, TIB-VA). A sweep's runs are its jobs (pretraining runs included),
expanded with :func:`memetrain.sweep.grid.expand` and composed with Hydra's compose API, as
``launcher/sweep.py`` runs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from memetrain.errors import ConfigError
from memetrain.models import open_clip_weights, text_weights, timm_weights
from memetrain.models.hub import hub_cache, offline

FETCH_OPTIONS = ("dry_run",)  # fetch_weights' own options; every other override is the runs'


@dataclass
class Named:
    """Weights named by one or more runs: the options that name them, and their source."""

    source: Any  # TimmWeights | TextWeights | OpenClipWeights
    options: list[str] = field(default_factory=list)


def weights_named_by(config: dict[str, Any]) -> list[tuple[str, Any]]:
    """``(option, source)`` for every pretrained weight a composed, resolved train config names."""
    found = []
    for key, part in (config.get("model") or {}).items():
        if not isinstance(part, dict) or part.get("pretrained") in (None, False):
            continue
        option = f"model.{key}.pretrained"
        if "name" in part:  # a timm image tower
            found.append((option, timm_weights.resolve(part["name"], part["pretrained"], option)))
        elif part.get("kind") == "transformer":
            found.append((option, text_weights.resolve(part["pretrained"], option)))
    method = config.get("method") or {}
    for prefix, options in (("method", method), ("method.clip", method.get("clip"))):
        if (
            isinstance(options, dict)
            and options.get("tower") == "open_clip"
            and options.get("open_clip_weights")
        ):
            option = f"{prefix}.open_clip_weights"
            source = open_clip_weights.resolve(
                options["open_clip_model"], options["open_clip_weights"], option
            )
            found.append((option, source))
    return found


def runs_of(cfg: DictConfig, task_overrides: Sequence[str]) -> list[list[str]]:
    """The train overrides of every run the command names: its own overrides (one run), or with
    ``+sweep=<name>`` every run of the sweep's jobs with those overrides last (one per distinct run
    but the seed)."""
    own = [o for o in task_overrides if not _fetch_only(o)]
    if cfg.get("sweep") is None:
        return [own]
    from memetrain.sweep.grid import AFTER, PRETRAIN, expand, fill_weights

    jobs = expand(OmegaConf.to_container(cfg.sweep, resolve=True), None, None, own)
    runs: dict[tuple[str, ...], list[str]] = {}
    for job in jobs:
        for _, overrides in job.runs:  # placeholders stand for checkpoints of the sweep's own runs
            filled = fill_weights(overrides, {PRETRAIN: Path(PRETRAIN), AFTER: Path(AFTER)})
            runs.setdefault(tuple(o for o in filled if not o.startswith("seed=")), filled)
    return list(runs.values())


def collect(runs: Sequence[Sequence[str]]) -> list[Named]:
    """The distinct weights the runs name (composed as launcher/train.py composes them)."""
    from hydra import compose
    from hydra.errors import HydraException

    named: dict[str, Named] = {}
    for overrides in runs:
        try:
            config = OmegaConf.to_container(compose("train", list(overrides)), resolve=True)
        except HydraException as err:
            raise ConfigError(
                f"the run {' '.join(overrides)} does not compose: {' '.join(str(err).split())}"
            ) from None
        for option, source in weights_named_by(config):
            entry = named.setdefault(f"{type(source).__name__} {source.describe()}", Named(source))
            if option not in entry.options:
                entry.options.append(option)
    return list(named.values())


def fetch(named: Sequence[Named], dry_run: bool) -> tuple[list[str], list[str]]:
    """Fetch (or, with ``dry_run``, only look up) each weight: the report (one line each and a total)
    and the weights that cannot be had here."""
    rows, total, fetched, missing = [], 0, 0, []
    for item in named:
        files = item.source.cached()
        if files is not None:
            status = "local file" if item.source.local else "in the cache"
        elif dry_run:
            status = "not found" if item.source.local else "to fetch"
        else:
            files = item.source.fetch()
            status = "fetched"
        size = sum(path.stat().st_size for path in files or [])
        total += size
        fetched += size if status == "fetched" else 0
        if status == "not found" or (status == "to fetch" and offline()):
            missing.append(item.source.describe())
        shown = f"{_size(size):>10}" if files else " " * 10
        where = str(files[-1]) if files else ""
        rows.append((item.source.describe(), ", ".join(item.options), status, shown, where))
    lines = []
    if rows:
        width = [max(len(row[i]) for row in rows) for i in range(3)]
        lines += [
            f"  {a:<{width[0]}}  {b:<{width[1]}}  {c:<{width[2]}} {d}  {e}".rstrip() for a, b, c, d, e in rows
        ]
    summary = f"total {_size(total)}"
    summary += " (dry run: nothing downloaded)" if dry_run else f", {_size(fetched)} fetched now"
    return [*lines, summary], missing


def main(cfg: DictConfig, task_overrides: Sequence[str]) -> None:
    """The fetch_weights entry point: list, then fetch, the weights of the runs the command names."""
    runs = runs_of(cfg, task_overrides)
    named = collect(runs)
    mode = (
        "HF_HUB_OFFLINE=1: nothing can be downloaded here"
        if offline()
        else "runs with HF_HUB_OFFLINE=1 read it"
    )
    print(f"cache: {hub_cache()} ({mode})")
    what = "1 run names" if len(runs) == 1 else f"{len(runs)} runs name"
    if not named:
        print(f"{what} no pretrained weights (model.*.pretrained, open_clip_weights); nothing to fetch")
        return
    print(f"{what} {len(named)} pretrained weight{'s' if len(named) != 1 else ''}:")
    lines, missing = fetch(named, cfg.dry_run)
    print("\n".join(lines))
    if missing:
        raise ConfigError(
            f"{len(missing)} of them cannot be had here: {'; '.join(missing)} (local files that are not "
            "there, or weights the cache lacks while HF_HUB_OFFLINE=1: fetch those where the network is)"
        )


def _fetch_only(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return key in FETCH_OPTIONS or key == "sweep" or key.startswith(("sweep.", "hydra.", "hydra/"))


def _size(size: float) -> str:
    if size < 1000:
        return f"{size:.0f} B"
    for unit in ("kB", "MB", "GB"):
        size /= 1000
        if size < 1000 or unit == "GB":
            break
    return f"{size:.1f} {unit}"
