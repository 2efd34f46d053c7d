"""Nothing a shard, a checkpoint, a weights file or a config value carries is ever run.

- Checkpoints and weights load with ``weights_only=True`` or safetensors: a file that would create a
  marker when unpickled is refused with one clear error, and the marker never appears (DeepSpeed's
  checkpoint files too: test_deepspeed_checkpoints.py).
- Shard decoding never unpickles and never writes members to disk (test_bad_data.py: a ``.pickle``
  payload, ``../`` and absolute member names), and reads shards only from a local directory: no
  ``pipe:``, no URLs, and no option enables them (test_bad_data.py; the README says so).
- No ``eval``/``exec`` anywhere in the package, and a config value that looks like code is a bad value.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from memetrain.engine.checkpoint import Checkpointer, CheckpointError
from memetrain.errors import ConfigError
from memetrain.models.image import create_backbone
from memetrain.models.weights import read_state_dict
from tests.faults.conftest import assert_one_clear_error, fault_run_overrides, pickle_payload
from tests.helpers import REPO, run_launcher

# -- the code never evaluates, unpickles, extracts or shells out --------------------------------

FORBIDDEN = {
    "eval": "evaluates a string as code",
    "exec": "runs a string as code",
    "compile": "compiles a string into code",
    "__import__": "imports a module named by a string",
    "pickle.load": "unpickles (runs whatever the pickle says)",
    "pickle.loads": "unpickles",
    "pickle.Unpickler": "unpickles",
    "marshal.load": "builds code objects",
    "marshal.loads": "builds code objects",
    "yaml.load": "can build arbitrary objects (use OmegaConf or yaml.safe_load)",
    "yaml.unsafe_load": "builds arbitrary objects",
    "os.system": "runs a shell command",
    "os.popen": "runs a shell command",
    "subprocess.getoutput": "runs a shell command",
    "subprocess.getstatusoutput": "runs a shell command",
    "*.extractall": "writes tar members to disk, where a member name can climb out",
}
TORCH_LOADS = ("torch.load", "torch.serialization.load")


def dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a chain of names and attributes; None for anything else (a call, a subscript)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        owner = dotted(node.value)
        return None if owner is None else f"{owner}.{node.attr}"
    return None


def bound_names(tree: ast.Module) -> dict[str, str]:
    """What the names an import (or a plain alias) binds stand for, as module.attribute:
    ``import pickle as pk`` binds ``pk`` to ``pickle``, ``import os.path`` binds ``os``, ``from
    pickle import loads as unpickle`` binds ``unpickle`` to ``pickle.loads``, and ``unpickle =
    pickle.loads`` does too. Wherever in the file they are bound (function-local imports too)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):  # after the imports: an alias of an imported name resolves through them
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = dotted(node.value)
            if value is not None and "." in value:
                names[node.targets[0].id] = resolve(value, names)
    return names


def resolve(name: str, names: dict[str, str]) -> str:
    """``name`` with its first part replaced by what it was bound to (``pk.loads`` -> ``pickle.loads``)."""
    head, dot, rest = name.partition(".")
    return names.get(head, head) + dot + rest


def called_name(call: ast.Call, names: dict[str, str]) -> str:
    """The called function as module.attribute through the file's imports (``eval``,
    ``pickle.loads``); ``*.extractall`` for a forbidden method of any other object."""
    func = call.func
    name = dotted(func)
    resolved = resolve(name, names) if name is not None else ""
    if resolved in FORBIDDEN or resolved in TORCH_LOADS:
        return resolved
    if isinstance(func, ast.Attribute) and f"*.{func.attr}" in FORBIDDEN:
        return f"*.{func.attr}"
    return resolved


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def safe_yaml(call: ast.Call, name: str) -> bool:
    """``yaml.load`` with a safe loader (``Loader=yaml.CSafeLoader``, ``_SAFE_LOADER``) builds plain data."""
    loader = keyword(call, "Loader")
    return name == "yaml.load" and loader is not None and "safe" in ast.unparse(loader).lower()


def is_constant(node: ast.expr, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def source_problems(path: Path) -> list[str]:
    """What in one source file could run code that came from data: line and reason each."""
    problems = []
    tree = ast.parse(path.read_text(), str(path))
    names = bound_names(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        where, name = f"{path.name}:{node.lineno}", called_name(node, names)
        if name in FORBIDDEN and not safe_yaml(node, name):
            problems.append(f"{where}: {name}() {FORBIDDEN[name]}")
        weights_only = keyword(node, "weights_only")
        if name in TORCH_LOADS and weights_only is None:
            problems.append(f"{where}: {name} without weights_only=True")
        if weights_only is not None and not is_constant(weights_only, True):
            problems.append(f"{where}: weights_only={ast.unparse(weights_only)}")
        for flag in ("trust_remote_code", "shell"):
            value = keyword(node, flag)
            if value is not None and not is_constant(value, False):
                problems.append(f"{where}: {flag}={ast.unparse(value)}")
    return problems


def test_the_code_never_evaluates_unpickles_extracts_or_shells_out():
    files = sorted([*(REPO / "memetrain").rglob("*.py"), *(REPO / "launcher").glob("*.py")])
    assert len(files) > 40
    problems = [problem for path in files for problem in source_problems(path)]
    assert not problems, "\n".join(problems)


def test_the_check_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    planted = [  # (the line, what the check must report for it, or None where it must find nothing)
        ("import pickle, re, torch, tarfile, yaml", None),
        ("import subprocess as sp, marshal", None),
        ("from pickle import loads", None),
        ("from pickle import loads as unpickle", None),
        ("from torch import load", None),
        ("from os import popen", None),
        ("from re import compile as regex", None),
        ("import os", None),
        ("eval('1')", "eval() evaluates"),
        ("pickle.loads(b'')", "pickle.loads() unpickles"),
        ("torch.load('x')", "torch.load without weights_only=True"),
        ("torch.load('x', weights_only=False)", "weights_only=False"),
        ("tarfile.open('x').extractall('.')", "*.extractall() writes tar members"),
        ("f(trust_remote_code=True)", "trust_remote_code=True"),
        ("re.compile('fine')", None),
        ("yaml.load(s, Loader=yaml.SafeLoader)", None),
        ("yaml.load(s, Loader=yaml.Loader)", "yaml.load() can build"),
        ("loads(b'')", "pickle.loads() unpickles"),
        ("unpickle(b'')", "pickle.loads() unpickles"),
        ("load('x')", "torch.load without weights_only=True"),
        ("load('x', weights_only=True)", None),
        ("os.popen('ls')", "os.popen() runs a shell command"),
        ("popen('ls')", "os.popen() runs a shell command"),
        ("sp.getoutput('ls')", "subprocess.getoutput() runs a shell command"),
        ("sp.getstatusoutput('ls')", "subprocess.getstatusoutput() runs a shell command"),
        ("regex('fine')", None),
        ("read = marshal.loads", None),
        ("read(b'')", "marshal.loads() builds code objects"),
        ("def f():\n    from os import system as run\n    run('ls')", "os.system() runs a shell command"),
    ]
    bad.write_text("\n".join(line for line, _ in planted) + "\n")
    expected, line = [], 1
    for text, problem in planted:
        line += text.count("\n")  # the call is on the last line of a block
        if problem is not None:
            expected.append((line, problem))
        line += 1
    found = sorted(source_problems(bad), key=lambda problem: int(problem.split(":")[1]))
    assert len(found) == len(expected), "\n".join(found)
    for problem, (line, fragment) in zip(found, expected):
        assert problem.startswith(f"bad.py:{line}: ") and fragment in problem, (problem, line, fragment)


# -- checkpoints: whatever a file holds, only tensors are read ---------------------------------


@pytest.fixture
def checkpoint(tmp_path):
    """A real checkpoint (Accelerate's files plus ours) of a small model, and its Checkpointer."""
    accelerator = Accelerator(cpu=True)
    model = nn.Linear(3, 2)
    accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    checkpointer = Checkpointer(tmp_path / "checkpoints", keep=2, accelerator=accelerator)
    return checkpointer, checkpointer.save(1, {"step": 1}, "seed: 0\n")  # conftest resets Accelerate after


CHECKPOINT_FILES = [
    pytest.param("model.safetensors", "SafetensorError", id="model weights"),
    pytest.param("optimizer.bin", "UnpicklingError", id="optimizer state"),
    pytest.param("random_states_0.pkl", "UnpicklingError", id="RNG states (Accelerate skips them silently)"),
]


@pytest.mark.parametrize(("name", "error"), CHECKPOINT_FILES)
def test_a_checkpoint_file_holding_code_is_refused_and_never_run(checkpoint, tmp_path, name, error):
    checkpointer, path = checkpoint
    marker = tmp_path / "pickle-ran"
    (path / name).write_bytes(pickle_payload(marker))
    with pytest.raises(
        CheckpointError, match=f"checkpoint {path} cannot be loaded \\({error}: .*Move it out"
    ):
        checkpointer.load(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        pytest.param("model.safetensors", lambda data: data[: len(data) // 2], id="truncated weights"),
        pytest.param("trainer_state_0.json", lambda data: data[:-5], id="truncated trainer state"),
        pytest.param("optimizer.bin", lambda data: b"", id="empty optimizer state"),
    ],
)
def test_a_damaged_checkpoint_is_one_clear_error(checkpoint, name, damage):
    checkpointer, path = checkpoint
    (path / name).write_bytes(damage((path / name).read_bytes()))
    with pytest.raises(CheckpointError, match="cannot be loaded .*it is damaged"):
        checkpointer.load(path)


@pytest.mark.slow
def test_resuming_from_a_checkpoint_holding_code_is_one_clear_error(synth_shards, reference_run, tmp_path):
    run_dir = shutil.copytree(reference_run, tmp_path / "run")
    marker = tmp_path / "pickle-ran"
    (run_dir / "checkpoints" / "step_0000012" / "random_states_0.pkl").write_bytes(pickle_payload(marker))
    result = run_launcher("train.py", *fault_run_overrides(synth_shards, run_dir), timeout=240)
    assert_one_clear_error(result, f"error: checkpoint {run_dir}/checkpoints/step_0000012 cannot be loaded")
    assert not marker.exists()


# -- weights files and config values ------------------------------------------------------------


@pytest.mark.parametrize(
    "load",
    [
        pytest.param(read_state_dict, id="method.init weights"),
        pytest.param(
            lambda path: create_backbone("test_resnet", 32, str(path)), id="timm pretrained weights"
        ),
    ],
)
def test_a_weights_file_holding_code_is_refused_and_never_run(tmp_path, load):
    marker = tmp_path / "pickle-ran"
    (tmp_path / "weights.pth").write_bytes(pickle_payload(marker))
    with pytest.raises(ConfigError, match="weights.pth cannot be read safely"):
        load(tmp_path / "weights.pth")
    assert not marker.exists()


@pytest.mark.slow
def test_code_in_a_config_value_is_a_bad_value_not_run(synth_shards, tmp_path):
    marker = tmp_path / "code-ran"
    override = f'seed=\'__import__("os").system("touch {marker}")\''
    result = run_launcher(
        "train.py", *fault_run_overrides(synth_shards, tmp_path / "run"), override, timeout=240
    )
    assert_one_clear_error(result, 'error: seed=\'__import__("os").system(')
    assert not marker.exists()


def test_the_readme_says_shards_come_only_from_local_directories():
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "no `pipe:` or remote URLs, and no option enables them" in readme
