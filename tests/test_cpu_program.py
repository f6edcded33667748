"""CPU step programs (ddpm_fast/ops/_cpu_program.py): a recorded forward replays the same calls, so the
same bits as eager; it refuses inputs of another signature and changed weights; the C++ kernels' direct
bindings are recorded as units; forwards a program cannot name are not recorded; the fast loop records
its UNets by default, follows a weight changed mid-run and samples the same images with or without it.
"""
import collections
import importlib

import pytest
import torch
from torch import nn

from helpers import CL, poison

from ddpm_fast import ops
from ddpm_fast.config import PRESETS, DDPMUNetConfig
from ddpm_fast.reference import DDPMUNet, Schedule, UNet
from ddpm_fast.sampling import fast_loop as fast_loop_mod
from ddpm_fast.sampling.fast_loop import fast_loop
from ddpm_fast.sampling.time_table import attach_time_table

P = importlib.import_module("ddpm_fast.ops._cpu_program")
GN = importlib.import_module("ddpm_fast.ops.groupnorm_swish")
CFG = PRESETS["tiny"]
DDPM_CFG = DDPMUNetConfig(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 48),
                          down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                          layers_per_block=1, norm_num_groups=8, attention_head_dim=16)


def _unet(kind, dtype, layout):
    torch.manual_seed(0)
    net = (UNet(CFG.unet) if kind == "unet" else DDPMUNet(DDPM_CFG)).eval().to(dtype).to(memory_format=layout)
    with torch.inference_mode():
        attach_time_table(net, 1000)
    return net


def _inputs(net, batch, dtype, layout, seed=1):
    cfg = net.config
    size = cfg.image_size if hasattr(cfg, "image_size") else cfg.sample_size
    x = torch.randn(batch, cfg.image_channels, size, size, generator=torch.Generator().manual_seed(seed))
    t = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(seed))
    return x.to(dtype).contiguous(memory_format=layout), t


@pytest.mark.parametrize("kind", ["unet", "ddpm"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("dtype,layout", [(torch.float32, CL), (torch.bfloat16, CL),
                                          (torch.float32, torch.contiguous_format)], ids=["fp32-nhwc", "bf16-nhwc", "fp32-nchw"])
def test_replay_gives_eager_bits_on_fresh_inputs(kind, fuse, dtype, layout):
    net = _unet(kind, dtype, layout)
    if fuse:
        ops.fused(net)
    with torch.inference_mode(), ops.cpu_conv_packing():
        x, t = _inputs(net, 3, dtype, layout)
        net(x, t)  # warm: the packing caches fill on first use
        recorded, program = P.record(net, (x, t), list(net.parameters()))
        assert program is not None, P.why_not
        x2, t2 = _inputs(net, 3, dtype, layout, seed=2)  # new values, same signature
        want, got = net(x2, t2), program(x2, t2)
        assert torch.equal(recorded, net(x, t))
    assert got is not None and torch.isfinite(got).all()
    assert got.dtype == want.dtype and got.stride() == want.stride()
    assert torch.equal(got, want)
    assert program.n_calls > 20


@pytest.mark.parametrize("path", ["out-variant", "allocating"])
def test_the_direct_kernels_are_recorded_as_units(monkeypatch, path):
    """groupnorm_swish's C++ kernel runs through pybind bindings that no torch function mode sees: the
    program must call them. The out-variant writes a buffer allocated in Python (poisoned here: a replay
    without the call would return NaN); the allocating one returns a new tensor each call."""
    if GN._CPP_DIRECT is None or GN._CPP_NEW is None:
        pytest.skip("the C++ groupnorm_swish kernel is not built")
    w, b = torch.randn(32), torch.randn(32)
    monkeypatch.setattr(GN, "_new_output", lambda x: poison(torch.empty_like(x)))
    run = ((lambda x: GN._cpp_call(GN._CPP_DIRECT, x, w, b, 8, 1e-5, None, True)) if path == "out-variant"
           else (lambda x: ops.groupnorm_swish(x, w, b, 8)))
    with torch.inference_mode():
        first, program = P.record(run, (torch.randn(2, 32, 4, 4),))
        x2 = torch.randn(2, 32, 4, 4)
        got = program(x2)
    binding = "groupnorm_swish_out" if path == "out-variant" else "groupnorm_swish_new"
    assert any(getattr(v, "__name__", "") == binding for v in program._run.__globals__.values())
    assert got is not first
    torch.testing.assert_close(got, ops.groupnorm_swish(x2, w, b, 8))


def test_values_are_freed_after_their_last_read():
    """Each intermediate is deleted after its last read (as eager code frees it), not kept to the end."""
    net = ops.fused(_unet("unet", torch.float32, CL))
    with torch.inference_mode(), ops.cpu_conv_packing():
        x, t = _inputs(net, 2, torch.float32, CL)
        net(x, t)
        _, program = P.record(net, (x, t))
    lines = [line.strip() for line in program.source.splitlines()[1:]]
    result = lines[-1].split()[-1]
    assigned, deleted = set(), set()
    for line in lines:
        if line.startswith("del "):
            deleted.update(n.strip() for n in line[4:].split(","))
        elif " = " in line:
            assigned.update(n.strip() for n in line.split(" = ")[0].split(",") if n.strip() not in ("", "_"))
    assert assigned and assigned - deleted == {result}


@pytest.mark.parametrize("change", ["shape", "dtype", "layout"])
def test_an_input_of_another_signature_is_refused(change):
    net = ops.fused(_unet("unet", torch.float32, CL))
    with torch.inference_mode(), ops.cpu_conv_packing():
        x, t = _inputs(net, 2, torch.float32, CL)
        net(x, t)
        _, program = P.record(net, (x, t))
        other = {"shape": lambda: _inputs(net, 3, torch.float32, CL)[0], "dtype": lambda: x.double(),
                 "layout": lambda: x.contiguous()}[change]()
        assert program(other, t if change != "shape" else t.repeat(2)[:3]) is None
        assert program(x, t) is not None


def test_a_weight_changed_in_place_is_refused():
    net = ops.fused(_unet("unet", torch.float32, CL))
    with torch.inference_mode(), ops.cpu_conv_packing():
        x, t = _inputs(net, 2, torch.float32, CL)
        net(x, t)
        _, program = P.record(net, (x, t), list(net.parameters()))
        assert program(x, t) is not None
    with torch.no_grad():
        net.final.weight.mul_(2)
    with torch.inference_mode():
        assert program(x, t) is None


def test_a_forward_returning_its_input_or_unnamed_tensors_is_not_recorded():
    x = torch.randn(3)
    assert P.record(lambda x: x, (x,))[1] is None and "result" in P.why_not
    out, program = P.record(lambda x: {"y": x + 1}["y"] * 2, (x,))  # a dict built in Python: its tensor was named
    assert program is not None and torch.equal(program(x), out)
    # A unit (a call the mode cannot see into) returning tensors in a dict or a nested tuple, or taking
    # one in a dict: the program could not name them.
    out, program = P.record(lambda x: P.unit(lambda v: {"y": v + 1}, (x,))["y"] * 2, (x,))
    assert program is None and "dict" in P.why_not and torch.equal(out, (x + 1) * 2)
    _, program = P.record(lambda x: P.unit(lambda v: ((v + 1,), 2), (x,))[0][0] * 2, (x,))
    assert program is None and "tuple" in P.why_not
    _, program = P.record(lambda x: P.unit(lambda d: d["v"] + 1, ({"v": x},)), (x,))
    assert program is None and "dict" in P.why_not
    pair = collections.namedtuple("Pair", "a b")  # a tuple subclass: not written back as a plain tuple
    _, program = P.record(lambda x: P.unit(lambda p: p.a * 2, (pair(x + 1, 0),)), (x,))
    assert program is None and "Pair" in P.why_not
    # A value nested deeper in a tuple argument is still the value, not a constant baked in.
    _, program = P.record(lambda x: P.unit(lambda nested: nested[0][0] * 2, (((x,), 3),)), (x,))
    x2 = torch.randn(3)
    assert program is not None and torch.equal(program(x2), x2 * 2)


def test_recordings_do_not_nest():
    x = torch.randn(3)
    with pytest.raises(RuntimeError, match="already in progress"):
        P.record(lambda x: P.record(lambda y: y + 1, (x,))[0], (x,))
    assert P.recording() is None


def _sample(model, **kw):
    s = Schedule(CFG.diffusion)
    ts = s.timesteps(6)
    c, size = CFG.unet.image_channels, CFG.unet.image_size
    x_T = torch.randn(4, c, size, size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        return fast_loop(model, x_T, ts, s.ddpm_coeffs(ts, "labml"), seed=11, progress=False,
                         n_steps=CFG.diffusion.n_steps, **kw)


@pytest.mark.parametrize("fuse,channels_last,dtype,model_batch", [
    (True, True, torch.float32, None), (False, False, torch.float32, None), (True, True, torch.bfloat16, None),
    (True, False, torch.float32, 3)], ids=["fused-nhwc", "reference-nchw", "bf16", "model-batch-3"])
def test_fast_loop_samples_the_same_images_with_a_program(monkeypatch, fuse, channels_last, dtype, model_batch):
    records = []
    real = ops.record_cpu_program
    monkeypatch.setattr(ops, "record_cpu_program", lambda *a, **k: records.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = UNet(CFG.unet).eval()
    kw = dict(fuse=fuse, channels_last=channels_last, dtype=dtype, cpu_split=False, model_batch=model_batch)
    eager = _sample(model, cpu_program=False, **kw)
    assert not records
    replayed = _sample(model, **kw)  # the default for this package's UNet
    assert records == [1] and torch.equal(replayed, eager)


@pytest.mark.skipif(not importlib.import_module("ddpm_fast.sampling.cpu_split").CAN_FORK, reason="forks (Linux)")
def test_each_split_half_replays_its_own_program():
    torch.manual_seed(0)
    model = UNet(CFG.unet).eval()
    kw = dict(fuse=True, channels_last=True, cpu_split=True)
    assert torch.equal(_sample(model, cpu_program=True, **kw), _sample(model, cpu_program=False, **kw))


def test_fast_loop_follows_a_weight_changed_mid_run(monkeypatch):
    """A weight changed in place between steps (here from the progress hook) makes the replay refuse; the
    step runs eager (repacking the weight) and is recorded again, as an eager run would sample."""
    torch.manual_seed(0)
    model = UNet(CFG.unet).eval()

    def run(program):
        calls = []
        real = fast_loop_mod._StepState.step

        def step(state):
            real(state)
            calls.append(1)
            if len(calls) == 4:
                with torch.inference_mode(False), torch.no_grad():
                    state.net.final.weight.mul_(0.5)
        monkeypatch.setattr(fast_loop_mod._StepState, "step", step)
        out = _sample(model, fuse=True, channels_last=True, cpu_split=False, cpu_program=program)
        monkeypatch.undo()
        return out

    before = model.final.weight.detach().clone()
    eager, replayed = run(False), run(True)
    assert torch.equal(replayed, eager)
    assert torch.equal(model.final.weight, before)  # the run worked on its converted copy


def test_the_default_is_cpu_and_this_packages_unets_only():
    class Wrapper(nn.Module):
        pass
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert fast_loop_mod._program_choice(None, UNet(CFG.unet), cpu)
    assert fast_loop_mod._program_choice(None, DDPMUNet(DDPM_CFG), cpu)
    assert not fast_loop_mod._program_choice(None, Wrapper(), cpu)
    assert not fast_loop_mod._program_choice(None, UNet(CFG.unet), meta)
    assert fast_loop_mod._program_choice(True, Wrapper(), cpu)
    hooked = UNet(CFG.unet)
    hooked.down[0].register_forward_hook(lambda *a: None)  # replays would skip it: no program by default
    assert not fast_loop_mod._program_choice(None, hooked, cpu) and fast_loop_mod._program_choice(True, hooked, cpu)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda *a: None)
    try:
        assert not fast_loop_mod._program_choice(None, UNet(CFG.unet), cpu)
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="cpu_program=True needs CPU tensors"):
        fast_loop_mod._program_choice(True, UNet(CFG.unet), meta)
