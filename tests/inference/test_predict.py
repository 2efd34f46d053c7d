"""A finished run's model bundle, copied alone elsewhere, scores memes it has never seen exactly as
the run's own evaluation scored them: from a folder with a CSV, from shards, in Python, and under
two processes; bad memes are listed with why; a probe-evaluated run's bundle carries its probe."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

import memetrain
from tests.helpers import REPO, free_port, run_launcher, tiny_run_overrides

pytestmark = pytest.mark.slow


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def memes_folder(shards: Path, split: str, folder: Path) -> Path:
    """The memes of a packed split as a folder of image files and a ``memes.csv`` (id, image, text,
    hateful): what a user would hand predict, written from the shards' members byte for byte."""
    (folder / "img").mkdir(parents=True)
    rows = []
    for shard in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            members = {member.name: member for member in tar.getmembers()}
            for name in sorted(members):
                key, extension = name.rsplit(".", 1)
                if extension not in ("jpg", "png"):
                    continue
                (folder / "img" / name).write_bytes(tar.extractfile(members[name]).read())
                text = tar.extractfile(members[f"{key}.txt"]).read().decode()
                labels = json.loads(tar.extractfile(members[f"{key}.json"]).read())["labels"]
                rows.append({"id": key, "image": f"img/{name}", "text": text, "hateful": labels["hateful"]})
    with open(folder / "memes.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["id", "image", "text", "hateful"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


@pytest.fixture(scope="module")
def new_memes(synth_shards, tmp_path_factory) -> Path:
    return memes_folder(synth_shards, "test", tmp_path_factory.mktemp("new_memes"))


def run_scores(run_dir: Path, protocol: str = "classifier") -> dict[str, float]:
    return {
        row["id"]: float(row["score"]) for row in read_csv(run_dir / "predictions" / f"{protocol}_test.csv")
    }


def test_the_bundle_holds_everything_and_nothing_pickled(bundle):
    assert sorted(p.name for p in bundle.iterdir()) == [
        "bundle.json",
        "tokenizer.json",
        "weights.safetensors",
    ]
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["head"] == "classifier" and manifest["targets"] == ["hateful"]
    assert manifest["source"]["checkpoint"]["path"] == "checkpoints/step_0000006"
    assert 0 < manifest["thresholds"][0] < 1 and manifest["image_size"] == 32
    assert manifest["interpolation"] == "bilinear"  # a tower trained from scratch: data.interpolation=auto


def test_a_copied_bundle_predicts_a_folder_as_the_run_scored_it(bundle, new_memes, finished_run, tmp_path):
    output = tmp_path / "out" / "predictions.csv"
    result = subprocess.run(
        [sys.executable, str(REPO / "launcher" / "predict.py"), f"model={bundle}", f"input={new_memes}",
         "annotations=memes.csv", f"output={output}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(output)
    expected = run_scores(finished_run)
    assert [row["id"] for row in rows] == [row["id"] for row in read_csv(new_memes / "memes.csv")]
    assert {row["id"]: float(row["hateful_probability"]) for row in rows} == expected
    threshold = json.loads((bundle / "bundle.json").read_text())["thresholds"][0]
    assert all(
        int(row["hateful_decision"]) == (float(row["hateful_probability"]) >= threshold) for row in rows
    )
    results = json.loads((finished_run / "results.json").read_text())
    auroc = results["protocols"]["classifier"]["splits"]["test"]["auroc"]
    assert f"hateful: AUROC {auroc:.4f}" in result.stdout
    assert not output.with_name("predictions.rejected.csv").exists()


def test_load_model_in_python_gives_the_same_probabilities(bundle, new_memes, finished_run):
    rows = read_csv(new_memes / "memes.csv")
    model = memetrain.load_model(bundle)
    probabilities = model.predict([new_memes / row["image"] for row in rows], [row["text"] for row in rows])
    assert probabilities.shape == (len(rows), 1)
    expected = run_scores(finished_run)
    for row, probability in zip(rows, probabilities[:, 0].tolist()):
        assert probability == pytest.approx(expected[row["id"]], abs=1e-6)
    pil = model.predict([Image.open(new_memes / rows[0]["image"])], [rows[0]["text"]])
    assert pil.shape == (1, 1) and 0 <= float(pil) <= 1


def test_bad_memes_are_listed_with_why_and_the_rest_scored(bundle, new_memes, tmp_path):
    folder = Path(shutil.copytree(new_memes, tmp_path / "memes"))
    rows = read_csv(folder / "memes.csv")
    (folder / rows[0]["image"]).write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / rows[1]["image"]).unlink()
    output = tmp_path / "predictions.csv"
    result = run_launcher(
        "predict.py", f"model={bundle}", f"input={folder}", "annotations=memes.csv", f"output={output}",
        "label_columns=[]",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["id"] for row in read_csv(output)] == [row["id"] for row in rows[2:]]
    assert "hateful" not in read_csv(output)[0], "label_columns=[]: no labels read, no metrics"
    rejected = {row["id"]: row["reason"] for row in read_csv(tmp_path / "predictions.rejected.csv")}
    assert set(rejected) == {rows[0]["id"], rows[1]["id"]}
    assert "is not a JPEG, PNG, GIF, BMP or WebP image" in rejected[rows[0]["id"]], rejected
    assert rows[1]["image"] in rejected[rows[1]["id"]] and "not found" in rejected[rows[1]["id"]], rejected
    assert f"could not score 2 (id and reason in {tmp_path / 'predictions.rejected.csv'})" in result.stdout


def test_shards_under_two_processes_give_the_one_process_csv(bundle, synth_shards, finished_run, tmp_path):
    one = tmp_path / "one.csv"
    assert (
        run_launcher("predict.py", f"model={bundle}", f"input={synth_shards}", f"output={one}").returncode
        == 0
    )
    two = tmp_path / "two.csv"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port",
         str(free_port()), str(REPO / "launcher" / "predict.py"), f"model={bundle}", f"input={synth_shards}",
         f"output={two}"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**os.environ, "ACCELERATE_USE_CPU": "1", "TOKENIZERS_PARALLELISM": "false"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert two.read_text() == one.read_text()
    assert {row["id"]: float(row["hateful_probability"]) for row in read_csv(one)} == run_scores(finished_run)


def test_a_probe_evaluated_run_bundles_its_probe(synth_shards, tmp_path):
    run_dir = tmp_path / "clip"
    result = run_launcher(
        "train.py", *tiny_run_overrides(synth_shards, run_dir, steps=6), "method=clip", "model=clip_small",
        "eval=probe", "eval.protocols=[linear_probe]", "eval.tsne=false",
        "data.interpolation=bicubic",  # predict must resize as evaluation did, or the scores differ
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((run_dir / "model" / "bundle.json").read_text())
    assert manifest["head"] == "linear_probe" and (run_dir / "model" / "probe.safetensors").is_file()
    assert manifest["interpolation"] == "bicubic"
    output = tmp_path / "probe.csv"
    assert (
        run_launcher("predict.py", f"model={run_dir}", f"input={synth_shards}", f"output={output}").returncode
        == 0
    )
    got = {row["id"]: float(row["hateful_probability"]) for row in read_csv(output)}
    assert got == pytest.approx(run_scores(run_dir, "linear_probe"), abs=1.5e-6)


def test_errors_name_the_option(bundle, tmp_path):
    cases = [
        ([f"model={tmp_path}", f"input={tmp_path}"], f"error: {tmp_path} holds no model bundle"),
        (
            [f"model={bundle}", f"input={tmp_path}"],
            f"error: {tmp_path} is a folder of memes: name its annotation file",
        ),
        (
            [f"model={bundle}", f"input={tmp_path}", "source=synth"],
            "error: source='synth': choose auto, folder",
        ),
    ]
    for args, message in cases:
        result = run_launcher("predict.py", *args)
        assert result.returncode == 2 and result.stderr.startswith(message), result.stderr[-2000:]
