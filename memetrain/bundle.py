"""A trained model to take away: ``<run>/model/``, self-contained, nothing in it pickled.

::

    model/
      bundle.json          what it is: the method and model config, the label names, the targets
                           it scores with their decision thresholds (chosen on dev), the image and
                           text preprocessing, and where it came from (run, checkpoint, sha256)
      weights.safetensors  every parameter and buffer of the method, the non-persistent ones too
                           (the image normalisation), as the evaluated checkpoint holds them
      probe.safetensors    the linear probe per target, for a run evaluated by a probe
      tokenizer.json or tokenizer/   the tokenizer the run's text went through

:func:`load_model` rebuilds the method from ``bundle.json`` without reading any weights file the
config names (those of pretraining runs or hubs need not exist where the bundle goes), then loads
``weights.safetensors`` strictly. Its :meth:`MemeModel.predict` decodes, resizes and tokenises
exactly as evaluation did, so it gives the run's own test probabilities for the same memes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from memetrain.errors import ConfigError
from memetrain.fileio import atomic_directory

BUNDLE_DIR = "model"
MANIFEST = "bundle.json"
WEIGHTS = "weights.safetensors"
PROBE = "probe.safetensors"
FORMAT = 1
HEADS = ("classifier", "linear_probe")


@dataclass(frozen=True)
class BundleContents:
    """What a run hands :func:`write_bundle`."""

    method: str
    method_options: dict[str, Any]  # configs/method without name and view
    model: dict[str, Any]  # the resolved model config
    label_names: list[str]
    main_label: str
    vocab_size: int | None
    pad_id: int
    image_size: int
    interpolation: str  # the resize filter of evaluation (data.interpolation, resolved)
    max_length: int
    clean_text: bool
    head: str | None  # classifier | linear_probe | None (features only)
    targets: list[str]
    thresholds: list[float]
    source: dict[str, Any]  # run directory, evaluated checkpoint, protocol results it was chosen from


def write_bundle(
    directory: Path,
    contents: BundleContents,
    tensors: dict[str, Tensor],
    tokenizer: Path | None,
    probe: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write a bundle of the method whose tensors (:func:`method_tensors`) are ``tensors`` into
    ``directory`` (replaced whole: written beside it, fsynced and renamed, so a reader never sees
    half a bundle; a full disk leaves the old one and no partial files: :func:`atomic_directory`)."""
    directory = Path(directory)
    tensors = {
        name: (t.float() if t.is_floating_point() else t).detach().cpu().clone()
        for name, t in tensors.items()
    }
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if probe is not None:
            probe_tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in probe.items()}
            save_file(probe_tensors, str(tmp / PROBE))
        tokenizer_name = None
        if tokenizer is not None:
            tokenizer_name = "tokenizer" if tokenizer.is_dir() else "tokenizer.json"
            copy = shutil.copytree if tokenizer.is_dir() else shutil.copyfile
            copy(tokenizer, tmp / tokenizer_name)
        manifest = {
            "format": FORMAT,
            **{k: v for k, v in contents.__dict__.items()},
            "tokenizer": tokenizer_name,
            "weights_sha256": _sha256(tmp / WEIGHTS),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def choose_head(protocols: dict[str, Any], main_label: str) -> tuple[str | None, list[str], list[float]]:
    """(head, targets, thresholds) of a run's evaluation (``results.json``'s ``protocols``): its
    classifier if it has one, else its linear probe, else none; each target's threshold is the one
    evaluation chose on dev (the main label's, and each other label's in the multi-label scores)."""
    head = next((name for name in HEADS if name in protocols), None)
    if head is None:
        return None, [], []
    result = protocols[head]
    per_label = next(
        (split["per_label"] for split in result.get("multilabel", {}).values() if "per_label" in split), {}
    )
    thresholds = [
        result.get("threshold", 0.5) if name == main_label else per_label.get(name, {}).get("threshold", 0.5)
        for name in result["targets"]
    ]
    return head, list(result["targets"]), thresholds


def probe_tensors(heads: Sequence[Any]) -> dict[str, np.ndarray]:
    """The linear probe's heads (one per target, :class:`memetrain.eval.probe.LinearHead`) stacked."""
    return {
        "mean": np.stack([h.mean for h in heads]),  # [T, D]
        "scale": np.stack([h.scale for h in heads]),  # [T, D]
        "weight": np.stack([h.weight for h in heads]),  # [T, D]
        "bias": np.array([h.bias for h in heads]),  # [T]
    }


def bundle_path(path: str | Path) -> Path:
    """The bundle at ``path``: a bundle directory, or a run directory holding one in ``model/``."""
    path = Path(path)
    for candidate in (path, path / BUNDLE_DIR):
        if (candidate / MANIFEST).is_file():
            return candidate
    raise ConfigError(
        f"{path} holds no model bundle (no {MANIFEST} there or in {path / BUNDLE_DIR}): give a finished run's "
        "directory or its model/ directory"
    )


class MemeModel(nn.Module):
    """A bundled model: :meth:`predict` scores memes, :meth:`embed` gives their features."""

    def __init__(
        self, method: nn.Module, manifest: dict[str, Any], root: Path, probe: dict[str, Tensor] | None
    ):
        super().__init__()
        from memetrain.data.decode import SampleDecoder
        from memetrain.data.tokenizer import TextEncoder
        from memetrain.data.transforms import Resize

        self.method = method.eval()
        self.manifest, self.root = manifest, root
        self.targets: list[str] = list(manifest["targets"])
        self.thresholds: list[float] = list(manifest["thresholds"])
        self.head: str | None = manifest["head"]
        interpolation = manifest.get("interpolation", "bilinear")  # bundles from before it: bilinear
        self.view = Resize(manifest["image_size"], interpolation)
        self.decoder = SampleDecoder(self.view.decode_size)
        tokenizer = manifest["tokenizer"]
        self.text_encoder = (
            TextEncoder(root / tokenizer, manifest["max_length"], clean=manifest["clean_text"])
            if tokenizer
            else None
        )
        self.probe = probe  # float64 arrays as tensors: [T, D] mean, scale, weight; [T] bias

    @property
    def device(self) -> torch.device:
        return next(self.method.parameters()).device

    def batch(
        self, images: Sequence[Any], texts: Sequence[str], ids: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """The batch evaluation would make of these memes. ``images``: encoded bytes or file paths
        (decoded as the stream decodes them), PIL images or uint8 ``[3, H, W]`` tensors."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        ids = [str(i) for i in range(len(images))] if ids is None else list(ids)
        return self.collate([self.pixels(key, image) for key, image in zip(ids, images)], texts, ids)

    def pixels(self, key: str, image: Any) -> Tensor:
        """One meme's image as evaluation's view of it: uint8 ``[3, size, size]``; a corrupt image
        raises :class:`memetrain.data.decode.BadSample` naming ``key``."""
        return self.view(self._pixels(key, image))

    def collate(self, pixels: Sequence[Tensor], texts: Sequence[str], ids: Sequence[str]) -> dict[str, Any]:
        """A batch of prepared images (:meth:`pixels`) and their texts, tokenised."""
        batch: dict[str, Any] = {"image": torch.stack(list(pixels)), "text": list(texts), "id": list(ids)}
        if self.text_encoder is not None:
            input_ids, mask = self.text_encoder(list(texts))
            batch["input_ids"], batch["attention_mask"] = torch.from_numpy(input_ids), torch.from_numpy(mask)
        return batch

    @torch.no_grad()
    def predict(self, images: Sequence[Any], texts: Sequence[str]) -> Tensor:
        """Probabilities ``[N, len(targets)]`` of each target label (float64 with a probe head)."""
        return self.predict_batch(self.batch(images, texts))

    @torch.no_grad()
    def predict_batch(self, batch: dict[str, Any]) -> Tensor:
        if self.head is None:
            raise ConfigError(
                f"this bundle ({self.root}) has no head to score with: its run evaluated neither a classifier "
                "nor a linear probe; use embed(), or train with eval.protocols=[linear_probe]"
            )
        batch = _on(batch, self.device)
        if self.head == "classifier":
            return torch.sigmoid(self.method.predict(batch).float()).cpu()
        features = self.method.embed(batch).float().cpu().double()  # [N, D], as the probe was fitted
        p = self.probe
        logits = ((features[:, None, :] - p["mean"]) / p["scale"] * p["weight"]).sum(-1) + p["bias"]  # [N, T]
        return torch.sigmoid(logits)

    @torch.no_grad()
    def embed(self, images: Sequence[Any], texts: Sequence[str]) -> Tensor:
        """Features ``[N, D]`` (what the probes and t-SNE of the run saw)."""
        return self.method.embed(_on(self.batch(images, texts), self.device)).float().cpu()

    def decide(self, probabilities: Tensor) -> Tensor:
        """0/1 decisions ``[N, T]`` at each target's threshold (chosen on the run's dev split)."""
        return (probabilities >= torch.tensor(self.thresholds, dtype=probabilities.dtype)).long()

    def _pixels(self, key: str, image: Any) -> Tensor:
        if isinstance(image, (str, Path)):
            image = Path(image).read_bytes()
        if isinstance(image, (bytes, bytearray, memoryview)):
            return self.decoder.image(key, image)
        if isinstance(image, Tensor):
            if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"image {key}: give uint8 [3, H, W], got {image.dtype} {tuple(image.shape)}")
            return image
        if hasattr(image, "convert"):  # PIL
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
        raise TypeError(f"image {key}: {type(image).__name__} is not bytes, a path, a PIL image or a tensor")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> MemeModel:
    """The model of a bundle (a run directory or its ``model/``), in eval mode on ``device``."""
    from memetrain.methods import DataInfo, build_method
    from memetrain.models.weights import structure_only

    root = bundle_path(path)
    manifest = json.loads((root / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ConfigError(
            f"{root / MANIFEST} is format {manifest.get('format')}; this memetrain reads {FORMAT}"
        )
    if _sha256(root / WEIGHTS) != manifest["weights_sha256"]:
        raise ConfigError(f"{root / WEIGHTS} is not the file the bundle was written with (sha256 differs)")
    info = DataInfo(
        manifest["label_names"], manifest["main_label"], manifest["vocab_size"], manifest["pad_id"]
    )
    with structure_only():  # the bundle's weights replace whatever the config would have loaded
        method = build_method(manifest["method"], dict(manifest["method_options"]), manifest["model"], info)
    _load_tensors(method, load_file(str(root / WEIGHTS)), root / WEIGHTS)
    probe = None
    if manifest["head"] == "linear_probe":
        probe = {k: v.double() for k, v in load_file(str(root / PROBE)).items()}
    return MemeModel(method, manifest, root, probe).to(device)


def method_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Parameters and every buffer by name, non-persistent buffers (normalisation) included."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _load_tensors(module: nn.Module, tensors: dict[str, Tensor], where: Path) -> None:
    own = method_tensors(module)
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [n for n in own.keys() & tensors.keys() if own[n].shape != tensors[n].shape]
    if missing or unexpected or shapes:
        from memetrain.models.weights import describe_mismatch

        raise ConfigError(
            f"{where} does not fit the model its bundle.json describes: "
            + describe_mismatch(missing, unexpected, shapes)
        )
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(tensors[name])


def _on(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
