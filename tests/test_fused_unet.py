"""The fused UNet (issue 5): the same model and weights with every fusible step on the fast path
must match the reference.

On CPU the registered ops dispatch to their CPU kernels (the reference math), so to exercise the
Triton kernels themselves inside a whole UNet, the CPU test swaps in a namespace of the raw Triton
launchers, which run under TRITON_INTERPRET=1 (set by conftest). On CUDA the real fused path runs.

Deep compositions use the relative rule of DESIGN.md:
    err(fast, ref_fp64) <= 2 * err(ref_same_dtype, ref_fp64) + floor
"""
import types

import pytest
import torch

from ddpm_fast import ops
from ddpm_fast.config import PRESETS
from ddpm_fast.ops.attention import attention_triton
from ddpm_fast.ops.conv2d import conv2d_triton
from ddpm_fast.ops.conv_transpose2d import conv_transpose2d_triton
from ddpm_fast.ops.groupnorm_swish import HAS_TRITON, groupnorm_swish_triton
from ddpm_fast.ops.residual_add import residual_add_triton
from ddpm_fast.ops.time_embedding import time_embedding_triton
from ddpm_fast.reference import UNet, functional
from helpers import use_namespace
from tolerances import assert_deep_forward, tol

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")

# The raw Triton kernels behind the reference signatures (no dispatcher): what the CPU test runs.
TRITON_NAMESPACE = types.SimpleNamespace(
    conv2d=conv2d_triton,
    conv_transpose2d=conv_transpose2d_triton,
    groupnorm_swish=groupnorm_swish_triton,
    attention=attention_triton,
    residual_add=residual_add_triton,
    time_embedding=time_embedding_triton,
    reverse_step=functional.reverse_step,
)


def _inputs(cfg, batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.unet.image_size
    x = torch.randn(batch, cfg.unet.image_channels, s, s, generator=g).to(device)
    t = torch.randint(0, cfg.diffusion.n_steps, (batch,), generator=g).to(device)
    return x, t


@needs_triton
@pytest.mark.interpreter
def test_triton_kernels_inside_whole_unet_match_reference_cpu():
    """Every Triton kernel (interpreted) inside the tiny UNet, against the fp64 reference."""
    cfg = PRESETS["tiny"]
    torch.manual_seed(1)
    model = UNet(cfg.unet).eval()
    fast = use_namespace(UNet(cfg.unet).eval(), TRITON_NAMESPACE)
    fast.load_state_dict(model.state_dict())
    x, t = _inputs(cfg, batch=2, device="cpu")
    assert_deep_forward(model, fast, x, t, torch.float32)


def test_time_table_inside_unet_matches_computed_time_path():
    from ddpm_fast.sampling.time_table import attach_time_table, detach_time_table

    cfg = PRESETS["tiny"]
    model = ops.fused(UNet(cfg.unet).eval())
    x, t = _inputs(cfg, batch=3, device="cpu")
    with torch.no_grad():
        plain = model(x, t)
        attach_time_table(model, cfg.diffusion.n_steps)
        tabled = model(x, t)
        detach_time_table(model)
    torch.testing.assert_close(tabled, plain, **tol("time_table_unet", torch.float32))


GPU_PRESETS = ["tiny", "digits16", "cifar35m", "labml-cifar32"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_fused_unet_matches_reference_cuda(preset, dtype):
    cfg = PRESETS[preset]
    torch.manual_seed(2)
    model = UNet(cfg.unet).eval().cuda()
    fast = ops.fused(UNet(cfg.unet).eval().cuda())
    fast.load_state_dict(model.state_dict())
    fast.to(dtype)
    x, t = _inputs(cfg, batch=3, device="cuda")
    assert_deep_forward(model, fast, x, t, dtype)


@pytest.mark.gpu
def test_compiled_fused_unet_fullgraph_no_recompiles_across_t():
    import torch._dynamo
    import torch._dynamo.testing

    cfg = PRESETS["tiny"]
    model = ops.fused(UNet(cfg.unet).eval().cuda())
    x, _ = _inputs(cfg, batch=2, device="cuda")
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        outs = [compiled(x, torch.full((2,), t, device="cuda")) for t in (999, 500, 0)]
        ref = [model(x, torch.full((2,), t, device="cuda")) for t in (999, 500, 0)]
    assert counter.frame_count == 1, f"recompiled across t: {counter.frame_count} frames"
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r, **tol("dynamo_eager", torch.float32))


def test_compiled_fused_unet_fullgraph_no_recompiles_across_t_cpu():
    # The fused namespace (an object, not a module, so fused models pickle) must stay transparent to
    # dynamo: one frame for every t, the fused ops as single nodes, the same output as eager.
    import torch._dynamo
    import torch._dynamo.testing

    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    model = ops.fused(UNet(cfg.unet).eval())
    x, _ = _inputs(cfg, batch=2, device="cpu")
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        outs = [compiled(x, torch.full((2,), t)) for t in (999, 500, 0)]
        ref = [model(x, torch.full((2,), t)) for t in (999, 500, 0)]
    assert counter.frame_count == 1, f"recompiled across t: {counter.frame_count} frames"
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r, **tol("dynamo_eager", torch.float32))
