"""Stop training cleanly on a signal: checkpoint at the next step boundary, then exit to be requeued.

Slurm sends SIGUSR2 ahead of a time limit (``sbatch --signal=USR2@<seconds>``, which submitit sets)
and SIGTERM when it preempts or cancels a job. While :class:`StopSignals` is installed either signal
only records its name; the trainer asks :meth:`StopSignals.agreed` after every optimizer step (so
every rank stops at the same step), saves a checkpoint and raises
:class:`memetrain.errors.TrainingStopped`. The ranks agree through the trainer's one check per step,
an all-reduce that carries this flag beside the finiteness of the loss and gradient
(:meth:`StopSignals.vote`), or else through an all-reduce of their own. Resuming from that checkpoint is exact (resume=auto).
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

    _installed: StopSignals | None = None  # signal handlers are process-wide: one installed at a time

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, object] = {}
        self._vote: bool | None = None

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._record) for sig in STOP_SIGNALS}
        StopSignals._installed = self
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if StopSignals._installed is self:
            StopSignals._installed = None

    @classmethod
    def installed(cls) -> StopSignals | None:
        """The instance installed now, if any."""
        return cls._installed

    def vote(self, any_rank: bool) -> None:
        """Whether any rank had received a signal, as the ranks agreed in a collective they share
        anyway (the trainer's per-step check): the next :meth:`agreed` answers it without one."""
        self._vote = any_rank

    def _record(self, signum: int, frame) -> None:
        self.received = self.received or signal.Signals(signum).name  # the first one: what stopped it

    def agreed(self, accelerator: Accelerator) -> str | None:
        """The signal's name on every rank if any rank received one, else None: with several
        processes, the :meth:`vote` since the last call if there was one (a signal that arrived
        after it counts at the next step, on every rank alike), else one all-reduce."""
        vote, self._vote = self._vote, None
        if accelerator.num_processes == 1:
            return self.received
        if vote is not None:
            return (self.received or "a signal on another rank") if vote else None
        flag = torch.tensor(float(self.received is not None), device=accelerator.device)
        return (self.received or "a signal on another rank") if accelerator.reduce(flag, "sum") > 0 else None
