"""Text encoders over token ids and attention masks: the LSTM baseline and BERT-like transformers."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence
from transformers import BertConfig, BertModel, PreTrainedModel

from memetrain.errors import ConfigError
from memetrain.models.hub import Pretrained, remember
from memetrain.models.text_weights import resolve as resolve_text_weights

log = logging.getLogger(__name__)

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

    @property
    def vocab_size(self) -> int:
        """Token ids it embeds: the tokenizer's must not exceed it."""
        return self.embedding.num_embeddings

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if torch.onnx.is_in_onnx_export():
            return self._without_packing(input_ids, attention_mask)
        # move each row's real tokens to the front, keeping their order: [B, L]
        order = attention_mask.argsort(dim=1, descending=True, stable=True)
        tokens = input_ids.gather(1, order)
        lengths = attention_mask.sum(dim=1).clamp(min=1).cpu()  # pack_padded_sequence wants CPU lengths
        packed = pack_padded_sequence(self.embedding(tokens), lengths, batch_first=True, enforce_sorted=False)
        _, (hidden, _) = self.lstm(packed)  # hidden: [num_layers * directions, B, hidden_size]
        if self.lstm.bidirectional:
            return torch.cat([hidden[-2], hidden[-1]], dim=1)  # [B, 2 * hidden_size]
        return hidden[-1]  # [B, hidden_size]

    def _without_packing(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The same features from ops ONNX has (no packed sequences, no stable sort): the real
        tokens scattered to the front, the LSTM run over the whole row, and the top layer's output
        read at the last real token, which is the final hidden state of a forward LSTM."""
        if self.lstm.bidirectional:
            raise ConfigError(
                "a bidirectional LSTM text tower cannot be exported to ONNX (its backward pass needs packed "
                "sequences); export it with format=torchscript"
            )
        mask = attention_mask.long()
        real = mask.cumsum(dim=1) - 1  # [B, L]: a real token's place among the real ones
        count = mask.sum(dim=1, keepdim=True)  # [B, 1]
        pad = count + (1 - mask).cumsum(dim=1) - 1  # [B, L]: a padding token's place after them
        tokens = torch.zeros_like(input_ids).scatter(1, torch.where(mask.bool(), real, pad), input_ids)
        outputs, _ = self.lstm(self.embedding(tokens))  # [B, L, hidden_size]
        last = (count.clamp(min=1) - 1).unsqueeze(-1).expand(-1, 1, outputs.shape[-1])  # [B, 1, hidden_size]
        return outputs.gather(1, last).squeeze(1)  # [B, hidden_size]


class TransformerTextEncoder(nn.Module):
    """A BERT-like encoder (Devlin et al. 2019): token ids to one feature ``[B, hidden_size]``.

    Built from a fresh :class:`BertConfig` (:meth:`from_config`) or from pretrained weights, a Hugging
    Face model id or a local model directory (:meth:`from_pretrained`). ``pooling`` is ``cls`` (the
    first token's final state) or ``mean`` (the average over real tokens). The model's pooler is dropped: it is unused here, and
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
        pooler = getattr(model, "pooler", None)
        # kept as plain tensors, not parameters: a model that reads BERT's pooler (MMBT's MMF head)
        # starts its own from them; unused parameters would break DistributedDataParallel
        self.pretrained_pooler = (
            {k: v.detach().clone() for k, v in pooler.dense.state_dict().items()}
            if pooler is not None and hasattr(pooler, "dense")
            else None
        )
        if pooler is not None:
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

    @property
    def vocab_size(self) -> int:
        """Token ids it embeds (its config's): the tokenizer's must not exceed it."""
        return self.model.config.vocab_size

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
        """A Hugging Face model id (``bert-base-uncased``), read through transformers' hub code and
        cache (``HF_HUB_OFFLINE=1``: the cache only), or a local model directory (``save_pretrained``
        layout); every weight but the pooler required, extra weights (pretraining heads) ignored.
        safetensors files are preferred and ``.bin`` files are read with ``weights_only=True``."""
        weights = resolve_text_weights(path)
        model, files = weights.load()
        encoder = cls(model, pooling, grad_checkpointing, freeze)
        if files:
            source = "file" if weights.local else "transformers"
            remember(encoder, Pretrained(source, weights.name, weights.tag, tuple(files)))
            log.info("%s: weights from %s", weights.describe(), ", ".join(map(str, files)))
        return encoder

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
