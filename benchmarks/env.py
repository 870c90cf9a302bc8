"""What the benchmark ran on, and what that device can run (AMP dtypes, torch.compile)."""
from __future__ import annotations

import contextlib
import datetime
import importlib.util
import os
import platform
import re
import shutil
from typing import Iterator

import timm
import torch

# name -> autocast dtype. "float32" is strict IEEE float32 (TF32 off); "tf32" is float32 storage with TF32 tensor-core
# matmuls and convolutions, a CUDA-only mode that the protocol asks to report separately.
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "tf32": None, "amp_bf16": torch.bfloat16,
                                             "amp_fp16": torch.float16}


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (platform's guess where that file is missing)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(device: torch.device) -> str:
    """A file-name-safe device label: 'cpu', or the GPU name lower-cased (e.g. 'nvidia-h100-80gb-hbm3')."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def amp_unsupported_reason(device: torch.device, amp_dtype: torch.dtype | None) -> str | None:
    """Why autocast to `amp_dtype` is not worth measuring on `device`; None when it is (or for float32).

    On CPU this asks oneDNN for native bf16/fp16 kernels: without them autocast falls back to emulation
    that is slower than float32, which would report a precision the hardware does not have.
    """
    if amp_dtype is None:
        return None
    label = str(amp_dtype).removeprefix("torch.")
    if device.type == "cuda":
        if amp_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return f"{device_name(device)} has no native bfloat16"
        return None
    if device.type == "cpu":
        native = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
                  torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}[amp_dtype]()
        return None if native else f"this CPU ({device_name(device)}) has no native {label} kernels"
    if not torch.amp.is_autocast_available(device.type):
        return f"torch has no autocast for {device.type}"
    return None


def precision_unsupported_reason(device: torch.device, precision: str) -> str | None:
    """Why `precision` (a `PRECISIONS` name) is not worth measuring on `device`; None when it is."""
    if precision == "tf32":
        if device.type != "cuda":
            return "TF32 is a CUDA tensor-core mode"
        major, _ = torch.cuda.get_device_capability(device)
        return None if major >= 8 else f"{device_name(device)} has no TF32 tensor cores (compute capability < 8.0)"
    return amp_unsupported_reason(device, PRECISIONS[precision])


@contextlib.contextmanager
def float32_matmul(device: torch.device, precision: str) -> Iterator[None]:
    """TF32 on for the "tf32" precision and off for every other one, restored afterwards.

    Explicit both ways, so a "float32" row never silently uses TF32 (cuDNN convolutions default to it).
    """
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def compile_unsupported_reason(device: torch.device) -> str | None:
    """Why torch.compile (inductor) cannot run on `device`; None when it can."""
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") else "triton is not installed"
    if device.type == "cpu":
        compiler = os.environ.get("CXX", "g++")
        return None if shutil.which(compiler) else f"inductor needs a C++ compiler and {compiler!r} is not on PATH"
    return f"inductor is not set up for {device.type} here"


def environment(device: torch.device) -> dict[str, str | int]:
    """The per-row record of versions, device, thread count and date."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "date": datetime.date.today().isoformat(),
    }
