"""A training-like consumer for tests/faults/test_loader_faults.py: streams a packed SynthMemes split
with 2 loader worker processes whose view blocks for good after each worker's first batch, takes
one batch, says so on stdout and waits to be killed.

    python tests/data/blocked_consumer_script.py <shards> main|thread

``thread``: the loader is first iterated (its workers forked) by a thread that then ends.
"""

import sys
import threading
import time

from memetrain.data.stream import MemeStream, StreamSettings
from memetrain.data.transforms import Resize


class BlockingView(Resize):
    """Resize, until a worker has made one batch of views; then it blocks (as a worker stuck on a
    pipe, a lock or a disk would)."""

    def __init__(self, size: int, block_after: int):
        super().__init__(size)
        self.block_after, self.made = block_after, 0

    def __call__(self, image, rng=None):
        self.made += 1
        if self.made > self.block_after:
            threading.Event().wait()
        return super().__call__(image, rng)


shards, forked_by = sys.argv[1], sys.argv[2]
settings = StreamSettings(batch_size=8, num_workers=2, prefetch_factor=2, seed=0)
batches = iter(MemeStream(shards, "train", settings, BlockingView(32, block_after=8)))
first = []
if forked_by == "thread":
    forker = threading.Thread(target=lambda: first.append(next(batches)))
    forker.start()
    forker.join()
else:
    first.append(next(batches))
print(f"took a batch of {len(first[0]['id'])}", flush=True)
time.sleep(3600)
