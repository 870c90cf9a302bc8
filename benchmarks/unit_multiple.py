"""The unit-multiple sweep: compact S²ViTE models whose MLP widths are multiples of N, timed against dense.

    nice -n 5 python benchmarks/unit_multiple.py          # DeiT-S and DeiT-B, CPU, float32 eager, 1 thread, batch 8
    python benchmarks/unit_multiple.py --device cuda --batch-size 256 --precision amp_bf16

Every model is built at the original's "40%" setting (0.7 of the heads, 0.6 of the MLP neurons) once per multiple
in `modes.UNIT_MULTIPLES` (the `compact_m<N>` benchmark modes) and timed interleaved with the dense model by the
harness of `run.py` (`run.bench_one`). The table gives, per multiple, the MLP width every block keeps, the MAC ratio
to dense, the measured speedup and the speedup ÷ MAC ratio (1 = the MAC saving fully turned into speed), and
marks the multiple the default `--unit-multiple` gives. Writes `benchmarks/results/<device>-unit-multiple.csv` (the
harness's columns) and `.md`.

    python benchmarks/unit_multiple.py --from-csv      # rewrite the .md from the recorded .csv (measures nothing)
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/unit_multiple.py` puts benchmarks/, not the repo root, first

import torch  # noqa: E402

import models  # noqa: E402
from benchmarks import env, report, run  # noqa: E402
from benchmarks.modes import UNIT_MULTIPLES  # noqa: E402
from sparselearning import SparsityConfig  # noqa: E402
from sparselearning.units import kept_count, resolve_multiple  # noqa: E402

OTHER_DENSITY = 0.6
"""The MLP density of the compact modes (the original's "40%" S²ViTE setting)."""
MODELS = ("deit_small_patch16_224", "deit_base_patch16_224")


def mode_multiple(mode: str) -> int:
    """N of a ``compact_m<N>`` mode."""
    return int(mode.removeprefix("compact_m"))


def mlp_hidden(model: str) -> int:
    """The MLP width of every block of the dense ``model``."""
    return models.create_model(model).blocks[0].mlp.fc1.out_features


def default_multiple(hidden: int) -> int:
    """The multiple the default ``--unit-multiple`` gives an MLP of ``hidden`` neurons."""
    return resolve_multiple(SparsityConfig().unit_multiple, hidden)


def summary_table(rows: list[report.Row], hidden: int) -> list[str]:
    """Per multiple: MLP width kept, parameters, MAC ratio, speedup against dense (min-max over repeats) and speedup
    ÷ MAC ratio; the multiple the default gives this width is marked."""
    lines = ["| --unit-multiple | MLP width per block | params (M) | MAC ratio | speedup vs dense (min–max) | "
             "speedup ÷ MAC ratio |", "|---|---|---|---|---|---|"]
    default = default_multiple(hidden)
    for r in rows:
        if r["mode"] == "dense":
            continue
        n = mode_multiple(r["mode"])
        speedup, mac_ratio = float(r["infer_ratio"]), float(r["mac_ratio"])
        label = f"{n} (default)" if n == default else str(n)
        lines.append(f"| {label} | {kept_count(hidden, OTHER_DENSITY, n):,} of {hidden:,} | {r['param_count']} | "
                     f"{mac_ratio:.4f} | {speedup:.3f}× ({float(r['infer_ratio_min']):.3f}–"
                     f"{float(r['infer_ratio_max']):.3f}) | {speedup / mac_ratio:.3f} |")
    return lines


def markdown(rows: list[report.Row], command: str) -> str:
    """The harness's header, one summary table per model, then every row in detail."""
    lines = report.header(rows, command)
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        hidden = mlp_hidden(model)
        lines += [f"### {model}: batch {mine[0]['infer_batch_size']}, {mine[0]['precision']}, "
                  f"compile {mine[0]['compile']}; the default --unit-multiple gives {default_multiple(hidden)}",
                  "",
                  *summary_table(mine, hidden), ""]
    return "\n".join(lines + report.detail_table(rows)) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=models.MODEL_NAMES)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="float32", choices=tuple(env.PRECISIONS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds; the median is reported")
    parser.add_argument("--min-bench-seconds", type=float, default=3.0, help="length of one timed loop, at least")
    parser.add_argument("--csv", type=Path, default=None,
                        help="default benchmarks/results/<device>-unit-multiple.csv, the markdown next to it")
    parser.add_argument("--from-csv", action="store_true",
                        help="measure nothing: rewrite the markdown from --csv, keeping its recorded command")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the sweep described by ``argv``; returns the CSV path."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
    csv_path = args.csv or run.RESULTS / f"{env.device_slug(device)}-unit-multiple.csv"
    if args.from_csv:
        command = csv_path.with_suffix(".md").read_text().splitlines()[0].removeprefix("- command: `").rstrip("`")
        csv_path.with_suffix(".md").write_text(markdown(report.write_csv([], csv_path, append=True), command))
        return csv_path
    cpu = device.type == "cpu"
    # run.py's options for one setting: eager, inference only, the CPU suite's clock and thread count on CPU.
    bench = run.resolve(run.get_args_parser().parse_args([
        "--modes", *(f"compact_m{n}" for n in UNIT_MULTIPLES), "--reference", "dense", "--bench", "infer",
        "--num-warm-iter", "1", "--warm-seconds", "0", "--num-bench-iter", "1",
        "--min-bench-seconds", str(args.min_bench_seconds), "--repeats", str(args.repeats),
        "--clock", "cpu" if cpu else "wall"]), device)
    if cpu:
        torch.set_num_threads(1)
    reason = env.precision_unsupported_reason(device, args.precision)
    if reason:
        raise SystemExit(f"error: {args.precision} on {device}: {reason}")
    rows: list[report.Row] = []
    for model in args.models:
        bench.model = model
        rows += run.bench_one(bench, device, args.batch_size, args.precision, False)
    all_rows = report.write_csv(rows, csv_path)
    text = markdown(all_rows, shlex.join(["python", "benchmarks/unit_multiple.py", *argv]))
    csv_path.with_suffix(".md").write_text(text)
    print("\n" + text)
    print(f"wrote {csv_path} and {csv_path.with_suffix('.md')}")
    return csv_path


if __name__ == "__main__":
    main()
