"""The layer shapes a UNet feeds an op, measured by running it, for tests and benchmarks."""
from __future__ import annotations

import types
from typing import Callable

import torch

from ..reference import functional as _ref


def unet_op_shapes(config, op_name: str, key: Callable[..., tuple]) -> list:
    """Every distinct key(*args, **kwargs) over the calls a UNet of `config` (a UNetConfig) makes to
    the reference op `op_name`.

    Measured, not derived: the UNet is built on the meta device and run once with a recording op
    namespace, so tests and benchmarks use exactly the shapes the model produces.
    """
    from ..reference.unet import OpsModule, UNet

    seen = set()
    ns = types.SimpleNamespace(**{k: getattr(_ref, k) for k in _ref.__all__})
    real = getattr(_ref, op_name)

    def record(*args, **kwargs):
        seen.add(key(*args, **kwargs))
        return real(*args, **kwargs)  # meta tensors: shapes only, no arithmetic

    setattr(ns, op_name, record)
    with torch.device("meta"):
        model = UNet(config)
        for m in model.modules():
            if isinstance(m, OpsModule):
                m.F = ns
        x = torch.empty(1, config.image_channels, config.image_size, config.image_size)
        model(x, torch.zeros(1, dtype=torch.long))
    return sorted(seen)
