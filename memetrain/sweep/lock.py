"""One driver per sweep directory: ``launcher/sweep.py`` holds ``<sweep>/sweep.lock`` while it runs.

Two drivers on the same directory would both write ``sweep.json`` and could both submit the same
jobs. The lock is an exclusive ``flock`` on the lock file, taken without waiting: a second driver
stops at once with one line naming the directory and the holder (pid, host, start time, which the
holder writes into the file). The kernel drops the lock when the holder's process ends however it
ends (SIGKILL included), so a driver started after a crash takes it over and re-attaches to the
jobs the first one left in Slurm. The file stays behind; its content then names the last holder.

Linux ``flock`` works on local disks and on NFSv4 (where the kernel maps it to a POSIX lock).
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from memetrain.errors import MemetrainError

LOCK_FILE = "sweep.lock"


class SweepInUse(MemetrainError):
    """Another driver holds the sweep directory."""


@contextmanager
def hold_sweep(sweep_dir: Path) -> Iterator[None]:
    """Hold ``sweep_dir``'s lock for the ``with`` block, or raise :class:`SweepInUse` at once."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes (PEP 446)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = (
                os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "a driver that is just starting"
            )
            raise SweepInUse(
                f"sweep directory {sweep_dir} is in use by another launcher/sweep.py ({holder}); "
                f"wait for it to end, or stop it and run this command again (it re-attaches to the jobs)"
            ) from None
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
