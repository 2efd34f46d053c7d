"""What the methods over frozen CLIP read of it, beside :class:`memetrain.methods.frozen_clip.FrozenClip`'s
L2-normalised embeddings: the embeddings as CLIP's towers give them (SemiMemes' features: 768-d OpenAI
ViT-L/14 embeddings, unnormalised, ``src/clip_feature_extractor.py`` 24-25), and the text tower's
token states (TIB-VA's LSTM reads them: ``train_multitask.py`` 142 and 70)."""

from __future__ import annotations

import torch
from torch import Tensor

from memetrain.errors import ConfigError
from memetrain.methods.base import Batch
from memetrain.methods.frozen_clip import FrozenClip


@torch.no_grad()
def clip_features(clip: FrozenClip, batch: Batch, normalize: bool) -> tuple[Tensor, Tensor]:
    """The frozen image and text embeddings ``[B, D]`` each, L2-normalised or not."""
    if normalize:
        return clip(batch)
    return clip.model.encode_image(batch), clip.model.encode_text(batch)


def token_states_width(clip: FrozenClip) -> int:
    """The width of :func:`text_token_states` (the text transformer's)."""
    towers = clip.model
    if hasattr(towers, "clip"):  # open_clip
        return towers.clip.transformer.width
    return towers.text_encoder.out_dim


@torch.no_grad()
def text_token_states(clip: FrozenClip, batch: Batch) -> tuple[Tensor, Tensor]:
    """The text transformer's final states of every token position ``[B, L, width]`` and which
    positions hold tokens ``[B, L]`` (bool). For open_clip: after its final LayerNorm, before the
    end-of-text pooling and projection (open_clip's ``CLIP.encode_text`` up to ``ln_final``), over
    all ``context_length`` positions; for our CLIP's transformer: its last hidden states."""
    towers = clip.model
    if hasattr(towers, "clip"):  # open_clip: tokenised here, as OpenClipTowers.encode_text does
        model = towers.clip
        tokens = towers.tokenizer(batch["text"]).to(model.logit_scale.device)  # [B, context_length]
        dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(dtype) + model.positional_embedding.to(dtype)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))  # [B, L, width]
        return x, tokens != 0
    encoder = towers.text_encoder
    if not hasattr(encoder, "model") or "input_ids" not in batch:
        raise ConfigError(
            "token states need a transformer text tower (model/text=transformer or an open_clip CLIP); "
            "with another text tower use the pooled embedding (method.text=pooled)"
        )
    out = encoder.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.last_hidden_state, batch["attention_mask"].bool()
