"""The C++ short-sequence attention core (csrc/attention_core_cpu.cpp) inside the CPU attention block.

attention_cpu runs it for blocks of up to CORE_MAX_TOKENS tokens (ATen's SDPA above). The truth is the
attention of the same qkv rows in float64; outputs are NaN-poisoned before the kernel writes them.
The block as a whole is tested against the reference in test_attention.py (which runs this core
wherever its shapes have <= 64 tokens).
"""
import importlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import poison
from tolerances import tol

A = importlib.import_module("ddpm_fast.ops.attention")
CORE_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
            torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}  # fp32 sums, rounded once to the dtype
# (batch, tokens, heads, d_k): digits16's block (4 x 4 tokens, d_k 128), tiny's, and odd ones: one token,
# token counts off the 16-wide key blocks, d_k off the 64-wide value blocks, several heads, 64 tokens.
SHAPES = [(16, 16, 1, 128), (1, 16, 1, 128), (2, 4, 1, 64), (3, 1, 1, 32), (2, 17, 3, 20), (5, 7, 2, 72),
          (2, 64, 1, 64), (1, 33, 4, 48), (4, 2, 1, 1)]
BINDINGS = ["direct", "dispatcher"]


@pytest.fixture(autouse=True)
def _needs_kernel():
    if A._CORE_OUT is None:
        pytest.fail("the C++ attention core is not available (build ddpm_fast._C: python setup.py build_ext --inplace)")


def make_qkv(b, n, h, d, dtype, row_pad=0):
    """[B*N, 3*h*d] rows (labml's per-head [q | k | v]) with `row_pad` extra columns of row stride, spread
    like real projections (scores of a few units, so the softmax is neither flat nor one-hot)."""
    full = torch.randn(b * n, 3 * h * d + row_pad) * (2.0 / d ** 0.25)
    return full[:, :3 * h * d].to(dtype)


def truth(qkv, b, n, h, d):
    v = qkv.double().view(b, n, h, 3, d)
    q, k, vv = (v[:, :, :, i].transpose(1, 2) for i in range(3))
    return F.scaled_dot_product_attention(q, k, vv, scale=d ** -0.5).transpose(1, 2).reshape(b * n, h * d)


def run_core(qkv, b, h, d, binding="direct"):
    out = poison(torch.empty(qkv.shape[0], h * d, dtype=qkv.dtype))
    kernel = A._CORE_DIRECT if binding == "direct" else A._CORE_OUT
    kernel(qkv, b, h, d, d ** -0.5, out)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_core_matches_the_float64_attention(shape, dtype):
    b, n, h, d = shape
    torch.manual_seed(sum(shape))
    qkv = make_qkv(b, n, h, d, dtype)
    out = run_core(qkv, b, h, d)
    assert not out.isnan().any(), "an output element was never written"
    torch.testing.assert_close(out.double(), truth(qkv, b, n, h, d), **CORE_TOL[dtype])


@pytest.mark.parametrize("binding", BINDINGS)
def test_strided_rows_and_both_bindings(binding):
    torch.manual_seed(1)
    qkv = make_qkv(3, 9, 2, 24, torch.float32, row_pad=5)  # row stride 149 for 144 columns
    assert qkv.stride(0) == 149
    torch.testing.assert_close(run_core(qkv, 3, 2, 24, binding).double(), truth(qkv, 3, 9, 2, 24), **CORE_TOL[torch.float32])


def test_thread_count_does_not_change_the_result():
    # One (sample, head) is one work item whatever the split, so 1 and 2 threads give the same bits.
    code = ("import importlib, torch; A = importlib.import_module('ddpm_fast.ops.attention'); torch.manual_seed(0); "
            "qkv = torch.randn(32 * 16, 3 * 128).bfloat16(); outs = []\n"
            "for th in (1, 2):\n"
            "    torch.set_num_threads(th); o = torch.empty(32 * 16, 128, dtype=torch.bfloat16)\n"
            "    A._CORE_DIRECT(qkv, 32, 1, 128, 128 ** -0.5, o); outs.append(o)\n"
            "assert torch.equal(outs[0], outs[1]), 'thread count changed the result'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.parametrize("binding", BINDINGS)
def test_bad_arguments_raise(binding):
    kernel = A._CORE_DIRECT if binding == "direct" else A._CORE_OUT
    buf = torch.randn(32 * 3 * 64)
    qkv = buf.view(32, 3 * 64)
    out = torch.empty(32, 64)
    cases = [
        ((qkv, 3, 1, 64, 0.1, out), ValueError, "qkv must be"),                      # 32 rows, batch 3
        ((qkv, 2, 1, 32, 0.1, out), ValueError, "qkv must be"),                      # width 192 != 3 * 32
        ((qkv, 2, 1, 64, 0.1, torch.empty(32, 63)), ValueError, "out must be"),
        ((qkv, 2, 1, 64, 0.1, torch.empty(32, 64).t().contiguous().t()), ValueError, "out must be"),
        ((qkv, 2, 1, 64, 0.1, out.double()), TypeError, "share one dtype"),
        ((qkv.t(), 2, 1, 64, 0.1, out), ValueError, "qkv must be"),
        ((qkv, 0, 1, 64, 0.1, out), ValueError, "must be positive"),
        ((qkv, 2, 1, 64, 0.1, buf[:32 * 64].view(32, 64)), ValueError, "must not overlap qkv"),
    ]
    for args, err, msg in cases:
        with pytest.raises(err, match=msg):
            kernel(*args)


def test_attention_cpu_takes_the_core_up_to_its_token_limit(monkeypatch):
    calls = []
    real = A._CORE_DIRECT
    monkeypatch.setattr(A, "_CORE_DIRECT", lambda *a: (calls.append(a[0].shape), real(*a))[1])
    torch.manual_seed(2)
    for side, used in ((4, True), (8, True), (16, False)):  # 16, 64 and 256 tokens
        c = 32
        x = torch.randn(2, c, side, side).contiguous(memory_format=torch.channels_last)
        w = [torch.randn(3 * c, c) * c ** -0.5, torch.randn(3 * c), torch.randn(c, c) * c ** -0.5, torch.randn(c)]
        calls.clear()
        got = A.attention(x, *w, 1, c)
        assert bool(calls) == used and (side * side <= A.CORE_MAX_TOKENS) == used
        want = A._reference_out(x.double(), *[t.double() for t in w], 1, c)
        torch.testing.assert_close(got.double(), want, **tol("attention", torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_projections_run_on_packed_weights_inside_a_packing_scope(dtype, monkeypatch):
    # In the fast sampler's scope (ops.cpu_conv_packing) a channels_last block's two projections are
    # 1x1 convs on weights packed once (ops/_cpu_conv.py linear_packed). An NCHW block keeps the qkv GEMM
    # (its x is not channels_last); its out projection reads the core's token-major rows either way.
    from ddpm_fast import ops
    P = importlib.import_module("ddpm_fast.ops._cpu_conv")
    if not P.AVAILABLE:
        pytest.skip("this torch build lacks the oneDNN packed-conv ops")
    taken, real = [], P.linear_packed
    monkeypatch.setattr(P, "linear_packed", lambda *a: (lambda r: (taken.append(r is not None), r)[1])(real(*a)))
    torch.manual_seed(3)
    c = 64
    x = torch.randn(16, c, 4, 4).to(dtype).contiguous(memory_format=torch.channels_last)
    w = [(torch.randn(3 * c, c) * c ** -0.5).to(dtype), torch.randn(3 * c).to(dtype),
         (torch.randn(c, c) * c ** -0.5).to(dtype), torch.randn(c).to(dtype)]
    with ops.cpu_conv_packing():
        got = A.attention(x, *w, 1, c)
        assert taken == [True, True]
        with torch.no_grad():
            w[2].mul_(-1.0)  # the out projection changed in place: repacked, not stale
        changed = A.attention(x, *w, 1, c)
        taken.clear()
        nchw = A.attention(x.contiguous(), *w, 1, c)
        assert nchw.is_contiguous()
        assert taken == [False, True], "an NCHW x took the packed qkv projection"
    for out, weights in ((got, [w[0], w[1], -w[2], w[3]]), (changed, w), (nchw, w)):
        want = A._reference_out(x.double(), *[t.double() for t in weights], 1, c)
        torch.testing.assert_close(out.double(), want, **tol("attention", dtype))
    assert got.is_contiguous(memory_format=torch.channels_last)
