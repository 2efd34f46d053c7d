"""The error a stream ends with, raised by each of its stages (see :mod:`memetrain.data.stream`)."""

from memetrain.errors import MemetrainError


class StreamError(MemetrainError):
    """The stream cannot go on: a corrupt shard, too many bad samples, or an impossible plan."""
