"""The quickstart's one table: each trained run evaluated as it ships, counted, and timed against the first (dense).

    python benchmarks/quickstart_table.py outputs/quickstart/dense outputs/quickstart/svite ...

Each run directory is one main.py training run. Its deployed model (``compact.pth`` for a structured run, else the
final checkpoint with its token selector; ``benchmarks.study.deployed_model``) is evaluated on the run's validation
set, counted with ``models.mac_views`` (the counts ``--flops`` prints) and timed with the interleaved protocol of
``benchmarks/timing.py`` on the process CPU clock, so the speedups hold while other work shares the machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/quickstart_table.py` puts benchmarks/, not the root, on the path

import torch  # noqa: E402

import datasets  # noqa: E402
import engine  # noqa: E402
import models  # noqa: E402
from benchmarks import steps  # noqa: E402
from benchmarks.study import deployed_model  # noqa: E402
from benchmarks.timing import measure  # noqa: E402


def evaluate_run(run_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(deployed model, row): top-1 on the run's validation set, parameter and MAC counts."""
    config = json.loads((run_dir / "config.json").read_text())
    model = deployed_model(run_dir)
    val_set, _ = datasets.build_dataset(False, datasets.DataConfig.from_args(argparse.Namespace(**config)))
    loader = torch.utils.data.DataLoader(val_set, batch_size=256)
    stats = engine.evaluate(model, loader, torch.device("cpu"))
    views = models.mac_views(model)
    return model, {"run": run_dir.name, "top1": stats["acc1"], "params": views["params"],
                   "params_nonzero": views["params_nonzero"], "theoretical": views["theoretical"],
                   "executed": views["executed"]}


def build_rows(run_dirs: list[Path], batch_size: int = 256, repeats: int = 3,
               min_seconds: float = 0.5) -> list[dict[str, Any]]:
    """One row per run, with ``speedup``: inference samples/s over the first run's, timed interleaved."""
    torch.set_num_threads(1)
    nets, rows = {}, []
    for run_dir in run_dirs:
        nets[run_dir.name], row = evaluate_run(run_dir)
        rows.append(row)
    first = next(iter(nets.values()))
    images = steps.random_batch(batch_size, first.patch_embed.img_size[0], 1, torch.device("cpu"))[0]
    runs = {name: steps.inference_run(net, images, torch.device("cpu"), None) for name, net in nets.items()}
    timings = measure(runs, batch_size=batch_size, num_warm_iter=2, num_bench_iter=3, repeats=repeats,
                      min_bench_seconds=min_seconds, clock=time.process_time)
    base = timings[rows[0]["run"]].samples_per_sec
    for row in rows:
        row["samples_per_sec"] = timings[row["run"]].samples_per_sec
        row["speedup"] = row["samples_per_sec"] / base
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table; MACs in millions per image, the speedup against the first row."""
    head = (f"{'run':<12} {'top-1':>7} {'non-zero params':>16} {'MMACs theoretical':>18} {'MMACs executed':>15} "
            f"{'speedup':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['run']:<12} {r['top1']:>6.2f}% {r['params_nonzero']:>16,.0f} {r['theoretical'] / 1e6:>18.3f} "
                     f"{r['executed'] / 1e6:>15.3f} {r['speedup']:>7.2f}x")
    lines.append(f"speedup: measured inference samples/s against {rows[0]['run']} (batch 256, one thread, CPU clock); "
                 "theoretical MACs count masked weights and selected tokens as removed, executed MACs what runs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="main.py output directories; the first is the baseline")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (median taken)")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="least seconds per timed loop")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.run_dirs if not (d / "config.json").exists()]
    if missing:
        raise SystemExit(f"error: not main.py run directories (no config.json): {', '.join(missing)}")
    rows = build_rows(args.run_dirs, repeats=args.repeats, min_seconds=args.min_seconds)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
