"""Train and evaluate one run. The same file runs under python, torchrun, accelerate launch, the
deepspeed launcher and srun (README "Distributed execution").

    python launcher/train.py                                   # concat fusion on SynthMemes, CPU, minutes
    python launcher/train.py model=lstm                        # text-only baseline
    python launcher/train.py model=resnet50 data=hateful_memes data.image_size=224 trainer.max_steps=3000
    python launcher/train.py data.label_fraction=0.05 seed=1 hydra.run.dir=runs/mine
    torchrun --nproc_per_node 8 launcher/train.py trainer=ddp trainer.global_batch_size=256
    torchrun --nproc_per_node 8 launcher/train.py trainer=deepspeed_zero2 trainer.precision=bf16
    accelerate launch --config_file configs/accelerate/1node_8gpu.yaml launcher/train.py trainer=ddp
    ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/accelerate/cpu_2proc.yaml launcher/train.py trainer=ddp
    deepspeed --no_local_rank --num_gpus 8 launcher/train.py trainer=deepspeed_zero3
    srun --nodes 2 --ntasks-per-node 8 --gpus-per-node 8 python launcher/train.py trainer=ddp   # a task per GPU

Re-running the same command resumes from the newest checkpoint in its run directory (resume=auto).
`--cfg job --resolve` prints the resolved config; every option is documented in configs/.
"""

from memetrain.cli import train

if __name__ == "__main__":
    train()
