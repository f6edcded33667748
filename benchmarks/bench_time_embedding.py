"""The time path: the fused time embedding op, and the per-model time-projection table.

test_time_embedding: TimeEmbedding(E) alone (sinusoid + lin1 + Swish + lin2) at each preset's E.
  Providers: `reference` (eager), `compiled` (torch.compile of the reference; GPU only), `fast` (the
  registered op `ddpm_fast::time_embedding`: the Triton kernel on CUDA, the reference math on CPU).
test_time_path: everything the UNet does with t before its first conv: TimeEmbedding plus every
  ResidualBlock's projection time_emb(Swish(t_emb)), at each preset's real block widths.
  Providers: `reference` (computed, eager), `compiled` (GPU only), `fast` (computed with the fused op),
  `table` (TimeTable.lookup: one index_select of a prebuilt [T, sum(out_c)] table plus views).

extra_info: flops (2 per multiply-add of the Linear layers; the lookup does none) and bytes (each
weight read once plus the output written; for the lookup, the gathered rows read and written), with
TFLOP/s and GB/s. On CPU only seconds mean anything: the fast op is the reference there.
DDPM_FAST_BENCH_PRESETS / _BATCHES / _DTYPES narrow or widen the grid (comma-separated).
"""
import pytest
import torch

from conftest import DEVICE, DTYPES, FULL, HAS_CUDA, PROVIDERS, check_output, compiled, env_cases, env_list, run_bench
from ddpm_fast import ops
from ddpm_fast.config import PRESETS
from ddpm_fast.sampling.time_table import TimeTable
from ddpm_fast.reference import UNet, functional as ref

_PRESETS = ("tiny", "labml-cifar32", "cifar35m")  # E = 128, 256, 512 (digits16 shares tiny's E)
if HAS_CUDA:
    _BATCHES = (1, 16, 64, 256) if FULL else (1, 64, 256)
    _DTYPES = ["fp32", "fp16", "bf16"] if FULL else ["fp32", "bf16"]
else:
    _BATCHES = (1, 64)
    _DTYPES = ["fp32"]
CASES = env_cases([(p, b) for p in _PRESETS for b in _BATCHES])
BENCH_DTYPES = env_list("DDPM_FAST_BENCH_DTYPES", _DTYPES)
PATH_PROVIDERS = PROVIDERS + ["table"]


def _steps(preset, batch):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, PRESETS[preset].diffusion.n_steps, (batch,), generator=g).to(DEVICE)


def _model(preset, dtype):
    torch.manual_seed(0)
    return UNet(PRESETS[preset].unet).eval().to(device=DEVICE, dtype=DTYPES[dtype])


def _embedding_cost(e, batch, esize):
    flops = 2 * batch * (e * (e // 4) + e * e)
    nbytes = (e * (e // 4) + e * e + 2 * e) * esize + batch * 8 + batch * e * esize
    return flops, nbytes


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", BENCH_DTYPES)
@pytest.mark.parametrize("preset, batch", CASES)
def test_time_embedding(benchmark, preset, batch, dtype, provider):
    te = _model(preset, dtype).time_emb
    w = [p.detach() for p in (te.lin1.weight, te.lin1.bias, te.lin2.weight, te.lin2.bias)]
    t = _steps(preset, batch)
    fn = {"reference": ref.time_embedding, "fast": ops.time_embedding}.get(provider)
    if provider == "compiled":
        fn = compiled(ref.time_embedding)
    flops, nbytes = _embedding_cost(te.n_channels, batch, w[0].element_size())
    run_bench(benchmark, lambda: fn(t, *w), flops=flops, nbytes=nbytes, E=te.n_channels, batch=batch,
              dtype=dtype)
    if provider != "reference":
        check_output(lambda: fn(t, *w), ref.time_embedding(t, *w), f"time_embedding/{provider}")


# The DDPM (diffusers) UNet's time embedding: sinusoid width = base channels (128 for ddpm-cifar10-32 and the
# 256x256 layouts: E = 512), freq_shift 1, sin first (flip_sin_to_cos False), as in those configs.
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", BENCH_DTYPES)
@pytest.mark.parametrize("batch", _BATCHES[:2])
def test_time_embedding_ddpm(benchmark, batch, dtype, provider):
    e, g = 512, torch.Generator().manual_seed(0)
    w = [(torch.rand(*shape, generator=g) * 2 - 1).div(fan ** 0.5).to(DEVICE, DTYPES[dtype])
         for shape, fan in (((e, e // 4), e // 4), ((e,), e // 4), ((e, e), e), ((e,), e))]
    t = torch.randint(0, 1000, (batch,), generator=g).to(DEVICE)
    fn = {"reference": ref.time_embedding, "fast": ops.time_embedding}.get(provider)
    if provider == "compiled":
        fn = compiled(ref.time_embedding)
    flops, nbytes = _embedding_cost(e, batch, w[0].element_size())
    run_bench(benchmark, lambda: fn(t, *w, 1.0, False), flops=flops, nbytes=nbytes, E=e, batch=batch,
              dtype=dtype, freq_shift=1)
    if provider != "reference":
        check_output(lambda: fn(t, *w, 1.0, False), ref.time_embedding(t, *w, 1.0, False),
                     f"time_embedding ddpm/{provider}")


@pytest.mark.parametrize("provider", PATH_PROVIDERS)
@pytest.mark.parametrize("dtype", BENCH_DTYPES)
@pytest.mark.parametrize("preset, batch", CASES)
def test_time_path(benchmark, preset, batch, dtype, provider):
    model = _model(preset, dtype)
    t = _steps(preset, batch)
    e = model.time_emb.n_channels
    widths = [blk.time_emb.out_features for blk in model.res_blocks()]
    esize = model.time_emb.lin1.weight.element_size()
    emb_flops, emb_bytes = _embedding_cost(e, batch, esize)
    flops = emb_flops + 2 * batch * e * sum(widths)
    nbytes = emb_bytes + (e * sum(widths) + sum(widths)) * esize + batch * sum(widths) * esize
    with torch.no_grad():
        want = model.time_projections(t)  # the reference path, before any provider changes the model

    if provider == "table":
        table = TimeTable(model, PRESETS[preset].diffusion.n_steps)
        fn = table.lookup
        flops, nbytes = None, 2 * batch * sum(widths) * esize + batch * 8  # rows read + written, t
    elif provider == "compiled":
        fn = compiled(model.time_projections)
    else:
        if provider == "fast":
            ops.fused(model)
        fn = model.time_projections

    def call():
        with torch.no_grad():
            return fn(t)

    run_bench(benchmark, call, flops=flops, nbytes=nbytes, E=e, batch=batch, dtype=dtype,
              blocks=len(widths), sum_out_c=sum(widths))
    if provider != "reference":
        check_output(call, want, f"time path/{provider}")
