"""The CPU batch split (ddpm_fast/sampling/cpu_split.py): a fast run's images sampled as two halves in two
forked processes give the whole run's images, run single-threaded, report their errors with their own
types, never outlive the call, and are fast_loop's default only where `split_parts` says."""
import os
import signal
import subprocess
import sys

import pytest
import torch

from ddpm_fast import ops
from ddpm_fast.config import PRESETS
from ddpm_fast.reference import Schedule, UNet
from ddpm_fast.sampling import cpu_split
from ddpm_fast.sampling.cpu_split import halves, run_split, split_parts
from ddpm_fast.sampling.fast_loop import fast_loop
from tolerances import tol

pytestmark = pytest.mark.skipif(not cpu_split.CAN_FORK, reason="the CPU batch split forks (Linux only)")
CFG = PRESETS["tiny"]


def _model():
    torch.manual_seed(0)
    return UNet(CFG.unet).eval()


def _x_T(batch):
    s = CFG.unet.image_size
    return torch.randn(batch, CFG.unet.image_channels, s, s, generator=torch.Generator().manual_seed(3))


def _sample(model, batch, **kw):
    s = Schedule(CFG.diffusion)
    ts = s.timesteps(4)
    with torch.inference_mode():
        return fast_loop(model, _x_T(batch), ts, s.ddpm_coeffs(ts, "labml"), seed=11, progress=False,
                         n_steps=CFG.diffusion.n_steps, **kw)


@pytest.mark.parametrize("batch", [16, 5, 2])
@pytest.mark.parametrize("fuse,channels_last,dtype", [(True, True, torch.float32), (False, False, torch.float32),
                                                      (True, True, torch.bfloat16)], ids=["fused-nhwc", "reference-nchw", "bf16"])
def test_split_run_matches_the_whole_batch_cpu(batch, fuse, channels_last, dtype):
    model = _model()
    kw = dict(fuse=fuse, channels_last=channels_last, dtype=dtype)
    whole = _sample(model, batch, cpu_split=False, **kw)
    split = _sample(model, batch, cpu_split=True, **kw)
    assert torch.isfinite(split).all() and split.shape == whole.shape and split.dtype == torch.float32
    torch.testing.assert_close(split, whole, **tol("fast_loop_fp32", torch.float32))
    assert not ops.is_fused(model)


def test_halves_split_the_batch():
    assert halves(16) == [(0, 8), (8, 16)] and halves(5) == [(0, 2), (2, 5)] and halves(2) == [(0, 1), (1, 2)]


def test_each_half_runs_in_its_own_single_threaded_process():
    # In a fresh process with 2 OpenMP threads (this test run may be pinned to 1): each child runs on one
    # intra-op thread in its own process, counts its steps, and the parent keeps its 2 threads.
    code = ("import os, torch; from ddpm_fast.sampling.cpu_split import run_split\n"
            "def half(lo, hi, tick):\n"
            "    [tick() for _ in range(3)]\n"
            "    return torch.tensor([[lo, hi, torch.get_num_threads(), os.getpid()]] * (hi - lo), dtype=torch.float32)\n"
            "out = run_split(half, torch.Size([4, 4]), 3, progress=False)\n"
            "pids = set(out[:, 3].tolist())\n"
            "print(out[:, :3].tolist(), len(pids), os.getpid() in pids, torch.get_num_threads())")
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = "[[0.0, 2.0, 1.0], [0.0, 2.0, 1.0], [2.0, 4.0, 1.0], [2.0, 4.0, 1.0]]"
    assert out.stdout.strip().split("\n")[-1] == f"{rows} 2 False 2"


def test_a_childs_error_is_raised_in_the_parent_with_its_type():
    def half(lo, hi, tick):
        if lo > 0:
            raise ValueError(f"boom in images {lo}-{hi}")
        return torch.zeros(hi - lo, 3)

    with pytest.raises(ValueError, match="boom in images 3-6") as info:
        run_split(half, torch.Size([6, 3]), 1, progress=False)
    assert "Traceback" in str(info.value.__cause__)

    class Unpicklable(Exception):
        def __reduce__(self):
            raise TypeError("no")

    def half2(lo, hi, tick):
        raise Unpicklable("local class")

    with pytest.raises(RuntimeError, match=r"(?s)images \[0, 3\) ended with exit status 1.*Unpicklable: local class"):
        run_split(half2, torch.Size([6, 3]), 1, progress=False)


def test_a_child_killed_by_a_signal_is_an_error():
    def half(lo, hi, tick):
        if lo == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(hi - lo, 2)

    with pytest.raises(RuntimeError, match=r"images \[0, 1\) ended with exit status -9"):
        run_split(half, torch.Size([3, 2]), 1, progress=False)


def test_an_interrupted_parent_leaves_no_child(monkeypatch):
    seen = []

    def interrupted(children, *a):
        seen.extend(pid for pid, _ in children)
        raise KeyboardInterrupt

    monkeypatch.setattr(cpu_split, "_wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_split(lambda lo, hi, tick: __import__("time").sleep(60), torch.Size([2, 1]), 1, progress=False)
    assert len(seen) == 2
    for pid in seen:  # killed and reaped: neither running nor a zombie
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


@pytest.mark.parametrize("threads,dtype,batch,fused,cl,parts", [
    (2, torch.float32, 16, True, True, 2), (2, torch.bfloat16, 64, True, True, 2),
    (2, torch.float32, 8, True, True, 1), (2, torch.float16, 16, True, True, 1),
    (2, torch.float32, 16, False, True, 1), (2, torch.bfloat16, 16, True, False, 1),
    (1, torch.float32, 16, True, True, 1), (4, torch.float32, 16, True, True, 1)])
def test_split_parts_only_where_measured(monkeypatch, threads, dtype, batch, fused, cl, parts):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert split_parts(dtype, batch, fused, cl) == parts


def test_fast_loop_splits_by_default_where_the_rule_says_cpu(monkeypatch):
    import ddpm_fast.sampling.fast_loop as fl

    calls = []
    real = fl.run_split
    monkeypatch.setattr(fl, "run_split", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    model = _model()
    monkeypatch.setattr(fl, "split_parts", lambda *a: 2)
    split = _sample(model, 6, fuse=True, channels_last=True)
    assert calls == [torch.Size([6, 3, 16, 16])]
    _sample(model, 6, fuse=True, channels_last=True, noise="generator", generator=torch.Generator())
    assert len(calls) == 1, "noise='generator' draws the whole batch's noise in order: never split"
    monkeypatch.setattr(fl, "split_parts", lambda *a: 1)
    torch.testing.assert_close(_sample(model, 6, fuse=True, channels_last=True), split, **tol("fast_loop_fp32", torch.float32))
    assert len(calls) == 1 and not ops.is_fused(model)
    with pytest.raises(ValueError, match="noise='philox'"):
        _sample(model, 6, cpu_split=True, noise="generator", generator=torch.Generator())
    with pytest.raises(ValueError, match="2 or more images"):
        _sample(model, 1, cpu_split=True)


def test_an_oversized_child_report_comes_back_as_its_traceback():
    def half(lo, hi, tick):
        raise ValueError("x" * 100_000)  # pickled, far over what a child may write into its pipe

    with pytest.raises(RuntimeError, match=r"images \[0, 1\) ended with exit status 1:\nx{1000}") as info:
        run_split(half, torch.Size([2, 1]), 1, progress=False)
    assert len(str(info.value)) < cpu_split._REPORT_MAX  # the traceback's end, not a cut pickle
