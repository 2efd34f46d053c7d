"""benchmarks/gpu_clip.py's CPU-runnable parts: FLOP counting, the peak table, the report, the
training step itself on a small CLIP, and the clear refusal to run without a GPU."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_clip  # noqa: E402  (a script beside its report helpers, not a package)


def test_step_flops_counts_forward_and_backward_matmuls():
    batch, inputs, outputs = 8, 32, 16
    layer = torch.nn.Linear(inputs, outputs)
    x = torch.randn(batch, inputs, requires_grad=True)

    def step():
        layer(x).sum().backward()

    # forward 2*B*I*O; backward: input and weight gradients, 2*B*I*O each
    assert gpu_clip.step_flops(step) == 6 * batch * inputs * outputs


def test_peak_table_picks_the_right_gpu():
    assert gpu_clip.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_clip.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_clip.peak_flops("NVIDIA H200") == 989e12
    assert gpu_clip.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_clip.peak_flops("Some Future GPU") is None


def test_table_reports_mfu_against_the_target():
    row = dict(checkpointing=True, compile=False, fused=True, batch=512, images_per_second=1000.0)
    table = gpu_clip.build_table([{**row, "flops_per_image": 5e11}], "NVIDIA H100 80GB HBM3", 989e12)
    assert "| on | off | fused | 512 | 1000 | 500.0 | 50.6 % | >= 45 % (met) |" in table
    slow = gpu_clip.build_table([{**row, "flops_per_image": 1e11}], "NVIDIA H100 80GB HBM3", 989e12)
    assert "10.1 % | >= 45 % (not met)" in slow
    unknown = gpu_clip.build_table([{**row, "flops_per_image": 1e11}], "Some GPU", None)
    assert "| 100.0 | – |" in unknown and "unknown" in unknown


@pytest.mark.slow  # builds an open_clip CLIP (ViT-S/32 and a 12-layer text tower): ~5 s
def test_the_benchmark_step_trains_memetrains_clip_on_cpu():
    torch.manual_seed(0)
    device = torch.device("cpu")
    method = gpu_clip.build_clip("ViT-S-32", 64, checkpointing=True, device=device)
    assert method.model.clip.transformer.grad_checkpointing
    optimizer = gpu_clip.make_optimizer(method, fused=False)
    batch = gpu_clip.make_batch(2, 64, device)
    before = method.model.clip.visual.conv1.weight.detach().clone()
    flops = gpu_clip.step_flops(lambda: gpu_clip.train_step(method, optimizer, batch))
    assert flops > 1e9 and not torch.equal(before, method.model.clip.visual.conv1.weight)
    assert math.isfinite(method.model.logit_scale.item())


def test_refuses_clearly_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu_clip.main([])
