"""GPU readiness: what the CPU tests cannot show, checked on one CUDA machine in under 10 minutes.

    python benchmarks/gpu_check.py              # on a CUDA machine; writes benchmarks/results/<gpu>-gpu-check.csv
    python benchmarks/gpu_check.py --dry-run    # print the plan (works anywhere)

Every check is a fresh ``main.py`` (or ``benchmarks/run.py``) process, as a user would start it, on the embedded
DIGITS set at DeiT-Small's 224 px (one epoch = 22 steps of 64 images):

- ``train/<mode>/<amp>``: dense, unstructured, structured, tokens and tokens+unstructured, each under bf16 and fp16
  (GradScaler) AMP with the fused AdamW kernel and EMA on. Pass: exit 0, finite loss, a topology update in the sparse
  modes, and model and EMA weights zero exactly where the masks are.
- ``compile``: dense bf16 with ``--compile`` (inductor). Pass: exit 0, finite loss.
- ``resume``: unstructured bf16 for 2 epochs straight, and killed after epoch 0 then resumed. Pass: model, EMA and
  sparsifier state identical bit for bit.
- ``nccl``: unstructured under ``torchrun --nproc_per_node=2`` (NCCL), when the machine has two GPUs, eager and with
  ``--compile`` (compiled around DDP). Pass: exit 0 (masks are checked to agree across ranks at every update) and
  every validation image counted once.
- ``suite``: ``benchmarks/run.py --suite`` without compile and with one repeat (``--full-suite``: the whole suite,
  which takes longer than the budget), written to ``<gpu>-suite-gpu-check.csv``.

Checks run in order until ``--budget-s`` is spent; the rest are recorded as skipped.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import env  # noqa: E402
from interop.checkpoint import load_checkpoint, same_state  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODEL = "deit_small_patch16_224"
RUN = ("--data-set", "DIGITS", "--batch-size", "64", "--epochs", "1", "--lr", "5e-4", "--warmup-epochs", "0",
       "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--aa", "none", "--hflip", "0", "--no-repeated-aug",
       "--num_workers", "6", "--print-freq", "1000", "--model-ema-decay", "0.9", "--device", "cuda")
UNSTRUCTURED = ("--density", "0.5", "--sparse_init", "fixed_ERK", "--update_frequency", "8")
MODES: dict[str, tuple[str, ...]] = {
    "dense": (),
    "unstructured": UNSTRUCTURED,
    "structured": ("--pruning_type", "structure_new", "--atten_density", "0.5", "--other_density", "0.5",
                   "--density", "0.5", "--update_frequency", "8"),
    "tokens": ("--token_selection", "--token-ratio", "0.7", "--token-mode", "drop"),
    "tokens+unstructured": (*UNSTRUCTURED, "--token_selection", "--token-ratio", "0.7", "--token-mode", "drop"),
}
AMP = {"bf16": ("--amp", "--amp-dtype", "bfloat16"), "fp16": ("--amp", "--amp-dtype", "float16")}


@dataclass(frozen=True)
class Check:
    """One named check: ``kind`` says how it runs and what passes (train, resume, nccl, suite)."""

    name: str
    kind: str
    flags: tuple[str, ...] = ()


def plan(num_gpus: int, model: str = MODEL, full_suite: bool = False) -> list[Check]:
    """The checks for a machine with ``num_gpus`` GPUs, in the order they run (cheapest first)."""
    base = ("--model", model, *RUN)
    checks = [Check(f"train/{mode}/{amp}", "train", (*base, *flags, *AMP[amp]))
              for mode, flags in MODES.items() for amp in AMP]
    checks.append(Check("compile", "train", (*base, *AMP["bf16"], "--compile")))
    checks.append(Check("resume", "resume", (*base, *UNSTRUCTURED, *AMP["bf16"], "--epochs", "2")))
    if num_gpus >= 2:
        nccl = (*base, *UNSTRUCTURED, *AMP["bf16"], "--batch-size", "32")
        checks += [Check("nccl", "nccl", nccl), Check("nccl+compile", "nccl", (*nccl, "--compile"))]
    suite = ("--suite", "--model", model) + (() if full_suite else ("--no-compile", "--repeats", "1", "--tag",
                                                                    "gpu-check"))
    checks.append(Check("suite", "suite", suite))
    return checks


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("GPU readiness check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    parser.add_argument("--model", default=MODEL, help="model of every check (default DeiT-Small)")
    parser.add_argument("--budget-s", type=float, default=570.0, help="stop starting checks after this many seconds")
    parser.add_argument("--full-suite", action="store_true", help="the whole benchmark suite (longer than budget)")
    parser.add_argument("--csv", type=Path, default=None, help="default benchmarks/results/<gpu>-gpu-check.csv")
    return parser


def run(cmd: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=ROOT, capture_output=True, text=True, timeout=max(timeout, 1.0))


def main_py(flags: Sequence[str], output_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), *flags, "--output_dir", str(output_dir)]


def epochs(output_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]
    return [line for line in lines if "epoch" in line]


def sparsity_events(output_dir: Path) -> list[str]:
    lines = [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]
    return [line["sparsity"]["event"] for line in lines if "sparsity" in line]


def saved_masks(ckpt: dict) -> dict[str, torch.Tensor]:
    state = ckpt["sparsifier"]
    if "masks" in state:
        return state["masks"]
    return next((member["masks"] for member in state.values() if isinstance(member, dict) and "masks" in member), {})


def verify_training(output_dir: Path, sparse: bool) -> str:
    """'' when the run is right, else what is wrong."""
    record = epochs(output_dir)[-1]
    if not math.isfinite(record["train_loss"]):
        return f"train loss {record['train_loss']}"
    if not sparse:
        return ""
    if "update" not in sparsity_events(output_dir):
        return "no topology update"
    ckpt = load_checkpoint(output_dir / "checkpoint.pth")
    for section in ("model", "model_ema"):
        wrong = [n for n, m in saved_masks(ckpt).items() if not torch.equal(ckpt[section][n] != 0, m)]
        if wrong:
            return f"{section} non-zeros differ from the masks in {wrong[:3]}"
    return ""



def check_resume(flags: Sequence[str], work: Path, timeout: float) -> tuple[bool, str]:
    """Two epochs straight against a run killed (SIGKILL) after its first checkpoint and resumed."""
    deadline = time.time() + timeout
    straight, killed = work / "straight", work / "killed"
    proc = run(main_py(flags, straight), timeout)
    if proc.returncode:
        return False, f"straight run failed: {proc.stderr[-300:]}"
    victim = subprocess.Popen(main_py(flags, killed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "log.txt"
    while not (log.exists() and '"epoch"' in log.read_text()) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    if load_checkpoint(killed / "checkpoint.pth")["epoch"] != 0:
        return False, "the run finished before it could be killed"
    proc = run([*main_py(flags, killed), "--resume", str(killed / "checkpoint.pth")], deadline - time.time())
    if proc.returncode:
        return False, f"resumed run failed: {proc.stderr[-300:]}"
    a, b = load_checkpoint(straight / "checkpoint.pth"), load_checkpoint(killed / "checkpoint.pth")
    differing = [f"{s}.{k}" for s in ("model", "model_ema") for k in a[s] if not torch.equal(a[s][k], b[s][k])]
    if not same_state(a["sparsifier"], b["sparsifier"]):
        differing.append("sparsifier")
    return not differing, f"differ after resume: {differing[:4]}" if differing else "bit-exact"


def run_check(check: Check, work: Path, timeout: float) -> tuple[bool, str]:
    """(passed, detail) of one check."""
    out = work / check.name.replace("/", "_")
    if check.kind == "resume":
        return check_resume(check.flags, out, timeout)
    if check.kind == "suite":
        proc = run([sys.executable, str(ROOT / "benchmarks" / "run.py"), *check.flags], timeout)
        return proc.returncode == 0, (proc.stdout.strip().splitlines() or [""])[-1][:200] or proc.stderr[-300:]
    cmd = main_py(check.flags, out)
    if check.kind == "nccl":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cmd[1:]]
    proc = run(cmd, timeout)
    if proc.returncode:
        return False, f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"
    problem = verify_training(out, sparse="--density" in check.flags or "--pruning_type" in check.flags)
    if check.kind == "nccl" and not problem and epochs(out)[-1]["test_images"] != 360:
        problem = f"{epochs(out)[-1]['test_images']} validation images counted, expected 360"
    record = epochs(out)[-1]
    return not problem, problem or f"loss {record['train_loss']:.4f}, top-1 {record['test_acc1']:.2f}%"


def main(argv: Sequence[str] | None = None) -> Path | None:
    args = get_args_parser().parse_args(argv)
    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    checks = plan(max(num_gpus, 1) if not args.dry_run else max(num_gpus, 2), args.model, args.full_suite)
    if args.dry_run:
        for check in checks:
            print(f"{check.name:28s} {check.kind:7s} {' '.join(check.flags)}")
        return None
    if num_gpus == 0:
        raise SystemExit(
            f"error: benchmarks/gpu_check.py checks CUDA training and needs an NVIDIA GPU, but this machine has none "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False). Run it on a CUDA machine; "
            "--dry-run prints its plan here, and the CPU test suite covers what a CPU can.")
    device = torch.device("cuda", 0)
    csv_path = args.csv or RESULTS / f"{env.device_slug(device)}-gpu-check.csv"
    start, rows = time.time(), []
    with tempfile.TemporaryDirectory() as tmp:
        for check in checks:
            left = args.budget_s - (time.time() - start)
            began = time.time()
            if left < 20:
                passed, detail, status = False, "not run: the time budget was spent", "skipped"
            else:
                try:
                    passed, detail = run_check(check, Path(tmp), left)
                except subprocess.TimeoutExpired:
                    passed, detail = False, f"timed out after {left:.0f} s"
                status = "pass" if passed else "FAIL"
            rows.append({"check": check.name, "status": status, "seconds": f"{time.time() - began:.1f}",
                         "detail": detail, "device": env.device_name(device), "torch": torch.__version__})
            print(f"{status:7s} {check.name:28s} {rows[-1]['seconds']:>6s} s  {detail}", flush=True)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    failed = [r["check"] for r in rows if r["status"] != "pass"]
    print(f"wrote {csv_path}; {len(rows) - len(failed)}/{len(rows)} passed" + (f"; not passed: {failed}" if failed
                                                                                  else ""))
    if failed:
        raise SystemExit(1)
    return csv_path


if __name__ == "__main__":
    main()
