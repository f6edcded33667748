"""residual_add: the ResidualBlock's output, conv2(h) + bias + shortcut (+ shortcut bias), at the presets'
real shapes.

Providers, side by side per case:
  reference  eager PyTorch, the spec: x + bias, + residual, + residual_bias (up to three kernels; the
             UNet before this op ran the biases inside the convs, which costs the same passes)
  compiled   torch.compile of the reference (GPU only): inductor fuses the adds into one kernel too,
             so this is the bar
  fast       the registered op ddpm_fast::residual_add as the fused UNet calls it (the Triton kernel on
             CUDA, the C++ kernel csrc/residual_add_cpu.cpp on CPU)
  cpp        CPU only: the C++ kernel alone (ddpm_fast::residual_add_out into a preallocated output): the
             gap to `fast` is the wrapper's cost; skipped where the extension is not built
  fast-graph the op replayed from a CUDA graph (GPU only): kernel time without the eager launch cost,
             as the sampler runs it
  copy       a device copy of the same number of bytes: the bandwidth ceiling

bytes = x and residual read + output written (biases are O(C)). Grid: shapes measured from the presets'
UNets (ddpm_fast.testing.shapes.unet_residual_shapes). CPU: a digits16 and a cifar35m shape, batch 1 and 16, fp32. GPU: four
representative shapes at batch 1 and 64, fp32 and bf16, NCHW; DDPM_FAST_BENCH_FULL=1 adds batches 16/256,
fp16 and channels_last. Knobs: DDPM_FAST_BENCH_BATCHES, _DTYPES, _LAYOUTS (nchw, cl), _PRESETS.
"""
import importlib

import pytest
import torch

from conftest import (DEVICE, DTYPES, FULL, HAS_CUDA, PROVIDERS, check_output, compiled, copy_gbs, cuda_graphed, op_grid,
                      run_bench)
from ddpm_fast.config import PRESETS
from ddpm_fast.reference import functional as ref
from ddpm_fast.testing.shapes import unet_residual_shapes

M = importlib.import_module("ddpm_fast.ops.residual_add")

# (preset, C, H, W, shortcut): each is checked against the preset's measured list below.
if HAS_CUDA:
    _SHAPES = [
        ("cifar35m", 128, 32, 32, "conv"),           # first up blocks: the largest activation
        ("cifar35m", 256, 16, 16, "identity"),
        ("labml-cifar32", 64, 32, 32, "identity"),
        ("labml-cifar32", 1024, 4, 4, "identity"),   # middle: few elements, many channels
    ]
    _BATCHES = ["1", "16", "64", "256"] if FULL else ["1", "64"]
    _DTYPES = ["fp32", "fp16", "bf16"] if FULL else ["fp32", "bf16"]
    _LAYOUTS = ["nchw", "cl"] if FULL else ["nchw"]
    _PROVIDERS = PROVIDERS + ["fast-graph", "copy"]
else:
    _SHAPES = [("digits16", 32, 16, 16, "identity"), ("cifar35m", 128, 32, 32, "conv")]
    _BATCHES, _DTYPES, _LAYOUTS = ["1", "16"], ["fp32"], ["nchw"]
    _PROVIDERS = PROVIDERS + ["cpp"]

SHAPES, BATCHES, BENCH_DTYPES, LAYOUTS = op_grid(
    _SHAPES, {name: unet_residual_shapes(cfg.unet) for name, cfg in PRESETS.items()}, _BATCHES, _DTYPES,
    _LAYOUTS, "ResidualBlock output")


def shape_id(s):
    p, c, h, w, kind = s
    return f"{p}-C{c}-{h}x{w}-{kind}"


def _inputs(shape, batch, dtype, layout):
    _, c, h, w, kind = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, h, w, generator=gen) * 2.0
    r = torch.randn(batch, c, h, w, generator=gen) + 0.5
    b = 0.3 * torch.randn(c, generator=gen)
    rb = 0.3 * torch.randn(c, generator=gen) if kind == "conv" else None
    dt = DTYPES[dtype]
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    x = x.to(device=DEVICE, dtype=dt).contiguous(memory_format=fmt)
    r = r.to(device=DEVICE, dtype=dt).contiguous(memory_format=fmt)
    return x, b.to(DEVICE, dt), r, rb.to(DEVICE, dt) if rb is not None else None


@pytest.mark.parametrize("provider", _PROVIDERS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", BENCH_DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_residual_add(benchmark, shape, batch, dtype, layout, provider):
    x, b, r, rb = _inputs(shape, batch, dtype, layout)
    nbytes = 3 * x.numel() * x.element_size()
    info = dict(preset=shape[0], C=shape[1], H=shape[2], W=shape[3], shortcut=shape[4], batch=batch,
                dtype=dtype, layout=layout)
    if provider == "reference":
        fn = lambda: ref.residual_add(x, b, r, rb)  # noqa: E731
    elif provider == "compiled":
        cfn = compiled(ref.residual_add)
        fn = lambda: cfn(x, b, r, rb)  # noqa: E731
    elif provider == "fast":
        fn = lambda: M.residual_add(x, b, r, rb)  # noqa: E731
    elif provider == "fast-graph":
        fn = cuda_graphed(lambda: M.residual_add(x, b, r, rb))
    elif provider == "cpp":
        kernel = getattr(torch.ops.ddpm_fast, "residual_add_out", None)
        if kernel is None:
            pytest.skip("the C++ CPU kernel is not built (python setup.py build_ext --inplace)")
        out = torch.empty_like(x)
        fn = lambda: (kernel.default(x, b, r, rb, out), out)[1]  # noqa: E731
    else:  # copy: the same number of bytes, no arithmetic
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=DEVICE)
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731
    run_bench(benchmark, fn, nbytes=nbytes, **info)
    if provider == "copy":
        return
    if provider != "reference":
        check_output(fn, ref.residual_add(x, b, r, rb), f"residual_add/{provider}")
    if HAS_CUDA and provider.startswith("fast") and "GB/s" in benchmark.extra_info:
        copy = copy_gbs(nbytes)
        benchmark.extra_info["copy_GB/s"] = copy
        benchmark.extra_info["frac_of_copy"] = benchmark.extra_info["GB/s"] / copy
