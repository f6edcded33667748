"""The fast sampling loop: fused UNet + fused reverse step, the whole step captured in one CUDA graph.

Why a graph: at small batch a UNet step is hundreds of short kernels and the GPU idles between
launches. Every launch of a step here is independent of t on the host: the step index lives in a
device tensor that the graph itself increments, the UNet's time path is a row lookup into the
precomputed time-projection table, the reverse step gathers its coefficient row on the device and
draws its noise in-kernel from Philox keyed by (seed, step, element). So one capture replays every step.

On CPU there is no graph. Its stand-in is a CPU program (ops/_cpu_program.py): the second step's UNet
forward is recorded and every later step replays the recorded calls without the Python around them
(module calls, argument checks, cache probes: ~15-20% of a step). The loop runs the C++ reverse step
(in-kernel noise, no torch.randn), the time table when it saves work, and the fused UNet where that
measured faster (`cpu_fuses`), with the C++ CPU kernels built: with a program (this package's UNets)
fp32 always and bf16 where the CPU has native bf16; without one, fp32 at model batches of
CPU_FUSE_MIN_BATCH or more (in channels_last from CPU_FUSE_MIN_PIXELS_CL pixels per model batch) and
bf16 in channels_last where native, since there the fused ops' Python wrappers cost more than the C++
kernels save at small batches. A fused CPU run packs its channels_last conv weights for oneDNN once per
call (ops/_cpu_conv.py) instead of on every conv, and with two threads a fused channels_last run of 16
or more images samples them as two halves side by side, one process per core (sampling/cpu_split.py).
See benchmarks/PERF_NOTES.md.

Any other nn.Module mapping (x, t) -> eps runs too, as sample() promises: without a time table (it
needs the UNet's time path) and with only the UNet blocks it contains fused, but with the fused step.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from typing import Callable, Optional, Tuple

import torch
from tqdm.auto import tqdm

from .. import ops
from ..devices import cpu_has_native_bf16
from ..ops.groupnorm_swish import HAS_CPP_KERNEL as _GN_CPP
from ..ops.reverse_step import EXTENSION_HAS_CUDA, seed_arg
from ..reference import DDPMUNet, UNet
from .checks import model_forward, prepared, randn_images
from .cpu_split import run_split, split_parts
from .graphs import GRAPHS, cache_key, capture
from .time_table import attach_time_table, detach_time_table

NOISE_MODES = ("philox", "generator")
# Where fast_loop may capture a graph (the CPU tests add "cpu", with a stand-in for the capture).
_GRAPH_DEVICE_TYPES = ("cuda",)
# When the fused UNet beat the reference UNet on the dev CPU (2-core Xeon VM with AVX-512 + AMX, both
# threads, medians of interleaved forwards, benchmarks/results/cpu-2026-12-02-unet.md). fp32, fused vs
# reference in the same layout (NCHW / NHWC): at batch 16 digits16 1.03x / 1.01x, cifar35m 1.08x / 1.05x;
# at batch 1 digits16 0.97x / 0.90x (the wrappers' Python costs more than the C++ kernels save), cifar35m
# 1.02x / 1.00x. No batch in between was measured, so the threshold is the measured point. bf16: fused
# NHWC 0.99x / 1.36x the reference NHWC at batch 1 / 16, fused NCHW 0.93x / 0.80x the reference NCHW.
# With the packed convs (ops/_cpu_conv.py, channels_last only; 2-core AMD EPYC VM with AVX-512 +
# AVX512_BF16, medians of interleaved forwards): fp32 fused NHWC vs unfused NHWC, digits16 (16 x 16 images)
# 0.90x at batch 1, 1.15x at batch 4, 1.10x at batch 16; ddpm-cifar10 (32 x 32) 1.05x at batch 1, 1.07x at 4;
# ddpm-256 1.20x at batch 1. bf16 fused NHWC vs unfused NHWC (digits16) 1.40x at batch 1, 1.36x at 16
# (benchmarks/PERF_NOTES.md). So fp32 in channels_last fuses from 1024 pixels per model batch (batch x H x W).
# Those rules are for a run without a CPU program. With one (ops/_cpu_program.py: the wrappers' Python is
# not replayed), the fused UNet beat the reference UNet, both replayed, at every point measured (digits16,
# both threads, 80 interleaved forwards): fp32 batch 1 NHWC / NCHW 1.40x / 1.29x, batch 4 1.39x / 1.24x;
# bf16 batch 1 2.26x / 1.32x, batch 4 2.12x / 1.31x (results/cpu-2026-12-04-program-fuse.md).
CPU_FUSE_MIN_BATCH = 16
CPU_FUSE_MIN_PIXELS_CL = 1024


def cpu_fuses(dtype: torch.dtype, batch: int, channels_last: bool = False, image_pixels: int = 256,
              program: bool = False) -> bool:
    """fast_loop's default `fuse` for a CPU run: only with the C++ groupnorm_swish kernel built. With a CPU
    program (`program`): fp32 always, bf16 on a CPU with native bf16. Without: fp32 at a model batch of
    at least CPU_FUSE_MIN_BATCH, or in channels_last (where the convs run packed) at batch x image_pixels
    (H x W; default 256, a 16 x 16 image) >= CPU_FUSE_MIN_PIXELS_CL; bf16 in channels_last on a CPU with
    native bf16. Each where it measured faster."""
    if not _GN_CPP:
        return False
    if dtype == torch.float32:
        if program:
            return True
        if channels_last and ops.CPU_PACKED_CONVS:
            return batch * image_pixels >= CPU_FUSE_MIN_PIXELS_CL
        return batch >= CPU_FUSE_MIN_BATCH
    # Measured only where bf16 is native (AVX512_BF16 / AMX); elsewhere torch emulates it, unmeasured.
    return dtype == torch.bfloat16 and (channels_last or program) and cpu_has_native_bf16()


@contextmanager
def _fast_model(model: torch.nn.Module, dtype: torch.dtype, device: torch.device, n_steps: int,
                fuse: bool, table: bool, channels_last: bool = False):
    """`prepared(model)` (eval mode; a converted copy when dtype, device or layout differ), fused if
    `fuse`, with a fresh time table if `table`; restored afterwards."""
    with prepared(model, dtype, device, channels_last) as model, ExitStack() as stack:
        # Each walk of the module tree costs ~0.1 ms on the tiny UNet, so skip those a call does not need.
        was_fused, old_table = (ops.is_fused(model) if fuse else False), (model.time_table if table else None)
        try:  # everything below is undone by the finally, even when building the table fails
            if fuse:
                ops.fused(model)
            if fuse and device.type == "cpu":  # conv weights packed once for this call (ops/_cpu_conv.py)
                stack.enter_context(ops.cpu_conv_packing())
            if table:
                # Rebuilt on every sampling call: it costs one batched time-MLP pass over T rows, and a fresh
                # table can never be stale whatever happened to the weights since the last call.
                attach_time_table(model, n_steps)
            yield model
        finally:
            if table:
                detach_time_table(model)
                model.time_table = old_table
            if fuse and not was_fused:
                ops.unfused(model)


def fast_loop(model: torch.nn.Module, x_T: torch.Tensor, timesteps: torch.Tensor, coeffs: torch.Tensor, *,
              generator: Optional[torch.Generator] = None, clip: Optional[Tuple[float, float]] = None,
              dtype: Optional[torch.dtype] = None, progress: bool = True, noise: str = "philox",
              seed: Optional[int] = None, cuda_graph: Optional[bool] = None, n_steps: int = 1000,
              fuse: Optional[bool] = None, channels_last: bool = False, reuse_graph: bool = True,
              image_offset: int = 0, model_batch: Optional[int] = None,
              cpu_split: Optional[bool] = None, cpu_program: Optional[bool] = None) -> torch.Tensor:
    """Run the reverse process from x_T over `timesteps` with coefficient rows `coeffs`; returns x_0 (fp32).

    noise="philox": z drawn inside the fused step (seed from `seed`, else drawn from `generator`);
    noise="generator": z drawn from the CPU `generator` per step in the reference sampler's order and
    copied in, so the result matches the reference backend for the same generator (for checking).
    image_offset: the global index of x_T's first image in the Philox key (noise="philox"), held in a
    device tensor so that a kept graph serves every batch of a large run.
    model_batch: run the UNet on chunks of exactly this many images (see sampling.model_forward); it also
    takes the batch's place in the CPU time-table rule, so the choice does not vary with the batch.
    cuda_graph: default True on CUDA when the C++ extension has its CUDA kernel (the reference
    fallback of reverse_step reads the step on the host, which a graph capture cannot do).
    fuse: run the UNet on the fast ops (default: always on CUDA; on CPU where `cpu_fuses` says it
    measured faster). x_t stays fp32 whatever the UNet's dtype.
    channels_last: run the UNet's activations in NHWC (default False; on the GPU it stays opt-in until a
    GPU run has timed it: an H100 profile put cuDNN's NCHW <-> NHWC transposes at ~22% of a step).
    cpu_split: on CPU, sample the images as two halves side by side, one forked process per core,
    each on one intra-op thread (sampling/cpu_split.py; default: where `split_parts` says it measured
    faster; noise="philox" only).
    cpu_program: replay a recording of the UNet's calls after the second step (ops/_cpu_program.py;
    default: on CPU for this package's UNets without forward hooks, which replays would not call; True
    takes any module that issues the same calls every step).
    reuse_graph: keep the captured graph for the next call with the same model (unchanged weights),
    shapes and settings, which then skips the warm-up, the time table and the capture (see
    `clear_graph_cache`); False captures afresh and keeps nothing.
    """
    timesteps = _checked_timesteps(noise, timesteps, coeffs)
    device = x_T.device
    dtype = dtype or torch.float32
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator)) if noise == "philox" else 0
    cuda_graph = _graph_choice(cuda_graph, device)
    on_gpu = device.type == "cuda"
    # The table replaces S per-step time-path passes over B rows by one pass over T rows: on the GPU
    # always worth it (it also makes the step graph-capturable); on CPU when S * B >= T. Only a UNet
    # has the time path the table replaces.
    use_table = isinstance(model, (UNet, DDPMUNet)) and (on_gpu or len(timesteps) * (model_batch or x_T.shape[0]) >= n_steps)
    # Triton launches on the *current* CUDA device and the side stream / graph below are created
    # on it too, so make x_T's device current (a no-op on a single-GPU machine).
    device_ctx = torch.cuda.device(device) if on_gpu else nullcontext()
    cpu_program = _program_choice(cpu_program, model, device)
    if fuse is None:
        fuse = on_gpu or cpu_fuses(dtype, model_batch or x_T.shape[0], channels_last, x_T.shape[-2] * x_T.shape[-1],
                                   cpu_program)
    cpu_split = _split_choice(cpu_split, x_T, noise, dtype, model_batch, fuse, channels_last)
    draw = (lambda: randn_images(x_T.shape, generator)) if noise == "generator" else None
    key = cache_key(model, x_T, dtype, clip, noise, len(timesteps), n_steps, fuse, use_table, channels_last,
                     model_batch)
    with device_ctx:
        hit = GRAPHS.lookup(key, model) if (cuda_graph and reuse_graph) else None
        if hit is not None:
            state, replay = hit
            state.restart(x_T, timesteps, coeffs, seed, image_offset)
            return _run_steps(state, replay, draw, progress)
        with _fast_model(model, dtype, device, n_steps, fuse=fuse, table=use_table,
                         channels_last=channels_last) as net:
            if cpu_split:  # each half is the same run over its own images (their Philox keys by image_offset)
                def run_half(lo: int, hi: int, tick: Callable[[], None]) -> torch.Tensor:
                    half = _StepState(net, x_T[lo:hi], timesteps, coeffs, dtype, clip, seed, False,
                                      image_offset + lo, model_batch, cpu_program)
                    return _run_steps(half, half.step, None, False, tick)
                return run_split(run_half, x_T.shape, len(timesteps), progress)
            state = _StepState(net, x_T, timesteps, coeffs, dtype, clip, seed, noise == "generator", image_offset,
                               model_batch, cpu_program)
            run = capture(state) if cuda_graph else state.step
            if cuda_graph and reuse_graph:
                # The graph reads the net's weights and its time table through raw pointers: the entry
                # keeps the table and a converted copy alive after _fast_model detaches the table and
                # unfuses the model. Not the caller's model: the graph no longer needs the module, and
                # the entry goes when the model does (see _GraphCache.store).
                GRAPHS.store(key, model, state, keep=(None if net is model else net,
                                                       getattr(net, "time_table", None)))
                state.net = None
            return _run_steps(state, run, draw, progress)


def _checked_timesteps(noise: str, timesteps, coeffs: torch.Tensor) -> torch.Tensor:
    """fast_loop's `timesteps` as a long tensor, after checking it, `coeffs` and `noise`."""
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
    timesteps = torch.as_tensor(timesteps, dtype=torch.long)
    if coeffs.shape[0] != timesteps.numel():
        raise ValueError(f"coeffs has {coeffs.shape[0]} rows for {timesteps.numel()} timesteps")
    return timesteps


def _split_choice(cpu_split: Optional[bool], x_T: torch.Tensor, noise: str, dtype: torch.dtype,
                  model_batch: Optional[int], fuse: bool, channels_last: bool) -> bool:
    """fast_loop's `cpu_split`, defaulted (`split_parts`) and checked."""
    device = x_T.device
    if cpu_split is None:
        return (device.type == "cpu" and noise == "philox"
                and split_parts(dtype, model_batch or x_T.shape[0], fuse, channels_last) > 1)
    if cpu_split and (device.type != "cpu" or noise != "philox" or x_T.shape[0] < 2):
        raise ValueError("cpu_split=True needs CPU tensors, noise='philox' (each half draws its own images' "
                         f"noise) and 2 or more images, got x_T {tuple(x_T.shape)} on {device}, noise={noise!r}")
    return bool(cpu_split)


def _program_choice(cpu_program: Optional[bool], model: torch.nn.Module, device: torch.device) -> bool:
    """fast_loop's `cpu_program`, defaulted and checked."""
    if cpu_program is None:  # not where a module hook would see only the recorded step (replays call no hook)
        return device.type == "cpu" and type(model) in (UNet, DDPMUNet) and not _has_hooks(model)
    if cpu_program and device.type != "cpu":
        raise ValueError(f"cpu_program=True needs CPU tensors, got x_T on {device}")
    return bool(cpu_program)


def _has_hooks(model: torch.nn.Module) -> bool:
    """Whether a forward hook (global, or on any module of `model`) would run during its forward."""
    from torch.nn.modules import module as _module
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _graph_choice(cuda_graph: Optional[bool], device: torch.device) -> bool:
    """fast_loop's `cuda_graph`, defaulted and checked."""
    graph_ok = EXTENSION_HAS_CUDA
    if cuda_graph is None:
        return device.type == "cuda" and graph_ok
    if cuda_graph and device.type not in _GRAPH_DEVICE_TYPES:
        raise ValueError("cuda_graph=True needs CUDA tensors")
    if cuda_graph and not graph_ok:
        raise RuntimeError("cuda_graph=True needs ddpm_fast._C built with CUDA: the reference fallback of "
                           "reverse_step syncs on the step index, which is illegal during graph capture")
    return bool(cuda_graph)


def _run_steps(state: "_StepState", run: Callable[[], None], draw, progress: bool,
               tick: Optional[Callable[[], None]] = None) -> torch.Tensor:
    n = len(state.timesteps)
    bar = tqdm(total=n, desc="sampling (fast)", disable=not progress, leave=False)
    with torch.inference_mode(), bar:
        for _ in range(n):
            if draw is not None:
                state.z.copy_(draw(), non_blocking=True)
            run()
            bar.update(1)
            if tick is not None:
                tick()
    return state.x.clone()


class _StepState:
    """The static buffers one sampling step reads and writes, and the step itself."""

    def __init__(self, net, x_T, timesteps, coeffs, dtype, clip, seed, injected_noise, image_offset=0,
                 model_batch=None, program=False):
        device = x_T.device
        self.net, self.dtype, self.clip, self.model_batch = net, dtype, clip, model_batch
        # In device memory, so a captured graph can be replayed for a new run after seed_t.fill_().
        self.seed_t = torch.tensor(seed_arg(seed), dtype=torch.int64, device=device)
        self.offset_t = torch.tensor(int(image_offset), dtype=torch.int64, device=device)
        self.x = x_T.to(device=device, dtype=torch.float32).contiguous().clone()
        self.x_T = self.x.clone()
        self.step_index = torch.zeros((), dtype=torch.long, device=device)
        self.timesteps = timesteps.to(device)
        self.coeffs = coeffs.to(device=device, dtype=torch.float32).contiguous()
        self.z = torch.empty_like(self.x) if injected_noise else None
        self.batch = self.x.shape[0]
        self.output_checked = False
        # A CPU program of the forward: how many recordings are left (0: always eager), the program, and
        # the tensors whose in-place change makes it refuse to replay.
        self.records_left = 2 if program else 0
        self.program = None
        self.watched = [*net.parameters(), *net.buffers()] if program else []

    def step(self) -> None:
        t = self.timesteps.index_select(0, self.step_index.reshape(1)).expand(self.batch)
        eps = self._forward(self.x.to(self.dtype), t)
        if eps.dtype == torch.float64:  # a custom module's float64 output: the fused step takes 32 bits or less
            eps = eps.float()
        ops.reverse_step_(self.x, eps, self.step_index, self.coeffs, noise=self.z, seed=self.seed_t, clip=self.clip,
                          image_offset=self.offset_t)
        self.step_index.add_(1)

    def _forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The UNet's eps. The first (eager) step checks the model's output: shapes cannot change after it.
        With `records_left`, the second step is recorded as a CPU program (ops/_cpu_program.py) and later
        steps replay it; a replay that refuses (a weight changed in place) records afresh, twice at most."""
        if self.program is not None:
            eps = self.program(x, t)
            if eps is not None:
                return eps
            self.program = None
        if not self.output_checked or self.records_left <= 0:
            eps = model_forward(self.net, x, t, self.model_batch, check=not self.output_checked)
            self.output_checked = True
            return eps
        self.records_left -= 1
        eps, self.program = ops.record_cpu_program(lambda x, t: model_forward(self.net, x, t, self.model_batch),
                                                (x, t), self.watched)
        return eps

    def reset(self) -> None:
        self.x.copy_(self.x_T)
        self.step_index.zero_()

    def restart(self, x_T, timesteps, coeffs, seed, image_offset=0) -> None:
        """Load a new run's inputs (same shapes) into the static buffers a captured graph reads."""
        self.x_T.copy_(x_T)
        self.timesteps.copy_(timesteps)
        self.coeffs.copy_(coeffs)
        self.seed_t.fill_(seed_arg(seed))
        self.offset_t.fill_(int(image_offset))
        self.reset()


