"""Train and evaluate one run. The same file runs under python, torchrun and accelerate launch.

    python launcher/train.py                                   # concat fusion on SynthMemes, CPU, minutes
    python launcher/train.py model=lstm                        # text-only baseline
    python launcher/train.py model=resnet50 data=hateful_memes data.image_size=224 trainer.max_steps=3000
    python launcher/train.py data.label_fraction=0.05 seed=1 hydra.run.dir=runs/mine
    torchrun --nproc_per_node 2 launcher/train.py trainer.global_batch_size=64
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 launcher/train.py   # 2 CPU processes

Re-running the same command resumes from the newest checkpoint in its run directory (resume=auto).
`--cfg job` prints the resolved config; every option is documented in configs/.
"""

from memetrain.cli import train

if __name__ == "__main__":
    train()
