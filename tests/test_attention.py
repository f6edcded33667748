"""ddpm_fast::attention (the fused AttentionBlock) against reference.functional.attention.

On CPU the Triton kernels run through the interpreter (attention_triton / flash_attention_triton);
the registered op's CPU kernel is the reference. GPU-only tests (opcheck, torch.compile, the full
grid at real batch sizes) carry the `gpu` marker.

Expected values come from the reference run in float64 on the same (already rounded) inputs, so the
tolerance measures the fast path's own error, not the reference's low-precision one.
"""
import importlib
import subprocess
import sys

import pytest
import torch

from helpers import DTYPES, compile_recording, poison
from ddpm_fast.config import PRESETS
from ddpm_fast.ops._common import out_format
from ddpm_fast.ops.attention import (HAS_TRITON, SDPA_CORE_SHAPES, attention, attention_triton, core_backend,
                                     flash_attention_triton)
from ddpm_fast.reference import functional as ref
from ddpm_fast.reference.unet import AttentionBlock, UNet
from tolerances import tol

# Triton kernels on CPU tensors (the interpreter) unless a test runs on CUDA: see conftest.
pytestmark = pytest.mark.interpreter

# The module itself (ddpm_fast.ops.attention, the attribute, is the op wrapper function).
attn_mod = importlib.import_module("ddpm_fast.ops.attention")

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")


@pytest.fixture(autouse=True, scope="module")
def _single_threaded_blas():
    # The interpreter runs tl.dot through numpy; a multi-threaded OpenBLAS on a shared 2-core machine
    # spins and makes each small dot ~10x slower.
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _preset_shapes():
    """(preset, C, H, W, n_heads, d_k) of every AttentionBlock call, by hooking a meta-device UNet."""
    shapes = []
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            model = UNet(cfg.unet)
        seen = set()

        def hook(mod, inputs, output, seen=seen):
            seen.add((*inputs[0].shape[1:], mod.n_heads, mod.d_k))

        for m in model.modules():
            if isinstance(m, AttentionBlock):
                m.register_forward_hook(hook)
        u = cfg.unet
        model(torch.empty(1, u.image_channels, u.image_size, u.image_size, device="meta"),
              torch.zeros(1, dtype=torch.long, device="meta"))
        shapes += [(name, *s) for s in sorted(seen)]
    return shapes


PRESET_SHAPES = _preset_shapes()
PRESET_IDS = [f"{p}-C{c}-{h}x{w}-h{nh}-d{dk}" for p, c, h, w, nh, dk in PRESET_SHAPES]
# Odd shapes: C = 96 at 7 x 9 (63 tokens), two heads, a head width unlike C, a single token.
ODD_SHAPES = [(3, 96, 7, 9, 1, 96), (1, 96, 7, 9, 2, 48), (3, 64, 5, 3, 2, 40), (2, 32, 1, 1, 1, 32)]
ODD_IDS = [f"B{b}-C{c}-{h}x{w}-h{nh}-d{dk}" for b, c, h, w, nh, dk in ODD_SHAPES]


def _batch(c, h, w):
    # The interpreter is slow: batch 1 for the big layers (d = 1024, or 256 tokens), else 2.
    return 1 if c >= 1024 or h * w >= 256 else 2


def make_inputs(b, c, h, w, n_heads, d_k, dtype, device="cpu"):
    """Random block inputs with weights scaled so the softmax is peaked (score std ~ 3), not uniform."""
    hd = n_heads * d_k
    x = 2 * torch.randn(b, c, h, w)
    pw = (2 * torch.rand(3 * hd, c) - 1) * (1.5 / c ** 0.5)
    pb = (2 * torch.rand(3 * hd) - 1) / c ** 0.5
    ow = (2 * torch.rand(c, hd) - 1) / hd ** 0.5
    ob = (2 * torch.rand(c) - 1) / hd ** 0.5
    return [t.to(device=device, dtype=dtype) for t in (x, pw, pb, ow, ob)]


def expected(args, n_heads, d_k):
    # float64 and not rounded to x's dtype: the rounding would be part of the measured error.
    return ref.attention(*[a.double() for a in args], n_heads, d_k)


def check_block(args, n_heads, d_k, **kw):
    x = args[0]
    out = poison(torch.empty(x.shape, dtype=x.dtype, device=x.device))
    got = attention_triton(*args, n_heads, d_k, out=out, **kw)
    assert got is out
    torch.testing.assert_close(got.double(), expected(args, n_heads, d_k), **tol("attention", x.dtype))


# ---------------------------------------------------------------------------------------------
# The fused block (Triton kernels through the interpreter on CPU)
# ---------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", PRESET_SHAPES, ids=PRESET_IDS)
def test_block_preset_shapes(shape, dtype):
    _, c, h, w, nh, dk = shape
    check_block(make_inputs(_batch(c, h, w), c, h, w, nh, dk, dtype), nh, dk)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=ODD_IDS)
def test_block_odd_shapes(shape, dtype):
    b, c, h, w, nh, dk = shape
    check_block(make_inputs(b, c, h, w, nh, dk, dtype), nh, dk)


@needs_triton
@pytest.mark.parametrize("shape,dtype", [((2, 64, 8, 8, 1, 64), torch.float32),
                                         ((1, 256, 4, 4, 1, 256), torch.bfloat16),
                                         ((3, 96, 7, 9, 2, 48), torch.float16)],
                         ids=["tiny-C64", "C256-4x4", "odd"])
def test_block_with_gpu_tile_choice(monkeypatch, shape, dtype):
    # On CPU the tiles are chosen for a 1-program "device"; run the small tiles a 132-SM H100 gets at
    # small batch (split head dim and channels), which the other block tests do not reach.
    monkeypatch.setattr(attn_mod, "_programs_wanted", lambda device: 132)
    b, c, h, w, nh, dk = shape
    check_block(make_inputs(b, c, h, w, nh, dk, dtype), nh, dk)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_block_channels_last_input(dtype):
    args = make_inputs(2, 96, 7, 9, 2, 48, dtype)
    args[0] = args[0].contiguous(memory_format=torch.channels_last)
    check_block(args, 2, 48)
    assert attention_triton(*args, 2, 48).is_contiguous()


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_sdpa_core(dtype):
    # The other side of the dispatch: projections + torch SDPA core + the fused output kernel.
    check_block(make_inputs(3, 96, 7, 9, 2, 48, dtype), 2, 48, core="sdpa")


@needs_triton
def test_dispatch_follows_sdpa_table(monkeypatch):
    args = make_inputs(1, 96, 7, 9, 1, 96, torch.float32)

    def forbidden(*a, **k):
        raise AssertionError("this core must not run")

    # Empty table: the Triton core runs, SDPA is never called.
    assert core_backend(63, 96, torch.float32) == "triton"
    monkeypatch.setattr(attn_mod.F, "scaled_dot_product_attention", forbidden)
    check_block(args, 1, 96)
    monkeypatch.undo()
    # A row for the shape: SDPA runs, the Triton core is never called.
    monkeypatch.setitem(SDPA_CORE_SHAPES, (63, 96, torch.float32), "test row")
    assert core_backend(63, 96, torch.float32) == "sdpa"
    monkeypatch.setattr(attn_mod, "flash_attention_triton", forbidden)
    check_block(args, 1, 96)
    with pytest.raises(ValueError, match="core"):
        attention_triton(*args, 1, 96, core="cudnn")


@pytest.mark.parametrize("n, d_k, batch_heads, dtype, want", [
    (256, 256, 64, torch.float32, "sdpa"),     # cifar35m 16x16, B=64: measured 0.41x for Triton
    (256, 256, 1, torch.float32, "sdpa"),      # measured 0.84x
    (256, 128, 64, torch.float32, "sdpa"),     # measured 0.52x
    (16, 1024, 64, torch.float32, "sdpa"),     # labml 4x4, B=64: measured 0.66x
    (16, 1024, 1, torch.float32, "triton"),    # measured 1.23x for Triton
    (16, 128, 64, torch.float32, "triton"),    # measured 1.07x
    (64, 64, 64, torch.float32, "triton"),     # narrow heads: measured 1.09x
    (256, 256, 64, torch.bfloat16, "triton"),  # half precision: Triton won every measured case
    (256, 256, 64, torch.float16, "triton"),
])
def test_core_backend_fp32_rule(n, d_k, batch_heads, dtype, want):
    # The measured points behind FP32_SDPA_MIN_WORK / FP32_SDPA_MIN_DK (module comment).
    assert core_backend(n, d_k, dtype, batch_heads) == want


# ---------------------------------------------------------------------------------------------
# The DDPM (diffusers) block: `residual` added instead of x (x is then GroupNorm(residual))
# ---------------------------------------------------------------------------------------------
# (B, C, H, W, n_heads, d_k): cifar10-32's 16x16 block (1 head, d_k = C), the 256x256 layout's (C = 512 at
# 16x16), attention_head_dim 32 at C = 128 (4 heads), an odd one.
RESIDUAL_SHAPES = [(1, 256, 16, 16, 1, 256), (1, 512, 16, 16, 1, 512), (2, 128, 8, 8, 4, 32), (3, 96, 7, 9, 2, 48)]
RESIDUAL_IDS = [f"B{b}-C{c}-{h}x{w}-h{nh}-d{dk}" for b, c, h, w, nh, dk in RESIDUAL_SHAPES]


def check_residual_block(args, residual, n_heads, d_k, **kw):
    x = args[0]
    out = poison(torch.empty(x.shape, dtype=x.dtype, device=x.device))
    got = attention_triton(*args, n_heads, d_k, out=out, residual=residual, **kw)
    assert got is out
    want = ref.attention(*[a.double() for a in args], n_heads, d_k, residual.double())
    torch.testing.assert_close(got.double(), want, **tol("attention", x.dtype))
    # Not x's residual: the block without the argument must differ (residual and x are unrelated here).
    assert not torch.allclose(want, expected(args, n_heads, d_k), atol=1e-2)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", RESIDUAL_SHAPES, ids=RESIDUAL_IDS)
def test_block_residual_ddpm_shapes(shape, dtype):
    b, c, h, w, nh, dk = shape
    args = make_inputs(b, c, h, w, nh, dk, dtype)
    check_residual_block(args, (2 * torch.randn(b, c, h, w)).to(dtype), nh, dk)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layouts", ["cl-cl", "nchw-cl", "cl-nchw"])
def test_block_residual_channels_last_and_sdpa(layouts, dtype):
    args = make_inputs(2, 96, 7, 9, 2, 48, dtype)
    residual = (2 * torch.randn(2, 96, 7, 9)).to(dtype)
    x_cl, r_cl = (part == "cl" for part in layouts.split("-"))
    if x_cl:
        args[0] = args[0].contiguous(memory_format=torch.channels_last)
    if r_cl:
        residual = residual.contiguous(memory_format=torch.channels_last)
    check_residual_block(args, residual, 2, 48)
    check_residual_block(args, residual, 2, 48, core="sdpa")


def test_residual_op_cpu_fake_opcheck_and_compile():
    args = make_inputs(2, 64, 4, 4, 2, 32, torch.float32)
    residual = torch.randn(2, 64, 4, 4)
    want = ref.attention(*args, 2, 32, residual)
    for got in (attention(*args, 2, 32, residual), torch.ops.ddpm_fast.attention(*args, 2, 32, residual)):
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, **tol("attention", torch.float32))
    meta = attention(*[a.to("meta") for a in args], 2, 32, residual.to("meta"))
    assert meta.shape == args[0].shape and meta.device.type == "meta"
    torch.library.opcheck(torch.ops.ddpm_fast.attention.default, (*args, 2, 32, residual),
                          test_utils=("test_schema", "test_faketensor"))
    fn, seen = compile_recording(lambda x, r: attention(x * 1.0, *args[1:], 2, 32, r))
    torch.testing.assert_close(fn(args[0], residual), want, **tol("attention", torch.float32))
    assert "ddpm_fast.attention" in seen, seen


@pytest.mark.parametrize("case", ["shape", "dtype", "device", "not-tensor", "unmergeable"])
def test_residual_bad_inputs_raise(case):
    args = make_inputs(1, 32, 4, 4, 1, 32, torch.float32)
    r = torch.randn(1, 32, 4, 4)
    bad, exc, match = {
        "shape": (r[:, :16], ValueError, "residual must have x's shape"),
        "dtype": (r.half(), TypeError, "residual has dtype"),
        "device": (r.to("meta"), RuntimeError, "residual is on meta"),
        "not-tensor": (r.tolist(), TypeError, "residual must be a torch.Tensor or None"),
        "unmergeable": (torch.randn(1, 32, 8, 4)[:, :, ::2], ValueError, "cannot be merged"),
    }[case]
    with pytest.raises(exc, match=match):
        attention(*args, 1, 32, bad)


# ---------------------------------------------------------------------------------------------
# The attention core alone: every tiling path on small shapes
# ---------------------------------------------------------------------------------------------
def core_expected(q, k, v, scale, biases):
    q, k, v = q.double(), k.double(), v.double()
    if biases is not None:  # q + q_bias is rounded to the input dtype, as the block's qkv would be
        dt = biases[0].dtype
        q, k = ((t + b[None, :, None, :]).to(dt).double() for t, b in zip((q, k), biases[:2]))
        v = v + biases[2].double()[None, :, None, :]
    return (torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v)


CORE_CASES = {
    # name: (B, H, Nq, Nk, d, tiles (block_m, block_n, block_dk, block_dv), score gain, biases)
    "rescale-63tok-d96": (1, 2, 63, 63, 96, (32, 16, 32, 64), 3.0, True),  # 4 key blocks, 3 d chunks, 2 slices
    "cross-20q-37k-d100": (1, 2, 20, 37, 100, (16, 16, 32, 64), 2.0, True),  # masked head dim, Nq != Nk
    "d1024-16tok": (1, 1, 16, 16, 1024, (None, None, None, None), 0.2, False),  # labml-cifar32's middle core
    "large-scores": (1, 1, 40, 40, 32, (16, 16, 16, 16), 12.0, False),  # the max subtraction must hold
}


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CORE_CASES), ids=list(CORE_CASES))
def test_flash_core(case, dtype):
    b, h, nq, nk, d, (bm, bn, bdk, bdv), gain, with_bias = CORE_CASES[case]
    q = (gain * torch.randn(b, h, nq, d)).to(dtype)
    k = torch.randn(b, h, nk, d).to(dtype)
    v = torch.randn(b, h, nk, d).to(dtype)
    biases = tuple(torch.randn(h, d).to(dtype) for _ in range(3)) if with_bias else None
    scale = d ** -0.5
    out = poison(torch.empty(b, h, nq, d, dtype=dtype))
    got = flash_attention_triton(q, k, v, scale, out=out, block_m=bm, block_n=bn, block_dk=bdk, block_dv=bdv,
                                 **(dict(zip(("q_bias", "k_bias", "v_bias"), biases)) if with_bias else {}))
    torch.testing.assert_close(got.double(), core_expected(q, k, v, scale, biases).double(), **tol("attention", dtype))


@needs_triton
def test_flash_core_strided_views_and_default_layout():
    # q/k/v as the block passes them: interleaved per-head views of one qkv buffer.
    b, n, h, d = 2, 24, 2, 32
    qkv = torch.randn(b, n, h, 3, d)
    q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
    got = flash_attention_triton(q, k, v, 0.3)
    assert got.shape == (b, h, n, d) and got.transpose(1, 2).is_contiguous()  # token-major storage
    torch.testing.assert_close(got.double(), core_expected(q, k, v, 0.3, None).double(), **tol("attention", torch.float32))


# ---------------------------------------------------------------------------------------------
# The registered op, its wrapper, the fake kernel, bad inputs
# ---------------------------------------------------------------------------------------------
def test_cpu_calls_never_launch_triton(monkeypatch):
    # CPU tensors run the reference math through the wrapper and through the op; a launch fails here.
    A = importlib.import_module("ddpm_fast.ops.attention")  # the module (ops.attention is the function)
    monkeypatch.setattr(A, "attention_triton", lambda *a, **k: pytest.fail("launched Triton for CPU tensors"))
    args = make_inputs(2, 64, 4, 4, 1, 64, torch.float32)
    truth = expected(args, 1, 64)
    for got in (attention(*args, 1, 64), torch.ops.ddpm_fast.attention(*args, 1, 64)):
        assert got.is_contiguous() and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), truth, **tol("attention", torch.float32))


def test_op_fake_kernel_and_cpu_opcheck():
    args = make_inputs(2, 96, 7, 9, 2, 48, torch.float32)
    meta = attention(*[a.to("meta") for a in args], 2, 48)
    assert meta.shape == args[0].shape and meta.device.type == "meta" and meta.is_contiguous()
    # Schema and fake-vs-real metadata through the CPU kernel (the Triton side is checked on GPU).
    torch.library.opcheck(torch.ops.ddpm_fast.attention.default, (*args, 2, 48),
                          test_utils=("test_schema", "test_faketensor"))


def _bad_cases():
    def good():
        return make_inputs(1, 32, 4, 4, 1, 32, torch.float32) + [1, 32]

    def edit(i, value):
        a = good()
        a[i] = value(a[i]) if callable(value) else value
        return a

    return {
        "x-3d": (edit(0, lambda x: x[0]), ValueError, "4-D"),
        "x-int": (edit(0, lambda x: x.to(torch.int32)), TypeError, "float32, float16 or bfloat16"),
        "x-float64": (edit(0, lambda x: x.double()), TypeError, "float32, float16 or bfloat16"),
        "x-not-tensor": (edit(0, lambda x: x.tolist()), TypeError, "x must be a torch.Tensor"),
        "proj-weight-shape": (edit(1, lambda w: w[:, :-1]), ValueError, "proj_weight must have shape"),
        "proj-bias-shape": (edit(2, lambda w: w[:-3]), ValueError, "proj_bias must have shape"),
        "out-weight-shape": (edit(3, lambda w: w.t()[:16]), ValueError, "out_weight must have shape"),
        "out-bias-shape": (edit(4, lambda w: w[None]), ValueError, "out_bias must have shape"),
        "d_k-mismatch": (edit(6, 16), ValueError, "d_k=16"),
        "n_heads-mismatch": (edit(5, 2), ValueError, "n_heads=2"),
        "n_heads-zero": (edit(5, 0), ValueError, "n_heads must be positive"),
        "d_k-float": (edit(6, 32.0), TypeError, "d_k must be an int"),
        "weight-dtype": (edit(1, lambda w: w.half()), TypeError, "proj_weight has dtype"),
        "bias-device": (edit(4, lambda w: w.to("meta")), RuntimeError, "out_bias is on meta"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("name", list(BAD), ids=list(BAD))
def test_bad_inputs_raise(name):
    args, exc, match = BAD[name]
    with pytest.raises(exc, match=match):
        attention(*args)


@needs_triton
def test_core_bad_inputs_raise():
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="4-D"):
        flash_attention_triton(q[0], q[0], q[0], 1.0)
    with pytest.raises(TypeError, match="share one of"):
        flash_attention_triton(q, q.half(), q, 1.0)
    with pytest.raises(ValueError, match="all of q_bias"):
        flash_attention_triton(q, q, q, 1.0, q_bias=torch.zeros(1, 16))
    with pytest.raises(ValueError, match="power of two"):
        flash_attention_triton(q, q, q, 1.0, block_dk=24)


def test_module_imports_and_falls_back_without_triton():
    # A subprocess where `import triton` fails: the op must still exist and run its CPU kernel.
    code = (
        "import sys, torch; sys.modules['triton'] = None\n"
        "import importlib; m = importlib.import_module('ddpm_fast.ops.attention')\n"
        "from ddpm_fast.reference import functional as ref\n"
        "assert not m.HAS_TRITON\n"
        # Projections scaled as trained ones are (unscaled randn weights give logits of ~100, where any two
        # fp32 implementations differ from float64 by ~1e-3); compared with the float64 reference.
        "a = [torch.randn(2, 32, 3, 3), torch.randn(96, 32) / 32 ** 0.5, torch.randn(96), torch.randn(32, 32) / 32 ** 0.5,\n"
        "     torch.randn(32)]\n"
        "want = ref.attention(*[t.double() for t in a], 1, 32)\n"
        "torch.testing.assert_close(m.attention(*a, 1, 32).double(), want, rtol=1e-5, atol=5e-5)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 3, 64])
@pytest.mark.parametrize("shape", PRESET_SHAPES + [("odd", *s[1:]) for s in ODD_SHAPES],
                         ids=PRESET_IDS + ODD_IDS)
def test_gpu_full_grid(shape, batch, dtype):
    _, c, h, w, nh, dk = shape
    args = make_inputs(batch, c, h, w, nh, dk, dtype, device="cuda")
    want = expected(args, nh, dk)
    # The op allocates its output first: a just-freed NaN block of that size is what it gets.
    freed = poison(torch.empty_like(args[0]))
    del freed
    torch.testing.assert_close(attention(*args, nh, dk).double(), want, **tol("attention", dtype))
    for core in ("triton", "sdpa"):
        check_block(args, nh, dk, core=core)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_opcheck(dtype):
    for b, c, h, w, nh, dk in [(2, 96, 7, 9, 2, 48), (1, 1024, 4, 4, 1, 1024)]:
        args = make_inputs(b, c, h, w, nh, dk, dtype, device="cuda")
        torch.library.opcheck(torch.ops.ddpm_fast.attention.default, (*args, nh, dk))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_torch_compile_fullgraph(dtype):
    args = make_inputs(2, 256, 16, 16, 1, 256, dtype, device="cuda")

    def block(x, pw, pb, ow, ob):
        # The op between ordinary (exact) ops, as in the UNet: compile must trace through, no break.
        return attention(x.flip(-1), pw, pb, ow, ob, 1, 256) * 0.5

    got = torch.compile(block, fullgraph=True)(*args)
    want = (expected([args[0].flip(-1), *args[1:]], 1, 256) * 0.5)
    torch.testing.assert_close(got.double(), want, **tol("attention", dtype))


def test_torch_compile_fullgraph_cpu():
    # The op's traced body must pick the reference math for CPU tensors, not the Triton launcher.
    args = make_inputs(1, 32, 4, 4, 2, 16, torch.float32)

    def block(x, pw, pb, ow, ob):
        return attention(x.flip(-1), pw, pb, ow, ob, 2, 16) * 0.5

    fn, seen = compile_recording(block)
    want = expected([args[0].flip(-1), *args[1:]], 2, 16) * 0.5
    torch.testing.assert_close(fn(*args).double(), want, **tol("attention", torch.float32))
    assert "ddpm_fast.attention" in seen, seen  # the op was traced, not its reference math


@pytest.mark.gpu
def test_gpu_device_mismatch_raises():
    args = make_inputs(1, 32, 4, 4, 1, 32, torch.float32, device="cuda")
    with pytest.raises(RuntimeError, match="proj_weight is on cpu"):
        attention(args[0], args[1].cpu(), *args[2:], 1, 32)


# ---------------------------------------------------------------------------------------------
# The CPU kernel (attention_cpu: one qkv GEMM, ATen's SDPA, one out GEMM with the residual): what the op
# and the wrapper run for CPU tensors, at the presets' block shapes and odd ones, NCHW and channels_last.
# ---------------------------------------------------------------------------------------------
_CPU_CASES = ([(1, c, h, w, nh, dk) for _, c, h, w, nh, dk in PRESET_SHAPES] + ODD_SHAPES)


@pytest.mark.parametrize("residual", [False, True], ids=["x", "residual"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", _CPU_CASES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_kernel_matches_reference_and_keeps_layout(case, dtype, layout, residual, monkeypatch):
    A = importlib.import_module("ddpm_fast.ops.attention")
    real = A._new_output
    monkeypatch.setattr(A, "_new_output", lambda x: poison(real(x)))  # NaN unless every element is written
    b, c, h, w, nh, dk = case
    args = make_inputs(b, c, h, w, nh, dk, dtype)
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    args[0] = args[0].contiguous(memory_format=fmt)
    res = torch.randn(b, c, h, w).to(dtype).contiguous(memory_format=fmt) if residual else None
    want = ref.attention(*[a.double() for a in args], nh, dk, None if res is None else res.double())
    for got in (attention(*args, nh, dk, res), torch.ops.ddpm_fast.attention(*args, nh, dk, res)):
        assert got.is_contiguous(memory_format=out_format(args[0])), "the output keeps x's layout"
        torch.testing.assert_close(got.double(), want, **tol("attention", dtype))
