"""The parameters and buffers of a TorchScript archive, read without running anything in it.

OpenAI published CLIP as TorchScript (``torch.jit.save``) ``.pt`` files. ``torch.jit.load`` compiles
the archive's code and runs its ``__setstate__`` methods, and ``torch.load(weights_only=True)``
refuses such archives, so open_clip falls back to an unrestricted ``torch.load``. Neither is safe
for a file from elsewhere. The archive is a zip: ``<root>/data.pkl`` pickles the module tree (each
module an object of a ``__torch__.*`` class whose state dict holds its tensors and submodules) and
``<root>/data/<key>`` holds each storage's raw bytes. Here ``data.pkl`` is read by an unpickler that
builds only tensors, plain containers and inert stand-ins for the module objects; any other global
it names is refused, so no code in the file ever runs.
"""

from __future__ import annotations

import io
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

# the storage classes torch pickles tensors with, by name
STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
# TorchScript's typed containers are pickled through these; they return their argument
LIST_BUILDERS = {
    "build_intlist",
    "build_doublelist",
    "build_boollist",
    "build_tensorlist",
    "build_genericlist",
}


class TorchScriptError(ValueError):
    """The file is not a TorchScript archive, or holds something other than tensors and modules."""


def is_torchscript(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with the ``constants.pkl`` record)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(
                name.endswith("/constants.pkl") and name.count("/") == 1 for name in archive.namelist()
            )
    except (zipfile.BadZipFile, OSError):
        return False


def read_torchscript_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor attribute of the archive's module tree, by dotted name (what ``state_dict()``
    of the loaded module gives for a traced model), on the CPU."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            root = names[0].split("/")[0] if names else ""
            if f"{root}/constants.pkl" not in names or f"{root}/data.pkl" not in names:
                raise TorchScriptError(f"{path} is not a TorchScript archive")
            order = archive.read(f"{root}/byteorder").decode() if f"{root}/byteorder" in names else "little"
            if order != sys.byteorder:
                raise TorchScriptError(
                    f"{path} was written {order}-endian; this machine is {sys.byteorder}-endian"
                )
            unpickler = _ArchiveUnpickler(io.BytesIO(archive.read(f"{root}/data.pkl")), archive, root)
            tree = unpickler.load()
    except TorchScriptError:
        raise
    except (
        zipfile.BadZipFile,
        KeyError,
        EOFError,
        pickle.UnpicklingError,
        TypeError,
        ValueError,
        RuntimeError,
    ) as err:
        raise TorchScriptError(f"{path} cannot be read as a TorchScript archive: {err}") from None
    state: dict[str, torch.Tensor] = {}
    _collect(tree, "", state, set())
    if not state:
        raise TorchScriptError(f"{path} holds no tensors")
    return state


class _ScriptObject:
    """An inert stand-in for one object of a ``__torch__.*`` class: it only keeps its pickled state."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _ArchiveUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self.archive, self.root = archive, root
        self.storages: dict[str, torch.UntypedStorage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return type(name, (_ScriptObject,), {})
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if module == "torch.jit._pickle" and name in LIST_BUILDERS:
            return _same
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return lambda value, tag: value
        raise pickle.UnpicklingError(
            f"refused to load the global {module}.{name}: only tensors and modules are read"
        )

    def persistent_load(self, pid: Any) -> tuple[torch.UntypedStorage, torch.dtype]:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent record {pid!r}")
        _, dtype, key, _location, _numel = pid
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"storage {key} has no known element type")
        if key not in self.storages:
            data = bytearray(self.archive.read(f"{self.root}/data/{key}"))
            self.storages[key] = (
                torch.frombuffer(data, dtype=torch.uint8).untyped_storage()
                if data
                else (torch.UntypedStorage(0))
            )
        return self.storages[key], dtype


def _rebuild_tensor(
    storage: tuple[torch.UntypedStorage, torch.dtype], offset, size, stride, *_ignored
) -> torch.Tensor:
    untyped, dtype = storage
    return torch.empty(0, dtype=dtype).set_(untyped, offset, tuple(size), tuple(stride))


def _same(value: Any) -> Any:
    return value


def _collect(node: Any, prefix: str, state: dict[str, torch.Tensor], seen: set[int]) -> None:
    if id(node) in seen or not isinstance(node, _ScriptObject) or not isinstance(node.state, dict):
        return
    seen.add(id(node))
    for name, value in node.state.items():
        if isinstance(value, torch.Tensor):
            state[f"{prefix}{name}"] = value
        elif isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{name}.", state, seen)
