"""Text encoders: the packed WordPiece file, a local Hugging Face directory, and cleaning."""

from __future__ import annotations

import numpy as np
import pytest

from memetrain.data.tokenizer import TextEncoder, TokenTable, clean_text, train_wordpiece
from memetrain.errors import ConfigError

TEXTS = ["when the round ones show up", "nobody likes the boxy ones", "check https://x.io #memes now!"] * 20


def test_packed_wordpiece_pads_truncates_and_marks_cls(tmp_path):
    train_wordpiece(TEXTS, 200, tmp_path / "tokenizer.json")
    encoder = TextEncoder(tmp_path / "tokenizer.json", max_length=8)
    ids, mask = encoder(["the round ones", "nobody likes the boxy ones when the round ones show up"])
    assert ids.shape == mask.shape == (2, 8)
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0] and mask[1].all()
    assert ids[0, 0] == ids[1, 0] == encoder._fast.token_to_id("[CLS]")
    assert ids[0, 5:].tolist() == [encoder.pad_id] * 3


def test_local_hugging_face_tokenizer_directory(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tokenizer = train_wordpiece(TEXTS, 200, tmp_path / "tokenizer.json")
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")
    hf.save_pretrained(tmp_path / "hf")
    from_dir = TextEncoder(tmp_path / "hf", max_length=8)
    from_file = TextEncoder(tmp_path / "tokenizer.json", max_length=8)
    ids_dir, mask_dir = from_dir(["the round ones"])
    ids_file, mask_file = from_file(["the round ones"])
    assert ids_dir.tolist() == ids_file.tolist() and mask_dir.tolist() == mask_file.tolist()


def test_cleaning_removes_urls_hashtags_and_punctuation():
    assert clean_text("check https://x.io #memes now! @bob, ok?") == "check now ok"
    assert clean_text("keep #this", hashtags=False) == "keep this"


def test_missing_tokenizer_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer .* not found"):
        TextEncoder(tmp_path / "nope.json", max_length=8)
    train_wordpiece(TEXTS, 200, tmp_path / "tokenizer.json")
    with pytest.raises(ConfigError, match="max_length=1: give at least 2"):
        TextEncoder(tmp_path / "tokenizer.json", max_length=1)


@pytest.mark.parametrize("max_length", [2, 3, 8, 64])
def test_padding_stored_encodings_gives_what_encoding_the_texts_gives(tmp_path, max_length):
    tokenizer = train_wordpiece(TEXTS, 200, tmp_path / "tokenizer.json")
    rng = np.random.default_rng(0)
    words = " ".join(TEXTS).split() + ["zzyzx", "unseen!"]
    texts = [" ".join(rng.choice(words, size=n)) for n in (1, 2, 5, 6, 7, 30, 90)] + ["?"]
    table = TokenTable.concatenate(
        [TokenTable.encode(tokenizer, texts[:3]), TokenTable.encode(tokenizer, texts[3:])]
    )
    assert [table[i].tolist() for i in range(len(table))] == [tokenizer.encode(t).ids for t in texts]
    encoder = TextEncoder(tmp_path / "tokenizer.json", max_length=max_length)
    ids, mask = encoder.pad(table, range(len(table)))
    expected_ids, expected_mask = encoder(texts)
    assert ids.dtype == expected_ids.dtype == np.int64
    assert ids.tolist() == expected_ids.tolist() and mask.tolist() == expected_mask.tolist()


def test_a_token_table_round_trips_through_its_file_without_pickle(tmp_path):
    table = TokenTable(np.arange(7, dtype=np.int32), np.array([0, 3, 3, 7]))
    table.save(tmp_path / "dev.tokens.npz")
    loaded = TokenTable.load(tmp_path / "dev.tokens.npz")
    assert len(loaded) == 3 and [loaded[i].tolist() for i in range(3)] == [[0, 1, 2], [], [3, 4, 5, 6]]
    assert not list(tmp_path.glob(".*tmp"))
