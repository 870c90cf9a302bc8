"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (SLURM preemption, torchrun shutdown, ``kill``).

The signal handler only records the signal. After the current optimizer step the loop writes a mid-epoch
checkpoint, prints the command that resumes it, and the process exits with 128 + the signal number (130 for
SIGINT, 143 for SIGTERM: the shell's convention, so ``&&`` chains and schedulers see that the run did not finish).
A second signal stops at once, without a checkpoint.

Under torch.distributed every rank must stop after the same step (each joins the checkpoint's collective RNG
gather), so the ranks agree on the flag with one small all-reduce every ``--print-freq`` steps, where the loop
synchronises anyway for its progress line, and after each epoch: a stop then takes up to ``--print-freq`` steps.
Keep that below the scheduler's grace period (SLURM's KillWait, torchrun's 30 s). One process checks every step.
"""
from __future__ import annotations

import math
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from engine import NonFiniteLossError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped on a signal after writing its checkpoint; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped on {signal.Signals(signum).name}")
        self.exit_code = 128 + signum


class StopSignals:
    """Records SIGINT/SIGTERM instead of dying, until ``restore``; a second signal gets the default behaviour.

    Python delivers signals to the main thread only, so a run started from another thread keeps the defaults.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum:
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        # os.write, not print: a handler that prints while the main thread prints raises "reentrant call".
        os.write(2, f"\nreceived {signal.Signals(signum).name}: stopping after the current step and writing a "
                    f"checkpoint (send it again to stop at once, without one)\n".encode())

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (0: none); a collective under torch.distributed, so all ranks must call it."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.signum
        flag = torch.tensor([self.signum], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def resume_command(checkpoint: Path, argv: list[str] | None = None) -> str:
    """The command line that continues this run: its own arguments with ``--resume checkpoint``.

    With ``--auto-resume`` the original command already does that and is returned unchanged.
    """
    argv = list(sys.argv if argv is None else argv)
    script, args, kept = argv[0], argv[1:], []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            kept.append(arg)
    if "--auto-resume" not in kept:
        kept += ["--resume", str(checkpoint)]
    launcher = shlex.quote(sys.executable)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        launcher = f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '1')}"
        if os.environ.get("WORLD_SIZE") != os.environ.get("LOCAL_WORLD_SIZE"):
            launcher += " <your multi-node torchrun options>"
    return f"{launcher} {shlex.join([script, *kept])}"


class StepHook:
    """``engine.StepContext.after_step``: periodic mid-epoch checkpoints and the agreed stop after a step.

    ``save(epoch, batches_done, global_step, epoch_loss_sum)`` writes the mid-epoch checkpoint and returns its path
    (None without ``--output_dir``); ``save_every`` counts optimizer steps (0: never); ``check_every`` is how often
    the ranks agree on a stop (1 for a single process).
    """

    def __init__(self, signals: StopSignals, save: Callable[[int, int, int, float], Path | None], save_every: int,
                 check_every: int, device: torch.device, is_main: bool) -> None:
        self.signals, self.save, self.save_every = signals, save, save_every
        self.check_every, self.device, self.is_main = check_every, device, is_main

    def __call__(self, epoch: int, batch: int, global_step: int, loss_sum: torch.Tensor) -> None:
        signum = self.signals.agreed(self.device) if batch % self.check_every == 0 else 0
        if not signum and not (self.save_every and global_step % self.save_every == 0):
            return
        loss = loss_sum.item()
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"loss became {loss / batch} in epoch {epoch} (step {global_step})")
        path = self.save(epoch, batch, global_step, loss)
        if signum:
            self.stop(signum, path, f"epoch {epoch}, batch {batch}")

    def after_epoch(self, epoch: int, path: Path | None) -> None:
        """Stop after the epoch's checkpoint when a signal came during its last steps or its evaluation."""
        signum = self.signals.agreed(self.device)
        if signum:
            self.stop(signum, path, f"the end of epoch {epoch}")

    def stop(self, signum: int, path: Path | None, where: str) -> None:
        self.signals.restore()
        if self.is_main:
            if path is None:
                print(f"stopped at {where}; nothing was saved (no --output_dir)", flush=True)
            else:
                print(f"stopped at {where}; checkpoint {path}\nresume with:\n  {resume_command(path)}", flush=True)
        raise Interrupted(signum)
