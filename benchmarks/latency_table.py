"""Measure a block-latency table for latency-aware global pruning (``--latency-table``), on the current device.

    OMP_NUM_THREADS=1 python -m benchmarks.latency_table --model deit_small_patch16_224 --out table.json

Every grid point is one timm ``Block`` (the modules a compact model is made of: ``Attention`` with the given heads and
head dim, ``Mlp`` with the given hidden width) timed in eval mode on ``--batch-size`` images of the model's token
count, with ``benchmarks.timing``'s protocol (warm-up, synchronized timed loops), in ``--repeats`` rounds over every
point in shuffled order, the median over rounds (``build_table``). The default
grid spans 1 unit to the dense width on every pruned axis (what pruning can reach), in ``--points`` steps, and holds
the model's head dim alone; for ``--prune-head-dim`` pass a head-dim grid from 1 (or the unit multiple) to it
(``--head-dim 1 16 32 48 64``). The table records the device, versions, date, grid and this command.
"""
from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import time
from collections.abc import Sequence

import torch
from timm.models.vision_transformer import Attention, Block, Mlp

import models
from benchmarks.env import environment
from benchmarks.timing import Run, measure
from sparselearning.latency_table import AXES, LatencyTable, save_table


def default_grid(dense: int, points: int) -> list[int]:
    """1, then ``points - 1`` evenly spaced widths up to ``dense`` (fewer when ``dense`` is small)."""
    return sorted({1, *(max(1, round(dense * k / (points - 1))) for k in range(1, points))})


def timm_block(embed_dim: int, num_heads: int, head_dim: int, mlp_hidden: int) -> Block:
    """A timm ``Block`` of these widths, as ``models.resize_blocks`` builds a compact block (qkv bias on)."""
    block = Block(embed_dim, num_heads=1, mlp_ratio=1.0, qkv_bias=True)
    block.attn = Attention(embed_dim, num_heads=num_heads, attn_head_dim=head_dim, qkv_bias=True)
    block.mlp = Mlp(embed_dim, hidden_features=mlp_hidden)
    return block.eval()


def block_runner(shape: Sequence[int], tokens: int, batch_size: int, device: torch.device) -> Run:
    """``n`` forward passes of a ``timm_block(*shape)`` on ``batch_size`` x ``tokens`` random tokens."""
    block = timm_block(*shape).to(device)
    x = torch.randn(batch_size, tokens, shape[0], device=device)

    @torch.inference_mode()
    def run(n: int) -> None:
        for _ in range(n):
            block(x)

    return run


def build_table(model_name: str, grid: dict[str, list[int]], batch_size: int, device: torch.device, *, warm: int,
                iters: int, repeats: int, command: str, seed: int = 0) -> LatencyTable:
    """Time every grid point for ``model_name``'s token count; ``grid`` has the ``AXES``.

    The points are timed in ``repeats`` rounds, each over every point in a fresh random order (``seed``), and each
    point's latency is its median over the rounds. A table of hundreds of points takes minutes, and a shared machine
    drifts by 5-10% over minutes: timed point after point, that drift turns into differences between regions of the
    grid, larger than the ones pruning ranks by. Rounds in shuffled order spread it over every point alike. On a CPU
    the clock is this process's CPU time (other processes' time is not counted); on CUDA wall time, synchronised.
    """
    with torch.device("meta"):
        net = models.create_model(model_name)
    tokens = net.patch_embed.num_patches + net.num_prefix_tokens
    shape = [len(grid[a]) for a in AXES]
    indices = [tuple(i) for i in torch.cartesian_prod(*(torch.arange(n) for n in shape)).reshape(-1, len(AXES)).tolist()]
    runs = {i: block_runner([grid[a][k] for a, k in zip(AXES, i)], tokens, batch_size, device) for i in indices}
    cuda = device.type == "cuda"
    clock = {"sync": torch.cuda.synchronize, "clock": time.perf_counter} if cuda else {"clock": time.process_time}
    rounds: dict[tuple[int, ...], list[float]] = {i: [] for i in indices}
    generator = torch.Generator().manual_seed(seed)
    for _ in range(repeats):
        order = [indices[k] for k in torch.randperm(len(indices), generator=generator).tolist()]
        timings = measure({i: runs[i] for i in order}, batch_size=batch_size, num_warm_iter=warm,
                          num_bench_iter=iters, repeats=1, **clock)
        for i, timing in timings.items():
            rounds[i].append(timing.step_ms)
    ms = torch.zeros(shape, dtype=torch.float64)
    for i, values in rounds.items():
        ms[i] = statistics.median(values)
    meta = {**environment(device), "model": model_name, "command": command, "warm": warm, "iters": iters,
            "repeats": repeats, "order": f"{repeats} rounds over every point, each in a random order (seed {seed})",
            "clock": "wall, synchronised" if cuda else "process CPU time",
            "unit": f"ms per forward pass of one block on {batch_size} images"}
    return LatencyTable(grid, ms, tokens, batch_size, meta)


def main(argv: Sequence[str] | None = None) -> LatencyTable:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=models.MODEL_NAMES)
    parser.add_argument("--out", required=True, help="the table's JSON file")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--points", type=int, default=4, help="grid points per pruned axis, 1 and dense included")
    for axis in ("embed_dim", "num_heads", "mlp_hidden"):
        parser.add_argument(f"--{axis.replace('_', '-')}", type=int, nargs="+", default=None, metavar="N",
                            help=f"{axis} grid (default: --points values from 1 to the model's)")
    parser.add_argument("--head-dim", dest="head_dim", type=int, nargs="+", default=None, metavar="N",
                        help="head_dim grid (default: the model's head dim alone; for --prune-head-dim, widths from 1 "
                             "or the unit multiple up to it)")
    parser.add_argument("--warm", type=int, default=1)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.points < 2 or min(args.batch_size, args.iters, args.repeats) < 1 or args.warm < 0:
        raise SystemExit("error: --points >= 2, --batch-size, --iters and --repeats >= 1, --warm >= 0")
    with torch.device("meta"):
        arch = models.architecture(models.create_model(args.model))
    dense = {"embed_dim": arch["embed_dim"], "num_heads": arch["block_heads"][0],
             "mlp_hidden": arch["block_mlp_hidden"][0]}
    grid = {axis: sorted(set(getattr(args, axis) or default_grid(dense[axis], args.points))) for axis in dense}
    grid["head_dim"] = sorted(set(args.head_dim or [arch["head_dim"]]))
    command = "python -m benchmarks.latency_table " + " ".join(map(shlex.quote, argv if argv is not None
                                                                         else sys.argv[1:]))
    table = build_table(args.model, grid, args.batch_size, torch.device(args.device), warm=args.warm,
                        iters=args.iters, repeats=args.repeats, command=command)
    path = save_table(table, args.out)
    dense_ms = table(dense["embed_dim"], dense["num_heads"], arch["head_dim"], dense["mlp_hidden"])
    print(f"wrote {path}: {math.prod(len(v) for v in grid.values())} grid points, dense block {dense_ms:.2f} ms "
          f"per {args.batch_size} images on {table.meta['device']}")
    return table


if __name__ == "__main__":
    main()
