"""What a run directory records, and when a new command may continue it.

A run directory belongs to one resolved config (its ``config.yaml``). A command that finds it again
(``resume=auto`` re-runs, requeued jobs, a sweep re-run) may continue it only if its own config is
the same in every option that can change a result. Otherwise the old results would be resumed (or
kept, by a sweep that skips finished jobs) under the new command's label. The comparison lives
here alone; ``memetrain.run`` calls it before training, ``memetrain.sweep.launch`` before it skips
or submits a job.

The rule is deliberately the opposite of solo-learn's auto-resumer (``solo/utils/auto_resumer.py``,
``SHOULD_MATCH``: eight keys must match, any other may differ, so a changed learning rate resumes
silently): here **every** option must match except the few in :data:`FREE_TO_CHANGE`, each of
which changes how a run is carried out, never what it computes. ``data.num_workers`` is not among
them: the stream cuts every epoch into one run of samples per (rank, worker), so the worker count
decides the order of the batches (threads and processes deliver the same ones: ``worker_kind`` is
free).

This module imports neither torch nor the training code (the sweep driver uses it).
"""

from __future__ import annotations

import datetime
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from memetrain.errors import ConfigError

CONFIG_FILE = "config.yaml"
PREVIOUS_DIR = "previous"  # where resume=never moves an earlier run of the same directory

FREE_TO_CHANGE = {
    "resume": "how to treat an existing run, not part of one",
    "trainer.log_every": "how often losses are logged",
    "trainer.log_with": "where they are logged",
    "trainer.tracker_project": "under which project the trackers file them",
    "trainer.checkpoint_every": "how often the (exact) state is saved",
    "trainer.keep_checkpoints": "how many saved states are kept",
    "trainer.timeout_minutes": "how long a collective may wait",
    "trainer.rendezvous_timeout_s": "how long the processes wait for each other at start",
    "trainer.gradient_checkpointing": "recomputes activations instead of storing them (same math)",
    "trainer.ddp.bucket_cap_mb": "how gradients are grouped for all-reduce",
    "trainer.ddp.gradient_as_bucket_view": "where DDP keeps gradients",
    "data.worker_kind": "threads and processes deliver the very same batches",
    "data.verify_checksums": "whether shards are hashed before reading",
    "data.max_bad_samples": "when bad samples stop a run (the batches are the same until then)",
}
"""Options that may differ between a run directory's config and a command continuing it, and why."""

ADDED_OPTIONS = {
    "data.interpolation": "bilinear",
}
"""Options added since some runs were recorded whose default is not null, with what a config that
lacks one did: an absent one compares as that value (a run from before ``data.interpolation``
continues under ``data.interpolation=bilinear``, never under ``auto``, which may resize otherwise)."""

ABSENT = object()  # a key one config has and the other lacks
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys: ``{"data": {"image_size": 64}}`` -> ``{"data.image_size": 64}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_config(path: Path) -> dict[str, Any]:
    """A resolved ``config.yaml`` as written by a run; a clear error when it cannot be read."""
    try:
        config = yaml.load(path.read_text(), Loader=_SAFE_LOADER)
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(
            f"cannot read {path} ({type(err).__name__}); it records the config of the run beside it: "
            "restore it, or move that run directory away"
        ) from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} does not hold a config; restore it, or move that run directory away")
    return config


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, recorded value, current value)`` for every option outside :data:`FREE_TO_CHANGE`
    whose values differ (a key only one side has counts, with the other value missing, unless it
    is one of :data:`ADDED_OPTIONS`)."""
    old, new = flatten(recorded), flatten(current)
    found = []
    for key in dict.fromkeys([*old, *new]):
        if key in FREE_TO_CHANGE:
            continue
        before = ADDED_OPTIONS.get(key, ABSENT)
        a, b = old.get(key, before), new.get(key, before)
        if not _same(a, b):
            found.append((key, a, b))
    return found


def check_same_config(
    recorded_at: Path, recorded: Mapping[str, Any], current: Mapping[str, Any], ways_out: str
) -> None:
    """Refuse to continue the run recorded at ``recorded_at`` under a config that differs from
    ``recorded`` in an option that changes results; the error lists every such option."""
    found = differences(recorded, current)
    if found:
        lacks = flatten(recorded).keys()
        listed = "; ".join(
            f"{key}: {_show(a)}{' (absent: as before the option)' if key not in lacks else ''} there, {_show(b)} now"
            for key, a, b in found
        )
        raise ConfigError(f"{recorded_at} was made with another config ({listed}). {ways_out}")


def run_ways_out(run_dir: Path) -> str:
    """What a ``launcher/train.py`` user can do when the run directory holds another config."""
    return (
        f"To keep that run, give this one its own directory (hydra.run.dir=...); to start over in "
        f"{run_dir}, add resume=never (the old run is moved to {run_dir / PREVIOUS_DIR}/)"
    )


def finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` finished: its ``results.json`` reads as memetrain writes it
    (whole, atomically). One damaged from elsewhere is no finished run: a sweep runs the job again,
    which resumes from its last checkpoint and evaluates anew."""
    try:
        content = json.loads((run_dir / "results.json").read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and isinstance(content.get("protocols"), dict)


def holds_results(run_dir: Path) -> bool:
    """Whether a run left work in ``run_dir``: ``results.json`` or a checkpoint (of any stage). A
    directory with only the config of a start that failed (a bad option, missing data) may be
    taken over by a corrected command."""
    return (run_dir / "results.json").is_file() or any(
        next(run_dir.glob(pattern), None) for pattern in ("checkpoints/step_*", "stages/*/checkpoints/step_*")
    )


def holds_a_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` has anything a run leaves (beyond an empty directory)."""
    return run_dir.is_dir() and any(entry.name != PREVIOUS_DIR for entry in run_dir.iterdir())


def set_aside(run_dir: Path) -> Path:
    """Move everything in ``run_dir`` into ``run_dir/previous/<UTC time>/`` (nothing is deleted;
    the collector reads only the top level of a sweep, so the old run is never counted again)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    target = run_dir / PREVIOUS_DIR / stamp
    target.mkdir(parents=True)
    for entry in list(run_dir.iterdir()):
        if entry.name != PREVIOUS_DIR:
            shutil.move(str(entry), str(target / entry.name))
    return target


def _same(a: Any, b: Any) -> bool:
    """Equal as config values: 1 and 1.0 alike, but a bool never equals a number; an option one
    side lacks equals a null on the other (an option added since, whose default changes nothing)."""
    if (a is ABSENT and b is None) or (a is None and b is ABSENT):
        return True
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _show(value: Any) -> str:
    return "(absent)" if value is ABSENT else repr(value)
