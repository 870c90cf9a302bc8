"""Accuracy study on the embedded DIGITS set: each configuration trained with several seeds through main.py.

    python benchmarks/study.py                      # every configuration, 3 seeds, 2 runs at a time
    python benchmarks/study.py --configs dense sviite_d50 --seeds 0 1
    python benchmarks/study.py --configs dense global_macs057_ft s2vite_h07_m06_ft --seeds 0 1   # from dense runs

Each run is a separate main.py process (runs cannot leak state into each other). Afterwards every trained model is
rebuilt as it would be deployed (the compacted model for S²ViTE, the masked or token-selecting model otherwise),
its parameters and MACs are counted with `models.mac_summary`, and the inference throughput of all of them is
measured interleaved in one protocol (benchmarks/timing.py). Writes to `--out`:

* `study.csv`: one row per run (top-1, parameters, MACs, samples/s);
* `study.md`: mean ± std per configuration, with the date, machine, command and wall time;
* `study.png`: top-1 (mean ± std) against MACs, theoretical (the paper's count) and executed (what runs).

    python benchmarks/study.py --from-csv           # rewrite study.md and study.png from the recorded study.csv

`--from-csv` trains nothing: it re-renders the tables and the plot of the recorded runs (after a change to how they
are presented), keeping the command, machine and wall time that study.md recorded.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/study.py` puts benchmarks/, not the repo root, on the path

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import interop  # noqa: E402
import models  # noqa: E402
from benchmarks import env, report, steps  # noqa: E402
from benchmarks.paired import by_seed, paired_gap  # noqa: E402
from benchmarks.timing import measure  # noqa: E402
from interop.checkpoint import load_checkpoint  # noqa: E402

# The DIGITS recipe of cmd/quickstart.sh, shortened to EPOCHS epochs (40: 920 optimizer steps).
EPOCHS = 40
BASE = ("--model", "vit_digits_tiny", "--data-set", "DIGITS", "--batch-size", "64", "--lr", "1e-2",
        "--warmup-epochs", "3", "--drop-path", "0", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--aa", "none",
        "--color-jitter", "0", "--hflip", "0", "--no-repeated-aug", "--no-model-ema", "--num_workers", "0",
        "--no-pin-mem", "--print-freq", "100000")
# SViTE's unstructured recipe (fixed_ERK, magnitude death, gradient growth, cosine death rate 0.5, t_end 0.8),
# with ΔT = 25 steps: about 29 topology updates, in the range of the paper's ImageNet runs (48–100).
SVITE = ("--sparse_init", "fixed_ERK", "--growth", "gradient", "--death", "magnitude", "--redistribution", "none",
         "--update_frequency", "25")
# S²ViTE at the original's "40%" configuration: 0.7 of the heads, 0.6 of the MLP neurons.
S2VITE = ("--pruning_type", "structure", "--atten_density", "0.7", "--other_density", "0.6", "--update_frequency", "25")
# The paper's exact neuron count (153 of 256), and the same rounded to a multiple of 8 (152), the multiple the
# default --unit-multiple gives every DeiT (vit_digits_tiny's 256 neurons keep the exact count by default).
EXACT_UNITS, UNITS_OF_8 = ("--unit-multiple", "1"), ("--unit-multiple", "8")
# SViTE+: a global token selector that really drops tokens (the original only zeroed them).
TOKENS = ("--token_selection", "--token-mode", "drop")
# Global pruning to the executed MACs of compact S²ViTE 0.7/0.6 (2.013 of dense 3.540 MMACs), pruning 48 units
# every 10 steps (done within about the first 150 of 460 steps), against S²ViTE from the same start: the magnitude-ranked
# heads and neurons of the dense model, then its DST. Both fine-tune the same seed's dense run (``FROM_DENSE``).
GLOBAL_AT_S2VITE_MACS = ("--pruning_type", "global", "--target-macs", "0.5686", "--prune-every", "10",
                         "--prune-units", "48")

CONFIGS: dict[str, tuple[str, ...]] = {
    "dense": (),
    "sviite_d50": (*SVITE, "--density", "0.5"),
    "sviite_d30": (*SVITE, "--density", "0.3"),
    "s2vite_h07_m06": (*S2VITE, *EXACT_UNITS),
    "s2vite_h07_m06_mult8": (*S2VITE, *UNITS_OF_8),
    "sviteplus_keep07": (*TOKENS, "--token-ratio", "0.7"),
    "sviteplus_keep07_d50": (*TOKENS, "--token-ratio", "0.7", *SVITE, "--density", "0.5"),
    "s2vite_h07_m06_ft": (*S2VITE, *EXACT_UNITS, "--mask-init", "magnitude"),
    "global_macs057_ft": GLOBAL_AT_S2VITE_MACS,
}
FROM_DENSE = frozenset({"s2vite_h07_m06_ft", "global_macs057_ft"})
"""Configurations that start from the final checkpoint of the dense run of the same seed (``--finetune``) and
train half the study's epochs: they run after the dense runs, which must be in the same ``--out``."""


def run_epochs(config: str, epochs: int) -> int:
    """The epochs a configuration trains in a study of ``epochs``: half for a fine-tuning one (``FROM_DENSE``)."""
    return max(1, epochs // 2) if config in FROM_DENSE else epochs

# Inference protocol for the trained models: DIGITS-sized random input, one thread on the process CPU clock (the
# runs share the machine), every model timed interleaved with the others, median of the repeats.
THROUGHPUT = dict(batch_size=256, num_warm_iter=5, num_bench_iter=5, min_bench_seconds=0.5, repeats=3)


def finished_row(config: str, seed: int, run_dir: Path, epochs: int, train_seconds: float | None = None
                 ) -> dict[str, Any]:
    """The study row of a run that finished ``epochs`` epochs, from its log.txt: the final epoch's top-1 and density."""
    logged = [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines() if '"epoch"' in line]
    if not logged or logged[-1]["epoch"] != epochs - 1:
        raise ValueError(f"{run_dir} did not finish {epochs} epochs; train it first (without --measure-only)")
    last = logged[-1]
    return {"config": config, "seed": seed, "test_acc1": last["test_acc1"], "density": last.get("density", 1.0),
            "train_seconds": train_seconds, "run_dir": str(run_dir)}


def run_one(config: str, seed: int, out: Path, epochs: int = EPOCHS) -> dict[str, Any]:
    """Train one (configuration, seed) in its own process and return its final-epoch record."""
    run_dir = out / "runs" / f"{config}_seed{seed}"
    start_from: tuple[str, ...] = ()
    if config in FROM_DENSE:
        dense = out / "runs" / f"dense_seed{seed}" / "checkpoint.pth"
        if not dense.exists():
            raise RuntimeError(f"{config} fine-tunes the dense run of seed {seed}, and {dense} does not exist: "
                               f"include dense in --configs (with --seeds {seed}) or train it first into {out}")
        start_from = ("--finetune", str(dense))
    epochs = run_epochs(config, epochs)
    shutil.rmtree(run_dir, ignore_errors=True)  # a study re-run trains afresh; main.py refuses to overwrite a run
    cmd = [sys.executable, str(ROOT / "main.py"), *BASE, "--epochs", str(epochs), *CONFIGS[config], *start_from,
           "--seed", str(seed), "--output_dir", str(run_dir)]
    env_vars = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env_vars, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{config} seed {seed} failed:\n{proc.stderr[-2000:]}")
    row = finished_row(config, seed, run_dir, epochs, round(time.perf_counter() - start, 1))
    print(f"{config} seed {seed}: top-1 {row['test_acc1']:.2f} in {row['train_seconds']:.0f} s", flush=True)
    return row


def deployed_model(run_dir: Path) -> nn.Module:
    """The model a run ships, in eval mode: `compact.pth` (physically pruned) for structured runs, else the final
    checkpoint's weights in the architecture its flags describe (token selectors included, masked weights zero)."""
    if (run_dir / "compact.pth").exists():
        return interop.load_compact(run_dir / "compact.pth").eval()
    ckpt = load_checkpoint(run_dir / "checkpoint.pth")
    args = argparse.Namespace(**ckpt["args"])
    model = models.create_model(args.model, num_classes=ckpt["model"]["head.weight"].shape[0], img_size=args.input_size)
    models.apply_token_selection(model, models.TokenConfig.from_args(args))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def measure_models(rows: list[dict[str, Any]]) -> None:
    """Add parameter counts, MACs (millions per image) and inference samples/s to every run's row, in place."""
    torch.set_num_threads(1)
    device = torch.device("cpu")
    nets = {row["run_dir"]: deployed_model(Path(row["run_dir"])) for row in rows}
    for row in rows:
        macs = models.mac_summary(nets[row["run_dir"]])
        row.update(params=int(macs["params"]), params_nonzero=int(macs["params_nonzero"]),
                   mmacs_theoretical=round(macs["gmacs_theoretical"] * 1e3, 4),
                   mmacs_executed=round(macs["gmacs_executed"] * 1e3, 4))
    net = next(iter(nets.values()))
    img_size = net.patch_embed.img_size[0]
    images = steps.random_batch(THROUGHPUT["batch_size"], img_size, 1, device)[0]
    runs = {key: steps.inference_run(model, images, device, None) for key, model in nets.items()}
    timings = measure(runs, clock=time.process_time, **THROUGHPUT)
    for row in rows:
        row["samples_per_sec"] = round(timings[row["run_dir"]].samples_per_sec, 1)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration, in CONFIGS order: mean ± std top-1, its paired difference to dense (configuration − dense,
    seed by seed, with a 95% interval), mean counts, median samples/s."""
    summary = []
    for config in CONFIGS:
        runs = [r for r in rows if r["config"] == config]
        if not runs:
            continue
        accs = [float(r["test_acc1"]) for r in runs]
        s = {"config": config, "flags": " ".join(CONFIGS[config]) or "(dense)", "seeds": len(runs),
             "mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
        for key in ("params", "params_nonzero", "mmacs_theoretical", "mmacs_executed"):
            s[key] = statistics.fmean(float(r[key]) for r in runs)
        # Rows appended from another session carry no samples/s: throughput is compared within one session only.
        rates = [float(r["samples_per_sec"]) for r in runs if r["samples_per_sec"] not in ("", None)]
        s["samples_per_sec"] = statistics.median(rates) if rates else None
        summary.append(s)
    dense = next((s for s in summary if s["config"] == "dense"), None)
    for s in summary:
        s["delta_vs_dense"] = None if dense is None else paired_gap(by_seed(rows, s["config"]), by_seed(rows, "dense"))
        s["speedup"] = (None if dense is None or s["samples_per_sec"] is None
                        else s["samples_per_sec"] / dense["samples_per_sec"])
        s["mac_ratio"] = None if dense is None else dense["mmacs_executed"] / s["mmacs_executed"]
    return summary


def table(summary: list[dict[str, Any]]) -> list[str]:
    """The markdown table of a summary."""
    lines = [f"| configuration | seeds | top-1 (mean ± std) | {report.DELTA_VS_DENSE}, paired by seed [95% interval] | "
             "params (non-zero / all) | "
             "MMACs theoretical | MMACs executed | samples/s (batch 256) | speedup vs dense (/ MAC ratio) | flags |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        delta = "" if s["delta_vs_dense"] is None or s["config"] == "dense" else s["delta_vs_dense"].text()
        speed = "" if s["speedup"] is None else f"{s['speedup']:.2f}× ({s['speedup'] / s['mac_ratio']:.2f})"
        rate = "-" if s["samples_per_sec"] is None else f"{s['samples_per_sec']:,.0f}"
        lines.append(f"| {s['config']} | {s['seeds']} | {s['mean']:.2f} ± {s['std']:.2f} | {delta} | "
                     f"{s['params_nonzero']:,.0f} / {s['params']:,.0f} | {s['mmacs_theoretical']:.3f} | "
                     f"{s['mmacs_executed']:.3f} | {rate} | {speed} | `{s['flags']}` |")
    return lines


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Top-1 (mean ± std over seeds) against MACs per image: theoretical (left) and executed (right)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on the project's machines
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, title in ((axes[0], "mmacs_theoretical", "theoretical MACs (the paper's count)"),
                           (axes[1], "mmacs_executed", "executed MACs (what the code computes)")):
        for s, marker in zip(summary, "os^DvP*Xhp<"):  # masked runs share dense's executed MACs: shapes tell them apart
            ax.errorbar(s[key], s["mean"], yerr=s["std"], fmt=marker, markersize=8, capsize=4, alpha=0.85,
                        label=s["config"])
        ax.set_xlabel(f"{title}, millions per image")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("DIGITS top-1 (%), mean ± std over seeds")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("DIGITS, vit_digits_tiny: accuracy against MACs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(rows: list[dict[str, Any]], out: Path, command: str, wall_seconds: float, load: str,
                  note: str = "") -> None:
    """study.csv, study.md and study.png from measured rows (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    fields = [k for k in rows[0] if k != "run_dir"]
    with open(out / "study.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    info = env.environment(torch.device("cpu"))
    header = [f"- command: `{command}`", *([f"- {note}"] if note else []),
              f"- device {info['device']} ({os.cpu_count()} cores), torch {info['torch']}, timm {info['timm']}, "
              f"python {info['python']}, date {info['date']}",
              f"- wall time {wall_seconds / 60:.1f} min for {len(rows)} runs; load average (1/5/15 min) {load}",
              f"- throughput: random {THROUGHPUT['batch_size']}-image batches at the DIGITS resolution, eval mode, "
              "one thread, process CPU clock, all models interleaved, median of "
              f"{THROUGHPUT['repeats']} repeats (median over seeds); MAC ratio: dense executed MACs / executed MACs"]
    render(rows, header, out)


def render(rows: list[dict[str, Any]], header: list[str], out: Path) -> None:
    """study.md (``header`` lines, then the summary table) and study.png from the runs' rows."""
    summary = summarize(rows)
    lines = [*header, "", *table(summary)]
    (out / "study.md").write_text("\n".join(lines) + "\n")
    plot(summary, out / "study.png")
    print("\n".join(lines))


def rerender(out: Path) -> None:
    """Rewrite study.md and study.png from the recorded study.csv, keeping study.md's header lines (command,
    machine, wall time, protocol)."""
    with open(out / "study.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    header = [line for line in (out / "study.md").read_text().splitlines() if line.startswith("- ")]
    render(rows, header, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="epochs per run (fewer only for a smoke run)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one core each)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "study")
    parser.add_argument("--measure-only", action="store_true",
                        help="train nothing: measure and tabulate the finished runs of --configs x --seeds in --out/runs "
                             "(e.g. after training the configurations in several invocations)")
    parser.add_argument("--note", default="", help="one more line for study.md's header (e.g. how the runs that "
                                                   "--measure-only tabulates were trained)")
    parser.add_argument("--from-csv", action="store_true",
                        help="train nothing: rewrite study.md and study.png from the study.csv in --out")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.from_csv:
        rerender(args.out)
        return
    start = time.perf_counter()
    load_before = "{:.2f}/{:.2f}/{:.2f}".format(*os.getloadavg())
    jobs = [(c, s) for c in args.configs for s in args.seeds]
    if args.measure_only:
        rows = [finished_row(c, s, args.out / "runs" / f"{c}_seed{s}", run_epochs(c, args.epochs)) for c, s in jobs
                if (args.out / "runs" / f"{c}_seed{s}" / "log.txt").exists()]
    else:
        rows = []
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # the dense runs first: FROM_DENSE starts from them
            for stage in ([j for j in jobs if j[0] not in FROM_DENSE], [j for j in jobs if j[0] in FROM_DENSE]):
                rows += list(pool.map(lambda job: run_one(*job, args.out, args.epochs), stage))
    measure_models(rows)
    load = "{} at the start, {:.2f}/{:.2f}/{:.2f} at the end".format(load_before, *os.getloadavg())
    write_outputs(rows, args.out, shlex.join(["python", "benchmarks/study.py", *argv]),
                  time.perf_counter() - start, load, args.note)


if __name__ == "__main__":
    main()
