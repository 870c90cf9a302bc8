"""What unstructured sparsity costs beyond the masked step: topology-update time, mask bytes and peak memory.

    python benchmarks/sparse_costs.py                 # DeiT-Base update vs a batch-8 step; DeiT-Small memory at batch 32
    python benchmarks/sparse_costs.py --update-model vit_digits_tiny --memory-model vit_digits_tiny   # a quick look

Goals (issue 3): one topology update of all masked DeiT-Base tensors takes less time than one DeiT-Base training
step at batch 8; masks cost at most 1 byte per masked weight; peak memory of sparse training is at most 1.10x dense.
Peak memory is each configuration's own process's maximum resident set size, so the two cannot share allocations.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import models  # noqa: E402
import sparselearning  # noqa: E402
from benchmarks import env  # noqa: E402
from benchmarks.modes import build_optimizer  # noqa: E402


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]):
    loss = F.cross_entropy(model(batch[0]), batch[1])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def update_vs_step(name: str, batch_size: int, repeats: int) -> dict:
    """Median seconds of one training step and of one topology update (gradient growth) of every masked tensor."""
    torch.manual_seed(0)
    model = models.create_model(name)
    size = models.default_img_size(name)
    batch = (torch.randn(batch_size, 3, size, size), torch.randint(0, model.num_classes, (batch_size,)))
    optimizer = build_optimizer(model, batch_size)
    # ΔT = 1: every call of step() is a topology update (the schedule starts at step ΔT).
    masking = sparselearning.Masking(model, optimizer, density=0.5, total_steps=10**6, update_frequency=1,
                                     log_fn=lambda record: None)
    train_step(model, optimizer, batch)  # warm-up, and the dense gradients growth reads
    step_times, update_times = [], []
    for i in range(repeats):
        start = time.perf_counter()
        train_step(model, optimizer, batch)
        step_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        changed = masking.step(i + 1)
        update_times.append(time.perf_counter() - start)
        assert changed, "every step should have been a topology update"
    masked = sum(m.numel() for m in masking.masks.values())
    mask_bytes = sum(m.numel() * m.element_size() for m in masking.masks.values())
    return {"model": name, "batch_size": batch_size, "masked_tensors": len(masking.masks), "masked_weights": masked,
            "step_s": statistics.median(step_times), "update_s": statistics.median(update_times),
            "update_over_step": statistics.median(update_times) / statistics.median(step_times),
            "mask_bytes_per_weight": mask_bytes / masked}


def peak_memory_child(name: str, batch_size: int, density: float | None, steps: int) -> None:
    """Run in a fresh process: train `steps` steps and print the peak resident set size (bytes) as JSON."""
    torch.manual_seed(0)
    model = models.create_model(name)
    size = models.default_img_size(name)
    batch = (torch.randn(batch_size, 3, size, size), torch.randint(0, model.num_classes, (batch_size,)))
    optimizer = build_optimizer(model, batch_size)
    masking = None
    if density is not None:
        masking = sparselearning.Masking(model, optimizer, density=density, total_steps=steps, update_frequency=1,
                                         t_end=1.0, log_fn=lambda record: None)
    for step in range(1, steps + 1):
        train_step(model, optimizer, batch)
        if masking is not None:
            masking.step(step)  # ΔT = 1: every step also updates the topology, the worst case for memory
    print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def peak_memory(name: str, batch_size: int, steps: int) -> dict:
    result = {"model": name, "batch_size": batch_size, "steps": steps}
    for label, density in (("dense", None), ("sparse", 0.5)):
        cmd = [sys.executable, __file__, "--child", name, str(batch_size), str(density), str(steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
        result[f"{label}_peak_mb"] = json.loads(out.strip().splitlines()[-1])["peak_rss_bytes"] / 2**20
    result["sparse_over_dense"] = result["sparse_peak_mb"] / result["dense_peak_mb"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update-model", default="deit_base_patch16_224", choices=models.MODEL_NAMES)
    parser.add_argument("--update-batch", type=int, default=8)
    parser.add_argument("--memory-model", default="deit_small_patch16_224", choices=models.MODEL_NAMES)
    parser.add_argument("--memory-batch", type=int, default=32)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sparse_costs.json")
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "BATCH", "DENSITY", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        name, batch, density, steps = args.child
        peak_memory_child(name, int(batch), None if density == "None" else float(density), int(steps))
        return
    result = {"environment": env.environment(torch.device("cpu")),
              "update": update_vs_step(args.update_model, args.update_batch, args.repeats),
              "memory": peak_memory(args.memory_model, args.memory_batch, args.memory_steps)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    u, m = result["update"], result["memory"]
    print(f"{u['model']}: one topology update of {u['masked_tensors']} tensors ({u['masked_weights']:,} weights) "
          f"{u['update_s']:.3f} s vs one training step at batch {u['batch_size']} {u['step_s']:.3f} s "
          f"(ratio {u['update_over_step']:.3f}); masks {u['mask_bytes_per_weight']:.2f} byte per masked weight")
    print(f"{m['model']} batch {m['batch_size']}: peak RSS dense {m['dense_peak_mb']:.0f} MiB, sparse "
          f"{m['sparse_peak_mb']:.0f} MiB (ratio {m['sparse_over_dense']:.3f})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
