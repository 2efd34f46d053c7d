"""The progress display while a stage runs: a bar of finished jobs with done / running / failed /
pending counts, and a line with the newest output of a running job (its training's progress bar).
Without a terminal (a log file, CI) the bar is redrawn only when a job changes state.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from memetrain.sweep.record import DONE, FAILED, PENDING, RUNNING, JobState

TAIL_BYTES = 4096


def wait(
    handles: Sequence,
    states: dict[str, JobState],
    poll_seconds: float,
    refresh: Callable[[], None],
    on_change: Callable[[], None],
    title: str,
    on_end: Callable[[object, JobState], object | None] = lambda handle, state: None,
) -> None:
    """Poll ``handles`` until every job has ended, keeping ``states`` (and, through ``on_change``,
    ``sweep.json``) current; finished jobs are printed as they end, failed ones with their log.
    ``on_end(handle, state)`` hears of each job that ended (done or failed) and may return the
    handle of the same job submitted again (a retry), which is then waited for in its place."""
    handles = list(handles)
    live = sys.stderr.isatty()
    bar = tqdm(total=len(handles), desc=title, unit="job", dynamic_ncols=True)
    line = tqdm(bar_format="{desc}", dynamic_ncols=True, leave=False, disable=not live)
    try:
        while True:
            refresh()
            changed = False
            for index, handle in enumerate(handles):
                new = handle.poll()
                if new.status == states[handle.name].status:
                    continue
                states[handle.name], changed = new, True
                if new.status not in (DONE, FAILED):
                    continue
                again = on_end(handle, new)
                if again is not None:
                    handles[index] = again
                    bar.write(f"retry   {handle.name}: {new.error} (now Slurm job {again.job_id})")
                elif new.status == DONE:
                    bar.write(f"done    {handle.name}")
                else:
                    bar.write(f"failed  {handle.name}: {states[handle.name].error}\n        log: {new.log}")
            if changed:
                on_change()
            counts = {
                s: sum(states[h.name].status == s for h in handles) for s in (DONE, RUNNING, FAILED, PENDING)
            }
            bar.n = counts[DONE] + counts[FAILED]
            bar.set_postfix_str(
                ", ".join(f"{status} {count}" for status, count in counts.items()), refresh=False
            )
            if live or changed:
                bar.refresh()
            running = [h for h in handles if states[h.name].status == RUNNING]
            line.set_description_str(f"  {running[0].name}: {last_output(running[0].log)}" if running else "")
            if bar.n == len(handles):
                return
            time.sleep(poll_seconds)
    finally:
        line.close()
        bar.close()


def last_output(log: Path | str | None, width: int = 100) -> str:
    """The last non-empty line, or carriage-return fragment (a progress bar), of ``log``."""
    if log is None or not Path(log).is_file():
        return "starting"
    with open(log, "rb") as handle:
        handle.seek(max(0, Path(log).stat().st_size - TAIL_BYTES))
        tail = handle.read().decode("utf-8", "replace")
    fragments = [f.strip() for f in tail.replace("\r", "\n").split("\n") if f.strip()]
    return fragments[-1][:width] if fragments else "starting"
