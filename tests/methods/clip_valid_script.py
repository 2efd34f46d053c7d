"""Run under torchrun (gloo, 2 ranks): ClipLoss when one rank's batch holds an invalid row.

Every rank builds the same problem from one seed (clip_gather_script's towers and inputs) and
encodes its own ``B`` rows; on the last rank, row ``STAND_IN`` is replaced by a copy of rank 0's
row 0 (a duplicate meme, which would be a false negative) and marked invalid. Each rank writes to
``<out>/rank<r>.pt``, for each ``local_loss``, the loss and parameter gradients averaged over ranks
(what DDP applies), with the problem (inputs, weights, the valid global rows) for the test's
reference.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from clip_gather_script import BATCH, INPUT_DIM, Towers

from memetrain.losses.contrastive import ClipLoss

STAND_IN = 2


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    images, texts = torch.randn(world * BATCH, INPUT_DIM), torch.randn(world * BATCH, INPUT_DIM)
    model = Towers()
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    my_images = images[rank * BATCH : (rank + 1) * BATCH].clone()
    my_texts = texts[rank * BATCH : (rank + 1) * BATCH].clone()
    valid = torch.ones(BATCH, dtype=torch.bool)
    if rank == world - 1:
        my_images[STAND_IN], my_texts[STAND_IN] = images[0], texts[0]
        valid[STAND_IN] = False
    results = {}
    for local_loss in (True, False):
        model.zero_grad()
        image, text = F.normalize(model.image(my_images), dim=1), F.normalize(model.text(my_texts), dim=1)
        terms = ClipLoss(local_loss)(image, text, model.logit_scale.exp(), valid=valid)
        terms["contrastive_loss"].backward()
        loss = terms["contrastive_loss"].detach()
        grads = {name: param.grad.clone() for name, param in model.named_parameters()}
        for value in [loss, *grads.values()]:
            dist.all_reduce(value)  # summed, then averaged over ranks: what DDP does with gradients
            value /= world
        results[local_loss] = {"loss": loss, "grads": grads}
    kept = [row for row in range(world * BATCH) if row != (world - 1) * BATCH + STAND_IN]
    problem = {"images": images, "texts": texts, "weights": weights, "kept": kept}
    torch.save({"results": results, "problem": problem}, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
