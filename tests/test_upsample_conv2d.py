"""ddpm_fast::upsample_conv2d (the DDPM UNet's Upsample: nearest x2 + 3x3 conv) against
reference.functional.upsample_conv2d.

The fast path folds the 3x3 kernel into a 4x4 transposed-conv kernel and runs conv_transpose2d's Triton
kernel: on CPU through the interpreter (upsample_conv2d_triton); the registered op's
CPU kernel is the reference. Outputs and split-K workspaces are NaN-poisoned.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from helpers import CL, DEVICES, DTYPES, DT_ID, compile_recording, poison
from tolerances import tol

from ddpm_fast import ops
from ddpm_fast.reference import functional as R

pytestmark = pytest.mark.interpreter

M = importlib.import_module("ddpm_fast.ops.upsample_conv2d")
CT = importlib.import_module("ddpm_fast.ops.conv_transpose2d")
G = importlib.import_module("ddpm_fast.ops._conv_gemm")

# (C_in, C_out, H, W) of the Upsample inputs: cifar10-32's up path (C=256 at 4x4, 8x8, 16x16), then odd
# ones (C_out != C_in, H != W, a single pixel).
CIFAR_SHAPES = [(256, 256, 4, 4), (256, 256, 8, 8), (256, 256, 16, 16)]
ODD_SHAPES = [(24, 40, 5, 7), (3, 5, 1, 1), (48, 16, 3, 2)]
# The 256x256 layout's (celebahq/church) Upsamples at batch 1; the interpreter is slow, so these run fp32
# on CPU (all dtypes on CUDA).
LAYOUT256_SHAPES = [(512, 512, 8, 8), (512, 512, 16, 16), (256, 256, 32, 32), (256, 256, 64, 64),
                    (128, 128, 128, 128)]


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    real_out, real_ws = CT._new_output, G.new_workspace
    monkeypatch.setattr(CT, "_new_output", lambda *a: poison(real_out(*a)))
    monkeypatch.setattr(G, "new_workspace", lambda *a: poison(real_ws(*a)))


def make_inputs(b, ci, co, h, w, dtype, device="cpu", channels_last=False, bias=True):
    x = torch.randn(b, ci, h, w, device=device).to(dtype)
    if channels_last:
        x = x.to(memory_format=CL)
    weight = (torch.randn(co, ci, 3, 3, device=device) / (ci * 9) ** 0.5).to(dtype)
    bs = (0.3 * torch.randn(co, device=device)).to(dtype) if bias else None
    return x, weight, bs


def check(out, x, weight, bias):
    # The truth: the spec in float64 on the same (rounded) inputs.
    truth = R.upsample_conv2d(x.double(), weight.double(), bias.double() if bias is not None else None)
    assert out.shape == truth.shape and out.dtype == x.dtype
    fmt = CL if (x.is_contiguous(memory_format=CL) and not x.is_contiguous()) else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), "output must keep x's memory format"
    torch.testing.assert_close(out.double(), truth, **tol("upsample_conv2d", x.dtype))


def fast(device, *args):
    return M.upsample_conv2d_triton(*args) if device == "cpu" else ops.upsample_conv2d(*args)


def test_fold_is_exact_in_float64():
    # The fold itself (no Triton): F.conv_transpose2d with the folded kernel == the spec, to fp64 rounding.
    x, w, b = make_inputs(2, 5, 4, 6, 7, torch.float64)
    got = F.conv_transpose2d(x, M.fold_weight(w), b, 2, 1)
    torch.testing.assert_close(got, R.upsample_conv2d(x, w, b), rtol=1e-13, atol=1e-13)
    w1 = torch.tensor([[[[0.0, 0.0, 0.0], [1.0, 2.0, 4.0], [0.0, 0.0, 0.0]]]], dtype=torch.float64)
    # One row of taps w = [1, 2, 4]: the middle 4x4 row must be [w2, w1 + w2, w0 + w1, w0] = [4, 6, 3, 1]
    # scaled by the vertical fold of [0, 1, 0] = [0, 1, 1, 0].
    assert M.fold_weight(w1)[0, 0].tolist() == [[0, 0, 0, 0], [4, 6, 3, 1], [4, 6, 3, 1], [0, 0, 0, 0]]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape", CIFAR_SHAPES + ODD_SHAPES, ids=lambda s: "{}to{}_{}x{}".format(*s))
@pytest.mark.parametrize("device", DEVICES)
def test_cifar_and_odd_shapes(device, shape, layout, dtype):
    ci, co, h, w = shape
    batches = (1, 3) if ci * h * w <= 4096 else (1,)
    for batch in batches:
        args = make_inputs(batch, ci, co, h, w, dtype, device, channels_last=layout == "cl")
        check(fast(device, *args), *args)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape", LAYOUT256_SHAPES, ids=lambda s: "{}to{}_{}x{}".format(*s))
@pytest.mark.parametrize("device", DEVICES)
def test_256_layout_shapes(device, shape, layout):
    ci, co, h, w = shape
    if device == "cpu" and (h * w > 1024 or (layout == "cl" and h * w > 64)):
        pytest.skip("too slow for the Triton interpreter; runs on CUDA")
    for dtype in (DTYPES if device == "cuda" else [torch.float32]):
        args = make_inputs(1, ci, co, h, w, dtype, device, channels_last=layout == "cl")
        check(fast(device, *args), *args)


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_no_bias_and_forced_splits(device, split):
    x, w, _ = make_inputs(2, 24, 40, 5, 7, torch.float32, device, bias=False)
    out = M.upsample_conv2d_triton(x, w, None, split=split)
    check(out, x, w, None)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_op_on_cpu_runs_the_reference(layout, monkeypatch):
    # CPU tensors take the CPU choice (CPU_FOLDED), through the wrapper and through the op; no Triton launch.
    monkeypatch.setattr(CT, "conv_transpose2d_triton", lambda *a, **k: pytest.fail("launched Triton for CPU"))
    x, w, b = make_inputs(2, 16, 8, 4, 5, torch.float32, channels_last=layout == "cl")
    want = R.upsample_conv2d(x, w, b)
    for out in (ops.upsample_conv2d(x, w, b), torch.ops.ddpm_fast.upsample_conv2d(x, w, b)):
        assert out.is_contiguous(memory_format=CL if layout == "cl" else torch.contiguous_format)
        torch.testing.assert_close(out, want, **tol("upsample_conv2d", torch.float32))
    monkeypatch.setattr(M, "CPU_FOLDED", True)  # the other CPU choice is correct too
    torch.testing.assert_close(ops.upsample_conv2d(x, w, b), want, **tol("upsample_conv2d", torch.float32))
    monkeypatch.undo()
    # The CUDA path's function (fold + ops.conv_transpose2d, cuDNN/oneDNN for these tensors), and forced Triton.
    torch.testing.assert_close(M.upsample_conv2d_folded(x, w, b), want, **tol("upsample_conv2d", torch.float32))
    check(M.upsample_conv2d_folded(x, w, b, force_triton=True), x, w, b)


def test_fake_kernel_opcheck_and_compile():
    x, w, b = make_inputs(2, 16, 8, 4, 5, torch.float32)
    meta = ops.upsample_conv2d(x.to("meta"), w.to("meta"), b.to("meta"))
    assert meta.shape == (2, 8, 8, 10) and meta.device.type == "meta"
    torch.library.opcheck(torch.ops.ddpm_fast.upsample_conv2d.default, (x, w, b),
                          test_utils=("test_schema", "test_faketensor"))
    fn, seen = compile_recording(lambda x: ops.upsample_conv2d(x * 1.0, w, b))
    torch.testing.assert_close(fn(x), R.upsample_conv2d(x, w, b), **tol("upsample_conv2d", torch.float32))
    assert "ddpm_fast.upsample_conv2d" in seen
    assert ops._FAST.upsample_conv2d is ops.upsample_conv2d


@pytest.mark.parametrize("case", ["weight-5x5", "weight-cin", "x-3d", "bias-shape", "dtype"])
def test_bad_inputs_raise(case):
    x, w, b = make_inputs(1, 8, 4, 3, 3, torch.float32)
    args, exc, match = {
        "weight-5x5": ((x, torch.zeros(4, 8, 5, 5), b), ValueError, "3, 3"),
        "weight-cin": ((x, w[:, :4], b), ValueError, "input channels"),
        "x-3d": ((x[0], w, b), ValueError, "4-D"),
        "bias-shape": ((x, w, b[:2]), ValueError, "bias must have shape"),
        "dtype": ((x, w.half(), b), TypeError, "weight dtype"),
    }[case]
    with pytest.raises(exc, match=match):
        ops.upsample_conv2d(*args)
