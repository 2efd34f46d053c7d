"""DeepSpeed's compiled optimizers (FusedAdam, CPUAdam): whether they can be built is checked before
anything is built, and where they cannot, torch's AdamW takes their place with a log line saying
what to install. The ZeRO-Offload fallback trains, in a real DeepSpeed engine on CPU, to the
weights torch's AdamW reaches without DeepSpeed."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils import cpp_extension

from memetrain.engine import zero
from memetrain.engine.optim import build_optimizer
from tests.engine.test_distributed import trainer
from tests.helpers import REPO

NO_NVCC = "no nvcc to compile it (CUDA_HOME=/usr/local/cuda)"


@pytest.fixture
def toolchain(monkeypatch, tmp_path):
    """ninja and a compiler present, no op prebuilt, and CUDA_HOME a folder the test fills."""
    from deepspeed.git_version_info import installed_ops

    monkeypatch.setitem(installed_ops, "fused_adam", False)
    monkeypatch.setitem(installed_ops, "cpu_adam", False)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setenv("CXX", "sh")  # any program on PATH
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    return tmp_path


def fake_nvcc(cuda_home, release: str) -> None:
    (cuda_home / "bin").mkdir(exist_ok=True)
    nvcc = cuda_home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)


def test_an_op_builds_with_ninja_a_compiler_and_an_nvcc_deepspeed_accepts(toolchain):
    assert zero.op_unavailable("cpu_adam") is None  # C++ only
    assert zero.op_unavailable("fused_adam").startswith("no nvcc to compile it (CUDA_HOME=")
    fake_nvcc(toolchain, "11.8")
    assert zero.op_unavailable("fused_adam") == "nvcc is CUDA 11.8 but torch is built for CUDA 12.4"
    fake_nvcc(toolchain, "12.1")  # DeepSpeed accepts another minor version of the same major
    assert zero.op_unavailable("fused_adam") is None


def test_without_ninja_or_a_compiler_nothing_builds_but_a_prebuilt_op_loads(toolchain, monkeypatch):
    from deepspeed.git_version_info import installed_ops

    fake_nvcc(toolchain, "12.4")
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert zero.op_unavailable("cpu_adam") == "no C++ compiler (no-such-compiler) on PATH"
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    assert zero.op_unavailable("fused_adam") == "ninja is not installed"
    monkeypatch.setitem(installed_ops, "fused_adam", True)
    assert zero.op_unavailable("fused_adam") is None


def test_fused_adam_falls_back_to_torch_s_fused_adamw_with_the_same_update(monkeypatch, caplog):
    monkeypatch.setattr(zero, "op_unavailable", lambda name: NO_NVCC)
    torch.manual_seed(0)
    ours, reference = nn.Linear(3, 2), nn.Linear(3, 2)
    reference.load_state_dict(ours.state_dict())
    options = trainer("deepspeed_zero2", "trainer.deepspeed.optimizer=fused_adam")
    with caplog.at_level(logging.WARNING, logger="memetrain.engine.zero"):
        optimizer = build_optimizer([{"params": list(ours.parameters())}], options, torch.device("cuda"))
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"]
    [record] = caplog.records
    assert record.getMessage().startswith(
        f"trainer.deepspeed.optimizer=fused_adam: DeepSpeed's FusedAdam cannot be built here ({NO_NVCC}); "
        "using torch's fused AdamW instead (the same update). For FusedAdam: install ninja"
    )
    assert "DS_BUILD_FUSED_ADAM=1 pip install" in record.getMessage()
    plain = torch.optim.AdamW(
        reference.parameters(), lr=options["lr"], betas=options["betas"], eps=options["eps"]
    )
    x = torch.randn(4, 3)
    for model, opt in ((ours, optimizer), (reference, plain)):
        for _ in range(3):
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    for mine, theirs in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs)


def test_offload_without_cpu_adam_keeps_our_adamw_and_says_so(monkeypatch, caplog):
    offload = trainer("deepspeed_zero2", "trainer.deepspeed.offload_optimizer=cpu")
    monkeypatch.setattr(zero, "op_unavailable", lambda name: None)
    assert "zero_force_ds_cpu_optimizer" not in zero.deepspeed_config(offload, 4, 1, 2)
    asked = []
    monkeypatch.setattr(zero, "op_unavailable", lambda name: asked.append(name) or "ninja is not installed")
    assert "zero_force_ds_cpu_optimizer" not in zero.deepspeed_config(trainer("deepspeed_zero2"), 4, 1, 2)
    assert asked == [], "without offload CPUAdam is never needed"
    with caplog.at_level(logging.WARNING, logger="memetrain.engine.zero"):
        config = zero.deepspeed_config(offload, 4, 1, 2)
    assert config["zero_force_ds_cpu_optimizer"] is False and asked == ["cpu_adam"]
    [record] = caplog.records
    assert record.getMessage().startswith(
        "trainer.deepspeed.offload_optimizer=cpu: DeepSpeed's CPUAdam cannot be built here (ninja is not "
        "installed); the offloaded optimizer step runs torch's AdamW on the CPU instead"
    )


OFFLOAD_SCRIPT = """
import json, sys
import torch
from torch import nn
from memetrain.engine import distributed, zero
from memetrain.engine.optim import build_optimizer

zero.op_unavailable = lambda name: "ninja is not installed"
options = json.loads(sys.argv[1])
torch.manual_seed(0)
model, reference = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)), nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
reference.load_state_dict(model.state_dict())
x = torch.randn(4, 4)
accelerator = distributed.build_accelerator(options, 4, 1, rendezvous_timeout_s=60)
optimizer = build_optimizer([{"params": list(model.parameters())}], options, accelerator.device)
model, optimizer = accelerator.prepare(model, optimizer)
plain = build_optimizer([{"params": list(reference.parameters())}], options, torch.device("cpu"))
for _ in range(3):
    accelerator.backward(model(x).square().mean())
    optimizer.step()
    optimizer.zero_grad()
    reference(x).square().mean().backward()
    plain.step()
    plain.zero_grad()
print("inner", type(model.optimizer.optimizer).__name__)
ours = {k: v.detach().float().cpu() for k, v in model.module.state_dict().items()}
print("equal", all(torch.allclose(ours[k], v, atol=1e-6) for k, v in reference.state_dict().items()))
distributed.shutdown()
"""


@pytest.mark.slow
def test_zero2_offload_without_cpu_adam_trains_as_adamw_without_deepspeed(tmp_path):
    """One process, ZeRO-2 with the optimizer offloaded to the CPU and CPUAdam unavailable: the
    engine keeps torch's AdamW, and three steps reach the weights AdamW reaches without DeepSpeed."""
    import json

    script = tmp_path / "offload.py"
    script.write_text(OFFLOAD_SCRIPT)
    options = trainer("deepspeed_zero2", "trainer.deepspeed.offload_optimizer=cpu", "trainer.grad_clip=null")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANK", "WORLD_SIZE", "CUDA_VISIBLE", "SLURM_"))
    }
    done = subprocess.run(
        [sys.executable, str(script), json.dumps(options)],
        capture_output=True, text=True, cwd=REPO, timeout=600, env=env | {"PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.splitlines()[-2:] == ["inner AdamW", "equal True"], done.stdout[-3000:]
