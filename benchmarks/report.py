"""What every benchmark script records with its table (machine, code revision, command line) and
the appending of that record to BENCHMARKS.md. Scripts import it as ``report`` (their own folder
is first on sys.path when run as ``python benchmarks/<script>.py``)."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "BENCHMARKS.md"


def machine_info(versions: str) -> str:
    """CPU model, cores, Python, the given package versions and the load at the start."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cpu}, {os.cpu_count()} cores ({usable} usable); Python {platform.python_version()}, "
        f"{versions}; load average {os.getloadavg()[0]:.2f} at the start"
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


def record(title: str, table: str, info: str) -> None:
    """Append ``## <title>, <date>`` with the machine, the code, the command and the table."""
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
