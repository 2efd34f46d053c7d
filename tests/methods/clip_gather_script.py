"""Run under torchrun (gloo): ClipLoss across ranks against one process on the concatenated batch.

Every rank builds the same problem from one seed: projections of ``world * B`` image and text
inputs, of which it encodes its own ``B`` rows. It writes to ``<out>/rank<r>.pt``, for each
``local_loss``, the loss and the parameter gradients averaged over ranks (what DDP applies), and
the same computed by one process on the whole batch.
"""

import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from memetrain.losses.contrastive import ClipLoss

BATCH, INPUT_DIM, EMBED_DIM = 4, 6, 5


class Towers(nn.Module):
    def __init__(self):
        super().__init__()
        self.image, self.text = nn.Linear(INPUT_DIM, EMBED_DIM), nn.Linear(INPUT_DIM, EMBED_DIM)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))


def step(model: Towers, images, texts, local_loss: bool, gather: bool) -> dict:
    model.zero_grad()
    image, text = F.normalize(model.image(images), dim=1), F.normalize(model.text(texts), dim=1)
    terms = ClipLoss(local_loss)(image, text, model.logit_scale.exp(), gather=gather)
    terms["contrastive_loss"].backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    return {"loss": terms["contrastive_loss"].detach(), "i2t_top1": terms["i2t_top1"], "grads": grads}


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    images, texts = torch.randn(world * BATCH, INPUT_DIM), torch.randn(world * BATCH, INPUT_DIM)
    model = Towers()
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    results = {}
    for local_loss in (True, False):
        spread = step(model, images[mine], texts[mine], local_loss, gather=True)
        for value in [spread["loss"], spread["i2t_top1"], *spread["grads"].values()]:
            dist.all_reduce(value)  # summed, then averaged over ranks: what DDP does with gradients
            value /= world
        whole = step(model, images, texts, local_loss, gather=False)
        results[local_loss] = {"ranks": spread, "one_process": whole}
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
