"""DeepSpeed's checkpoint files are read weights-only on resume: DeepSpeed's own loader passes
``weights_only=False`` (a file that names a function runs it), so the Checkpointer makes it read
each file with ``torch.load(weights_only=True)`` and only the few plain classes DeepSpeed stores
there allowed.

- The classes a ZeRO optimizer state holds in any precision (the static and the dynamic fp16 loss
  scaler, the stage enum, ZeRO-1/2's fragment addresses) load; anything else a pickle names is
  refused naming the file, and the reader is DeepSpeed's own again afterwards.
- In real runs (2 ranks under torchrun, ZeRO-2 on CPU): a planted pickle in the model states or in
  rank 1's optimizer partition is one clear error and never runs; the files DeepSpeed wrote hold no
  class beyond the allowed ones; and a resume from such a checkpoint still ends ``torch.equal`` to
  the uninterrupted run.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from memetrain.engine.zero import (
    deepspeed_checkpoint_classes,
    load_weights_only,
    weights_only_checkpoint_reads,
)
from tests.faults.conftest import assert_same_weights, fault_run_overrides, pickle_payload
from tests.helpers import REPO, torchrun

STEPS = 6  # checkpoints at 3 and 6
RANK_FILES = "checkpoints/step_0000006/pytorch_model"


# -- the loader ------------------------------------------------------------------------------------


def zero_optimizer_state() -> dict:
    """What DeepSpeed's ZeRO-1/2 optimizer puts in ``*_optim_states.pt`` beside tensors, with both
    of its loss scalers (fp16's dynamic one is built as DeepSpeed builds it, dtype included)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    dynamic = DynamicLossScaler(
        init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2, consecutive_hysteresis=False,
        dtype=torch.half,
    )  # fmt: skip
    dynamic.cur_scale, dynamic.cur_hysteresis, dynamic.cur_iter = 2.0**15, 1, 7  # not a fresh one
    return {
        "optimizer_state_dict": {
            "loss_scaler": dynamic,
            "static_loss_scaler": LossScaler(scale=1.0),
            "zero_stage": ZeroStageEnum.gradients,
            "param_slice_mappings": [OrderedDict(weight=fragment_address(numel=6, start=0))],
            "single_partition_of_fp32_groups": [torch.arange(6.0)],
            "base_optimizer_state": {
                "state": {0: {"step": torch.tensor(3.0)}},
                "param_groups": [{"lr": 0.1}],
            },
            "ds_version": "0.19.8",
        }
    }


def test_the_classes_deepspeed_stores_load_weights_only(tmp_path):
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    saved = zero_optimizer_state()
    torch.save(saved, path)
    loaded = load_weights_only(path, map_location="cpu")["optimizer_state_dict"]
    expected = saved["optimizer_state_dict"]
    for key in ("loss_scaler", "static_loss_scaler"):
        assert type(loaded[key]) is type(expected[key]) and vars(loaded[key]) == vars(expected[key]), key
    assert loaded["loss_scaler"].cur_hysteresis == 1 and loaded["loss_scaler"].dtype == torch.half
    assert loaded["zero_stage"] is expected["zero_stage"]
    assert loaded["param_slice_mappings"] == expected["param_slice_mappings"]
    assert torch.equal(loaded["single_partition_of_fp32_groups"][0], torch.arange(6.0))
    assert {type(c).__name__ for c in (loaded["loss_scaler"], loaded["zero_stage"])} <= {
        c.__name__ for c in deepspeed_checkpoint_classes()
    }


def test_anything_else_a_deepspeed_file_names_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pickle-ran"
    path = tmp_path / "mp_rank_00_model_states.pt"
    path.write_bytes(pickle_payload(marker))
    with pytest.raises(
        pickle.UnpicklingError,
        match="^mp_rank_00_model_states.pt: Trying to load unsupported GLOBAL os.system",
    ):
        load_weights_only(path)
    assert not marker.exists()


def test_inside_the_context_deepspeed_s_own_reader_is_weights_only_and_after_it_is_its_own_again(tmp_path):
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class Engine:  # what accelerator._models holds under DeepSpeed: engines with a checkpoint_engine
        checkpoint_engine = TorchCheckpointEngine()

    engines = [Engine(), torch.nn.Linear(2, 2)]  # a module without one is left alone
    marker = tmp_path / "pickle-ran"
    path = tmp_path / "optim_states.pt"
    path.write_bytes(pickle_payload(marker))
    reader = engines[0].checkpoint_engine
    refused = pytest.raises(
        pickle.UnpicklingError, match="optim_states.pt: Trying to load unsupported GLOBAL"
    )
    with weights_only_checkpoint_reads(engines), refused:
        reader.load(str(path), map_location="cpu")
    assert not marker.exists()
    assert "load" not in vars(reader) and reader.load.__func__ is TorchCheckpointEngine.load


# -- real ZeRO-2 runs --------------------------------------------------------------------------------


def zero2(shards: Path, run_dir: Path) -> subprocess.CompletedProcess:
    """``launcher/train.py trainer=deepspeed_zero2`` on 2 ranks under torchrun (batch 8 per rank)."""
    overrides = [*fault_run_overrides(shards, run_dir, STEPS), "data.batch_size=8", "trainer=deepspeed_zero2"]
    return subprocess.run(
        [*torchrun(2), str(REPO / "launcher" / "train.py"), *overrides],
        capture_output=True, text=True, timeout=400, cwd=REPO,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def zero2_run(synth_shards, tmp_path_factory) -> Path:
    """A finished ZeRO-2 run, never interrupted: checkpoints at steps 3 and 6."""
    run_dir = tmp_path_factory.mktemp("zero2") / "run"
    result = zero2(synth_shards, run_dir)
    assert result.returncode == 0, result.stderr[-6000:]
    return run_dir


@pytest.mark.slow
def test_deepspeed_writes_no_class_beyond_the_allowed_ones(zero2_run):
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in deepspeed_checkpoint_classes()}
    files = sorted((zero2_run / RANK_FILES).glob("*.pt"))
    assert {f.name for f in files} == {
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }
    for path in files:
        assert set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) <= allowed, path.name


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        pytest.param("mp_rank_00_model_states.pt", id="model states (every rank reads them)"),
        pytest.param("zero_pp_rank_1_mp_rank_00_optim_states.pt", id="rank 1's optimizer partition"),
    ],
)
def test_a_deepspeed_checkpoint_file_holding_code_is_one_clear_error_and_never_run(
    synth_shards, zero2_run, tmp_path, name
):
    run_dir = Path(shutil.copytree(zero2_run, tmp_path / "run"))
    marker = tmp_path / "pickle-ran"
    (run_dir / RANK_FILES / name).write_bytes(pickle_payload(marker))
    result = zero2(synth_shards, run_dir)
    assert result.returncode != 0
    checkpoint = run_dir / "checkpoints" / "step_0000006"
    refusal = (
        f"error: checkpoint {checkpoint} cannot be loaded (UnpicklingError: {name}: Trying to load "
        "unsupported GLOBAL os.system whose module os is blocked): it is damaged"
    )
    assert refusal in result.stderr, result.stderr[-4000:]
    workers = result.stderr.split("failed (exitcode")[0]  # then torchrun's agent reports, traceback and all
    assert "Traceback" not in workers, workers[-4000:]
    assert not marker.exists()


@pytest.mark.slow
def test_a_zero2_resume_ends_equal_to_the_uninterrupted_run(synth_shards, zero2_run, tmp_path):
    run_dir = Path(shutil.copytree(zero2_run, tmp_path / "run"))
    shutil.rmtree(run_dir / "checkpoints" / "step_0000006")
    (run_dir / "results.json").unlink()
    result = zero2(synth_shards, run_dir)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "resumed from" in result.stderr and "step_0000003 (step 3)" in result.stderr
    assert_same_weights(zero2_run / "checkpoints" / "step_0000006", run_dir / "checkpoints" / "step_0000006")
    for rank in (0, 1):  # each rank's AdamW partition too
        file = f"{RANK_FILES}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        expected, got = (
            load_weights_only(root / file)["optimizer_state_dict"] for root in (zero2_run, run_dir)
        )
        for a, b in zip(expected["single_partition_of_fp32_groups"], got["single_partition_of_fp32_groups"]):
            assert torch.equal(a, b), f"rank {rank}'s fp32 master partition"
        moments = expected["base_optimizer_state"]["state"], got["base_optimizer_state"]["state"]
        assert all(torch.equal(moments[0][i][k], moments[1][i][k]) for i in moments[0] for k in moments[0][i])
