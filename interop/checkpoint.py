"""Reading and writing checkpoint files: atomic writes and `weights_only` reads, nothing else.

A checkpoint from the internet is untrusted input, so files are only ever read with
`torch.load(weights_only=True)`; a crash or kill during a write never damages the previous file.
The only class beyond tensors and plain containers that a file may pickle is `argparse.Namespace`, because the
original SViTE checkpoints store their flags as one; it carries data, never code.
"""
from __future__ import annotations

import argparse
import errno
import os
import pickle
import random
import re
import secrets
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a hidden temporary file in the same folder, fsync, then rename over `path`.

    The temporary file is created with mode 0o666 minus the umask, like any other file the user writes (mkstemp's
    0600 would hide checkpoints from teammates). On any failure it is removed and `path` keeps its previous
    content; a full disk or quota raises an OSError that names the file and the free space.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(path.parent).free
            kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
            raise OSError(f"no space left to write {path} ({free / 2**20:.0f} MiB free; {kept}); free space "
                          "or move --output_dir") from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a PyTorch checkpoint (zip or legacy pickle) or a safetensors file safely.

    Every failure names the file and what is wrong with it: missing, not a checkpoint at all, truncated or corrupt,
    pickling a forbidden object (refused before any of its code can run), or holding something other than a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (check --resume)")
    kind = file_kind(path)
    if kind == "safetensors":
        return _load_safetensors(path, map_location)
    if kind is None:
        raise ValueError(f"{path} is not a checkpoint: it is neither a PyTorch file (zip or pickle) nor a "
                         "safetensors file; pass the .pth / .safetensors file written by training or by timm")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        forbidden = re.search(r"GLOBAL ([\w.]+)", str(e))
        reason = (f"it pickles {forbidden.group(1)}, and unpickling that could run arbitrary code" if forbidden
                  else "it uses pickle features the safe unpickler does not accept: "
                  + str(e).split("WeightsUnpickler error:")[-1].strip().split("\n")[0])
        raise ValueError(
            f"refusing to load {path}: {reason}. Only tensors, plain containers and argparse.Namespace are accepted; "
            "if you trust the file, re-save its state_dict with torch.save from the code that wrote it."
        ) from e
    except (RuntimeError, EOFError, KeyError, zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or state_dict")
    return obj


def file_kind(path: Path) -> str | None:
    """``zip`` (torch.save since 1.6), ``pickle`` (legacy torch.save), ``safetensors``, or None, from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" or head[:1] == b"\x8a":  # pickle PROTO opcode, or the legacy torch magic number (a long)
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < path.stat().st_size:
        return "safetensors"
    return None


def _load_safetensors(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """A safetensors state_dict; this project's compressed sparse export (``model.sparse.safetensors``) decoded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from interop.export import is_sparse_file, load_sparse  # export builds models; imported only when needed

    try:
        if is_sparse_file(path):
            return {k: v.to(map_location) for k, v in load_sparse(path).items()}
        return load_file(path, device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from, in `weights_only`-loadable form."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured, so a resumed run draws the same numbers as an uninterrupted one."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def same_state(a: object, b: object) -> bool:
    """Exact equality of nested checkpoint state (tensors compared bit for bit, dtypes included): what a bit-exact
    resume is checked with."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b
