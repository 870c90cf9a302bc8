"""Accuracy study on the embedded DIGITS set: each configuration trained with several seeds through main.py.

    python benchmarks/study.py                      # every configuration, 3 seeds, 2 runs at a time
    python benchmarks/study.py --configs dense sviite_d50 --seeds 0 1

Writes `<out>/study.csv` (one row per run), `<out>/study.md` (mean ± std per configuration) and
`<out>/study.png` (accuracy against MACs). Runs are separate processes, so they cannot leak state.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The DIGITS recipe of cmd/quickstart.sh, shortened to 40 epochs (920 optimizer steps).
BASE = ("--model", "vit_digits_tiny", "--data-set", "DIGITS", "--epochs", "40", "--batch-size", "64", "--lr", "1e-2",
        "--warmup-epochs", "3", "--drop-path", "0", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--aa", "none",
        "--color-jitter", "0", "--hflip", "0", "--no-repeated-aug", "--no-model-ema", "--num_workers", "0",
        "--no-pin-mem", "--print-freq", "100000")
# SViTE's unstructured recipe (fixed_ERK, magnitude death, gradient growth, cosine death rate 0.5, t_end 0.8),
# with ΔT = 25 steps: about 29 topology updates, in the range of the paper's ImageNet runs (48–100).
SVITE = ("--sparse_init", "fixed_ERK", "--growth", "gradient", "--death", "magnitude", "--redistribution", "none",
         "--update_frequency", "25")

# S²ViTE at the original's "40%" configuration: 0.7 of the heads, 0.6 of the MLP neurons.
S2VITE = ("--pruning_type", "structure", "--atten_density", "0.7", "--other_density", "0.6", "--update_frequency", "25")
# SViTE+: a global token selector that really drops tokens (the original only zeroed them).
TOKENS = ("--token_selection", "--token-mode", "drop")

CONFIGS: dict[str, tuple[str, ...]] = {
    "dense": (),
    "sviite_d50": (*SVITE, "--density", "0.5"),
    "sviite_d30": (*SVITE, "--density", "0.3"),
    "s2vite_h07_m06": S2VITE,
    "sviteplus_keep09": (*TOKENS, "--token-ratio", "0.9"),
    "sviteplus_keep07": (*TOKENS, "--token-ratio", "0.7"),
    "sviteplus_keep09_d50": (*TOKENS, "--token-ratio", "0.9", *SVITE, "--density", "0.5"),
    "sviteplus_keep07_d50": (*TOKENS, "--token-ratio", "0.7", *SVITE, "--density", "0.5"),
}


def run_one(config: str, seed: int, out: Path) -> dict:
    """Train one (configuration, seed) in its own process and return its final-epoch record."""
    run_dir = out / "runs" / f"{config}_seed{seed}"
    cmd = [sys.executable, str(ROOT / "main.py"), *BASE, *CONFIGS[config], "--seed", str(seed),
           "--output_dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{config} seed {seed} failed:\n{proc.stderr[-2000:]}")
    epochs = [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines() if '"epoch"' in line]
    last = epochs[-1]
    return {"config": config, "seed": seed, "test_acc1": last["test_acc1"], "n_parameters": last["n_parameters"],
            "n_nonzero_parameters": last["n_nonzero_parameters"], "density": last.get("density", 1.0),
            "train_seconds": round(time.perf_counter() - start, 1)}


def summarize(rows: list[dict]) -> list[dict]:
    """Mean ± std of top-1 per configuration, in CONFIGS order, with the gap to dense."""
    summary = []
    for config in CONFIGS:
        accs = [r["test_acc1"] for r in rows if r["config"] == config]
        if not accs:
            continue
        first = next(r for r in rows if r["config"] == config)
        summary.append({"config": config, "flags": " ".join(CONFIGS[config]) or "(dense)", "seeds": len(accs),
                        "mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                        "n_nonzero_parameters": first["n_nonzero_parameters"], "n_parameters": first["n_parameters"]})
    dense = next((s["mean"] for s in summary if s["config"] == "dense"), None)
    for s in summary:
        s["gap_to_dense"] = None if dense is None else dense - s["mean"]
    return summary


def write_outputs(rows: list[dict], out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "study.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"DIGITS accuracy study, {datetime.date.today()}, CPU ({platform.processor() or platform.machine()}), "
             f"command `{command}`", "",
             "| configuration | seeds | top-1 (mean ± std) | gap to dense | non-zero params | flags |",
             "|---|---|---|---|---|---|"]
    for s in summarize(rows):
        gap = "" if s["gap_to_dense"] is None else f"{s['gap_to_dense']:+.2f}"
        lines.append(f"| {s['config']} | {s['seeds']} | {s['mean']:.2f} ± {s['std']:.2f} | {gap} | "
                     f"{s['n_nonzero_parameters']:,} / {s['n_parameters']:,} | `{s['flags']}` |")
    (out / "study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one core each)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "study")
    args = parser.parse_args()
    jobs = [(c, s) for c in args.configs for s in args.seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda job: run_one(*job, args.out), jobs))
    write_outputs(rows, args.out, "python benchmarks/study.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
