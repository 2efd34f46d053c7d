"""Pack memes into WebDataset shards with a manifest and a trained tokenizer.

    python launcher/pack.py source=synth count=2000 image_size=224 output=shards/synth
    python launcher/pack.py source=hateful_memes input=/data/hateful_memes output=shards/hm
    python launcher/pack.py source=mami input=/data/MAMI output=shards/mami test_labels=test_labels.txt
    python launcher/pack.py source=folder input=/data/memes annotations=labels.csv label_columns=[hateful]

Options (any of configs/pack.yaml): strict=true fails on any rejected record, image.resize_longest=512
shrinks large images once at pack time, workers=N sets the processes, --cfg job prints the config.
"""

from memetrain.cli import pack

if __name__ == "__main__":
    pack()
