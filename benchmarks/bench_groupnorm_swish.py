"""groupnorm_swish: GroupNorm (+ per-channel add) + Swish at the presets' real layer shapes.

Providers, side by side per case (one benchmark group per shape / batch / dtype / layout):
  reference  eager PyTorch, the spec: x + add, F.group_norm, x * sigmoid(x) (several kernels)
  compiled   torch.compile of the reference (fullgraph, static shapes); GPU only: the bar to beat
  fast       the registered op ddpm_fast::groupnorm_swish as the fused UNet calls it (checks, output
             allocation, kernel): the Triton kernel on CUDA, the C++ kernel (csrc/groupnorm_swish_cpu.cpp) on CPU
  cpp        CPU only: the C++ kernel alone (ddpm_fast::groupnorm_swish_out into a preallocated output), so
             the gap to `fast` is the Python wrapper's cost; skipped where the extension is not built
  copy       y.copy_(x) of the same tensor: reads and writes the bytes the fused op must move, so
             its GB/s is the bandwidth ceiling (the issue's target: fast >= 80% of it at batch >= 32)

bytes (extra_info) = x read + y written + add, weight and bias read once: the fewest the op can
move. The fused plan moves exactly that; the looped/split plans read x twice (see the op module).
On CUDA the fast provider also records the copy's GB/s on the same bytes and its own fraction of it
(`copy_GB/s`, `frac_of_copy`), and the plan it ran (`plan`).

Grid: shapes measured from the presets' UNets (ddpm_fast.testing.shapes.unet_groupnorm_shapes).
CPU: a digits16 and two cifar35m shapes (the shipped model's and the paper model's), batch 1 and 16, fp32,
NCHW: seconds. GPU: a representative shape per kind for
labml-cifar32 and cifar35m at batch 1 and 64, fp32 and bf16, NCHW; DDPM_FAST_BENCH_FULL=1 takes every
distinct preset shape, batches 1/32/64/256, fp32/fp16/bf16 and both layouts.
Knobs (comma-separated): DDPM_FAST_BENCH_BATCHES, DDPM_FAST_BENCH_DTYPES, DDPM_FAST_BENCH_LAYOUTS
(nchw, cl), DDPM_FAST_BENCH_PRESETS (restricts the shapes to those presets).
"""
import importlib

import pytest
import torch

from conftest import (DEVICE, DTYPES, FULL, HAS_CUDA, PROVIDERS, check_output, compiled, copy_gbs, op_grid,
                      run_bench)
from ddpm_fast.config import PRESETS
from ddpm_fast.reference import functional as ref
from ddpm_fast.testing.shapes import unet_groupnorm_shapes

M = importlib.import_module("ddpm_fast.ops.groupnorm_swish")

# (preset, C, H, W, groups, has_add): every shape is checked against the preset's measured list below.
if HAS_CUDA:
    _REPRESENTATIVE = [
        ("labml-cifar32", 64, 32, 32, 32, True),     # norm2 at 32x32 (2 channels per group, add)
        ("labml-cifar32", 64, 32, 32, 8, False),     # final GroupNorm(8) at 32x32
        ("labml-cifar32", 256, 8, 8, 32, True),
        ("labml-cifar32", 2048, 4, 4, 32, False),    # widest up block
        ("cifar35m", 128, 32, 32, 8, False),         # largest group: 16 x 1024
        ("cifar35m", 256, 32, 32, 32, False),
        ("cifar35m", 256, 16, 16, 32, True),
        ("cifar35m", 512, 4, 4, 32, False),
    ]
    _BATCHES = ["1", "32", "64", "256"] if FULL else ["1", "64"]
    _DTYPES = ["fp32", "fp16", "bf16"] if FULL else ["fp32", "bf16"]
    _LAYOUTS = ["nchw", "cl"] if FULL else ["nchw"]
else:
    _REPRESENTATIVE = [("digits16", 32, 16, 16, 8, True), ("digits16", 256, 4, 4, 8, False),
                       ("cifar35m", 128, 32, 32, 8, False), ("cifar35m", 256, 16, 16, 32, True)]
    _BATCHES, _DTYPES, _LAYOUTS = ["1", "16"], ["fp32"], ["nchw"]

_MEASURED = {name: unet_groupnorm_shapes(cfg.unet) for name, cfg in PRESETS.items()}
if FULL:
    _SHAPES = []
    for _p in ("labml-cifar32", "cifar35m", "tiny", "digits16"):
        for _s in _MEASURED[_p]:
            if all(_s != s[1:] for s in _SHAPES):  # a shape shared by two presets runs once
                _SHAPES.append((_p, *_s))
else:
    _SHAPES = list(_REPRESENTATIVE)
SHAPES, BATCHES, BENCH_DTYPES, LAYOUTS = op_grid(_SHAPES, _MEASURED, _BATCHES, _DTYPES, _LAYOUTS, "GroupNorm")
BENCH_PROVIDERS = PROVIDERS + ([] if HAS_CUDA else ["cpp"]) + ["copy"]


def shape_id(s):
    p, c, h, w, g, add = s
    return f"{p}-C{c}-{h}x{w}-G{g}" + ("-add" if add else "")


def _inputs(shape, batch, dtype, layout):
    _, c, h, w, g, has_add = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, h, w, generator=gen) * 1.5 + 0.3
    weight = 1.0 + 0.5 * torch.randn(c, generator=gen)
    bias = 0.5 * torch.randn(c, generator=gen)
    add = torch.randn(batch, c, generator=gen) if has_add else None
    dt = DTYPES[dtype]
    x = x.to(device=DEVICE, dtype=dt)
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last)
    weight, bias = weight.to(DEVICE, dt), bias.to(DEVICE, dt)
    add = add.to(DEVICE, dt) if add is not None else None
    return x, weight, bias, g, add


def _nbytes(x, weight, bias, add):
    n = 2 * x.numel() * x.element_size() + (weight.numel() + bias.numel()) * weight.element_size()
    return n + (add.numel() * add.element_size() if add is not None else 0)


@pytest.mark.parametrize("provider", BENCH_PROVIDERS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", BENCH_DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_groupnorm_swish(benchmark, shape, batch, dtype, layout, provider):
    x, weight, bias, g, add = _inputs(shape, batch, dtype, layout)
    nbytes = _nbytes(x, weight, bias, add)
    info = dict(preset=shape[0], C=shape[1], H=shape[2], W=shape[3], groups=g, add=add is not None,
                batch=batch, dtype=dtype, layout=layout)
    if provider == "reference":
        fn = lambda: ref.groupnorm_swish(x, weight, bias, g, 1e-5, add)  # noqa: E731
    elif provider == "compiled":
        cfn = compiled(ref.groupnorm_swish)
        fn = lambda: cfn(x, weight, bias, g, 1e-5, add)  # noqa: E731
    elif provider == "fast":
        fn = lambda: M.groupnorm_swish(x, weight, bias, g, 1e-5, add)  # noqa: E731
        if HAS_CUDA:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            cl = x.stride(1) == 1 and x.shape[1] > 1
            p = M.plan(batch, x.shape[1], x.shape[2] * x.shape[3], g, cl, sms)
            info["plan"] = f"{p['variant']} GB={p['GB']} S={p['S']} tile={p['BLOCK_HW']}x{p['BLOCK_CC']}"
            info["copy_GB/s"] = copy_gbs(nbytes)
    elif provider == "cpp":
        if not M.HAS_CPP_KERNEL:
            pytest.skip("the C++ CPU kernel is not built (python setup.py build_ext --inplace)")
        out, kernel = torch.empty_like(x), torch.ops.ddpm_fast.groupnorm_swish_out.default
        fn = lambda: (kernel(x, weight, bias, g, 1e-5, add, True, out), out)[1]  # noqa: E731
    else:  # copy: the same bytes as the op (credited with nbytes, so it must move exactly that), no arithmetic
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=DEVICE)
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731
    run_bench(benchmark, fn, nbytes=nbytes, **info)
    if provider not in ("reference", "copy"):
        check_output(fn, ref.groupnorm_swish(x, weight, bias, g, 1e-5, add), f"groupnorm_swish/{provider}")
    if provider == "fast" and "GB/s" in benchmark.extra_info and "copy_GB/s" in info:
        benchmark.extra_info["frac_of_copy"] = benchmark.extra_info["GB/s"] / info["copy_GB/s"]
