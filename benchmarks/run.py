"""Inference and training throughput of a named model, per benchmark mode, against a reference mode.

    python benchmarks/run.py --suite                # the benchmark suite: every sparsity kind, batch 1 and large,
                                                    # float32 / TF32 / AMP, eager and compiled (what the device runs)
    python benchmarks/run.py --model deit_small_patch16_224 --batch-size 32 64
    python benchmarks/run.py --model deit_tiny_patch16_224 --batch-size 1 256 --bench infer --compile
    python benchmarks/run.py --modes dense --precision float32 amp_bf16 --device cpu --threads 2 --repeats 3

Every selected mode is measured interleaved with the reference (default `timm`: the bare timm model and a plain
training loop with the same optimizer; the suite uses `dense`), so the speedups come from one run and are robust to
machine noise. Rows go to a CSV in timm's benchmark columns plus a markdown table next to it, and are printed.

`--suite` fills every option not given on the command line from `suite_defaults(device)`: DeiT-Small at batch 1
and 256 with the protocol's 50 timed steps on CUDA; on CPU batch 1 and 32, one thread timed on the process CPU
clock, at least 3 s per timed loop, which takes about a quarter of an hour. Options given explicitly always win.
"""
from __future__ import annotations

import argparse
import gc
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/run.py` puts benchmarks/, not the repo root, on the path

import torch  # noqa: E402

import models  # noqa: E402
from benchmarks import env, report, steps  # noqa: E402
from benchmarks.modes import MODES, REFERENCE_MODE  # noqa: E402
from benchmarks.timing import measure, median_ratio  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# "cpu" counts only the CPU time this process was given, so other jobs on a shared machine do not inflate
# the step time; it needs one thread, since time other threads spend spinning would count too.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


SUITE_MODES = ["dense", "masked50", "compact", "compact_aligned", "drop70", "compact+drop70", "tome-r13",
               "tome-mac70"]

# The plain defaults; every option left as None by the parser is filled from here or, with --suite, from the suite's.
DEFAULTS = dict(model="deit_small_patch16_224", modes=["dense"], reference=REFERENCE_MODE, bench="both",
                batch_size=[256], precision=["float32"], compile=False, num_warm_iter=10, warm_seconds=2.0,
                num_bench_iter=40, min_bench_seconds=0.0, repeats=5, threads=None, clock="wall")


def suite_defaults(device: torch.device) -> dict[str, object]:
    """The suite: dense, masked unstructured, compact structured (the paper's unit counts, and the MLP widths of the
    default ``--unit-multiple``), token drop, compact + drop and token merging (ToMe's r = 13, and the r at drop70's
    MACs), one protocol.

    Inference only (the training step is its own table), speedups against the project's dense model, every
    precision and torch.compile (those the device cannot run are skipped with a note). On CUDA: DeiT-Small at
    batch 1 and 256, 20 warm-up and at least 50 timed steps, 3 repeats, wall clock. On CPU the same model at
    batch 1 and 32 (a CPU is saturated long before 256), 1 warm-up step (which compiles) plus the calibration
    step, and timed loops of at least 3 s, since the protocol's 50 steps would take minutes per mode there. The
    CPU suite runs one thread on the process CPU-time clock: this project's CPU machines are shared, and wall
    time on a shared machine measures the neighbours as much as the model.
    """
    common = dict(model="deit_small_patch16_224", modes=SUITE_MODES, reference="dense", bench="infer",
                  precision=list(env.PRECISIONS), compile=True, repeats=3)
    if device.type == "cuda":
        return common | dict(batch_size=[1, 256], num_warm_iter=20, warm_seconds=2.0, num_bench_iter=50,
                             min_bench_seconds=1.0, threads=None, clock="wall")
    return common | dict(batch_size=[1, 32], num_warm_iter=1, warm_seconds=0.0, num_bench_iter=1,
                         min_bench_seconds=3.0, threads=1, clock="cpu")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("SViTE throughput benchmark", add_help=True)
    d = DEFAULTS
    parser.add_argument("--suite", action="store_true",
                        help="the benchmark suite (see suite_defaults); explicit options override its settings")
    parser.add_argument("--model", default=None, choices=models.MODEL_NAMES, help=f"default {d['model']}")
    parser.add_argument("--modes", nargs="+", default=None, choices=sorted(MODES),
                        help=f"modes to measure (default {d['modes']}); the reference is always added")
    parser.add_argument("--reference", default=None, choices=sorted(MODES),
                        help=f"the mode every ratio is taken against (default {d['reference']}; suite: dense)")
    parser.add_argument("--bench", default=None, choices=("infer", "train", "both"), help=f"default {d['bench']}")
    parser.add_argument("--batch-size", nargs="+", type=int, default=None, help=f"default {d['batch_size']}")
    parser.add_argument("--img-size", type=int, default=None, help="default: the resolution the model is built for")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", nargs="+", default=None, choices=tuple(env.PRECISIONS),
                        help=f"default {d['precision']}; precisions the device has no native kernels for (TF32 and "
                             "fp16 on most CPUs) are skipped with a note")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="add torch.compile (inductor) rows where supported (default: off; suite: on)")
    parser.add_argument("--num-warm-iter", type=int, default=None, help=f"default {d['num_warm_iter']}")
    parser.add_argument("--warm-seconds", type=float, default=None,
                        help=f"keep warming up until this much time passed (default {d['warm_seconds']})")
    parser.add_argument("--num-bench-iter", type=int, default=None,
                        help=f"timed steps per repeat, at least (default {d['num_bench_iter']})")
    parser.add_argument("--min-bench-seconds", type=float, default=None,
                        help="time more steps where needed so each timed loop lasts this long "
                             f"(default {d['min_bench_seconds']})")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"interleaved timed rounds; the median is reported (default {d['repeats']})")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for CPU runs (default: torch's; CPU suite: 1)")
    parser.add_argument("--clock", default=None, choices=tuple(CLOCKS),
                        help="wall: perf_counter; cpu: this process's CPU time (CPU device, --threads 1) "
                             "(default wall; CPU suite: cpu)")
    parser.add_argument("--csv", type=Path, default=None,
                        help="output CSV, markdown next to it; default benchmarks/results/<device>-<date>[-tag].csv, "
                             "with --suite benchmarks/results/<device>-suite.csv")
    parser.add_argument("--tag", default="", help="suffix of the default CSV name, e.g. the issue it belongs to")
    parser.add_argument("--append", action="store_true", help="add rows to an existing CSV instead of replacing it")
    return parser


def resolve(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Fill the options the command line left unset from the suite's or the plain defaults."""
    defaults = suite_defaults(device) if args.suite else DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def bench_one(args: argparse.Namespace, device: torch.device, batch_size: int, precision: str,
              compiled: bool) -> list[report.Row]:
    """All modes at one batch size, precision and compile setting; one row per mode."""
    amp_dtype = env.PRECISIONS[precision]
    img_size = args.img_size or models.default_img_size(args.model)
    ref = args.reference
    names = [ref] + [m for m in dict.fromkeys(args.modes) if m != ref]
    setups = {m: MODES[m](args.model, img_size=img_size, batch_size=batch_size, device=device, amp_dtype=amp_dtype)
              for m in names}
    if compiled:  # every setting compiles from scratch, so none inherits another's graphs or dynamic-shape choices
        torch._dynamo.reset()
    # Static shapes: a mode compiled after another of other widths must not get slower dynamic-shape kernels.
    forwards = {m: torch.compile(s.model, dynamic=False) if compiled else s.model for m, s in setups.items()}
    batch = steps.random_batch(batch_size, img_size, setups[ref].model.num_classes, device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    label = f"{args.model} batch {batch_size} {precision}{' compiled' if compiled else ''}"
    rows = {m: {"model": args.model, "mode": m, "precision": precision, "compile": compiled, "reference": ref,
                "repeats": args.repeats, "clock": args.clock, "param_count": report.param_count(s.model),
                "infer_gmacs": report.gmacs(s.model), "theoretical_gmacs": report.gmacs(s.model, "theoretical"),
                "attn": report.attention_path(s.model), **env.environment(device)} for m, s in setups.items()}
    for row in rows.values():  # the speedup a perfect kernel would give, to set the measured ratio against
        row["mac_ratio"] = round(rows[ref]["infer_gmacs"] / row["infer_gmacs"], 4)
        row["theoretical_mac_ratio"] = round(rows[ref]["theoretical_gmacs"] / row["theoretical_gmacs"], 4)
    phases = ("infer", "train") if args.bench == "both" else (args.bench,)
    for phase in phases:
        if phase == "infer":
            runs = {m: steps.inference_run(forwards[m], batch[0], device, amp_dtype) for m in names}
        else:
            runs = {m: steps.train_run(setups[m], forwards[m], batch, device, amp_dtype) for m in names}
        print(f"{label}: timing {phase} of {', '.join(names)}", flush=True)
        # A recompile limit hit would fall back to eager silently and report eager speed as compiled: fail instead.
        with env.float32_matmul(device, precision), torch._dynamo.config.patch(recompile_limit=64,
                                                                                fail_on_recompile_limit_hit=True):
            timings = measure(runs, batch_size=batch_size, num_warm_iter=args.num_warm_iter,
                              num_bench_iter=args.num_bench_iter, repeats=args.repeats,
                              warm_seconds=args.warm_seconds, min_bench_seconds=args.min_bench_seconds, sync=sync,
                              clock=CLOCKS[args.clock])
        for m, timing in timings.items():
            ratio = median_ratio(timing, timings[ref])
            rows[m].update(report.phase_columns(phase, timing, timings[ref], img_size))
            print(f"  {m:>8}: {timing.samples_per_sec:9.2f} samples/s ({timing.min_samples_per_sec:.2f}-"
                  f"{timing.max_samples_per_sec:.2f}), {timing.step_ms:9.1f} ms/step, ratio {ratio:.3f}", flush=True)
    del setups, forwards, runs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [{c: row.get(c, "") for c in report.COLUMNS} for row in rows.values()]


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the benchmark described by `argv`; returns the CSV path."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
    resolve(args, device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for but no CUDA device is available; pass --device cpu")
    if args.threads is not None and device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise SystemExit(f"error: --clock cpu times one CPU thread; got device {device} with "
                         f"{torch.get_num_threads()} threads (pass --device cpu --threads 1)")
    compile_settings = [False]
    if args.compile:
        reason = env.compile_unsupported_reason(device)
        if reason:
            print(f"note: no torch.compile rows: {reason}")
        else:
            compile_settings.append(True)
    rows: list[report.Row] = []
    for precision in args.precision:
        reason = env.precision_unsupported_reason(device, precision)
        if reason:
            print(f"note: skipping {precision}: {reason}")
            continue
        for compiled in compile_settings:
            for batch_size in args.batch_size:
                rows += bench_one(args, device, batch_size, precision, compiled)
    if not rows:
        raise SystemExit("error: nothing was measured (every requested precision was skipped)")
    stem = "-".join(part for part in (env.device_slug(device), "suite" if args.suite else str(rows[0]["date"]),
                                      args.tag) if part)
    csv_path = args.csv or RESULTS / f"{stem}.csv"
    all_rows = report.write_csv(rows, csv_path, append=args.append)
    command = shlex.join(["python", "benchmarks/run.py", *argv])
    csv_path.with_suffix(".md").write_text(report.markdown(all_rows, command))
    print("\n" + report.markdown(rows, command))
    print(f"wrote {csv_path} and {csv_path.with_suffix('.md')}")
    return csv_path


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
