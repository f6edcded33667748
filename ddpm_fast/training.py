"""Train a DDPM (the reference labml UNet + labml's simple loss) on an image folder or the built-in digits.

    ddpm-fast train --data digits --preset digits16 --steps 10000 --out runs/digits16
    ddpm-fast train --data ~/my_images --preset tiny --steps 20000 --out runs/mine --resume
    python -m ddpm_fast.training ...            (the same arguments, without the CLI front end)

What a run does: Adam on MSE(eps, UNet(q_sample(x0, t, eps), t)) with t uniform over the schedule;
gradient-norm clipping; an exponential moving average (EMA) of the weights, which is the model that
is sampled and exported; optional mixed precision on CUDA (`amp="bf16"`: autocast only; `amp="fp16"`:
autocast + GradScaler); a tqdm bar with the loss and it/s. `out_dir` receives:

    checkpoint.safetensors   the full training state (see below), replaced atomically
    model.safetensors        the EMA weights in the package's model format (load_checkpoint / sample)
    loss.csv                 step, mean loss since the previous row, lr, it/s, elapsed seconds
    samples/step_NNNNNNN.png a grid from the EMA model (DDIM, few steps, fixed seed) every sample_every

Checkpoint format (no pickle anywhere): one safetensors file holding tensors `model.<name>`,
`ema.<name>`, `optim.<param index>.<state key>` and `rng.cpu` / `rng.cuda`, and JSON metadata with the
model config (`ddpm_fast_config`) and `train_state` (step, optimizer param groups and scalar state,
GradScaler state, hyper-parameters). It is written to a temp file in the same folder, fsync'd and
renamed over the old one, so a crash or `kill -9` at any moment leaves either the previous or the new
checkpoint, never a torn one: `resume=True` loses at most the steps since the last checkpoint and then
continues exactly as the uninterrupted run would (the data order and the per-step noise are functions
of (seed, step), and the dropout RNG state is saved).

Multi-GPU on one node (tested with torchrun on 2 CPU processes over gloo, not yet on several GPUs):

    torchrun --standalone --nproc_per_node=8 -m ddpm_fast.training --data DIR --preset cifar35m \
        --steps 800000 --batch-size 128 --out runs/cifar --amp bf16

Under torchrun (WORLD_SIZE > 1) each process trains on cuda:LOCAL_RANK inside DistributedDataParallel
(find_unused_parameters=True, because labml's AttentionBlock owns a GroupNorm it never applies), each
rank reads its shard of every epoch through a DistributedSampler, `batch_size` is the GLOBAL batch
(split evenly across ranks, so the recipe does not change with the GPU count), and only rank 0 writes
files. Resume works the same way; ranks other than 0 re-derive their RNG streams from (seed, rank, step).
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from .config import ModelConfig, get_preset
from .devices import parse_device
from .run_dir import RunLock, check_fresh_run, model_file_step, resumable
from .reference import Schedule, UNet
from .atomic import write_atomic
from .cli import number_arg as _number
# Re-exported: the training API (tests, scripts/train_default_model.sh) imports these from here.
from .train_checkpoint import (CheckpointError, _save_model_file, export_model,  # noqa: F401
                               load_train_checkpoint, read_train_checkpoint, read_train_config,
                               save_train_checkpoint)

CHECKPOINT_NAME = "checkpoint.safetensors"
MODEL_NAME = "model.safetensors"
LOSS_LOG = "loss.csv"
LOSS_COLUMNS = ("step", "loss", "lr", "it_per_s", "elapsed_s")
MAX_IMAGE_SIZE = 1024  # --image-size: larger UNets than this do not fit any single GPU's training step


class DivergedError(ValueError):
    """The loss or the weights became NaN or Inf (a ValueError: the CLI reports it as one line)."""


@dataclass
class TrainResult:
    step: int
    loss: Optional[float]
    out_dir: Path
    checkpoint: Path
    model: Path


# ---------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------
def ema_decay_at(decay: float, n_updates: int) -> float:
    """The decay used for the (n+1)-th EMA update: min(decay, (1 + n) / (10 + n)).

    The warm-up keeps early EMA weights from being dominated by the random initialisation
    (a plain 0.999 EMA would still be ~37% init after 1000 steps).
    """
    return min(decay, (1.0 + n_updates) / (10.0 + n_updates))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


# ---------------------------------------------------------------------------------------------
# Data order and noise: pure functions of (seed, rank, step), so resume is exact.
# ---------------------------------------------------------------------------------------------
class _BatchOrder:
    """Per-rank index batches of step k: DistributedSampler's shard of epoch e's permutation."""

    def __init__(self, dataset, per_rank_batch: int, seed: int, rank: int, world: int):
        from torch.utils.data import DistributedSampler

        self.sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                          seed=seed, drop_last=True)
        self.bs = per_rank_batch
        self.per_epoch = len(self.sampler) // per_rank_batch
        self._epoch, self._indices = None, None

    def batch(self, step: int):
        e, j = divmod(step, self.per_epoch)
        if e != self._epoch:
            self.sampler.set_epoch(e)
            self._epoch, self._indices = e, list(iter(self.sampler))
        return self._indices[j * self.bs:(j + 1) * self.bs]


class _StepsSampler(torch.utils.data.Sampler):
    def __init__(self, order: _BatchOrder, start: int, stop: int):
        self.order, self.start, self.stop = order, start, stop

    def __iter__(self):
        return (self.order.batch(s) for s in range(self.start, self.stop))

    def __len__(self):
        return self.stop - self.start


def _noise_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7_919) * (1 << 32) % (1 << 62) + step


# ---------------------------------------------------------------------------------------------
# Sample grids
# ---------------------------------------------------------------------------------------------
def sample_grid(model, config: ModelConfig, n: int = 16, steps: int = 20, seed: int = 0):
    """A PIL grid of n samples from `model` (DDIM, eta=0, `steps` steps, fixed seed), on its device."""
    from .sampling import make_grid, sample

    images = sample(model, batch_size=n, num_inference_steps=steps, sampler="ddim", progress=False,
                    generator=torch.Generator().manual_seed(seed), output_type="pil", config=config)
    return make_grid(images, nrow=int(math.ceil(math.sqrt(n))))


# ---------------------------------------------------------------------------------------------
# Loss log
# ---------------------------------------------------------------------------------------------
def _truncate_log(path: Path, step: int) -> None:
    """Drop rows logged after `step` (a killed run may have logged past its last checkpoint)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f)]
    keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step] if rows else []
    data = "".join(",".join(r) + "\n" for r in keep).encode()
    write_atomic(path, lambda f: f.write(data))


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------
def _resolve_amp(amp, device: torch.device) -> Optional[torch.dtype]:
    if amp in (False, None, "off", "no", "fp32"):
        return None
    if device.type != "cuda":
        raise ValueError(f"mixed precision (amp={amp!r}) needs a CUDA device; this run is on {device}")
    if amp is True:
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if amp not in table:
        raise ValueError(f"amp must be False, True, 'bf16' or 'fp16', got {amp!r}")
    return table[amp]


def _setup_distributed(device):
    """(rank, world size, device, whether this call opened the process group). WORLD_SIZE > 1 (torchrun)
    starts the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = parse_device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, dev, False
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), dev, owns_group


def _end_distributed(finished: bool) -> None:
    """Close the process group train() opened.

    Without this, a rank that finishes first exits with gloo's worker threads still running while
    rank 0 writes its checkpoint, and the C++ runtime can abort the process at exit ("terminate called
    without an active exception", seen on the 2-core CI machine). After a clean run all ranks meet at a
    barrier first; after an error they do not, since the other ranks may never arrive.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def _check_args(steps, batch_size, lr, ema_decay, grad_clip, sample_every, checkpoint_every, log_every,
                warmup_steps, num_workers, seed) -> None:
    def need(ok, msg):
        if not ok:
            raise ValueError(msg)

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    need(is_int(steps) and steps >= 1, f"steps must be a positive integer, got {steps!r}")
    need(is_int(batch_size) and batch_size >= 1, f"batch_size must be a positive integer, got {batch_size!r}")
    need(isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0, f"lr must be a positive number, got {lr!r}")
    need(isinstance(ema_decay, (int, float)) and 0.0 <= ema_decay < 1.0, f"ema_decay must be in [0, 1), got {ema_decay!r}")
    need(grad_clip is None or (isinstance(grad_clip, (int, float)) and grad_clip >= 0),
         f"grad_clip must be >= 0 (0 or None disables clipping), got {grad_clip!r}")
    for name, v in (("sample_every", sample_every), ("checkpoint_every", checkpoint_every),
                    ("warmup_steps", warmup_steps), ("num_workers", num_workers)):
        need(is_int(v) and v >= 0, f"{name} must be an integer >= 0, got {v!r}")
    need(checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {checkpoint_every}")
    need(is_int(log_every) and log_every >= 1, f"log_every must be a positive integer, got {log_every!r}")
    need(is_int(seed) and seed >= 0, f"seed must be an integer >= 0, got {seed!r}")


def train(data, out_dir, preset: Union[str, ModelConfig, None] = None, steps: int = 10_000,
          batch_size: int = 64, lr: float = 3e-4, ema_decay: float = 0.999, grad_clip: Optional[float] = 1.0,
          amp: Union[bool, str] = False, resume: bool = False, sample_every: int = 1000,
          checkpoint_every: int = 500, seed: int = 0, device=None, progress: bool = True,
          num_workers: int = 0, warmup_steps: int = 100, log_every: int = 50, sample_steps: int = 20,
          n_samples: int = 16, callback: Optional[Callable[[int], None]] = None) -> TrainResult:
    """Train a UNet for `steps` optimizer steps in total (a resumed run continues up to `steps`).

    data: an image folder, "digits", a tensor [N, C, H, W] in the data range, or a map-style Dataset.
    preset: a name from config.PRESETS or a ModelConfig; None: the checkpoint's config when resuming,
    "digits16" otherwise. lr: Adam's rate after a linear warm-up of `warmup_steps`. ema_decay: see
    `ema_decay_at`. amp: False, True (bf16 if supported else fp16), "bf16" or "fp16" (CUDA only).
    resume: continue from out_dir/checkpoint.safetensors if there is one, else start a new run (with a
    note). Without it, a folder holding a checkpoint, a model file or a foreign loss.csv is refused
    rather than overwritten (see run_dir.py). callback(step) runs after every completed step (tests
    use it to interrupt a run). Raises DivergedError if the loss or the weights become NaN/Inf.
    """
    from .data import load_dataset

    _check_args(steps, batch_size, lr, ema_decay, grad_clip, sample_every, checkpoint_every, log_every,
                warmup_steps, num_workers, seed)
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir).strip():
        raise ValueError(f"out_dir must be a folder path, got {out_dir!r}")
    out = Path(out_dir)
    ckpt_path, model_path, log_path = out / CHECKPOINT_NAME, out / MODEL_NAME, out / LOSS_LOG
    rank, world, device, owns_group = _setup_distributed(device)
    finished = started = False
    lock = None
    try:
        amp_dtype = _resolve_amp(amp, device)
        resume = resumable(ckpt_path, resume)
        if rank == 0:
            lock = RunLock(out)  # before any check: a concurrent run must not pass them at the same time
        # The cheap checks come before the data, which may take minutes to decode.
        config = _run_config(preset, ckpt_path if resume else None)
        if not resume:
            check_fresh_run(out, ckpt_path, model_path, log_path, LOSS_COLUMNS)
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes ({world})")
        per_rank = batch_size // world

        dataset = load_dataset(data, config, exclude=[out], progress=progress and rank == 0)
        order = _BatchOrder(dataset, per_rank, seed, rank, world)
        if order.per_epoch < 1:
            raise ValueError(f"the dataset has {len(dataset)} images, fewer than one batch of {batch_size}: "
                             "lower batch_size")

        torch.manual_seed(seed)
        model = UNet(config.unet).to(device)
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        start, elapsed0, last_ckpt = 0, 0.0, None
        if resume:
            state = load_train_checkpoint(ckpt_path, model, ema, optimizer, scaler)
            start = last_ckpt = int(state["step"])
            elapsed0 = float((state.get("hparams") or {}).get("elapsed_s", 0.0))
        if rank > 0:  # dropout streams: rank 0's state is in the checkpoint, the others follow from (seed, rank, step)
            torch.manual_seed(_noise_seed(seed, rank, start) + 1)
        hparams = dict(steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema_decay, grad_clip=grad_clip,
                       amp=str(amp_dtype).replace("torch.", "") if amp_dtype else "off", seed=seed,
                       warmup_steps=warmup_steps, world_size=world, data=str(data) if isinstance(data, (str, Path)) else type(data).__name__)

        net = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      find_unused_parameters=True)
        if rank == 0:
            for name in (CHECKPOINT_NAME, MODEL_NAME, LOSS_LOG):  # temp files of a run killed mid-write
                for stale in out.glob(f".{name}.*tmp*"):
                    stale.unlink(missing_ok=True)
            if resume and log_path.exists():
                _truncate_log(log_path, start)
            else:  # a new log (a leftover of ours from a run killed before its first checkpoint is replaced)
                write_atomic(log_path, lambda f: f.write((",".join(LOSS_COLUMNS) + "\n").encode()))
        started = True

        images = getattr(dataset, "images", None)
        if isinstance(images, torch.Tensor) and images.numel() * 4 < (1 << 29):
            images = images.to(device)  # small in-memory set: gather batches on the device, no loader
            batches = (images[torch.as_tensor(order.batch(s), device=device)] for s in range(start, steps))
        else:
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=_StepsSampler(order, start, steps),
                                                 num_workers=num_workers, pin_memory=device.type == "cuda")
            batches = iter(loader)

        sched = Schedule(config.diffusion, device)
        gen = torch.Generator(device=device)
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, disable=not (progress and rank == 0), desc="train", unit="it",
                   dynamic_ncols=True)
        stop = {"flag": False}
        old_handler = None
        if world == 1 and _in_main_thread():
            # Ctrl-C: finish the current step, write a checkpoint, then stop (a second Ctrl-C stops at once).
            def on_sigint(signum, frame):
                if stop["flag"]:
                    raise KeyboardInterrupt
                stop["flag"] = True
            old_handler = signal.signal(signal.SIGINT, on_sigint)

        run_sum, run_n, last_loss, done = torch.zeros((), device=device), 0, None, start
        t_last = t0 = time.perf_counter() - elapsed0  # elapsed_s continues across resumes
        try:
            for step in range(start, steps):
                x0 = next(batches).to(device, non_blocking=True)
                lr_now = lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr
                for g in optimizer.param_groups:
                    g["lr"] = lr_now
                gen.manual_seed(_noise_seed(seed, rank, step))
                t = torch.randint(0, sched.n_steps, (x0.shape[0],), generator=gen, device=device)
                eps = torch.randn(x0.shape, generator=gen, device=device)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss = sched.loss(net, x0, t=t, eps=eps)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                ema_update(ema, model, ema_decay_at(ema_decay, step))
                done = step + 1
                run_sum += loss.detach().float()
                run_n += 1
                bar.update(1)

                if done % log_every == 0 or done == steps:
                    # One host sync per log interval, not per step.
                    if world > 1:
                        torch.distributed.all_reduce(run_sum)
                        run_sum /= world
                    last_loss = run_sum.item() / run_n
                    if not math.isfinite(last_loss):
                        raise DivergedError(_diverged(f"the training loss became {last_loss}", done, ckpt_path, last_ckpt))
                    now = time.perf_counter()
                    if rank == 0:
                        with open(log_path, "a") as f:
                            f.write(f"{done},{last_loss:.6g},{lr_now:.6g},{run_n / (now - t_last):.4g},{now - t0:.1f}\n")
                    bar.set_postfix(loss=f"{last_loss:.4f}")
                    run_sum.zero_()
                    run_n, t_last = 0, now
                stopping = stop["flag"]  # read once: a Ctrl-C from here on is handled after the next step
                if done % checkpoint_every == 0 or done == steps or stopping:
                    # Every rank checks (the weights are the same on all), so all stop together; never
                    # replace a good checkpoint with NaN weights, whatever the last logged loss said.
                    if not _all_finite(model):
                        raise DivergedError(_diverged("the weights became NaN or Inf", done, ckpt_path, last_ckpt))
                    if rank == 0:
                        hp = dict(hparams, elapsed_s=round(time.perf_counter() - t0, 1))
                        save_train_checkpoint(ckpt_path, model, ema, optimizer, done, config, scaler, hp)
                        _save_model_file(model_path, ema, config, done)
                    last_ckpt = done
                if rank == 0 and sample_every and (done % sample_every == 0 or done == steps):
                    _write_samples(out, ema, config, done, n_samples, sample_steps, seed)
                if callback is not None:
                    callback(done)
                if stopping:
                    print(f"\ntraining interrupted: checkpoint written at step {done}; continue with resume=True "
                          "(--resume)", file=sys.stderr)
                    raise KeyboardInterrupt(f"training interrupted at step {done}")
            if rank == 0 and last_ckpt is not None and model_file_step(model_path) != last_ckpt:
                # Resumed a finished run whose model file is missing or older than its checkpoint (a kill
                # between the two writes): export the checkpoint's EMA again.
                export_model(ckpt_path, model_path)
        finally:
            bar.close()
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
        finished = True
        return TrainResult(step=done, loss=last_loss, out_dir=out, checkpoint=ckpt_path, model=model_path)
    finally:
        if lock is not None:
            lock.release(started)
        if owns_group:
            _end_distributed(finished)


def _run_config(preset, checkpoint: Optional[Path]) -> ModelConfig:
    """The run's model config: `preset` (default digits16), or the checkpoint's when resuming without
    one; a preset that differs from the checkpoint's is refused before any data is read."""
    saved = read_train_config(checkpoint) if checkpoint is not None else None
    if preset is None:
        return saved if saved is not None else get_preset("digits16")
    config = preset if isinstance(preset, ModelConfig) else get_preset(preset)
    if saved is not None and saved.unet != config.unet:
        raise CheckpointError(f"{str(checkpoint)!r} was trained with another model config than the one given "
                              "(--preset / --image-size / --channels); resume without them to use the checkpoint's")
    return config


def _all_finite(model: torch.nn.Module) -> bool:
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


def _diverged(what: str, step: int, checkpoint: Path, last_ckpt: Optional[int]) -> str:
    where = (f"the last checkpoint ({str(checkpoint)!r}) is from step {last_ckpt}" if last_ckpt is not None
             else "no checkpoint was written")
    return f"{what} at step {step} (try a lower --lr or --grad-clip); {where}"


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


_warned_no_sampler = []


def _write_samples(out: Path, ema, config, step, n, steps, seed) -> None:
    try:
        from .sampling import save_image_atomic

        grid = sample_grid(ema, config, n=n, steps=steps, seed=seed)
    except ImportError as e:  # sampling.py is optional for training; say so once
        if not _warned_no_sampler:
            print(f"ddpm_fast.train: no sample grids ({e})", file=sys.stderr)
            _warned_no_sampler.append(True)
        return
    (out / "samples").mkdir(exist_ok=True)
    save_image_atomic(grid, out / "samples" / f"step_{step:07d}.png")


# ---------------------------------------------------------------------------------------------
# Command line: `ddpm-fast train` (cli.py) and `python -m ddpm_fast.training`
# ---------------------------------------------------------------------------------------------
def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `train` subcommand's flags; values are range-checked at parse time."""
    from .config import PRESETS

    a = parser.add_argument
    a("--data", required=True, help="a folder of PNG/JPEG images (searched recursively), or 'digits' "
      "(scikit-learn's handwritten digits, upscaled to 16x16)")
    a("--out", required=True, help="run folder: checkpoint, model, loss.csv, samples/")
    a("--preset", default=None, choices=sorted(PRESETS),
      help="model shape (default: digits16, or the checkpoint's with --resume)")
    a("--image-size", type=_number(int, 1, MAX_IMAGE_SIZE, hi_open=False), default=None,
      help=f"override the preset's image size (at most {MAX_IMAGE_SIZE})")
    a("--channels", type=int, choices=(1, 3), default=None, help="override the preset's image channels")
    a("--steps", type=_number(int, 1), default=10_000, help="total optimizer steps (default: 10000)")
    a("--batch-size", type=_number(int, 1), default=64, help="global batch size (default: 64)")
    a("--lr", type=_number(float, 0.0, lo_open=True), default=3e-4, help="Adam learning rate (default: 3e-4)")
    a("--warmup-steps", type=_number(int, 0), default=100, help="linear lr warm-up steps (default: 100)")
    a("--ema-decay", type=_number(float, 0.0, 1.0), default=0.999, help="EMA decay in [0, 1) (default: 0.999)")
    a("--grad-clip", type=_number(float, 0.0), default=1.0, help="max gradient norm, 0 = off (default: 1.0)")
    a("--amp", choices=("off", "bf16", "fp16"), default="off", help="mixed precision on CUDA (default: off)")
    a("--resume", action="store_true",
      help="continue from OUT/checkpoint.safetensors if it exists (else start a new run)")
    a("--sample-every", type=_number(int, 0), default=1000, help="steps between sample grids, 0 = off")
    a("--checkpoint-every", type=_number(int, 1), default=500, help="steps between checkpoints (default: 500)")
    a("--log-every", type=_number(int, 1), default=50, help="steps per loss.csv row (default: 50)")
    a("--seed", type=_number(int, 0, 2 ** 63), default=0)
    a("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available); ignored under torchrun")
    a("--num-workers", type=_number(int, 0), default=0, help="DataLoader workers for image folders")
    a("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_train_from_args(args: argparse.Namespace) -> int:
    """Validate parsed `train` arguments, run training, print where things went. Returns 0."""
    import dataclasses

    over = {k: v for k, v in (("image_size", args.image_size), ("image_channels", args.channels)) if v is not None}
    config = None if args.preset is None and not over else get_preset(args.preset or "digits16")
    if over:
        config = ModelConfig(dataclasses.replace(config.unet, **over), config.diffusion)
    if args.device is not None:
        parse_device(args.device, "--device")
    if args.amp != "off" and not torch.cuda.is_available():
        raise ValueError(f"--amp {args.amp} needs a CUDA device")
    res = train(args.data, args.out, preset=config, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                ema_decay=args.ema_decay, grad_clip=args.grad_clip, amp=args.amp, resume=args.resume,
                sample_every=args.sample_every, checkpoint_every=args.checkpoint_every, seed=args.seed,
                device=args.device, progress=not args.no_progress, num_workers=args.num_workers,
                warmup_steps=args.warmup_steps, log_every=args.log_every)
    if int(os.environ.get("RANK", "0")) == 0:
        loss = f"{res.loss:.4f}" if res.loss is not None else "n/a"
        print(f"trained to step {res.step} (last logged loss {loss}); EMA model: {res.model}; "
              f"checkpoint: {res.checkpoint}")
    return 0


def main(argv=None) -> int:
    from .data import DataError

    parser = add_train_arguments(argparse.ArgumentParser(
        prog="python -m ddpm_fast.training", description="Train a DDPM UNet (same flags as `ddpm-fast train`)."))
    args = parser.parse_args(argv)
    try:
        return run_train_from_args(args)
    except (DataError, CheckpointError, OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\n{e or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
