"""Tiny sweeps for the sweep tests: a config directory on Hydra's search path and the arguments."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.helpers import tiny_run_overrides


def tiny_sweep(
    tmp_path: Path, shards: Path, methods: dict, axes: dict | None = None, steps: int = 6
) -> list[str]:
    """``launcher/sweep.py`` arguments for sweep ``tiny`` (tiny runs of ``steps`` steps, no t-SNE)."""
    common = [o for o in tiny_run_overrides(shards, tmp_path, steps) if not o.startswith("hydra.run.dir=")]
    config = {"name": "tiny", "reference": None, "seeds": [0], "overrides": [*common, "eval.tsne=false"]}
    (tmp_path / "configs" / "sweep").mkdir(parents=True, exist_ok=True)
    (tmp_path / "configs" / "sweep" / "tiny.yaml").write_text(
        yaml.safe_dump({**config, "methods": methods, "axes": axes or {}})
    )
    return [
        "+sweep=tiny",
        f"hydra.searchpath=[file://{tmp_path / 'configs'}]",
        f"root={tmp_path / 'runs'}",
        "collect=false",
    ]


CLIP = {"train": ["method=clip", "model=clip_small", "eval=probe"]}
FUSION_FROM = {  # a concat fusion classifier from a CLIP run's two encoders
    token: [
        "model=fusion_concat",
        "model/text=transformer",
        f"method.init.image={{path:{token},prefix:model.image_encoder.}}",
        f"method.init.text={{path:{token},prefix:model.text_encoder.}}",
    ]
    for token in ("<pretrain>", "<after>")
}
