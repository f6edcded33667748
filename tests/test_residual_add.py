"""ddpm_fast::residual_add against the reference (ddpm_fast.reference.functional.residual_add).

On CPU the Triton kernel runs through the interpreter via the raw launcher (the registered op's CPU
kernel is the C++ kernel, tested in test_<op>_cpu.py); on CUDA the registered op is tested. Every kernel
output buffer is NaN-poisoned before the kernel writes it.
"""
import importlib

import pytest
import torch

from helpers import CL, DEVICES, DTYPES, DT_ID, compile_recording, poison
from tolerances import tol

from ddpm_fast.config import PRESETS
from ddpm_fast.reference import functional as R
from ddpm_fast.testing.shapes import unet_residual_shapes

pytestmark = pytest.mark.interpreter

M = importlib.import_module("ddpm_fast.ops.residual_add")

# Every (C, H, W, shortcut) the presets' ResidualBlocks feed the op, measured on the meta device.
PRESET_SHAPES = {name: unet_residual_shapes(cfg.unet) for name, cfg in PRESETS.items()}
ALL_SHAPES = sorted({s for shapes in PRESET_SHAPES.values() for s in shapes})
# The CPU subset: each preset's largest activation and widest channels, both shortcut kinds.
CPU_SHAPES = [
    (128, 32, 32, "conv"),      # cifar35m first level (up block: 1x1 shortcut)
    (64, 32, 32, "identity"),   # labml-cifar32 first level
    (1024, 4, 4, "identity"),   # labml-cifar32 middle
    (256, 8, 8, "conv"),        # cifar35m / labml-cifar32 8x8
    (32, 16, 16, "identity"),   # tiny / digits16
    (96, 7, 9, "conv"),         # odd: C = 96, 7 x 9
]


def shape_id(s):
    c, h, w, kind = s
    return f"C{c}_{h}x{w}_{kind}"


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    real = M._new_output
    monkeypatch.setattr(M, "_new_output", lambda x: poison(real(x)))


def make_inputs(b, c, h, w, dtype, device="cpu", kind="conv", channels_last=False, bias=True,
                bias_dtype=None):
    # Fresh random values of mixed sign and scale (never zeros); biases of the size a conv's has.
    bias_dtype = bias_dtype or dtype
    x = (torch.randn(b, c, h, w, device=device) * 2.0).to(dtype)
    r = (torch.randn(b, c, h, w, device=device) + 0.5).to(dtype)
    if channels_last:
        x, r = x.to(memory_format=CL), r.to(memory_format=CL)
    bs = (0.3 * torch.randn(c, device=device)).to(bias_dtype) if bias else None
    rb = (0.3 * torch.randn(c, device=device)).to(bias_dtype) if kind == "conv" else None
    return x, bs, r, rb


def fast(x, bias, r, rb):
    """The kernel under test: the launcher under the interpreter on CPU, the registered op on CUDA."""
    if x.is_cuda:
        return M.residual_add(x, bias, r, rb)
    return M.residual_add_triton(x, bias, r, rb)


def truth(x, bias, r, rb):
    """The spec in float64 (biases cast to x's dtype first, as the spec does), rounded once to x's dtype."""
    out = x.double() + r.double()
    for b in (bias, rb):
        if b is not None:
            out = out + b.to(x.dtype).double()[:, None, None]
    return out.to(x.dtype)


def check(out, x, bias, r, rb):
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    fmt = CL if (x.is_contiguous(memory_format=CL) and not x.is_contiguous()) else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), "output must keep x's memory format"
    # The kernel sums in fp32 and rounds once: one ulp of the dtype from the float64 truth at most.
    torch.testing.assert_close(out, truth(x, bias, r, rb), **tol("residual_add_truth", x.dtype))
    # And the reference (which rounds after each add in fp16/bf16) within its own tolerance.
    torch.testing.assert_close(out, R.residual_add(x, bias, r, rb), **tol("residual_add", x.dtype))


def test_preset_shapes_are_measured():
    # Spot checks against the UNet: cifar35m's first up block concatenates 128 + 128 (1x1 shortcut),
    # labml-cifar32's middle blocks keep 1024 channels (identity).
    assert (128, 32, 32, "conv") in PRESET_SHAPES["cifar35m"]
    assert (1024, 4, 4, "identity") in PRESET_SHAPES["labml-cifar32"]
    assert all(s in ALL_SHAPES for s in CPU_SHAPES[:-1]) and len(ALL_SHAPES) > 20


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=shape_id)
@pytest.mark.parametrize("device", DEVICES)
def test_preset_and_odd_shapes(device, shape, layout, dtype):
    c, h, w, kind = shape
    for batch in (1, 3):
        args = make_inputs(batch, c, h, w, dtype, device, kind, channels_last=layout == "cl")
        check(fast(*args), *args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("device", DEVICES)
def test_fp32_biases_with_low_precision_x(device, dtype):
    # Mixed precision keeps conv biases in fp32: the spec rounds them to x's dtype before adding.
    args = make_inputs(2, 64, 8, 8, dtype, device, "conv", bias_dtype=torch.float32)
    check(fast(*args), *args)


@pytest.mark.parametrize("biases", ["none", "bias-only", "residual-bias-only"])
@pytest.mark.parametrize("device", DEVICES)
def test_optional_biases(device, biases):
    x, b, r, rb = make_inputs(3, 96, 7, 9, torch.float32, device, "conv")
    b = None if biases in ("none", "residual-bias-only") else b
    rb = None if biases in ("none", "bias-only") else rb
    check(fast(x, b, r, rb), x, b, r, rb)


@pytest.mark.parametrize("device", DEVICES)
def test_large_flat_index(device):
    # More elements than one program's block many times over, ending mid-block, C not a power of two.
    args = make_inputs(5, 48, 33, 31, torch.float32, device, "conv", channels_last=True)
    check(fast(*args), *args)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("device", DEVICES)
def test_int64_indexing_path(device, layout, monkeypatch):
    # Tensors past 2^31 elements index in int64; run that variant of the kernel on a small tensor.
    monkeypatch.setattr(M, "INT64_FROM", 1)
    args = make_inputs(3, 96, 7, 9, torch.float32, device, "conv", channels_last=layout == "cl")
    check(M.residual_add_triton(*args), *args)


def test_empty_batch():
    x, b, r, rb = make_inputs(0, 64, 8, 8, torch.float32)
    assert M.residual_add_triton(x, b, r, rb).shape == x.shape


def test_fusable_layout():
    x = torch.randn(2, 64, 8, 8)
    assert M.fusable_layout(x, x) is False
    xc = x.to(memory_format=CL)
    assert M.fusable_layout(xc, xc.clone()) is True
    assert M.fusable_layout(x, xc) is None  # different layouts
    assert M.fusable_layout(x[:, :32], x[:, :32]) is None  # a channel slice is not dense
    with pytest.raises(ValueError, match="layout"):
        M.residual_add_triton(x, None, xc, None)


@pytest.mark.parametrize("case", ["mixed-layouts", "channel-slice", "transposed"])
def test_op_unfusable_layouts_take_the_reference(case):
    # The op accepts any strides; layouts the kernel cannot walk linearly run the reference math.
    x, b, r, rb = make_inputs(2, 64, 8, 8, torch.float32, kind="conv")
    if case == "mixed-layouts":
        r = r.to(memory_format=CL)
    elif case == "channel-slice":
        x = torch.randn(2, 128, 8, 8)[:, 64:]
    else:
        x = x.transpose(2, 3)
        r = r.transpose(2, 3)
    # The C++ and Triton kernels both take only fusable layouts: these run the reference on either device.
    assert M.fusable_layout(x, r) is None
    out = M.residual_add(x, b, r, rb)
    torch.testing.assert_close(out, R.residual_add(x, b, r, rb), **tol("residual_add", x.dtype))


# --- the registered op and its wrapper -------------------------------------------------------------
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_op_cpu_kernel_is_the_cpp_kernel(layout):
    # The wrapper (eager bypass) and the registered op both run the C++ kernel on CPU tensors (the
    # reference where the extension is missing); its accuracy is tested in test_residual_add_cpu.py.
    x, b, r, rb = make_inputs(2, 64, 8, 8, torch.bfloat16, channels_last=layout == "cl")
    if M._CPP_OUT is None:
        want = R.residual_add(x, b, r, rb)
    else:
        want = poison(M._new_output(x))
        torch.ops.ddpm_fast.residual_add_out(x, b, r, rb, want)
    for out in (M.residual_add(x, b, r, rb), torch.ops.ddpm_fast.residual_add(x, b, r, rb)):
        assert torch.equal(out, want)
        assert out.is_contiguous(memory_format=CL if layout == "cl" else torch.contiguous_format)


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 64, 8, 8).to(memory_format=CL)
        out = torch.ops.ddpm_fast.residual_add(x, torch.empty(64), x, None)
        assert out.shape == x.shape and out.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("case", ["fp32_conv", "bf16_cl_identity"])
def test_op_opcheck_cpu(case):
    dtype = torch.float32 if case == "fp32_conv" else torch.bfloat16
    args = make_inputs(2, 64, 8, 8, dtype, kind="conv" if case == "fp32_conv" else "identity",
                       channels_last=case != "fp32_conv")
    torch.library.opcheck(torch.ops.ddpm_fast.residual_add.default, args)


def test_op_compiles_fullgraph_cpu():
    x, b, r, rb = make_inputs(2, 64, 8, 8, torch.float32)
    fn, seen = compile_recording(lambda x, r: M.residual_add(x, b, r, rb))
    torch.testing.assert_close(fn(x, r), R.residual_add(x, b, r, rb), **tol("residual_add", x.dtype))
    assert "ddpm_fast.residual_add" in seen, seen  # the op was traced, not its reference math


def _bad_cases():
    x, b, r, rb = make_inputs(2, 64, 4, 4, torch.float32)
    return [
        ("x_3d", (x[0], b, r[0], rb), ValueError, "4-D"),
        ("x_int", (x.to(torch.int32), None, r.to(torch.int32), None), TypeError, "x dtype"),
        ("x_fp64", (x.double(), None, r.double(), None), TypeError, "x dtype"),
        ("residual_not_tensor", (x, b, 1.0, rb), TypeError, "residual must be a tensor"),
        ("residual_shape", (x, b, r[:1], rb), ValueError, "residual shape"),
        ("residual_dtype", (x, b, r.half(), rb), TypeError, "residual dtype"),
        ("residual_device", (x, b, r.to("meta"), rb), RuntimeError, "residual is on meta"),
        ("bias_shape", (x, b[:32], r, rb), ValueError, "bias must have shape"),
        ("bias_not_tensor", (x, 0.5, r, rb), TypeError, "bias must be a tensor"),
        ("residual_bias_shape", (x, b, r, rb[None]), ValueError, "residual_bias must have shape"),
        ("bias_dtype", (x.half(), b.bfloat16(), r.half(), None), TypeError, "bias dtype"),
        ("bias_device", (x, b.to("meta"), r, rb), RuntimeError, "bias is on meta"),
    ]


@pytest.mark.parametrize("name", [c[0] for c in _bad_cases()])
def test_bad_inputs_raise(name):
    _, args, exc, msg = next(c for c in _bad_cases() if c[0] == name)
    with pytest.raises(exc, match=msg):
        M.residual_add(*args)


# --- GPU only ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("batch", [1, 64])
def test_gpu_full_preset_grid(batch, layout, dtype):
    for shape in ALL_SHAPES:
        c, h, w, kind = shape
        args = make_inputs(batch, c, h, w, dtype, "cuda", kind, channels_last=layout == "cl")
        out = M.residual_add(*args)
        torch.cuda.synchronize()
        try:
            check(out, *args)
        except AssertionError as e:
            raise AssertionError(f"shape {shape_id(shape)}: {e}") from None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_gpu_opcheck(layout, dtype):
    args = make_inputs(2, 128, 16, 16, dtype, "cuda", "conv", channels_last=layout == "cl")
    torch.library.opcheck(torch.ops.ddpm_fast.residual_add.default, args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_gpu_compile_fullgraph(dtype):
    # The op inside a compiled graph after an elementwise op (exact in any order, so compiled == eager).
    x, b, r, rb = make_inputs(4, 64, 16, 16, dtype, "cuda", "conv")
    compiled = torch.compile(lambda x, r: M.residual_add(torch.relu(x), b, r, rb), fullgraph=True)
    out = compiled(x, r)
    check(out, torch.relu(x), b, r, rb)
