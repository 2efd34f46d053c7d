"""What every benchmark prints and records: the machine, the code, median and spread, BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "BENCHMARKS.md"


def machine_info(**versions: str) -> str:
    """CPU, cores, Python, torch and ``versions`` (name: version), and the load average now:
    the machines are shared, so a figure taken under load says so beside it."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    packages = "".join(
        f", {name} {version}" for name, version in {"torch": torch.__version__, **versions}.items()
    )
    return (
        f"{cpu}, {os.cpu_count()} cores ({usable} usable); Python {platform.python_version()}{packages}; "
        f"load average {os.getloadavg()[0]:.2f} at the start"
    )


def code_version() -> str:
    """The commit benchmarked, and whether memetrain/ had uncommitted changes."""

    def git(*command: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *command], capture_output=True, text=True).stdout

    try:
        commit, dirty = git("rev-parse", "--short", "HEAD").strip(), git("status", "--porcelain", "memetrain")
    except OSError:
        return "unknown"
    return (commit or "unknown") + (" + uncommitted changes in memetrain/" if dirty.strip() else "")


def spread(values: list[float], digits: int = 0) -> str:
    """``min–max`` of several runs, ``–`` for one."""
    return f"{min(values):.{digits}f}–{max(values):.{digits}f}" if len(values) > 1 else "–"


def median(values: list[float]) -> float:
    return statistics.median(values)


def record(title: str, info: str, table: str) -> None:
    """Append ``table`` under ``## <title>, <date>`` with the machine, the code and the command."""
    if not RECORD.exists():
        RECORD.write_text(
            "# Benchmarks\n\nFigures appended by the scripts in `benchmarks/` (see `benchmarks/README.md`). "
            "Newest last.\n"
        )
    command = shlex.join([sys.executable, *sys.argv])
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    with RECORD.open("a", encoding="utf-8") as handle:
        handle.write(
            f"\n## {title}, {stamp}\n\n- machine: {info}\n- code: {code_version()}\n"
            f"- command: `{command}`\n\n{table}\n"
        )
    print(f"appended to {RECORD}")
