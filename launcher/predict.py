"""Score new memes with a trained model: one CSV row per meme (probability and decision per label).

    python launcher/predict.py model=runs/synth/supervised-fusion_concat-seed0 input=/data/new_memes annotations=memes.csv
    python launcher/predict.py model=bundles/hm-fusion input=/data/hateful_memes splits=[test_unseen] output=test_unseen.csv
    python launcher/predict.py model=runs/mami/... input=/data/MAMI source=mami splits=[test]
    python launcher/predict.py model=runs/synth/clip-clip_small-seed0 input=shards/synth splits=[test]
    accelerate launch --num_processes 4 launcher/predict.py model=... input=...   # one GPU per process

``model`` is a finished run's directory or its ``model/`` bundle (self-contained: copy it anywhere).
Memes the input labels are also scored against their labels (metrics printed). Memes that cannot be
scored are listed, with why, in ``<output stem>.rejected.csv``. Options: configs/predict.yaml.
"""

from memetrain.cli import predict

if __name__ == "__main__":
    predict()
