"""ddpm_fast::groupnorm_swish against the reference (ddpm_fast.reference.functional.groupnorm_swish).

On CPU the Triton kernels run through the interpreter via the raw launcher (the registered op's CPU
kernel is the C++ kernel, tested in test_<op>_cpu.py); on CUDA the registered op is tested, plus the
launcher for forced plans. Every kernel output buffer is NaN-poisoned before the kernel writes it.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch

from helpers import CL, DEVICES, DTYPES, DT_ID, compile_recording, poison
from tolerances import assert_deep, tol

from ddpm_fast.config import PRESETS
from ddpm_fast.reference import functional as R
from ddpm_fast.testing.shapes import unet_groupnorm_shapes

# Triton kernels on CPU tensors (the interpreter) unless a test runs on CUDA: see conftest.
pytestmark = pytest.mark.interpreter

M = importlib.import_module("ddpm_fast.ops.groupnorm_swish")  # the module (the package re-exports the function)
OP = "groupnorm_swish"

# Every (C, H, W, groups, has_add) the presets' UNets feed the op, measured by running them (meta device).
PRESET_SHAPES = {name: unet_groupnorm_shapes(cfg.unet) for name, cfg in PRESETS.items()}
ALL_SHAPES = sorted({s for shapes in PRESET_SHAPES.values() for s in shapes}, key=lambda s: (-s[1], s[0], s[3], s[4]))
# The CPU subset (the interpreter is slow): each preset's largest group, widest channel counts,
# a time-embedding add, and both group counts.
CPU_SHAPES = [
    (64, 32, 32, 32, True),     # labml-cifar32 ResidualBlock norm2 at 32x32 (add)
    (128, 32, 32, 8, False),    # cifar35m final GroupNorm(8): the largest group, 16 x 1024 = 16384
    (256, 32, 32, 32, False),   # cifar35m up block at 32x32
    (384, 8, 8, 32, False),     # labml-cifar32 up block at 8x8 (12 channels per group)
    (1280, 4, 4, 32, False),    # labml-cifar32 up block at 4x4 (40 channels per group)
    (2048, 4, 4, 32, False),    # labml-cifar32 widest up block at 4x4
    (96, 8, 8, 8, False),       # tiny
    (32, 16, 16, 8, True),      # tiny / digits16 norm2 (add)
    (256, 4, 4, 8, False),      # digits16 widest
]


def shape_id(s):
    c, h, w, g, add = s
    return f"C{c}_{h}x{w}_G{g}" + ("_add" if add else "")


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    """Every buffer the op/launcher allocates for its result starts NaN-filled."""
    real = M._new_output
    monkeypatch.setattr(M, "_new_output", lambda x: poison(real(x)))


def make_inputs(b, c, h, w, g, dtype, device="cpu", add=False, channels_last=False, param_dtype=None):
    # Fresh random values with a non-zero mean and non-trivial affine parameters (never zeros/ones).
    param_dtype = param_dtype or dtype
    x = (torch.randn(b, c, h, w, device=device) * 1.5 + 0.3).to(dtype)
    if channels_last:
        x = x.to(memory_format=CL)
    weight = (1.0 + 0.5 * torch.randn(c, device=device)).to(param_dtype)
    bias = (0.5 * torch.randn(c, device=device)).to(param_dtype)
    a = torch.randn(b, c, device=device).to(param_dtype) if add else None
    return x, weight, bias, g, a


def fast(x, weight, bias, g, eps=1e-5, add=None, swish=True, split=None, max_tile=None):
    """The kernel under test: the launcher under the interpreter on CPU, the registered op on CUDA."""
    if x.is_cuda and split is None and max_tile is None:
        return M.groupnorm_swish(x, weight, bias, g, eps, add, swish)
    return M.groupnorm_swish_triton(x, weight, bias, g, eps, add, swish, split, max_tile=max_tile)


def check(out, x, weight, bias, g, eps=1e-5, add=None, swish=True, ref=None):
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    fmt = CL if (x.is_contiguous(memory_format=CL) and not x.is_contiguous()) else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), "output must keep the input's memory format"
    if ref is None:
        ref = truth(x, weight, bias, g, eps, add, swish)
    torch.testing.assert_close(out, ref, **tol("groupnorm_swish_truth", x.dtype))


def truth(x, weight, bias, g, eps=1e-5, add=None, swish=True):
    """The spec in float64 on the same inputs, rounded once to x's dtype. The add happens in x's dtype
    first, as the spec (reference.functional) defines it; everything after is exact to fp64."""
    xs = x if add is None else x + add[:, :, None, None].to(x.dtype)
    return R.groupnorm_swish(xs.double(), weight.double(), bias.double(), g, eps, None, swish).to(x.dtype)


# --- the shape list itself ------------------------------------------------------------------------
def test_preset_shapes_are_measured():
    # Spot checks against the UNet structure (labml: widest up block concatenates 1024 + 1024 at 4x4;
    # the final norm is GroupNorm(8, n_channels) at full resolution); guards the recorder.
    assert (2048, 4, 4, 32, False) in PRESET_SHAPES["labml-cifar32"]
    assert (64, 32, 32, 8, False) in PRESET_SHAPES["labml-cifar32"]
    assert (128, 32, 32, 8, False) in PRESET_SHAPES["cifar35m"]
    assert all(s[3] == 8 for s in PRESET_SHAPES["digits16"])
    assert all(s in ALL_SHAPES for s in CPU_SHAPES)
    assert any(s[4] for s in ALL_SHAPES) and len(ALL_SHAPES) > 40


# --- kernel vs reference ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=shape_id)
@pytest.mark.parametrize("device", DEVICES)
def test_preset_shapes(device, shape, dtype):
    c, h, w, g, has_add = shape
    batch = 1 if device == "cpu" else 2  # the interpreter runs programs one by one
    x, weight, bias, g, a = make_inputs(batch, c, h, w, g, dtype, device, add=has_add)
    check(fast(x, weight, bias, g, add=a), x, weight, bias, g, add=a)


# Each dtype meets all four (add, swish) combinations, spread over the two layouts.
VARIANTS = [("nchw", True, True), ("nchw", False, False), ("cl", False, True), ("cl", True, False)]


@pytest.mark.parametrize("layout,add,swish", VARIANTS,
                         ids=[f"{lay}{'_add' if a else ''}{'_swish' if s else ''}" for lay, a, s in VARIANTS])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("batch,groups", [(1, 32), (3, 8)], ids=["b1_G32", "b3_G8"])
@pytest.mark.parametrize("device", DEVICES)
def test_odd_shapes(device, batch, groups, dtype, layout, add, swish):
    # C = 96 (3 or 12 channels per group, not powers of two) at 7 x 9 (63 positions, padded tiles).
    x, weight, bias, g, a = make_inputs(batch, 96, 7, 9, groups, dtype, device, add=add,
                                        channels_last=layout == "cl")
    check(fast(x, weight, bias, g, add=a, swish=swish), x, weight, bias, g, add=a, swish=swish)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("shape", [(64, 32, 32, 32, True), (256, 16, 16, 32, False), (1024, 4, 4, 32, True),
                                   (32, 16, 16, 8, False)], ids=shape_id)
@pytest.mark.parametrize("device", DEVICES)
def test_channels_last(device, shape, dtype):
    c, h, w, g, has_add = shape
    batch = 1 if device == "cpu" else 2
    x, weight, bias, g, a = make_inputs(batch, c, h, w, g, dtype, device, add=has_add, channels_last=True)
    check(fast(x, weight, bias, g, add=a), x, weight, bias, g, add=a)


# (name, batch, C, H, W, groups, split, max_tile, expected variant): each forced plan, small enough
# for the interpreter (one or two loop tiles per program).
PATHS = [
    ("split4", 1, 64, 16, 16, 8, 4, None, "split"),
    ("split2_odd", 3, 96, 7, 9, 8, 2, None, "split"),
    ("looped", 2, 96, 7, 9, 8, 1, 256, "looped"),
]


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("path", PATHS, ids=[p[0] for p in PATHS])
@pytest.mark.parametrize("device", DEVICES)
def test_paths(device, path, dtype, layout):
    _, b, c, h, w, g, split, max_tile, variant = path
    cl = layout == "cl"
    p = M.plan(b, c, h * w, g, cl, None, split, max_tile)
    assert p["variant"] == variant and (p["S"] > 1) == (variant == "split")
    x, weight, bias, g, a = make_inputs(b, c, h, w, g, dtype, device, add=True, channels_last=cl)
    out = M.groupnorm_swish_triton(x, weight, bias, g, 1e-5, a, True, split, max_tile=max_tile)
    check(out, x, weight, bias, g, add=a)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("split", [1, 4], ids=["fused", "split4"])
@pytest.mark.parametrize("device", DEVICES)
def test_large_mean_offset(device, split, dtype):
    # x = 1000 + N(0, 1): E[x^2] - E[x]^2 cancels ~6 digits. Compare with the float64 reference on
    # the same (dtype-rounded) input, rounded once to dtype: the truth, not another fp32 sum.
    b, c, h, w, g = 2, 64, 16, 16, 8
    x = (1000.0 + torch.randn(b, c, h, w, device=device)).to(dtype)
    _, weight, bias, _, a = make_inputs(b, c, h, w, g, dtype, device, add=True)
    out = M.groupnorm_swish_triton(x, weight, bias, g, 1e-5, a, True, split)
    xa = (x + a[:, :, None, None]).double()  # the reference's add in dtype, then exact math
    truth = R.groupnorm_swish(xa, weight.double(), bias.double(), g).to(dtype)
    check(out, x, weight, bias, g, add=a, ref=truth)
    # The test can fail: one-pass fp32 moments (E[x^2] - E[x]^2) on the same data miss by far.
    v = xa.float().reshape(b, g, -1)
    naive_var = ((v * v).mean(-1) - v.mean(-1) ** 2).clamp_min(0)
    true_var = xa.reshape(b, g, -1).var(-1, unbiased=False)
    assert ((naive_var.double() - true_var).abs() / true_var).max() > 0.05


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("device", DEVICES)
def test_fp32_params_with_low_precision_x(device, dtype):
    # A model keeping fp32 GroupNorm parameters (and time projections) with fp16/bf16 activations.
    x, weight, bias, g, a = make_inputs(2, 128, 8, 8, 32, dtype, device, add=True, param_dtype=torch.float32)
    check(fast(x, weight, bias, g, add=a), x, weight, bias, g, add=a)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    # A channel slice of a wider tensor (H and W still merge: no copy) and a transposed view (copied).
    x_big, weight, bias, g, a = make_inputs(2, 160, 8, 8, 8, torch.float32, device, add=True)
    x = x_big[:, 32:96]
    w64, b64, a64 = weight[:64], bias[:64], a[:, :64].t().contiguous().t()  # add with column-major strides
    check(fast(x, w64, b64, g, add=a64), x, w64, b64, g, add=a64)
    xt = x_big[:, :64].transpose(2, 3)
    check(fast(xt, w64, b64, g), xt, w64, b64, g)


@pytest.mark.parametrize("device", DEVICES)
def test_eps_and_empty_batch(device):
    x, weight, bias, g, _ = make_inputs(1, 64, 4, 4, 32, torch.float32, device)
    x = x * 1e-3  # variance ~ eps: eps matters
    check(fast(x, weight, bias, g, eps=1e-3), x, weight, bias, g, eps=1e-3)
    empty = torch.empty(0, 64, 4, 4, device=device)
    assert fast(empty, weight, bias, g).shape == empty.shape


# --- plans -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 64])
def test_plan_fuses_every_preset_shape(batch):
    # With no SM count (CPU) nothing splits; every preset group fits one program's registers.
    for c, h, w, g, _ in ALL_SHAPES:
        for cl in (False, True):
            p = M.plan(batch, c, h * w, g, cl, None)
            assert p["variant"] == "fused", (c, h, w, g, cl)
            assert p["BLOCK_CC"] * p["BLOCK_HW"] <= M.MAX_FUSED_TILE


def test_plan_split_heuristic():
    # Batch 1, 32 groups on a 132-SM GPU: too few programs, big groups -> split; batch 32 -> not.
    p = M.plan(1, 256, 32 * 32, 32, False, 132)
    assert p["variant"] == "split" and 2 <= p["S"] and p["grid"] == (32, p["S"])
    assert M.plan(32, 256, 32 * 32, 32, False, 132)["variant"] == "fused"
    assert M.plan(1, 256, 4 * 4, 32, False, 132)["variant"] == "fused"  # tiny groups: one launch wins
    # Slices cover H*W exactly once: S slices of HW_PER_SPLIT rows, the last one non-empty.
    for hw, s in [(63, 3), (1024, 7), (16, 32), (5, 4)]:
        p = M.plan(1, 64, hw, 8, False, None, split=s)
        assert p["S"] <= min(s, hw) and (p["S"] - 1) * p["HW_PER_SPLIT"] < hw <= p["S"] * p["HW_PER_SPLIT"]
        assert p["HW_PER_SPLIT"] % p["BLOCK_HW"] == 0


def test_plan_channels_last_groups():
    # 2 channels per group: gather groups so a tile row spans >= 16 contiguous channels, staying fused.
    p = M.plan(1, 64, 32 * 32, 32, True, None)
    assert p["GB"] * 2 >= 16 and p["variant"] == "fused"
    assert M.plan(1, 64, 4 * 4, 32, True, None)["GB"] * 2 >= M.CL_ROW_CHANNELS
    assert M.plan(1, 64, 32 * 32, 32, False, None)["GB"] == 1


# --- the registered op and its wrapper -------------------------------------------------------------
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_op_cpu_kernel_is_the_cpp_kernel(layout):
    # The wrapper (eager bypass) and the registered op both run the C++ kernel on CPU tensors (the
    # reference where the extension is missing); its accuracy is tested in test_groupnorm_swish_cpu.py.
    x, weight, bias, g, a = make_inputs(2, 64, 8, 8, 32, torch.bfloat16, add=True, channels_last=layout == "cl")
    for add, swish in ((a, True), (None, False)):
        if M._CPP_OUT is None:
            want = R.groupnorm_swish(x, weight, bias, g, 1e-5, add, swish)
        else:
            want = poison(M._new_output(x))
            torch.ops.ddpm_fast.groupnorm_swish_out(x, weight, bias, g, 1e-5, add, swish, want)
        for out in (M.groupnorm_swish(x, weight, bias, g, 1e-5, add, swish),
                    torch.ops.ddpm_fast.groupnorm_swish(x, weight, bias, g, 1e-5, add, swish)):
            assert torch.equal(out, want)
            assert out.is_contiguous(memory_format=CL if layout == "cl" else torch.contiguous_format)


def test_fake_kernel_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 64, 8, 8).to(memory_format=CL)
        out = torch.ops.ddpm_fast.groupnorm_swish(x, torch.empty(64), torch.empty(64), 32, 1e-5, None, True)
        assert out.shape == x.shape and out.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("case", ["fp32_add", "bf16_cl", "fp16_noswish"])
def test_op_opcheck_cpu(case):
    # Schema, fake kernel, autograd registration and AOT dispatch (dynamic shapes), for CPU tensors;
    # the GPU twin below runs the same checks through the Triton path.
    dtype = {"fp32_add": torch.float32, "bf16_cl": torch.bfloat16, "fp16_noswish": torch.float16}[case]
    x, weight, bias, g, a = make_inputs(2, 64, 8, 8, 32, dtype, add=case != "bf16_cl",
                                        channels_last=case == "bf16_cl")
    torch.library.opcheck(torch.ops.ddpm_fast.groupnorm_swish.default,
                          (x, weight, bias, g, 1e-5, a, case != "fp16_noswish"))


def test_op_compiles_fullgraph_cpu():
    # The wrapper's checks and the op trace without graph breaks (aot_eager: no inductor build on CPU).
    x, weight, bias, g, a = make_inputs(2, 64, 8, 8, 32, torch.float32, add=True)
    fn, seen = compile_recording(lambda x, a: M.groupnorm_swish(x, weight, bias, g, 1e-5, a))
    torch.testing.assert_close(fn(x, a), R.groupnorm_swish(x, weight, bias, g, 1e-5, a), **tol(OP, x.dtype))
    assert "ddpm_fast.groupnorm_swish" in seen, seen  # the op was traced, not its reference math


def _bad_cases():
    x, w, b, _, a = make_inputs(2, 64, 4, 4, 32, torch.float32, add=True)
    return [
        ("C_not_divisible", (x, w, b, 24), {}, ValueError, "not divisible"),
        ("x_3d", (x[0], w, b, 32), {}, ValueError, "4-D"),
        ("x_int", (x.to(torch.int32), w, b, 32), {}, TypeError, "x dtype"),
        ("x_fp64", (x.double(), w, b, 32), {}, TypeError, "x dtype"),
        ("groups_zero", (x, w, b, 0), {}, ValueError, "num_groups"),
        ("groups_float", (x, w, b, 32.0), {}, ValueError, "num_groups"),
        ("weight_shape", (x, w[:32], b, 32), {}, ValueError, "weight must have shape"),
        ("bias_shape", (x, w, b[None], 32), {}, ValueError, "bias must have shape"),
        ("add_shape", (x, w, b, 32), {"add": a[:1]}, ValueError, "add must have shape"),
        ("add_4d", (x, w, b, 32), {"add": a[:, :, None, None]}, ValueError, "add must have shape"),
        ("weight_dtype", (x.half(), w.bfloat16(), b.bfloat16(), 32), {}, TypeError, "weight dtype"),
        ("add_dtype", (x.half(), w.half(), b.half(), 32), {"add": a.bfloat16()}, TypeError, "add dtype"),
        ("weight_bias_dtypes", (x.half(), w.half(), b, 32), {}, TypeError, "dtypes differ"),
        ("weight_device", (x, w.to("meta"), b, 32), {}, RuntimeError, "weight is on meta"),
        ("add_device", (x, w, b, 32), {"add": a.to("meta")}, RuntimeError, "add is on meta"),
        ("negative_eps", (x, w, b, 32, -1.0), {}, ValueError, "eps"),
        ("swish_not_bool", (x, w, b, 32), {"swish": 1}, TypeError, "swish"),
    ]


BAD_CASES = [c[0] for c in _bad_cases()]


@pytest.mark.parametrize("name", BAD_CASES)
def test_bad_inputs_raise(name):
    _, args, kwargs, exc, msg = next(c for c in _bad_cases() if c[0] == name)
    with pytest.raises(exc, match=msg):
        M.groupnorm_swish(*args, **kwargs)


def test_imports_and_falls_back_without_triton():
    # A fresh interpreter where `import triton` fails: the module imports and the op still runs (on CPU
    # tensors its C++ kernel, or the reference without the extension), equal to the spec.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import importlib, torch\n"
        "from ddpm_fast.reference import functional as R\n"
        "M = importlib.import_module('ddpm_fast.ops.groupnorm_swish')\n"
        "assert not M.HAS_TRITON\n"
        "x = torch.randn(2, 64, 8, 8) + 0.5; w = torch.randn(64); b = torch.randn(64); a = torch.randn(2, 64)\n"
        "torch.testing.assert_close(M.groupnorm_swish(x, w, b, 32, 1e-5, a), R.groupnorm_swish(x, w, b, 32, 1e-5, a))\n"
        "print('fallback-ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "fallback-ok" in res.stdout, res.stderr[-3000:]


# --- GPU only ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("batch", [1, 32])
def test_gpu_full_preset_grid(batch, layout, dtype):
    for shape in ALL_SHAPES:
        c, h, w, g, has_add = shape
        x, weight, bias, g, a = make_inputs(batch, c, h, w, g, dtype, "cuda", add=has_add,
                                            channels_last=layout == "cl")
        out = M.groupnorm_swish(x, weight, bias, g, add=a)
        torch.cuda.synchronize()
        try:
            check(out, x, weight, bias, g, add=a)
        except AssertionError as e:
            raise AssertionError(f"shape {shape_id(shape)}: {e}") from None


OPCHECK_SHAPES = [
    (2, 64, 16, 16, 32, True, False),   # fused, add
    (2, 64, 16, 16, 32, False, True),   # fused, channels_last
    (1, 256, 32, 32, 32, True, False),  # split by the heuristic (32 programs < SM count)
    (1, 64, 64, 64, 2, False, False),   # looped: 32 x 4096 elements per group
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("shape", OPCHECK_SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + ("_cl" if s[6] else ""))
def test_gpu_opcheck(shape, dtype):
    b, c, h, w, g, has_add, cl = shape
    x, weight, bias, g, a = make_inputs(b, c, h, w, g, dtype, "cuda", add=has_add, channels_last=cl)
    torch.library.opcheck(torch.ops.ddpm_fast.groupnorm_swish.default, (x, weight, bias, g, 1e-5, a, True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_gpu_compile_block(dtype):
    # A ResidualBlock-like chain: norm1+Swish -> conv -> (+time) norm2+Swish -> conv, whole graph compiled.
    torch.manual_seed(0)
    conv1 = torch.nn.Conv2d(64, 128, 3, padding=1).cuda().to(dtype)
    conv2 = torch.nn.Conv2d(128, 128, 3, padding=1).cuda().to(dtype)
    x, w1, b1, _, _ = make_inputs(4, 64, 16, 16, 32, dtype, "cuda")
    _, w2, b2, _, t = make_inputs(4, 128, 16, 16, 32, dtype, "cuda", add=True)

    def block(fn, x, t):
        h = conv1(fn(x, w1, b1, 32))
        return conv2(fn(h, w2, b2, 32, 1e-5, t))

    compiled = torch.compile(lambda x, t: block(M.groupnorm_swish, x, t), fullgraph=True)
    with torch.no_grad():
        out = compiled(x, t)
        ref = block(R.groupnorm_swish, x, t)
        eager = block(M.groupnorm_swish, x, t)
    torch.testing.assert_close(out, eager, **tol(OP, dtype))
    # Two convolutions on top of the op: the deep-composition rule against the block in float64.
    conv1.double(), conv2.double()
    with torch.no_grad():
        h = conv1(R.groupnorm_swish(x.double(), w1.double(), b1.double(), 32))
        ref64 = conv2(R.groupnorm_swish(h, w2.double(), b2.double(), 32, 1e-5, t.double()))
    assert_deep(out, ref, ref64, dtype, "compiled block")


@pytest.mark.gpu
@pytest.mark.parametrize("split", [2, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_gpu_forced_split(dtype, split):
    for cl in (False, True):
        x, weight, bias, g, a = make_inputs(3, 128, 32, 32, 32, dtype, "cuda", add=True, channels_last=cl)
        check(fast(x, weight, bias, g, add=a, split=split), x, weight, bias, g, add=a)


def test_span_is_the_reach_of_a_strided_view():
    # The kernels' int32 guards (groupnorm per sample, conv2d / conv_transpose2d per input) use it.
    from ddpm_fast.ops._common import span

    base = torch.empty(4, 8, 6, 5)
    assert span(base) == base.numel()
    assert span(base[:, ::2]) == base.numel() - (8 - 7) * 30  # last reachable element + 1
    assert span(base.transpose(2, 3)) == base.numel()
    assert span(torch.empty(1, 1).expand(3, 7)) == 1  # stride 0 reaches nothing new
    assert span(base, (1, 2, 3)) == 8 * 6 * 5
    assert span(torch.empty(0, 3)) == 1 + 2
