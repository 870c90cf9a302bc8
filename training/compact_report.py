"""The end of a global-pruning run, measured: the compact model's MACs by torch's FLOP counter and its latency on
the run's device, against what the budget counted and against the dense architecture.

The budget is met by counts (``models.flops.vit_macs`` of the kept units and, with ``--latency-table``, a table's
interpolated block latencies); what the run delivers is the compact model. So the run ends by measuring that model:
``FlopCounterMode`` over one forward pass must give the budget's MAC count (a difference is a bug in the counter or
in the compaction, and is warned about with both numbers), and a timed forward pass on the device gives the speedup
over a dense model of the same architecture, next to the table's prediction of it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import models
from sparselearning.latency_table import LatencyTable, load_table
from sparselearning.units import UNIT_MULTIPLE_AUTO

MAC_TOLERANCE = 1e-9
"""Relative difference allowed between the FLOP counter's and the budget's MACs: both are integer counts."""
WARM_PASSES = 3
TIMED_PASSES = 5


@runtime_checkable
class MacBudget(Protocol):
    """What a sparsifier that prunes to a MAC budget exposes (``GlobalPruning``): the count of its kept units and of
    the dense model, per image."""

    current_macs: float
    dense_macs: float


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """torch's formula for the fused attention kernels, for the CPU kernel its counter has no entry for."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode under ``torch.inference_mode``; its training flag is restored after."""
    training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(training)


def _images(model: nn.Module, batch_size: int, device: torch.device) -> torch.Tensor:
    """Random images of the model's input size, from a private generator (the run's RNG streams stay put)."""
    embed = model.patch_embed
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, embed.proj.in_channels, *embed.img_size, generator=gen).to(device)


def measured_macs(model: nn.Module, device: torch.device) -> float:
    """MACs per image of one forward pass of ``model`` by ``torch.utils.flop_counter`` (FLOPs / 2)."""
    x = _images(model, 1, device)
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter, _inference(model):
        model(x)
    return counter.get_total_flops() / 2


def forward_ms(nets: Mapping[str, nn.Module], batch_size: int, device: torch.device, warm: int = WARM_PASSES,
               timed: int = TIMED_PASSES) -> dict[str, float]:
    """Median milliseconds of one forward pass of each model on ``batch_size`` images, float32, eval mode.

    Each model is warmed up ``warm`` passes; the ``timed`` passes then alternate between the models, so drift in
    the machine's speed hits all of them alike. CUDA work is synchronised around every timed pass.
    """
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    x = _images(next(iter(nets.values())), batch_size, device)
    times: dict[str, list[float]] = {name: [] for name in nets}
    with contextlib.ExitStack() as stack:
        for net in nets.values():
            stack.enter_context(_inference(net))
            for _ in range(warm):
                net(x)
        for _ in range(timed):
            for name, net in nets.items():
                sync()
                start = time.perf_counter()
                net(x)
                sync()
                times[name].append(1000.0 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


@dataclasses.dataclass(frozen=True)
class CompactMeasurement:
    """The compact model of a global-pruning run, measured.

    Args:
        macs: MACs per image by the FLOP counter.
        budget_macs: the count the budget was met at (``GlobalPruning.current_macs``).
        dense_macs: the budget's count of the dense model.
        ms: median ms per forward pass of ``batch_size`` images on ``device``.
        dense_ms: the same for a dense model of the architecture.
        table_ms, table_dense_ms: the ``--latency-table``'s prediction of both (None without a table).
    """

    macs: float
    budget_macs: float
    dense_macs: float
    ms: float
    dense_ms: float
    batch_size: int
    device: str
    model_name: str
    table_ms: float | None = None
    table_dense_ms: float | None = None

    @property
    def macs_agree(self) -> bool:
        return abs(self.macs - self.budget_macs) <= MAC_TOLERANCE * self.budget_macs

    def lines(self) -> list[str]:
        """The summary's lines."""
        lines = [f"compact model measured: {self.macs / 1e9:.4g} GMACs per image by torch's FLOP counter, the "
                 f"budget counted {self.budget_macs / 1e9:.4g} ({self.budget_macs / self.dense_macs:.4f} of the "
                 f"dense {self.dense_macs / 1e9:.4g})"]
        if not self.macs_agree:
            lines.append(f"MISMATCH: the FLOP counter measures {self.macs:,.0f} MACs per image, the budget counted "
                         f"{self.budget_macs:,.0f}: the MAC count or the compaction is wrong")
        latency = (f"compact model latency on {self.device} (batch {self.batch_size}, float32): {self.ms:.3f} ms vs "
                   f"{self.dense_ms:.3f} ms for a dense {self.model_name}, {self.dense_ms / self.ms:.2f}x")
        if self.table_ms is not None:
            latency += (f"; the latency table predicts {self.table_ms:.3f} vs {self.table_dense_ms:.3f} ms, "
                        f"{self.table_dense_ms / self.table_ms:.2f}x")
        return [*lines, latency]

    def to_record(self) -> dict[str, Any]:
        """log.txt's numbers: every field, the speedups and whether the MAC counts agree."""
        record = dataclasses.asdict(self)
        record.update(macs_agree=self.macs_agree, speedup=self.dense_ms / self.ms)
        if self.table_ms is not None:
            record["table_speedup"] = self.table_dense_ms / self.table_ms
        return record


def _table_ms(net: nn.Module, table: LatencyTable, source: str, prune_head_dim: bool,
              unit_multiple: int | str) -> float:
    """The table's latency of ``net`` as it is (every unit kept), summed over its blocks; with ``prune_head_dim``
    its (pruned) head widths are interpolated on the table's head_dim grid."""
    units = models.GlobalUnits(net, table, source, prune_head_dim, unit_multiple)
    return units.latency({group["name"]: group["num_units"] for group in units.groups})


def measure_compact(compact: nn.Module, model_name: str, budget: MacBudget, device: torch.device, batch_size: int,
                    latency_table: str | None = None, prune_head_dim: bool = False,
                    unit_multiple: int | str = UNIT_MULTIPLE_AUTO) -> CompactMeasurement:
    """Measure ``compact`` (on ``device``) against ``budget``'s counts and a randomly initialised dense
    ``model_name`` of the same input size and classes; with a table, the forward passes use its batch size, and
    the run's ``--prune-head-dim`` and ``--unit-multiple`` say which head widths it must cover.

    Warns when the FLOP counter and the budget disagree on the MACs.
    """
    img_size = compact.patch_embed.img_size[0]
    with torch.random.fork_rng(devices=[]):  # the dense reference's initialisation leaves the run's RNG alone
        dense = models.create_model(model_name, num_classes=compact.num_classes, img_size=img_size).to(device)
    table = None if latency_table is None else load_table(latency_table)
    source = f"--latency-table {latency_table}"
    if table is not None:
        batch_size = table.batch_size
    ms = forward_ms({"compact": compact, "dense": dense}, batch_size, device)
    measurement = CompactMeasurement(
        macs=measured_macs(compact, device), budget_macs=float(budget.current_macs),
        dense_macs=float(budget.dense_macs), ms=ms["compact"], dense_ms=ms["dense"], batch_size=batch_size,
        device=str(device), model_name=model_name,
        table_ms=None if table is None else _table_ms(compact, table, source, prune_head_dim, unit_multiple),
        table_dense_ms=None if table is None else _table_ms(dense, table, source, prune_head_dim, unit_multiple))
    if not measurement.macs_agree:
        warnings.warn(measurement.lines()[1], stacklevel=2)
    return measurement
