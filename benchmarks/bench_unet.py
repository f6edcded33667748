"""UNet forward (inference: eval mode, no_grad) per preset, batch and dtype, for every provider.

Providers: `reference` (eager PyTorch, the spec), `compiled` (the reference under torch.compile in
DDPM_FAST_COMPILE_MODE, default reduce-overhead, recorded as `compiled-<mode>`, its compile time as
extra_info compile_s; GPU only), `compiled-max-autotune` (GPU, full runs), `fast`
(`ddpm_fast.ops.fused(model)`: the same module, its fusible steps on the fast ops),
`fast-compiled` (torch.compile over the fused model; GPU, full runs), and `reference-graph` /
`fast-graph` (GPU: the eager forward captured once in a CUDA graph and replayed, as the sampler does).

extra_info: FLOPs of one forward (conv/linear/matmul, counted once on the reference by
torch.utils.flop_counter) and TFLOP/s, peak memory (see conftest.measure_peak_memory), provider.

Grid: CPU runs tiny (batch 1 and 8) and cifar35m (batch 1) in fp32 so the file stays quick. GPU runs
cifar35m at batch 1 and 64 in fp32 and bf16; DDPM_FAST_BENCH_FULL=1 runs every preset at batches
1/16/64/256 in fp32/fp16/bf16 and adds the max-autotune and fast-compiled providers.
DDPM_FAST_BENCH_PRESETS / _BATCHES / _DTYPES / _PROVIDERS narrow or widen any axis (comma-separated).
"""
import pytest
import torch

from conftest import (DEVICE, DTYPES, FULL, HAS_CUDA, check_output, compile_mode, compiled, count_flops, cuda_graphed,
                      env_cases, env_list, run_bench)
from ddpm_fast.config import PRESETS
from ddpm_fast.reference import UNet

if HAS_CUDA:
    _DEFAULT_CASES = ([(p, b) for p in ("tiny", "cifar35m", "labml-cifar32") for b in (1, 16, 64, 256)]
                      if FULL else [("cifar35m", 1), ("cifar35m", 64)])
    # Each compiled case costs ~a minute of compilation: the default grid stays a few minutes.
    _DEFAULT_DTYPES = ["fp32", "fp16", "bf16"] if FULL else ["fp32", "bf16"]
    # *-graph: the forward captured in a CUDA graph and replayed, as the fast sampler runs it: the GPU's
    # own time without the host's launch cost (eager fused ops are host-bound on the H100 machines).
    _DEFAULT_PROVIDERS = ["reference", "compiled", "fast", "reference-graph", "fast-graph"] + (
        ["compiled-max-autotune", "fast-compiled"] if FULL else [])
else:
    _DEFAULT_CASES = [("tiny", 1), ("tiny", 8), ("cifar35m", 1)]
    _DEFAULT_DTYPES = ["fp32"]
    _DEFAULT_PROVIDERS = ["reference", "fast"]


CASES = env_cases(_DEFAULT_CASES)
UNET_DTYPES = env_list("DDPM_FAST_BENCH_DTYPES", _DEFAULT_DTYPES)
UNET_PROVIDERS = env_list("DDPM_FAST_BENCH_PROVIDERS", _DEFAULT_PROVIDERS)
if compile_mode() == "max-autotune":  # `compiled` already is max-autotune: time it once
    UNET_PROVIDERS = [p for p in UNET_PROVIDERS if p != "compiled-max-autotune"]


def import_fast_ops():
    """ddpm_fast.ops, or a clean skip while its op modules are still unwritten (any other import
    failure is a real bug and raises)."""
    try:
        import ddpm_fast.ops as ops
    except ModuleNotFoundError as e:
        if (e.name or "").startswith("ddpm_fast.ops"):
            pytest.skip(f"fast provider unavailable: {e.name} does not exist yet")
        raise
    return ops


def build_unet(preset, dtype):
    """The preset's UNet with fixed random weights, in eval mode, on DEVICE in `dtype`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    torch.manual_seed(0)
    return UNet(PRESETS[preset].unet).eval().to(device=DEVICE, dtype=DTYPES[dtype])


def unet_inputs(preset, batch, dtype):
    cfg = PRESETS[preset].unet
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.image_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, PRESETS[preset].diffusion.n_steps, (batch,), generator=g)
    return x.to(device=DEVICE, dtype=DTYPES[dtype]), t.to(DEVICE)


def provider_model(provider, model):
    """The callable a provider runs: the same weights, routed through that provider's path."""
    if provider == "reference":
        return model
    if provider.startswith("compiled"):
        if not HAS_CUDA:
            pytest.skip("torch.compile providers run on GPU only (CPU inductor is not the target)")
        return compiled(model, mode="max-autotune" if provider.endswith("max-autotune") else None)
    if provider in ("fast", "fast-compiled"):
        ops = import_fast_ops()
        ops.fused(model)
        if provider == "fast-compiled":
            if not HAS_CUDA:
                pytest.skip("torch.compile providers run on GPU only")
            return compiled(model)
        return model
    raise ValueError(f"unknown provider {provider!r}")


@pytest.mark.parametrize("dtype", UNET_DTYPES)
@pytest.mark.parametrize("preset,batch", CASES, ids=[f"{p}-b{b}" for p, b in CASES])
@pytest.mark.parametrize("provider", UNET_PROVIDERS)
def test_unet_forward(benchmark, fresh_compile_state, provider, preset, batch, dtype):
    if dtype != "fp32" and not HAS_CUDA:
        pytest.skip(f"{dtype} UNet benchmarks are GPU-only")
    model = build_unet(preset, dtype)
    x, t = unet_inputs(preset, batch, dtype)
    with torch.no_grad():
        flops = count_flops(lambda: model(x, t))  # on the reference, before any swap
        want = model(x, t) if provider != "reference" else None
    graphed = provider.endswith("-graph")
    if graphed and not HAS_CUDA:
        pytest.skip("CUDA-graph providers need a GPU")
    net = provider_model(provider.removesuffix("-graph"), model)

    def forward():
        with torch.no_grad():
            return net(x, t)

    if graphed:
        forward = cuda_graphed(forward)

    benchmark.group = f"unet_forward[{preset} b={batch} {dtype}]"
    out = run_bench(benchmark, forward, flops=flops, memory=True, provider=provider, preset=preset,
                    batch=batch, dtype=dtype, n_params=sum(p.numel() for p in model.parameters()))
    # A benchmark that timed a broken forward would be a lie: the output must be the right shape
    # and finite, and (other providers) close to the reference's.
    assert out.shape == x.shape, f"{provider}: output shape {tuple(out.shape)} != {tuple(x.shape)}"
    assert torch.isfinite(out).all(), f"{provider}: non-finite UNet output"
    if want is not None:
        check_output(forward, want, f"unet_forward/{provider}", loosen=2.0)


# --- the DDPM paper's UNet (diffusers' layout): DDPMUNet, fused, and diffusers' own UNet2DModel -----------
# Providers: `reference` and `fast` as above, on DDPMUNet; `diffusers` (UNet2DModel, eager, the same
# weights: what a diffusers user runs today) and `diffusers-compiled` (it under torch.compile; GPU only),
# where diffusers is installed. Presets: config.DDPM_PRESETS (google/ddpm-cifar10-32's network, and the
# 256x256 celebahq/church layout).
if HAS_CUDA:
    _DDPM_DEFAULT_CASES = [("ddpm-cifar10", 1), ("ddpm-cifar10", 64), ("ddpm-256", 1), ("ddpm-256", 16)]
    _DDPM_PROVIDERS = ["reference", "fast", "fast-graph", "diffusers", "diffusers-compiled"]
else:
    _DDPM_DEFAULT_CASES = [("ddpm-cifar10", 1), ("ddpm-256", 1)]
    _DDPM_PROVIDERS = ["reference", "fast", "diffusers"]
DDPM_CASES = env_list("DDPM_FAST_BENCH_DDPM_CASES", [f"{p}:{b}" for p, b in _DDPM_DEFAULT_CASES])
DDPM_PROVIDERS = env_list("DDPM_FAST_BENCH_DDPM_PROVIDERS", _DDPM_PROVIDERS)


def build_ddpm_unet(preset, dtype):
    """The DDPM preset's network with fixed random weights, eval mode, on DEVICE in `dtype`."""
    from ddpm_fast.config import DDPM_PRESETS
    from ddpm_fast.reference import DDPMUNet

    torch.manual_seed(0)
    return DDPMUNet(DDPM_PRESETS[preset].unet).eval().to(device=DEVICE, dtype=DTYPES[dtype])


def diffusers_unet(model):
    """diffusers' UNet2DModel holding `model`'s weights (the state_dicts share their names), or a skip."""
    diffusers = pytest.importorskip("diffusers")
    cfg = model.config.to_dict()
    unet = diffusers.UNet2DModel(**cfg).eval()
    unet.load_state_dict(model.state_dict(), strict=True)
    p = next(model.parameters())
    return unet.to(device=p.device, dtype=p.dtype)


@pytest.mark.parametrize("dtype", UNET_DTYPES)
@pytest.mark.parametrize("case", DDPM_CASES)
@pytest.mark.parametrize("provider", DDPM_PROVIDERS)
def test_ddpm_unet_forward(benchmark, fresh_compile_state, provider, case, dtype):
    preset, batch = case.split(":")[0], int(case.split(":")[1])
    if dtype != "fp32" and not HAS_CUDA:
        pytest.skip(f"{dtype} UNet benchmarks are GPU-only")
    graphed = provider.endswith("-graph")
    if (graphed or provider.endswith("compiled")) and not HAS_CUDA:
        pytest.skip(f"{provider} runs on a GPU only")
    model = build_ddpm_unet(preset, dtype)
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g).to(DEVICE, DTYPES[dtype])
    t = torch.randint(0, 1000, (batch,), generator=g).to(DEVICE)
    with torch.no_grad():
        flops = count_flops(lambda: model(x, t))
        want = model(x, t) if provider != "reference" else None
    base = provider.removesuffix("-graph")
    if base.startswith("diffusers"):
        unet = diffusers_unet(model)
        net = (lambda x, t: unet(x, t).sample) if base == "diffusers" else compiled(lambda x, t: unet(x, t).sample)
    else:
        net = provider_model(base, model)

    def forward():
        with torch.no_grad():
            return net(x, t)

    if graphed:
        forward = cuda_graphed(forward)
    benchmark.group = f"ddpm_unet_forward[{preset} b={batch} {dtype}]"
    out = run_bench(benchmark, forward, flops=flops, memory=True, provider=provider, preset=preset, batch=batch,
                    dtype=dtype, n_params=sum(p.numel() for p in model.parameters()))
    assert out.shape == x.shape and torch.isfinite(out).all(), f"{provider}: bad DDPM UNet output"
    if want is not None:
        check_output(forward, want, f"ddpm_unet_forward/{provider}", loosen=2.0)
