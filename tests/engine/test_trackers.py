"""Accelerate's experiment trackers, real ones: TensorBoard by default, wandb in offline mode and
mlflow's local file store beside it; a resumed run continues the same tracker runs."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from tests.faults.conftest import fault_run_overrides
from tests.helpers import run_launcher

pytestmark = pytest.mark.slow


def wandb_history(path: Path, key: str) -> list[int]:
    """The steps at which an offline wandb run logged ``key``, read from its transaction log
    (``run-<id>.wandb``: a 7-byte W&B header, then LevelDB log records of wandb's protobufs)."""
    from wandb.proto import wandb_internal_pb2

    data, position, records, pending = path.read_bytes(), 7, [], b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        if kind == 1:  # a whole record; 2, 3, 4: its first, middle and last fragments
            records.append(chunk)
        elif kind in (2, 3):
            pending = (pending if kind == 3 else b"") + chunk
        elif kind == 4:
            records.append(pending + chunk)
    steps = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            if key in items:
                steps.append(int(items["_step"]))
    return steps


def test_wandb_and_mlflow_runs_get_the_metrics_and_a_resume_continues_them(
    synth_shards, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    store = f"file:{tmp_path / 'mlruns'}"
    # mlflow's local file store (MLFLOW_ALLOW_FILE_STORE: mlflow 3 wants a database server otherwise)
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "MLFLOW_TRACKING_URI": store,
        "MLFLOW_ALLOW_FILE_STORE": "true",
    }
    overrides = [*fault_run_overrides(synth_shards, run_dir), "trainer.log_with=[tensorboard,wandb,mlflow]"]
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the test reads the same store
    first = run_launcher("train.py", *overrides, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    ids = json.loads((run_dir / "trackers.json").read_text())
    assert set(ids) == {"wandb", "mlflow"}

    client = MlflowClient(store)
    [experiment] = [e for e in client.search_experiments() if e.name == "memetrain"]
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == ids["mlflow"] and run.info.run_name == "run"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 13))
    [offline] = (run_dir / "wandb").glob(f"offline-run-*-{ids['wandb']}")
    assert wandb_history(offline / f"run-{ids['wandb']}.wandb", "train/loss") == list(range(1, 13))
    assert wandb_history(offline / f"run-{ids['wandb']}.wandb", "val/auroc") == [6, 12]
    assert any((run_dir / "tb").glob("events.out.tfevents.*"))

    for late in ("step_0000009", "step_0000012"):  # killed after step 6's checkpoint: resumed
        shutil.rmtree(run_dir / "checkpoints" / late)
    (run_dir / "results.json").unlink()
    again = run_launcher("train.py", *overrides, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "trackers.json").read_text()) == ids
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [ids["mlflow"]]
    steps = [m.step for m in client.get_metric_history(ids["mlflow"], "train/loss")]
    assert steps[-6:] == list(range(7, 13)), "the resumed run logs on into the same mlflow run"
    sessions = sorted((run_dir / "wandb").glob(f"offline-run-*-{ids['wandb']}"))
    assert len(sessions) == 2, "the resumed run is a second session of the same wandb run"
    assert wandb_history(sessions[1] / f"run-{ids['wandb']}.wandb", "train/loss") == list(range(7, 13))


def test_an_unknown_tracker_is_one_clear_line(synth_shards, tmp_path):
    result = run_launcher(
        "train.py", *fault_run_overrides(synth_shards, tmp_path / "run"), "trainer.log_with=[tensorbord]"
    )
    assert (
        result.returncode == 2
        and "error: trainer.log_with names ['tensorbord']; choose from" in result.stderr
    )
    assert "Traceback" not in result.stderr
