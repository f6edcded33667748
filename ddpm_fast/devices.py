"""The one device check and the one table of dtype names, shared by sampling, checkpoints and training.

The package runs on CPU and CUDA only. Anything else (meta, mps, xpu, a CUDA index past the last GPU,
a misspelt name) is refused with a ValueError naming the device, before any tensor moves: `meta` in
particular would otherwise turn a caller's weights into shapes without data.
"""
from __future__ import annotations

from typing import Union

import torch

SUPPORTED = ("cpu", "cuda")


def parse_device(device: Union[str, torch.device, int], what: str = "device") -> torch.device:
    """`device` as a torch.device of type cpu or cuda (an index is added to a bare 'cuda'); `what`
    names the argument in the error message (e.g. '--device')."""
    if isinstance(device, str) and not device.strip():
        raise ValueError(f"{what} must not be empty (cpu, cuda, cuda:1, ...)")
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise ValueError(f"{what} must be a device name such as 'cpu' or 'cuda', got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{what}: not a device name: {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type not in SUPPORTED:
        raise ValueError(f"{what} {str(dev)!r} is not supported: ddpm_fast runs on {' or '.join(SUPPORTED)}")
    if dev.type == "cpu" and dev.index not in (None, 0):
        # torch accepts 'cpu:7' and runs on the one CPU device: a typo for cuda:7, not a request.
        raise ValueError(f"{what} {str(dev)!r}: there is one CPU device ('cpu'); did you mean 'cuda:{dev.index}'?")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {str(dev)!r} requested but CUDA is not available on this machine")
        n = torch.cuda.device_count()
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= n:
            raise ValueError(f"{what} {str(dev)!r}: this machine has {n} CUDA device(s) (cuda:0 to cuda:{n - 1})")
    return dev


# The names sample(), load_checkpoint and the CLI accept for a dtype.
DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
               "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
# The dtypes a UNet runs in while sampling (x_t itself stays float32).
RUN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The dtypes weights may be stored and loaded in. float8 and friends are refused: they are not a dtype the
# UNet runs in, and isfinite is not even implemented for them.
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def parse_dtype(dtype, allowed=RUN_DTYPES, what: str = "dtype") -> torch.dtype:
    """`dtype` (a torch dtype or a name in DTYPE_NAMES) as a torch dtype from `allowed`, else a ValueError."""
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"unknown {what} {dtype!r}; choose one of {sorted(DTYPE_NAMES)} or a torch dtype")
        dtype = DTYPE_NAMES[dtype]
    if not isinstance(dtype, torch.dtype) or dtype not in allowed:
        names = [str(d).replace("torch.", "") for d in allowed]
        names = ", ".join(names[:-1]) + " or " + names[-1]
        raise ValueError(f"{what} must be one of {names}, got {dtype!r}")
    return dtype


# CPU feature flags (Linux /proc/cpuinfo names) that give native bfloat16 arithmetic: AVX512_BF16's
# dot-product and conversion instructions, or AMX's bf16 tile multiply, which oneDNN's bf16 convolutions
# and matmuls use. Without them torch's CPU bf16 ops emulate it through fp32 (slower than fp32 itself).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple:
    """The CPU_BF16_FLAGS this CPU reports, read from `cpuinfo` (detected, never assumed: () where the file
    is missing, as on macOS or Windows, so bf16 counts as not native there)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ()
    return tuple(flag for flag in CPU_BF16_FLAGS if flag in flags)


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when this CPU does bfloat16 natively (see CPU_BF16_FLAGS)."""
    return bool(cpu_bf16_flags(cpuinfo))
