"""One driver per sweep directory: the lock is refused in one line naming the directory and the
holder while another process holds it, and taken over once that process is SIGKILLed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from memetrain.sweep.lock import LOCK_FILE, SweepInUse, hold_sweep
from tests.helpers import REPO


def test_a_second_holder_is_refused_until_the_first_dies(tmp_path):
    sweep_dir = tmp_path / "sweeps" / "demo"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from pathlib import Path\nfrom memetrain.sweep.lock import hold_sweep\n"
         f"with hold_sweep(Path({str(sweep_dir)!r})):\n    print('held', flush=True)\n    import time; time.sleep(600)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SweepInUse) as refused, hold_sweep(sweep_dir):
            pass
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith(
            f"sweep directory {sweep_dir} is in use by another launcher/sweep.py "
            f"(pid {holder.pid} on {socket.gethostname()} since "
        )
        assert "run this command again (it re-attaches to the jobs)" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with hold_sweep(sweep_dir):  # the kernel dropped the dead holder's lock (no wait: taking it never blocks)
        assert (sweep_dir / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")


def test_the_lock_is_released_at_the_end_and_not_inherited(tmp_path):
    with hold_sweep(tmp_path):
        child = subprocess.Popen(["sleep", "60"])  # a training started by the driver keeps no lock
    try:
        with hold_sweep(tmp_path):
            pass
    finally:
        child.kill()
        child.wait()
