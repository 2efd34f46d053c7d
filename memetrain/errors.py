"""Errors a user can fix. Entry points print their message as one line, without a traceback;
anything else is a bug and keeps its traceback."""


class MemetrainError(Exception):
    """Base of every user-facing error: the message names the file, record or option and the fix."""


class ConfigError(MemetrainError, ValueError):
    """An option or path given to the framework is wrong."""
