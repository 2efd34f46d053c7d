"""MMBT's MMF head starts from the pretrained BERT's own pooler (MMF's MMBT reads BERT's pooler)."""

from __future__ import annotations

import torch

from memetrain.methods import build_method
from tests.hub.hub_cache import put_bert
from tests.methods.test_mmbt import DATA, IMAGE


def test_the_mmf_heads_pooler_is_the_pretrained_berts(hub):
    bert = put_bert(hub.cache, "memetrain-test/tiny-bert", vocab_size=DATA.vocab_size)
    text = {"kind": "transformer", "pretrained": "memetrain-test/tiny-bert", "vocab_size": None}
    method = build_method("mmbt", {"head": "mmf", "image_segment": 1}, {"image": IMAGE, "text": text}, DATA)
    torch.testing.assert_close(method.pooler[0].weight, bert.pooler.dense.weight, rtol=0, atol=0)
    torch.testing.assert_close(method.pooler[0].bias, bert.pooler.dense.bias, rtol=0, atol=0)
    # the encoder itself holds no unused pooler parameters (DistributedDataParallel would refuse them)
    assert not [name for name, _ in method.text_encoder.named_parameters() if "pooler" in name]
