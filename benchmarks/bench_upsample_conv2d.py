"""upsample_conv2d: the DDPM (diffusers) UNet's Upsample (nearest x2 + 3x3 conv, padding 1), the spec against
the fast op (the 3x3 kernel folded into a 4x4 stride-2 transposed conv on conv_transpose2d's kernel).

Providers, side by side per case (as in bench_conv_transpose2d.py):
  reference         eager F.interpolate + F.conv2d: the spec
  fast              the registered op ddpm_fast::upsample_conv2d (CPU: CPU_FOLDED's choice; CUDA: the fold
                    + ops.conv_transpose2d, whatever its rule picks)
  folded            the fold + torch's own F.conv_transpose2d (the CPU alternative CPU_FOLDED names)
  reference-graph   the spec replayed from a CUDA graph (GPU only): the bar
  triton-graph      the fold + the conv_transpose2d Triton launcher, forced, from a CUDA graph (GPU only)

flops = 2 * B*(2H)*(2W) * C_out * C_in*9, the spec's conv (the folded transposed conv does 4/9 of it);
bytes = x + weight read, output written once. The shapes are the Upsample inputs of diffusers' UNet2DModel
configs (no ddpm_fast preset holds them yet): ddpm-cifar10-32 (C=256 at 4x4, 8x8, 16x16) and the 256x256
layout (celebahq/church: C=512 at 8x8 and 16x16, 256 at 32x32 and 64x64, 128 at 128x128). CPU: cifar10-32's
smallest, batch 1, fp32. GPU: all, batch 1 and 64 (256x256 layout: batch 1), fp32 and bf16, NCHW;
DDPM_FAST_BENCH_FULL=1 adds batch 16, fp16 and channels_last. Knobs: DDPM_FAST_BENCH_BATCHES, _DTYPES,
_LAYOUTS, _PRESETS.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, DTYPES, FULL, HAS_CUDA, check_output, cuda_graphed, op_grid, run_bench
from ddpm_fast.reference import functional as ref

M = importlib.import_module("ddpm_fast.ops.upsample_conv2d")
CT = importlib.import_module("ddpm_fast.ops.conv_transpose2d")

# (model, C, H, W) of the Upsample's input (C_out = C), read off the diffusers configs (module docstring).
MEASURED = {"ddpm-cifar10-32": [(256, 4, 4), (256, 8, 8), (256, 16, 16)],
            "ddpm-256": [(512, 8, 8), (512, 16, 16), (256, 32, 32), (256, 64, 64), (128, 128, 128)]}
if HAS_CUDA:
    _SHAPES = [(name, *s) for name, shapes in MEASURED.items() for s in shapes]
    _BATCHES = ["1", "16", "64"] if FULL else ["1", "64"]
    _DTYPES = ["fp32", "fp16", "bf16"] if FULL else ["fp32", "bf16"]
    _LAYOUTS = ["nchw", "cl"] if FULL else ["nchw"]
    _PROVIDERS = ["reference", "fast", "folded", "reference-graph", "triton-graph"]
else:
    _SHAPES = [("ddpm-cifar10-32", 256, 4, 4)]
    _BATCHES, _DTYPES, _LAYOUTS = ["1"], ["fp32"], ["nchw"]
    _PROVIDERS = ["reference", "fast", "folded"]

SHAPES, BATCHES, BENCH_DTYPES, LAYOUTS = op_grid(_SHAPES, MEASURED, _BATCHES, _DTYPES, _LAYOUTS, "Upsample")


@pytest.mark.parametrize("provider", _PROVIDERS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", BENCH_DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "{}-C{}-{}x{}".format(*s))
def test_upsample_conv2d(benchmark, shape, batch, dtype, layout, provider):
    name, c, h, w = shape
    if name == "ddpm-256" and batch > 1:
        pytest.skip("the 256x256 layout's Upsamples are timed at batch 1 (64 images of 128x128x128 is 0.5 GB)")
    gen = torch.Generator().manual_seed(0)
    dt = DTYPES[dtype]
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    x = torch.randn(batch, c, h, w, generator=gen).to(DEVICE, dt).contiguous(memory_format=fmt)
    wt = (torch.randn(c, c, 3, 3, generator=gen) / (9 * c) ** 0.5).to(DEVICE, dt)
    b = (0.3 * torch.randn(c, generator=gen)).to(DEVICE, dt)
    out_elems = batch * c * 4 * h * w
    flops = 2 * out_elems * c * 9
    nbytes = (x.numel() + wt.numel() + out_elems) * x.element_size()
    info = dict(preset=name, C=c, H=h, W=w, batch=batch, dtype=dtype, layout=layout, cpu_folded=M.CPU_FOLDED,
                rule_picks_triton=CT.use_triton(x, M.fold_weight(wt), (2, 2), (1, 1)))
    if provider == "reference":
        fn = lambda: ref.upsample_conv2d(x, wt, b)  # noqa: E731
    elif provider == "fast":
        fn = lambda: M.upsample_conv2d(x, wt, b)  # noqa: E731
    elif provider == "folded":
        fn = lambda: F.conv_transpose2d(x, M.fold_weight(wt), b, 2, 1)  # noqa: E731
    elif provider == "reference-graph":
        fn = cuda_graphed(lambda: ref.upsample_conv2d(x, wt, b))
    else:
        fn = cuda_graphed(lambda: M.upsample_conv2d_folded(x, wt, b, force_triton=True))
    run_bench(benchmark, fn, nbytes=nbytes, flops=flops, **info)
    if provider != "reference":
        check_output(fn, ref.upsample_conv2d(x, wt, b), f"upsample_conv2d/{provider}")
