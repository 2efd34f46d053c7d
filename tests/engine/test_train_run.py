"""launcher/train.py end to end in real processes: run directory, results, plots, TensorBoard,
and clear errors for bad configs (exact resume after SIGKILL: tests/faults/test_kill_resume.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import REPO, run_launcher, tiny_run_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(synth_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    result = run_launcher(
        "train.py",
        *tiny_run_overrides(synth_shards, run_dir),
        "eval.protocols=[classifier,linear_probe,knn]",
        "data.worker_kind=thread",  # every other run here has worker processes
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def test_run_directory_holds_config_provenance_metrics_and_results(finished_run):
    assert "max_steps: 12" in (finished_run / "config.yaml").read_text()
    provenance = json.loads((finished_run / "provenance.json").read_text())
    assert provenance["world_size"] == 1 and provenance["seed"] == 0
    assert provenance["packages"]["torch"].startswith("2.14.1")
    assert provenance["git"]["revision"] is None or len(provenance["git"]["revision"]) == 40
    assert provenance["weights"] == [], "trained from scratch: no weights file to start from"
    assert provenance["image_preprocessing"]["model.image_encoder"]["mean"] == [0.485, 0.456, 0.406]
    assert (
        provenance["image_preprocessing"]["model.image_encoder"]["interpolation"] == "bicubic"
    )  # resnet18's
    assert provenance["resize_interpolation"] == "bilinear", "data.interpolation=auto without weights"
    assert provenance["per_process_batch"] == 16 and provenance["accumulation_steps"] == 1
    rows = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "train/loss" in row] == [2, 4, 6, 8, 10, 12]
    assert {
        "train/lr",
        "train/grad_norm",
        "perf/samples_per_second",
        "perf/data_wait_fraction",
        "perf/memory_gb",
    } <= rows[0].keys()
    assert [row["step"] for row in rows if "val/loss" in row] == [6, 12]

    results = json.loads((finished_run / "results.json").read_text())
    assert results["steps"] == 12 and results["method"] == "supervised"
    for protocol in ("classifier", "linear_probe", "knn"):
        result = results["protocols"][protocol]
        assert result["threshold_source"] == "dev"
        for split in ("dev", "test"):
            metrics = result["splits"][split]
            for key in (
                "auroc",
                "accuracy",
                "f1_macro",
                "f1_weighted",
                "per_class",
                "confusion_matrix",
                "num_samples",
            ):
                assert key in metrics
            assert metrics["label_fraction"] == 1.0
            assert set(metrics["per_class"]) == {"0", "1"}
            assert sum(map(sum, metrics["confusion_matrix"])) == metrics["num_samples"]


def test_plots_are_valid_pngs(finished_run):
    names = {path.name for path in (finished_run / "plots").glob("*.png")}
    assert {"curves.png", "classifier_roc_test.png", "classifier_confusion_dev.png", "tsne_dev.png"} <= names
    for path in (finished_run / "plots").glob("*.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_tensorboard_events_are_readable(finished_run):
    events = EventAccumulator(str(finished_run / "tb"))
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "val/loss", "perf/samples_per_second"} <= set(tags["scalars"])
    assert [event.step for event in events.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12]
    assert "inputs/train" in tags["images"]


def test_predictions_are_written_per_protocol_and_split(finished_run):
    lines = (finished_run / "predictions" / "classifier_test.csv").read_text().splitlines()
    assert lines[0] == "id,score,prediction,label"
    assert (
        len(lines) - 1
        == json.loads((finished_run / "results.json").read_text())["protocols"]["classifier"]["splits"][
            "test"
        ]["num_samples"]
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=nope"], "Could not find 'method/nope'"),
        (["trainer.max_stepz=3"], "Key 'max_stepz' is not in struct"),
        (["data.label_fraction=0"], "error: label_fraction must be in (0, 1]"),
        (["data.shards=/nonexistent/shards"], "error: no manifest.json in /nonexistent/shards"),
        (["trainer.global_batch_size=24"], "error: trainer.global_batch_size=24 is not a multiple"),
        (["resume=maybe"], "error: resume='maybe'"),
        (["data.worker_kind=threads"], "error: worker_kind='threads': choose process or thread"),
        (
            ["method=clip", "model=clip_small", "eval=probe", "data.unlabeled_splits=[pool]"],
            "error: data.unlabeled_splits names ['pool'], which the pack at",
        ),
        (["data.eval_splits=[dev,tset]"], "error: data.eval_splits names ['tset']"),
        (
            ["method=dino", "model=backbone_resnet18"],
            "error: method dino does not classify: evaluate it with eval=probe",
        ),
    ],
)
def test_config_errors_are_one_clear_line(synth_shards, tmp_path, overrides, message):
    result = run_launcher(
        "train.py", *tiny_run_overrides(synth_shards, tmp_path / "run"), *overrides, timeout=180
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_under_torchrun_and_accelerate_launch(synth_shards, tmp_path, launcher):
    from tests.helpers import free_port, torchrun

    run_dir = tmp_path / launcher
    overrides = tiny_run_overrides(synth_shards, run_dir, steps=4) + ["eval.tsne=false"]
    overrides.append("trainer=ddp")  # which refuses to run as one process
    if launcher == "torchrun":
        command = torchrun(2)
        env = {}
        overrides.append("data.worker_kind=thread")  # DDP with worker threads; accelerate keeps processes
    else:
        overrides.append("data.batch_size=8")
        config = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"  # the shipped one
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
        command += ["--main_process_port", str(free_port())]
        env = {"ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(
        [*command, str(REPO / "launcher" / "train.py"), *overrides],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **env},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 4
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["world_size"] == 2 and provenance["per_process_batch"] == 8
    if launcher == "torchrun":  # batch 16 as for one process: each of the two takes half
        assert (
            "data.batch_size=16 x 2 processes exceeds trainer.global_batch_size=16: 8 per process"
            in result.stderr
        )
        assert "batch_size: 16" in (run_dir / "config.yaml").read_text()  # the config as given
