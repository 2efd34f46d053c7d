"""Hate-CLIPper over frozen CLIP towers (gokulkarthik/hateclipper engine.py): the towers frozen, each
pooled output mapped, normalised and crossed, computed by hand here; and open_clip's pooled outputs
before its projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from memetrain.methods import build_method
from tests.methods.test_clip import DATA, SMALL, meme_batch, tiny_open_clip  # noqa: F401 (a fixture)


def test_cross_fusion_over_the_frozen_towers_by_hand(clip_weights):
    options = {"clip": {"weights": str(clip_weights[0]), "embed_dim": 16}, "map_dim": 4}
    method = build_method("hate_clipper", options, SMALL, DATA).eval()
    assert not any(p.requires_grad for p in method.clip.parameters())
    batch = meme_batch()
    with torch.no_grad():
        towers = method.clip.model
        image = towers.image_encoder(batch["image"])  # before CLIP's projection: the encoder's pooled output
        text = towers.text_encoder(batch["input_ids"], batch["attention_mask"])
        head = method.head
        p_i = F.normalize(head.image_proj[0](image), dim=1)
        p_t = F.normalize(head.text_proj[0](text), dim=1)
        fim = torch.stack([torch.outer(a, b).flatten() for a, b in zip(p_i, p_t)])  # [B, 16]
        hidden = torch.relu(head.hidden[0](fim))
        torch.testing.assert_close(method.predict(batch), head.output(hidden))
    losses, _ = method.train().training_step({**batch, "labels": torch.tensor([[0], [1]] * 3)})
    losses["cls_loss"].backward()
    assert head.image_proj[0].weight.grad is not None


def test_open_clip_pooled_outputs_are_before_the_projections(tiny_open_clip, tmp_path, offline):  # noqa: F811
    state = {name: value.contiguous() for name, value in tiny_open_clip.state_dict().items()}
    path = tmp_path / "weights.safetensors"
    save_file(state, path)
    clip = {"tower": "open_clip", "open_clip_model": "memetrain-tiny", "open_clip_weights": str(path),
            "open_clip_image_size": 32}  # fmt: skip
    method = build_method("hate_clipper", {"clip": clip, "map_dim": 4}, {"image": None, "text": None}, DATA)
    batch = meme_batch(size=3)
    image, text = method.features(batch)
    model = method.clip.model.clip
    with torch.no_grad():
        torch.testing.assert_close(image @ model.visual.proj, method.clip.model.encode_image(batch))
        torch.testing.assert_close(
            text @ model.text_projection, method.clip.model.encode_text(batch), rtol=1e-5, atol=1e-5
        )
    assert model.visual.proj is not None  # restored
