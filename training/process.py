"""Process set-up: which rank this process is, on which device, with which seeds; one place for all of it.

torchrun (or SLURM) says how many processes there are; without either this is one process on ``--device``.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from interop.checkpoint import rng_state


@dataclass(frozen=True)
class Process:
    """This process's place in the run: its rank, the number of processes, and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 prints, writes files and saves checkpoints; every rank trains."""
        return self.rank == 0

    def say(self, *values: Any, **kwargs: Any) -> None:
        """``print`` on rank 0, nothing elsewhere: one copy of every message however many processes run."""
        if self.is_main:
            print(*values, **kwargs)


def init_distributed(device: str, dist_url: str = "env://") -> Process:
    """The process from torchrun's or SLURM's environment (joining its process group); rank 0 of 1 without one."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    elif "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        rank, world, local = (int(os.environ[k]) for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
    else:
        return Process(0, 1, torch.device(device))
    where = torch.device(device)
    if where.type == "cuda":
        where = torch.device("cuda", local)
        torch.cuda.set_device(where)
    backend = "nccl" if where.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=dist_url, rank=rank, world_size=world)
    return Process(rank, world, where)


def shutdown() -> None:
    """Leave the process group, if this process joined one (torch warns at exit otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators; each rank passes its own (``--seed`` + rank)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def gather_rng_states(world: int) -> list[dict[str, Any]]:
    """Every rank's RNG state (ranks draw different augmentations), so a resume restores each one."""
    local = rng_state()
    if world == 1:
        return [local]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, local)
    return states
