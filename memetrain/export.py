"""Export a model bundle to ONNX or TorchScript, checked against the bundle on real memes.

The exported graph takes what the stream delivers: ``image`` uint8 ``[B, 3, S, S]`` (normalised
inside), ``input_ids`` and ``attention_mask`` int64 ``[B, L]`` (the bundle's tokenizer, shipped
beside the file) and returns the probabilities ``[B, targets]``. Tokenising, and the thresholds in
``bundle.json``, stay outside. Models that tokenise raw text themselves (open_clip towers) cannot be
exported this way and are refused. After export the file is loaded back (ONNX: in onnxruntime) and
run on a batch of real memes; its probabilities must equal the bundle's within ``tolerance``.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from memetrain.bundle import MANIFEST, MemeModel
from memetrain.errors import ConfigError, MemetrainError
from memetrain.fileio import atomic_write_text

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
INPUTS = ("image", "input_ids", "attention_mask")


class ExportError(MemetrainError):
    """The exported model does not reproduce the bundle."""


@dataclass(frozen=True)
class ExportCheck:
    path: Path
    memes: int
    max_abs_difference: float


class _Scorer(nn.Module):
    """The bundle's scoring as a module of tensors only: what the exporters trace."""

    def __init__(self, model: MemeModel):
        super().__init__()
        self.method, self.head = model.method, model.head
        if model.head == "linear_probe":
            for name, value in model.probe.items():  # float32 in the graph
                self.register_buffer(name, value.float())

    def forward(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        batch = {"image": image, "input_ids": input_ids, "attention_mask": attention_mask}
        if self.head == "classifier":
            return torch.sigmoid(self.method.predict(batch).float())
        features = self.method.embed(batch).float()  # [B, D]
        scaled = (features[:, None, :] - self.mean) / self.scale  # [B, T, D]
        return torch.sigmoid((scaled * self.weight).sum(-1) + self.bias)  # [B, T]


def export(
    model: MemeModel, format: str, output: Path, batch: dict[str, Any], tolerance: float = 1e-5
) -> ExportCheck:
    """Write ``model`` as ``format`` to ``output`` (with the tokenizer and ``bundle.json`` beside
    it) and check it against the bundle on ``batch`` (a batch of real memes)."""
    if format not in FORMATS:
        raise ConfigError(f"format={format!r}: choose {' or '.join(FORMATS)}")
    if model.head is None:
        raise ConfigError(
            f"{model.root} has no head to export (its run evaluated no classifier and no probe)"
        )
    if len(batch["image"]) < 2:
        raise ConfigError(
            "the export is checked on at least 2 memes: raise check_memes or choose a larger split"
        )
    if model.text_encoder is None:
        raise ConfigError(
            f"{model.root}: export needs a model fed token ids, and this bundle has no tokenizer"
        )
    scorer = _Scorer(model).eval().cpu()
    inputs = tuple(batch[name].cpu() for name in INPUTS)
    try:
        with torch.no_grad():
            expected = model.predict_batch(batch).float().numpy()
            scorer(*inputs)
    except KeyError as missing:
        raise ConfigError(
            f"{model.root}: its model reads batch[{missing}] besides image and token ids (open_clip towers "
            "tokenise raw text themselves); export supports models fed token ids only"
        ) from None
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    # traced on two memes, checked on them all: a batch size or text length baked into the graph shows
    example = tuple(value[:2] for value in inputs)
    if format == "onnx":
        _to_onnx(scorer, example, tmp)
        got = _run_onnx(tmp, inputs)
    else:
        with torch.no_grad():
            traced = torch.jit.trace(scorer, example, check_trace=False)
        traced.save(str(tmp))
        with torch.no_grad():
            got = torch.jit.load(str(tmp)).eval()(*inputs).numpy()
    difference = float(np.abs(got - expected).max())
    if not difference <= tolerance:
        tmp.unlink(missing_ok=True)
        raise ExportError(
            f"the {format} export of {model.root} gives probabilities up to {difference:.2e} away from the bundle's "
            f"on {len(expected)} memes (tolerance {tolerance:g}); nothing was written"
        )
    tmp.replace(output)
    _write_beside(model, output, format)
    return ExportCheck(output, len(expected), difference)


def _to_onnx(scorer: nn.Module, inputs: tuple[Tensor, ...], path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():  # the exporter's notes on its own internals, not the user's model
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            scorer,
            inputs,
            dynamic_shapes={"image": {0: batch}, "input_ids": {0: batch}, "attention_mask": {0: batch}},
            input_names=list(INPUTS),
            output_names=["probabilities"],
            dynamo=True,
            verbose=False,
        )
    program.save(str(path))


def _run_onnx(path: Path, inputs: tuple[Tensor, ...]) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {name: value.numpy() for name, value in zip(INPUTS, inputs)})[0]


def _write_beside(model: MemeModel, output: Path, format: str) -> None:
    """The tokenizer and what the outputs mean (targets, thresholds, preprocessing) next to the file."""
    tokenizer = model.manifest["tokenizer"]
    target = output.parent / f"{output.stem}.{tokenizer}"
    source = model.root / tokenizer
    if source.is_dir():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
    else:
        shutil.copyfile(source, target)
    info = {
        k: model.manifest[k]
        for k in ("targets", "thresholds", "label_names", "image_size", "max_length", "clean_text")
    }
    info["interpolation"] = model.view.interpolation
    info |= {"format": format, "inputs": list(INPUTS), "output": "probabilities", "tokenizer": target.name}
    info["from_bundle"] = {"path": str(model.root), "weights_sha256": model.manifest["weights_sha256"]}
    atomic_write_text(output.parent / f"{output.stem}.{MANIFEST}", json.dumps(info, indent=2) + "\n")
