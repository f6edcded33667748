"""When an op wrapper may run its implementation itself instead of through the torch.library dispatcher.

A call through `torch.ops.ddpm_fast.<name>` costs ~8 us of Python dispatch per call beyond the work
(measured on the dev CPU: groupnorm_swish at [1, 32, 8, 8] took 15.2 us through the op, 6.9 us as the
plain reference call), paid ~200 times per eager forward of the fused cifar35m UNet. Plain eager calls
skip it and run exactly what the op's kernel for that device would run. Everything that relies on the
op staying one opaque node keeps it: torch.compile / export tracing, an active dispatch mode
(FakeTensorMode, FlopCounterMode, the tests' op counters), tensor subclasses (fake, functional), and
autograd recording (the ops have no backward; through the dispatcher that is an error, not a silently
differentiable result).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain_eager(*tensors: Optional[torch.Tensor]) -> bool:
    """True when a call with these tensor arguments (None allowed) may bypass the dispatcher."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN or (grad and t.requires_grad):
            return False
    return True


def autocast_hint(x: torch.Tensor) -> str:
    """Appended to a dtype-mismatch error: under torch.autocast the reference's convs and linears cast
    their inputs, but the fused ops take tensors as they are, so a model must be converted instead."""
    if torch.is_autocast_enabled(x.device.type):
        return (" (torch.autocast is on: the fused ops do not autocast; convert the model with .to(dtype), "
                "as sample(dtype=...) does)")
    return ""
