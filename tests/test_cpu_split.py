"""The CPU batch split (ddpm_fast/sampling/cpu_split.py): a model batch run as two halves side by side on
two single-threaded workers gives the whole batch's result, shares the caller's conv-packing cache and
autograd modes, leaves the caller's thread count alone, and is the default only where `split_parts` says."""
import os
import subprocess
import sys
import threading

import pytest
import torch

import ddpm_fast
from ddpm_fast import ops
from ddpm_fast.config import PRESETS
from ddpm_fast.reference import Schedule, UNet
from ddpm_fast.sampling import cpu_split
from ddpm_fast.sampling.cpu_split import SplitForward, split_parts
from ddpm_fast.sampling.fast_loop import fast_loop
from tolerances import tol

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


class _Recorder(torch.nn.Module):
    """eps = 0.5 x + t, recording per call the batch, thread, intra-op threads and autograd modes."""

    def __init__(self, fail_on_batch=None):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.calls, self.fail_on_batch = [], fail_on_batch

    def forward(self, x, t):
        self.calls.append(dict(batch=x.shape[0], thread=threading.current_thread().name,
                               threads=torch.get_num_threads(), grad=torch.is_grad_enabled(),
                               inference=torch.is_inference_mode_enabled(), cache=ops.cpu_conv_cache()))
        if x.shape[0] == self.fail_on_batch:
            raise RuntimeError("boom in one half")
        return x * self.scale + t[:, None, None, None].to(x.dtype)


@pytest.mark.parametrize("batch", [16, 5, 2])
@pytest.mark.parametrize("fuse,channels_last", [(True, True), (False, False)], ids=["fused-nhwc", "reference-nchw"])
def test_split_run_matches_the_whole_batch_cpu(batch, fuse, channels_last):
    model = _model()
    whole = _sample(model, batch, fuse=fuse, channels_last=channels_last, cpu_split=False)
    split = _sample(model, batch, fuse=fuse, channels_last=channels_last, cpu_split=True)
    assert torch.isfinite(split).all() and split.shape == whole.shape
    torch.testing.assert_close(split, whole, **tol("fast_loop_fp32", torch.float32))
    assert not ops.is_fused(model)


def test_halves_run_on_single_threaded_workers_with_the_callers_modes():
    rec = _Recorder()
    x, t = torch.randn(7, 3, 4, 4), torch.arange(7.0)
    before = torch.get_num_threads()
    with torch.no_grad():
        out = SplitForward(rec)(x, t)
    torch.testing.assert_close(out, x * 0.5 + t[:, None, None, None], rtol=0, atol=0)
    assert sorted(c["batch"] for c in rec.calls) == [3, 4]
    assert all(c["thread"].startswith("ddpm_fast-cpu-split") and c["threads"] == 1 for c in rec.calls)
    assert not any(c["grad"] for c in rec.calls) and torch.get_num_threads() == before
    rec.calls.clear()
    with torch.inference_mode():
        SplitForward(rec)(x, t)
    assert all(c["inference"] for c in rec.calls)
    rec.calls.clear()
    SplitForward(rec)(x[:1], t[:1])  # one image: run whole, in the caller's thread
    assert [c["thread"] for c in rec.calls] == [threading.current_thread().name]


def test_workers_are_single_threaded_where_the_caller_has_two_threads():
    # In a fresh process with 2 OpenMP threads (the test run itself may be pinned to 1): each worker runs
    # on one intra-op thread, and the caller keeps 2, also for threads torch starts later.
    code = ("import threading, torch; from ddpm_fast.sampling.cpu_split import SplitForward; seen = []\n"
            "f = lambda x, t: seen.append(torch.get_num_threads()) or x\n"
            "SplitForward(f)(torch.zeros(4, 1), torch.zeros(4)); SplitForward(f)(torch.zeros(4, 1), torch.zeros(4))\n"
            "later = []; th = threading.Thread(target=lambda: later.append(torch.get_num_threads())); th.start()\n"
            "th.join(); print(sorted(seen), torch.get_num_threads(), later)")
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "[1, 1, 1, 1] 2 [2]"


def test_workers_use_the_callers_packing_cache():
    rec = _Recorder()
    x, t = torch.randn(4, 3, 4, 4), torch.arange(4.0)
    SplitForward(rec)(x, t)
    assert [c["cache"] for c in rec.calls] == [None, None], "no scope in the caller: none in the workers"
    rec.calls.clear()
    with ops.cpu_conv_packing():
        scope = ops.cpu_conv_cache()
        SplitForward(rec)(x, t)
    assert len(rec.calls) == 2 and all(c["cache"] is scope for c in rec.calls)
    if not ops.CPU_PACKED_CONVS:
        return
    # A fused channels_last conv in each half packs into that one cache, for the half's input shape.
    conv = torch.nn.Conv2d(32, 32, 3, padding=1).requires_grad_(False)
    net = lambda x, t: ops.conv2d(x, conv.weight, conv.bias, (1, 1), (1, 1))  # noqa: E731
    xb = torch.randn(16, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    with ops.cpu_conv_packing():
        got = SplitForward(net)(xb, torch.zeros(16))
        assert [k[2][0] for k in ops.cpu_conv_cache()] == [8]
    torch.testing.assert_close(got, torch.nn.functional.conv2d(xb, conv.weight, conv.bias, padding=1),
                               **tol("conv2d", torch.float32))


def test_an_error_in_one_half_surfaces_after_both_ran():
    rec = _Recorder(fail_on_batch=3)
    with pytest.raises(RuntimeError, match="boom in one half"):
        SplitForward(rec)(torch.randn(6, 3, 4, 4), torch.arange(6.0))
    assert sorted(c["batch"] for c in rec.calls) == [3, 3]


@pytest.mark.parametrize("threads,dtype,batch,fused,cl,parts", [
    (2, torch.float32, 16, True, True, 2), (2, torch.float32, 64, True, True, 2),
    (2, torch.float32, 8, True, True, 1), (2, torch.bfloat16, 16, True, True, 1),
    (2, torch.float32, 16, False, True, 1), (2, torch.float32, 16, True, False, 1),
    (1, torch.float32, 16, True, True, 1), (4, torch.float32, 16, True, True, 1)])
def test_split_parts_only_where_measured(monkeypatch, threads, dtype, batch, fused, cl, parts):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert split_parts(dtype, batch, fused, cl) == parts


def test_fast_loop_splits_by_default_where_the_rule_says_cpu(monkeypatch):
    import ddpm_fast.sampling.fast_loop as fl

    model = _model()
    halves = []
    model.register_forward_pre_hook(lambda m, args: halves.append(args[0].shape[0]))
    monkeypatch.setattr(fl, "split_parts", lambda *a: 2)
    _sample(model, 6, fuse=True, channels_last=True)
    assert halves == [3, 3] * 4
    halves.clear()
    monkeypatch.setattr(fl, "split_parts", lambda *a: 1)
    _sample(model, 6, fuse=True, channels_last=True)
    assert halves == [6] * 4
    assert cpu_split.SPLIT_MIN_BATCH == 16 and not ddpm_fast.ops.is_fused(model)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_gets_its_own_workers():
    SplitForward(lambda x, t: x)(torch.zeros(2, 1), torch.zeros(2))  # the parent's pool exists
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the split still runs (a dead inherited pool would hang)
        import signal
        signal.alarm(60)
        try:
            out = SplitForward(lambda x, t: x + 1)(torch.zeros(4, 1), torch.zeros(4))
            os._exit(0 if torch.equal(out, torch.ones(4, 1)) else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
