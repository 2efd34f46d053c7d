"""Export a trained model to ONNX or TorchScript, checked against the bundle on real memes.

    python launcher/export.py model=runs/synth/supervised-fusion_concat-seed0                  # model/model.onnx
    python launcher/export.py model=runs/synth/supervised-fusion_concat-seed0 format=torchscript output=fusion.pt
    python launcher/export.py model=bundles/hm-fusion check_input=shards/hateful_memes check_split=dev_seen

The exported model takes uint8 images [B, 3, S, S] and the bundle's token ids; its tokenizer and a
bundle.json (targets, thresholds, image size) are written beside it. Options: configs/inference/export.yaml.
"""

from memetrain.cli import export

if __name__ == "__main__":
    export()
