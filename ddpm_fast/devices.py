"""The one device check shared by sampling, checkpoint loading and training.

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
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {str(dev)!r} requested but CUDA is not available on this machine")
        n = torch.cuda.device_count()
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.index >= n:
            raise ValueError(f"{what} {str(dev)!r}: this machine has {n} CUDA device(s) (cuda:0 to cuda:{n - 1})")
    return dev
