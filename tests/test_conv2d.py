"""ddpm_fast::conv2d against F.conv2d (ddpm_fast.reference.functional.conv2d).

On CPU the Triton kernel runs through the interpreter via the raw launcher (the registered op's CPU
kernel is F.conv2d itself, checked separately); on CUDA both the launcher and the registered op are
tested. Output buffers and split-K workspaces are NaN-poisoned before the kernels write them.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from helpers import CL, DEVICES, DTYPES, DT_ID, compile_recording, poison
from tolerances import tol

from ddpm_fast.config import PRESETS
from ddpm_fast.reference import functional as R
from ddpm_fast.testing.shapes import unet_conv_shapes

pytestmark = pytest.mark.interpreter

M = importlib.import_module("ddpm_fast.ops.conv2d")
G = importlib.import_module("ddpm_fast.ops._conv_gemm")  # the dispatch knob and split-K workspace both convs share

# Every (C_in, H, W, C_out, K, stride, bias) the presets feed the op, measured on the meta device.
PRESET_SHAPES = {name: unet_conv_shapes(cfg.unet) for name, cfg in PRESETS.items()}
ALL_SHAPES = sorted({s for shapes in PRESET_SHAPES.values() for s in shapes})
# The CPU subset (the interpreter runs ~1 s per 10^5 output elements x K): every kind of conv the UNet
# has, at the small presets' real shapes, plus odd ones.
CPU_SHAPES = [
    (3, 16, 16, 32, 3, 1, True),     # tiny image_proj (C_in = 3)
    (64, 8, 8, 64, 3, 1, False),     # tiny / digits16 residual conv
    (32, 16, 16, 32, 3, 2, True),    # tiny Downsample (stride 2)
    (96, 8, 8, 32, 1, 1, False),     # tiny 1x1 shortcut
    (32, 16, 16, 3, 3, 1, True),     # tiny final conv (C_out = 3)
    (96, 7, 9, 40, 3, 1, True),      # odd: C = 96, 7 x 9, C_out not a power of two
]


def shape_id(s):
    ci, h, w, co, k, stride, bias = s
    return f"{ci}to{co}_{h}x{w}_k{k}s{stride}" + ("_bias" if bias else "")


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    real_out, real_ws = M._new_output, G.new_workspace
    monkeypatch.setattr(M, "_new_output", lambda *a: poison(real_out(*a)))
    monkeypatch.setattr(G, "new_workspace", lambda *a: poison(real_ws(*a)))


def make_inputs(b, shape, dtype, device="cpu", channels_last=False):
    """Fresh random inputs (never zeros), weights scaled as a trained conv's so outputs are ~N(0, 1)."""
    ci, h, w, co, k, stride, bias = shape
    x = torch.randn(b, ci, h, w, device=device).to(dtype)
    if channels_last:
        x = x.to(memory_format=CL)
    weight = (torch.randn(co, ci, k, k, device=device) / (ci * k * k) ** 0.5).to(dtype)
    bs = (0.3 * torch.randn(co, device=device)).to(dtype) if bias else None
    pad = k // 2
    return x, weight, bs, (stride, stride), (pad, pad)


def truth(x, weight, bias, stride, padding):
    """F.conv2d in float64 on the same (dtype-rounded) inputs, rounded once to x's dtype."""
    b64 = bias.double() if bias is not None else None
    return R.conv2d(x.double(), weight.double(), b64, stride, padding).to(x.dtype)  # 2- or 4-value padding


def check(out, x, weight, bias, stride, padding, same_dtype_ref=True):
    ref = truth(x, weight, bias, stride, padding)
    assert out.shape == ref.shape and out.dtype == x.dtype and out.device == x.device
    fmt = CL if (x.is_contiguous(memory_format=CL) and not x.is_contiguous()) else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), "output must keep x's memory format"
    torch.testing.assert_close(out, ref, **tol("conv2d_truth", x.dtype))
    if same_dtype_ref:
        torch.testing.assert_close(out, R.conv2d(x, weight, bias, stride, padding), **tol("conv2d", x.dtype))


def test_preset_shapes_are_measured():
    # Spot checks against the UNets: cifar35m's first up block (256 -> 128 with a 1x1 shortcut), its
    # Downsample (stride 2, with bias), labml-cifar32's widest conv (2048 -> 1024 at 4x4).
    assert (256, 32, 32, 128, 1, 1, False) in PRESET_SHAPES["cifar35m"]
    assert (128, 32, 32, 128, 3, 2, True) in PRESET_SHAPES["cifar35m"]
    assert (2048, 4, 4, 1024, 3, 1, False) in PRESET_SHAPES["labml-cifar32"]
    assert all(s in ALL_SHAPES for s in CPU_SHAPES[:-1])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=shape_id)
@pytest.mark.parametrize("device", DEVICES)
def test_preset_and_odd_shapes(device, shape, layout, dtype):
    for batch in (1, 3):
        args = make_inputs(batch, shape, dtype, device, channels_last=layout == "cl")
        check(M.conv2d_triton(*args), *args, same_dtype_ref=device == "cpu")


@pytest.mark.parametrize("split", [1, 2, 7, 1000])
@pytest.mark.parametrize("device", DEVICES)
def test_forced_k_splits(device, split):
    # 1: one program per tile, bias in the GEMM's epilogue; more: partials + the split-sum kernel (the
    # bias added there); 1000 is clamped to the number of K blocks (one block per split).
    args = make_inputs(2, (96, 7, 9, 40, 3, 1, True), torch.float32, device)
    check(M.conv2d_triton(*args, split=split), *args, same_dtype_ref=device == "cpu")


# The DDPM UNet's Downsample: 3x3 stride 2, padding (0, 1, 0, 1) (right and bottom only), (C, H, W, bias) at
# cifar10-32's levels (C=128 at 32x32, 256 at 16x16 and 8x8) and the other widths, then odd sizes (odd H/W:
# the extra row/column is then in the input, not the pad).
DOWN_PAD = (0, 1, 0, 1)
DOWN_SHAPES = [(128, 32, 32, True), (256, 16, 16, True), (256, 8, 8, True), (128, 8, 8, False),
               (256, 32, 32, False), (40, 7, 9, True), (24, 5, 4, False), (16, 2, 3, True)]


def _down_inputs(batch, shape, dtype, device, layout):
    c, h, w, bias = shape
    x, wt, b, s, _ = make_inputs(batch, (c, h, w, c, 3, 2, bias), dtype, device, channels_last=layout == "cl")
    return x, wt, b, s, DOWN_PAD


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape", DOWN_SHAPES, ids=lambda s: "C{}_{}x{}".format(*s[:3]) + ("_bias" if s[3] else ""))
@pytest.mark.parametrize("device", DEVICES)
def test_downsample_asymmetric_padding(device, shape, layout, dtype, monkeypatch):
    if device == "cpu" and shape[0] * shape[1] * shape[2] > 65536 and dtype != torch.float32:
        pytest.skip("the interpreter is slow: the widest level runs fp32 only on CPU")
    # The fast path pads with its masks: no padded copy of x may be made.
    monkeypatch.setattr(F, "pad", lambda *a, **k: pytest.fail("F.pad on the fast path"))
    args = _down_inputs(1 if shape[1] >= 32 else 2, shape, dtype, device, layout)
    out = M.conv2d_triton(*args) if device == "cpu" else M.conv2d(*args)
    monkeypatch.undo()
    assert out.shape[2:] == ((shape[1] - 2) // 2 + 1, (shape[2] - 2) // 2 + 1)
    check(out, *args, same_dtype_ref=device == "cpu")


@pytest.mark.parametrize("padding", [(0, 1, 0, 1), (2, 0, 1, 3), (1, 1, 1, 1)], ids=str)
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_four_value_padding_any_sides(device, split, padding):
    # Other asymmetric pads (wider than the kernel's reach on one side), split-K, and a symmetric 4-value pad.
    x, w, b, s, _ = make_inputs(2, (24, 6, 7, 16, 3, 1, True), torch.float32, device)
    check(M.conv2d_triton(x, w, b, s, padding, split=split), x, w, b, s, padding, same_dtype_ref=device == "cpu")


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_four_value_padding_op_cpu_and_fake(layout):
    # The CPU kernel (the spec's F.pad + conv), through the wrapper and the op; the fake kernel's shape.
    x, w, b, s, p = _down_inputs(2, (16, 9, 8, True), torch.float32, "cpu", layout)
    want = R.conv2d(x, w, b, s, p)
    for out in (M.conv2d(x, w, b, s, p), torch.ops.ddpm_fast.conv2d(x, w, b, list(s), list(p))):
        assert out.shape == (2, 16, 4, 4) and out.is_contiguous(memory_format=CL if layout == "cl" else
                                                                torch.contiguous_format)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    meta = M.conv2d(*[t.to("meta") for t in (x, w, b)], s, p)
    assert meta.shape == (2, 16, 4, 4)
    torch.library.opcheck(torch.ops.ddpm_fast.conv2d.default, (x, w, b, list(s), list(p)),
                          test_utils=("test_schema", "test_faketensor"))
    # A symmetric 4-value pad is the 2-value one.
    assert torch.equal(M.conv2d(x, w, b, (1, 1), (1, 1, 1, 1)), M.conv2d(x, w, b, (1, 1), (1, 1)))


@pytest.mark.parametrize("case", ["channel-slice", "transposed-hw", "batch-stride"])
@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device, case):
    # The kernel walks x through its four strides: views the UNet never makes still convolve correctly
    # (the output is then NCHW-contiguous).
    shape = (32, 7, 9, 24, 3, 1, True)
    x, w, b, s, p = make_inputs(2, shape, torch.float32, device)
    if case == "channel-slice":
        x = torch.randn(2, 64, 7, 9, device=device)[:, 16:48]
    elif case == "transposed-hw":
        x = torch.randn(2, 32, 9, 7, device=device).transpose(2, 3)
    else:
        x = torch.randn(4, 32, 7, 9, device=device)[::2]
    check(M.conv2d_triton(x, w, b, s, p), x, w, b, s, p, same_dtype_ref=device == "cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_split_sum_is_deterministic(device):
    # Meaningful on CUDA, where split programs really run concurrently (the interpreter runs them in
    # order, so there any summation would repeat): the partials are summed in a fixed order.
    args = make_inputs(2, (256, 16, 16, 256, 3, 1, True) if device == "cuda" else (64, 8, 8, 64, 3, 1, True),
                       torch.float32, device)
    first = M.conv2d_triton(*args, split=9 if device == "cuda" else 5)
    for _ in range(5 if device == "cuda" else 1):
        assert torch.equal(M.conv2d_triton(*args, split=9 if device == "cuda" else 5), first)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_in_channels_last_layout(device):
    # The kernel takes any weight strides (a channels_last weight has C_in contiguous).
    x, w, b, s, p = make_inputs(2, (64, 8, 8, 48, 3, 1, True), torch.float32, device)
    check(M.conv2d_triton(x, w.contiguous(memory_format=CL), b, s, p), x, w, b, s, p,
          same_dtype_ref=device == "cpu")


def test_plan_splits_only_small_problems():
    # cifar35m at batch 1: 16 x 16 x 256 channels has 16 tiles for 132 SMs, so K is split; at batch 64 there
    # are 1024 tiles and no split. Splits never exceed the K blocks and none is empty.
    small = M.plan(1, 256, 16, 16, 256, 3, 3, (1, 1), (1, 1), torch.float32, sms=132)
    assert small["tiles"] == 16 and small["split"] > 1
    assert (small["split"] - 1) * small["blocks_per_split"] < 9 * 256 // small["BLOCK_K"]
    big = M.plan(64, 256, 16, 16, 256, 3, 3, (1, 1), (1, 1), torch.float32, sms=132)
    assert big["split"] == 1
    assert M.plan(1, 3, 16, 16, 32, 3, 3, (1, 1), (1, 1), torch.float32)["BLOCK_K"] == 16


def test_dispatch_rule():
    # Exact fp32 with few tiles goes to Triton; fp16/bf16, TF32-allowed fp32 and large outputs to cuDNN.
    assert M.prefers_triton(1 * 16 * 16, 256, torch.float32, False, 132)
    assert not M.prefers_triton(64 * 16 * 16, 256, torch.float32, False, 132)
    assert not M.prefers_triton(1 * 16 * 16, 256, torch.bfloat16, False, 132)
    assert not M.prefers_triton(1 * 16 * 16, 256, torch.float32, True, 132)
    x, w, b, s, p = make_inputs(1, (64, 8, 8, 64, 3, 1, True), torch.float32)
    assert not M.use_triton(x, w, s, p), "CPU tensors never take the Triton kernel through the op"


# --- the registered op and its wrapper -------------------------------------------------------------
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_cpu_calls_never_launch_triton(layout, monkeypatch):
    # CPU tensors take oneDNN, through the wrapper and through the op: a launch of the kernel (which only
    # the interpreter could run) fails here. Compared with the float64 truth, not with itself.
    monkeypatch.setattr(M, "conv2d_triton", lambda *a, **k: pytest.fail("launched Triton for CPU tensors"))
    x, w, b, s, p = make_inputs(2, (32, 8, 8, 64, 3, 2, True), torch.bfloat16, channels_last=layout == "cl")
    truth = F.conv2d(x.double(), w.double(), b.double(), s, p)
    for out in (M.conv2d(x, w, b, s, p), torch.ops.ddpm_fast.conv2d(x, w, b, list(s), list(p))):
        assert out.dtype == x.dtype
        torch.testing.assert_close(out.double(), truth, **tol("conv2d", x.dtype))


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 64, 9, 9).to(memory_format=CL)
        out = torch.ops.ddpm_fast.conv2d(x, torch.empty(32, 64, 3, 3), None, [2, 2], [1, 1])
        assert out.shape == (2, 32, 5, 5) and out.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("case", ["fp32_bias", "bf16_cl_nobias"])
def test_op_opcheck_cpu(case):
    shape = (32, 8, 8, 64, 3, 1, case == "fp32_bias")
    dtype = torch.float32 if case == "fp32_bias" else torch.bfloat16
    x, w, b, s, p = make_inputs(2, shape, dtype, channels_last=case != "fp32_bias")
    torch.library.opcheck(torch.ops.ddpm_fast.conv2d.default, (x, w, b, list(s), list(p)))


def test_op_compiles_fullgraph_cpu():
    x, w, b, s, p = make_inputs(2, (32, 8, 8, 64, 3, 1, True), torch.float32)
    # The op itself traces without graph breaks. (The wrapper, on CPU tensors, calls oneDNN directly:
    # the rule picks Triton only for CUDA tensors, so tracing it shows aten's convolution instead.)
    fn, seen = compile_recording(lambda x: torch.ops.ddpm_fast.conv2d(x, w, b, list(s), list(p)))
    torch.testing.assert_close(fn(x), R.conv2d(x, w, b, s, p), **tol("conv2d", x.dtype))
    assert "ddpm_fast.conv2d" in seen, seen
    fn, seen = compile_recording(lambda x: M.conv2d(x, w, b, s, p))
    torch.testing.assert_close(fn(x), R.conv2d(x, w, b, s, p), **tol("conv2d", x.dtype))
    assert "ddpm_fast.conv2d" not in seen and any("conv" in t for t in seen), seen


def _bad_cases():
    x, w, b, s, p = make_inputs(2, (16, 4, 4, 8, 3, 1, True), torch.float32)
    return [
        ("x_3d", (x[0], w, b, s, p), ValueError, "4-D"),
        ("x_int", (x.to(torch.int32), w, b, s, p), TypeError, "x dtype"),
        ("weight_3d", (x, w[0], b, s, p), ValueError, "weight must be a 4-D"),
        ("channels", (x[:, :8], w, b, s, p), ValueError, "expects 16 input channels"),
        ("weight_dtype", (x, w.half(), b, s, p), TypeError, "weight dtype"),
        ("weight_device", (x, w.to("meta"), b, s, p), RuntimeError, "weight is on meta"),
        ("bias_shape", (x, w, b[:4], s, p), ValueError, "bias must have shape"),
        ("bias_not_tensor", (x, w, 0.5, s, p), TypeError, "bias must be a tensor"),
        ("bias_dtype", (x, w, b.double(), s, p), TypeError, "bias dtype"),
        ("stride_zero", (x, w, b, (0, 1), p), ValueError, "stride must be >= 1"),
        ("stride_triple", (x, w, b, (1, 1, 1), p), ValueError, "stride must be a pair"),
        ("padding_int", (x, w, b, s, 1), TypeError, "padding must be a pair"),
        ("stride_float", (x, w, b, (1.9, 1.9), p), TypeError, "stride must be a pair of ints"),
        ("padding_float", (x, w, b, s, (0.5, 0.5)), TypeError, "padding must be a pair of ints"),
        ("padding_three", (x, w, b, s, (1, 1, 1)), ValueError, r"padding must be a pair \(h, w\) or four"),
        ("padding_four_negative", (x, w, b, s, (0, -1, 0, 1)), ValueError, "padding >= 0"),
        ("autocast_hint", (x, w.bfloat16(), b, s, p), TypeError, "torch.autocast is on"),
        ("kernel_too_big", (x[:, :, :2, :2], w, b, s, (0, 0)), ValueError, "does not fit"),
    ]


@pytest.mark.parametrize("name", [c[0] for c in _bad_cases()])
def test_bad_inputs_raise(name):
    _, args, exc, msg = next(c for c in _bad_cases() if c[0] == name)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "autocast_hint")
    with autocast, pytest.raises(exc, match=msg):
        M.conv2d(*args)


# --- GPU only ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("batch", [1, 64])
def test_gpu_full_preset_grid(batch, layout, dtype):
    # The kernel itself (launcher) at every preset shape, whatever the dispatch rule picks.
    for shape in ALL_SHAPES:
        args = make_inputs(batch, shape, dtype, "cuda", channels_last=layout == "cl")
        out = M.conv2d_triton(*args)
        torch.cuda.synchronize()
        try:
            check(out, *args, same_dtype_ref=False)
        except AssertionError as e:
            raise AssertionError(f"shape {shape_id(shape)}: {e}") from None


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["cifar35m", "labml-cifar32"])
def test_gpu_op_dispatch_at_batch_1(preset):
    # Through the op, fp32 with TF32 off (conftest): the rule sends batch-1 convs to Triton.
    for shape in PRESET_SHAPES[preset]:
        args = make_inputs(1, shape, torch.float32, "cuda")
        assert M.use_triton(*args[:2], *args[3:]), shape_id(shape)
        check(M.conv2d(*args), *args, same_dtype_ref=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
def test_gpu_opcheck(dtype, monkeypatch):
    monkeypatch.setattr(G, "BACKEND", "triton")
    x, w, b, s, p = make_inputs(1, (128, 16, 16, 256, 3, 1, True), dtype, "cuda")
    torch.library.opcheck(torch.ops.ddpm_fast.conv2d.default, (x, w, b, list(s), list(p)))


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("batch", [1, 64], ids=["split", "nosplit"])
def test_gpu_compile_fullgraph(monkeypatch, batch, bias):
    monkeypatch.setattr(G, "BACKEND", "triton")
    x, w, b, s, p = make_inputs(batch, (128, 16, 16, 256, 3, 1, bias), torch.float32, "cuda")
    compiled = torch.compile(lambda x: M.conv2d(torch.relu(x), w, b, s, p), fullgraph=True)
    check(compiled(x), torch.relu(x), w, b, s, p, same_dtype_ref=False)
