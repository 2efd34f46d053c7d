"""Text to token ids: a WordPiece vocabulary trained on the training texts at pack time (stored
beside the shards as ``tokenizer.json``), or any local Hugging Face tokenizer directory.

The pack also stores every split's texts encoded by that tokenizer (a :class:`TokenTable`), so a
stream that uses it pads stored ids instead of tokenising each text again in every epoch (a
tenth of a loader worker's time at 224 px). The table lives beside the shards, not in them:
WordPiece training is not deterministic (huggingface/tokenizers#1794), and shards holding ids
would differ between two packs of the same data.

Optional cleaning follows the course-assignment LSTM baseline: URLs, hashtags and punctuation out.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from memetrain.errors import ConfigError
from memetrain.fileio import atomic_writer

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

_URL = re.compile(r"https?://\S+|www\.\S+")
_HASHTAG = re.compile(r"[#@]\w+")
_PUNCTUATION = re.compile(r"[^\w\s]")
_SPACES = re.compile(r"\s+")


def clean_text(text: str, urls: bool = True, hashtags: bool = True, punctuation: bool = True) -> str:
    if urls:
        text = _URL.sub(" ", text)
    if hashtags:
        text = _HASHTAG.sub(" ", text)
    if punctuation:
        text = _PUNCTUATION.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def train_wordpiece(texts: Iterable[str], vocab_size: int, path: Path) -> Tokenizer:
    """A lower-cased BERT-style WordPiece tokenizer over ``texts``, saved to ``path``."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    tokenizer.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.save(str(path))
    return tokenizer


class TokenTable:
    """Full encodings (``[CLS]`` ... ``[SEP]``, untruncated) of a split's texts in manifest order:
    ``ids`` concatenated, ``offsets[i]:offsets[i + 1]`` the slice of sample ``i``."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray):
        self.ids, self.offsets = ids, offsets

    @classmethod
    def encode(cls, tokenizer: Tokenizer, texts: Sequence[str]) -> TokenTable:
        encodings = [encoding.ids for encoding in tokenizer.encode_batch(list(texts))]
        offsets = np.zeros(len(encodings) + 1, dtype=np.int64)
        np.cumsum([len(ids) for ids in encodings], out=offsets[1:])
        return cls(np.fromiter((i for ids in encodings for i in ids), np.int32, offsets[-1]), offsets)

    @classmethod
    def concatenate(cls, tables: Sequence[TokenTable]) -> TokenTable:
        starts = np.cumsum([0] + [len(table.ids) for table in tables[:-1]])
        offsets = [tables[0].offsets[:1]] + [t.offsets[1:] + start for t, start in zip(tables, starts)]
        return cls(np.concatenate([table.ids for table in tables]), np.concatenate(offsets))

    def save(self, path: Path) -> None:
        with atomic_writer(path) as handle:
            np.savez(handle, ids=self.ids, offsets=self.offsets)

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        with np.load(path, allow_pickle=False) as arrays:  # never unpickles
            return cls(arrays["ids"], arrays["offsets"])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        return self.ids[self.offsets[index] : self.offsets[index + 1]]


class TextEncoder:
    """Batches of texts to fixed-length ``input_ids`` and ``attention_mask`` (int64 arrays).

    ``path`` is a ``tokenizer.json`` file (such as the one packed with the shards), a local Hugging
    Face tokenizer directory, or a Hugging Face model id (``distilbert-base-uncased``) read through
    transformers' hub cache, as the text tower of that id is (``HF_HUB_OFFLINE=1`` honoured).
    ``sha256``: the file's, so a stream can tell whether the ids stored with the samples came from
    this very tokenizer.
    """

    def __init__(self, path: str | Path, max_length: int, clean: bool = False):
        from memetrain.models.hub import looks_like_path

        hub_id = None if looks_like_path(str(path)) else str(path)
        path = Path(path)
        if hub_id is None and not path.exists():
            raise ConfigError(
                f"tokenizer {path} not found: pack the shards (it writes tokenizer.json) or point "
                "data.tokenizer at a local Hugging Face tokenizer directory or a model id"
            )
        if max_length < 2:
            raise ConfigError(f"data.max_length={max_length}: give at least 2 (room for [CLS] and [SEP])")
        self.max_length = max_length
        self.clean = clean
        self.sha256 = None if hub_id or path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        if hub_id or path.is_dir():
            from transformers import AutoTokenizer

            try:
                self._hf = AutoTokenizer.from_pretrained(hub_id or str(path), local_files_only=hub_id is None)
            except OSError as err:
                from memetrain.models.hub import missing_weights

                raise missing_weights(f"tokenizer {hub_id}", "data.tokenizer", str(err)) from err
            self._fast = None
            self.vocab_size = len(self._hf)
            self.pad_id = self._hf.pad_token_id or 0
        else:
            self._hf = None
            self._fast = Tokenizer.from_file(str(path))
            self.pad_id = self._fast.token_to_id("[PAD]") or 0
            self._fast.enable_truncation(max_length)
            self._fast.enable_padding(length=max_length, pad_id=self.pad_id, pad_token="[PAD]")
            self.vocab_size = self._fast.get_vocab_size()

    @property
    def unk_id(self) -> int | None:
        """The id of the unknown-word token (None if the tokenizer has none)."""
        if self._fast is not None:
            return self._fast.token_to_id("[UNK]")
        return self._hf.unk_token_id

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.clean:
            texts = [clean_text(t) for t in texts]
        if self._fast is not None:
            encodings = self._fast.encode_batch(list(texts))
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            return ids, mask
        out = self._hf(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="np",
        )
        return out["input_ids"].astype(np.int64), out["attention_mask"].astype(np.int64)

    def pad(self, table: TokenTable, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """What ``self(texts)`` gives, from the texts' full encodings by this tokenizer file (``rows``
        of a :class:`TokenTable`): a longer one keeps its first ``max_length - 1`` ids and its
        closing ``[SEP]``, as the tokenizer truncates the text between ``[CLS]`` and ``[SEP]``."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = table.offsets[rows], table.offsets[rows + 1]
        kept = np.minimum(ends - starts, self.max_length)
        columns = np.arange(self.max_length)
        mask = columns < kept[:, None]
        at = np.minimum(starts[:, None] + columns, len(table.ids) - 1)  # past a row's end: masked
        ids = np.where(mask, table.ids[at], self.pad_id).astype(np.int64)
        ids[np.arange(len(rows)), kept - 1] = table.ids[ends - 1]
        return ids, mask.astype(np.int64)
