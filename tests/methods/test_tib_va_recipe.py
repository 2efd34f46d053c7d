"""TIB-VA's text branch as its code has it (TIBHannover/multimodal-misogyny-detection-mami-2022
train_multitask.py 47 and 70-76): a one-layer, one-way LSTM without biases over the frozen CLIP
text transformer's token states, its final hidden state, checked against an LSTM written out here."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from memetrain.methods import build_method
from memetrain.methods.clip_features import text_token_states
from tests.methods.test_clip import DATA, SMALL, meme_batch, tiny_open_clip  # noqa: F401 (a fixture)


def naive_lstm_last_hidden(lstm: torch.nn.LSTM, states: torch.Tensor) -> torch.Tensor:
    """Gates i, f, g, o (torch's order), no biases, one step at a time."""
    w_ih, w_hh = lstm.weight_ih_l0, lstm.weight_hh_l0
    hidden = w_hh.shape[1]
    h = torch.zeros(states.shape[0], hidden)
    c = torch.zeros(states.shape[0], hidden)
    for t in range(states.shape[1]):
        gates = states[:, t] @ w_ih.T + h @ w_hh.T
        i, f, g, o = gates.split(hidden, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
    return h


def test_the_lstm_reads_every_token_state_and_gives_its_last_hidden_state(clip_weights):
    options = {"clip": {"weights": str(clip_weights[0]), "embed_dim": 16}, "text": "lstm", "features": "raw",
               "hidden_dim": 8}  # fmt: skip
    method = build_method("tib_va", options, SMALL, DATA).eval()
    assert method.text_lstm.bias is False and method.text_lstm.num_layers == 1
    assert not method.text_lstm.bidirectional and method.text_lstm.hidden_size == 8
    batch = meme_batch()
    with torch.no_grad():
        states, _ = text_token_states(method.clip, batch)
        assert states.shape == (6, batch["input_ids"].shape[1], 32)  # every position, the tower's width
        _, (last, _) = method.text_lstm(states)
        torch.testing.assert_close(
            last[0], naive_lstm_last_hidden(method.text_lstm, states), rtol=1e-5, atol=1e-6
        )
        image = method.clip.model.encode_image(batch)  # raw features for the image branch
        expected = method.fusion(torch.cat([method.image_projection(image), last[0]], dim=1))
        torch.testing.assert_close(method.embed(batch), expected)
    losses, _ = method.train().training_step(
        {**batch, "labels": torch.tensor([[0], [1], [1], [0], [1], [0]])}
    )
    losses["cls_loss"].backward()
    assert method.text_lstm.weight_ih_l0.grad.abs().sum() > 0


def test_open_clip_token_states_are_its_text_transformer_before_pooling(tiny_open_clip, tmp_path, offline):  # noqa: F811
    # the pooled embedding open_clip computes from the same states: the end-of-text position,
    # projected; the states come from its own modules, so this checks we stopped at ln_final
    import open_clip

    state = {name: value.contiguous() for name, value in tiny_open_clip.state_dict().items()}
    path = tmp_path / "weights.safetensors"
    save_file(state, path)
    clip = {"tower": "open_clip", "open_clip_model": "memetrain-tiny", "open_clip_weights": str(path),
            "open_clip_image_size": 32}  # fmt: skip
    method = build_method(
        "tib_va", {"clip": clip, "text": "lstm", "hidden_dim": 8}, {"image": None, "text": None}, DATA
    )
    batch = meme_batch(size=3)
    states, mask = text_token_states(method.clip, batch)
    model = method.clip.model.clip
    tokens = open_clip.get_tokenizer("memetrain-tiny")(batch["text"])
    assert states.shape == (3, tokens.shape[1], 32) and torch.equal(mask, tokens != 0)
    eot = tokens.argmax(dim=-1)  # the end-of-text token has the largest id
    pooled = states[torch.arange(3), eot] @ model.text_projection
    torch.testing.assert_close(pooled, model.encode_text(tokens), rtol=1e-5, atol=1e-5)
