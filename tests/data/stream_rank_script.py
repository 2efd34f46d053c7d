"""Run under torchrun: each rank streams one epoch and writes the ids it saw to <out>/rank<r>.json."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from memetrain.data.stream import MemeStream, StreamSettings
from memetrain.data.transforms import Resize

shards, out = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo")
stream = MemeStream(shards, "train", StreamSettings(batch_size=8, num_workers=2, seed=4), Resize(32))
ids = [key for batch in stream for key, valid in zip(batch["id"], batch["valid"]) if valid]
(out / f"rank{dist.get_rank()}.json").write_text(json.dumps({"ids": ids, "batches": len(stream)}))
dist.barrier()
dist.destroy_process_group()
