"""conv_transpose2d: the UNet's Upsample (ConvTranspose2d 4x4, stride 2, padding 1), cuDNN against the
parity-split Triton kernel, at the presets' real shapes.

Providers, side by side per case (as in bench_conv2d.py, which explains the choice):
  reference         eager F.conv_transpose2d with bias: the spec
  fast              the registered op ddpm_fast::conv_transpose2d, whatever its rule picks
  reference-graph   F.conv_transpose2d replayed from a CUDA graph (GPU only): cuDNN's kernel time, the bar
  triton-graph      the Triton launcher, forced, replayed from a CUDA graph (GPU only)

flops = 2 * B*Ho*Wo * C_out * C_in*4 (each output takes 2x2 of the 4x4 taps); bytes = x + weight read,
output written once. CPU: one small shape, batch 1, fp32. GPU: the cifar35m Upsamples and labml-cifar32's
first, batch 1 and 64, fp32 and bf16, NCHW; DDPM_FAST_BENCH_FULL=1 adds batches 16/256, fp16 and
channels_last. Knobs: DDPM_FAST_BENCH_BATCHES, _DTYPES, _LAYOUTS, _PRESETS.
"""
import importlib

import pytest
import torch

from conftest import DEVICE, DTYPES, FULL, HAS_CUDA, check_output, cuda_graphed, op_grid, run_bench
from ddpm_fast.config import PRESETS
from ddpm_fast.reference import functional as ref
from ddpm_fast.testing.shapes import unet_upsample_shapes

M = importlib.import_module("ddpm_fast.ops.conv_transpose2d")
S, P = (2, 2), (1, 1)

# (preset, C, H, W) of the Upsample's input (C_out = C).
if HAS_CUDA:
    _SHAPES = [("cifar35m", 128, 16, 16), ("cifar35m", 256, 8, 8), ("cifar35m", 256, 4, 4),
               ("labml-cifar32", 64, 16, 16)]
    _BATCHES = ["1", "16", "64", "256"] if FULL else ["1", "64"]
    _DTYPES = ["fp32", "fp16", "bf16"] if FULL else ["fp32", "bf16"]
    _LAYOUTS = ["nchw", "cl"] if FULL else ["nchw"]
    _PROVIDERS = ["reference", "fast", "reference-graph", "triton-graph"]
else:
    _SHAPES = [("tiny", 32, 8, 8)]
    _BATCHES, _DTYPES, _LAYOUTS = ["1"], ["fp32"], ["nchw"]
    _PROVIDERS = ["reference", "fast"]

SHAPES, BATCHES, BENCH_DTYPES, LAYOUTS = op_grid(
    _SHAPES, {name: unet_upsample_shapes(cfg.unet) for name, cfg in PRESETS.items()}, _BATCHES, _DTYPES,
    _LAYOUTS, "Upsample")


@pytest.mark.parametrize("provider", _PROVIDERS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", BENCH_DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "{}-C{}-{}x{}".format(*s))
def test_conv_transpose2d(benchmark, shape, batch, dtype, layout, provider):
    _, c, h, w = shape
    gen = torch.Generator().manual_seed(0)
    dt = DTYPES[dtype]
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    x = torch.randn(batch, c, h, w, generator=gen).to(DEVICE, dt).contiguous(memory_format=fmt)
    wt = (torch.randn(c, c, 4, 4, generator=gen) / (4 * c) ** 0.5).to(DEVICE, dt)
    b = (0.3 * torch.randn(c, generator=gen)).to(DEVICE, dt)
    out_elems = batch * c * 4 * h * w
    flops = 2 * out_elems * c * 4
    nbytes = (x.numel() + wt.numel() + out_elems) * x.element_size()
    info = dict(preset=shape[0], C=c, H=h, W=w, batch=batch, dtype=dtype, layout=layout,
                rule_picks_triton=M.use_triton(x, wt, S, P))
    if provider == "reference":
        fn = lambda: ref.conv_transpose2d(x, wt, b, S, P)  # noqa: E731
    elif provider == "fast":
        fn = lambda: M.conv_transpose2d(x, wt, b, S, P)  # noqa: E731
    elif provider == "reference-graph":
        fn = cuda_graphed(lambda: ref.conv_transpose2d(x, wt, b, S, P))
    else:
        fn = cuda_graphed(lambda: M.conv_transpose2d_triton(x, wt, b, S, P))
    run_bench(benchmark, fn, nbytes=nbytes, flops=flops, **info)
    if provider != "reference":
        check_output(fn, ref.conv_transpose2d(x, wt, b, S, P), f"conv_transpose2d/{provider}")
