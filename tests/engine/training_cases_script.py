"""Training cases with the real engine (config, Accelerator, method, optimizer, Trainer, Checkpointer)
on a deterministic in-memory batch source, in one process or under torchrun.

Why not the packed stream: MemeStream splits a split into one contiguous run per (rank, worker)
slot and shuffles each run with its own seeded buffer, so 2 ranks x batch B and 1 process x batch
2B see different samples by design. Here sample ``i`` is a pure function of ``i``, and optimizer
step ``s`` takes samples ``s*G .. s*G+G-1`` (``G`` the global batch) whatever the world size: micro-
batch ``m`` of rank ``r`` holds ``B`` of them at ``s*G + (m*W + r)*B``.

    python -m torch.distributed.run --nproc_per_node 2 tests/engine/training_cases_script.py OUT CASES.json

Each case writes ``OUT/<name>/checkpoints/step_N/`` (with ``model.safetensors``) and
``OUT/<name>/report.pt``: the checkpoint it resumed from, the count of skipped steps
(``nan_calls`` are training-step calls of rank 0 whose loss is made NaN), features of held-out
samples computed on every rank after training, and, without DeepSpeed, every parameter's gradient at each applied
optimizer step as the optimizer received it (averaged over ranks and micro-batches). A case with ``resume_from`` then
trains a second time, in a new engine on a new method, resuming from a copy of its checkpoint at
that step, into ``OUT/<name>-resumed``. Cases run one after the other in one process group.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from memetrain.cli import CONFIG_DIR
from memetrain.engine.checkpoint import Checkpointer
from memetrain.engine.distributed import build_accelerator, world_size
from memetrain.engine.logger import RunLogger
from memetrain.engine.model_options import apply_trainer_options
from memetrain.engine.optim import build_optimizer
from memetrain.engine.trainer import Trainer, TrainerSettings, accumulation_steps
from memetrain.methods import DataInfo, build_method

VOCAB, LENGTH, SIZE = 50, 8, 32
DATA = DataInfo(label_names=["label"], main_label="label", vocab_size=VOCAB, pad_id=0)
# No batch norm (its statistics are per rank by definition) and no dropout (its masks are drawn
# per rank): with those, 2 ranks x B and 1 x 2B compute the same function of the same samples.
TEXT = {"kind": "transformer", "vocab_size": None, "hidden_size": 32, "num_layers": 2, "num_heads": 2}
TEXT |= {"max_position_embeddings": 16, "dropout": 0.0}
IMAGE = {"name": "test_vit", "image_size": SIZE}
HEAD = {"kind": "concat", "hidden_dim": 32, "dropout": 0.0}
MODELS = {
    "supervised": {"image": IMAGE, "text": TEXT, "head": HEAD},
    "clip": {"image": IMAGE, "text": TEXT},
    "supervised_bn": {"image": {"name": "test_resnet"}, "text": TEXT, "head": HEAD},  # batch norm
}
METHODS = {"supervised": {}, "clip": {"embed_dim": 16}}


class FixedBatches:
    """The samples of every optimizer step, cut for this rank (see the module docstring)."""

    def __init__(self, batch_size: int, accumulation: int, rank: int, world: int):
        self.batch_size, self.accumulation, self.rank, self.world = batch_size, accumulation, rank, world
        self.position = 0  # micro-batches delivered

    def __iter__(self):
        while True:
            step, micro = divmod(self.position, self.accumulation)
            first = step * self.batch_size * self.accumulation * self.world
            first += (micro * self.world + self.rank) * self.batch_size
            self.position += 1
            yield collate([sample(i) for i in range(first, first + self.batch_size)])

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


def sample(index: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(index)
    length = int(torch.randint(3, LENGTH + 1, (), generator=generator))
    tokens = torch.zeros(LENGTH, dtype=torch.long)
    tokens[:length] = torch.randint(1, VOCAB, (length,), generator=generator)
    return {
        "image": torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8, generator=generator),
        "input_ids": tokens,
        "attention_mask": (tokens > 0).long(),
        "label": int(torch.randint(0, 2, (), generator=generator)),
        "id": f"m{index:05d}",
    }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    labels = torch.tensor([s["label"] for s in samples])
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "input_ids": torch.stack([s["input_ids"] for s in samples]),
        "attention_mask": torch.stack([s["attention_mask"] for s in samples]),
        "label": labels,
        "labels": labels[:, None],
        "valid": torch.ones(len(samples), dtype=torch.bool),
        "id": [s["id"] for s in samples],
        "text": [s["id"] for s in samples],
    }


def trainer_config(case: dict[str, Any]) -> dict[str, Any]:
    """The trainer group as a run composes it (``trainer=<name>`` and overrides)."""
    overrides = [
        f"trainer={case.get('trainer', 'single')}",
        f"trainer.max_steps={case['steps']}",
        f"trainer.global_batch_size={case['global_batch']}",
        "trainer.warmup_steps=1",
        "trainer.grad_clip=1000",  # computed, never binding: clipping would hide a wrong gradient scale
        "trainer.checkpoint_every=2",
        "trainer.keep_checkpoints=3",
        "trainer.log_every=100",
        *case.get("overrides", []),
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"method={case['method']}", *overrides])
    return OmegaConf.to_container(cfg.trainer, resolve=True)


def train(case: dict[str, Any], run_dir: Path, resume_from: Path | None = None) -> None:
    t = trainer_config(case)
    accumulation = accumulation_steps(t["global_batch_size"], case["batch_size"], world_size())
    accelerator = build_accelerator(t, case["batch_size"], accumulation)
    set_seed(0)  # the same initial weights on every rank and in every case
    model_config = MODELS[case.get("model", case["method"])]
    method = build_method(case["method"], dict(METHODS[case["method"]]), model_config, DATA)
    scalars = apply_trainer_options(method, t, 1)
    if accelerator.process_index == 0 and case.get("nan_calls"):
        poison(method, set(case["nan_calls"]))
    optimizer = build_optimizer(method.param_groups(t["weight_decay"]), t, accelerator.device)
    model, optimizer = accelerator.prepare(method, optimizer)
    grads = []
    if t["strategy"] != "deepspeed":  # DeepSpeed's optimizer holds flat partitions, not parameters
        names = {param: name for name, param in method.named_parameters()}
        optimizer.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: grads.append(
                {names[p]: p.grad.clone() for group in opt.param_groups for p in group["params"]}
            )
        )
    checkpoints = run_dir / "checkpoints"
    if resume_from is not None and accelerator.is_main_process:
        checkpoints.mkdir(parents=True)
        shutil.copytree(resume_from, checkpoints / resume_from.name)
    accelerator.wait_for_everyone()
    checkpointer = Checkpointer(checkpoints, t["keep_checkpoints"], accelerator, scalars)
    settings = TrainerSettings(**{f: t[f] for f in TrainerSettings.__dataclass_fields__})
    stream = FixedBatches(
        case["batch_size"], accumulation, accelerator.process_index, accelerator.num_processes
    )
    trainer = Trainer(settings, accelerator, model, optimizer, stream, checkpointer, "case: 1\n")
    latest = checkpointer.latest()
    state = trainer.fit(lambda step: RunLogger(run_dir, accelerator.is_main_process, step))
    trainer.logger.close()
    features = evaluate(method, accelerator)
    if accelerator.is_main_process:
        report = {
            "grads": grads,
            "skipped_steps": state.skipped_steps,
            "resumed_from": latest and latest.name,
        }
        torch.save(report | {"features": features}, run_dir / "report.pt")
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    # the next case builds its own Accelerator, in this process group
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@torch.no_grad()
def evaluate(method, accelerator) -> torch.Tensor:
    """Features of 4 held-out samples per rank, each rank on its own, gathered ``[W * 4, D]``: what
    the evaluation protocols compute after training (with DeepSpeed, the method called directly)."""
    batch = collate([sample(10**6 + 4 * accelerator.process_index + i) for i in range(4)])
    batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    method.eval()
    features = method.embed(batch)
    method.train()
    return accelerator.gather(features.float().contiguous()).cpu()


def poison(method, calls: set[int]) -> None:
    """Make the loss NaN on these training-step calls of this rank only: the other ranks' losses
    stay finite, and every rank must still skip the step."""
    original, count = method.training_step, iter(range(10**9))

    def training_step(batch):
        losses, report = original(batch)
        if next(count) in calls:
            losses = {name: value * float("nan") for name, value in losses.items()}
        return losses, report

    method.training_step = training_step


def main(out: Path, cases: list[dict[str, Any]]) -> None:
    for case in cases:
        train(case, out / case["name"])
        if "resume_from" in case:
            step = out / case["name"] / "checkpoints" / f"step_{case['resume_from']:07d}"
            train(case, out / f"{case['name']}-resumed", resume_from=step)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()))
