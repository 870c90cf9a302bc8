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

Post-hoc configurations (`POSTHOC`) train nothing either: each seed's finished run of their source configuration is
evaluated again with token merging (`checkpoint_tool.py --eval --tome-r ...`), after the training runs are done.
`--append-to DIR` adds the rows of this invocation to DIR's study.csv (a (configuration, seed) it already holds must
have the same top-1, and keeps its recorded row) and re-renders DIR's study.md and study.png.
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
# N:M 2:4 in the blocks' linears (qkv, proj, fc1, fc2; patch embedding and head dense): SR-STE as in its paper (the
# mask recomputed from the dense weights at every step of the run), and SViTE's prune-and-regrow within each group
# of 4 on SViTE's schedule.
NM24 = ("--sparse_init", "nm", "--nm", "2:4")
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
    "nm24_srste": (*NM24, "--nm-method", "srste", "--update_frequency", "1", "--t_end", "1"),
    "nm24_dst": (*NM24, "--nm-method", "dst", "--growth", "gradient", "--death", "magnitude", "--update_frequency",
                 "25"),
    "s2vite_h07_m06_ft": (*S2VITE, *EXACT_UNITS, "--mask-init", "magnitude"),
    "global_macs057_ft": GLOBAL_AT_S2VITE_MACS,
}
# Token merging (ToMe) at sviteplus_keep07's executed MACs: the r per block `models.merges_for_macs` finds for
# vit_digits_tiny (2.456 against 2.484 MMACs; a test keeps the two in step).
TOME_KEEP07_R = (3, 2, 2, 2)
CONFIGS["tome_keep07"] = ("--token-mode", "merge", "--tome-r", *map(str, TOME_KEEP07_R))

# Configurations that train nothing: (the configuration whose finished runs they evaluate, the r per block).
POSTHOC: dict[str, tuple[str, tuple[int, ...]]] = {
    "dense+tome_keep07": ("dense", TOME_KEEP07_R),
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


def posthoc_row(config: str, seed: int, run_dir: Path) -> dict[str, Any]:
    """The study row of a post-hoc evaluation, from the posthoc.json ``evaluate_posthoc`` wrote."""
    path = run_dir / "posthoc.json"
    if not path.exists():
        raise ValueError(f"{run_dir} has no post-hoc evaluation; run it first (without --measure-only)")
    info = json.loads(path.read_text())
    return {"config": config, "seed": seed, "test_acc1": info["test_acc1"], "density": 1.0, "train_seconds": 0.0,
            "run_dir": str(run_dir)}


def evaluate_posthoc(config: str, seed: int, out: Path, epochs: int = EPOCHS) -> dict[str, Any]:
    """Evaluate the finished run of ``POSTHOC[config]``'s source configuration with token merging, no training,
    through checkpoint_tool.py (in this process: an evaluation draws no random numbers)."""
    import checkpoint_tool

    source, merges = POSTHOC[config]
    source_dir = out / "runs" / f"{source}_seed{seed}"
    finished_row(source, seed, source_dir, epochs)  # the source run must have finished
    flags = ["--eval", "--resume", str(source_dir / "checkpoint.pth"), "--model", BASE[1], "--data-set", "DIGITS",
             "--batch-size", "64", "--num_workers", "0", "--no-pin-mem", "--tome-r", *map(str, merges)]
    torch.set_num_threads(1)
    stats = checkpoint_tool.main(checkpoint_tool.get_args_parser().parse_args(flags))
    run_dir = out / "runs" / f"{config}_seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "posthoc.json").write_text(json.dumps({"source": str(source_dir), "tome_r": list(merges),
                                                      "test_acc1": stats["test_acc1"], "command": flags}))
    print(f"{config} seed {seed}: top-1 {stats['test_acc1']:.2f} (no training)", flush=True)
    return posthoc_row(config, seed, run_dir)


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
    checkpoint's weights in the architecture its flags describe (token selectors and merging included, masked weights
    zero); for a post-hoc row, its source run's model with the merging it was evaluated with."""
    if (run_dir / "posthoc.json").exists():
        info = json.loads((run_dir / "posthoc.json").read_text())
        model = deployed_model(Path(info["source"]))
        models.apply_token_merging(model, models.MergeConfig(r=tuple(info["tome_r"])))
        return model
    if (run_dir / "compact.pth").exists():
        return interop.load_compact(run_dir / "compact.pth").eval()
    ckpt = load_checkpoint(run_dir / "checkpoint.pth")
    args = argparse.Namespace(**ckpt["args"])
    model = models.create_model(args.model, num_classes=ckpt["model"]["head.weight"].shape[0], img_size=args.input_size)
    models.apply_token_selection(model, models.TokenConfig.from_args(args))
    models.apply_token_merging(model, models.MergeConfig.recorded(ckpt["args"]))
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
    for config in [*CONFIGS, *POSTHOC]:
        runs = [r for r in rows if r["config"] == config]
        if not runs:
            continue
        accs = [float(r["test_acc1"]) for r in runs]
        s = {"config": config, "flags": flags_text(config), "seeds": len(runs),
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
        s["speedup"] = (None if dense is None or None in (s["samples_per_sec"], dense["samples_per_sec"])
                        else s["samples_per_sec"] / dense["samples_per_sec"])
        s["mac_ratio"] = None if dense is None else dense["mmacs_executed"] / s["mmacs_executed"]
    return summary


def flags_text(config: str) -> str:
    """What a configuration runs, for the tables."""
    if config in POSTHOC:
        source, merges = POSTHOC[config]
        return f"no training: {source}'s checkpoints evaluated with --tome-r {' '.join(map(str, merges))}"
    return " ".join(CONFIGS[config]) or "(dense)"


def append_to(rows: list[dict[str, Any]], target: Path, command: str) -> list[str]:
    """Add ``rows`` to ``target``/study.csv and re-render its study.md and study.png (see the module docstring).

    A (configuration, seed) the file already holds keeps its recorded row; where the re-trained top-1 differs, the
    numerics of that configuration changed since it was recorded, and study.md's header says so, run by run.

    Returns:
        The differing runs, as "config seed s: recorded a, now b" (also printed).
    """
    with open(target / "study.csv", newline="") as f:
        old = list(csv.DictReader(f))
    recorded = {(r["config"], int(r["seed"])): float(r["test_acc1"]) for r in old}
    changed = [f"{row['config']} seed {row['seed']}: recorded {recorded[key]:.2f}, now {float(row['test_acc1']):.2f}"
               for row in rows if (key := (row["config"], int(row["seed"]))) in recorded
               and abs(recorded[key] - float(row["test_acc1"])) > 1e-9]
    # Samples/s from another invocation are not comparable with the file's: the appended rows leave them out.
    new = [{**r, "samples_per_sec": ""} for r in rows if (r["config"], int(r["seed"])) not in recorded]
    fields = list(old[0])
    with open(target / "study.csv", "a", newline="") as f:
        csv.DictWriter(f, fieldnames=fields, extrasaction="ignore").writerows(new)
    header = [line for line in (target / "study.md").read_text().splitlines() if line.startswith("- ")]
    same = len(rows) - len(new) - len(changed)
    header.append(f"- appended {len(new)} rows by `{command}` on {env.environment(torch.device('cpu'))['date']} "
                  "(without samples/s: theirs were timed with that invocation's runs, not with the rows above); of "
                  f"the runs it re-trained, kept as recorded, {same} reproduced their top-1 exactly"
                  + (f" and {len(changed)} did not: {'; '.join(changed)}" if changed else ""))
    rerender(target, header)
    for line in changed:
        print(f"WARNING: re-trained run differs from its recorded row: {line}")
    return changed


def table(summary: list[dict[str, Any]]) -> list[str]:
    """The markdown table of a summary."""
    lines = [f"| configuration | seeds | top-1 (mean ± std) | {report.DELTA_VS_DENSE}, paired by seed [95% interval] | "
             "params (non-zero / all) | "
             "MMACs theoretical | MMACs executed | samples/s (batch 256) | speedup vs dense (/ MAC ratio) | flags |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        delta = "" if s["delta_vs_dense"] is None or s["config"] == "dense" else s["delta_vs_dense"].text()
        speed = "" if s["speedup"] is None else f"{s['speedup']:.2f}× ({s['speedup'] / s['mac_ratio']:.2f})"
        samples = "see note" if s["samples_per_sec"] is None else f"{s['samples_per_sec']:,.0f}"
        lines.append(f"| {s['config']} | {s['seeds']} | {s['mean']:.2f} ± {s['std']:.2f} | {delta} | "
                     f"{s['params_nonzero']:,.0f} / {s['params']:,.0f} | {s['mmacs_theoretical']:.3f} | "
                     f"{s['mmacs_executed']:.3f} | {samples} | {speed} | `{s['flags']}` |")
    return lines


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Top-1 (mean ± std over seeds) against MACs per image: theoretical (left) and executed (right)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on the project's machines
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, title in ((axes[0], "mmacs_theoretical", "theoretical MACs (the paper's count)"),
                           (axes[1], "mmacs_executed", "executed MACs (what the code computes)")):
        # Masked runs share dense's executed MACs: shapes tell them apart.
        for s, marker in zip(summary, "os^DvP*Xhp<>8H"):
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


def rerender(out: Path, header: list[str] | None = None) -> None:
    """Rewrite study.md and study.png from the recorded study.csv, keeping study.md's header lines (command,
    machine, wall time, protocol) unless ``header`` replaces them."""
    with open(out / "study.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if header is None:
        header = [line for line in (out / "study.md").read_text().splitlines() if line.startswith("- ")]
    render(rows, header, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=[*CONFIGS, *POSTHOC],
                        help="configurations to train (or, for a post-hoc one, to evaluate); default: every trained "
                             "one")
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
    parser.add_argument("--append-to", type=Path, default=None, metavar="DIR",
                        help="also add this invocation's rows (with --from-csv: those of --out/study.csv) to "
                             "DIR/study.csv and re-render DIR/study.md")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.from_csv:
        rerender(args.out)
        if args.append_to is not None:
            with open(args.out / "study.csv", newline="") as f:
                append_to(list(csv.DictReader(f)), args.append_to, shlex.join(["python", "benchmarks/study.py", *argv]))
        return
    start = time.perf_counter()
    load_before = "{:.2f}/{:.2f}/{:.2f}".format(*os.getloadavg())
    jobs = [(c, s) for c in args.configs if c in CONFIGS for s in args.seeds]
    posthoc = [(c, s) for c in args.configs if c in POSTHOC for s in args.seeds]
    if args.measure_only:
        rows = [finished_row(c, s, args.out / "runs" / f"{c}_seed{s}", run_epochs(c, args.epochs)) for c, s in jobs
                if (args.out / "runs" / f"{c}_seed{s}" / "log.txt").exists()]
        rows += [posthoc_row(c, s, args.out / "runs" / f"{c}_seed{s}") for c, s in posthoc
                 if (args.out / "runs" / f"{c}_seed{s}" / "posthoc.json").exists()]
    else:
        rows = []
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # the dense runs first: FROM_DENSE starts from them
            for stage in ([j for j in jobs if j[0] not in FROM_DENSE], [j for j in jobs if j[0] in FROM_DENSE]):
                rows += list(pool.map(lambda job: run_one(*job, args.out, args.epochs), stage))
        rows += [evaluate_posthoc(c, s, args.out, args.epochs) for c, s in posthoc]  # after their sources trained
    measure_models(rows)
    load = "{} at the start, {:.2f}/{:.2f}/{:.2f} at the end".format(load_before, *os.getloadavg())
    command = shlex.join(["python", "benchmarks/study.py", *argv])
    write_outputs(rows, args.out, command, time.perf_counter() - start, load, args.note)
    if args.append_to is not None:
        append_to(rows, args.append_to, command)


if __name__ == "__main__":
    main()
