"""Shared test setup: one thread (results and timings independent of machine load), repo root importable, and the
`slow` marker kept honest: a test that starts a subprocess (main.py through `run_main`, torchrun, bash, pip) must be
marked `@pytest.mark.slow`, so that `bash cmd/test.sh --fast` (`-m "not slow"`) leaves it out; an unmarked one fails
at its first subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

_running: pytest.Item | None = None  # the test being set up, run or torn down (module fixtures included)
_start_process = subprocess.Popen.__init__


# Library internals that shell out once per machine, not the test's own subprocesses: matplotlib lists system fonts
# with fc-list when it first builds its font cache (a fresh machine or CI runner).
_LIBRARY_HELPERS = {"fc-list"}


def _start_process_if_slow(self: subprocess.Popen, *args, **kwargs) -> None:
    command = args[0] if args else kwargs.get("args")
    program = command[0] if isinstance(command, (list, tuple)) and command else command
    if (_running is not None and _running.get_closest_marker("slow") is None
            and Path(str(program)).name not in _LIBRARY_HELPERS):
        pytest.fail(f"{_running.nodeid} starts a subprocess ({command!r:.120}) but is not marked slow; add "
                    "@pytest.mark.slow (or `pytestmark = pytest.mark.slow` for a whole module) so that "
                    "`cmd/test.sh --fast` leaves it out", pytrace=False)
    _start_process(self, *args, **kwargs)


subprocess.Popen.__init__ = _start_process_if_slow


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    global _running
    _running = item
    try:
        return (yield)
    finally:
        _running = None


def run_main(*flags: str, cwd: Path = ROOT, timeout: float = 300, check: bool = True,
             launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run `python main.py FLAGS` (or under `launcher`, e.g. torchrun) in a fresh process, as a user would."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [*launcher, str(ROOT / "main.py"), *flags] if launcher else [sys.executable, str(ROOT / "main.py"), *flags]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# Fast DIGITS flags: the micro model, no augmentation that needs many epochs, no worker processes.
TINY_RUN = ("--model", "vit_digits_micro", "--data-set", "DIGITS", "--batch-size", "32", "--lr", "4e-2",
            "--warmup-epochs", "0", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--aa", "none",
            "--hflip", "0", "--drop-path", "0", "--no-repeated-aug", "--num_workers", "0", "--no-pin-mem", "--print-freq", "1000")


@pytest.fixture
def tiny_run() -> tuple[str, ...]:
    return TINY_RUN


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range, sparsifier=None,
                batch_size: int = 8) -> list[int]:
    """Optimizer steps of a 16-px, 10-class micro model on random images seeded by the step number, each followed by
    ``sparsifier.step(step)`` when given; returns the steps at which it changed the masks."""
    changed = []
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(batch_size, 3, 16, 16, generator=gen), torch.randint(0, 10, (batch_size,), generator=gen)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if sparsifier is not None and sparsifier.step(step):
            changed.append(step)
    return changed
