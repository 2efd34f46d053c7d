"""Fetch the pretrained weights a run or a sweep names into the cache its jobs read, and list them.

Run it where the network is (a login node), with the HF_HOME (or HF_HUB_CACHE) the jobs use; the
jobs then train with HF_HUB_OFFLINE=1 and read the weights from that cache. Downloads go through
timm's, transformers' and open_clip's own hub code (huggingface_hub), never memetrain's.

    python launcher/fetch_weights.py model=vit_b16 model.image.pretrained=true      # one run's weights
    python launcher/fetch_weights.py model=transformer model.text.pretrained=bert-base-uncased
    python launcher/fetch_weights.py method=clip model=clip_open_clip method.tower=open_clip \\
        method.open_clip_model=ViT-L-14 method.open_clip_weights=openai
    python launcher/fetch_weights.py +sweep=table2 model.image.pretrained=true        # every run of a sweep
    python launcher/fetch_weights.py +sweep=semimemes dry_run=true                   # list, download nothing
    HF_HOME=/shared/hf python launcher/fetch_weights.py ...                           # the jobs' cache

It takes the same overrides as launcher/train.py (or a sweep's, after +sweep=<name>), prints each
weight with the options naming it, whether it was in the cache or fetched now, its size and file.
"""

from memetrain.cli import fetch_weights

if __name__ == "__main__":
    fetch_weights()
