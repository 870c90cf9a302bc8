"""Global pruning at NViT-B's budget on DeiT-B shapes (random weights): the MAC-only and the latency-aware
architectures from the same scores, compacted and timed against dense and against the device's latency range at
equal MACs.

    nice -n 5 env OMP_NUM_THREADS=1 python benchmarks/global_pruning.py    # CPU, float32 eager, 1 thread, batch 8

The global scores (``sparselearning.global_pruning.TaylorWindow``: squared, type-normalised Taylor sums) are
collected once, from ``--score-batches`` random batches of ``--score-batch-size`` random 224-px images and labels
through the randomly initialised model. From those same scores the pruning schedule of ``--pruning_type global``
(``select_removals``, ``--prune-units`` units per step, MLP neurons and embedding channels in removals of the
default ``--unit-multiple``) is replayed down to ``--target-macs`` of the dense MACs (NViT-B's 6.8 of DeiT-B's 17.6
GMACs) three times: by the scores alone (MAC-only); latency-aware as ``--latency-lambda`` ranks under a MAC budget,
each removal's score minus λ × the ms it saves by the ``--latency-table`` beyond the model's average ms per MAC; and
with NViT's penalty, λ × the ms saved (what a latency budget uses). The scores of a random model measure nothing
about accuracy; what the benchmark compares is speed at equal MACs. Two references bound what any criterion can
gain on this device: the fastest and the slowest architecture by the table among those with one width in every
block at the same budget (``uniform_extremes``).

λ (``--latency-lambda``, for the MAC-budget form): by default the balanced value, the median removal score over the
median size of the latency term per λ at the dense counts, so that the two terms weigh alike; NViT's form gets its
own balanced λ the same way. Both are fixed before anything is timed.

The dense model and the compact models are timed interleaved with ``benchmarks.timing.measure`` (float32, one
thread, ``--batch-size`` images, process CPU time, median over ``--repeats``, with a distribution-free 95% interval
of the median paired ratio against MAC-only, ``benchmarks.timing.median_interval``). Writes
``benchmarks/results/<device>-global-pruning.csv`` and ``.md``. With ``--train-repeats N`` it also times a training
step (forward, backward, AdamW) of the dense model, which a masked run's fine-tuning costs at least, against the
MAC-only compact model, which ``--compact-at-budget`` fine-tunes instead (``<device>-global-pruning-train.csv``).
"""
from __future__ import annotations

import argparse
import csv
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/global_pruning.py` puts benchmarks/, not the repo root, first

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import models  # noqa: E402
from benchmarks import env  # noqa: E402
from benchmarks.timing import Timing, median_interval, median_ratio, measure, paired_ratios  # noqa: E402
from sparselearning.global_pruning import (BUDGET_TOLERANCE, GlobalPruning, latency_penalty,  # noqa: E402
                                          removal_savings, select_removals, unit_masks)

MODEL = "deit_base_patch16_224"
NVIT_B_GMACS, DEIT_B_GMACS = 6.8, 17.6
"""NViT-B's budget and DeiT-B's MACs as the paper gives them (docs/paper-numbers.md)."""
TABLE = ROOT / "benchmarks" / "results" / "latency" / "cpu-deit_base_patch16_224-b8.json"
RESULTS = ROOT / "benchmarks" / "results"
COLUMNS = ("criterion", "latency_lambda", "embed_dim", "heads", "mlp_hidden", "gmacs", "mac_ratio", "table_ms",
           "ms_per_batch", "samples_per_sec", "speedup", "speedup_min", "speedup_max", "speedup_per_mac_ratio",
           "vs_mac_only", "vs_mac_only_lo", "vs_mac_only_hi", "vs_mac_only_min", "vs_mac_only_max", "block_heads", "block_mlp_hidden", "batch_size",
           "repeats", "score_batches", "score_batch_size", "device", "threads", "torch", "timm", "python", "date",
           "command")

TRAIN_COLUMNS = ("model", "gmacs", "ms_per_step", "speedup", "speedup_lo", "speedup_hi", "speedup_min", "speedup_max",
                 "batch_size", "train_repeats", "device", "threads", "torch", "timm", "python", "date", "command")


def collect_scores(model: nn.Module, table: Path, target_macs: float, batches: int, batch_size: int,
                   seed: int) -> GlobalPruning:
    """A ``GlobalPruning`` of ``model`` whose score window holds ``batches`` steps of random images and labels (an
    SGD optimizer with lr 0 is stepped, so the weights stay as they are)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    units = models.global_units(model, str(table))
    with warnings.catch_warnings():  # that it never prunes during these steps is the point
        warnings.simplefilter("ignore", UserWarning)
        pruner = GlobalPruning(model, optimizer, units, batches + 1, target_macs=target_macs,
                               prune_every=batches + 1, latency_table=str(table), log_fn=lambda record: None)
    generator = torch.Generator().manual_seed(seed)
    size = model.patch_embed.img_size
    model.train()
    for _ in range(batches):
        x = torch.randn(batch_size, 3, *size, generator=generator)
        y = torch.randint(0, model.num_classes, (batch_size,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return pruner


def balanced_lambda(pruner: GlobalPruning, scores: Mapping[str, torch.Tensor], absolute: bool = False) -> float:
    """The median removal score over the median size of the latency term per λ at the dense counts (``absolute``:
    NViT's ms saved; else the ms saved beyond the model's average ms per MAC, ``latency_penalty``'s MAC-budget form):
    λ at which the score and the latency term weigh alike."""
    counts = {name: int(a.sum()) for name, a in pruner.active.items()}
    macs, latency = pruner.units.macs, pruner.units.latency
    ms_saved = removal_savings(counts, latency, pruner.multiples)
    terms = (latency_penalty(ms_saved, 1.0) if absolute else
             latency_penalty(ms_saved, 1.0, removal_savings(counts, macs, pruner.multiples),
                             latency(counts) / macs(counts)))
    removal_scores, removal_terms = [], []
    for name, score in scores.items():
        n = pruner.multiples[name]
        removal_scores += torch.sort(score.double()).values.reshape(-1, n).sum(1).tolist()
        removal_terms += [abs(terms[name])] * (score.numel() // n)
    term = statistics.median(removal_terms)
    if term <= 0:
        raise SystemExit(f"error: the median removal's latency term is {term:.3g} ms by the latency table, so no "
                         "balanced λ exists; pass --latency-lambda or measure a table on a quieter machine")
    return statistics.median(removal_scores) / term


def prune(pruner: GlobalPruning, scores: Mapping[str, torch.Tensor], prune_units: int, latency_lambda: float,
          absolute: bool = False) -> dict[str, torch.Tensor]:
    """Replay the pruning schedule from every unit to the MAC budget on fixed scores: the kept units per group
    (``absolute``: NViT's form of the latency penalty, as under a latency budget)."""
    active = {name: torch.ones_like(a) for name, a in pruner.active.items()}

    def counts() -> dict[str, int]:
        return {name: int(a.sum()) for name, a in active.items()}

    while pruner.units.macs(counts()) > pruner.budget:
        active = select_removals(scores, active, pruner.multiples, pruner.units.macs, pruner.budget, prune_units,
                                 pruner.units.latency, latency_lambda, absolute_penalty=absolute)
    return active


def uniform_extremes(pruner: GlobalPruning) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The fastest and the slowest architecture by the table among those with the same width in every block (every
    embedding width and head count in the unit multiples, the widest MLP that fits) whose MACs meet the budget within
    its tolerance: timed next to the criteria, they show how much room this device leaves a latency-aware criterion
    at equal MACs. Returned as kept-unit masks (the first units of each group)."""
    dense = {name: a.numel() for name, a in pruner.active.items()}
    kinds = {g.name: g.kind for g in pruner.groups}
    step = {kind: next(pruner.multiples[n] for n, k in kinds.items() if k == kind) for kind in kinds.values()}
    widest = {kind: max(dense[n] for n, k in kinds.items() if k == kind) for kind in kinds.values()}

    def counts(e: int, h: int, m: int) -> dict[str, int]:
        return {n: {"channel": e, "head": h, "neuron": m}[k] for n, k in kinds.items()}

    found = []
    for e in range(step["channel"], widest["channel"] + 1, step["channel"]):
        for h in range(step["head"], widest["head"] + 1, step["head"]):
            lo, hi = 0, widest["neuron"] // step["neuron"]  # the largest MLP multiple within the budget
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if pruner.units.macs(counts(e, h, mid * step["neuron"])) <= pruner.budget else (lo, mid - 1)
            k = counts(e, h, lo * step["neuron"])
            if lo and pruner.units.macs(k) >= (1.0 - BUDGET_TOLERANCE) * pruner.budget:
                found.append((pruner.units.latency(k), e, h, lo))
    if not found:
        raise SystemExit("error: no uniform architecture meets the budget within its tolerance")
    found.sort()
    return tuple({n: torch.arange(dense[n]) < v for n, v in counts(e, h, m * step["neuron"]).items()}
                 for _, e, h, m in (found[0], found[-1]))


def compact(model: nn.Module, pruner: GlobalPruning, active: Mapping[str, torch.Tensor]) -> nn.Module:
    """The compact model that keeps the units ``active`` marks."""
    params = dict(model.named_parameters())
    return models.compact_model(model, unit_masks(pruner.groups, active, params)).eval()


def timed(models_by_name: Mapping[str, nn.Module], batch_size: int, repeats: int, seed: int) -> dict[str, Timing]:
    """Every model timed interleaved on the same random batch (process CPU time, one warm-up step)."""
    size = next(iter(models_by_name.values())).patch_embed.img_size
    x = torch.randn(batch_size, 3, *size, generator=torch.Generator().manual_seed(seed))

    def runner(net: nn.Module) -> Callable[[int], None]:
        @torch.inference_mode()
        def run(n: int) -> None:
            for _ in range(n):
                net(x)
        return run

    return measure({name: runner(net) for name, net in models_by_name.items()}, batch_size=batch_size,
                   num_warm_iter=1, num_bench_iter=1, repeats=repeats, clock=time.process_time)


def timed_training(models_by_name: Mapping[str, nn.Module], batch_size: int, repeats: int,
                   seed: int) -> dict[str, Timing]:
    """One optimizer step (forward, cross-entropy, backward, AdamW) of every model, timed interleaved like ``timed``:
    the cost per batch of a run's fine-tuning on the masked full-size model and, with ``--compact-at-budget``, on the
    compact one. The lr is 0, so the weights stay as they are; the models are left in eval mode."""
    first = next(iter(models_by_name.values()))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, *first.patch_embed.img_size, generator=generator)
    y = torch.randint(0, first.num_classes, (batch_size,), generator=generator)

    def runner(net: nn.Module) -> Callable[[int], None]:
        optimizer = torch.optim.AdamW(net.parameters(), lr=0.0)

        def run(n: int) -> None:
            net.train()
            for _ in range(n):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(net(x), y).backward()
                optimizer.step()
            net.eval()
        return run

    return measure({name: runner(net) for name, net in models_by_name.items()}, batch_size=batch_size,
                   num_warm_iter=1, num_bench_iter=1, repeats=repeats, clock=time.process_time)


def training_rows(steps: Mapping[str, Timing], nets: Mapping[str, nn.Module], meta: Mapping[str, str]) -> list[dict]:
    """The training-step rows: the dense model (the masked run) and the MAC-only compact one, with its speedup."""
    rows = []
    for name, label in (("dense", "masked run (dense shapes)"), ("MAC-only", "compact, MAC-only")):
        speed = paired_ratios(steps[name], steps["dense"])
        versus = (dict.fromkeys(("speedup", "speedup_lo", "speedup_hi", "speedup_min", "speedup_max"), "")
                  if name == "dense" else
                  {"speedup": statistics.median(speed), "speedup_lo": median_interval(speed)[0],
                   "speedup_hi": median_interval(speed)[1], "speedup_min": min(speed), "speedup_max": max(speed)})
        rows.append({**meta, "model": label, "gmacs": models.count_macs(nets[name]).total / 1e9,
                     "ms_per_step": steps[name].step_ms, **versus})
    return rows


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, object]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: row[k] for k in columns} for row in rows)


def training_markdown(rows: list[dict], meta: Mapping[str, str]) -> list[str]:
    """The training-step section: the masked run's step (timed as the dense model, a lower bound: the masks add
    work) against the compact model's."""
    lines = ["", f"## Training step, batch {meta['batch_size']}: the fine-tuning phase before and with "
             "`--compact-at-budget`", "",
             f"Forward, cross-entropy, backward and an AdamW step, float32, one thread, process CPU time, "
             f"{meta['train_repeats']} interleaved repeats; the masked run is timed as the dense model (its masks only "
             "add work, so the speedup is a lower bound).", "",
             "| model | GMACs | ms / step | speedup [95%] (min-max) |", "|---|---|---|---|"]
    for r in rows:
        speed = (f"{float(r['speedup']):.3f}× [{float(r['speedup_lo']):.3f}, {float(r['speedup_hi']):.3f}] "
                 f"({float(r['speedup_min']):.3f}–{float(r['speedup_max']):.3f})" if r["speedup"] != "" else "1")
        lines.append(f"| {r['model']} | {float(r['gmacs']):.3f} | {float(r['ms_per_step']):.0f} | {speed} |")
    return lines + [""]


def markdown(rows: list[dict], meta: Mapping[str, str]) -> str:
    lines = [f"# Global pruning of {meta['model']} (random weights) to {float(meta['target_macs']):.4f} of its MACs "
             f"(NViT-B: {NVIT_B_GMACS} of DeiT-B's {DEIT_B_GMACS} GMACs): {meta['device']}", "",
             f"- command: `{meta['command']}`",
             f"- device {meta['device']}, threads {meta['threads']}, torch {meta['torch']}, timm {meta['timm']}, "
             f"python {meta['python']}, date {meta['date']}",
             f"- scores: {meta['score_batches']} random batches of {meta['score_batch_size']} random {meta['img_size']}-px "
             "images and labels; "
             f"timing: float32 eager, batch {meta['batch_size']}, process CPU time, {meta['repeats']} interleaved "
             "repeats, median (min-max) of the per-repeat ratios; against MAC-only also the distribution-free 95% "
             "interval of the median [lo, hi]",
             f"- replayed pruning: {meta['prune_units']} units per step",
             f"- latency table: `{meta['latency_table']}` ({meta['table_note']})", "",
             "| criterion | λ | embed dim | heads | MLP neurons | GMACs | MAC ratio | table ms | ms / batch | "
             "speedup vs dense | speedup ÷ MAC ratio | vs MAC-only |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = {k: float(r[k]) if r[k] not in ("", None) else None for k in
             ("latency_lambda", "gmacs", "mac_ratio", "table_ms", "ms_per_batch", "speedup", "speedup_min",
              "speedup_max", "speedup_per_mac_ratio", "vs_mac_only", "vs_mac_only_lo", "vs_mac_only_hi",
              "vs_mac_only_min", "vs_mac_only_max")}
        ratio = (f"{f['speedup']:.3f}× ({f['speedup_min']:.3f}–{f['speedup_max']:.3f})" if f["speedup"] else "1")
        versus = (f"{f['vs_mac_only']:.3f}× [{f['vs_mac_only_lo']:.3f}, {f['vs_mac_only_hi']:.3f}] "
                  f"({f['vs_mac_only_min']:.3f}–{f['vs_mac_only_max']:.3f})" if f["vs_mac_only"] else "")
        lam = "" if f["latency_lambda"] is None else f"{f['latency_lambda']:.3g}"
        realised = "" if f["speedup_per_mac_ratio"] is None else f"{f['speedup_per_mac_ratio']:.3f}"
        lines.append(f"| {r['criterion']} | {lam} | {r['embed_dim']} | {r['heads']} | {r['mlp_hidden']} | "
                     f"{f['gmacs']:.3f} | {f['mac_ratio']:.3f} | {f['table_ms']:.1f} | {f['ms_per_batch']:.0f} | "
                     f"{ratio} | {realised} | {versus} |")
    lines += ["", "Per-block widths (heads; MLP neurons):", ""]
    lines += [f"- {r['criterion']}: heads {r['block_heads']}; MLP {r['block_mlp_hidden']}" for r in rows]
    lines += ["", "Goals (issue 15): speedup ÷ MAC ratio ≥ 0.95, and the latency-aware architecture measurably "
              "faster than the MAC-only one at equal MACs (vs MAC-only: its 95% interval above 1).", ""]
    return "\n".join(lines)


def shown_path(path: Path) -> str:
    """``path`` relative to the repository when inside it (so the results do not name this machine's folders)."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-macs", type=float, default=NVIT_B_GMACS / DEIT_B_GMACS)
    parser.add_argument("--latency-table", type=Path, default=TABLE)
    parser.add_argument("--latency-lambda", type=float, default=None,
                        help="λ of the latency-aware criterion (default: the balanced value, see above)")
    parser.add_argument("--prune-units", type=int, default=64, help="units per replayed pruning step")
    parser.add_argument("--score-batches", type=int, default=3)
    parser.add_argument("--score-batch-size", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-repeats", type=int, default=0,
                        help="also time a training step of the dense and the MAC-only compact model this many times "
                             "(0: skip; at least 6 for the interval); written to <csv stem>-train.csv and the .md")
    parser.add_argument("--model", default=MODEL, choices=models.MODEL_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--csv", type=Path, default=None,
                        help="default benchmarks/results/<device>-global-pruning.csv, the markdown next to it")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = get_args_parser()
    args = parser.parse_args(argv)
    for flag, value in (("--repeats", args.repeats), ("--train-repeats", args.train_repeats or 6)):
        if value < 6:
            parser.error(f"{flag} {value}: a 95% interval of the median paired ratio needs at least 6")
    device = torch.device("cpu")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    model = models.create_model(args.model)
    pruner = collect_scores(model, args.latency_table, args.target_macs, args.score_batches, args.score_batch_size,
                            args.seed)
    scores = pruner.window.read()
    pruner.remove()
    model.eval()
    lam = balanced_lambda(pruner, scores) if args.latency_lambda is None else args.latency_lambda
    lam_nvit = balanced_lambda(pruner, scores, absolute=True)
    fastest, slowest = uniform_extremes(pruner)
    kept = {"MAC-only": prune(pruner, scores, args.prune_units, 0.0),
            "latency-aware": prune(pruner, scores, args.prune_units, lam),
            "latency-aware, NViT's penalty": prune(pruner, scores, args.prune_units, lam_nvit, absolute=True),
            "uniform, fastest by the table": fastest, "uniform, slowest by the table": slowest}
    lambdas = {"MAC-only": 0.0, "latency-aware": lam, "latency-aware, NViT's penalty": lam_nvit}
    nets = {"dense": model, **{name: compact(model, pruner, active) for name, active in kept.items()}}
    timings = timed(nets, args.batch_size, args.repeats, args.seed)
    meta = {**env.environment(device), "command": shlex.join(["python", "benchmarks/global_pruning.py", *argv]),
            "batch_size": args.batch_size, "repeats": args.repeats, "score_batches": args.score_batches,
            "score_batch_size": args.score_batch_size, "model": args.model, "target_macs": args.target_macs,
            "prune_units": args.prune_units, "train_repeats": args.train_repeats,
            "img_size": model.patch_embed.img_size[0], "latency_table": shown_path(args.latency_table),
            "table_note": ", ".join(f"{k} {pruner.units.table.meta.get(k)}" for k in ("device", "threads", "date"))
            + f", batch {pruner.units.table.batch_size}"}
    dense_macs = models.count_macs(model).total
    dense_counts = {name: a.numel() for name, a in pruner.active.items()}
    rows = []
    for name, net in nets.items():
        arch = models.architecture(net)
        counts = dense_counts if name == "dense" else {n: int(a.sum()) for n, a in kept[name].items()}
        macs = models.count_macs(net).total
        t = timings[name]
        speed = None if name == "dense" else paired_ratios(t, timings["dense"])
        versus = paired_ratios(t, timings["MAC-only"]) if name not in ("dense", "MAC-only") else None
        rows.append({
            "criterion": name, "latency_lambda": lambdas.get(name, ""),
            "embed_dim": arch["embed_dim"], "heads": sum(arch["block_heads"]),
            "mlp_hidden": sum(arch["block_mlp_hidden"]), "gmacs": macs / 1e9, "mac_ratio": dense_macs / macs,
            "table_ms": pruner.units.latency(counts), "ms_per_batch": t.step_ms,
            "samples_per_sec": t.samples_per_sec,
            "speedup": "" if speed is None else median_ratio(t, timings["dense"]),
            "speedup_min": "" if speed is None else min(speed), "speedup_max": "" if speed is None else max(speed),
            "speedup_per_mac_ratio": "" if speed is None else median_ratio(t, timings["dense"]) * macs / dense_macs,
            "vs_mac_only": "" if versus is None else statistics.median(versus),
            "vs_mac_only_lo": "" if versus is None else median_interval(versus)[0],
            "vs_mac_only_hi": "" if versus is None else median_interval(versus)[1],
            "vs_mac_only_min": "" if versus is None else min(versus),
            "vs_mac_only_max": "" if versus is None else max(versus),
            "block_heads": " ".join(map(str, arch["block_heads"])),
            "block_mlp_hidden": " ".join(map(str, arch["block_mlp_hidden"])), **meta})
    csv_path = args.csv or RESULTS / f"{env.device_slug(device)}-global-pruning.csv"
    write_csv(csv_path, COLUMNS, rows)
    text = markdown(rows, meta)
    if args.train_repeats:
        steps = timed_training({"dense": model, "MAC-only": nets["MAC-only"]}, args.batch_size, args.train_repeats,
                               args.seed)
        train_rows = training_rows(steps, nets, meta)
        write_csv(csv_path.with_name(csv_path.stem + "-train.csv"), TRAIN_COLUMNS, train_rows)
        text = "\n".join([text.rstrip("\n"), *training_markdown(train_rows, meta)])
    csv_path.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {csv_path} and {csv_path.with_suffix('.md')}")
    return csv_path


if __name__ == "__main__":
    main()
