"""Rows marked invalid count in no objective: for every method, a batch whose rows 1 and 4 hold
copies of other memes marked ``valid`` False (what the stream puts in place of a bad sample) gives
the losses, the parameter gradients and the running statistics (DINO's center) of the batch with
those rows removed. And CLIP across two processes, one of which holds an invalid row, against a
naive loop over the global batch without it.

Methods run in eval mode here: batch norm then uses its running statistics and dropout is off, so
that only the loss can tell the two batches apart (batch-norm layers in train mode do see the
invalid rows; see memetrain.methods.base.valid_rows).
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from memetrain.methods import DataInfo, build_method
from memetrain.methods.semimemes import AUTOENCODERS, CLASSIFIER
from tests.helpers import torchrun
from tests.methods.clip_gather_script import Towers
from tests.methods.test_cass import cass, cass_mm
from tests.methods.test_cass import memes as cass_memes
from tests.methods.test_clip import SMALL, clip, naive_clip_loss
from tests.methods.test_clip import meme_batch as clip_memes
from tests.methods.test_dino import crops, dino
from tests.methods.test_mmbt import meme_batch as mmbt_memes
from tests.methods.test_mmbt import mmbt
from tests.methods.test_tib_va import MAMI

B = 6
STAND_INS = {1: 2, 4: 0}  # row 1 holds a copy of row 2 (unlabeled in CMML), row 4 a copy of row 0
KEPT = [0, 2, 3, 5]
LABELS = torch.tensor([[1, 0], [0, 1], [-1, 1], [1, -1], [-1, 0], [0, 0]])  # [B, 2], -1 missing
SUPERVISED_MODEL = {
    "image": {"name": "test_resnet", "image_size": 32},
    "text": {"kind": "lstm", "vocab_size": None, "embed_dim": 8, "hidden_size": 8},
    "head": {"kind": "concat", "hidden_dim": 16},
}
TWO_LABELS = DataInfo(["hateful", "harmful"], "hateful", vocab_size=50)


def rows(batch: dict, which: list[int]) -> dict:
    """The memes ``which`` of ``batch``: every per-meme tensor, list of crops and list of values."""
    out = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[name] = value[which]
        elif isinstance(value, list) and isinstance(value[0], torch.Tensor):  # multi-crop views
            out[name] = [view[which] for view in value]
        else:
            out[name] = [value[i] for i in which]
    return out


def with_stand_ins(batch: dict) -> dict:
    """``batch`` with each stand-in row a copy of its source meme, marked invalid."""
    out = rows(batch, [STAND_INS.get(i, i) for i in range(B)])
    out["valid"] = torch.tensor([i not in STAND_INS for i in range(B)])
    return out


def step(method, batch: dict) -> tuple[dict, dict, dict]:
    """Losses, parameter gradients and buffers after one training step of a copy of ``method``."""
    method = copy.deepcopy(method)
    losses, _ = method.training_step(batch)
    sum(value for name, value in losses.items() if name.endswith("_loss")).backward()
    grads = {name: p.grad for name, p in method.named_parameters() if p.grad is not None}
    return losses, grads, {name: buffer.clone() for name, buffer in method.named_buffers()}


def labeled(batch: dict, labels: torch.Tensor = LABELS) -> dict:
    return {**batch, "labels": labels, "valid": torch.ones(B, dtype=torch.bool)}


def supervised(_):
    torch.manual_seed(0)
    method = build_method("supervised", {"loss": "focal"}, SUPERVISED_MODEL, TWO_LABELS)
    return method, labeled(clip_memes(B))


def mmbt_case(_):
    texts = [[5 + i] * (1 + i % 3) for i in range(B)]
    return mmbt(), labeled(mmbt_memes(texts))


def clip_case(_):
    torch.manual_seed(0)
    return clip(embed_dim=8), labeled(clip_memes(B))


def dino_case(_):
    return dino(), labeled(crops(batch=B))


def cass_case(_):
    return cass(), labeled(cass_memes(B))


def cass_mm_case(_):
    return cass_mm(), labeled(cass_memes(B))


def frozen_clip_method(name: str, weights, data: DataInfo = TWO_LABELS, **options):
    """A method over frozen CLIP features (the small CLIP of ``weights``)."""
    torch.manual_seed(0)
    return build_method(name, {"clip": {"weights": str(weights), "embed_dim": 16}, **options}, SMALL, data)


def semimemes_stage(stage: str):
    def case(weights):
        method = frozen_clip_method("semimemes", weights, hidden_dim=8, latent_dim=4)
        method.start_stage(next(s for s in method.stages(10) if s.name == stage))
        return method, labeled(clip_memes(B))

    return case


def cmml_case(weights):
    method = frozen_clip_method("cmml", weights, targets=["hateful"])
    return method, labeled(clip_memes(B))


def tib_va_case(weights):
    method = frozen_clip_method("tib_va", weights, MAMI, targets=list(MAMI.label_names))
    labels = torch.randint(-1, 2, (B, len(MAMI.label_names)), generator=torch.Generator().manual_seed(0))
    return method, labeled(clip_memes(B), labels)


CASES = {
    "supervised": supervised,
    "mmbt": mmbt_case,
    "clip": clip_case,
    "dino": dino_case,
    "cass": cass_case,
    "cass_mm": cass_mm_case,
    "semimemes_autoencoders": semimemes_stage(AUTOENCODERS),
    "semimemes_classifier": semimemes_stage(CLASSIFIER),
    "cmml": cmml_case,
    "tib_va": tib_va_case,
}


@pytest.mark.parametrize("name", CASES)
def test_invalid_rows_change_no_loss_gradient_or_statistic(name, clip_weights):
    method, batch = CASES[name](clip_weights[0])
    method.eval()
    losses, grads, buffers = step(method, with_stand_ins(batch))
    expected_losses, expected_grads, expected_buffers = step(method, rows(batch, KEPT))
    assert losses.keys() == expected_losses.keys()
    for term, value in expected_losses.items():
        torch.testing.assert_close(losses[term], value, rtol=1e-5, atol=1e-6, msg=term)
    assert grads.keys() == expected_grads.keys() and any(g.abs().sum() > 0 for g in grads.values())
    for param, grad in expected_grads.items():
        torch.testing.assert_close(grads[param], grad, rtol=1e-4, atol=1e-6, msg=param)
    for buffer, value in expected_buffers.items():  # DINO's center moves by the valid rows alone
        torch.testing.assert_close(buffers[buffer], value, rtol=1e-5, atol=1e-6, msg=buffer)


# -- CLIP across two processes -----------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_with_an_invalid_row_give_the_global_batch_without_it(tmp_path):
    script = Path(__file__).with_name("clip_valid_script.py")
    result = subprocess.run(
        [*torchrun(2), str(script), str(tmp_path)], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    problem = ranks[0]["problem"]
    model = Towers()
    model.load_state_dict(problem["weights"])
    kept = problem["kept"]  # global rows that are valid
    image = F.normalize(model.image(problem["images"][kept]), dim=1)
    text = F.normalize(model.text(problem["texts"][kept]), dim=1)
    reference = naive_clip_loss(image, text, model.logit_scale.exp())
    reference.backward()
    for rank in ranks:
        for local_loss, result in rank["results"].items():
            torch.testing.assert_close(result["loss"], reference.detach(), msg=f"local_loss={local_loss}")
            for name, param in model.named_parameters():
                torch.testing.assert_close(
                    result["grads"][name], param.grad, msg=f"{name} (local_loss={local_loss})"
                )
