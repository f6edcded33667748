"""The fast sampler's prepacked oneDNN convolutions on CPU (ddpm_fast/ops/_cpu_conv.py), through the
ops that use them (ops.conv2d, ops.conv_transpose2d) inside a packing scope, against F.conv2d /
F.conv_transpose2d in float64 on the same inputs: the presets' real shapes and odd ones, fp32 and bf16,
channels_last (the only layout the packed path takes); the scope's caching and invalidation rules.
"""
import importlib
import threading

import pytest
import torch

from helpers import CL
from tolerances import tol

from ddpm_fast import ops
from ddpm_fast.config import PRESETS
from ddpm_fast.ops._common import out_format
from ddpm_fast.reference import functional as R
from ddpm_fast.testing.shapes import unet_conv_shapes, unet_upsample_shapes

P = importlib.import_module("ddpm_fast.ops._cpu_conv")
pytestmark = pytest.mark.skipif(not P.AVAILABLE, reason="this torch build lacks the oneDNN packed-conv ops")

DTYPES = [torch.float32, torch.bfloat16]
# digits16 (the shipped model) and cifar35m at their real shapes, plus odd ones: C_in = 3 and 5, 7 x 9
# and 1 x 1 maps, C_out not a multiple of the vector width, stride 2.
CONV_SHAPES = sorted(set(unet_conv_shapes(PRESETS["digits16"].unet)) | set(unet_conv_shapes(PRESETS["cifar35m"].unet))
                     | {(3, 7, 9, 20, 3, 1, True), (5, 1, 1, 13, 3, 1, False), (40, 9, 7, 24, 3, 2, True),
                        (24, 5, 5, 17, 1, 1, True)})
UP_SHAPES = sorted(set(unet_upsample_shapes(PRESETS["digits16"].unet)) | {(24, 3, 5), (12, 1, 1)})


def _cache_size() -> int:
    cache = getattr(P._LOCAL, "cache", None)
    return -1 if cache is None else len(cache)


def conv_inputs(b, shape, dtype, layout=CL):
    ci, h, w, co, k, stride, bias = shape
    x = torch.randn(b, ci, h, w).to(dtype).contiguous(memory_format=layout)
    weight = (torch.randn(co, ci, k, k) / (ci * k * k) ** 0.5).to(dtype)
    bs = (0.3 * torch.randn(co)).to(dtype) if bias else None
    return x, weight, bs, (stride, stride), (k // 2, k // 2)


def check_conv(out, x, weight, bias, stride, padding):
    b64 = bias.double() if bias is not None else None
    want = R.conv2d(x.double(), weight.double(), b64, stride, padding).to(x.dtype)
    assert out.shape == want.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, want, **tol("conv2d_truth", x.dtype))
    torch.testing.assert_close(out, R.conv2d(x, weight, bias, stride, padding), **tol("conv2d", x.dtype))


def _id(s):
    return "x".join(map(str, s))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=_id)
@pytest.mark.parametrize("batch", [1, 16])
def test_packed_conv2d_matches_reference(shape, dtype, batch):
    if batch == 16 and shape[1] * shape[2] * shape[0] * shape[3] > 2 ** 21:
        pytest.skip("cifar35m's largest convs at batch 16 take seconds in float64: batch 1 covers them")
    args = conv_inputs(batch, shape, dtype)
    # A 1-channel or 1x1 map is NCHW-contiguous too, so the layout rule says NCHW: not packed; nor is a
    # small fp32 input (F.conv2d measured faster there).
    small = dtype == torch.float32 and args[0].numel() < P.PACK_MIN_ELEMENTS_FP32
    packs = out_format(args[0]) == CL and not small
    with ops.cpu_conv_packing():
        out = ops.conv2d(*args)
        assert _cache_size() == int(packs), "the packed path was not taken" if packs else "packed an NCHW input"
        again = ops.conv2d(*args)  # the cached packed weight
        assert _cache_size() == int(packs)
    assert out.is_contiguous(memory_format=out_format(args[0])), "output must keep x's layout"
    check_conv(out, *args)
    assert torch.equal(again, out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", UP_SHAPES, ids=_id)
def test_packed_conv_transpose2d_matches_reference(shape, dtype):
    c, h, w = shape
    x = torch.randn(3, c, h, w).to(dtype).contiguous(memory_format=CL)
    weight = (torch.randn(c, c, 4, 4) / (4 * c) ** 0.5).to(dtype)
    bias = (0.3 * torch.randn(c)).to(dtype)
    packs = out_format(x) == CL
    with ops.cpu_conv_packing():
        out = ops.conv_transpose2d(x, weight, bias, (2, 2), (1, 1))
        assert _cache_size() == int(packs), "the packed path was not taken" if packs else "packed an NCHW input"
    assert out.is_contiguous(memory_format=out_format(x)) and out.shape == (3, c, 2 * h, 2 * w)
    want = R.conv_transpose2d(x.double(), weight.double(), bias.double(), (2, 2), (1, 1)).to(dtype)
    torch.testing.assert_close(out, want, **tol("conv_transpose2d_truth", dtype))


def test_nchw_and_outside_a_scope_are_not_packed():
    shape = (32, 8, 8, 32, 3, 1, True)
    nchw = conv_inputs(2, shape, torch.float32, torch.contiguous_format)
    with ops.cpu_conv_packing():
        out = ops.conv2d(*nchw)
        assert _cache_size() == 0  # oneDNN's packed conv would write channels_last: the op keeps NCHW
        assert out.is_contiguous()
        check_conv(out, *nchw)
        args = list(conv_inputs(2, shape, torch.float32))
        args[0] = args[0][:, :, :, :7]  # a strided (non-dense) view
        check_conv(ops.conv2d(*args), *args)
        assert _cache_size() == 0
    cl = conv_inputs(2, shape, torch.float32)
    assert _cache_size() == -1
    check_conv(ops.conv2d(*cl), *cl)
    assert _cache_size() == -1, "nothing is cached outside a scope"


def test_disabled_onednn_and_grad_take_f_conv2d():
    args = conv_inputs(2, (16, 6, 6, 8, 3, 1, True), torch.float32)
    with ops.cpu_conv_packing():
        with torch.backends.mkldnn.flags(enabled=False):
            check_conv(ops.conv2d(*args), *args)
        assert _cache_size() == 0
        w = args[1].clone().requires_grad_()  # recording autograd: F.conv2d, whose backward exists
        ops.conv2d(args[0], w, *args[2:]).sum().backward()
        assert _cache_size() == 0 and w.grad is not None


def test_weight_changed_in_place_is_repacked():
    x, weight, bias, stride, padding = conv_inputs(4, (16, 8, 8, 16, 3, 1, True), torch.bfloat16)  # bf16 packs any size
    with ops.cpu_conv_packing():
        first = ops.conv2d(x, weight, bias, stride, padding)
        with torch.no_grad():
            weight.mul_(-2.0)  # an optimizer step / load_state_dict: bumps the version counter
        second = ops.conv2d(x, weight, bias, stride, padding)
        check_conv(second, x, weight, bias, stride, padding)
        assert not torch.allclose(first, second)
        other = weight.clone()  # same values, another tensor: its own entry
        ops.conv2d(x, other, bias, stride, padding)
        assert _cache_size() == 2
        ops.conv2d(x[:2], weight, bias, stride, padding)  # another input shape: packed for it
        assert _cache_size() == 3


def test_scopes_nest_and_are_per_thread():
    args = conv_inputs(2, (8, 4, 4, 8, 3, 1, False), torch.bfloat16)
    seen = []
    with ops.cpu_conv_packing():
        ops.conv2d(*args)
        with ops.cpu_conv_packing():  # the inner scope shares the outer cache
            assert _cache_size() == 1
        assert _cache_size() == 1
        worker = threading.Thread(target=lambda: seen.append(_cache_size()))
        worker.start()
        worker.join()
    assert seen == [-1] and _cache_size() == -1
    with pytest.raises(ValueError):  # a failure inside the block still closes the scope
        with ops.cpu_conv_packing():
            raise ValueError("boom")
    assert _cache_size() == -1


def test_fused_channels_last_unet_uses_packed_convs():
    """The digits16 UNet, fused and channels_last, inside a scope: every conv but the 1-channel input conv
    (NCHW by the layout rule) runs packed, and the forward matches the reference UNet."""
    from ddpm_fast.reference import build_unet

    torch.manual_seed(0)
    model = build_unet(PRESETS["digits16"].unet).eval()
    x = torch.randn(16, 1, 16, 16)  # every conv input >= PACK_MIN_ELEMENTS_FP32 (the 4 x 4 ones at batch 16)
    t = torch.tensor([0, 10, 500, 999]).repeat(4)
    with torch.no_grad():
        want = model(x, t)
        fast = ops.fused(model.to(memory_format=CL))
        calls = []
        real = P._packed_call
        P._packed_call = lambda *a: calls.append(a[1]) or real(*a)
        try:
            with ops.cpu_conv_packing():
                got = fast(x, t)
        finally:
            P._packed_call = real
    n_conv = len(unet_conv_shapes(PRESETS["digits16"].unet))
    assert calls.count(True) == 2 and calls.count(False) >= n_conv - 2
    torch.testing.assert_close(got, want, **tol("fused_unet_cpu", torch.float32))


def test_inference_tensor_weights_are_not_packed():
    # Made under inference_mode, a weight has no version counter to check staleness by: F.conv2d runs.
    with torch.inference_mode():
        args = conv_inputs(2, (16, 8, 8, 16, 3, 1, True), torch.bfloat16)
        with ops.cpu_conv_packing():
            out = ops.conv2d(*args)
            assert _cache_size() == 0
            up_weight = (torch.randn(16, 16, 4, 4) / 8).to(torch.bfloat16)
            up = ops.conv_transpose2d(args[0], up_weight, None, (2, 2), (1, 1))
            assert _cache_size() == 0 and up.shape == (2, 16, 16, 16)
        check_conv(out, *args)


def _count_full_checks(monkeypatch) -> list:
    """Counts ops.conv2d's full argument checks (the path a repeated call skips)."""
    C = importlib.import_module("ddpm_fast.ops.conv2d")
    calls, real = [], C._check
    monkeypatch.setattr(C, "_check", lambda *a: (calls.append(1), real(*a))[1])
    return calls


def test_a_repeated_call_skips_the_checks_and_gives_the_same_bits(monkeypatch):
    checks = _count_full_checks(monkeypatch)
    x, weight, bias, stride, padding = conv_inputs(4, (16, 8, 8, 24, 3, 1, True), torch.bfloat16)
    with ops.cpu_conv_packing():
        first = ops.conv2d(x, weight, bias, stride, padding)
        for _ in range(3):
            assert torch.equal(ops.conv2d(x, weight, bias, stride, padding), first)
        assert checks == [1], "repeated calls ran the full path"
        ops.conv2d(x, weight, bias, list(stride), padding)  # a list, not the tuple that was recorded
        ops.conv2d(x.contiguous(), weight, bias, stride, padding)  # other strides (NCHW)
        ops.conv2d(x[:2], weight, bias, stride, padding)  # another shape
        assert checks == [1, 1, 1, 1]
    check_conv(first, x, weight, bias, stride, padding)
    ops.conv2d(x, weight, bias, stride, padding)  # the scope closed: its record went with it
    assert len(checks) == 5


def test_a_repeated_call_follows_changed_weights_and_biases(monkeypatch):
    checks = _count_full_checks(monkeypatch)
    x, weight, bias, stride, padding = conv_inputs(2, (16, 6, 6, 16, 3, 1, True), torch.bfloat16)
    with ops.cpu_conv_packing():
        ops.conv2d(x, weight, bias, stride, padding)
        with torch.no_grad():
            weight.mul_(-2.0)  # version bump: not a repeat
        check_conv(ops.conv2d(x, weight, bias, stride, padding), x, weight, bias, stride, padding)
        with torch.no_grad():
            bias.add_(1.0)  # the bias is read on every call: a repeat, with the new values
        check_conv(ops.conv2d(x, weight, bias, stride, padding), x, weight, bias, stride, padding)
        assert len(checks) == 2
        bias.data = bias.data.float()  # same object, another storage and dtype: the full checks refuse it
        with pytest.raises(TypeError, match="bias dtype"):
            ops.conv2d(x, weight, bias, stride, padding)
        bias.data = bias.data.to(torch.bfloat16)  # back to a bf16 bias (new storage): checked, run, recorded
        ops.conv2d(x, weight, bias, stride, padding)
        ops.conv2d(x, weight, bias, stride, padding)
        assert len(checks) == 4
        x.requires_grad_()  # autograd would record: the full path (F.conv2d), with the same objects
        ops.conv2d(x, weight, bias, stride, padding)
        assert len(checks) == 5
