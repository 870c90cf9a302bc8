"""Inference and training throughput of a named model, per benchmark mode, against bare timm.

    python benchmarks/run.py --model deit_small_patch16_224 --batch-size 32 64
    python benchmarks/run.py --model deit_tiny_patch16_224 --batch-size 1 256 --bench infer --compile
    python benchmarks/run.py --modes dense --precision float32 amp_bf16 --device cpu --threads 2 --repeats 3

Every selected mode is measured interleaved with the `timm` reference (bare timm model; plain training
loop with the same optimizer), so the ratio columns come from one run and are robust to machine noise.
Rows go to a CSV in timm's benchmark columns plus a markdown table next to it, and are printed.
"""
from __future__ import annotations

import argparse
import gc
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


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("SViTE throughput benchmark", add_help=True)
    parser.add_argument("--model", default="deit_small_patch16_224", choices=models.MODEL_NAMES)
    parser.add_argument("--modes", nargs="+", default=["dense"], choices=sorted(MODES),
                        help=f"modes to measure; the {REFERENCE_MODE!r} reference is always added")
    parser.add_argument("--bench", default="both", choices=("infer", "train", "both"))
    parser.add_argument("--batch-size", nargs="+", type=int, default=[256])
    parser.add_argument("--img-size", type=int, default=None, help="default: the resolution the model is built for")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", nargs="+", default=["float32"], choices=tuple(env.PRECISIONS),
                        help="AMP precisions the device has no native kernels for are skipped with a note")
    parser.add_argument("--compile", action="store_true", help="add torch.compile (inductor) rows where supported")
    parser.add_argument("--num-warm-iter", type=int, default=10)
    parser.add_argument("--warm-seconds", type=float, default=2.0, help="keep warming up until this much time passed")
    parser.add_argument("--num-bench-iter", type=int, default=40, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    parser.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                        help="wall: perf_counter; cpu: this process's CPU time (CPU device, --threads 1)")
    parser.add_argument("--csv", type=Path, default=None,
                        help="output CSV, markdown next to it; default benchmarks/results/<device>-<date>[-tag].csv")
    parser.add_argument("--tag", default="", help="suffix of the default CSV name, e.g. the issue it belongs to")
    parser.add_argument("--append", action="store_true", help="add rows to an existing CSV instead of replacing it")
    return parser


def bench_one(args: argparse.Namespace, device: torch.device, batch_size: int, precision: str,
              compiled: bool) -> list[report.Row]:
    """All modes at one batch size, precision and compile setting; one row per mode."""
    amp_dtype = env.PRECISIONS[precision]
    img_size = args.img_size or models.default_img_size(args.model)
    names = [REFERENCE_MODE] + [m for m in dict.fromkeys(args.modes) if m != REFERENCE_MODE]
    setups = {m: MODES[m](args.model, img_size=img_size, batch_size=batch_size, device=device, amp_dtype=amp_dtype)
              for m in names}
    forwards = {m: torch.compile(s.model) if compiled else s.model for m, s in setups.items()}
    batch = steps.random_batch(batch_size, img_size, setups[REFERENCE_MODE].model.num_classes, device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    label = f"{args.model} batch {batch_size} {precision}{' compiled' if compiled else ''}"
    rows = {m: {"model": args.model, "mode": m, "precision": precision, "compile": compiled,
                "repeats": args.repeats, "clock": args.clock, "param_count": report.param_count(s.model),
                "infer_gmacs": report.gmacs(s.model),
                "attn": report.attention_path(s.model), **env.environment(device)} for m, s in setups.items()}
    for row in rows.values():  # the speedup a perfect kernel would give, to set the measured ratio against
        row["mac_ratio"] = round(rows[REFERENCE_MODE]["infer_gmacs"] / row["infer_gmacs"], 4)
    phases = ("infer", "train") if args.bench == "both" else (args.bench,)
    for phase in phases:
        if phase == "infer":
            runs = {m: steps.inference_run(forwards[m], batch[0], device, amp_dtype) for m in names}
        else:
            runs = {m: steps.train_run(setups[m], forwards[m], batch, device, amp_dtype) for m in names}
        print(f"{label}: timing {phase} of {', '.join(names)}", flush=True)
        timings = measure(runs, batch_size=batch_size, num_warm_iter=args.num_warm_iter,
                          num_bench_iter=args.num_bench_iter, repeats=args.repeats, warm_seconds=args.warm_seconds,
                          sync=sync, clock=CLOCKS[args.clock])
        for m, timing in timings.items():
            ratio = median_ratio(timing, timings[REFERENCE_MODE])
            rows[m].update(report.phase_columns(phase, timing, timings[REFERENCE_MODE], img_size))
            print(f"  {m:>8}: {timing.samples_per_sec:9.2f} samples/s ({timing.min_samples_per_sec:.2f}-"
                  f"{timing.max_samples_per_sec:.2f}), {timing.step_ms:9.1f} ms/step, ratio {ratio:.3f}", flush=True)
    del setups, forwards, runs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [{c: row.get(c, "") for c in report.COLUMNS} for row in rows.values()]


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the benchmark described by `argv`; returns the CSV path."""
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
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
        reason = env.amp_unsupported_reason(device, env.PRECISIONS[precision])
        if reason:
            print(f"note: skipping {precision}: {reason}")
            continue
        for compiled in compile_settings:
            for batch_size in args.batch_size:
                rows += bench_one(args, device, batch_size, precision, compiled)
    if not rows:
        raise SystemExit("error: nothing was measured (every requested precision was skipped)")
    stem = "-".join(part for part in (env.device_slug(device), str(rows[0]["date"]), args.tag) if part)
    csv_path = args.csv or RESULTS / f"{stem}.csv"
    all_rows = report.write_csv(rows, csv_path, append=args.append)
    csv_path.with_suffix(".md").write_text(report.markdown(all_rows))
    print("\n" + report.markdown(rows))
    print(f"wrote {csv_path} and {csv_path.with_suffix('.md')}")
    return csv_path


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
