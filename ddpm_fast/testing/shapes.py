"""The layer shapes a UNet feeds each op, measured by running it on the meta device: what the op tests and
benchmarks run at, so they use exactly the shapes the presets' models produce."""
from __future__ import annotations

import types
from typing import Callable

import torch

from ..reference import functional as _ref

__all__ = ["unet_op_shapes", "unet_conv_shapes", "unet_upsample_shapes", "unet_groupnorm_shapes",
           "unet_residual_shapes"]


def unet_op_shapes(config, op_name: str, key: Callable[..., tuple]) -> list:
    """Every distinct key(*args, **kwargs) over the calls a UNet of `config` (a UNetConfig, or a DDPMUNetConfig
    for the DDPM UNet) makes to the reference op `op_name`.

    Measured, not derived: the UNet is built on the meta device and run once with a recording op
    namespace, so tests and benchmarks use exactly the shapes the model produces.
    """
    from ..reference import build_unet
    from ..reference.unet import OpsModule

    seen = set()
    ns = types.SimpleNamespace(**{k: getattr(_ref, k) for k in _ref.__all__})
    real = getattr(_ref, op_name)

    def record(*args, **kwargs):
        seen.add(key(*args, **kwargs))
        return real(*args, **kwargs)  # meta tensors: shapes only, no arithmetic

    setattr(ns, op_name, record)
    with torch.device("meta"):
        model = build_unet(config)
        for m in model.modules():
            if isinstance(m, OpsModule):
                m.F = ns
        x = torch.empty(1, config.image_channels, config.image_size, config.image_size)
        model(x, torch.zeros(1, dtype=torch.long))
    return sorted(seen)


def unet_conv_shapes(config) -> list:
    """conv2d: every distinct (C_in, H, W, C_out, K, stride, has_bias) a UNet of `config` (a UNetConfig) feeds
    the op (K: square kernel size), largest H * W * C_out first. Measured on the meta device."""

    def key(x, weight, bias, stride, padding):
        return (x.shape[1], x.shape[2], x.shape[3], weight.shape[0], weight.shape[2], tuple(stride)[0],
                bias is not None)

    return sorted(unet_op_shapes(config, "conv2d", key), key=lambda r: (-r[1] * r[2] * r[3], r))


def unet_upsample_shapes(config) -> list:
    """conv_transpose2d: every distinct (C, H, W) input a UNet of `config` (a UNetConfig) feeds the op (C_out = C)."""

    def key(x, weight, bias, stride, padding):
        return (x.shape[1], x.shape[2], x.shape[3])

    return sorted(unet_op_shapes(config, "conv_transpose2d", key), key=lambda r: (-r[1] * r[2], r))


def unet_groupnorm_shapes(config) -> list:
    """groupnorm_swish: every distinct (C, H, W, num_groups, has_add) a UNet of `config` (a UNetConfig) feeds the op,
    measured on the meta device, largest H*W first."""

    def key(x, weight, bias, num_groups, eps=1e-5, add=None, swish=True):
        return (x.shape[1], x.shape[2], x.shape[3], num_groups, add is not None)

    return sorted(unet_op_shapes(config, "groupnorm_swish", key), key=lambda r: (-r[1] * r[2], r[0], r[3], r[4]))


def unet_residual_shapes(config) -> list:
    """residual_add: every distinct (C, H, W, shortcut) a UNet of `config` (a UNetConfig) feeds the op; shortcut is
    "conv" (a 1x1 shortcut conv, with residual_bias) or "identity". Measured on the meta device."""

    def key(x, bias, residual, residual_bias=None):
        return (x.shape[1], x.shape[2], x.shape[3], "identity" if residual_bias is None else "conv")

    return sorted(unet_op_shapes(config, "residual_add", key), key=lambda r: (-r[1] * r[2], r[0], r[3]))
