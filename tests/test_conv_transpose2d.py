"""ddpm_fast::conv_transpose2d (the Upsample) against F.conv_transpose2d.

On CPU the Triton kernel runs through the interpreter via the raw launcher (the registered op's CPU
kernel is F.conv_transpose2d itself); on CUDA the launcher and the registered op are tested. Outputs and
split-K workspaces are NaN-poisoned before the kernels write them: each of the four parity classes must
write its quarter of every output.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from helpers import CL, DEVICES, DTYPES, DT_ID, compile_recording, poison
from tolerances import tol

from ddpm_fast.config import PRESETS
from ddpm_fast.reference import functional as R
from ddpm_fast.testing.shapes import unet_upsample_shapes

pytestmark = pytest.mark.interpreter

M = importlib.import_module("ddpm_fast.ops.conv_transpose2d")
G = importlib.import_module("ddpm_fast.ops._conv_gemm")  # the dispatch knob and split-K workspace both convs share
S, P = (2, 2), (1, 1)

# Every (C, H, W) input the presets' Upsamples see, measured on the meta device.
PRESET_SHAPES = {name: unet_upsample_shapes(cfg.unet) for name, cfg in PRESETS.items()}
ALL_SHAPES = sorted({s for shapes in PRESET_SHAPES.values() for s in shapes})
# (C_in, C_out, H, W): the small presets' real Upsamples and odd ones (C_out != C_in, H != W).
CPU_SHAPES = [(32, 32, 8, 8), (64, 64, 4, 4), (24, 40, 5, 7), (3, 5, 1, 1)]


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    real_out, real_ws = M._new_output, G.new_workspace
    monkeypatch.setattr(M, "_new_output", lambda *a: poison(real_out(*a)))
    monkeypatch.setattr(G, "new_workspace", lambda *a: poison(real_ws(*a)))


def make_inputs(b, ci, co, h, w, dtype, device="cpu", channels_last=False, bias=True):
    x = torch.randn(b, ci, h, w, device=device).to(dtype)
    if channels_last:
        x = x.to(memory_format=CL)
    weight = (torch.randn(ci, co, 4, 4, device=device) / (ci * 4) ** 0.5).to(dtype)
    bs = (0.3 * torch.randn(co, device=device)).to(dtype) if bias else None
    return x, weight, bs


def check(out, x, weight, bias, same_dtype_ref=True):
    b64 = bias.double() if bias is not None else None
    # The truth stays in float64: rounding it to x's dtype first would add up to half an ulp to the error.
    truth = F.conv_transpose2d(x.double(), weight.double(), b64, S, P)
    assert out.shape == truth.shape and out.dtype == x.dtype
    fmt = CL if (x.is_contiguous(memory_format=CL) and not x.is_contiguous()) else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), "output must keep x's memory format"
    torch.testing.assert_close(out.double(), truth, **tol("conv_transpose2d_truth", x.dtype))
    if not same_dtype_ref:
        return
    if x.dtype == torch.bfloat16:
        # No comparison with CPU's own bf16 transposed conv: without AVX512_BF16 oneDNN rounds its partial
        # sums to bf16 (measured up to 3.6e-2 from the float64 truth on an AVX2 EPYC, against the kernel's
        # 1.4e-2), so that reference is the less accurate side; the truth check above is the test.
        return
    torch.testing.assert_close(out, R.conv_transpose2d(x, weight, bias, S, P), **tol("conv_transpose2d", x.dtype))


def test_preset_shapes_are_measured():
    assert PRESET_SHAPES["cifar35m"] == [(128, 16, 16), (256, 8, 8), (256, 4, 4)]
    assert (32, 8, 8) in PRESET_SHAPES["tiny"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "{}to{}_{}x{}".format(*s))
@pytest.mark.parametrize("device", DEVICES)
def test_preset_and_odd_shapes(device, shape, layout, dtype):
    ci, co, h, w = shape
    for batch in (1, 3):
        args = make_inputs(batch, ci, co, h, w, dtype, device, channels_last=layout == "cl")
        check(M.conv_transpose2d_triton(*args), *args, same_dtype_ref=device == "cpu")


@pytest.mark.parametrize("split", [1, 3, 1000])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("device", DEVICES)
def test_forced_k_splits(device, bias, split):
    args = make_inputs(2, 24, 40, 5, 7, torch.float32, device, bias=bias)
    check(M.conv_transpose2d_triton(*args, split=split), *args, same_dtype_ref=device == "cpu")


def test_launcher_refuses_other_geometries():
    x, w, b = make_inputs(1, 8, 8, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="only a 4x4 filter"):
        M.conv_transpose2d_triton(x, w, b, (1, 1), (1, 1))
    assert M.supported(w, S, P) and not M.supported(w[:, :, :3, :3], S, P)


@pytest.mark.parametrize("geometry", [((4, 4), (1, 1), (2, 2)), ((3, 3), (2, 2), (1, 1))])
def test_op_other_geometries_take_the_reference(geometry):
    (kh, kw), stride, padding = geometry
    x = torch.randn(2, 8, 5, 5)
    w = torch.randn(8, 6, kh, kw)
    assert not M.supported(w, stride, padding)  # the routing a GPU takes (on CPU the op is the reference)
    out = M.conv_transpose2d(x, w, None, stride, padding)
    assert torch.equal(out, F.conv_transpose2d(x, w, None, stride, padding))


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_cpu_calls_never_launch_triton(layout, monkeypatch):
    # CPU tensors take oneDNN, through the wrapper and through the op, in x's layout; a kernel launch fails.
    monkeypatch.setattr(M, "conv_transpose2d_triton", lambda *a, **k: pytest.fail("launched Triton for CPU tensors"))
    x, w, b = make_inputs(2, 16, 16, 4, 4, torch.float32, channels_last=layout == "cl")
    truth = F.conv_transpose2d(x.double(), w.double(), b.double(), S, P)
    fmt = CL if layout == "cl" else torch.contiguous_format
    for out in (M.conv_transpose2d(x, w, b, S, P), torch.ops.ddpm_fast.conv_transpose2d(x, w, b, [2, 2], [1, 1])):
        assert out.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(out.double(), truth, **tol("conv_transpose2d_truth", x.dtype))


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 16, 5, 7).to(memory_format=CL)
        out = torch.ops.ddpm_fast.conv_transpose2d(x, torch.empty(16, 8, 4, 4), None, [2, 2], [1, 1])
        assert out.shape == (2, 8, 10, 14) and out.is_contiguous(memory_format=CL)


def test_op_opcheck_and_compile_cpu():
    x, w, b = make_inputs(2, 16, 16, 4, 4, torch.float32)
    torch.library.opcheck(torch.ops.ddpm_fast.conv_transpose2d.default, (x, w, b, [2, 2], [1, 1]))
    # The op itself traces without graph breaks (the wrapper calls oneDNN directly on CPU tensors).
    fn, seen = compile_recording(lambda x: torch.ops.ddpm_fast.conv_transpose2d(x, w, b, [2, 2], [1, 1]))
    torch.testing.assert_close(fn(x), R.conv_transpose2d(x, w, b, S, P), **tol("conv_transpose2d", x.dtype))
    assert "ddpm_fast.conv_transpose2d" in seen, seen


def _bad_cases():
    x, w, b = make_inputs(2, 16, 8, 4, 4, torch.float32)
    return [
        ("x_3d", (x[0], w, b, S, P), ValueError, "4-D"),
        ("x_int", (x.to(torch.int32), w, b, S, P), TypeError, "x dtype"),
        ("weight_not_square", (x, w[:, :, :3], b, S, P), ValueError, "square filter"),
        ("channels", (x[:, :8], w, b, S, P), ValueError, "expects 16 input channels"),
        ("weight_dtype", (x, w.half(), b, S, P), TypeError, "weight dtype"),
        ("weight_device", (x, w.to("meta"), b, S, P), RuntimeError, "weight is on meta"),
        ("bias_shape", (x, w, b[:4], S, P), ValueError, "bias must have shape"),
        ("bias_dtype", (x, w, b.double(), S, P), TypeError, "bias dtype"),
        ("stride_zero", (x, w, b, (0, 2), P), ValueError, "stride must be >= 1"),
        ("padding_pair", (x, w, b, S, (1, 1, 1)), ValueError, "padding must be a pair"),
        ("no_output", (x[:, :, :1, :1], w, b, S, (3, 3)), ValueError, "leaves no output"),
    ]


@pytest.mark.parametrize("name", [c[0] for c in _bad_cases()])
def test_bad_inputs_raise(name):
    _, args, exc, msg = next(c for c in _bad_cases() if c[0] == name)
    with pytest.raises(exc, match=msg):
        M.conv_transpose2d(*args)


# --- GPU only ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("batch", [1, 64])
def test_gpu_full_preset_grid(batch, layout, dtype):
    for c, h, w in ALL_SHAPES:
        args = make_inputs(batch, c, c, h, w, dtype, "cuda", channels_last=layout == "cl")
        out = M.conv_transpose2d_triton(*args)
        torch.cuda.synchronize()
        try:
            check(out, *args, same_dtype_ref=False)
        except AssertionError as e:
            raise AssertionError(f"shape {(c, h, w)}: {e}") from None


@pytest.mark.gpu
def test_gpu_op_dispatch_at_batch_1():
    for c, h, w in PRESET_SHAPES["cifar35m"]:
        args = make_inputs(1, c, c, h, w, torch.float32, "cuda")
        assert M.use_triton(args[0], args[1], S, P)
        check(M.conv_transpose2d(*args, S, P), *args, same_dtype_ref=False)


@pytest.mark.gpu
def test_gpu_opcheck_and_compile(monkeypatch):
    monkeypatch.setattr(G, "BACKEND", "triton")
    x, w, b = make_inputs(1, 128, 128, 16, 16, torch.float32, "cuda")
    torch.library.opcheck(torch.ops.ddpm_fast.conv_transpose2d.default, (x, w, b, [2, 2], [1, 1]))
    compiled = torch.compile(lambda x: M.conv_transpose2d(torch.relu(x), w, b, S, P), fullgraph=True)
    check(compiled(x), torch.relu(x), w, b, same_dtype_ref=False)
