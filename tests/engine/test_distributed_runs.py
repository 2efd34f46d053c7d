"""Distributed training in real processes on CPU (gloo): 2 DDP ranks equal one process, gradient
checkpointing changes no gradient, DeepSpeed ZeRO 1/2/3 match DDP and resume exactly, a NaN on one
rank is skipped on every rank, a ZeRO-3 run of launcher/train.py, a 2-node launch on one machine,
and a killed rank that ends the job with a clear error in bounded time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from memetrain.data.manifest import Manifest
from memetrain.data.tokenizer import TextEncoder
from memetrain.methods import DataInfo, build_method
from memetrain.models.weights import load_weights
from tests.engine.training_cases_script import main as run_cases
from tests.helpers import REPO, free_port, tiny_run_overrides, torchrun

pytestmark = pytest.mark.slow

SCRIPT = REPO / "tests" / "engine" / "training_cases_script.py"
LAUNCHER = REPO / "launcher" / "train.py"
B, STEPS = 4, 4
CHECKPOINTING = "trainer.gradient_checkpointing=true"
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def case(name: str, method: str, trainer: str = "single", batch_size: int = B, **extra) -> dict:
    """A case of training_cases_script.py: global batch 2B, STEPS steps unless ``extra`` says otherwise."""
    return {"name": name, "method": method, "trainer": trainer, "batch_size": batch_size} | {
        "global_batch": 2 * B,
        "steps": STEPS,
        **extra,
    }


ONE_PROCESS = [
    case("sup-1x8", "supervised", batch_size=2 * B),
    case("sup-1x4x2", "supervised"),  # batch B, 2 micro-batches accumulated
    case("clip-1x8", "clip", batch_size=2 * B),
]
NAN_AT_STEP_1 = {"steps": 3, "nan_calls": [1], "overrides": ["trainer.checkpoint_every=1"]}
TWO_PROCESSES = [  # DDP first: a DeepSpeed Accelerator marks the process as DeepSpeed's for good
    case("sup-ddp", "supervised", "ddp"),
    case("sup-ddp-ckpt", "supervised", "ddp", overrides=[CHECKPOINTING]),
    case("clip-ddp", "clip", "ddp"),
    case("sup-ddp-nan", "supervised", "ddp", **NAN_AT_STEP_1)
    | {"overrides": ["trainer.checkpoint_every=1", "trainer.grad_clip=null"]},  # only the loss says NaN
    case("sup-zero1", "supervised", "deepspeed_zero1", resume_from=2, overrides=[CHECKPOINTING]),
    case("clip-zero2", "clip", "deepspeed_zero2", resume_from=2),  # 0-d logit scale, gathered loss
    case("sup-zero3", "supervised", "deepspeed_zero3", resume_from=2)
    | {"overrides": ["trainer.deepspeed.param_persistence_threshold=100"]},  # nearly every weight sharded
    case("sup-zero2-nan", "supervised", "deepspeed_zero2", **NAN_AT_STEP_1),
    case("bn-zero2", "supervised", "deepspeed_zero2", model="supervised_bn", resume_from=2),
]


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cases")
    (out / "two.json").write_text(json.dumps(TWO_PROCESSES))
    process = subprocess.run(
        [*torchrun(2), str(SCRIPT), str(out), str(out / "two.json")],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=ENV,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-6000:]
    run_cases(out, ONE_PROCESS)  # in this process: no process group
    return out


def weights(root: Path, name: str, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(str(root / name / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))


def gradients(root: Path, name: str) -> list[dict[str, torch.Tensor]]:
    return torch.load(root / name / "report.pt")["grads"]


def assert_same_training(got: dict, expected: dict) -> None:
    """Equal up to float summation order (the batch is split differently); 4 AdamW steps move the
    weights by ~4e-3, a wrong sample set or gradient scale by as much."""
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].shape == expected[name].shape, name
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.parametrize(
    ("ranks", "one"), [("sup-ddp", "sup-1x8"), ("clip-ddp", "clip-1x8"), ("sup-1x4x2", "sup-1x8")]
)
def test_two_ranks_of_batch_b_train_as_one_process_of_batch_2b(cases, ranks, one):
    expected, got = gradients(cases, one), gradients(cases, ranks)
    assert len(got) == len(expected) == STEPS
    for step, (grads, reference) in enumerate(zip(got, expected)):
        for name in reference:
            # Summation order differs (CLIP's loss over gathered features sums 16 similarities per
            # row in another order), so an entry's error scales with the tensor's largest terms, not
            # with the entry: a near-zero entry may differ by ~1e-6 when its neighbours are ~0.1.
            scale = reference[name].abs().max().item()
            torch.testing.assert_close(
                grads[name],
                reference[name],
                rtol=1e-3,
                atol=max(1e-5 * scale, 1e-7),
                msg=f"step {step} {name}",
            )
    assert_same_training(weights(cases, ranks), weights(cases, one))


def test_gradient_checkpointing_leaves_the_gradients_unchanged_under_ddp(cases):
    """Both backbones checkpointed (timm's ViT, the transformers text encoder), non-reentrant."""
    plain, checkpointed = gradients(cases, "sup-ddp"), gradients(cases, "sup-ddp-ckpt")
    assert len(checkpointed) == len(plain) == STEPS
    for grads, reference in zip(checkpointed, plain):
        assert grads.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(grads[name], reference[name], msg=name)


@pytest.mark.parametrize(
    ("name", "one"), [("sup-zero1", "sup-1x8"), ("clip-zero2", "clip-1x8"), ("sup-zero3", "sup-1x8")]
)
def test_deepspeed_zero_trains_as_one_process_and_resumes_exactly(cases, name, one):
    checkpoint = cases / name / "checkpoints" / "step_0000002"
    assert (checkpoint / "pytorch_model").is_dir() and (checkpoint / "model.safetensors").is_file()
    assert_same_training(weights(cases, name), weights(cases, one))  # names and shapes as without DeepSpeed
    uninterrupted, resumed = weights(cases, name), weights(cases, f"{name}-resumed")
    assert torch.load(cases / f"{name}-resumed" / "report.pt")["resumed_from"] == "step_0000002"
    assert all(torch.equal(uninterrupted[key], resumed[key]) for key in uninterrupted)
    features = [torch.load(cases / run / "report.pt")["features"] for run in (name, f"{name}-resumed")]
    assert torch.equal(*features), "every rank evaluates the resumed model as the uninterrupted one"


def test_every_rank_evaluates_with_rank_0s_batch_norm_statistics_after_a_resume(cases):
    """ZeRO-1/2 save rank 0's buffers only and DeepSpeed never syncs them: without the trainer's
    broadcast, rank 1 would evaluate with its own statistics, and with rank 0's after a resume."""
    features = [torch.load(cases / run / "report.pt")["features"] for run in ("bn-zero2", "bn-zero2-resumed")]
    assert features[0].shape[0] == 8 and torch.equal(*features)


@pytest.mark.parametrize("name", ["sup-ddp-nan", "sup-zero2-nan"])
def test_a_nan_loss_on_one_rank_skips_the_step_on_every_rank(cases, name):
    assert torch.load(cases / name / "report.pt")["skipped_steps"] == 1
    before, skipped, after = (weights(cases, name, step) for step in (1, 2, 3))
    assert all(torch.equal(before[key], skipped[key]) for key in before), "the skipped step changed weights"
    assert any(not torch.equal(skipped[key], after[key]) for key in after), "training stopped after the skip"
    assert all(torch.isfinite(value).all() for value in after.values())


# -- launcher/train.py in real launches -----------------------------------------------------------


def launch(command: list[str], timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**ENV, **(env or {})}
    )


def built_method(run_dir: Path, shards: Path):
    """The method of a finished run, built afresh from its config.yaml without DeepSpeed."""
    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    manifest = Manifest.load(shards)
    encoder = TextEncoder(shards / "tokenizer.json", cfg["data"]["max_length"])
    info = DataInfo(manifest.label_names, manifest.main_label, encoder.vocab_size, encoder.pad_id)
    options = dict(cfg["method"])
    name = options.pop("name")
    options.pop("view")
    return build_method(name, options, cfg["model"], info)


def test_deepspeed_zero3_bf16_runs_launcher_train_and_leaves_weights_for_fine_tuning(synth_shards, tmp_path):
    """Training, checkpoints and every evaluation protocol with sharded weights, bf16 autocast
    inside DeepSpeed's engine; the merged weights load strictly into the method built afresh."""
    run_dir = tmp_path / "zero3"
    overrides = tiny_run_overrides(synth_shards, run_dir, steps=4) + [
        "data.batch_size=8",
        "trainer=deepspeed_zero3",
        "trainer.precision=bf16",
        "trainer.deepspeed.param_persistence_threshold=100",
        "model.image.name=test_resnet",
        "eval.tsne=false",
    ]
    run = launch([*torchrun(2), str(LAUNCHER), *overrides])
    assert run.returncode == 0, run.stderr[-6000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 4 and results["skipped_steps"] == 0
    assert results["protocols"]["classifier"]["splits"]["test"]["num_samples"] > 0
    assert (run_dir / "checkpoints" / "step_0000003" / "pytorch_model").is_dir()

    weights_file = run_dir / "checkpoints" / "step_0000004" / "model.safetensors"
    saved = load_file(str(weights_file))
    assert all(value.dtype in (torch.float32, torch.int64) for value in saved.values())  # fp32 masters
    method = built_method(run_dir, synth_shards)  # strictly, as method.init and SemiMemes load it
    load_weights(method, weights_file)
    assert all(torch.equal(method.state_dict()[k], saved[k]) for k in saved)


def test_semimemes_stages_under_zero2_on_clip_weights_from_zero2(synth_shards, tmp_path):
    """CLIP's merged weights (its 0-d temperature included) load strictly into SemiMemes' frozen
    towers, and each SemiMemes stage prepares a new DeepSpeed engine that trains only its part."""
    common = [
        "data.batch_size=8",
        "trainer=deepspeed_zero2",
        "model=clip_small",
        "model.image.name=test_resnet",
    ]
    common += ["eval.tsne=false"]
    clip_dir, semi_dir = tmp_path / "clip", tmp_path / "semimemes"
    clip = launch(
        [*torchrun(2), str(LAUNCHER), *tiny_run_overrides(synth_shards, clip_dir, steps=2), *common]
        + ["method=clip", "eval=probe", "eval.protocols=[]"]  # only its weights are needed
    )
    assert clip.returncode == 0, clip.stderr[-6000:]
    clip_weights = clip_dir / "checkpoints" / "step_0000002" / "model.safetensors"
    semi = launch(
        [*torchrun(2), str(LAUNCHER), *tiny_run_overrides(synth_shards, semi_dir, steps=2), *common]
        + ["method=semimemes", f"method.clip.weights={clip_weights}", "method.autoencoder_steps=2"]
    )
    assert semi.returncode == 0, semi.stderr[-6000:]
    assert json.loads((semi_dir / "results.json").read_text())["world_size"] == 2
    stages = [
        load_file(str(semi_dir / "stages" / stage / "checkpoints" / "step_0000002" / "model.safetensors"))
        for stage in ("autoencoders", "classifier")
    ]
    tower = load_file(str(clip_weights))
    assert tower["model.logit_scale"].shape == () == stages[1]["clip.model.logit_scale"].shape
    assert all(torch.equal(stages[1][f"clip.{k}"], v) for k, v in tower.items()), "the frozen towers moved"
    frozen = [k for k in stages[0] if k.startswith(("image_to_text.", "text_to_image."))]
    trained = [k for k in stages[0] if k.startswith(("hidden.", "output."))]
    assert frozen and trained
    assert all(torch.equal(stages[0][k], stages[1][k]) for k in frozen), "stage 2 moved the auto-encoders"
    assert all(not torch.equal(stages[0][k], stages[1][k]) for k in trained if k.endswith("weight"))


def test_two_nodes_on_one_machine_train_as_one_job(synth_shards, tmp_path):
    """Two torchrun agents, node ranks 0 and 1, one worker each, meeting at a localhost address."""
    run_dir, port = tmp_path / "two_nodes", free_port()
    overrides = tiny_run_overrides(synth_shards, run_dir, steps=4) + ["data.batch_size=8", "trainer=ddp"]
    overrides.append("eval.tsne=false")
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
    agent += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = [
        subprocess.Popen(
            [*agent, "--node_rank", str(rank), str(LAUNCHER), *overrides],
            cwd=REPO,
            env=ENV,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        for rank, log in enumerate(logs)
    ]
    try:
        codes = [node.wait(timeout=400) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)  # the agent and its workers
    assert codes == [0, 0], logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 4
    assert "2 process(es) x batch 8 x 1 accumulation = 16 per step" in (run_dir / "train.log").read_text()


# -- a rank that dies ------------------------------------------------------------------------------

SLURM_TASK = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_NODEID": "0"}
SLURM_TASK |= {"SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_TASKS_PER_NODE": "2"}


def rank_of(process: psutil.Process) -> str | None:
    """A worker's rank from the environment it was started with (torchrun's, or srun's)."""
    try:
        environ = process.environ()
    except psutil.Error:
        return None
    return environ.get("RANK") or environ.get("SLURM_PROCID")


@pytest.mark.parametrize("launcher", ["torchrun", "slurm_tasks"])
def test_a_killed_rank_ends_the_job_with_a_clear_error_in_bounded_time(synth_shards, tmp_path, launcher):
    """torchrun's agent stops the other workers when one dies and reports which; two tasks started
    the way srun does (no agent) must end themselves: gloo sees the peer's connection close."""
    run_dir = tmp_path / launcher
    overrides = tiny_run_overrides(synth_shards, run_dir, steps=2000) + [
        "data.batch_size=8", "model=lstm", "trainer.checkpoint_every=5000", "trainer.val_every=5000",
        "data.num_workers=0",
    ]  # fmt: skip
    logs = [tmp_path / f"process{index}.log" for index in (0, 1)]
    outputs = dict(cwd=REPO, stderr=subprocess.STDOUT, start_new_session=True)  # files: a full pipe blocks
    if launcher == "torchrun":
        processes = [
            subprocess.Popen(
                [*torchrun(2), str(LAUNCHER), *overrides], env=ENV, stdout=logs[0].open("w"), **outputs
            )
        ]
    else:
        port = {"MASTER_PORT": str(free_port())}
        processes = [
            subprocess.Popen(
                [sys.executable, str(LAUNCHER), *overrides],
                env={**ENV, **SLURM_TASK, **port, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                stdout=logs[r].open("w"),
                **outputs,
            )  # fmt: skip
            for r in (0, 1)
        ]
    try:
        deadline = time.time() + 300
        while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
            assert time.time() < deadline and all(p.poll() is None for p in processes), (
                "training never started"
            )
            time.sleep(0.2)
        tree = [psutil.Process(p.pid) for p in processes]
        tree += [child for p in list(tree) for child in p.children(recursive=True)]
        victim = next(p for p in tree if rank_of(p) == "1" and "train.py" in " ".join(p.cmdline()))
        victim.send_signal(signal.SIGKILL)
        killed = time.time()
        for p in processes:
            p.wait(timeout=120)
        elapsed = time.time() - killed
    finally:
        for p in processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end after a rank died"
    survivor = logs[0].read_text()
    assert processes[0].returncode != 0
    if launcher == "torchrun":
        assert "Root Cause (first observed failure)" in survivor and "rank      : 1" in survivor
        assert "Signal 9 (SIGKILL)" in survivor
    else:
        assert processes[0].returncode == 3  # PEER_FAILED_EXIT_CODE: not the run's own error
        assert (
            "error: rank 0 of 2: a collective operation failed because another process of this run died"
            in survivor
        )
        assert "Traceback" not in survivor
