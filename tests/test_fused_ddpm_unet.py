"""The fused DDPM UNet (issue 15): DDPMUNet with every fusible step on the fast path must match the reference,
as the labml UNet's does (tests/test_fused_unet.py): the raw Triton kernels under the interpreter on CPU, the
registered ops (C++/reference CPU kernels), the time table, channels_last, torch.compile, the fast sampler,
and on CUDA the real fused path in every dtype.
"""
import functools
import types

import pytest
import torch

from ddpm_fast import ops
from ddpm_fast.config import DDPM_PRESETS, DDPMUNetConfig, DiffusionConfig, ModelConfig
from ddpm_fast.ops.attention import attention_triton
from ddpm_fast.ops.conv2d import conv2d_triton
from ddpm_fast.ops.conv_transpose2d import conv_transpose2d_triton
from ddpm_fast.ops.groupnorm_swish import HAS_TRITON, groupnorm_swish_triton
from ddpm_fast.ops.residual_add import residual_add_triton
from ddpm_fast.ops.time_embedding import time_embedding_triton
from ddpm_fast.ops.upsample_conv2d import upsample_conv2d_folded
from ddpm_fast.reference import DDPMUNet, functional
from helpers import CL, HAS_CUDA, use_namespace
from tolerances import assert_deep_forward, tol

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")

TRITON_NAMESPACE = types.SimpleNamespace(
    conv2d=conv2d_triton, conv_transpose2d=conv_transpose2d_triton, upsample_conv2d=functools.partial(upsample_conv2d_folded, force_triton=True),
    groupnorm_swish=groupnorm_swish_triton, attention=attention_triton, residual_add=residual_add_triton,
    time_embedding=time_embedding_triton, reverse_step=functional.reverse_step)

# Small members of the family, for the interpreter: cifar10-32's options (one head, downsample_padding 0,
# eps 1e-6, freq_shift 1) and the other side of each (heads, padding 1, freq_shift 0, flip), 1 and 2 ResNets.
SMALL = {
    "cifar10-like": DDPMUNetConfig(sample_size=16, block_out_channels=(32, 64, 64),
                                   down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
                                   norm_num_groups=8),
    "heads": DDPMUNetConfig(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 48),
                            down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "AttnUpBlock2D"), layers_per_block=1, norm_num_groups=8,
                            norm_eps=1e-5, attention_head_dim=8, downsample_padding=1, freq_shift=0,
                            flip_sin_to_cos=True),
}


def _pair(cfg, device="cpu", seed=0):
    """(reference model, fast-path copy with the same weights): random weights everywhere, norm gains ~1."""
    torch.manual_seed(seed)
    ref = DDPMUNet(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            gain = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn_like(p) * (0.05 if p.dim() > 1 else 0.2) + gain)
    fast = DDPMUNet(cfg).eval()
    fast.load_state_dict(ref.state_dict())
    return ref.to(device), fast.to(device)


def _inputs(cfg, batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.sample_size
    x = torch.randn(batch, cfg.in_channels, s, s, generator=g).to(device)
    return x, torch.randint(0, 1000, (batch,), generator=g).to(device)


@needs_triton
@pytest.mark.interpreter
@pytest.mark.parametrize("name", list(SMALL))
def test_triton_kernels_inside_whole_ddpm_unet_match_reference_cpu(name):
    cfg = SMALL[name]
    ref, fast = _pair(cfg)
    x, t = _inputs(cfg, batch=2, device="cpu")
    assert_deep_forward(ref, use_namespace(fast, TRITON_NAMESPACE), x, t, torch.float32, "fast DDPM UNet")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("name", list(SMALL))
def test_fused_ddpm_unet_matches_reference_cpu(name, layout):
    cfg = SMALL[name]
    ref, fast = _pair(cfg)
    x, t = _inputs(cfg, batch=3, device="cpu")
    if layout == "nhwc":
        fast, x = fast.to(memory_format=CL), x.contiguous(memory_format=CL)
    with torch.no_grad():
        want, got = ref(x, t), ops.fused(fast)(x, t)
    torch.testing.assert_close(got, want, **tol("fast_loop_fp32" if layout == "nhwc" else "fused_unet_cpu",
                                                torch.float32))


def test_time_table_inside_ddpm_unet_matches_computed_time_path():
    from ddpm_fast.sampling.time_table import attach_time_table, detach_time_table

    cfg = SMALL["heads"]  # freq_shift 0 and flip: the table must build the same sinusoid
    _, model = _pair(cfg)
    ops.fused(model)
    x, t = _inputs(cfg, batch=3, device="cpu")
    with torch.no_grad():
        plain = model(x, t)
        attach_time_table(model, 1000)
        tabled = model(x, t)
        detach_time_table(model)
    torch.testing.assert_close(tabled, plain, **tol("time_table_unet", torch.float32))


def test_compiled_fused_ddpm_unet_fullgraph_no_recompiles_across_t_cpu():
    import torch._dynamo
    import torch._dynamo.testing

    cfg = SMALL["cifar10-like"]
    _, model = _pair(cfg)
    ops.fused(model)
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


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_fast_sampler_matches_reference_on_ddpm_unet_cpu(sampler):
    # Philox noise on both backends: the same images up to float32 rounding, with the model's own defaults
    # (variance "paper", x0 clipped to [-1, 1]). T = 40 so that 12 steps at batch 4 (S * B >= T) make the
    # CPU fast loop use its time table.
    import ddpm_fast

    cfg = SMALL["cifar10-like"]
    _, model = _pair(cfg, seed=3)
    config = ModelConfig(cfg, DiffusionConfig(n_steps=40, variant="paper", clip_x0=True, clip_range=1.0))
    kw = dict(batch_size=4, config=config, output_type="pt", progress=False, noise="philox", seed=9,
              sampler=sampler, num_inference_steps=12)
    ref = ddpm_fast.sample(model, backend="reference", **kw)
    fast = ddpm_fast.sample(model, backend="fast", **kw)
    torch.testing.assert_close(fast, ref, **tol("fast_loop_fp32", torch.float32))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("preset", list(DDPM_PRESETS))
def test_fused_ddpm_unet_matches_reference_cuda(preset, dtype):
    cfg = DDPM_PRESETS[preset].unet
    ref, fast = _pair(cfg, device="cuda", seed=2)
    ops.fused(fast).to(dtype)
    x, t = _inputs(cfg, batch=2, device="cuda")
    assert_deep_forward(ref, fast, x, t, dtype, "fast DDPM UNet")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_graphed_fast_sampler_on_ddpm_cifar10_cuda(dtype):
    # The whole fast path on the cifar10-32 network: fused ops, time table, fused step, one CUDA graph.
    import ddpm_fast

    preset = DDPM_PRESETS["ddpm-cifar10"]
    ref, _ = _pair(preset.unet, device="cuda", seed=4)
    kw = dict(batch_size=8, config=preset, output_type="pt", progress=False, noise="philox", seed=1,
              sampler="ddim", num_inference_steps=10, device="cuda", dtype=dtype)
    want = ddpm_fast.sample(ref, backend="reference", **kw)
    got = ddpm_fast.sample(ref, backend="fast", **kw)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, **tol("ddpm_graph_vs_reference", dtype))
