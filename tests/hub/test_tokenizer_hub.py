"""``data.tokenizer`` takes a Hugging Face model id, read from the hub cache offline as the text
tower of that id is; a missing one is one error line naming it and the fetch command."""

from __future__ import annotations

import pytest
from transformers import BertTokenizerFast

from memetrain.data.tokenizer import TextEncoder
from memetrain.errors import ConfigError
from tests.hub.hub_cache import put_bert, put_repo

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "hateful", "meme", "##s"]


def test_a_model_id_tokenises_from_the_cache_offline(hub, tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    saved = tmp_path / "saved"
    BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(saved)
    put_bert(hub.cache, "memetrain-test/tiny-bert", vocab_size=len(VOCAB))  # a model repository has both
    put_repo(hub.cache, "memetrain-test/tiny-bert", {p.name: p for p in saved.iterdir()})
    encoder = TextEncoder("memetrain-test/tiny-bert", max_length=6)
    ids, mask = encoder(["a hateful memes"])
    assert ids.tolist() == [[2, 5, 6, 7, 8, 3]] and mask.tolist() == [[1] * 6]
    assert encoder.vocab_size == len(VOCAB) and encoder.sha256 is None


def test_a_model_id_missing_from_the_cache_names_it_and_the_fetch(hub):
    with pytest.raises(ConfigError) as missing:
        TextEncoder("memetrain-test/not-cached", max_length=6)
    message = str(missing.value)
    assert message.startswith(
        "pretrained weights tokenizer memetrain-test/not-cached (data.tokenizer) are not in the cache"
    )
    assert "HF_HUB_OFFLINE=1" in message and "fetch_weights.py" in message


def test_a_path_that_is_not_there_is_still_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer .*/nothing/tokenizer.json not found"):
        TextEncoder(tmp_path / "nothing" / "tokenizer.json", max_length=6)


@pytest.mark.slow
def test_a_tokenizer_larger_than_the_pretrained_text_towers_vocabulary_is_refused(
    hub, synth_shards, tmp_path
):
    from tests.helpers import run_launcher, tiny_run_overrides

    put_bert(hub.cache, "memetrain-test/tiny-bert", vocab_size=len(VOCAB))
    result = run_launcher(
        "train.py", *tiny_run_overrides(synth_shards, tmp_path / "run", steps=1), "model=transformer",
        "model.text.pretrained=memetrain-test/tiny-bert", env=hub.env,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"but the text tower model.text_encoder embeds {len(VOCAB)}: give data.tokenizer" in result.stderr
