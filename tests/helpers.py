"""Helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NoReturn

import pytest

from memetrain.data.manifest import MANIFEST_NAME, ShardInfo, file_sha256
from memetrain.data.pack import PackOptions, pack
from memetrain.data.sample_index import SampleIndex
from memetrain.data.sources.synth import SynthMemes

REPO = Path(__file__).resolve().parents[1]


NO_SKIPS = "MEMETRAIN_NO_SKIPS"


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test because this machine lacks something it needs (root, mount rights, Slurm's
    packages), or fail it where ``MEMETRAIN_NO_SKIPS=1``: CI sets that (``.ci/run``), where the
    environment must provide everything and a skip would hide tests that never ran.
    ``MEMETRAIN_REQUIRE_SLURM=1`` (its earlier name, for the Slurm cluster alone) counts too.

    Call it instead of ``pytest.skip`` for every environment reason but one: a test that needs a
    GPU stays a plain skip (``pytest.mark.skipif(not torch.cuda.is_available(), ...)``), because CI
    never has a GPU and runs those on GPU machines by hand (benchmarks/gpu_check.sh)."""
    if os.environ.get(NO_SKIPS) == "1" or os.environ.get("MEMETRAIN_REQUIRE_SLURM") == "1":
        pytest.fail(f"{reason} ({NO_SKIPS}=1: this environment must provide it)", pytrace=False)
    pytest.skip(reason)


def pack_synth(output: Path, count: int = 240, image_size: int = 64, per_shard: int = 40, **source) -> Path:
    """Pack SynthMemes in-process into ``output`` (several shards per split by default); only the
    ``hateful`` label unless ``attributes=True`` adds the generator's attribute columns."""
    options = dict(count=count, image_size=image_size, seed=0, **{"attributes": False, **source})
    pack(SynthMemes(**options), output, PackOptions(max_samples_per_shard=per_shard, workers=1), options)
    return output


def shard_infos(*paths: Path) -> list[ShardInfo]:
    """Manifest entries of tar files (samples left 0: the index counts them)."""
    return [ShardInfo(path.name, 0, path.stat().st_size, file_sha256(path)) for path in paths]


def agree_manifest(root: Path, split: str, reindex: bool = True) -> None:
    """Make the manifest at ``root`` list ``split``'s shards as they are now (sizes, sha256) and,
    with ``reindex``, give the split a sample index made anew from them: a pack that agrees with
    itself, as one written by another tool would. Without ``reindex`` the index is the old one."""
    raw = json.loads((root / MANIFEST_NAME).read_text())
    entry = raw["splits"][split]
    for shard in entry["shards"]:
        path = root / shard["name"]
        shard["bytes"], shard["sha256"] = path.stat().st_size, file_sha256(path)
    if reindex:
        shards = [ShardInfo(**shard) for shard in entry["shards"]]
        index, path = SampleIndex.from_shards(root, shards, raw["label_names"]), root / entry["index"]["name"]
        index.save(path)
        entry["index"].update(samples=len(index), bytes=path.stat().st_size, sha256=file_sha256(path))
    (root / MANIFEST_NAME).write_text(json.dumps(raw))


def train_stream(shards: Path, split, text_encoder=None, batch_size: int = 16, subset=None):
    """A shuffled 32 px training stream of ``split`` read in this process (no loader workers)."""
    from memetrain.data.stream import MemeStream, StreamSettings
    from memetrain.data.transforms import Resize

    settings = StreamSettings(batch_size=batch_size, seed=0, drop_last=True, num_workers=0)
    return MemeStream(shards, split, settings, Resize(32), text_encoder, subset=subset)


def clip_weights_for(shards: Path, path: Path, *overrides: str) -> Path:
    """Random weights of ``method=clip model=clip_small`` for the pack at ``shards`` (its tokenizer's
    vocabulary), saved as a CLIP run's ``model.safetensors`` would be: a CLIP run without training."""
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from memetrain.data.manifest import Manifest
    from memetrain.data.tokenizer import TextEncoder
    from memetrain.methods import DataInfo, build_method

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", ["method=clip", "model=clip_small", f"data.shards={shards}", *overrides])
    manifest = Manifest.load(shards)
    encoder = TextEncoder(shards / manifest.tokenizer, cfg.data.max_length)
    info = DataInfo(manifest.label_names, manifest.main_label, encoder.vocab_size, encoder.pad_id)
    options = OmegaConf.to_container(cfg.method, resolve=True)
    options.pop("name"), options.pop("view")
    torch.manual_seed(0)
    clip = build_method("clip", options, OmegaConf.to_container(cfg.model, resolve=True), info)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return path


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide state (AcceleratorState, GradientState, PartialState are
    singletons): the next Accelerator is built afresh, with its own precision and accumulation.
    tests/conftest.py does this after every test; call it between two Accelerators in one test."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def free_port() -> int:
    """A TCP port nobody listens on now (for torchrun's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_run_overrides(shards: Path, run_dir: Path, steps: int = 12) -> list[str]:
    """A run of ``launcher/train.py`` that takes seconds on CPU: 32 px, batch 16, checkpoint every 3 steps."""
    return [
        f"data.shards={shards}",
        "data.image_size=32",
        "data.batch_size=16",
        "data.num_workers=2",
        "trainer.global_batch_size=16",
        f"trainer.max_steps={steps}",
        "trainer.warmup_steps=2",
        "trainer.log_every=2",
        "trainer.val_every=6",
        "trainer.checkpoint_every=3",
        f"hydra.run.dir={run_dir}",
    ]


def run_launcher(script: str, *args: str, timeout: float = 600, env: dict | None = None):
    """Run ``launcher/<script>`` with this interpreter; returns the CompletedProcess."""
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, str(REPO / "launcher" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
        cwd=REPO,
    )


def torchrun(nproc: int = 2) -> list[str]:
    """The command prefix that starts ``nproc`` local processes with torchrun on a free port."""
    import sys

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
    ]
