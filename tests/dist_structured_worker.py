"""Worker for tests/test_structured.py, launched by ``torchrun --nproc_per_node=2`` (gloo, CPU).

Each rank trains the tiny DIGITS ViT under DDP with ``StructuredDST`` across several topology updates. The data and
the global RNG differ per rank, so the local head statistics differ until the update all-reduces them. The worker
saves its masks, weights, update steps and a local pre-update window to ``<out_dir>/rank<r>.pt``. Finally it corrupts
one mask on rank 1, keeping its active count and active index sum, and records whether ``check_consistency`` notices
on every rank.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_masking_worker import swap_keeping_count_and_index_sum
from torch.nn.parallel import DistributedDataParallel

import models
from models.head_stats import structure_units
from sparselearning import StructuredDST

STEPS = 10


def train_one(compat: bool, rank: int) -> tuple[dict, StructuredDST]:
    torch.manual_seed(0)
    model = models.create_model("vit_digits_tiny", num_classes=10)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.05)
    sparsifier = StructuredDST(ddp, optimizer, structure_units(ddp), 2 * STEPS, atten_density=0.5, other_density=0.5,
                               compat=compat, update_frequency=3, seed=1234, log_fn=lambda record: None)
    torch.manual_seed(100 + rank)  # a rank-dependent global RNG must not influence the masks
    data = torch.Generator().manual_seed(1000 + rank)  # each rank sees different samples; DDP averages the grads
    updates, local_window = [], {}
    for step in range(1, STEPS + 1):
        x, y = torch.randn(8, 3, 16, 16, generator=data), torch.randint(0, 10, (8,), generator=data)
        loss = F.cross_entropy(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 2:
            local_window = {name: sums["taylor"].clone() for name, sums in sparsifier.stats.sums().items()}
        if sparsifier.step(step):
            updates.append(step)
    result = {
        "updates": updates,
        "swapped": sparsifier.record()["swapped_neurons"],
        "local_window": local_window,
        "masks": {name: m.clone() for name, m in sparsifier.masks.items()},
        "weights": {name: p.detach().clone() for name, p in model.named_parameters()},
    }
    return result, sparsifier


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    results = {}
    for compat in (False, True):
        results["compat" if compat else "default"], sparsifier = train_one(compat, rank)

    if rank == 1:
        swap_keeping_count_and_index_sum(next(iter(sparsifier.masks.values())))
    try:
        sparsifier.check_consistency()
        results["mismatch_error"] = ""
    except RuntimeError as error:
        results["mismatch_error"] = str(error)
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
