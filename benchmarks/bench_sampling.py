"""The whole sampling loop, `ddpm_fast.sampling.sample(...)`, in images per second.

One timed call = x_T -> S UNet forwards and reverse steps -> float32 images in [0, 1] on the CPU
(output_type="pt"), i.e. what a user waits for. Providers: `reference` (backend="reference", eager
UNet), `compiled` and, in full runs, `compiled-max-autotune` (GPU only: backend="reference" with the
UNet compiled in place by nn.Module.compile, default mode / max-autotune), `fast` (backend="fast";
skipped with a reason while ddpm_fast.ops or ddpm_fast.fast_sampler is not written yet) and
`fast-nhwc` (GPU: backend="fast", channels_last=True).

extra_info: images/s, FLOPs (S x the UNet forward's conv/linear/matmul FLOPs, counted on the
reference) and TFLOP/s, peak memory of one call, sampler and steps; on the GPU, kernels_per_step:
the kernels of a 2k-step call minus those of a k-step call (k = 4, the same sampler and provider),
over k, so per-call work (x_T, warm-up and capture, output conversion) cancels out.
The fast backend keeps its captured CUDA graph between calls with the same model, shapes and
settings, so its timed rounds replay a kept graph (as a user's repeated sample() calls do); on the GPU,
`uncached_call_ms` records one call without it (warm-up step, time table and capture included).

Grid: CPU runs the tiny preset at batch 2 with 10 DDPM steps and 5 DDIM steps. GPU runs cifar35m in
fp32: 50-step DDIM at batch 1 and 64, 1000-step DDPM at batch 1; DDPM_FAST_BENCH_FULL=1 runs tiny,
cifar35m and labml-cifar32 at batches 1/16/64/256 with both samplers. DDPM_FAST_BENCH_PRESETS / _BATCHES / _DTYPES /
_PROVIDERS and DDPM_FAST_BENCH_SAMPLERS (e.g. "ddim50,ddpm1000") pick any subset.
"""
import os
import re
import time

import pytest
import torch

from bench_unet import build_unet, import_fast_ops, unet_inputs
from conftest import DEVICE, FULL, HAS_CUDA, count_cuda_kernels, count_flops, env_cases, env_list, run_bench
from ddpm_fast.config import PRESETS
from ddpm_fast.sampling import sample

if HAS_CUDA:
    # Default: what fits a few minutes next to the rest of scripts/gpu_check.sh; the reference at
    # 1000 steps and batch 64 alone would take minutes.
    _DEFAULT_CASES = ([(p, b, s) for p in ("tiny", "cifar35m", "labml-cifar32") for b in (1, 16, 64, 256)
                       for s in ("ddim50", "ddpm1000")] if FULL else
                      [("cifar35m", 1, "ddim50"), ("cifar35m", 64, "ddim50"), ("cifar35m", 1, "ddpm1000")])
    # fast-nhwc: backend="fast" with channels_last=True (the UNet's activations in NHWC).
    _DEFAULT_PROVIDERS = ["reference", "compiled", "fast", "fast-nhwc"] + (["compiled-max-autotune"] if FULL else [])
else:
    _DEFAULT_CASES = [("tiny", 2, "ddpm10"), ("tiny", 2, "ddim5")]
    _DEFAULT_PROVIDERS = ["reference", "fast"]


def _cases():
    """(preset, batch, sampler) triples: the default list, or, when any of DDPM_FAST_BENCH_PRESETS /
    _BATCHES / _SAMPLERS is set, the product of the given axes (unset axes keep their default values)."""
    if not any(os.environ.get(f"DDPM_FAST_BENCH_{k}") for k in ("PRESETS", "BATCHES", "SAMPLERS")):
        return _DEFAULT_CASES
    pb = env_cases([(p, b) for p, b, _ in _DEFAULT_CASES])
    samplers = env_list("DDPM_FAST_BENCH_SAMPLERS", dict.fromkeys(s for _, _, s in _DEFAULT_CASES))
    return [(p, b, s) for p, b in dict.fromkeys(pb) for s in samplers]


CASES = _cases()
# Steps of the shorter of the two calls whose kernel counts are differenced (see the docstring).
_KERNEL_COUNT_STEPS = 4
SAMPLING_DTYPES = env_list("DDPM_FAST_BENCH_DTYPES", ["fp32"])
SAMPLING_PROVIDERS = [p for p in env_list("DDPM_FAST_BENCH_PROVIDERS", _DEFAULT_PROVIDERS)
                      if p in ("reference", "compiled", "compiled-max-autotune", "fast", "fast-nhwc")]


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


@pytest.mark.parametrize("dtype", SAMPLING_DTYPES)
@pytest.mark.parametrize("preset,batch,sampler_spec", CASES, ids=[f"{p}-b{b}-{s}" for p, b, s in CASES])
@pytest.mark.parametrize("provider", SAMPLING_PROVIDERS)
def test_sampling(benchmark, fresh_compile_state, provider, preset, batch, sampler_spec, dtype):
    if dtype != "fp32" and not HAS_CUDA:
        pytest.skip(f"{dtype} sampling benchmarks are GPU-only")
    sampler, steps = parse_sampler(sampler_spec)
    model = build_unet(preset, dtype)
    x, t = unet_inputs(preset, batch, dtype)
    with torch.no_grad():
        flops = steps * count_flops(lambda: model(x, t))
    del x, t

    backend = "reference"
    if provider.startswith("compiled"):
        if not HAS_CUDA:
            pytest.skip("torch.compile providers run on GPU only (CPU inductor is not the target)")
        # In place: sample() still sees a UNet. max-autotune also replays inductor's CUDA graphs.
        model.compile(fullgraph=True, dynamic=False,
                      mode="max-autotune" if provider == "compiled-max-autotune" else None)
    elif provider in ("fast", "fast-nhwc"):
        _require_fast_backend()
        backend = "fast"

    def run(n_steps=steps):
        # A fixed seed per call: every round does identical work.
        return sample(model, batch_size=batch, num_inference_steps=n_steps, sampler=sampler,
                      generator=torch.Generator().manual_seed(0), output_type="pt", progress=False,
                      device=DEVICE, backend=backend, config=PRESETS[preset],
                      channels_last=provider == "fast-nhwc")

    benchmark.group = f"sampling[{preset} b={batch} {sampler}{steps} {dtype}]"
    uncached_ms = None
    if backend == "fast" and HAS_CUDA and not benchmark.disabled:
        # The timed rounds below replay the graph kept from the previous call (same model, shapes and
        # settings). Record once what a call costs without it: warm-up step, time table and capture.
        from ddpm_fast.sampling.fast_loop import clear_graph_cache

        run()  # compiles the Triton kernels, so the next call times the capture, not the JIT
        clear_graph_cache()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        uncached_ms = (time.perf_counter() - t0) * 1e3
    images = run_bench(benchmark, run, flops=flops, memory=True, provider=provider, preset=preset,
                       batch=batch, sampler=sampler, steps=steps, dtype=dtype)
    median_ms = benchmark.extra_info.get("median_ms")
    if median_ms:
        benchmark.extra_info["images/s"] = batch / (median_ms * 1e-3)
    if uncached_ms is not None:
        benchmark.extra_info["uncached_call_ms"] = uncached_ms
    if HAS_CUDA and not benchmark.disabled:
        k = _KERNEL_COUNT_STEPS
        benchmark.extra_info["kernels_per_step"] = (count_cuda_kernels(lambda: run(2 * k))
                                                    - count_cuda_kernels(lambda: run(k))) / k
    cfg = PRESETS[preset].unet
    assert images.shape == (batch, cfg.image_channels, cfg.image_size, cfg.image_size), images.shape
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
