"""Text towers by name: a Hugging Face model id read offline from a cache holding a tiny BERT that
transformers' save_pretrained wrote, or a local directory; the config form the README gives."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from memetrain.errors import ConfigError
from memetrain.methods import DataInfo, build_method
from memetrain.models import TransformerTextEncoder, build_text_encoder
from memetrain.models.hub import pretrained_weights
from memetrain.models.weights import structure_only
from tests.helpers import REPO
from tests.hub.hub_cache import put_bert


def same_bert(encoder: TransformerTextEncoder, source) -> None:
    theirs = source.state_dict()
    ours = encoder.model.state_dict()
    assert set(ours) == {name for name in theirs if not name.startswith("pooler.")}
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_a_model_id_loads_from_the_cache_through_transformers(hub):
    source = put_bert(hub.cache, "bert-base-uncased", vocab_size=60, seed=5)
    encoder = TransformerTextEncoder.from_pretrained("bert-base-uncased", pooling="mean")
    same_bert(encoder, source)
    (record,) = pretrained_weights(encoder)
    assert (record["source"], record["name"], record["tag"]) == (
        "transformers",
        "bert-base-uncased",
        "bert-base-uncased",
    )
    assert record["file"].endswith("model.safetensors") and "models--bert-base-uncased" in record["file"]
    ids = torch.randint(1, 60, (2, 7))
    assert encoder(ids, torch.ones_like(ids)).shape == (2, 32)


def test_an_org_model_id_and_a_local_directory(hub, tmp_path):
    source = put_bert(hub.cache, "distilbert/tiny-test", vocab_size=40, seed=6)
    same_bert(TransformerTextEncoder.from_pretrained("distilbert/tiny-test"), source)
    source.save_pretrained(tmp_path / "bert")
    local = TransformerTextEncoder.from_pretrained(str(tmp_path / "bert"))
    same_bert(local, source)
    assert pretrained_weights(local)[0]["source"] == "file"


def test_the_readme_form_composes_and_builds_with_the_transformer_configs_options(hub):
    source = put_bert(hub.cache, "bert-base-uncased", vocab_size=60, seed=5)
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", ["model=transformer", "model.text.pretrained=bert-base-uncased"])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert model["text"]["pretrained"] == "bert-base-uncased" and model["text"]["hidden_size"] == 128
    method = build_method("supervised", {}, model, DataInfo(["hateful"], "hateful", vocab_size=60))
    same_bert(method.model.text_encoder, source)  # the checkpoint's 32 wide, not the config's 128
    assert method.model.head.output.in_features == 32


def test_a_model_missing_from_the_cache_is_one_line_naming_it_and_the_fix(hub):
    with pytest.raises(ConfigError) as caught:
        build_text_encoder("transformer", pretrained="bert-base-uncased", pooling="cls")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("pretrained weights transformers bert-base-uncased (model.text.pretrained)")
    assert str(hub.cache) in message and "python launcher/fetch_weights.py" in message


@pytest.mark.parametrize("value", ["./no/such/dir", "/no/such/bert", "weights/bert/base"])
def test_a_path_that_is_not_there_says_so(hub, value):
    with pytest.raises(ConfigError, match="text model directory .* not found"):
        TransformerTextEncoder.from_pretrained(value)


def test_a_model_built_for_its_structure_reads_only_the_config(hub):
    source = put_bert(hub.cache, "bert-base-uncased", vocab_size=60, seed=5)
    weights = next(hub.cache.glob("models--bert-base-uncased/snapshots/*/model.safetensors"))
    weights.unlink()
    with structure_only():
        encoder = TransformerTextEncoder.from_pretrained("bert-base-uncased")
    assert encoder.model.config.hidden_size == 32 and pretrained_weights(encoder) == []
    assert not torch.equal(
        encoder.model.embeddings.word_embeddings.weight, source.embeddings.word_embeddings.weight
    )
