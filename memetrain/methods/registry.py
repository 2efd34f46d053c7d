"""Methods registered by name, and what the data tells a method when it is built."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from memetrain.errors import ConfigError
from memetrain.options import call_with_options

METHODS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a :class:`Method` subclass buildable as ``method=<cls.name>``."""
    METHODS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class DataInfo:
    """Facts about the packed data a model needs: label names and the tokenizer's vocabulary."""

    label_names: list[str]
    main_label: str
    vocab_size: int | None
    pad_id: int = 0

    def complete(self, model: dict[str, Any]) -> dict[str, Any]:
        """``model`` with the text encoder's vocabulary size and padding id filled in from the
        tokenizer when the config leaves them null (an encoder built from a config, not a directory)."""
        model = copy.deepcopy(model)
        text = model.get("text")
        if text and text.get("pretrained") is None and text.get("vocab_size") is None:
            if self.vocab_size is None:
                raise ConfigError("model.text needs a vocab_size: the data has no tokenizer to take it from")
            text["vocab_size"], text["padding_idx"] = self.vocab_size, self.pad_id
        if text and "pretrained" in text and text["pretrained"] is None:
            text.pop("pretrained")
        return model


def build_method(name: str, options: dict[str, Any], model: dict[str, Any], data: DataInfo):
    """The method ``name`` built from its options (``configs/method/<name>.yaml``) and the model config.

    The option ``recipe`` (every method may have one: the paper's optimiser and schedule, trainer
    options that replace the run's ``trainer.*``; null: none) is the method's :attr:`Method.recipe`,
    which its stages carry (:class:`memetrain.methods.base.Stage`)."""
    from memetrain.methods.base import check_recipe

    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    options = dict(options)
    recipe = check_recipe(options.pop("recipe", None), "method.recipe")
    method = call_with_options(METHODS[name], dict(model=model, data=data, **options), f"method {name}")
    method.recipe = recipe
    return method
