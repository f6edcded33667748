"""Benchmark plumbing shared by every bench_<op>.py, bench_unet.py and bench_sampling.py.

pytest-benchmark times wall clock, so `run_bench` synchronizes CUDA inside the timed call; on CUDA,
for calls short enough to repeat many times, it takes the median of `triton.testing.do_bench`
(CUDA events, warm-up, many repeats) for the microsecond numbers. Every benchmark records its
byte/FLOP count and the achieved GB/s or TFLOP/s in extra_info, its provider, and a group that
puts the providers of one case side by side (pytest-benchmark's table and `ddpm-fast bench-report`).

With `--benchmark-disable` (the CI smoke test) each benchmark calls its function exactly once.

Environment knobs (GPU runs pick a subset with them; see benchmarks/README.md):
  DDPM_FAST_BENCH_FULL=1        the full grid (all presets, batches, dtypes, max-autotune)
  DDPM_FAST_BENCH_PRESETS=a,b   DDPM_FAST_BENCH_BATCHES=1,64   DDPM_FAST_BENCH_DTYPES=fp32,bf16
  DDPM_FAST_COMPILE_MODE=m      the torch.compile mode of every `compiled` provider (see compile_mode)
  DDPM_FAST_BENCH_ROUND_BUDGET_S=s   seconds of timed rounds per benchmark (default 2 on GPU, 1 on CPU)
"""
import fnmatch
import gc
import os
import platform
import statistics
import sys
import time

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if HAS_CUDA else "cpu"
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
if not HAS_CUDA:
    # One intra-op thread by default on CPU: on a small shared machine, OpenMP workers spinning for
    # cores that other processes hold made single calls 10-50x slower and the medians meaningless
    # (measured on the 2-core dev box: a tiny-UNet forward 15 ms with 1 thread, 0.5-3 s with 2 under
    # load). Every provider gets the same threads, so ratios stay fair; DDPM_FAST_BENCH_THREADS=N
    # overrides, and the JSON's machine_info records the count.
    torch.set_num_threads(int(os.environ.get("DDPM_FAST_BENCH_THREADS", "1")))

FULL = os.environ.get("DDPM_FAST_BENCH_FULL", "0") == "1"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Per-benchmark time budget for the timed rounds when the caller gives no `rounds` (seconds). On CUDA the
# median of a short call comes from do_bench; the rounds then only feed min and IQR, so a run with a
# deadline (scripts/gpu_check.sh) lowers this.
_ROUND_BUDGET_S = float(os.environ.get("DDPM_FAST_BENCH_ROUND_BUDGET_S", "") or (2.0 if HAS_CUDA else 1.0))
# Calls longer than this are timed by wall clock alone (a do_bench run would repeat them ~8 times).
_DO_BENCH_MAX_S = 0.1


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def env_list(name, default):
    """Comma-separated override of a parameter grid, e.g. DDPM_FAST_BENCH_BATCHES=1,64."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return list(default)
    return [v.strip() for v in raw.split(",") if v.strip()]


def env_cases(default_cases):
    """(preset, batch) pairs: the default grid, or the product of DDPM_FAST_BENCH_PRESETS and
    DDPM_FAST_BENCH_BATCHES when either is set (the other axis then keeps its default values)."""
    presets = env_list("DDPM_FAST_BENCH_PRESETS", [])
    batches = env_list("DDPM_FAST_BENCH_BATCHES", [])
    if not presets and not batches:
        return list(default_cases)
    presets = presets or sorted({p for p, _ in default_cases})
    batches = [int(b) for b in batches] or sorted({b for _, b in default_cases})
    return [(p, b) for p in presets for b in batches]


def op_grid(shapes, measured, batches, dtypes, layouts, what):
    """The grid of an op benchmark: each (preset, *shape) must be one the preset's UNet really feeds the op
    (`measured`: preset -> list of shapes, e.g. from ops.<op>.unet_*_shapes), then the env knobs
    DDPM_FAST_BENCH_PRESETS / _BATCHES / _DTYPES / _LAYOUTS narrow or replace the defaults.
    Returns (shapes, batches as ints, dtypes, layouts)."""
    for preset, *shape in shapes:
        assert tuple(shape) in measured[preset], f"{preset} has no {what} of shape {tuple(shape)}"
    keep = env_list("DDPM_FAST_BENCH_PRESETS", [])
    # "nhwc" is what benchmarks/README.md says; the case ids say "cl" (channels_last).
    chosen = ["cl" if v in ("nhwc", "channels_last") else v for v in env_list("DDPM_FAST_BENCH_LAYOUTS", layouts)]
    bad = [v for v in chosen if v not in ("nchw", "cl")]
    assert not bad, f"DDPM_FAST_BENCH_LAYOUTS: unknown layout(s) {bad}; use nchw and/or nhwc"
    return ([s for s in shapes if not keep or s[0] in keep],
            [int(b) for b in env_list("DDPM_FAST_BENCH_BATCHES", batches)],
            env_list("DDPM_FAST_BENCH_DTYPES", dtypes), chosen)


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------
def _cpu_peak_bytes(fn):
    """Peak bytes held through PyTorch's CPU allocator during fn(), above the level at its start.

    Read from the profiler's allocation events (each carries the allocator's running total), so
    every tensor and every at::empty workspace of an ATen/C++ kernel counts, in order; memory a
    library allocates on its own (oneDNN scratch, OpenMP stacks, Python objects) does not.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    alloc_tag = torch._C._profiler._EventType.Allocation
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == alloc_tag and str(node.extra_fields.device).startswith("cpu"):
            e = node.extra_fields
            events.append((node.start_time_ns, int(e.alloc_size), int(e.total_allocated)))
        stack.extend(node.children)
    if not events:
        return out, 0
    events.sort()
    start_level = events[0][2] - events[0][1]
    return out, max(total for _, _, total in events) - start_level


def measure_peak_memory(fn, collect=True):
    """Run fn() once and return (its result, extra_info entries describing its peak memory).

    peak_mem_bytes: working memory the call adds on top of what was live before it (activations,
    workspaces, outputs; not the weights or inputs, nor a pool allocated earlier, e.g. a CUDA
    graph's, which only peak_mem_total_bytes shows). peak_mem_total_bytes (CUDA only): the absolute
    peak of allocated device memory in the process during the call. collect: gc.collect() first, so
    garbage from earlier calls is not in the baseline.
    """
    if collect:
        gc.collect()
    if HAS_CUDA:
        _sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        _sync()
        peak = torch.cuda.max_memory_allocated()
        return out, {"peak_mem_bytes": int(peak - base), "peak_mem_total_bytes": int(peak),
                     "peak_mem_method": "torch.cuda.max_memory_allocated minus allocated before the call"}
    out, delta = _cpu_peak_bytes(fn)
    return out, {"peak_mem_bytes": int(delta),
                 "peak_mem_method": "peak of PyTorch's CPU allocator (profiler allocation events) "
                                    "minus its level before the call"}


# ---------------------------------------------------------------------------------------------
# The timer
# ---------------------------------------------------------------------------------------------
def _param_text(v):
    if isinstance(v, (tuple, list)):
        return "-".join(_param_text(x) for x in v)
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    return str(v)


def _param_id_without(benchmark, key):
    params = benchmark.params or {}
    return "-".join(_param_text(v) for k, v in params.items() if k != key)


def _default_group(benchmark):
    """Group = test function + every parameter but the provider, so providers compare side by side."""
    if benchmark.group is not None:
        return
    base = benchmark.name.split("[", 1)[0]
    rest = _param_id_without(benchmark, "provider")
    benchmark.group = f"{base}[{rest}]" if rest else base


def _finish(benchmark, info, median_ms, nbytes, flops):
    if median_ms is not None:
        info["median_ms"] = median_ms
        if nbytes:
            info["GB/s"] = nbytes / (median_ms * 1e-3) / 1e9
        if flops:
            info["TFLOP/s"] = flops / (median_ms * 1e-3) / 1e12
    if nbytes:
        info["bytes"] = int(nbytes)
    if flops:
        info["flops"] = int(flops)
    info["device"] = torch.cuda.get_device_name() if HAS_CUDA else "cpu"
    benchmark.extra_info.update(info)


def run_bench(benchmark, fn, *, nbytes=None, flops=None, rounds=None, memory=False, warmup=None, **info):
    """Time fn() with pytest-benchmark (synchronized) and record throughput in extra_info.

    nbytes: the fewest bytes the op must move (each input read once, each output written once);
    flops: floating-point operations. memory=True also records peak memory (see
    measure_peak_memory) from one extra, untimed call. rounds: timed rounds; by default as many as
    fit a small time budget (at least 3, or 1 for calls over 2 s). rounds=1 on CUDA times one call and
    reads its memory from that same call (no estimate call: for calls of seconds, a 1000-step sampling
    run). warmup: what to call once before timing (default fn itself): a shorter call that warms the same
    code (a 3-step sampling run before a 1000-step one), or a no-op when the caller has just warmed it.
    Extra keyword arguments go to extra_info as they are; `provider` defaults to the test's `provider`
    parameter, and a provider named plain "compiled" is recorded as "compiled-<mode>" (compile_mode()),
    so every report names the torch.compile mode it measured. For compiled providers, compile_s (the
    warm-up call's time minus the steady-state median) is recorded unless the caller gives it or its own
    warmup.
    Returns fn's last result.
    """
    if "provider" not in info and benchmark.params and "provider" in benchmark.params:
        info["provider"] = benchmark.params["provider"]
    if info.get("provider") == "compiled":
        info["provider"] = compiled_provider_name()
        info.setdefault("compile_mode", compile_mode())
    _default_group(benchmark)

    if benchmark.disabled:
        # Smoke test: exactly one call (a disabled fixture's pedantic runs its function once),
        # through the same memory path so a broken measurement fails CI too.
        def once():
            if memory:
                res, mem = measure_peak_memory(fn)
                info.update(mem)
                return res
            res = fn()
            _sync()
            return res

        out = benchmark.pedantic(once, rounds=1, iterations=1)
        info["timer"] = "disabled (one smoke call, no timing)"
        _finish(benchmark, info, None, nbytes, flops)
        return out

    t0 = time.perf_counter()
    (warmup or fn)()  # compilation, autotuning, allocator
    _sync()
    warm_s = time.perf_counter() - t0
    if rounds == 1 and HAS_CUDA:
        out = _time_once(benchmark, fn, info, memory)
        median_ms = benchmark.stats.stats.data[0] * 1e3
    else:
        out, median_ms = _time_rounds(benchmark, fn, info, memory, rounds)
    if "compiled" in str(info.get("provider", "")) and "compile_s" not in info and warmup is None:
        info["compile_s"] = max(0.0, warm_s - median_ms * 1e-3)
    _finish(benchmark, info, median_ms, nbytes, flops)
    return out


def _time_once(benchmark, fn, info, memory):
    """One timed call; on CUDA its allocator peak is the memory reading (reading it costs nothing)."""
    gc.collect()
    mem = {}

    def timed():
        if memory:
            res, got = measure_peak_memory(fn, collect=False)
            mem.update(got)
            return res
        res = fn()
        _sync()
        return res

    out = benchmark.pedantic(timed, rounds=1, iterations=1, warmup_rounds=0)
    info.update(mem)
    info["timer"] = "wall clock (pytest-benchmark, one CUDA-synchronized call)"
    return out


def _time_rounds(benchmark, fn, info, memory, rounds):
    """An estimate call (on CUDA also the memory call), then do_bench for short CUDA calls and
    pytest-benchmark's rounds. Returns (fn's last result, median ms)."""
    # One more untimed call estimates the duration (for do_bench and the round count); on CUDA it
    # is also the memory call (reading the allocator's peak costs nothing), which spares a long
    # benchmark (a 1000-step sampling loop) a call. The CPU memory path runs under the profiler,
    # so there it is a call of its own.
    gc.collect()
    t0 = time.perf_counter()
    if memory and HAS_CUDA:
        _, mem = measure_peak_memory(fn, collect=False)
        info.update(mem)
    else:
        fn()
        _sync()
    est_s = time.perf_counter() - t0
    if memory and not HAS_CUDA:
        _, mem = measure_peak_memory(fn)
        info.update(mem)

    median_ms = None
    if HAS_CUDA and est_s < _DO_BENCH_MAX_S:
        import triton.testing

        median_ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        info["timer"] = "cuda-events (triton.testing.do_bench median)"
    else:
        info["timer"] = "wall clock (pytest-benchmark median" + (", CUDA-synchronized)" if HAS_CUDA else ")")

    def timed():
        out = fn()
        _sync()
        return out

    if rounds is None:
        floor = 1 if est_s > 2.0 else 3
        rounds = max(floor, min(50, int(_ROUND_BUDGET_S / max(est_s, 1e-6))))
    out = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
    if median_ms is None:
        median_ms = statistics.median(benchmark.stats.stats.data) * 1e3
    return out, median_ms


# How far a benchmarked output may be from the reference's, as a relative L2 error. Loose on purpose:
# exactness is tests/'s job (tests/tolerances.py); this only proves the timed call computed the right
# thing, where a no-op, a stale buffer or a wrong kernel is off by ~1.
CHECK_REL_ERR = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 5e-2}


def check_output(fn, want, what: str, loosen: float = 1.0):
    """Call fn() once more, with its output's memory NaN-filled first, and compare with `want`.

    The previous result is filled with NaN and freed just before the call, so the allocator (CUDA's
    caching allocator, and the CPU's for a same-sized request) hands the same block to the new output,
    and a CUDA-graph provider's static output buffer is NaN until the replay writes it: a kernel that
    writes nothing fails instead of passing on a previous provider's answer. Tensors or lists of them.
    loosen: a factor on CHECK_REL_ERR for deep compositions (a whole UNet in 16 bits).
    """
    def each(v):
        return list(v) if isinstance(v, (list, tuple)) else [v]

    old = fn()
    _sync()
    with torch.inference_mode():  # outputs made under inference mode can only be written there
        for t in each(old):
            t.fill_(float("nan"))
    del old
    got = fn()
    _sync()
    for g, w in zip(each(got), each(want), strict=True):
        assert g.shape == w.shape, f"{what}: output shape {tuple(g.shape)} != {tuple(w.shape)}"
        g64, w64 = g.double(), w.double()
        assert bool(torch.isfinite(g64).all()), f"{what}: non-finite output"
        err = float((g64 - w64).norm() / w64.norm().clamp_min(1e-30))
        bound = CHECK_REL_ERR.get(g.dtype, 1e-4) * loosen
        assert err <= bound, f"{what}: relative error {err:.3g} against the reference (bound {bound})"
    return got


@pytest.fixture(autouse=True)
def _jsonl_row(request):
    """After each timed benchmark test (teardown, so extra_info a test adds after run_bench is in),
    append its result to DDPM_FAST_BENCH_JSONL."""
    # Requested here, at setup, so that pytest tears the benchmark fixture down after this one.
    benchmark = request.getfixturevalue("benchmark") if "benchmark" in request.fixturenames else None
    yield
    if benchmark is not None and benchmark.extra_info.get("median_ms") is not None:
        _append_jsonl(benchmark)


def _append_jsonl(benchmark):
    """DDPM_FAST_BENCH_JSONL=path: append this result as one JSON line as soon as its test ends.
    pytest-benchmark writes its JSON only when the session ends, so a run cut off by a time limit
    (a leased GPU's) would otherwise keep nothing."""
    path = os.environ.get("DDPM_FAST_BENCH_JSONL")
    if not path:
        return
    import json

    row = {"name": benchmark.name, "fullname": benchmark.fullname, "group": benchmark.group,
           "extra_info": dict(benchmark.extra_info), "machine": _machine_info()}
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


@pytest.fixture
def fresh_compile_state():
    """Opt-in (request it by name): after the test, drop compiled graphs, CUDA graph pools and cached
    blocks. Each UNet test compiles a fresh model; without a reset, dynamo's per-function cache limit
    would soon make torch.compile fall back to eager silently (timing the wrong thing), and earlier
    tests' pools would inflate the next test's memory totals."""
    yield
    if "ddpm_fast.sampling.graphs" in sys.modules:  # the fast backend's kept sampling graphs (and pools)
        sys.modules["ddpm_fast.sampling.graphs"].clear_graph_cache()
    if HAS_CUDA:  # the compile providers exist on GPU only; importing dynamo on CPU is wasted time
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()


# torch.compile modes a `compiled` provider runs in; "default" is torch's own (mode=None).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# reduce-overhead (inductor + CUDA graphs) is the fair rival of the graphed fast path and its compile fits
# a device call (~20 s per cifar35m UNet on the H100, default mode). max-autotune also replays CUDA
# graphs but autotunes every conv/matmul shape: minutes per UNet, so it gets a call of its own
# (DDPM_FAST_COMPILE_MODE=max-autotune, see scripts/gpu_check.sh).
DEFAULT_COMPILE_MODE = "reduce-overhead"


def compile_mode() -> str:
    """The mode of every `compiled` provider: DDPM_FAST_COMPILE_MODE, default DEFAULT_COMPILE_MODE."""
    mode = os.environ.get("DDPM_FAST_COMPILE_MODE", "").strip() or DEFAULT_COMPILE_MODE
    if mode not in COMPILE_MODES:
        raise ValueError(f"DDPM_FAST_COMPILE_MODE={mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    return mode


def compiled_provider_name(mode=None) -> str:
    """What a compiled provider is recorded as: "compiled-<mode>", e.g. compiled-reduce-overhead."""
    return f"compiled-{mode or compile_mode()}"


def compiled(fn, mode=None):
    """torch.compile of a reference function or module: the real bar for the fast path (GPU only).

    mode: one of COMPILE_MODES; None takes compile_mode() (DDPM_FAST_COMPILE_MODE).
    """
    mode = mode or compile_mode()
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown torch.compile mode {mode!r}; choose one of {COMPILE_MODES}")
    return torch.compile(fn, fullgraph=True, dynamic=False, mode=None if mode == "default" else mode)


def timed_call_s(fn) -> float:
    """Seconds of one synchronized fn() call (e.g. the first call of a compiled model: its compile)."""
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


PROVIDERS = ["reference", "compiled", "fast"] if HAS_CUDA else ["reference", "fast"]


def copy_gbs(nbytes):
    """GB/s of a plain device-to-device copy that moves `nbytes` in all (nbytes / 2 read, as many
    written): the bandwidth ceiling for a memory-bound op moving the same bytes (CUDA events, median)."""
    import triton.testing

    src = torch.empty(max(1, int(nbytes) // 2), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def cuda_graphed(fn):
    """fn captured once in a CUDA graph; the returned callable replays it and returns its output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: Triton compiles, cuBLAS picks kernels
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out

    return replay


# ---------------------------------------------------------------------------------------------
# pytest hooks
# ---------------------------------------------------------------------------------------------
def pytest_collect_file(file_path, parent):
    """Collect bench_*.py here: the project's python_files only names test_*.py."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    patterns = parent.config.getini("python_files")
    if parent.session.isinitpath(file_path) or any(fnmatch.fnmatch(file_path.name, p) for p in patterns):
        return None  # pytest's own collector takes it; a second Module would run it twice
    return pytest.Module.from_parent(parent, path=file_path)


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pytest_benchmark_update_machine_info(config, machine_info):
    """Name the software and hardware in the JSON, so a report can say what it measured on."""
    machine_info["ddpm_fast"] = _machine_info()


def _machine_info() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional; any import failure means "absent"
        triton_version = None
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if HAS_CUDA else None,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "bench_full": FULL,
    }


def count_flops(fn):
    """FLOPs of one fn() call as torch.utils.flop_counter counts them (2 per multiply-add of every
    conv, matmul, linear and SDPA; norms, activations and elementwise ops count 0). Count on the
    reference: a fused custom op hides its matmuls from the counter, and the work is the same."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def count_cuda_kernels(fn) -> int:
    """GPU kernels one fn() call runs, from torch.profiler's device activity (kernels replayed from a
    CUDA graph included: CUPTI records each graph node). Memory copies and memsets are not counted."""
    from torch.profiler import ProfilerActivity, profile

    _sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync()
    return sum(1 for ev in prof.events()
               if ev.device_type == torch.autograd.DeviceType.CUDA
               and not ev.name.lower().startswith(("memcpy", "memset")))
