"""A Hugging Face hub cache written by the tests, in huggingface_hub's own layout, from weights the
tests make: what ``python launcher/fetch_weights.py`` leaves behind on a login node.

    <HF_HOME>/hub/models--<org>--<name>/blobs/<sha256>                  the file contents
    <HF_HOME>/hub/models--<org>--<name>/snapshots/<commit>/<filename>   relative symlinks to the blobs
    <HF_HOME>/hub/models--<org>--<name>/refs/main                       the commit of ``main``
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch


def put_repo(cache: Path, repo_id: str, files: dict[str, bytes | Path], revision: str | None = None) -> Path:
    """Write ``files`` (name in the repository -> content or a file to copy) as the cached ``main``
    of ``repo_id``; returns the snapshot folder."""
    revision = revision or hashlib.sha1(repo_id.encode()).hexdigest()
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = folder / "snapshots" / revision
    for name, content in files.items():
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    return snapshot


def put_timm(cache: Path, name: str, seed: int = 0) -> torch.nn.Module:
    """Random weights of the timm model ``arch.tag`` saved by timm's own ``save_for_hf`` (model.safetensors
    and config.json) under the tag's hub repository; returns the model (with its classifier)."""
    import timm
    from timm.models import _hub

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    with tempfile.TemporaryDirectory() as folder:
        _hub.save_for_hf(model, folder, safe_serialization=True)
        put_repo(cache, model.pretrained_cfg["hf_hub_id"], {p.name: p for p in Path(folder).iterdir()})
    return model


def put_bert(cache: Path, repo_id: str, vocab_size: int, seed: int = 0):
    """A tiny random BERT saved by transformers' ``save_pretrained`` as the cached ``repo_id``."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    model = BertModel(config)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        put_repo(cache, repo_id, {p.name: p for p in Path(folder).iterdir() if p.is_file()})
    return model


def put_open_clip(cache: Path, model: str, tag: str, state: dict[str, torch.Tensor]) -> Path:
    """``state`` as open_clip's hub file of ``(model, tag)`` (its safetensors name); returns the file."""
    from open_clip.pretrained import get_pretrained_cfg
    from safetensors.torch import save_file

    repo, filename = os.path.split(get_pretrained_cfg(model, tag)["hf_hub"])
    filename = filename or "open_clip_pytorch_model.bin"
    filename = (
        filename.removesuffix(".bin").replace("open_clip_pytorch_model", "open_clip_model") + ".safetensors"
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / filename
        save_file({k: v.contiguous() for k, v in state.items()}, path)
        snapshot = put_repo(cache, repo, {filename: path})
    return snapshot / filename
