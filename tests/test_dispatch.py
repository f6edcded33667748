"""The one dispatch point: the fast namespace mirrors the reference spec, and swapping it is all
`fused` does (same weights, same module tree, same state_dict)."""
import importlib
import inspect

import pytest
import torch

from ddpm_fast import ops
from ddpm_fast.config import PRESETS
from ddpm_fast.reference import UNet, functional
from tolerances import tol

OP_NAMES = ["conv2d", "conv_transpose2d", "groupnorm_swish", "attention", "residual_add", "time_embedding", "reverse_step"]


@pytest.mark.parametrize("name", OP_NAMES)
def test_fast_namespace_mirrors_reference_signature(name):
    ref, fast = getattr(functional, name), getattr(ops, name)
    assert inspect.signature(fast) == inspect.signature(ref), name


@pytest.mark.parametrize("name", OP_NAMES)
def test_every_op_is_registered_with_torch_library(name):
    assert hasattr(torch.ops.ddpm_fast, name), f"ddpm_fast::{name} is not registered"


def test_fused_swaps_namespace_only():
    model = UNet(PRESETS["tiny"].unet)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ops.fused(model)
    assert ops.is_fused(model)
    assert all(m.F.conv2d is ops.conv2d and m.F.attention is ops.attention
               for m in model.modules() if hasattr(m, "F"))
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
    torch.testing.assert_close(out, ref, **tol("fused_unet_cpu", torch.float32))


# --- plain eager calls skip the torch.library dispatcher (ops/_eager.py) ----------------------------
class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _gn_args():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 16, 5, 7, generator=g), torch.randn(16, generator=g), torch.randn(16, generator=g), 4)


def _count_implementation_calls(mod, monkeypatch) -> list:
    """Counts the wrapper's own runs of groupnorm_swish: `_run`, or on CPU the allocating C++ binding."""
    calls = []
    for name in ("_run", "_CPP_NEW"):
        real = getattr(mod, name)
        if real is not None:
            monkeypatch.setattr(mod, name, lambda *a, real=real: calls.append(1) or real(*a))
    return calls


def test_plain_eager_calls_run_the_device_implementation_directly(monkeypatch):
    mod = importlib.import_module("ddpm_fast.ops.groupnorm_swish")  # the module (ops.groupnorm_swish is the function)

    calls = _count_implementation_calls(mod, monkeypatch)
    x, w, b, groups = _gn_args()
    direct = ops.groupnorm_swish(x, w, b, groups)
    assert calls == [1]  # the wrapper ran the implementation itself (the op's CPU kernel does not call _run)
    via_op = torch.ops.ddpm_fast.groupnorm_swish(x, w, b, groups, 1e-5, None, True)
    assert calls == [1] and torch.equal(direct, via_op)


@pytest.mark.parametrize("context", ["dispatch_mode", "requires_grad", "fake"])
def test_everything_else_keeps_the_op(context, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    mod = importlib.import_module("ddpm_fast.ops.groupnorm_swish")  # the module (ops.groupnorm_swish is the function)

    calls = _count_implementation_calls(mod, monkeypatch)
    x, w, b, groups = _gn_args()
    if context == "dispatch_mode":  # e.g. an op counter or FlopCounterMode: it must see the fused op
        with _OpCounter() as counter:
            ops.groupnorm_swish(x, w, b, groups)
        assert "ddpm_fast.groupnorm_swish.default" in counter.ops
    elif context == "requires_grad":  # autograd recording: the op (no backward) stays opaque
        ops.groupnorm_swish(x, w.requires_grad_(), b, groups)
    else:
        with FakeTensorMode() as mode:
            out = ops.groupnorm_swish(*(mode.from_tensor(t) for t in (x, w, b)), groups)
        assert out.shape == x.shape
    assert calls == []


def test_a_fused_unet_under_a_dispatch_mode_still_shows_the_fused_ops():
    model = UNet(PRESETS["tiny"].unet).eval()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([5])
    with torch.no_grad(), _OpCounter() as plain:
        model(x, t)
    with torch.no_grad(), _OpCounter() as counter:
        ops.fused(model)(x, t)
    names = {op.split(".")[1] for op in counter.ops if op.startswith("ddpm_fast.")}
    # Every op of the namespace but the sampler's reverse step shows, except the convs on CPU tensors:
    # their wrappers call oneDNN directly there (the rule picks Triton for CUDA tensors only), so each of
    # the plain model's convolutions shows as aten's, one for one.
    assert names == set(OP_NAMES) - {"reverse_step", "conv2d", "conv_transpose2d"}, names
    conv = "aten.convolution.default"
    assert counter.ops.count(conv) == plain.ops.count(conv) > 0


def test_a_fused_model_copies_pickles_and_saves(tmp_path):
    import copy
    import pickle

    model = ops.fused(UNet(PRESETS["tiny"].unet)).eval()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([3])
    with torch.no_grad():
        want = model(x, t)
    torch.save(model, tmp_path / "m.pt")
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
                  torch.load(tmp_path / "m.pt", weights_only=False)):
        assert ops.is_fused(clone)
        with torch.no_grad():
            assert torch.equal(clone(x, t), want)
