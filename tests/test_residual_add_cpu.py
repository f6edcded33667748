"""The C++ CPU kernel of ddpm_fast::residual_add (csrc/residual_add_cpu.cpp) against the spec.

Called through the op wrapper (which routes CPU tensors in a fusable layout to the kernel), with every
output buffer NaN-poisoned first. The truth: x + bias + residual + residual_bias summed in float64 and
rounded once to x's dtype (tolerances.py, residual_add_truth); in fp32 the kernel adds in the spec's
order, so there it must equal the fp32 reference bit for bit.
"""
import importlib

import pytest
import torch

from helpers import CL, DTYPES, DT_ID, require_cpp_kernel
from ddpm_fast.testing.shapes import unet_residual_shapes
from tolerances import tol

from ddpm_fast.config import PRESETS
from ddpm_fast.reference import functional as R

M = importlib.import_module("ddpm_fast.ops.residual_add")
from test_residual_add import make_inputs, shape_id  # noqa: E402 - the shared input maker

PRESET_SHAPES = sorted({s for name in ("digits16", "tiny", "cifar35m") for s in unet_residual_shapes(PRESETS[name].unet)})
ODD_SHAPES = [(96, 7, 9, "conv"), (3, 5, 5, "identity"), (20, 1, 1, "conv"), (64, 1, 1, "identity")]


@pytest.fixture(autouse=True)
def _needs_cpp_kernel(monkeypatch):
    require_cpp_kernel(monkeypatch, M)


def truth(x, b, r, rb):
    return R.residual_add(x.double(), None if b is None else b.to(x.dtype).double(), r.double(),
                          None if rb is None else rb.to(x.dtype).double()).to(x.dtype)


def check(out, x, b, r, rb):
    fmt = CL if (x.is_contiguous(memory_format=CL) and not x.is_contiguous()) else torch.contiguous_format
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous(memory_format=fmt)
    assert not out.isnan().any(), "an output element was never written"
    torch.testing.assert_close(out, truth(x, b, r, rb), **tol("residual_add_truth", x.dtype))
    if x.dtype == torch.float32:
        assert torch.equal(out, R.residual_add(x, b, r, rb))


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("shape", PRESET_SHAPES + ODD_SHAPES, ids=shape_id)
def test_shapes(shape, dtype, layout):
    c, h, w, kind = shape
    x, b, r, rb = make_inputs(3, c, h, w, dtype, kind=kind, channels_last=layout == "cl")
    check(M.residual_add(x, b, r, rb), x, b, r, rb)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("bias", ["none", "fp32"])
def test_bias_variants(bias, dtype, layout):
    x, b, r, rb = make_inputs(2, 64, 8, 8, dtype, kind="conv", channels_last=layout == "cl", bias=bias != "none",
                              bias_dtype=torch.float32)
    check(M.residual_add(x, b, r, rb), x, b, r, rb)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_thread_count_does_not_change_the_result(layout):
    x, b, r, rb = make_inputs(16, 64, 16, 16, torch.bfloat16, channels_last=layout == "cl")
    old, outs = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(M.residual_add(x, b, r, rb))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1])


def test_unfusable_layouts_take_the_reference():
    x, b, r, rb = make_inputs(2, 64, 8, 8, torch.float32)
    x_cl = x.to(memory_format=CL)  # x and residual in different layouts
    assert M.fusable_layout(x_cl, r) is None
    assert torch.equal(M.residual_add(x_cl, b, r, rb), R.residual_add(x_cl, b, r, rb).contiguous(memory_format=CL))


@pytest.mark.parametrize("binding", ["dispatcher", "direct"])
def test_out_variant_rejects_bad_arguments(binding):
    # Through the dispatcher, or the direct _C binding that plain eager calls take.
    op = torch.ops.ddpm_fast.residual_add_out if binding == "dispatcher" else M._CPP_DIRECT
    if op is None:
        pytest.fail("ddpm_fast._C predates the direct bindings: rebuild it (python setup.py build_ext --inplace)")
    x, r = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match="one dense NCHW or channels_last layout"):
        op(x, None, r.to(memory_format=CL), None, torch.empty_like(x))
    with pytest.raises(ValueError, match="bias must have shape"):
        op(x, torch.randn(7), r, None, torch.empty_like(x))
    with pytest.raises(TypeError, match="residual dtype"):
        op(x, None, r.double(), None, torch.empty_like(x))
