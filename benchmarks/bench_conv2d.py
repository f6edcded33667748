"""conv2d: the UNet's convolutions, cuDNN against the split-K Triton kernel, at the presets' real shapes.

The question this file answers: at which shapes, batches and dtypes does `ddpm_fast::conv2d` beat cuDNN
(and so where should `use_triton` send a conv)? In the sampler the convs run inside a CUDA graph, so
the deciding providers are the graph ones.

Providers, side by side per case:
  reference         eager F.conv2d with bias (cuDNN on CUDA, oneDNN on CPU): the spec
  fast              the registered op ddpm_fast::conv2d, whatever its rule picks (on CPU: F.conv2d)
  reference-graph   F.conv2d replayed from a CUDA graph (GPU only): cuDNN's kernel time, the bar
  triton-graph      the Triton launcher, forced, replayed from a CUDA graph (GPU only)
  triton-clw-graph  the same with the weight in channels_last (C_in contiguous), to measure what packing
                    the weights once would buy: the NCHW kernel reads [C_out, C_in] weight tiles along C_in
(torch.compile is not a provider here: in its default mode inductor calls cuDNN for a convolution, which
is reference-graph; max-autotune's own conv templates are measured inside the whole UNet, bench_sampling.)

flops = 2 * B*Ho*Wo * C_out * C_in*KH*KW; bytes = x + weight read, output written once (the floor; the
split-K partials are extra traffic the kernel pays). CPU: two small shapes, batch 1, fp32. GPU: six
cifar35m/labml-cifar32 shapes at batch 1 and 64, fp32 and bf16, NCHW; DDPM_FAST_BENCH_FULL=1 adds
batches 16/256, fp16 and channels_last. Knobs: DDPM_FAST_BENCH_BATCHES, _DTYPES, _LAYOUTS, _PRESETS.
"""
import contextlib
import importlib

import pytest
import torch

from conftest import DEVICE, DTYPES, FULL, HAS_CUDA, check_output, cuda_graphed, op_grid, run_bench
from ddpm_fast import ops
from ddpm_fast.config import PRESETS
from ddpm_fast.reference import functional as ref
from ddpm_fast.testing.shapes import unet_conv_shapes

M = importlib.import_module("ddpm_fast.ops.conv2d")
G = importlib.import_module("ddpm_fast.ops._conv_gemm")

# (preset, C_in, H, W, C_out, K, stride, bias): each is checked against the preset's measured list below.
if HAS_CUDA:
    _SHAPES = [
        ("cifar35m", 128, 32, 32, 128, 3, 1, False),     # 32x32 level: the largest output
        ("cifar35m", 256, 16, 16, 256, 3, 1, False),     # 16x16 level
        ("cifar35m", 512, 4, 4, 256, 3, 1, False),       # 4x4 up block: 16 pixels, K = 4608
        ("cifar35m", 256, 32, 32, 128, 1, 1, False),     # 1x1 shortcut
        ("cifar35m", 128, 32, 32, 128, 3, 2, True),      # Downsample
        ("labml-cifar32", 2048, 4, 4, 1024, 3, 1, False),  # 75 MB of fp32 weights for 16 pixels
    ]
    _BATCHES = ["1", "16", "64", "256"] if FULL else ["1", "64"]
    _DTYPES = ["fp32", "fp16", "bf16"] if FULL else ["fp32", "bf16"]
    _LAYOUTS = ["nchw", "cl"] if FULL else ["nchw"]
    _PROVIDERS = ["reference", "fast", "reference-graph", "triton-graph", "triton-clw-graph"]
else:
    _SHAPES = [("tiny", 64, 8, 8, 64, 3, 1, False), ("digits16", 32, 16, 16, 32, 3, 2, True)]
    _BATCHES, _DTYPES, _LAYOUTS = ["1"], ["fp32"], ["nchw", "cl"]
    # packed: the fast sampler's CPU convs (weights packed for oneDNN once per call, channels_last only).
    _PROVIDERS = ["reference", "fast", "packed"]

SHAPES, BATCHES, BENCH_DTYPES, LAYOUTS = op_grid(
    _SHAPES, {name: unet_conv_shapes(cfg.unet) for name, cfg in PRESETS.items()}, _BATCHES, _DTYPES, _LAYOUTS,
    "conv")


def shape_id(s):
    p, ci, h, w, co, k, stride, _ = s
    return f"{p}-{ci}to{co}-{h}x{w}-k{k}s{stride}"


def _inputs(shape, batch, dtype, layout):
    _, ci, h, w, co, k, stride, bias = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, ci, h, w, generator=gen)
    weight = torch.randn(co, ci, k, k, generator=gen) / (ci * k * k) ** 0.5
    b = 0.3 * torch.randn(co, generator=gen) if bias else None
    dt = DTYPES[dtype]
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    x = x.to(device=DEVICE, dtype=dt).contiguous(memory_format=fmt)
    b = b.to(DEVICE, dt) if b is not None else None
    return x, weight.to(DEVICE, dt), b, (stride, stride), (k // 2, k // 2)


@pytest.mark.parametrize("provider", _PROVIDERS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", BENCH_DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_conv2d(benchmark, shape, batch, dtype, layout, provider):
    x, w, b, s, p = _inputs(shape, batch, dtype, layout)
    co, ci, kh, kw = w.shape
    ho, wo = M.out_size(x.shape[2], x.shape[3], kh, kw, s, p)
    pixels = batch * ho * wo
    flops = 2 * pixels * co * ci * kh * kw
    nbytes = (x.numel() + w.numel() + pixels * co) * x.element_size()
    cfg = M.plan(batch, ci, x.shape[2], x.shape[3], co, kh, kw, s, p, x.dtype, G.sms(x.device))
    info = dict(preset=shape[0], C_in=ci, H=shape[2], W=shape[3], C_out=co, K=kh, stride=s[0], batch=batch,
                dtype=dtype, layout=layout, split=cfg["split"], tiles=cfg["tiles"],
                rule_picks_triton=M.use_triton(x, w, s, p))
    if provider == "reference":
        fn = lambda: ref.conv2d(x, w, b, s, p)  # noqa: E731
    elif provider in ("fast", "packed"):
        if provider == "packed" and layout != "cl":
            pytest.skip("the packed CPU path takes channels_last inputs only")
        fn = lambda: M.conv2d(x, w, b, s, p)  # noqa: E731
    elif provider == "reference-graph":
        fn = cuda_graphed(lambda: ref.conv2d(x, w, b, s, p))
    else:
        wt = w.contiguous(memory_format=torch.channels_last) if provider == "triton-clw-graph" else w
        fn = cuda_graphed(lambda: M.conv2d_triton(x, wt, b, s, p))
    with ops.cpu_conv_packing() if provider == "packed" else contextlib.nullcontext():
        run_bench(benchmark, fn, nbytes=nbytes, flops=flops, **info)
        if provider != "reference":
            check_output(fn, ref.conv2d(x, w, b, s, p), f"conv2d/{provider}")


# The DDPM (diffusers) UNet's Downsample: 3x3 stride 2, padding (0, 1, 0, 1) (right/bottom only; the Triton
# kernel masks it, no padded copy). (C, H, W) from ddpm-cifar10-32's config (not a ddpm_fast preset).
DOWN_SHAPES = [(128, 32, 32), (256, 16, 16), (256, 8, 8)] if HAS_CUDA else [(256, 8, 8)]
DOWN_PAD = (0, 1, 0, 1)


@pytest.mark.parametrize("provider", [p for p in _PROVIDERS if p not in ("triton-clw-graph", "packed")])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", BENCH_DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", DOWN_SHAPES, ids=lambda s: "ddpm-cifar10-32-C{}-{}x{}-pad0101".format(*s))
def test_conv2d_downsample_pad(benchmark, shape, batch, dtype, layout, provider):
    c, h, w = shape
    x, wt, b, s, _ = _inputs(("ddpm", c, h, w, c, 3, 2, True), batch, dtype, layout)
    p = DOWN_PAD
    ho, wo = M.out_size(h, w, 3, 3, s, p)
    flops = 2 * batch * ho * wo * c * c * 9
    nbytes = (x.numel() + wt.numel() + batch * ho * wo * c) * x.element_size()
    info = dict(preset="ddpm-cifar10-32", C_in=c, H=h, W=w, C_out=c, K=3, stride=2, padding="0,1,0,1",
                batch=batch, dtype=dtype, layout=layout, rule_picks_triton=M.use_triton(x, wt, s, p))
    if provider == "reference":
        fn = lambda: ref.conv2d(x, wt, b, s, p)  # noqa: E731
    elif provider == "fast":
        fn = lambda: M.conv2d(x, wt, b, s, p)  # noqa: E731
    elif provider == "reference-graph":
        fn = cuda_graphed(lambda: ref.conv2d(x, wt, b, s, p))
    else:
        fn = cuda_graphed(lambda: M.conv2d_triton(x, wt, b, s, p))
    run_bench(benchmark, fn, nbytes=nbytes, flops=flops, **info)
    if provider != "reference":
        check_output(fn, ref.conv2d(x, wt, b, s, p), f"conv2d downsample/{provider}")
