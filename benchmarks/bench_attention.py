"""The AttentionBlock: the fused op against eager, compiled and SDPA-based blocks, and the core alone.

test_attention_block: the whole block (qkv projection, attention, output projection, residual,
  NCHW in and out) at every AttentionBlock shape the presets use. Providers: `reference` (eager
  reference.functional.attention), `compiled` (it under torch.compile; GPU only), `sdpa` (an
  SDPA-based block: F.linear + F.scaled_dot_product_attention + F.linear + residual; the issue's
  bar: the fast block must beat it at every preset shape), `fast` (the registered op
  `ddpm_fast::attention`: the Triton path on CUDA, the reference math on CPU); on GPU also
  `sdpa-graph` and `fast-graph`, the same calls captured in a CUDA graph and replayed, as the
  sampler runs them (the kernels' time without the per-call launch and Python cost).
test_attention_core: the core alone, softmax(q k^T * d^-0.5) v over the block's strided q/k/v
  views, at each preset (tokens N, d_k, dtype). Providers: `triton` (flash_attention_triton),
  `sdpa`, and on CPU `cpp` (the C++ short-sequence core, ops.attention._cpp_core). This is the measurement behind ddpm_fast.ops.attention.SDPA_CORE_SHAPES: add a row
  (N, d_k, dtype) there, with these numbers, only where `sdpa` beats `triton` at every batch.
  On CPU, `triton` runs the Triton *interpreter* (a smoke test of the plumbing, not a timing).

extra_info: flops (2 per multiply-add: projections 2*B*N*C*3*H*d + 2*B*N*H*d*C, core 4*B*H*N^2*d),
bytes (x, weights and the output once; for the core q, k, v read and o written once), TFLOP/s, GB/s,
and max_abs_err against the reference run in float64 (a provider that computes something else shows).

Grid: GPU: batches 1 and 64, fp32 and bf16 (DDPM_FAST_BENCH_FULL=1: batches 1/16/64/256, fp16 too).
CPU: the tiny preset's shapes at batch 1, fp32, so the file runs in seconds.
DDPM_FAST_BENCH_PRESETS / _BATCHES / _DTYPES narrow or widen the grid (comma-separated).
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, DTYPES, FULL, HAS_CUDA, check_output, compiled, cuda_graphed, env_list, run_bench
from ddpm_fast.config import PRESETS
from ddpm_fast.reference import functional as ref
from ddpm_fast.reference.unet import AttentionBlock, UNet

attn_ops = importlib.import_module("ddpm_fast.ops.attention")  # the module (ops.attention is the function)

if HAS_CUDA:
    _PRESETS = ["labml-cifar32", "cifar35m", "tiny", "digits16"]
    _BATCHES = ["1", "16", "64", "256"] if FULL else ["1", "64"]
    _DTYPES = ["fp32", "fp16", "bf16"] if FULL else ["fp32", "bf16"]
    # *-graph: the call captured in a CUDA graph and replayed, as the sampler runs it (no launch cost).
    BLOCK_PROVIDERS = ["reference", "compiled", "sdpa", "fast", "sdpa-graph", "fast-graph"]
else:
    _PRESETS = ["tiny"]
    _BATCHES = ["1"]
    _DTYPES = ["fp32"]
    BLOCK_PROVIDERS = ["reference", "sdpa", "fast"]
# cpp: the C++ short-sequence core that attention_cpu runs up to CORE_MAX_TOKENS tokens (CPU only).
CORE_PROVIDERS = ["triton", "sdpa"] + ([] if HAS_CUDA else ["cpp"])

BATCHES = [int(b) for b in env_list("DDPM_FAST_BENCH_BATCHES", _BATCHES)]
BENCH_DTYPES = env_list("DDPM_FAST_BENCH_DTYPES", _DTYPES)


def preset_attention_shapes(presets):
    """Distinct (C, H, W, n_heads, d_k) of every AttentionBlock call, from a meta-device forward."""
    shapes = {}
    for name in presets:
        cfg = PRESETS[name].unet
        with torch.device("meta"):
            model = UNet(cfg)

        def hook(mod, inp, out, name=name):  # returns None: the block's output stays as it is
            shapes.setdefault((*inp[0].shape[1:], mod.n_heads, mod.d_k), name)

        for m in model.modules():
            if isinstance(m, AttentionBlock):
                m.register_forward_hook(hook)
        model(torch.empty(1, cfg.image_channels, cfg.image_size, cfg.image_size, device="meta"),
              torch.zeros(1, dtype=torch.long, device="meta"))
    return sorted(shapes.items(), key=lambda kv: (kv[0][0] * kv[0][1] * kv[0][2], kv[0]))


SHAPES = preset_attention_shapes(env_list("DDPM_FAST_BENCH_PRESETS", _PRESETS))
SHAPE_IDS = [f"{p}-C{c}-{h}x{w}-h{nh}-d{dk}" for (c, h, w, nh, dk), p in SHAPES]
# The core depends on (N, d_k) only: one case per distinct pair.
CORE_SHAPES = sorted({(h * w, nh, dk) for (c, h, w, nh, dk), _ in SHAPES})
CORE_IDS = [f"N{n}-h{nh}-d{dk}" for n, nh, dk in CORE_SHAPES]


def block_inputs(batch, c, h, w, n_heads, d_k, dtype):
    g = torch.Generator().manual_seed(0)
    hd = n_heads * d_k
    x = torch.randn(batch, c, h, w, generator=g)
    pw = (2 * torch.rand(3 * hd, c, generator=g) - 1) / c ** 0.5
    pb = (2 * torch.rand(3 * hd, generator=g) - 1) / c ** 0.5
    ow = (2 * torch.rand(c, hd, generator=g) - 1) / hd ** 0.5
    ob = (2 * torch.rand(c, generator=g) - 1) / hd ** 0.5
    return [t.to(device=DEVICE, dtype=dtype) for t in (x, pw, pb, ow, ob)]


def sdpa_block(x, proj_weight, proj_bias, out_weight, out_bias, n_heads, d_k):
    """The block as one would write it with torch's fused SDPA: the bar the fast block must beat."""
    b, c, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)  # [B, N, C] view
    qkv = F.linear(tokens, proj_weight, proj_bias).view(b, h * w, n_heads, 3, d_k)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(3))  # labml's chunk(3) of each head's 3*d_k
    o = F.scaled_dot_product_attention(q, k, v, scale=d_k ** -0.5)
    y = F.linear(o.transpose(1, 2).reshape(b, h * w, n_heads * d_k), out_weight, out_bias) + tokens
    return y.transpose(1, 2).reshape(b, c, h, w)


def _max_abs_err(out, want):
    return float((out.double() - want.double()).abs().max())


@pytest.mark.parametrize("provider", BLOCK_PROVIDERS)
@pytest.mark.parametrize("dtype", BENCH_DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_attention_block(benchmark, shape, batch, dtype, provider):
    (c, h, w, nh, dk), preset = shape
    args = block_inputs(batch, c, h, w, nh, dk, DTYPES[dtype])
    base = provider.removesuffix("-graph")
    fn = {"reference": ref.attention, "sdpa": sdpa_block, "fast": attn_ops.attention}.get(base)
    if provider == "compiled":
        fn = compiled(ref.attention)
    n, hd, esize = h * w, nh * dk, args[0].element_size()
    flops = 2 * batch * n * c * 3 * hd + 4 * batch * nh * n * n * dk + 2 * batch * n * hd * c
    nbytes = (2 * batch * c * n + 3 * hd * c + 3 * hd + c * hd + c) * esize

    def call():
        with torch.no_grad():
            return fn(*args, nh, dk)

    if provider.endswith("-graph"):
        call = cuda_graphed(call)
    out = run_bench(benchmark, call, flops=flops, nbytes=nbytes, preset=preset, C=c, tokens=n, heads=nh,
                    d_k=dk, batch=batch, dtype=dtype)
    want = ref.attention(*[a.double() for a in args], nh, dk)
    benchmark.extra_info["max_abs_err"] = _max_abs_err(out, want)
    check_output(call, want.to(out.dtype), f"attention block/{provider}")


@pytest.mark.parametrize("provider", CORE_PROVIDERS)
@pytest.mark.parametrize("dtype", BENCH_DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("core", CORE_SHAPES, ids=CORE_IDS)
def test_attention_core(benchmark, core, batch, dtype, provider):
    n, nh, dk = core
    g = torch.Generator().manual_seed(0)
    # q, k, v as the block sees them: per-head interleaved views of one [B, N, H, 3, d] qkv buffer.
    qkv = torch.randn(batch, n, nh, 3, dk, generator=g).to(device=DEVICE, dtype=DTYPES[dtype])
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(3))
    scale = dk ** -0.5
    if provider == "triton":
        if not attn_ops.HAS_TRITON:
            pytest.skip("triton is not importable")
        out_buf = torch.empty(batch, n, nh, dk, dtype=q.dtype, device=q.device).transpose(1, 2)

        def call():
            return attn_ops.flash_attention_triton(q, k, v, scale, out=out_buf)
    elif provider == "cpp":
        if attn_ops._CORE_OUT is None:
            pytest.skip("the C++ extension is not built")
        rows = qkv.view(batch * n, nh * 3 * dk)
        o_rows = torch.empty(batch * n, nh * dk, dtype=qkv.dtype)

        def call():  # at every N (also above CORE_MAX_TOKENS: the measurement behind that limit)
            attn_ops._CORE_DIRECT(rows, batch, nh, dk, scale, o_rows)
            return o_rows.view(batch, n, nh, dk).transpose(1, 2)  # token-major rows, compared as [B, H, N, d]
    else:
        def call():
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    flops = 4 * batch * nh * n * n * dk
    nbytes = 4 * batch * nh * n * dk * qkv.element_size()
    out = run_bench(benchmark, call, flops=flops, nbytes=nbytes, tokens=n, heads=nh, d_k=dk, batch=batch,
                    dtype=dtype, table_key=f"({n}, {dk}, torch.{str(DTYPES[dtype]).split('.')[-1]})",
                    dispatch_now=attn_ops.core_backend(n, dk, DTYPES[dtype], batch * nh))
    qd, kd, vd = q.double(), k.double(), v.double()
    want = torch.softmax(qd @ kd.transpose(-1, -2) * scale, dim=-1) @ vd
    benchmark.extra_info["max_abs_err"] = _max_abs_err(out, want)
    check_output(call, want.to(out.dtype), f"attention core/{provider}")


# The DDPM (diffusers) UNet's block: GroupNorm(h) in, h added (the op's `residual`). (C, H, W, heads, d_k):
# ddpm-cifar10-32's 16x16 block; on GPU also the 256x256 layout's (C = 512 at 16x16). Not a ddpm_fast preset
# (read off the diffusers configs), so listed here.
DDPM_SHAPES = [(256, 16, 16, 1, 256)] + ([(512, 16, 16, 1, 512)] if HAS_CUDA else [])
DDPM_PROVIDERS = ["reference", "fast"] + (["fast-graph"] if HAS_CUDA else [])


@pytest.mark.parametrize("provider", DDPM_PROVIDERS)
@pytest.mark.parametrize("dtype", BENCH_DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", DDPM_SHAPES, ids=[f"ddpm-C{c}-{h}x{w}-h{nh}-d{dk}" for c, h, w, nh, dk in DDPM_SHAPES])
def test_attention_block_residual(benchmark, shape, batch, dtype, provider):
    c, h, w, nh, dk = shape
    args = block_inputs(batch, c, h, w, nh, dk, DTYPES[dtype])
    residual = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(1)).to(args[0])
    fn = ref.attention if provider == "reference" else attn_ops.attention
    n, hd, esize = h * w, nh * dk, args[0].element_size()
    flops = 2 * batch * n * c * 3 * hd + 4 * batch * nh * n * n * dk + 2 * batch * n * hd * c
    nbytes = (3 * batch * c * n + 3 * hd * c + 3 * hd + c * hd + c) * esize  # x, residual read; out written

    def call():
        with torch.no_grad():
            return fn(*args, nh, dk, residual)

    if provider.endswith("-graph"):
        call = cuda_graphed(call)
    out = run_bench(benchmark, call, flops=flops, nbytes=nbytes, preset="ddpm", C=c, tokens=n, heads=nh,
                    d_k=dk, batch=batch, dtype=dtype, residual=True)
    want = ref.attention(*[a.double() for a in args], nh, dk, residual.double())
    benchmark.extra_info["max_abs_err"] = _max_abs_err(out, want)
    check_output(call, want.to(out.dtype), f"attention block residual/{provider}")
