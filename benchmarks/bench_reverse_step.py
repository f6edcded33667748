"""reverse_step: one DDPM/DDIM update of the whole batch at the presets' batch x image sizes.

Providers, side by side per case (one benchmark group per image / batch / eps dtype):
  reference      the eager PyTorch composition a sampler would write: torch.randn for z, then the
                 coefficient gather and the x0 / posterior-mean arithmetic of
                 reference.functional.reverse_step (about ten elementwise kernels)
  compiled       torch.compile of that composition, randn included (GPU only): the bar to beat
  fast           ddpm_fast::reverse_step with z drawn inside the kernel (Philox): one pass
  fast-injected  ddpm_fast::reverse_step reading a precomputed noise tensor (one more input)
  copy           a device copy of the same number of bytes: the bandwidth ceiling (the issue's GPU
                 target: fast >= 80% of it)

bytes (extra_info) = x_t read + eps read + x_{t-1} written (+ noise read for fast-injected): the
fewest the op must move; the reference also writes and rereads z and its temporaries. On CUDA the
fast providers record the copy's GB/s on their bytes and their fraction of it (`copy_GB/s`,
`frac_of_copy`).

Grid: CPU: 3x32x32 at batch 1, 16, 64 and 3x16x16 (tiny) at batch 16, eps fp32: seconds. GPU: 3x32x32
and 3x16x16 at batch 1, 16, 64, 256, eps fp32 and bf16 (x_t fp32); DDPM_FAST_BENCH_FULL=1 adds fp16.
Knobs (comma-separated): DDPM_FAST_BENCH_BATCHES, DDPM_FAST_BENCH_DTYPES (eps dtypes).
"""
import importlib

import pytest
import torch

from conftest import (DEVICE, DTYPES, FULL, HAS_CUDA, PROVIDERS, check_output, compiled, copy_gbs, env_list,
                      run_bench)
from ddpm_fast.config import DiffusionConfig
from ddpm_fast.reference import functional as ref
from ddpm_fast.reference.diffusion import Schedule

M = importlib.import_module("ddpm_fast.ops.reverse_step")

# (name, C, H, W): the presets' images (labml-cifar32 / cifar35m: 3x32x32, tiny: 3x16x16)
if HAS_CUDA:
    _CASES = [(img, b) for img in (("cifar", 3, 32, 32), ("tiny", 3, 16, 16)) for b in (1, 16, 64, 256)]
    _DTYPES = ["fp32", "fp16", "bf16"] if FULL else ["fp32", "bf16"]
else:
    _CASES = [(("cifar", 3, 32, 32), b) for b in (1, 16, 64)] + [(("tiny", 3, 16, 16), 16)]
    _DTYPES = ["fp32"]
_BATCHES = env_list("DDPM_FAST_BENCH_BATCHES", [])
CASES = [c for c in _CASES if not _BATCHES or str(c[1]) in _BATCHES]
EPS_DTYPES = env_list("DDPM_FAST_BENCH_DTYPES", _DTYPES)
BENCH_PROVIDERS = PROVIDERS + ["fast-injected", "copy"]

_SCHED = Schedule(DiffusionConfig())
_COEFFS = _SCHED.ddpm_coeffs(_SCHED.timesteps(_SCHED.n_steps), "labml").to(DEVICE)


def case_id(case):
    (name, c, h, w), b = case
    return f"{name}-{c}x{h}x{w}-b{b}"


def eager_step(x_t, eps, step, coeffs):
    """What a sampler without the fused op runs: fresh noise from torch.randn, then the update."""
    z = torch.randn(x_t.shape, device=x_t.device, dtype=torch.float32)
    return ref.reverse_step(x_t, eps, step, coeffs, noise=z)


@pytest.mark.parametrize("provider", BENCH_PROVIDERS)
@pytest.mark.parametrize("eps_dtype", EPS_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reverse_step(benchmark, case, eps_dtype, provider):
    (name, c, h, w), batch = case
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, h, w, generator=gen).to(DEVICE)
    eps = torch.randn(batch, c, h, w, generator=gen).to(device=DEVICE, dtype=DTYPES[eps_dtype])
    step = torch.tensor(500, device=DEVICE)  # a device scalar, as in the CUDA-graph sampler
    noise = torch.randn(batch, c, h, w, generator=gen).to(DEVICE)
    nbytes = 2 * x.numel() * x.element_size() + eps.numel() * eps.element_size()
    if provider == "fast-injected":
        nbytes += noise.numel() * noise.element_size()
    info = dict(image=f"{c}x{h}x{w}", preset_image=name, batch=batch, eps_dtype=eps_dtype, elements=x.numel())

    if provider == "reference":
        fn = lambda: eager_step(x, eps, step, _COEFFS)  # noqa: E731
    elif provider == "compiled":
        cfn = compiled(eager_step)
        fn = lambda: cfn(x, eps, step, _COEFFS)  # noqa: E731
    elif provider == "fast":
        if not M.HAS_EXTENSION:
            pytest.skip(f"ddpm_fast._C not built ({M._LOAD_ERROR}); fast would time the reference")
        fn = lambda: M.reverse_step(x, eps, step, _COEFFS, seed=1)  # noqa: E731
    elif provider == "fast-injected":
        if not M.HAS_EXTENSION:
            pytest.skip(f"ddpm_fast._C not built ({M._LOAD_ERROR}); fast would time the reference")
        fn = lambda: M.reverse_step(x, eps, step, _COEFFS, noise=noise)  # noqa: E731
    elif provider == "copy":
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=DEVICE)
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731
    else:
        raise AssertionError(provider)

    run_bench(benchmark, fn, nbytes=nbytes, **info)
    if provider == "fast":  # the reference draws the same Philox stream for seed 1 at this step
        check_output(fn, ref.reverse_step(x, eps, step, _COEFFS, seed=1), "reverse_step/fast")
    elif provider == "fast-injected":
        check_output(fn, ref.reverse_step(x, eps, step, _COEFFS, noise=noise), "reverse_step/fast-injected")
    elif provider == "compiled":  # torch.randn noise inside: only shape and finiteness are checkable
        out = fn()
        assert out.shape == x.shape and out.dtype == x.dtype and bool(torch.isfinite(out).all())
    if HAS_CUDA and provider.startswith("fast") and "GB/s" in benchmark.extra_info:
        copy = copy_gbs(nbytes)
        benchmark.extra_info["copy_GB/s"] = copy
        benchmark.extra_info["frac_of_copy"] = benchmark.extra_info["GB/s"] / copy
