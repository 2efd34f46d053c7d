"""Text to token ids: a WordPiece vocabulary trained on the training texts at pack time (stored
beside the shards as ``tokenizer.json``), or any local Hugging Face tokenizer directory.

Optional cleaning follows the course-assignment LSTM baseline: URLs, hashtags and punctuation out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from memetrain.errors import ConfigError

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


class TextEncoder:
    """Batches of texts to fixed-length ``input_ids`` and ``attention_mask`` (int64 arrays).

    ``path`` is a ``tokenizer.json`` file (such as the one packed with the shards) or a local
    Hugging Face tokenizer directory; nothing is fetched from a hub.
    """

    def __init__(self, path: str | Path, max_length: int, clean: bool = False):
        path = Path(path)
        if not path.exists():
            raise ConfigError(
                f"tokenizer {path} not found: pack the shards (it writes tokenizer.json) or point "
                "data.tokenizer at a local Hugging Face tokenizer directory"
            )
        self.max_length = max_length
        self.clean = clean
        if path.is_dir():
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
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
