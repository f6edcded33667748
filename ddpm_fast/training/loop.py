"""Train a DDPM (the reference labml UNet + labml's simple loss) on an image folder or the built-in digits.

    ddpm-fast train --data digits --preset digits16 --steps 10000 --out runs/digits16
    ddpm-fast train --data ~/my_images --preset tiny --steps 20000 --out runs/mine --resume

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

    torchrun --standalone --nproc_per_node=8 -m ddpm_fast train --data DIR --preset cifar35m \
        --steps 800000 --batch-size 128 --out runs/cifar --amp bf16

Under torchrun (WORLD_SIZE > 1) each process trains on cuda:LOCAL_RANK inside DistributedDataParallel
(find_unused_parameters=True, because labml's AttentionBlock owns a GroupNorm it never applies), each
rank reads its shard of every epoch through a DistributedSampler, `batch_size` is the GLOBAL batch
(split evenly across ranks, so the recipe does not change with the GPU count), and only rank 0 writes
files. Resume works the same way; ranks other than 0 re-derive their RNG streams from (seed, rank, step).
"""
from __future__ import annotations

import copy
import csv
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import torch

from ..config import ModelConfig, get_preset
from ..devices import parse_device
from ..io.atomic import write_atomic
from ..reference import Schedule, build_unet
from .checkpoint import (CheckpointError, export_model, load_train_checkpoint, read_train_config,
                         save_model_file, save_train_checkpoint)
from .run_dir import RunLock, check_fresh_run, model_file_step, note, resumable

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
    from ..io.images import make_grid
    from ..sampling import sample

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
    preset: a name from config.PRESETS or DDPM_PRESETS, or a ModelConfig (either network); None: the
    checkpoint's config when resuming, "digits16" otherwise. lr: Adam's rate after a linear warm-up of
    `warmup_steps`. ema_decay: see `ema_decay_at`. amp: False, True (bf16 if supported else fp16), "bf16" or "fp16" (CUDA only).
    resume: continue from out_dir/checkpoint.safetensors if there is one, else start a new run (with a
    note). Without it, a folder holding a checkpoint, a model file or a foreign loss.csv is refused
    rather than overwritten (see run_dir.py). callback(step) runs after every completed step (tests
    use it to interrupt a run). Raises DivergedError if the loss or the weights become NaN/Inf.
    """
    _check_args(steps, batch_size, lr, ema_decay, grad_clip, sample_every, checkpoint_every, log_every,
                warmup_steps, num_workers, seed)
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir).strip():
        raise ValueError(f"out_dir must be a folder path, got {out_dir!r}")
    settings = _Settings(steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema_decay, grad_clip=grad_clip,
                         sample_every=sample_every, checkpoint_every=checkpoint_every, seed=seed,
                         warmup_steps=warmup_steps, log_every=log_every, sample_steps=sample_steps,
                         n_samples=n_samples, num_workers=num_workers, progress=progress)
    out = Path(out_dir)
    rank, world, dev, owns_group = _setup_distributed(device)
    finished = started = False
    lock = None
    try:
        amp_dtype = _resolve_amp(amp, dev)
        if rank == 0:
            lock = RunLock(out)  # before any check: a concurrent run must not pass them at the same time
        run = _open_run(data, out, preset, resume, settings, amp_dtype, rank, world, dev)
        started = True
        result = _run_steps(run, settings, callback)
        finished = True
        return result
    finally:
        if lock is not None:
            lock.release(started)
        if owns_group:
            _end_distributed(finished)


@dataclass
class _Settings:
    """train()'s checked arguments that the steps read."""
    steps: int
    batch_size: int
    lr: float
    ema_decay: float
    grad_clip: Optional[float]
    sample_every: int
    checkpoint_every: int
    seed: int
    warmup_steps: int
    log_every: int
    sample_steps: int
    n_samples: int
    num_workers: int
    progress: bool


@dataclass
class _Run:
    """An opened run: its folder and files, data, model, EMA, optimizer, where it starts."""
    out: Path
    config: ModelConfig
    dataset: object
    order: "_BatchOrder"
    model: torch.nn.Module
    net: torch.nn.Module  # the model, or its DDP wrapper
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Optional[object]
    amp_dtype: Optional[torch.dtype]
    start: int
    elapsed0: float
    last_ckpt: Optional[int]
    hparams: dict
    rank: int
    world: int
    device: torch.device

    @property
    def checkpoint(self) -> Path:
        return self.out / CHECKPOINT_NAME

    @property
    def model_file(self) -> Path:
        return self.out / MODEL_NAME

    @property
    def log(self) -> Path:
        return self.out / LOSS_LOG


def _open_run(data, out: Path, preset, resume: bool, cfg: _Settings, amp_dtype, rank: int, world: int,
              device: torch.device) -> _Run:
    """Check the folder and the config (cheap, before the data, which may take minutes to decode), load
    the data, build the model, EMA and optimizer (restored from the checkpoint when resuming), and set
    up the loss log."""
    from .data import load_dataset

    ckpt_path, model_path, log_path = out / CHECKPOINT_NAME, out / MODEL_NAME, out / LOSS_LOG
    _check_data_outside(data, out)
    resume = resumable(ckpt_path, resume)
    config = _run_config(preset, ckpt_path if resume else None)
    if not resume:
        check_fresh_run(out, ckpt_path, model_path, log_path, LOSS_COLUMNS)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({world})")
    dataset = load_dataset(data, config, exclude=[out], progress=cfg.progress and rank == 0)
    order = _BatchOrder(dataset, cfg.batch_size // world, cfg.seed, rank, world)
    if order.per_epoch < 1:
        raise ValueError(f"the dataset has {len(dataset)} images, fewer than one batch of {cfg.batch_size}: "
                         "lower batch_size")

    torch.manual_seed(cfg.seed)
    model = build_unet(config.unet).to(device)  # labml's UNet, or the DDPM paper's for a DDPMUNetConfig
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    start, elapsed0, last_ckpt = 0, 0.0, None
    if resume:
        state = load_train_checkpoint(ckpt_path, model, ema, optimizer, scaler)
        start = last_ckpt = int(state["step"])
        elapsed0 = float((state.get("hparams") or {}).get("elapsed_s", 0.0))
        if start > cfg.steps:
            raise ValueError(f"{str(ckpt_path)!r} is at step {start}, past steps={cfg.steps}: nothing to train "
                             f"(pass steps >= {start} (--steps) to continue it)")
        if start == cfg.steps and rank == 0:
            note(f"{str(ckpt_path)!r} is already at step {start} = steps: nothing to train")
    if rank > 0:  # dropout streams: rank 0's state is in the checkpoint, the others follow from (seed, rank, step)
        torch.manual_seed(_noise_seed(cfg.seed, rank, start) + 1)
    hparams = dict(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, ema_decay=cfg.ema_decay,
                   grad_clip=cfg.grad_clip, amp=str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
                   seed=cfg.seed, warmup_steps=cfg.warmup_steps, world_size=world,
                   data=str(data) if isinstance(data, (str, Path)) else type(data).__name__)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    if rank == 0:
        for name in (CHECKPOINT_NAME, MODEL_NAME, LOSS_LOG):  # temp files of a run killed mid-write
            for stale in out.glob(f".{name}.*tmp*"):
                stale.unlink(missing_ok=True)
        if resume and log_path.exists():
            _truncate_log(log_path, start)
        else:  # a new log (a leftover of ours from a run killed before its first checkpoint is replaced)
            write_atomic(log_path, lambda f: f.write((",".join(LOSS_COLUMNS) + "\n").encode()))
    return _Run(out, config, dataset, order, model, net, ema, optimizer, scaler, amp_dtype, start, elapsed0,
                last_ckpt, hparams, rank, world, device)


def _batches(run: _Run, cfg: _Settings):
    """The batches of steps start .. steps-1, in the order (seed, rank, step) fixes."""
    images = getattr(run.dataset, "images", None)
    if isinstance(images, torch.Tensor) and images.numel() * 4 < (1 << 29):
        images = images.to(run.device)  # small in-memory set: gather batches on the device, no loader
        return (images[torch.as_tensor(run.order.batch(s), device=run.device)] for s in range(run.start, cfg.steps))
    loader = torch.utils.data.DataLoader(run.dataset, batch_sampler=_StepsSampler(run.order, run.start, cfg.steps),
                                         num_workers=cfg.num_workers, pin_memory=run.device.type == "cuda")
    return iter(loader)


def _train_step(run: _Run, cfg: _Settings, sched: Schedule, gen: torch.Generator, x0: torch.Tensor,
                step: int) -> Tuple[torch.Tensor, float]:
    """One optimizer step at `step` (0-based) on batch x0: (the loss, detached; the learning rate used)."""
    lr_now = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    for g in run.optimizer.param_groups:
        g["lr"] = lr_now
    gen.manual_seed(_noise_seed(cfg.seed, run.rank, step))
    t = torch.randint(0, sched.n_steps, (x0.shape[0],), generator=gen, device=run.device)
    eps = torch.randn(x0.shape, generator=gen, device=run.device)
    with torch.autocast(run.device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
        loss = sched.loss(run.net, x0, t=t, eps=eps)
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
    else:
        loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    ema_update(run.ema, run.model, ema_decay_at(cfg.ema_decay, step))
    return loss.detach().float(), lr_now


def _checkpoint(run: _Run, done: int, t0: float) -> None:
    """Write the checkpoint and the model file at step `done` (rank 0), after every rank has checked
    the weights: all stop together, and a good checkpoint is never replaced with NaN weights."""
    if not _all_finite(run.model):
        raise DivergedError(_diverged("the weights became NaN or Inf", done, run.checkpoint, run.last_ckpt))
    if run.rank == 0:
        hp = dict(run.hparams, elapsed_s=round(time.perf_counter() - t0, 1))
        save_train_checkpoint(run.checkpoint, run.model, run.ema, run.optimizer, done, run.config, run.scaler, hp)
        save_model_file(run.model_file, run.ema, run.config, done)
    run.last_ckpt = done


def _run_steps(run: _Run, cfg: _Settings, callback) -> TrainResult:
    """Steps run.start .. cfg.steps - 1 with their log rows, checkpoints, sample grids and Ctrl-C handling."""
    from tqdm.auto import tqdm

    batches = _batches(run, cfg)
    sched = Schedule(run.config.diffusion, run.device)
    gen = torch.Generator(device=run.device)
    bar = tqdm(total=cfg.steps, initial=run.start, disable=not (cfg.progress and run.rank == 0), desc="train",
               unit="it", dynamic_ncols=True)
    stop, old_handler = _catch_sigint(run.world)
    log = _LossLog(run, time.perf_counter() - run.elapsed0)  # elapsed_s continues across resumes
    done = run.start
    try:
        for step in range(run.start, cfg.steps):
            loss, lr_now = _train_step(run, cfg, sched, gen, next(batches).to(run.device, non_blocking=True), step)
            done = step + 1
            bar.update(1)
            if log.add(loss, done, lr_now, cfg) is not None:
                bar.set_postfix(loss=f"{log.last:.4f}")
            stopping = stop["flag"]  # read once: a Ctrl-C from here on is handled after the next step
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stopping:
                _checkpoint(run, done, log.t0)
            if run.rank == 0 and cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.steps):
                _write_samples(run.out, run.ema, run.config, done, cfg.n_samples, cfg.sample_steps, cfg.seed)
            if callback is not None:
                callback(done)
            if stopping:
                print(f"\ntraining interrupted: checkpoint written at step {done}; continue with resume=True "
                      "(--resume)", file=sys.stderr)
                raise KeyboardInterrupt(f"training interrupted at step {done}")
        if run.rank == 0 and run.last_ckpt is not None and model_file_step(run.model_file) != run.last_ckpt:
            # Resumed a finished run whose model file is missing or older than its checkpoint (a kill
            # between the two writes): export the checkpoint's EMA again.
            export_model(run.checkpoint, run.model_file)
    finally:
        bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    return TrainResult(step=done, loss=log.last, out_dir=run.out, checkpoint=run.checkpoint, model=run.model_file)


def _catch_sigint(world: int):
    """Ctrl-C finishes the current step, writes a checkpoint, then stops (a second Ctrl-C stops at once):
    ({"flag": set on the first Ctrl-C}, the handler to restore or None)."""
    stop = {"flag": False}
    if world != 1 or not _in_main_thread():
        return stop, None

    def on_sigint(signum, frame):
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True

    return stop, signal.signal(signal.SIGINT, on_sigint)


class _LossLog:
    """The mean loss over each log interval, appended to loss.csv by rank 0 (one host sync per row)."""

    def __init__(self, run: _Run, t0: float):
        self.run, self.t0, self.t_last = run, t0, time.perf_counter()
        self.sum, self.n, self.last = torch.zeros((), device=run.device), 0, None

    def add(self, loss: torch.Tensor, done: int, lr_now: float, cfg: _Settings) -> Optional[float]:
        """Count one step's loss; at a log step write the row and return the interval's mean loss."""
        self.sum += loss
        self.n += 1
        if done % cfg.log_every and done != cfg.steps:
            return None
        run = self.run
        if run.world > 1:
            torch.distributed.all_reduce(self.sum)
            self.sum /= run.world
        self.last = self.sum.item() / self.n
        if not math.isfinite(self.last):
            raise DivergedError(_diverged(f"the training loss became {self.last}", done, run.checkpoint,
                                          run.last_ckpt))
        now = time.perf_counter()
        if run.rank == 0:
            with open(run.log, "a") as f:
                f.write(f"{done},{self.last:.6g},{lr_now:.6g},{self.n / (now - self.t_last):.4g},{now - self.t0:.1f}\n")
        self.sum.zero_()
        self.n, self.t_last = 0, now
        return self.last


def _check_data_outside(data, out: Path) -> None:
    """An image folder must not be the run folder or inside it: the run folder is left out of its own
    data, so such a run would find no images (or train on its own sample grids)."""
    if not isinstance(data, (str, os.PathLike)) or str(data) == "digits" or not Path(data).is_dir():
        return
    d, o = Path(data).resolve(), out.resolve()
    if d == o or o in d.parents:
        raise ValueError(f"the data folder {str(data)!r} is {'the' if d == o else 'inside the'} run folder "
                         f"{str(out)!r}: choose an output folder outside the data")


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
        from ..io.images import save_image_atomic

        grid = sample_grid(ema, config, n=n, steps=steps, seed=seed)
    except ImportError as e:  # sampling.py is optional for training; say so once
        if not _warned_no_sampler:
            print(f"ddpm_fast.train: no sample grids ({e})", file=sys.stderr)
            _warned_no_sampler.append(True)
        return
    (out / "samples").mkdir(exist_ok=True)
    save_image_atomic(grid, out / "samples" / f"step_{step:07d}.png")
