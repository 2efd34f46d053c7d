"""Where a transformer text tower's weights come from: ``model.text.pretrained``, a Hugging Face model
id (``bert-base-uncased``, ``distilbert-base-uncased``) read through transformers' ``from_pretrained``
and its cache, or a local model directory in ``save_pretrained`` layout (an existing directory wins
over an id). safetensors files are preferred; ``.bin`` files are read with ``weights_only=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, AutoModel, PreTrainedModel

from memetrain.errors import ConfigError
from memetrain.models.hub import cached_hub_file, looks_like_path, missing_weights
from memetrain.models.weights import describe_mismatch, reading_weights

OPTION = "model.text.pretrained"
# what transformers reads from a model folder, in its order of preference (an index lists shards)
WEIGHTS_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass
class TextWeights:
    """A hub model id, or a local directory (``directory`` set)."""

    name: str
    directory: Path | None = None
    option: str = OPTION

    @property
    def local(self) -> bool:
        return self.directory is not None

    @property
    def tag(self) -> str | None:
        return None if self.local else self.name

    def describe(self) -> str:
        return f"local directory {self.directory}" if self.local else f"transformers {self.name}"

    def folder(self) -> Path | None:
        """The directory transformers reads: the local one, or the cached snapshot of the id's ``main``."""
        if self.local:
            return self.directory
        config = cached_hub_file(self.name, ["config.json"])
        return None if config is None else config.parent

    def cached(self) -> list[Path] | None:
        """``config.json`` and the weights files, if the disk (cache) holds them; no network."""
        folder = self.folder()
        if folder is None or not (folder / "config.json").is_file():
            return None
        weights = weights_files(folder)
        return [folder / "config.json", *weights] if weights else None

    def fetch(self) -> list[Path]:
        """Download the model (and its tokenizer, for ``data.tokenizer``) through transformers."""
        if not self.local:
            self.load()
            try:
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(self.name)
            except (OSError, ValueError):  # a model without a tokenizer of its own
                pass
        found = self.cached()
        if found is None:
            raise ConfigError(f"{self.option}: {self.describe()} holds no config.json and weights")
        return found

    def load(self) -> tuple[PreTrainedModel, list[Path]]:
        """The model (its pooler may be missing from the files) and the weights files it was read from;
        inside ``structure_only`` the architecture alone, from ``config.json``."""
        source = str(self.directory or self.name)
        try:
            if not reading_weights():
                return AutoModel.from_config(
                    AutoConfig.from_pretrained(source, local_files_only=self.local)
                ), []
            model, info = AutoModel.from_pretrained(
                source, local_files_only=self.local, weights_only=True, output_loading_info=True
            )
        except OSError as err:
            raise self._error(err) from None
        except RuntimeError as err:  # shapes that differ from config.json, among others
            raise ConfigError(
                f"{self.option}: {self.describe()} cannot be loaded (see the load report above): {err}"
            ) from None
        missing = sorted(name for name in info["missing_keys"] if not name.startswith("pooler."))
        if missing:
            raise ConfigError(
                f"{self.option}: {self.describe()} does not hold all of its model's weights: "
                f"{describe_mismatch(missing, [])}"
            )
        return model, weights_files(self.folder())

    def _error(self, err: OSError) -> ConfigError:
        if self.local:
            return ConfigError(
                f"{self.option}: {self.describe()} cannot be loaded: {' '.join(str(err).split())}"
            )
        if "is not a local folder and is not a valid model identifier" in str(err):
            return ConfigError(
                f"{self.option}={self.name!r} is neither a local model directory nor a model on the Hugging "
                "Face hub; check the path, or the id (e.g. bert-base-uncased)"
            )
        return missing_weights(self.describe(), self.option, str(err))


def resolve(value: str | Path, option: str = OPTION) -> TextWeights:
    """``model.text.pretrained`` to a :class:`TextWeights`: an existing directory, or a hub model id."""
    if not isinstance(value, (str, Path)) or not str(value):
        raise ConfigError(
            f"{option}={value!r}: give a Hugging Face model id (bert-base-uncased) or a local directory"
        )
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{option}: text model directory {path} has no config.json; point it at a local Hugging Face "
                "model directory (save_pretrained layout) or give a hub model id"
            )
        return TextWeights(str(value), path, option)
    if isinstance(value, Path) or looks_like_path(str(value)):
        raise ConfigError(
            f"{option}: text model directory {path} not found; check the path, or give a Hugging Face model id"
        )
    return TextWeights(str(value), None, option)


def weights_files(folder: Path | None) -> list[Path]:
    """The weights files transformers reads in ``folder`` (every shard of a sharded checkpoint)."""
    if folder is None:
        return []
    for name in WEIGHTS_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards] if all((folder / s).is_file() for s in shards) else []
    return []
