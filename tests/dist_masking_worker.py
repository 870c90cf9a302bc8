"""Worker for tests/test_sparse_distributed.py, launched by ``torchrun --nproc_per_node=2`` (gloo, CPU).

Each rank trains a tiny MLP under DDP with ``Masking`` across several topology updates, on data and a global RNG
that differ per rank, then saves its masks, weights and update steps to ``<out_dir>/rank<r>.pt``. Finally it
corrupts one mask on rank 1 without changing its active count or the sum of its active indices ({0, 3} becomes
{1, 2}) and records whether ``check_consistency`` notices on every rank.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sparselearning import Masking

STEPS = 10


def swap_keeping_count_and_index_sum(mask: torch.Tensor) -> tuple[int, int]:
    """Move one active entry a to a + 1 and another d to d - 1, in place; returns (active count, active index sum),
    which the swap leaves as they were."""
    flat = mask.view(-1)
    right = (flat[:-1] & ~flat[1:]).nonzero().flatten().tolist()  # active a, inactive a + 1
    left = [d + 1 for d in (~flat[:-1] & flat[1:]).nonzero().flatten().tolist()]  # active d, inactive d - 1
    a, d = next((a, d) for a in right for d in left if d - 1 > a + 1 or a > d)
    flat[[a, a + 1, d, d - 1]] = torch.tensor([False, True, False, True])
    return int(flat.sum()), int(flat.nonzero().sum())


def train_one(growth: str, redistribution: str, rank: int) -> tuple[dict, Masking]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.05)
    masking = Masking(ddp, optimizer, density=0.4, total_steps=2 * STEPS, update_frequency=3, growth=growth,
                      redistribution=redistribution, seed=1234, log_fn=lambda record: None)
    torch.manual_seed(100 + rank)  # a rank-dependent global RNG must not influence the masks
    data = torch.Generator().manual_seed(1000 + rank)  # each rank sees different samples; DDP averages the grads
    updates = []
    for step in range(1, STEPS + 1):
        x, y = torch.randn(8, 16, generator=data), torch.randint(0, 4, (8,), generator=data)
        loss = F.cross_entropy(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if masking.step(step):
            updates.append(step)
    result = {
        "updates": updates,
        "masks": {name: m.clone() for name, m in masking.masks.items()},
        "weights": {name: p.detach().clone() for name, p in model.named_parameters()},
    }
    return result, masking


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    results = {}
    for growth, redistribution in (("gradient", "none"), ("random", "magnitude")):
        results[f"{growth}/{redistribution}"], masking = train_one(growth, redistribution, rank)

    if rank == 1:
        mask = next(iter(masking.masks.values()))
        before = int(mask.sum()), int(mask.view(-1).nonzero().sum())
        results["corruption"] = [before, swap_keeping_count_and_index_sum(mask)]
    try:
        masking.check_consistency()
        results["mismatch_error"] = ""
    except RuntimeError as error:
        results["mismatch_error"] = str(error)
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
