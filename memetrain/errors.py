"""Errors a user can fix. Entry points print their message as one line, without a traceback;
anything else is a bug and keeps its traceback."""

STOPPED_EXIT_CODE = 75  # EX_TEMPFAIL: the run stopped on a signal after a checkpoint; re-run to resume
USER_ERROR_EXIT_CODE = 2  # an option, file or record to fix: the same command fails again until it is
PEER_FAILED_EXIT_CODE = 3  # another process of the run died: nothing to fix here, the same command resumes


class MemetrainError(Exception):
    """Base of every user-facing error: the message names the file, record or option and the fix.

    ``safe_teardown``: whether the process may still run the interpreter's normal exit after it;
    entry points end one that may not at once, once its message and logs are flushed.
    ``exit_code``: what the process exits with (a sweep tells a run's own error from a lost peer by it)."""

    safe_teardown = True
    exit_code = USER_ERROR_EXIT_CODE


class ConfigError(MemetrainError, ValueError):
    """An option or path given to the framework is wrong."""


class TrainingStopped(Exception):
    """Training stopped on a signal (a Slurm time limit or preemption) after saving a checkpoint.

    Not a failure: entry points exit with :data:`STOPPED_EXIT_CODE`, and the same command resumes.
    """

    def __init__(self, signal_name: str, step: int, checkpoint: str):
        super().__init__(
            f"stopped by {signal_name} at step {step}; checkpoint {checkpoint}; re-run to resume"
        )
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
