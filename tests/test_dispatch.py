"""The one dispatch point: the fast namespace mirrors the reference spec, and swapping it is all
`fused` does (same weights, same module tree, same state_dict)."""
import inspect

import pytest
import torch

from ddpm_fast import ops
from ddpm_fast.config import PRESETS
from ddpm_fast.reference import UNet, functional

OP_NAMES = ["conv2d", "conv_transpose2d", "groupnorm_swish", "attention", "residual_add", "time_embedding", "reverse_step"]


@pytest.mark.parametrize("name", OP_NAMES)
def test_fast_namespace_mirrors_reference_signature(name):
    ref, fast = getattr(functional, name), getattr(ops, name)
    assert inspect.signature(fast) == inspect.signature(ref), name


@pytest.mark.parametrize("name", OP_NAMES)
def test_every_op_is_registered_with_torch_library(name):
    assert hasattr(torch.ops.ddpm_fast, name), f"ddpm_fast::{name} is not registered"


def test_reference_never_imports_fast_path():
    import ast
    import pathlib

    ref_dir = pathlib.Path(functional.__file__).parent
    for path in ref_dir.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                assert "ops" not in mod.split(".") and "fast_sampler" not in mod, f"{path.name} imports {mod}"


def test_fused_swaps_namespace_only():
    model = UNet(PRESETS["tiny"].unet)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ops.fused(model)
    assert ops.is_fused(model)
    assert all(m.F is ops for m in model.modules() if hasattr(m, "F"))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ops.unfused(model)
    assert not ops.is_fused(model)
    assert all(m.F is functional for m in model.modules() if hasattr(m, "F"))


def test_fused_model_matches_reference_on_cpu():
    # On CPU the fast ops dispatch to their CPU kernels; the fused forward must equal the reference.
    model = UNet(PRESETS["tiny"].unet).eval()
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0, 517, 999])
    with torch.no_grad():
        ref = model(x, t)
        out = ops.fused(model)(x, t)
    ops.unfused(model)
    torch.testing.assert_close(out, ref)
