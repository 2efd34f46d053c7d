"""Stream one split of packed shards once and report counts, label balance, throughput and a grid.

    python launcher/inspect_shards.py shards=shards/synth split=train
    python launcher/inspect_shards.py shards=shards/hateful_memes split=dev_seen num_workers=4

Options: any of configs/inspect_shards.yaml; --cfg job prints the config.
"""

from memetrain.cli import inspect_shards

if __name__ == "__main__":
    inspect_shards()
