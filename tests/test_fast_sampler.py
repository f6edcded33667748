"""The fast sampling backend (issue 5): same images as the reference loop when given the same noise,
CUDA-graph replay equal to eager, reproducible from a seed."""
import weakref

import pytest
import torch

import ddpm_fast
from ddpm_fast.config import PRESETS
from ddpm_fast.sampling.fast_loop import fast_loop
from ddpm_fast.reference import Schedule, UNet
from ddpm_fast.sampling import reference_loop
from helpers import install_stand_in_capture
from tolerances import assert_deep, tol

CFG = PRESETS["tiny"]


def _model(device="cpu", seed=0):
    torch.manual_seed(seed)
    return UNet(CFG.unet).eval().to(device)


def _table(sampler, n):
    s = Schedule(CFG.diffusion)
    ts = s.timesteps(n)
    return ts, (s.ddim_coeffs(ts, 0.5) if sampler == "ddim" else s.ddpm_coeffs(ts, "labml"))


def _x_T(batch, device, seed=3):
    g = torch.Generator().manual_seed(seed)
    s = CFG.unet.image_size
    return torch.randn(batch, CFG.unet.image_channels, s, s, generator=g).to(device)



def _run(loop, model, x_T, ts, coeffs, seed, **kw):
    with torch.inference_mode():
        return loop(model, x_T, ts, coeffs.to(x_T.device), generator=torch.Generator().manual_seed(seed),
                    progress=False, **kw)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("fuse", [False, True], ids=["cpu-path", "fused-path"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_fast_loop_matches_reference_trajectory_with_injected_noise_cpu(sampler, fuse, channels_last):
    # fused-path: the GPU's step structure (fused UNet through the op dispatcher, the time table,
    # the in-place C++ step on a device-side step index), without the graph, on CPU kernels.
    # nhwc: the activation layout the GPU uses in fp16/bf16 (every op must accept and keep it).
    model = _model()
    ts, coeffs = _table(sampler, 20)
    x_T = _x_T(2, "cpu")
    ref = _run(reference_loop, model, x_T, ts, coeffs, seed=7)
    fast = _run(fast_loop, model, x_T, ts, coeffs, seed=7, noise="generator", n_steps=CFG.diffusion.n_steps,
                fuse=fuse, channels_last=channels_last)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, ref, **tol("fast_loop_fp32", torch.float32))
    assert not ddpm_fast.ops.is_fused(model), "fast_loop must leave the caller's model unfused"
    assert all(p.is_contiguous() for p in model.parameters()), "fast_loop must not change the caller's layout"


@pytest.mark.parametrize("dtype,batch,channels_last,program,fuses", [
    ("fp32", 16, False, False, True), ("fp32", 16, True, False, True), ("fp32", 1, False, False, False),
    ("fp32", 4, False, False, False), ("fp32", 4, True, False, True), ("fp32", 1, True, False, False),
    ("bf16", 1, True, False, True), ("bf16", 16, False, False, False), ("fp16", 16, True, False, False),
    ("fp32", 1, False, True, True), ("fp32", 1, True, True, True), ("bf16", 1, False, True, True),
    ("fp16", 16, True, True, False)])
def test_cpu_default_fuses_where_it_measured_faster_cpu(dtype, batch, channels_last, program, fuses):
    # The CPU default of `fuse` (fast_loop.cpu_fuses): what forward sees is the fused UNet exactly where
    # the rule says, and the caller's model is left unfused either way.
    from ddpm_fast.devices import DTYPE_NAMES, cpu_has_native_bf16
    from ddpm_fast.ops.groupnorm_swish import HAS_CPP_KERNEL
    from ddpm_fast.sampling.fast_loop import CPU_FUSE_MIN_BATCH, cpu_fuses

    dt = DTYPE_NAMES[dtype]
    assert HAS_CPP_KERNEL, "build ddpm_fast._C (python setup.py build_ext --inplace)"
    if dtype == "bf16" and not cpu_has_native_bf16():
        fuses = False  # bf16 fuses only where it is native (and was measured)
    if (dtype, batch, channels_last, program) == ("fp32", 4, True, False) and not ddpm_fast.ops.CPU_PACKED_CONVS:
        fuses = False  # fp32 NHWC fuses from batch 4 only with the packed convs
    assert cpu_fuses(dt, batch, channels_last, CFG.unet.image_size ** 2, program) is fuses
    assert CPU_FUSE_MIN_BATCH == 16
    seen = []
    model = _model().to(dt)
    model.register_forward_pre_hook(lambda m, args: seen.append(ddpm_fast.ops.is_fused(m)))
    ts, coeffs = _table("ddpm", 2)
    # cpu_split=False: one forward per step whatever the thread count (tests/test_cpu_split.py has the split).
    _run(fast_loop, model, _x_T(batch, "cpu"), ts, coeffs, seed=1, dtype=dt, channels_last=channels_last,
         n_steps=CFG.diffusion.n_steps, cpu_split=False, cpu_program=program)
    assert seen == [fuses, fuses]  # (a hook turns the default program off; with one it sees the recorded step)
    assert not ddpm_fast.ops.is_fused(model)


def test_cpu_default_fp32_nhwc_fuses_by_pixels_per_batch_cpu(monkeypatch):
    import ddpm_fast.sampling.fast_loop as fl

    monkeypatch.setattr(fl, "_GN_CPP", True)
    if not ddpm_fast.ops.CPU_PACKED_CONVS:
        pytest.skip("this torch build lacks oneDNN's packed-conv ops")
    assert fl.cpu_fuses(torch.float32, 1, True, 32 * 32) and not fl.cpu_fuses(torch.float32, 3, True, 16 * 16)
    assert fl.cpu_fuses(torch.float32, 4, True, 16 * 16) and not fl.cpu_fuses(torch.float32, 1, False, 256 * 256)


def test_cpu_default_without_the_cpp_kernel_runs_the_reference_unet_cpu(monkeypatch):
    import ddpm_fast.sampling.fast_loop as fl

    monkeypatch.setattr(fl, "_GN_CPP", False)
    assert not fl.cpu_fuses(torch.float32, 64) and not fl.cpu_fuses(torch.bfloat16, 64, True)


def test_cpu_default_bf16_fuses_only_where_bf16_is_native_cpu(monkeypatch):
    import ddpm_fast.sampling.fast_loop as fl

    monkeypatch.setattr(fl, "_GN_CPP", True)
    monkeypatch.setattr(fl, "cpu_has_native_bf16", lambda: False)
    assert not fl.cpu_fuses(torch.bfloat16, 16, True) and fl.cpu_fuses(torch.float32, 16)
    monkeypatch.setattr(fl, "cpu_has_native_bf16", lambda: True)
    assert fl.cpu_fuses(torch.bfloat16, 16, True) and not fl.cpu_fuses(torch.bfloat16, 16, False)


@pytest.mark.parametrize("convert", ["dtype", "channels_last"])
def test_converted_copy_inside_inference_mode_gets_a_time_table_cpu(convert):
    # Sampling inside torch.inference_mode with a model that fast_loop must copy (other dtype, or NHWC)
    # and a batch large enough for the time table: the copy must not be made of inference tensors,
    # which have no version counter for the table's staleness check (seen on an H100: every fp16/bf16
    # run failed so).
    model = _model()
    ts, coeffs = _table("ddpm", 10)
    kw = dict(channels_last=True) if convert == "channels_last" else {}
    if convert == "dtype":
        model = _model().double()  # sampled in the default float32: a converted copy
    x_T = _x_T(CFG.diffusion.n_steps // 10 + 1, "cpu")
    out = _run(fast_loop, model, x_T, ts, coeffs, seed=1, n_steps=CFG.diffusion.n_steps, **kw)
    ref = _run(fast_loop, model, x_T, ts, coeffs, seed=1, n_steps=CFG.diffusion.n_steps)
    torch.testing.assert_close(out, ref, **tol("sampling_fp32" if convert == "dtype" else "layout_fp32",
                                               torch.float32))


def test_sample_channels_last_option_cpu():
    # sample(backend="fast", channels_last=True) reaches fast_loop: same seed, same images up to the
    # conv algorithms' summation order, and the caller's model keeps its layout.
    model = _model()

    def run(cl):
        return ddpm_fast.sample(model, batch_size=2, num_inference_steps=5, backend="fast", output_type="pt",
                                generator=torch.Generator().manual_seed(4), progress=False, channels_last=cl)

    torch.testing.assert_close(run(True), run(False), **tol("layout_fp32", torch.float32))
    assert all(p.is_contiguous() for p in model.parameters())


def test_fast_backend_reproducible_from_seed_cpu():
    model = _model()

    def run(seed):
        return ddpm_fast.sample(model, batch_size=2, num_inference_steps=5, backend="fast", output_type="pt",
                                generator=torch.Generator().manual_seed(seed), progress=False)

    a, b, c = run(11), run(11), run(12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (2, 3, 16, 16) and 0.0 <= a.min() and a.max() <= 1.0


def test_fast_loop_rejects_bad_arguments():
    model = _model()
    ts, coeffs = _table("ddpm", 10)
    with pytest.raises(ValueError, match="noise"):
        _run(fast_loop, model, _x_T(1, "cpu"), ts, coeffs, seed=0, noise="bogus")
    with pytest.raises(ValueError, match="rows"):
        _run(fast_loop, model, _x_T(1, "cpu"), ts[:5], coeffs, seed=0)
    with pytest.raises(ValueError, match="cuda_graph"):
        _run(fast_loop, model, _x_T(1, "cpu"), ts, coeffs, seed=0, cuda_graph=True)


class _PlainEps(torch.nn.Module):
    """Not a UNet: any module mapping (x, t) -> eps, as sample() documents (no time table, nothing to fuse)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(CFG.unet.image_channels, CFG.unet.image_channels, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) * (t.to(x.dtype) / CFG.diffusion.n_steps).view(-1, 1, 1, 1)


class _NoParams(torch.nn.Module):
    def forward(self, x, t):
        return 0.1 * x


@pytest.mark.parametrize("make", [_PlainEps, _NoParams], ids=["plain-module", "no-parameters"])
@pytest.mark.parametrize("fuse", [False, True], ids=["cpu-path", "fused-path"])
def test_fast_loop_runs_any_module_cpu(make, fuse):
    # A non-UNet module used to die in _fast_model with AttributeError 'time_table'. It runs without a
    # time table (a batch of 64 would build one for a UNet) and still goes through the fused step.
    torch.manual_seed(0)
    model = make().eval()
    ts, coeffs = _table("ddpm", 20)
    x_T = _x_T(64, "cpu")
    ref = _run(reference_loop, model, x_T, ts, coeffs, seed=7)
    fast = _run(fast_loop, model, x_T, ts, coeffs, seed=7, noise="generator", n_steps=CFG.diffusion.n_steps,
                fuse=fuse)
    torch.testing.assert_close(fast, ref, **tol("fast_loop_fp32", torch.float32))
    assert "time_table" not in vars(model), "fast_loop must not add attributes to the caller's module"


def test_sample_fast_backend_with_a_plain_module_cpu():
    model = _PlainEps()
    out = ddpm_fast.sample(model, config=CFG, batch_size=2, num_inference_steps=5, backend="fast", output_type="pt",
                           generator=torch.Generator().manual_seed(0), progress=False)
    assert out.shape == (2, 3, 16, 16) and out.isfinite().all()
    assert model.training and "time_table" not in vars(model)


def test_fast_loop_checks_the_model_output_once_cpu():
    calls = []

    class OneChannel(_NoParams):
        def forward(self, x, t):
            calls.append(1)
            return x[:, :1]

    ts, coeffs = _table("ddpm", 5)
    with pytest.raises(ValueError, match=r"eps of shape \(1, 1, 16, 16\)"):
        _run(fast_loop, OneChannel(), _x_T(1, "cpu"), ts, coeffs, seed=0)
    assert calls == [1]  # refused at the first step, before the fused step broadcasts anything


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_cuda_graph_replay_equals_eager(sampler):
    model = _model("cuda")
    ts, coeffs = _table(sampler, 25)
    x_T = _x_T(4, "cuda")
    eager = _run(fast_loop, model, x_T, ts, coeffs, seed=5, cuda_graph=False)
    graphed = _run(fast_loop, model, x_T, ts, coeffs, seed=5, cuda_graph=True)
    torch.testing.assert_close(graphed, eager, **tol("graph_vs_eager", torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kept_cuda_graph_serves_a_new_seed_and_x_T(dtype):
    # The second call replays the first call's graph with a new seed and x_T (read from device memory);
    # it must equal a fresh capture for them, and differ from the first run.
    import ddpm_fast.sampling.graphs as graphs

    graphs.clear_graph_cache()
    model = _model("cuda")
    ts, coeffs = _table("ddpm", 10)
    first = _run(fast_loop, model, _x_T(2, "cuda", seed=3), ts, coeffs, seed=1, dtype=dtype)
    assert len(graphs.GRAPHS) == 1
    kept = _run(fast_loop, model, _x_T(2, "cuda", seed=4), ts, coeffs, seed=2, dtype=dtype)
    assert len(graphs.GRAPHS) == 1, "same model, shapes and settings: the kept graph must be reused"
    fresh = _run(fast_loop, model, _x_T(2, "cuda", seed=4), ts, coeffs, seed=2, dtype=dtype, reuse_graph=False)
    torch.testing.assert_close(kept, fresh, **tol("graph_vs_eager", torch.float32))
    assert (kept - first).abs().max() > 0.1
    graphs.clear_graph_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_fast_trajectory_within_tolerance_of_reference_cuda(sampler, dtype):
    """20+ steps with identical injected noise: err(fast, ref64) <= 2 err(ref_dtype, ref64) + floor."""
    model = _model("cuda")
    ts, coeffs = _table(sampler, 24)
    x_T = _x_T(4, "cuda")
    ref64 = _run(reference_loop, model.double(), x_T.double(), ts, coeffs.double(), seed=9,
                 dtype=torch.float64).float()
    model.float()
    ref_dt = _run(reference_loop, model.to(dtype), x_T, ts, coeffs, seed=9, dtype=dtype)
    fast = _run(fast_loop, model, x_T, ts, coeffs, seed=9, dtype=dtype, noise="generator")
    assert torch.isfinite(fast).all()
    assert_deep(fast, ref_dt, ref64, dtype, "fast sampler")


@pytest.mark.parametrize("warmup", [1, 3])
@pytest.mark.parametrize("n_steps", [1, 2, 5])
def test_graphed_bookkeeping_with_stand_in_graph_cpu(monkeypatch, n_steps, warmup):
    """graphs.capture's warm-up / capture / reset logic, on CPU: torch.cuda's stream and graph API is replaced
    by stand-ins whose capture runs the step eagerly and whose replay re-runs it. The replayed loop must
    equal the eager loop: warm-up must not step past the last row (S < warm-up steps) and capture must leave the
    state reset. The real capture runs in the gpu tests above."""
    import contextlib

    import ddpm_fast.sampling.fast_loop as fs
    import ddpm_fast.sampling.graphs as graphs

    class Stream:
        def wait_stream(self, other):
            pass

    state_box = []

    class Graph:
        def replay(self):
            state_box[0].step()

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(graphs, "WARMUP_STEPS", warmup)

    model = _model()
    ts, coeffs = _table("ddpm", n_steps)
    x_T = _x_T(2, "cpu")
    results = []
    with torch.inference_mode():
        for graphed in (False, True):
            state = fs._StepState(model, x_T, ts, coeffs, torch.float32, None, 123, False)
            state_box[:] = [state]
            run = graphs.capture(state) if graphed else state.step
            for _ in range(n_steps):
                run()
            assert int(state.step_index) == n_steps
            results.append(state.x.clone())
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


# --- graphs kept between calls (the cache logic on CPU; the real capture runs in the gpu tests) ----
@pytest.fixture
def stand_in_capture(monkeypatch):
    """fast_loop's graph path on CPU (helpers.install_stand_in_capture); the list of captured states."""
    import ddpm_fast.sampling.graphs as graphs

    graphs.clear_graph_cache()
    yield install_stand_in_capture(monkeypatch)
    graphs.clear_graph_cache()


def _graph_run(model, x_T, ts, coeffs, seed, **kw):
    return _run(fast_loop, model, x_T, ts, coeffs, seed=seed, cuda_graph=True, fuse=True,
                n_steps=CFG.diffusion.n_steps, **kw)


def test_cached_graph_serves_new_seeds_and_inputs_cpu(stand_in_capture):
    model = _model()
    ts, coeffs = _table("ddim", 12)
    x_a, x_b = _x_T(2, "cpu", seed=3), _x_T(2, "cpu", seed=4)
    first = _graph_run(model, x_a, ts, coeffs, seed=1)
    again = _graph_run(model, x_a, ts, coeffs, seed=1)
    assert len(stand_in_capture) == 1, "the second call must reuse the first call's graph"
    assert torch.equal(again, first)
    # New seed and new x_T through the kept graph = a fresh capture with them.
    cached = _graph_run(model, x_b, ts, coeffs, seed=2)
    fresh = _graph_run(model, x_b, ts, coeffs, seed=2, reuse_graph=False)
    assert len(stand_in_capture) == 2 and torch.equal(cached, fresh)
    assert not torch.equal(cached, first)
    # Another schedule of the same length only refills the tables.
    ts2, coeffs2 = _table("ddpm", 12)
    cached = _graph_run(model, x_a, ts2, coeffs2, seed=1)
    assert len(stand_in_capture) == 2
    assert torch.equal(cached, _graph_run(model, x_a, ts2, coeffs2, seed=1, reuse_graph=False))
    assert not ddpm_fast.ops.is_fused(model) and model.time_table is None


def test_cached_graph_is_dropped_when_weights_change_cpu(stand_in_capture):
    model = _model()
    ts, coeffs = _table("ddpm", 6)
    x_T = _x_T(2, "cpu")
    before = _graph_run(model, x_T, ts, coeffs, seed=5)
    with torch.no_grad():
        model.final.bias.add_(0.5)  # in place: same storage, new version
    after = _graph_run(model, x_T, ts, coeffs, seed=5)
    assert len(stand_in_capture) == 2, "a changed weight must force a new capture (and time table)"
    assert not torch.equal(after, before)
    assert torch.equal(after, _graph_run(model, x_T, ts, coeffs, seed=5, reuse_graph=False))


def test_a_fused_optimizer_step_drops_the_kept_graph_cpu(stand_in_capture):
    # fused=True optimizers write parameters without bumping their version counters.
    model = _model()
    ts, coeffs = _table("ddpm", 6)
    x_T = _x_T(2, "cpu")
    before = _graph_run(model, x_T, ts, coeffs, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model(x_T, torch.tensor([3, 4])).square().mean().backward()
    opt.step()
    after = _graph_run(model, x_T, ts, coeffs, seed=5)
    assert len(stand_in_capture) == 2 and not torch.equal(after, before)


def test_fast_backend_with_a_model_made_in_inference_mode_cpu():
    # Inference tensors have no version counter; the time table (S * B >= T here) must still work.
    import dataclasses

    cfg = type(CFG)(CFG.unet, dataclasses.replace(CFG.diffusion, n_steps=12))
    with torch.inference_mode():
        model = UNet(cfg.unet)
    out = ddpm_fast.sample(model, config=cfg, batch_size=1, backend="fast", output_type="pt", progress=False,
                           generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all() and model.time_table is None and not ddpm_fast.ops.is_fused(model)


def test_a_failed_setup_leaves_the_model_as_it_was_cpu(monkeypatch):
    import ddpm_fast.sampling.fast_loop as fs

    model = _model().train()

    def broken(*a, **k):
        raise RuntimeError("table build failed")

    monkeypatch.setattr(fs, "attach_time_table", broken)
    ts, coeffs = _table("ddpm", 20)
    with pytest.raises(RuntimeError, match="table build failed"):
        _run(fast_loop, model, _x_T(64, "cpu"), ts, coeffs, seed=1, fuse=True, n_steps=CFG.diffusion.n_steps)
    assert model.training and all(m.training for m in model.modules())
    assert not ddpm_fast.ops.is_fused(model)


def test_a_float64_model_output_runs_on_the_fast_backend_cpu():
    class Float64Eps(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, x, t):
            return (x * self.w).double()

    ts, coeffs = _table("ddim", 5)
    x_T = _x_T(2, "cpu")
    fast = _run(fast_loop, Float64Eps(), x_T, ts, coeffs, seed=1, noise="generator", n_steps=CFG.diffusion.n_steps)
    ref = _run(reference_loop, Float64Eps(), x_T, ts, coeffs, seed=1)
    torch.testing.assert_close(fast, ref, **tol("fast_loop_fp32", torch.float32))


@pytest.mark.parametrize("convert", [False, True], ids=["same-dtype", "converted-copy"])
def test_kept_graph_goes_with_its_model_cpu(stand_in_capture, convert):
    # The cache must not keep the caller's model (and the graph's memory) alive.
    import gc

    import ddpm_fast.sampling.graphs as graphs

    model = _model()
    ts, coeffs = _table("ddpm", 3)
    _graph_run(model, _x_T(2, "cpu"), ts, coeffs, seed=1, dtype=torch.bfloat16 if convert else torch.float32)
    assert len(graphs.GRAPHS) == 1
    ref = weakref.ref(model)
    del model
    stand_in_capture.clear()
    gc.collect()
    assert ref() is None, "a kept graph must not keep the caller's model alive"
    assert len(graphs.GRAPHS) == 0


def test_graph_cache_keys_and_eviction_cpu(stand_in_capture):
    import ddpm_fast.sampling.graphs as graphs

    model, other = _model(seed=0), _model(seed=1)
    ts, coeffs = _table("ddpm", 4)
    _graph_run(model, _x_T(2, "cpu"), ts, coeffs, seed=1)
    _graph_run(model, _x_T(3, "cpu"), ts, coeffs, seed=1)        # another batch size: another graph
    _graph_run(other, _x_T(2, "cpu"), ts, coeffs, seed=1)        # another model: another graph
    _graph_run(model, _x_T(2, "cpu"), ts, coeffs, seed=1, clip=(-1.0, 1.0))  # clip is baked in
    assert len(stand_in_capture) == 4
    assert len(graphs.GRAPHS) == graphs._GraphCache.MAX_ENTRIES, "least recently used entries are evicted"
    _graph_run(model, _x_T(2, "cpu"), ts, coeffs, seed=1, clip=(-1.0, 1.0))
    assert len(stand_in_capture) == 4, "the most recent entry is still there"
    _graph_run(model, _x_T(2, "cpu"), ts, coeffs, seed=1, reuse_graph=False)
    graphs.clear_graph_cache()
    assert len(graphs.GRAPHS) == 0
