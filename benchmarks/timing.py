"""The timing protocol, free of models and devices: warm-up, synchronized timed loops, interleaved repeats.

A benchmarked thing is a `Run`: a callable that performs `n` steps. Several runs are timed in rotating
interleaved order (AB, BA, AB, ...), so machine noise and thermal drift hit all of them alike, and ratios
are taken within one repeat before the median is formed.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping

Run = Callable[[int], None]


def _no_sync() -> None:
    """CPU work is finished when the call returns; CUDA callers pass torch.cuda.synchronize."""


@dataclass(frozen=True)
class Timing:
    """Wall time of each repeat's timed loop of `num_iter` steps at `batch_size` samples per step."""

    batch_size: int
    num_iter: int
    seconds: tuple[float, ...]

    @property
    def rates(self) -> tuple[float, ...]:
        """Samples per second of each repeat."""
        return tuple(self.batch_size * self.num_iter / s for s in self.seconds)

    @property
    def samples_per_sec(self) -> float:
        return statistics.median(self.rates)

    @property
    def min_samples_per_sec(self) -> float:
        return min(self.rates)

    @property
    def max_samples_per_sec(self) -> float:
        return max(self.rates)

    @property
    def step_ms(self) -> float:
        """Median over repeats of the mean milliseconds per step."""
        return 1000.0 * statistics.median(self.seconds) / self.num_iter


def paired_ratios(a: Timing, b: Timing) -> tuple[float, ...]:
    """a's samples/s over b's, repeat by repeat: runs timed side by side shared the same machine state."""
    if len(a.seconds) != len(b.seconds):
        raise ValueError(f"ratios pair repeats; got {len(a.seconds)} and {len(b.seconds)} repeats")
    return tuple(ra / rb for ra, rb in zip(a.rates, b.rates))


def median_ratio(a: Timing, b: Timing) -> float:
    """Median of the paired ratios: robust to a repeat that noise hit, unlike the ratio of the two medians."""
    return statistics.median(paired_ratios(a, b))


def median_interval(values: tuple[float, ...] | list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of ``values`` (paired ratios): the k-th smallest and k-th largest,
    with the largest k whose binomial tail P(Bin(n, 1/2) < k) stays within (1 - confidence) / 2. It assumes only
    independent repeats, not normal noise; it needs 6 values at 95%.

    Raises:
        ValueError: too few values for the confidence.
    """
    ordered, n = sorted(values), len(values)
    tail, k, below = (1.0 - confidence) / 2.0, 0, 0.0
    while below + math.comb(n, k) / 2 ** n <= tail:
        below += math.comb(n, k) / 2 ** n
        k += 1
    if k == 0:
        raise ValueError(f"{n} values are too few for a {confidence:.0%} interval of their median")
    return ordered[k - 1], ordered[n - k]


def measure(
    runs: Mapping[str, Run],
    *,
    batch_size: int,
    num_warm_iter: int,
    num_bench_iter: int,
    repeats: int,
    warm_seconds: float = 0.0,
    min_bench_seconds: float = 0.0,
    sync: Callable[[], None] = _no_sync,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:
    """Warm up every run, then time `repeats` rounds of all runs in rotating order.

    Args:
        runs: name -> callable doing n steps; all runs process `batch_size` samples per step.
        batch_size: samples per step, for samples/s.
        num_warm_iter: warm-up steps per run (compilation, allocator and clock ramp-up happen here).
        num_bench_iter: timed steps per run and repeat.
        repeats: timed rounds; the protocol asks for at least 3 so the median means something.
        warm_seconds: after `num_warm_iter`, keep warming one step at a time until this much time has passed.
        min_bench_seconds: time each run for more than `num_bench_iter` steps where needed, so that one timed loop
            lasts about this long (the step time is taken from one extra synchronized warm-up step). One setting
            then fits batch 1 and a large batch: a fixed count is noise at batch 1 or minutes at batch 256.
        sync: waits for queued device work; called at both ends of every timed loop.
        clock: seconds; perf_counter (wall) or process_time (this process's CPU time); a fake one in tests.
    """
    if not runs:
        raise ValueError("nothing to measure: runs is empty")
    if batch_size < 1 or num_bench_iter < 1 or repeats < 1 or min(num_warm_iter, warm_seconds, min_bench_seconds) < 0:
        raise ValueError(f"need batch_size, num_bench_iter, repeats >= 1 and non-negative warm-up and time floor; got "
                         f"{batch_size}, {num_bench_iter}, {repeats}, {num_warm_iter}, {warm_seconds}, "
                         f"{min_bench_seconds}")
    iters = dict.fromkeys(runs, num_bench_iter)
    for name, run in runs.items():
        start = clock()
        if num_warm_iter:
            run(num_warm_iter)
            sync()
        while clock() - start < warm_seconds:
            run(1)
            sync()
        if min_bench_seconds:
            t0 = clock()
            run(1)
            sync()
            step = clock() - t0
            iters[name] = max(num_bench_iter, math.ceil(min_bench_seconds / step) if step > 0 else num_bench_iter)
    names = list(runs)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            sync()
            t0 = clock()
            runs[name](iters[name])
            sync()
            seconds[name].append(clock() - t0)
    return {name: Timing(batch_size, iters[name], tuple(s)) for name, s in seconds.items()}
