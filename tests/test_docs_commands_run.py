"""The documented commands that run on this machine, run: each as the documentation writes it, with
its data paths pointed at test data (SynthMemes written out as Hateful Memes, MAMI and folder files,
and packed) and tiny sizes appended (2 training steps at 32 px; sweeps as dry runs). Commands that
need GPUs, several nodes, a Slurm allocation or weights from a hub are composed only
(tests/test_docs_commands.py); the reason for each is asserted here, so a new command is never
skipped silently."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.docs_commands import Command, documented_commands
from tests.helpers import REPO, free_port

pytestmark = pytest.mark.slow

TINY_TRAINING = [
    "data.image_size=32", "data.batch_size=8", "trainer.global_batch_size=8", "trainer.max_steps=2",
    "trainer.warmup_steps=1", "trainer.val_every=2", "trainer.checkpoint_every=2", "trainer.log_every=1",
    "data.num_workers=0", "eval.tsne=false",
]  # fmt: skip
GPU_ONLY = re.compile(
    r"--nproc_per_node [3-9]|--num_gpus|--num_processes [3-9]|--nnodes|1node_8gpu|2node_8gpu|deepspeed_1node"
)


def not_here(command: Command) -> str | None:
    """Why ``command`` cannot run on this 2-core machine without a GPU (None: it runs)."""
    text = command.text
    if command.prefix.startswith("make"):
        return "make demo and make test are what CI and the demo run"
    if text.startswith(("sbatch", "srun")) or "srun " in command.prefix:
        return "a Slurm allocation (the Slurm tests submit the templates to the test cluster)"
    if GPU_ONLY.search(text) or "deepspeed" in command.prefix or "trainer=deepspeed" in text:
        return "several GPUs or DeepSpeed on a GPU"
    if command.launcher == "fetch_weights" or "pretrained=" in text or "open_clip" in text:
        return "weights from a hub (tests/hub fills a hub cache and runs these paths offline)"
    if "placeholder" in " ".join(command.args):
        return "the weights of another run the command names by a placeholder"
    if command.launcher == "sweep" and "dry_run=true" not in text and "launcher=local" not in text:
        return None  # submitted to Slurm: run here as a dry run
    return None


def synth_memes(shards: Path) -> list[dict]:
    """The memes of a SynthMemes pack with their bytes, by split."""
    memes = []
    for shard in sorted(shards.glob("*-*.tar")):
        split = shard.name.rsplit("-", 1)[0]
        with tarfile.open(shard) as tar:
            members = {member.name: member for member in tar.getmembers()}
            for name in sorted(members):
                key, extension = name.rsplit(".", 1)
                if extension == "jpg":
                    labels = json.loads(tar.extractfile(members[f"{key}.json"]).read()).get("labels", {})
                    memes.append(
                        {"split": split, "id": key, "image": tar.extractfile(members[name]).read(),
                         "text": tar.extractfile(members[f"{key}.txt"]).read().decode(),
                         "label": labels.get("hateful")}
                    )  # fmt: skip
    return memes


@pytest.fixture(scope="module")
def data(synth_shards, tmp_path_factory) -> dict[str, Path]:
    """The documentation's /data/... directories, written from SynthMemes in each dataset's layout."""
    root = tmp_path_factory.mktemp("data")
    memes = [m for m in synth_memes(synth_shards) if m["split"] != "unlabeled"]
    hm, mami, folder = root / "hateful_memes", root / "MAMI", root / "memes"
    for directory in (hm / "img", mami, folder / "img"):
        directory.mkdir(parents=True)
    hm_files = {"train": "train", "dev": "dev_seen", "test": "test_seen", "test_unseen": "test_unseen"}
    for split, stem in hm_files.items():
        split = split.removesuffix("_unseen")  # the unseen test file, unlabeled as in the release
        with open(hm / f"{stem}.jsonl", "w") as handle:
            for meme in (m for m in memes if m["split"] == split):
                name = f"{int(meme['id'][5:]):05d}"
                (hm / "img" / f"{name}.png").write_bytes(meme["image"])  # JPEG bytes under .png, as HM has
                handle.write(
                    json.dumps(
                        {
                            "id": int(name),
                            "img": f"img/{name}.png",
                            "label": meme["label"],
                            "text": meme["text"],
                        }
                    )
                    + "\n"
                )
    with (
        open(mami / "training.csv", "w", newline="") as training,
        open(mami / "Test.csv", "w", newline="") as test,
    ):
        train_writer = csv.writer(training, delimiter="\t")
        train_writer.writerow(
            [
                "file_name",
                "misogynous",
                "shaming",
                "stereotype",
                "objectification",
                "violence",
                "Text Transcription",
            ]
        )
        test_writer = csv.writer(test, delimiter="\t")
        test_writer.writerow(["file_name", "Text Transcription"])
        labels = []
        for meme in memes:
            name = f"{int(meme['id'][5:])}.jpg"
            (mami / name).write_bytes(meme["image"])
            if meme["split"] == "test":
                test_writer.writerow([name, meme["text"]])
                labels.append([name, meme["label"], 0, meme["label"], 0, 0])
            else:
                train_writer.writerow([name, meme["label"], 0, meme["label"], 0, 0, meme["text"]])
    with open(mami / "test_labels.txt", "w", newline="") as handle:
        csv.writer(handle, delimiter="\t").writerows(labels)
    for name in ("labels.csv", "memes.csv"):
        with open(folder / name, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "image", "text", "hateful"])
            for meme in memes:
                (folder / "img" / f"{meme['id']}.jpg").write_bytes(meme["image"])
                writer.writerow([meme["id"], f"img/{meme['id']}.jpg", meme["text"], meme["label"]])
    return {"/data/hateful_memes": hm, "/data/MAMI": mami, "/data/memes": folder, "/data/new_memes": folder}


@pytest.fixture(scope="module")
def packs(data, synth_shards, synth_hard_shards, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packs")
    hm = root / "hateful_memes"
    result = run(
        [
            sys.executable,
            "launcher/pack.py",
            "source=hateful_memes",
            f"input={data['/data/hateful_memes']}",
            f"output={hm}",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return {"synth": synth_shards, "synth_hard": synth_hard_shards, "hateful_memes": hm}


@pytest.fixture(scope="module")
def runs(finished_run, tmp_path_factory) -> Path:
    """A directory of run directories for the collector (runs/synth, runs/sweeps/<sweep>)."""
    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(
        finished_run, root / "supervised-fusion_concat-seed0", ignore=shutil.ignore_patterns("checkpoints")
    )
    return root


def run(
    command: list[str], env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=900, cwd=cwd,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
    )  # fmt: skip


def localised(
    command: Command, data: dict[str, Path], packs: dict[str, Path], finished_run: Path, runs: Path, out: Path
) -> list[str]:
    """The command's arguments with its paths pointed at test data, and tiny sizes appended."""
    args = []
    for arg in command.args:
        key, _, value = arg.partition("=")
        if key == "hydra.run.dir":
            continue  # the test's own, below
        for documented, local in data.items():
            if value.startswith(documented):
                value = str(local) + value[len(documented) :].replace("/TRAINING", "")
        if key in ("model",) and command.launcher in ("predict", "export"):
            value = str(finished_run)
            if command.launcher == "export":  # it writes beside the bundle: a copy, not the session's
                value = str(shutil.copytree(finished_run / "model", out / "bundle"))
        elif key in ("input", "shards", "check_input") and value.startswith("shards/"):
            value = str(
                packs[next((name for name in ("hateful_memes", "synth_hard") if name in value), "synth")]
            )
        elif key == "output":
            value = str(out / Path(value).name)
        elif key == "split" and command.launcher == "collect":
            # the runs collected here are SynthMemes' (dev, test): HM's dev_seen, MAMI's carved train_dev
            value = "dev" if value == "train_dev" else value.removesuffix("_seen")
        elif key == "count":
            value = "60"
        elif key == "unlabeled":
            value = "10"
        if "=" not in arg:  # collect's directory, given first
            args.append(str(runs) if command.launcher == "collect" else arg)
            continue
        args.append(f"{key}={value}")
    if command.launcher == "train":
        data_choice = next((a.split("=", 1)[1] for a in args if a.startswith("data=")), "synth")
        args += [
            f"data.shards={packs.get(data_choice, packs['synth'])}",
            *TINY_TRAINING,
            f"hydra.run.dir={out / 'run'}",
        ]
        if data_choice == "hateful_memes":
            args += ["data.eval_splits=[dev_seen,test_seen]", "data.dev_split=dev_seen"]
    elif command.launcher == "sweep":
        args += ["dry_run=true", f"root={out}"]
    elif command.launcher == "predict" and not any(a.startswith("output=") for a in args):
        # its default output is in the working directory, which is the repository here
        args.append(f"output={out / 'predictions.csv'}")
    elif command.launcher == "inspect_shards":
        args += ["image_size=32", "num_workers=0", f"grid={out / 'grid.png'}"]
    return args


def prefix_here(command: Command) -> tuple[list[str], dict[str, str]]:
    """The launcher prefix as this machine runs it: this interpreter, torchrun/accelerate as modules."""
    words = command.prefix.split()
    env = {}
    while words and "=" in words[0]:
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if not words or words[0] == "python":
        return [sys.executable], env
    if words[0] == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            *words[1:],
            "--master_port",
            str(free_port()),
        ], env
    if words[:2] == ["accelerate", "launch"]:
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *words[2:],
            "--main_process_port",
            str(free_port()),
        ], env
    raise AssertionError(f"unknown launcher prefix {command.prefix!r}")


RUNNABLE = {}
for _command in documented_commands():
    if not_here(_command) is None and _command.launcher:
        RUNNABLE.setdefault((_command.prefix, _command.launcher, _command.args), _command)


def test_what_cannot_run_here_says_why_and_the_rest_is_most():
    reasons = {c.text: not_here(c) for c in documented_commands()}
    assert all(reason is None or len(reason) > 20 for reason in reasons.values())
    assert len(RUNNABLE) >= 30, f"only {len(RUNNABLE)} documented commands run here"


@pytest.mark.parametrize("command", list(RUNNABLE.values()), ids=lambda c: f"{c.where}:{c.text}")
def test_a_documented_command_runs(command, data, packs, finished_run, runs, tmp_path):
    prefix, env = prefix_here(command)
    args = localised(command, data, packs, finished_run, runs, tmp_path)
    result = run([*prefix, str(REPO / "launcher" / f"{command.launcher}.py"), *args], env)
    assert result.returncode == 0, (
        f"{command.where}: {command.text}\n{' '.join(args)}\n{result.stderr[-3000:]}"
    )
    assert "Traceback" not in result.stderr
