"""Stop training cleanly on a signal: checkpoint at the next step boundary, then exit to be requeued.

Slurm sends SIGUSR2 ahead of a time limit (``sbatch --signal=USR2@<seconds>``, which submitit sets)
and SIGTERM when it preempts or cancels a job. While :class:`StopSignals` is installed either signal
only records its name; the trainer asks :meth:`StopSignals.agreed` after every optimizer step (one
all-reduce when distributed, so every rank stops at the same step), saves a checkpoint and raises
:class:`memetrain.errors.TrainingStopped`. Resuming from that checkpoint is exact (resume=auto).
DataLoader workers forked meanwhile inherit the handler, so a signal sent to the whole process
tree (as Slurm does) does not kill them mid-batch.
"""

from __future__ import annotations

import signal
import threading

import torch
from accelerate import Accelerator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class StopSignals:
    """While installed, :data:`STOP_SIGNALS` set :attr:`received` instead of killing the process.

    Python handles signals in the main thread only; from any other thread (a trainer driven from a
    thread) nothing is installed and the signals keep their default action.
    """

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._record) for sig in STOP_SIGNALS}
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _record(self, signum: int, frame) -> None:
        self.received = self.received or signal.Signals(signum).name  # the first one: what stopped it

    def agreed(self, accelerator: Accelerator) -> str | None:
        """The signal's name on every rank if any rank received one, else None."""
        if accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor(float(self.received is not None), device=accelerator.device)
        return (self.received or "a signal on another rank") if accelerator.reduce(flag, "sum") > 0 else None
