"""A non-editable install (the wheel) works on its own: configs ship in the package and every
program is a console script. Built here, installed into a fresh virtual environment that borrows
only the dependencies (not memetrain) from this one, and run from another directory."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def test_the_wheel_packs_trains_and_predicts_from_another_directory(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    [wheel] = (tmp_path / "dist").glob("memetrain-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = Path(
        subprocess.run(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    # the dependencies, as a plain path entry: this environment's editable memetrain is not seen
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}

    def run(*command: str) -> subprocess.CompletedProcess:
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command[0]}: {result.stderr[-3000:]}"
        return result

    where = run(str(venv / "bin" / "python"), "-c", "import memetrain; print(memetrain.__file__)").stdout
    assert where.startswith(str(venv)), f"memetrain came from {where}, not the wheel"
    run("memetrain-pack", "source=synth", "count=120", "image_size=32", "output=shards")
    run(
        "memetrain-train", "data.shards=shards", "data.image_size=32", "data.batch_size=8", "trainer.global_batch_size=8",
        "trainer.max_steps=5", "trainer.val_every=5", "data.num_workers=0", "eval.tsne=false", "hydra.run.dir=run",
    )  # fmt: skip
    predicted = run("memetrain-predict", "model=run", "input=shards", "output=predictions.csv").stdout
    assert "scored " in predicted and (work / "predictions.csv").is_file()
    assert "Config groups" in run("memetrain-train", "--help").stdout
    assert "Config groups" in run(str(venv / "bin" / "python"), "-m", "memetrain", "train", "--help").stdout
