"""What a launcher asks for reaches the run, or stops it with one line: real processes on CPU.

- ``accelerate launch --mixed_precision bf16`` with ``trainer.precision=no`` is refused on every
  rank before anything trains (the Accelerator is built with trainer.precision, so the flag used to
  be dropped without a word: the run trained in fp32).
- A DeepSpeed JSON reaches DeepSpeed, the trainer config filling its ``"auto"`` values: given as
  ``trainer.deepspeed.config`` (one process), and as an Accelerate config's ``deepspeed_config_file``
  under ``accelerate launch`` (2 processes; the file used to be dropped for ours, and
  ``ACCELERATE_USE_CPU=1``, which such a launch needs on CPU, made Accelerate leave DeepSpeed out and
  train as plain DDP). DeepSpeed keeps the config it ran with in each checkpoint's model states.
- A JSON that disagrees with the trainer config stops the run with one line naming both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memetrain.engine.zero import load_weights_only
from tests.faults.conftest import assert_one_clear_error
from tests.helpers import REPO, free_port, run_launcher, tiny_run_overrides

pytestmark = pytest.mark.slow

LAUNCHER = REPO / "launcher" / "train.py"
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
DEEPSPEED_JSON = {  # Hugging Face's style: "auto" where the training script decides
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "zero_optimization": {"stage": 2, "reduce_bucket_size": 123456, "allgather_bucket_size": 123456},
}


def two_steps(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        *tiny_run_overrides(shards, run_dir, steps=2),
        "model=lstm",
        "eval.protocols=[]",
        "trainer.checkpoint_every=2",
        *extra,
    ]


def accelerate_launch(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port", str(free_port()), *args]  # fmt: skip


def deepspeed_config_run_with(run_dir: Path) -> dict:
    """The config DeepSpeed ran with, as it stored it in the last checkpoint."""
    states = run_dir / "checkpoints" / "step_0000002" / "pytorch_model" / "mp_rank_00_model_states.pt"
    return load_weights_only(states)["ds_config"]


def test_accelerate_launch_mixed_precision_that_disagrees_is_refused_on_every_rank(synth_shards, tmp_path):
    run_dir = tmp_path / "run"
    config = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"
    result = subprocess.run(
        [*accelerate_launch(config, "--mixed_precision", "bf16"), str(LAUNCHER), "trainer=ddp",
         *two_steps(synth_shards, run_dir, "data.batch_size=8")],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=ENV,
    )  # fmt: skip
    assert result.returncode != 0
    refusal = (
        "error: accelerate launch asks for mixed precision bf16 (--mixed_precision or mixed_precision in its "
        "config: ACCELERATE_MIXED_PRECISION=bf16) but trainer.precision=no: make them agree: add "
        "trainer.precision=bf16 (a precision memetrain trains in), or launch with --mixed_precision no"
    )
    assert result.stderr.count(refusal) == 2, result.stderr[-4000:]  # each rank, before the processes meet
    assert not (run_dir / "checkpoints").exists()


def test_a_deepspeed_json_given_as_trainer_deepspeed_config_reaches_deepspeed(synth_shards, tmp_path):
    json_file = tmp_path / "ds.json"
    json_file.write_text(json.dumps(DEEPSPEED_JSON))
    run_dir = tmp_path / "run"
    result = run_launcher(
        "train.py", "trainer=deepspeed_zero2", f"trainer.deepspeed.config={json_file}",
        *two_steps(synth_shards, run_dir), timeout=300, env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    ran_with = deepspeed_config_run_with(run_dir)
    assert ran_with["zero_optimization"] == DEEPSPEED_JSON["zero_optimization"]  # the file's
    assert (
        ran_with["train_batch_size"] == ran_with["train_micro_batch_size_per_gpu"] == 16
    )  # ours, for "auto"
    assert ran_with["gradient_accumulation_steps"] == 1 and ran_with["gradient_clipping"] == 1.0


def test_a_deepspeed_json_that_disagrees_is_one_error_before_training(synth_shards, tmp_path):
    json_file = tmp_path / "ds.json"
    json_file.write_text(json.dumps({**DEEPSPEED_JSON, "train_micro_batch_size_per_gpu": 4}))
    run_dir = tmp_path / "run"
    result = run_launcher(
        "train.py", "trainer=deepspeed_zero2", f"trainer.deepspeed.config={json_file}",
        *two_steps(synth_shards, run_dir), timeout=300,
    )  # fmt: skip
    assert_one_clear_error(
        result,
        f"error: trainer.deepspeed.config={json_file}: train_micro_batch_size_per_gpu=4 but data.batch_size "
        "gives 16: make them agree",
    )
    assert not (run_dir / "checkpoints").exists()


def test_an_accelerate_config_s_deepspeed_config_file_reaches_deepspeed_on_two_processes(
    synth_shards, tmp_path
):
    json_file = tmp_path / "ds.json"
    json_file.write_text(json.dumps(DEEPSPEED_JSON))
    config = tmp_path / "deepspeed_json.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {json_file}\n  deepspeed_multinode_launcher: standard\n"
        "num_machines: 1\nmachine_rank: 0\nnum_processes: 2\nuse_cpu: false\nmain_training_function: main\n"
        "rdzv_backend: static\nsame_network: true\n"
    )
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [*accelerate_launch(config), str(LAUNCHER), "trainer=deepspeed_zero2",
         *two_steps(synth_shards, run_dir, "data.batch_size=8")],
        capture_output=True, text=True, timeout=400, cwd=REPO, env=ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((run_dir / "results.json").read_text())["world_size"] == 2
    ran_with = deepspeed_config_run_with(run_dir)  # DeepSpeed ran: its checkpoint is there
    assert ran_with["zero_optimization"] == DEEPSPEED_JSON["zero_optimization"]
    assert ran_with["train_batch_size"] == 16 and ran_with["train_micro_batch_size_per_gpu"] == 8
