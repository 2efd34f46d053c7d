"""The commands the documentation shows: README.md's and slurm/README.md's bash blocks, the
launchers' docstrings and the config headers, each parsed into the launcher it starts and the
Hydra overrides it gives (``tests/test_docs_commands.py`` composes and runs them)."""

from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import REPO

LAUNCHER = re.compile(r"(?:^|\s)(?:\S*/)?launcher/(\w+)\.py(?=\s|$)")
APPS = {  # launcher -> (config directory under configs/, config name)
    "train": ("", "train"),
    "sweep": ("", "sweep"),
    "pack": ("", "pack"),
    "collect": ("", "collect"),
    "inspect_shards": ("", "inspect_shards"),
    "fetch_weights": ("", "fetch_weights"),
    "predict": ("inference", "predict"),
    "export": ("inference", "export"),
}


@dataclass(frozen=True)
class Command:
    text: str  # as the documentation writes it (continuation lines joined, comment dropped)
    where: str  # the file it is shown in
    prefix: str  # what starts the launcher: python, torchrun ..., accelerate launch ..., srun ..., sbatch
    launcher: str  # train, sweep, ... ("" for a command that starts none)
    args: tuple[str, ...]  # the launcher's arguments

    @property
    def overrides(self) -> list[str]:
        """The Hydra overrides (``collect.py <dir>`` reads as ``sweep_dir=<dir>``; flags dropped)."""
        args = [a for a in self.args if not a.startswith("-")]
        if self.launcher == "collect" and args and "=" not in args[0]:
            args[0] = f"sweep_dir={args[0]}"
        return args


def documented_commands() -> list[Command]:
    commands = []
    for path in (REPO / "README.md", REPO / "slurm" / "README.md"):
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", path.read_text(), re.S):
            commands += _commands(block.splitlines(), path)
    for path in sorted((REPO / "launcher").glob("*.py")):
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        commands += _commands([line for line in docstring.splitlines() if line.startswith("    ")], path)
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        header = [line[1:] for line in path.read_text().splitlines() if line.startswith("#  ")]
        commands += _commands(header, path)
    return commands


def _commands(lines: list[str], path: Path) -> list[Command]:
    found, joined = [], ""
    for line in lines:
        line = line.split(" # ")[0].rstrip() if " # " in line else line.rstrip()
        if line.strip().startswith("#"):
            continue
        joined += " " + line.strip().rstrip("\\").strip() if joined else line.strip().rstrip("\\").strip()
        if line.endswith("\\"):
            continue
        if joined and _starts_a_program(joined):
            found.append(_parse(joined, path))
        joined = ""
    return found


def _starts_a_program(text: str) -> bool:
    first = text.split()[0]
    return bool(LAUNCHER.search(text)) or first in ("make", "sbatch", "srun") or first.startswith("slurm/")


def _parse(text: str, path: Path) -> Command:
    where = str(path.relative_to(REPO))
    match = LAUNCHER.search(text)
    if match is None:
        return Command(text, where, text, "", ())
    prefix = text[: match.start()].strip()
    # a placeholder (<clip run>, $NODE_RANK) stands in for a path; a lone ... for "and so on"
    rest = re.sub(r"<[^<>]*>|\$\w+", "placeholder", text[match.end() :])
    args = tuple(arg for arg in shlex.split(rest, posix=True) if arg != "...")
    return Command(text, where, prefix, match.group(1), args)
