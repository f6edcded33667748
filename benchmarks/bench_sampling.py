"""The whole sampling loop, `ddpm_fast.sampling.sample(...)`, in images per second.

One timed call = x_T -> S UNet forwards and reverse steps -> float32 images in [0, 1] on the CPU
(output_type="pt"), i.e. what a user waits for. Providers (PROVIDERS below): `reference`
(backend="reference", eager UNet), `compiled` (GPU only: backend="reference" with the UNet compiled in
place by nn.Module.compile in DDPM_FAST_COMPILE_MODE, default reduce-overhead = inductor + CUDA graphs;
recorded as `compiled-<mode>`), in full runs also `compiled-max-autotune`, `fast` (backend="fast";
skipped with a reason while ddpm_fast.ops or ddpm_fast.sampling.fast_loop is not written yet), `fast-nhwc`
(backend="fast", channels_last=True), and for the DDPM-paper models (ddpm-cifar10, ddpm-256: DDPMUNet) `diffusers`
/ `diffusers-compiled` (GPU): diffusers' DDPMPipeline / DDIMPipeline loop on UNet2DModel with the same
weights, eager / compiled in DDPM_FAST_COMPILE_MODE (where diffusers is installed; see diffusers_pipeline).

extra_info: images/s, FLOPs (S x the UNet forward's conv/linear/matmul FLOPs, counted on the
reference) and TFLOP/s, peak memory of one call, sampler and steps; on the GPU, kernels_per_step:
the kernels of a 2k-step call minus those of a k-step call (k = 4, the same sampler and provider),
over k, so per-call work (x_T, warm-up and capture, output conversion) cancels out.
Compiled providers: compile_s, the compile (and CUDA-graph recording) apart from the steady state: a
COMPILE_CALL_STEPS-step call made first, minus those steps at the timed per-step rate; the UNet compiled
for one (model, batch, dtype) serves that case's next sampler too (compile_reused=True there).
The fast backend keeps its captured CUDA graph between calls with the same model, shapes and
settings, so its timed rounds replay a kept graph (as a user's repeated sample() calls do); on the GPU,
`uncached_call_ms` records one call without it (warm-up step, time table and capture included).

Grid, in the order it runs (bf16 first, the precision users sample in, so a run cut off by a deadline
keeps the rows that matter most; all providers of a case run one after the other): CPU runs the tiny
preset at batch 2 with 10 DDPM steps and 5 DDIM steps, and the main job (`make sample`: the shipped
digits16 model, `digits16-shipped`, 16 images, DDPM-1000) with providers reference, fast and fast-nhwc,
in fp32 and, where the CPU does bf16 natively (ddpm_fast.devices.cpu_has_native_bf16), bf16; the main
job takes CPU_LONG_ROUNDS timed rounds (median), and the CI smoke (--benchmark-disable) runs it for
COMPILE_CALL_STEPS steps only. GPU runs cifar35m in bf16, then fp32: 50-step DDIM
at batch 1, 1000-step DDPM at batch 1, 50-step DDIM at batch 64; DDPM_FAST_BENCH_FULL=1 runs tiny, cifar35m and
labml-cifar32 at batches 1/16/64/256 with both samplers. DDPM_FAST_BENCH_PRESETS / _BATCHES / _DTYPES /
_PROVIDERS and DDPM_FAST_BENCH_SAMPLERS (e.g. "ddim50,ddpm1000") pick any subset.
A new model row: an entry in MODELS (a builder and its ModelConfig) and its cases in _DEFAULT_CASES.
"""
import gc
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch

from bench_unet import build_ddpm_unet, build_unet, diffusers_unet, import_fast_ops
from conftest import (DEVICE, DTYPES, FULL, HAS_CUDA, compile_mode, compiled_provider_name, count_cuda_kernels, count_flops,
                      env_cases, env_list, run_bench, timed_call_s)
from ddpm_fast.config import DDPM_PRESETS, PRESETS, ModelConfig
from ddpm_fast.devices import cpu_has_native_bf16
from ddpm_fast.io.checkpoint import default_checkpoint_path, load_checkpoint
from ddpm_fast.sampling import sample


@dataclass(frozen=True)
class Provider:
    """How a provider runs sample(): the backend, the fast loop's layout, and torch.compile's mode."""

    backend: str
    channels_last: bool = False
    compile_mode: Optional[str] = None  # compile the UNet in place in this mode (None: eager)


PROVIDERS = {
    "reference": Provider("reference"),
    "compiled": Provider("reference", compile_mode=compile_mode()),
    "compiled-max-autotune": Provider("reference", compile_mode="max-autotune"),
    "fast": Provider("fast"),
    "fast-nhwc": Provider("fast", channels_last=True),  # the UNet's activations in NHWC
    # diffusers' own pipelines (DDPMPipeline / DDIMPipeline) on UNet2DModel with the same weights: DDPM models only.
    "diffusers": Provider("diffusers"),
    "diffusers-compiled": Provider("diffusers", compile_mode=compile_mode()),
}


@dataclass(frozen=True)
class Model:
    """A model a row samples from: build(dtype name) -> nn.Module on DEVICE (fixed weights, eval mode),
    mapping (x [B, C, H, W], t [B] int64) -> eps; config: the ModelConfig sample() gets."""

    build: Callable[[str], torch.nn.Module]
    config: ModelConfig


MODELS = {name: Model(lambda dtype, name=name: build_unet(name, dtype), cfg) for name, cfg in PRESETS.items()}


def _shipped(dtype):
    model, _ = load_checkpoint(default_checkpoint_path())
    return model.eval().to(device=DEVICE, dtype=DTYPES[dtype])


# The package's shipped default model (ddpm_fast/assets/digits16.safetensors): what `make sample` draws from.
MODELS["digits16-shipped"] = Model(_shipped, PRESETS["digits16"])
# The DDPM paper's networks in diffusers' layout (google/ddpm-cifar10-32's, the 256x256 one), random weights.
MODELS.update({name: Model(lambda dtype, name=name: build_ddpm_unet(name, dtype), cfg)
               for name, cfg in DDPM_PRESETS.items()})


if HAS_CUDA:
    # What fits its share of scripts/gpu_check.sh's 480 s (benchmarks/PERF_NOTES.md has the plan); the
    # reference at 1000 steps and batch 64 alone would take minutes.
    _DEFAULT_CASES = ([(p, b, s) for p in ("tiny", "cifar35m", "labml-cifar32") for b in (1, 16, 64, 256)
                       for s in ("ddim50", "ddpm1000")] if FULL else
                      # b1 DDPM-1000 right after b1 DDIM-50: it reuses that case's compiled UNet (_KEPT_COMPILE)
                      [("cifar35m", 1, "ddim50"), ("cifar35m", 1, "ddpm1000"), ("cifar35m", 64, "ddim50"),
                       ("ddpm-cifar10", 1, "ddim50"), ("ddpm-cifar10", 64, "ddim50")])
    _DEFAULT_DTYPES = ["bf16", "fp32"]
    _DEFAULT_PROVIDERS = ["reference", "compiled", "fast", "fast-nhwc", "diffusers", "diffusers-compiled"] + (
        ["compiled-max-autotune"] if FULL and compile_mode() != "max-autotune" else [])
else:
    _DEFAULT_CASES = [("tiny", 2, "ddpm10"), ("tiny", 2, "ddim5"), ("digits16-shipped", 16, "ddpm1000"),
                      ("ddpm-cifar10", 1, "ddim10"), ("ddpm-256", 1, "ddim2")]
    _DEFAULT_DTYPES = ["fp32"] + (["bf16"] if cpu_has_native_bf16() else [])
    _DEFAULT_PROVIDERS = ["reference", "fast", "fast-nhwc", "diffusers"]


def _cases():
    """(model, batch, sampler) triples: the default list, or, when any of DDPM_FAST_BENCH_PRESETS /
    _BATCHES / _SAMPLERS is set, the product of the given axes (unset axes keep their default values)."""
    if not any(os.environ.get(f"DDPM_FAST_BENCH_{k}") for k in ("PRESETS", "BATCHES", "SAMPLERS")):
        return _DEFAULT_CASES
    pb = env_cases([(p, b) for p, b, _ in _DEFAULT_CASES])
    samplers = env_list("DDPM_FAST_BENCH_SAMPLERS", dict.fromkeys(s for _, _, s in _DEFAULT_CASES))
    return [(p, b, s) for p, b in dict.fromkeys(pb) for s in samplers]


# Steps of the shorter of the two calls whose kernel counts are differenced (see the docstring).
_KERNEL_COUNT_STEPS = 4
# Steps of the first call of a compiled provider (its compile_s) and of the warm-up before a long call:
# enough for inductor's CUDA-graph trees to warm up, record and replay once.
COMPILE_CALL_STEPS = 3
# Calls of at least this many image-steps (batch x steps) are timed once, after a COMPILE_CALL_STEPS-step
# warm-up: DDPM-1000 at batch 1 and DDIM-50 at batch 64 take seconds per call on the GPU (H100: 5-13 s and
# ~2 s), and several rounds of them would not fit scripts/gpu_check.sh's budget.
_ONE_ROUND_IMAGE_STEPS = 1000
# On CPU such a call (the main job: ~10-25 s on the 2-core dev VM) takes this many timed rounds, for a median.
CPU_LONG_ROUNDS = 3
SAMPLING_DTYPES = env_list("DDPM_FAST_BENCH_DTYPES", _DEFAULT_DTYPES)
SAMPLING_PROVIDERS = [p for p in env_list("DDPM_FAST_BENCH_PROVIDERS", _DEFAULT_PROVIDERS) if p in PROVIDERS]
# dtype outermost, then the case, then the provider: each case's providers run back to back.
GRID = [(m, b, s, dt, prov) for dt in SAMPLING_DTYPES for m, b, s in _cases() for prov in SAMPLING_PROVIDERS]


def spec_model_missing(model_name):
    """True for the shipped-model row when the package was installed without its model file."""
    return model_name == "digits16-shipped" and default_checkpoint_path() is None


def parse_sampler(spec):
    """"ddim50" -> ("ddim", 50)."""
    m = re.fullmatch(r"(ddpm|ddim)(\d+)", spec)
    if not m:
        raise ValueError(f"sampler spec must look like 'ddpm1000' or 'ddim50', got {spec!r}")
    return m.group(1), int(m.group(2))


def _require_fast_backend():
    import_fast_ops()
    try:
        import ddpm_fast.sampling.fast_loop  # noqa: F401 - only probing that backend="fast" can load
    except ModuleNotFoundError as e:
        if (e.name or "").startswith("ddpm_fast."):
            pytest.skip(f"backend='fast' unavailable: {e.name} does not exist yet")
        raise


# The last compiled UNet and its compile time, kept for the next row of the same (model, batch, dtype,
# mode): DDPM-1000 at batch 1 reuses DDIM-50's compile. One entry: a new key resets dynamo first, so
# the per-function recompile limit never makes torch.compile fall back to eager unnoticed.
_KEPT_COMPILE = {}


def _compiled_model(key, build, mode):
    """(compiled model, its compile_s or None until measured) for key = (model, batch, dtype, mode)."""
    if key in _KEPT_COMPILE:
        return _KEPT_COMPILE[key]
    _KEPT_COMPILE.clear()
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    model = build()
    # In place: sample() still sees a UNet.
    model.compile(fullgraph=True, dynamic=False, mode=None if mode == "default" else mode)
    return model, None


def _unet_inputs(config: ModelConfig, batch, dtype):
    """Random (x, t) of the model's input shape, for counting one forward's FLOPs."""
    u = config.unet
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, u.image_channels, u.image_size, u.image_size, generator=g)
    t = torch.randint(0, config.diffusion.n_steps, (batch,), generator=g)
    return x.to(device=DEVICE, dtype=DTYPES[dtype]), t.to(DEVICE)


@pytest.fixture(scope="module", autouse=True)
def _drop_kept_compile():
    yield
    _KEPT_COMPILE.clear()
    if HAS_CUDA:
        torch._dynamo.reset()


@pytest.fixture
def _clean_after():
    """After each test: drop the fast backend's kept graphs (and pools) and cached blocks, so one
    provider's memory does not sit in the next one's totals (the kept compiled UNet stays, see above)."""
    yield
    if "ddpm_fast.sampling.graphs" in sys.modules:
        sys.modules["ddpm_fast.sampling.graphs"].clear_graph_cache()
    gc.collect()
    if HAS_CUDA:
        torch.cuda.empty_cache()


@pytest.mark.parametrize("model_name,batch,sampler_spec,dtype,provider", GRID,
                         ids=[f"{p}-{m}-b{b}-{s}-{dt}" for m, b, s, dt, p in GRID])
def test_sampling(benchmark, _clean_after, provider, model_name, batch, sampler_spec, dtype):
    if dtype != "fp32" and not HAS_CUDA and not (dtype == "bf16" and cpu_has_native_bf16()):
        pytest.skip(f"{dtype} sampling on this CPU is not native (no AVX512_BF16 / AMX): GPU-only")
    sampler, steps = parse_sampler(sampler_spec)
    long_call = steps * batch >= _ONE_ROUND_IMAGE_STEPS
    if long_call and benchmark.disabled and not HAS_CUDA:
        steps = COMPILE_CALL_STEPS  # the CI smoke: the same code path, seconds instead of minutes
    if spec_model_missing(model_name):
        pytest.skip(f"{model_name}: the shipped model file is missing")
    spec, entry = PROVIDERS[provider], MODELS[model_name]
    if spec.compile_mode and not HAS_CUDA:
        pytest.skip("torch.compile providers run on GPU only (CPU inductor is not the target)")
    if spec.backend == "fast":
        _require_fast_backend()
    if spec.backend == "diffusers" and model_name not in DDPM_PRESETS:
        pytest.skip(f"diffusers has no pipeline for {model_name}'s network (a DDPM-paper model only)")
    key, compile_s = (model_name, batch, dtype, spec.compile_mode, spec.backend), None
    if spec.compile_mode and spec.backend != "diffusers":
        model, compile_s = _compiled_model(key, lambda: entry.build(dtype), spec.compile_mode)
    else:
        model = entry.build(dtype)
    x, t = _unet_inputs(entry.config, batch, dtype)
    with torch.no_grad():  # model.forward: the eager forward, also of a model compiled in place
        flops = steps * count_flops(lambda: model.forward(x, t))
    del x, t

    def run(n_steps=steps):
        # A fixed seed per call: every round does identical work.
        return sample(model, batch_size=batch, num_inference_steps=n_steps, sampler=sampler,
                      generator=torch.Generator().manual_seed(0), output_type="pt", progress=False,
                      device=DEVICE, backend=spec.backend, config=entry.config, channels_last=spec.channels_last)

    if spec.backend == "diffusers":
        run = diffusers_pipeline(model, entry.config, batch, sampler, steps, spec.compile_mode)

    benchmark.group = f"sampling[{model_name} b={batch} {sampler}{steps} {dtype}]"
    timed = HAS_CUDA and not benchmark.disabled
    # A long call is timed once (CPU_LONG_ROUNDS times on CPU), after a short warm-up call that runs the
    # same code (cuDNN's choices, Triton's JIT, inductor's graphs); a short one is warmed up by itself.
    warmup = (lambda: run(COMPILE_CALL_STEPS)) if long_call else run
    compile_call_s = None
    if spec.compile_mode and timed and compile_s is None:
        compile_call_s = timed_call_s(lambda: run(COMPILE_CALL_STEPS))  # compile + CUDA-graph recording
    uncached_ms = None
    if spec.backend == "fast" and timed:
        # The timed rounds below replay the graph kept from the previous call (same model, shapes and
        # settings). Record once what a call costs without it: warm-up step, time table and capture.
        from ddpm_fast.sampling.graphs import clear_graph_cache

        run(COMPILE_CALL_STEPS)  # compiles the Triton kernels, so the next call times the capture, not the JIT
        clear_graph_cache()
        uncached_ms = timed_call_s(run) * 1e3
        warmup = lambda: None  # noqa: E731 - the uncached call just left the kept graph warm
    extra = {"compile_mode": spec.compile_mode, "compile_reused": compile_s is not None} if spec.compile_mode else {}
    # CPU memory is read under the profiler, a call of its own: not for a main-job call of seconds.
    images = run_bench(benchmark, run, flops=flops, memory=HAS_CUDA or not long_call, warmup=warmup,
                       rounds=(1 if HAS_CUDA else CPU_LONG_ROUNDS) if long_call else None,
                       provider=compiled_provider_name(spec.compile_mode) if provider == "compiled" else provider,
                       preset=model_name, batch=batch, sampler=sampler, steps=steps, dtype=dtype, **extra)
    median_ms = benchmark.extra_info.get("median_ms")
    if median_ms:
        benchmark.extra_info["images/s"] = batch / (median_ms * 1e-3)
        if compile_call_s is not None:  # the compile call's steps at the timed rate are not compile
            compile_s = max(0.0, compile_call_s - COMPILE_CALL_STEPS * median_ms * 1e-3 / steps)
            _KEPT_COMPILE[key] = (model, compile_s)
    if compile_s is not None:
        benchmark.extra_info["compile_s"] = compile_s
    if uncached_ms is not None:
        benchmark.extra_info["uncached_call_ms"] = uncached_ms
    if timed:
        k = _KERNEL_COUNT_STEPS
        benchmark.extra_info["kernels_per_step"] = (count_cuda_kernels(lambda: run(2 * k))
                                                    - count_cuda_kernels(lambda: run(k))) / k
    cfg = entry.config.unet
    assert images.shape == (batch, cfg.image_channels, cfg.image_size, cfg.image_size), images.shape
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def diffusers_pipeline(model, config: ModelConfig, batch: int, sampler: str, steps: int, mode: Optional[str]):
    """run(n_steps) -> [B, C, H, W] float images in [0, 1] on the CPU: DDPMPipeline's / DDIMPipeline's loop
    (x_T from a CPU generator, UNet2DModel, scheduler.step) on a UNet2DModel holding `model`'s weights, with the
    scheduler diffusers would read from the model's folder (io.diffusers' mapping, inverted); the UNet compiled
    in `mode` when given. The loop is the pipelines' own, written out: their last step (a numpy conversion)
    refuses bf16 images in diffusers 0.42.1."""
    diffusers = pytest.importorskip("diffusers")
    d = config.diffusion
    kw = dict(num_train_timesteps=d.n_steps, beta_start=d.beta_start, beta_end=d.beta_end, beta_schedule=d.beta_schedule,
              trained_betas=list(d.trained_betas) if d.trained_betas else None, clip_sample=d.clip_x0,
              clip_sample_range=d.clip_range or 1.0)
    unet = diffusers_unet(model)
    if mode:
        unet.compile(fullgraph=True, dynamic=False, mode=None if mode == "default" else mode)
    if sampler == "ddim":
        sched, extra = diffusers.DDIMScheduler(**kw), {"eta": 0.0}
    else:
        variance = {"paper": "fixed_large", "posterior": "fixed_small"}.get(d.variant)
        if variance is None:
            pytest.skip(f"diffusers' DDPMScheduler has no {d.variant!r} variance")
        sched, extra = diffusers.DDPMScheduler(variance_type=variance, **kw), {}
    p = next(unet.parameters())
    u = config.unet
    shape = (batch, u.image_channels, u.image_size, u.image_size)

    def run(n_steps=steps):
        sched.set_timesteps(n_steps)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g).to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(unet(x, t).sample, t, x, generator=g, **extra).prev_sample
        return (x.float() / 2 + 0.5).clamp(0, 1).cpu()

    return run
