"""Text encoders: the LSTM ignores padding; the transformer pools, loads local directories, checkpoints."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from memetrain.errors import ConfigError
from memetrain.models import LSTMTextEncoder, TransformerTextEncoder

VOCAB = 50


def tokens(lengths: list[int], width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random ids (pad id 0) and their mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (len(lengths), width), generator=generator)
    mask = (torch.arange(width) < torch.tensor(lengths).unsqueeze(1)).long()
    return ids * mask, mask


def small_bert(**options) -> TransformerTextEncoder:
    torch.manual_seed(0)
    return TransformerTextEncoder.from_config(
        vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, **options
    )


@pytest.mark.parametrize(("bidirectional", "dim"), [(False, 64), (True, 128)])
def test_lstm_shape(bidirectional, dim):
    torch.manual_seed(0)
    encoder = LSTMTextEncoder(VOCAB, bidirectional=bidirectional)
    assert encoder(*tokens([3, 7, 1], 8)).shape == (3, dim) and encoder.out_dim == dim


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lstm_ignores_padding(bidirectional):
    torch.manual_seed(0)
    encoder = LSTMTextEncoder(VOCAB, bidirectional=bidirectional, dropout=0.0).eval()
    ids, mask = tokens([3, 6], 6)
    wide_ids = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    wide_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    left_ids, left_mask = wide_ids.roll(3, dims=1), wide_mask.roll(3, dims=1)  # padding on both sides
    alone = encoder(ids[:1, :3], mask[:1, :3])
    with torch.no_grad():
        reference = encoder(ids, mask)
        assert torch.allclose(encoder(wide_ids, wide_mask), reference, atol=1e-6)
        assert torch.allclose(encoder(left_ids, left_mask), reference, atol=1e-6)
        assert torch.allclose(alone[0], reference[0], atol=1e-6)


def test_lstm_final_state_matches_a_step_by_step_run():
    torch.manual_seed(0)
    encoder = LSTMTextEncoder(VOCAB, embed_dim=8, hidden_size=4, num_layers=2).eval()
    ids, mask = tokens([4], 6)
    with torch.no_grad():
        _, (hidden, _) = encoder.lstm(encoder.embedding(ids[:, :4]))  # only the real tokens
        assert torch.allclose(encoder(ids, mask), hidden[-1], atol=1e-6)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_transformer_shape_and_pooling(pooling):
    encoder = small_bert(pooling=pooling, dropout=0.0).eval()
    ids, mask = tokens([4, 8], 8)
    with torch.no_grad():
        features = encoder(ids, mask)
        hidden = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert features.shape == (2, 64) and encoder.out_dim == 64
    if pooling == "cls":
        assert torch.allclose(features, hidden[:, 0])
    else:
        assert torch.allclose(features[0], hidden[0, :4].mean(dim=0), atol=1e-6)
        assert torch.allclose(features[1], hidden[1].mean(dim=0), atol=1e-6)


def test_transformer_accepts_inputs_embeds():
    encoder = small_bert(dropout=0.0).eval()
    ids, mask = tokens([5, 8], 8)
    with torch.no_grad():
        embeds = encoder.input_embeddings()(ids)
        assert torch.allclose(encoder(None, mask, inputs_embeds=embeds), encoder(ids, mask), atol=1e-6)
    assert encoder.input_embeddings().weight.shape == (VOCAB, 64)


def test_transformer_has_no_unused_pooler():
    encoder = small_bert()
    assert not any(name.startswith("model.pooler") for name, _ in encoder.named_parameters())


def test_transformer_loads_a_local_directory_exactly(offline, tmp_path):
    source = small_bert()
    source.model.save_pretrained(tmp_path / "bert")
    assert (tmp_path / "bert" / "model.safetensors").is_file()
    torch.manual_seed(5)
    loaded = TransformerTextEncoder.from_pretrained(tmp_path / "bert", pooling="mean")
    expected = source.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_transformer_directory_with_missing_weights_is_refused(offline, tmp_path):
    small_bert().model.save_pretrained(tmp_path / "bert")
    weights = tmp_path / "bert" / "model.safetensors"
    state = load_file(weights)
    state.pop("encoder.layer.1.output.dense.weight")
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"1 missing \(encoder.layer.1.output.dense.weight\)"):
        TransformerTextEncoder.from_pretrained(tmp_path / "bert")


def test_transformer_directory_with_wrong_shapes_is_refused(offline, tmp_path):
    small_bert().model.save_pretrained(tmp_path / "bert")
    weights = tmp_path / "bert" / "model.safetensors"
    state = load_file(weights)
    state["encoder.layer.1.output.dense.weight"] = torch.zeros(3, 3)
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="cannot be loaded"):
        TransformerTextEncoder.from_pretrained(tmp_path / "bert")


def test_transformer_missing_directory_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path / "nowhere")):
        TransformerTextEncoder.from_pretrained(tmp_path / "nowhere")


def test_transformer_rejects_unknown_pooling():
    with pytest.raises(ConfigError, match="cls, mean"):
        small_bert(pooling="max")


def test_transformer_grad_checkpointing_gives_the_same_gradients():
    ids, mask = tokens([5, 8], 8)
    grads = []
    for checkpointing in (False, True):
        encoder = small_bert(grad_checkpointing=checkpointing).train()  # dropout on: the RNG is replayed
        assert encoder.model.is_activation_checkpointing is checkpointing
        torch.manual_seed(1)
        encoder(ids, mask).square().sum().backward()
        grads.append({name: p.grad for name, p in encoder.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6, rtol=1e-5), name


def test_frozen_transformer_has_no_gradients():
    encoder = small_bert(freeze=True).train()
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.model.training
