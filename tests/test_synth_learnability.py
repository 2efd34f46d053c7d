"""SynthMemes does what it is for: a model must combine image and text to detect its hateful memes.

Real runs of ``launcher/train.py`` with the default trainer on 8000 packed memes at 64 px: the image-only
(ResNet-18) and text-only (LSTM) baselines stay near chance, concat fusion of the same encoders is
clearly above it. About 4 minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import pack_synth, run_launcher

pytestmark = pytest.mark.slow

STEPS = 400  # the default trainer runs 600; fusion leaves chance after 100-300 of them


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return pack_synth(tmp_path_factory.mktemp("synth8k"), count=8000, per_shard=2000)


def _test_auroc(corpus: Path, run_dir: Path, model: str) -> float:
    result = run_launcher(
        "train.py",
        f"data.shards={corpus}",
        f"model={model}",
        f"trainer.max_steps={STEPS}",
        f"trainer.val_every={STEPS}",
        f"trainer.checkpoint_every={STEPS}",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    return results["protocols"]["classifier"]["splits"]["test"]["auroc"]


@pytest.mark.parametrize("model", ["resnet18", "lstm"])
def test_one_modality_stays_near_chance(corpus, tmp_path, model: str):
    assert _test_auroc(corpus, tmp_path / model, model) <= 0.65


def test_concat_fusion_of_the_same_encoders_detects_hate(corpus, tmp_path):
    assert _test_auroc(corpus, tmp_path / "fusion", "fusion_concat") >= 0.85
