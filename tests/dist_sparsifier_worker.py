"""Worker for tests/test_sparsifier_contract.py, launched by ``torchrun --nproc_per_node=2`` (gloo, CPU).

For every method in tests/sparsifiers.py, each rank trains the micro ViT under DDP across several topology updates,
on data and a global RNG that differ per rank, and saves to ``<out_dir>/rank<r>.pt``: the update steps, the masked
entries, the weights, the report, the sparsifier state before the first update (per-rank statistics differ there)
and whether its state loads into the same method on the bare model (no DDP 'module.' prefix). Then, for each method
that checks rank agreement, it corrupts one mask on rank 1 without changing its active count or the sum of its active
indices, and records whether ``check_consistency`` notices on every rank.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from sparsifiers import CASES, Case, make, masked_entries, train
from torch.nn.parallel import DistributedDataParallel

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


def run_case(case: Case, rank: int) -> tuple[dict, object]:
    run = make(case, seed=1234, wrap=DistributedDataParallel)
    torch.manual_seed(100 + rank)  # a rank-dependent global RNG must not influence the masks
    data = torch.Generator().manual_seed(1000 + rank)  # each rank sees different samples; DDP averages the grads
    window: dict = {}

    def keep_window(step: int) -> None:
        if step == 2:
            window.update(run.sparsifier.state_dict())

    updates = train(run, range(1, STEPS + 1), keep_window, generator=data)
    state = run.sparsifier.state_dict()
    try:
        make(case).sparsifier.load_state_dict(state)
        loads_unwrapped = True
    except (KeyError, ValueError):
        loads_unwrapped = False
    result = {
        "updates": updates,
        "masks": masked_entries(case, run.sparsifier),
        "weights": {name: p.detach().clone() for name, p in run.model.named_parameters()},
        "report": run.sparsifier.report(),
        "window": window,
        "loads_unwrapped": loads_unwrapped,
    }
    return result, run.sparsifier


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    results: dict = {"cases": {}, "corrupted": {}, "corrupted_checksums": {}}
    for case in CASES:
        results["cases"][case.name], sparsifier = run_case(case, rank)
        if not hasattr(sparsifier, "check_consistency"):
            continue
        name, mask = next((n, m) for n, m in sparsifier.masks.items() if 0 < int(m.sum()) < m.numel())
        if rank == 1:
            before = int(mask.sum()), int(mask.view(-1).nonzero().sum())
            results["corrupted_checksums"][case.name] = [before, swap_keeping_count_and_index_sum(mask)]
        try:
            sparsifier.check_consistency()
            error = ""
        except RuntimeError as caught:
            error = str(caught)
        results["corrupted"][case.name] = (name, error)
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
