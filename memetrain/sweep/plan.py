"""What each run of a sweep starts from and trains with, as a dry run prints it under the run's
overrides (``python launcher/sweep.py +sweep=table1 dry_run=true``).

Every run's overrides are composed with Hydra's compose API, as ``launcher/train.py`` composes them
(the placeholders ``<pretrain>`` and ``<after>`` kept as they are), and :func:`recipe_values` reads
the composed config: the weights each model part starts from, and the recipe: the trainer options
in effect (``trainer.*`` with the method's ``recipe`` over them; for SemiMemes also its
auto-encoder stage's), the batch, image size and label fraction, and the method's own options.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra import compose
from omegaconf import OmegaConf

from memetrain.engine.optim import optimizer_kind
from memetrain.run_record import flatten
from memetrain.sweep.grid import AFTER, PRETRAIN, fill_weights

TRAINER_KEYS = (
    "optimizer", "lr", "min_lr", "warmup_steps", "lr_schedule", "weight_decay", "weight_decay_end",
    "betas", "eps", "momentum", "grad_clip", "max_steps", "global_batch_size", "precision", "val_every",
)  # fmt: skip
DATA_KEYS = (
    "batch_size",
    "image_size",
    "interpolation",
    "label_fraction",
    "targets",
    "dev_split",
    "dev_from_train",
    "max_length",
)
MODEL_PARTS = ("image", "cnn", "vit", "text")


def compose_run(overrides: list[str]) -> dict[str, Any]:
    """The resolved config ``launcher/train.py`` would run for ``overrides`` (placeholders kept)."""
    filled = fill_weights(overrides, {PRETRAIN: PRETRAIN, AFTER: AFTER})
    return OmegaConf.to_container(compose("train", list(filled)), resolve=True)


def recipe_values(config: Mapping[str, Any]) -> dict[str, Any]:
    """Flat ``{key: value}`` of a composed run config: ``weights.<part>`` (what each model part starts
    from), ``trainer.<key>`` (in effect, the method's recipe applied), ``autoencoder.<key>`` (SemiMemes'
    first stage), ``data.<key>`` and ``method.<key>`` (every option of the method, nested keys dotted)."""
    values: dict[str, Any] = {}
    model, method, trainer = config["model"], dict(config["method"]), config["trainer"]
    init = method.get("init") or {}
    for part in MODEL_PARTS:
        if model.get(part):
            values[f"weights.{part}"] = _part_weights(model[part], init.get(part))
    clip = method.get("clip")
    if clip:
        if clip.get("tower") == "open_clip":
            values["weights.clip"] = (
                f"open_clip {clip.get('open_clip_model')} <- {clip.get('open_clip_weights')}"
            )
        else:
            values["weights.clip"] = f"our CLIP run <- {clip.get('weights')}"
    if method.get("tower") == "open_clip":
        values["weights.clip"] = (
            f"open_clip {method.get('open_clip_model')} <- {method.get('open_clip_weights')}"
        )
    effective = {"optimizer": optimizer_kind(trainer), **trainer, **(method.get("recipe") or {})}
    for key in TRAINER_KEYS:
        if key in effective:
            values[f"trainer.{key}"] = effective[key]
    if method.get("autoencoder_recipe") is not None:
        stage = {**trainer, **method["autoencoder_recipe"], "max_steps": method.get("autoencoder_steps")}
        for key in TRAINER_KEYS:
            if key in stage:
                values[f"autoencoder.{key}"] = stage[key]
    for key in DATA_KEYS:
        if key in config["data"]:
            values[f"data.{key}"] = config["data"][key]
    for key, value in flatten(method).items():
        if not key.startswith(("init.", "recipe.", "autoencoder_recipe.")):
            values[f"method.{key}"] = value
    return values


_DESCRIBED: dict[tuple[str, ...], list[str]] = {}


def describe_run(overrides: list[str]) -> list[str]:
    """Lines for a dry run: the weights every model part starts from, the recipe in effect, the data
    and the method's options (composed once per run of a row: the seed changes none of them)."""
    key = tuple(o for o in overrides if not o.startswith("seed="))
    if key not in _DESCRIBED:
        _DESCRIBED[key] = _describe(recipe_values(compose_run(list(key))))
    return _DESCRIBED[key]


def _describe(values: dict[str, Any]) -> list[str]:
    weights = [f"{k.removeprefix('weights.')} <- {v}" for k, v in values.items() if k.startswith("weights.")]
    trainer = [
        f"{k.removeprefix('trainer.')}={_text(v)}" for k, v in values.items() if k.startswith("trainer.")
    ]
    lines = [f"weights: {'; '.join(weights) or 'none'}", f"recipe: {' '.join(trainer)}"]
    stage = [
        f"{k.removeprefix('autoencoder.')}={_text(v)}"
        for k, v in values.items()
        if k.startswith("autoencoder.")
    ]
    if stage:
        lines.append(f"recipe of the auto-encoder stage: {' '.join(stage)}")
    data = [f"{k.removeprefix('data.')}={_text(v)}" for k, v in values.items() if k.startswith("data.")]
    method = [f"{k.removeprefix('method.')}={_text(v)}" for k, v in values.items() if k.startswith("method.")]
    lines.append(f"data: {' '.join(data)}")
    lines.append(f"method: {' '.join(method)}")
    return lines


def _part_weights(part: Mapping[str, Any], init: Mapping[str, Any] | None) -> str:
    name = part.get("name") or part.get("kind", "?")
    if init:  # method.init: our own earlier run's weights over the part
        return f"{name}: {init['path']} [{init.get('prefix', '')}]"
    pretrained = part.get("pretrained")
    if part.get("kind") == "transformer" and pretrained is None:
        return f"{name}: random init (built from its config)"
    if pretrained in (None, False):
        return f"{name}: random init"
    return f"{name}: {'timm default tag' if pretrained is True else pretrained}"


def _text(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_text(v) for v in value) + "]"
    return "null" if value is None else str(value)
