"""The output directory of a training run: created with a clear error, never reused silently, locked while written.

A week-long run must not be replaced by a second command with the same ``--output_dir``, and two processes must
never write one directory at once (their ``log.txt`` lines and ``config.json`` would mix). The lock is a POSIX
record lock (``fcntl.lockf``) on ``<output_dir>/.lock``: the kernel releases it when its process dies, so a crash or
``kill -9`` never leaves a lock behind that blocks the next start. Unlike ``flock``, it is not shared with forked
DataLoader workers, which may outlive a killed main process for a few seconds.
"""
from __future__ import annotations

import datetime
import fcntl
import os
import re
import socket
from pathlib import Path

CHECKPOINT = "checkpoint.pth"
LOCK_FILE = ".lock"
# interop.checkpoint.save_atomic writes ".<name>.<8 random characters>.tmp" and renames it when complete.
_TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
_held: dict[Path, int] = {}  # lock file -> descriptor, for the life of the process


def make_dir(path: str | Path, flag: str) -> Path:
    """``mkdir -p`` whose failure names the flag and the reason instead of raising a bare OSError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create {flag} {path}: {e.strerror or e}; choose a writable location") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path} is not writable; choose a writable location")
    return path


def checkpoint_to_resume(output_dir: Path, resume: str, auto_resume: bool) -> str:
    """The checkpoint a training run continues from ('' for a fresh start), refusing to train over an earlier run.

    ``--auto-resume`` continues from ``<output_dir>/checkpoint.pth`` when it exists, else from ``--resume`` if given,
    else starts fresh: a job script that is re-submitted or requeued after preemption needs no edit. Without it, a
    directory holding a run's checkpoint needs an explicit ``--resume``.
    """
    checkpoint = output_dir / CHECKPOINT
    if auto_resume and checkpoint.exists():
        return str(checkpoint)
    earlier = [name for name in (CHECKPOINT, "best.pth") if (output_dir / name).exists()]
    if earlier and not resume:
        raise ValueError(f"--output_dir {output_dir} already holds {' and '.join(earlier)} of an earlier run, which a "
                         f"fresh start would overwrite; continue it with --resume {checkpoint} (or --auto-resume), "
                         "or choose another --output_dir")
    return resume


def lock(output_dir: Path) -> None:
    """Hold an exclusive lock on ``output_dir`` until this process exits; raise naming the holder if it is taken.

    Re-entrant within one process (in-process callers may run several trainings into one directory).
    """
    path = (output_dir / LOCK_FILE).resolve()
    if path in _held:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES, by platform
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process that has not written its name"
        os.close(fd)
        raise ValueError(f"--output_dir {output_dir} is in use by another run ({holder}); wait for it to end, stop "
                         "it, or choose another --output_dir") from None
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} started {started}\n".encode(), 0)
    _held[path] = fd


def remove_stale_temp_files(output_dir: Path) -> list[Path]:
    """Delete the hidden temporary files of checkpoint writes that a crash or kill interrupted.

    Only safe under ``lock``: then no other process can be writing one.
    """
    stale = [p for p in output_dir.iterdir() if p.is_file() and _TEMP_FILE.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def prepare(output_dir: Path, resume: str, auto_resume: bool, is_main: bool) -> str:
    """Create and lock ``output_dir`` (rank 0), clear stale temporary files, and return the checkpoint to resume."""
    if is_main:
        make_dir(output_dir, "--output_dir")
        lock(output_dir)
        stale = remove_stale_temp_files(output_dir)
        if stale:
            print(f"removed {len(stale)} temporary file(s) of an interrupted checkpoint write: "
                  f"{', '.join(p.name for p in stale)}")
    return checkpoint_to_resume(output_dir, resume, auto_resume)


def last_checkpoint(output_dir: Path | None) -> str:
    """What a stopped run leaves to resume from, for its error message."""
    if output_dir is None:
        return "nothing was saved (no --output_dir)"
    checkpoint = output_dir / CHECKPOINT
    if checkpoint.exists():
        return f"the last good checkpoint {checkpoint} is intact (continue with --resume {checkpoint})"
    return f"no checkpoint was written to {output_dir} yet"


def error_message(err: BaseException) -> str:
    """The message of an error for ``error: ...``; an error re-raised from a DataLoader worker carries the worker's
    traceback as its text, of which only the last line (``SomeError: message``) is for the user."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def unlock(output_dir: Path) -> None:
    """Release ``lock`` at the end of a run (a process that exits releases it anyway)."""
    fd = _held.pop((output_dir / LOCK_FILE).resolve(), None)
    if fd is not None:
        os.close(fd)
