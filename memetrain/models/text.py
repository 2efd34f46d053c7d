"""Text encoders over token ids and attention masks: the LSTM baseline and BERT-like transformers."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence
from transformers import AutoModel, BertConfig, BertModel, PreTrainedModel

from memetrain.errors import ConfigError
from memetrain.models.weights import describe_mismatch

POOLINGS = ("cls", "mean")


class LSTMTextEncoder(nn.Module):
    """The course-assignment text baseline: word embeddings and a stacked LSTM.

    ``input_ids`` and ``attention_mask`` ``[B, L]`` to the last layer's final hidden state
    ``[B, hidden_size]`` (both directions concatenated, ``[B, 2 * hidden_size]``, when
    ``bidirectional``). Padding is skipped with packed sequences, so extra padding never changes
    the output. Tokens are read in mask order, so left or right padding both work; a text with
    no token at all is read as its first (padding) token.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 128,
        hidden_size: int = 64,
        num_layers: int = 2,
        bidirectional: bool = False,
        dropout: float = 0.0,
        padding_idx: int = 0,
    ):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        self.lstm = nn.LSTM(
            embed_dim,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.out_dim = hidden_size * (2 if bidirectional else 1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        # move each row's real tokens to the front, keeping their order: [B, L]
        order = attention_mask.argsort(dim=1, descending=True, stable=True)
        tokens = input_ids.gather(1, order)
        lengths = attention_mask.sum(dim=1).clamp(min=1).cpu()  # pack_padded_sequence wants CPU lengths
        packed = pack_padded_sequence(self.embedding(tokens), lengths, batch_first=True, enforce_sorted=False)
        _, (hidden, _) = self.lstm(packed)  # hidden: [num_layers * directions, B, hidden_size]
        if self.lstm.bidirectional:
            return torch.cat([hidden[-2], hidden[-1]], dim=1)  # [B, 2 * hidden_size]
        return hidden[-1]  # [B, hidden_size]


class TransformerTextEncoder(nn.Module):
    """A BERT-like encoder (Devlin et al. 2019): token ids to one feature ``[B, hidden_size]``.

    Built from a fresh :class:`BertConfig` (:meth:`from_config`) or from a local Hugging Face model
    directory (:meth:`from_pretrained`). ``pooling`` is ``cls`` (the first token's final state) or
    ``mean`` (the average over real tokens). The model's pooler is dropped: it is unused here, and
    unused parameters break DistributedDataParallel. MMBT-style models call :meth:`input_embeddings`
    and pass their own ``inputs_embeds``, with the segment and position of every token.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        pooling: str = "cls",
        grad_checkpointing: bool = False,
        freeze: bool = False,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"text pooling {pooling!r} is unknown; choose one of {', '.join(POOLINGS)}")
        if getattr(model, "pooler", None) is not None:
            model.pooler = None
        self.model = model
        self.pooling = pooling
        self.out_dim: int = model.config.hidden_size
        if grad_checkpointing:
            # active in training mode only; non-reentrant, so frozen inputs still get parameter gradients
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.frozen = freeze
        if freeze:
            model.requires_grad_(False)
            model.eval()

    @classmethod
    def from_config(
        cls,
        vocab_size: int,
        hidden_size: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 512,
        dropout: float = 0.1,
        padding_idx: int = 0,
        pooling: str = "cls",
        grad_checkpointing: bool = False,
        freeze: bool = False,
    ) -> TransformerTextEncoder:
        """A randomly initialised BERT; ``intermediate_size`` defaults to ``4 * hidden_size``."""
        if hidden_size % num_heads:
            raise ConfigError(f"text hidden_size {hidden_size} must be a multiple of num_heads {num_heads}")
        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size or 4 * hidden_size,
            max_position_embeddings=max_position_embeddings,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            pad_token_id=padding_idx,
        )
        return cls(BertModel(config, add_pooling_layer=False), pooling, grad_checkpointing, freeze)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, pooling: str = "cls", grad_checkpointing: bool = False, freeze: bool = False
    ) -> TransformerTextEncoder:
        """A local model directory (``save_pretrained`` layout), every weight but the pooler required.

        safetensors files are preferred and ``.bin`` files are read with ``weights_only=True``;
        nothing is downloaded. Extra weights (pretraining heads) are ignored.
        """
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"text model directory {path} not found or has no config.json: point it at a local "
                "Hugging Face model directory (models are never downloaded)"
            )
        try:
            model, info = AutoModel.from_pretrained(
                str(path), local_files_only=True, weights_only=True, output_loading_info=True
            )
        except RuntimeError as err:  # shapes that differ from config.json, among others
            raise ConfigError(
                f"text model directory {path} cannot be loaded (see the load report above): {err}"
            ) from None
        missing = sorted(name for name in info["missing_keys"] if not name.startswith("pooler."))
        if missing:
            raise ConfigError(
                f"text model directory {path} does not hold all of its model's weights: "
                f"{describe_mismatch(missing, [])}"
            )
        return cls(model, pooling, grad_checkpointing, freeze)

    def train(self, mode: bool = True) -> TransformerTextEncoder:
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def input_embeddings(self) -> nn.Embedding:
        """The word-embedding table (``[vocab_size, hidden_size]``)."""
        return self.model.get_input_embeddings()

    def forward(
        self,
        input_ids: Tensor | None,
        attention_mask: Tensor,
        inputs_embeds: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """``input_ids`` ``[B, L]`` or ``inputs_embeds`` ``[B, L, hidden]``, and ``attention_mask`` ``[B, L]``.

        ``token_type_ids`` (segments) and ``position_ids`` ``[B, L]`` default to segment 0 and positions
        ``0 .. L-1``; the model adds their embeddings to the token embeddings either way.
        """
        hidden = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
        ).last_hidden_state  # [B, L, hidden]
        if self.pooling == "cls":
            return hidden[:, 0]  # [B, hidden]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # [B, hidden]
