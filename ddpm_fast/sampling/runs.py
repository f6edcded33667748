"""Large sampling runs to files: N images in batches, one PNG per image, resumable, sharded over ranks.

    ddpm_fast.sample_to_folder(model, "samples/", num_images=50_000, batch_size=256)  # DIR/000000.png ...
    for first, images in ddpm_fast.sample_batches(model, num_images=1000, batch_size=64): ...

The guarantees, and what gives them:
- Image i depends only on (seed, i) and the run's settings. With noise="philox" (the default) x_T and every
  step's noise are keyed by the image's global index (reference.functional.philox_normal, the fused
  step's in-kernel stream); with noise="generator" image i has a CPU torch.Generator of its own, seeded
  from (seed, i) (diffusers' list-of-generators convention). The model runs on chunks of exactly
  `model_batch` images (sampling.model_forward): convolution and GEMM libraries pick their algorithm by
  shape, so without that an image's bits would depend on the batch size. So --batch-size, the number of
  processes and interruptions never change a file (same backend, device type, dtype, model_batch and,
  on CPU, torch thread count: oneDNN splits sums by thread, which the manifest records).
- The folder is the state. Every image is written atomically (temp file + rename): a file named
  NNNNNN.png is complete. A rerun skips the images present; kill -9 loses at most the batches in flight.
  manifest.json (written atomically before the first image) holds the settings; a rerun with other
  settings is refused with the differences named. num_images may grow on a rerun (it only adds images).
- One run per folder: rank 0 holds io.lock.folder_lock (flock on DIR/.ddpm_fast.lock, dropped by the OS
  when the process dies) from before it reads the folder until the .npz is written, so a second run into
  the folder is refused naming the holder's pid and host, and never deletes the first one's temp files.
- Under torchrun (WORLD_SIZE > 1) the missing images are split into contiguous shares, one per rank;
  rank 0 checks the folder and tells every rank the outcome (so a refusal ends all ranks, not a hang),
  all meet at a barrier at the end, and rank 0 writes the .npz. A rank that fails exits non-zero, which
  makes torchrun stop the others; the process group's timeout (DDPM_FAST_DIST_TIMEOUT seconds, default
  1800) bounds any wait.
- One batch at a time: peak memory does not grow with N (the .npz is streamed image by image). PNG
  encoding and writing happen on a writer thread behind a bounded queue, so sampling does not wait for
  the disk. Every batch has the same shape (the last one is padded with the images that follow, which are
  computed and dropped), so on CUDA the fast backend's kept graph is captured once per run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import re
import threading
import time
import zipfile
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..config import ModelConfig, check_int
from ..io.atomic import write_atomic
from ..io.images import to_uint8_hwc
from ..io.lock import LOCK_NAME, folder_lock
from .api import model_defaults, sample
from .checks import DEFAULT_DDIM_STEPS, NOISE_MODES, image_hw

__all__ = ["sample_to_folder", "sample_batches", "RunResult", "MAX_IMAGES", "MANIFEST", "image_name",
           "default_batch_size", "read_images"]

MAX_IMAGES = 1_000_000  # six-digit file names, 000000.png .. 999999.png
MAX_BATCH = 65_536
MANIFEST = "manifest.json"
_FORMAT = "ddpm_fast.sample_run/1"
_IMAGE_RE = re.compile(r"^(\d{6})\.png$")
_TEMP_RE = re.compile(r"^\.(\d{6}\.png|manifest\.json|.+\.npz)\..+\.tmp$")  # write_atomic's temp names
# Images per model call on each device type: the shapes the library kernels see. Large enough to keep
# the device busy (CPU: the digits16 model runs at ~the same images/s from 16 up), small enough that a
# small run does not pay for padding.
_MODEL_BATCH = {"cpu": 16, "cuda": 64}
_QUEUE_BATCHES = 2  # batches waiting for the writer thread: bounds the memory the writer can hold


def image_name(index: int) -> str:
    return f"{index:06d}.png"


def default_batch_size(device) -> int:
    return _MODEL_BATCH[torch.device(device).type]


@dataclasses.dataclass
class RunResult:
    out_dir: Path
    num_images: int
    written: int  # by this process
    skipped: int  # present before this run started (all ranks)
    seconds: float
    npz: Optional[Path] = None
    rank: int = 0
    world: int = 1


# --- settings and the manifest ----------------------------------------------------------------------
def _weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the state_dict (names, dtypes, shapes, bytes): the same weights give the same hash
    whatever file they came from."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _settings(model, config: ModelConfig, *, sampler, steps, eta, variant, clip_x0, seed, dtype, backend, noise,
              model_batch, device, image_hw, channels_last) -> dict:
    """Everything an image's bits depend on besides its index (num_images is not: it only adds images)."""
    out = {"model_sha256": _weights_sha256(model), "config": config.to_dict(), "sampler": sampler, "steps": steps,
           "eta": eta, "variant": variant, "clip_x0": clip_x0, "seed": seed, "dtype": str(dtype).replace("torch.", ""),
           "backend": backend, "noise": noise, "model_batch": model_batch, "device_type": device.type,
           "image_size": list(image_hw), "channels": config.unet.image_channels, "channels_last": channels_last}
    if device.type == "cpu":
        out["cpu_threads"] = torch.get_num_threads()
    return out


def _differences(old: dict, new: dict) -> List[str]:
    return [f"{k}: folder has {_short(old.get(k))}, this run {_short(new.get(k))}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _short(v) -> str:
    text = json.dumps(v, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(data, indent=1, sort_keys=True).encode()))


# --- the folder -------------------------------------------------------------------------------------
def _make_folder(out_dir: Path) -> None:
    """Check (and create) out_dir; ValueError naming the problem."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create --out-dir {out_dir}: {e.strerror or e}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ValueError(f"--out-dir {out_dir} is not writable")


def _prepare_folder(out_dir: Path, num_images: int, settings: dict, npz: Optional[Path]) -> List[int]:
    """With out_dir made and locked: write or check its manifest, remove our stale temp files (no other
    run is writing: the lock); returns the indices of the images present. ValueError naming the problem."""
    present, foreign = [], []
    for entry in os.scandir(out_dir):
        m = _IMAGE_RE.match(entry.name)
        if m and entry.is_file():
            present.append(int(m.group(1)))
        elif _TEMP_RE.match(entry.name) and entry.is_file():
            os.unlink(entry.path)  # a write that a kill interrupted: never a complete image
        elif entry.name not in (MANIFEST, LOCK_NAME) and not (npz is not None and Path(entry.path) == npz):
            foreign.append(entry.name)
    if foreign:
        raise ValueError(f"--out-dir {out_dir} holds files this run did not write ({', '.join(sorted(foreign)[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}): use an empty or new folder")
    manifest = out_dir / MANIFEST
    if manifest.exists():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{manifest}: unreadable manifest ({e})") from None
        if not isinstance(old, dict) or old.get("format") != _FORMAT:
            raise ValueError(f"{manifest}: not a ddpm_fast sampling manifest")
        diff = _differences(old.get("settings", {}), settings)
        if diff:
            hint = (" or the folder's thread count (OMP_NUM_THREADS; torchrun sets 1)"
                    if any(d.startswith("cpu_threads") for d in diff) else "")
            raise ValueError(f"{out_dir} holds a run with other settings ({'; '.join(diff)}): use another --out-dir"
                             f"{hint}")
    elif present:
        raise ValueError(f"--out-dir {out_dir} holds images but no {MANIFEST}: use an empty or new folder")
    beyond = [i for i in present if i >= num_images]
    if beyond:
        raise ValueError(f"{out_dir} already holds {image_name(max(beyond))}, beyond --num-images {num_images}: "
                         "ask for at least as many images as the folder holds")
    _write_json(manifest, {"format": _FORMAT, "num_images": max(num_images, _recorded_n(manifest)),
                           "settings": settings})
    return sorted(present)


def _recorded_n(manifest: Path) -> int:
    try:
        return int(json.loads(manifest.read_text()).get("num_images", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def _ranges(indices: Sequence[int]) -> List[Tuple[int, int]]:
    """Sorted indices as [start, stop) runs."""
    out: List[Tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def _share(missing: List[Tuple[int, int]], rank: int, world: int) -> List[Tuple[int, int]]:
    """Rank `rank`'s contiguous share of the missing images: the k-th of `world` equal slices of them."""
    total = sum(b - a for a, b in missing)
    lo, hi = total * rank // world, total * (rank + 1) // world
    out, seen = [], 0
    for a, b in missing:
        s, e = max(a, a + lo - seen), min(b, a + hi - seen)
        if s < e:
            out.append((s, e))
        seen += b - a
    return out


def _batches(ranges: List[Tuple[int, int]], batch_size: int) -> Iterator[Tuple[int, int]]:
    for a, b in ranges:
        for s in range(a, b, batch_size):
            yield s, min(s + batch_size, b)


# --- sampling --------------------------------------------------------------------------------------
def _image_generators(seed: int, first: int, count: int) -> List[torch.Generator]:
    """noise="generator": image i's own CPU generator, seeded from (seed, i) through numpy's SeedSequence
    (distinct, well-mixed streams for neighbouring i and seeds)."""
    seeds = [int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0])
             for i in range(first, first + count)]
    return [torch.Generator().manual_seed(s) for s in seeds]


def _batch(model, config, first: int, batch_size: int, opts: dict) -> torch.Tensor:
    """uint8 [batch_size, H, W, C] for images first .. first + batch_size - 1."""
    noise_kw = ({"seed": opts["seed"], "image_offset": first} if opts["noise"] == "philox"
                else {"generator": _image_generators(opts["seed"], first, batch_size)})
    images = sample(model, batch_size=batch_size, num_inference_steps=opts["steps"], sampler=opts["sampler"],
                    eta=opts["eta"], output_type="pt", progress=False, device=opts["device"], dtype=opts["dtype"],
                    backend=opts["backend"], variant=opts["variant"], clip_x0=opts["clip_x0"], config=config,
                    image_size=opts["image_hw"], channels_last=opts["channels_last"], noise=opts["noise"],
                    model_batch=opts["model_batch"], **noise_kw)
    return to_uint8_hwc(images)


def _load(model_or_checkpoint, config, device, dtype):
    if isinstance(model_or_checkpoint, (str, os.PathLike)):
        if config is not None:
            raise ValueError("config must be None when sampling from a checkpoint (it carries its own config)")
        from .checkpoint import load_checkpoint

        return load_checkpoint(model_or_checkpoint, device=device, dtype=dtype)
    if not isinstance(model_or_checkpoint, torch.nn.Module):
        raise ValueError("model_or_checkpoint must be an nn.Module or a checkpoint path, got "
                         f"{type(model_or_checkpoint).__name__}")
    if config is None:
        config = ModelConfig(unet=model_or_checkpoint.config)
    return model_or_checkpoint.to(device=device, dtype=dtype), config


def _check_num_images(num_images) -> int:
    if check_int("num_images", num_images, low=1) > MAX_IMAGES:
        raise ValueError(f"num_images must be <= {MAX_IMAGES} (six-digit file names), got {num_images}")
    return int(num_images)


def _options(config, device, *, num_images, batch_size, sampler, num_inference_steps, eta, variant, clip_x0, seed,
             dtype, backend, noise, model_batch, image_size, channels_last) -> dict:
    _check_num_images(num_images)
    if check_int("batch_size", batch_size, low=1) > MAX_BATCH:
        raise ValueError(f"batch_size must be <= {MAX_BATCH}, got {batch_size}")
    if noise not in NOISE_MODES:
        raise ValueError(f"unknown noise {noise!r}; choose one of {NOISE_MODES}")
    if check_int("seed", seed, low=0) >= 2 ** 63:
        raise ValueError(f"seed must be below 2^63, got {seed}")
    steps = num_inference_steps
    if steps is None:
        steps = config.diffusion.n_steps if sampler == "ddpm" else min(DEFAULT_DDIM_STEPS, config.diffusion.n_steps)
    model_batch = check_int("model_batch", model_batch if model_batch is not None else _MODEL_BATCH[device.type], 1)
    variant, clip_x0 = model_defaults(config.diffusion, sampler, variant, clip_x0)
    return {"sampler": sampler, "steps": steps, "eta": float(eta), "variant": variant, "clip_x0": bool(clip_x0),
            "seed": int(seed), "dtype": dtype, "backend": backend, "noise": noise, "model_batch": model_batch,
            "device": device, "image_hw": image_hw(config.unet, image_size), "channels_last": bool(channels_last)}


def sample_batches(model_or_checkpoint, num_images: int, batch_size: Optional[int] = None, *,
                   indices: Optional[Sequence[int]] = None, config: Optional[ModelConfig] = None,
                   sampler: str = "ddpm", num_inference_steps: Optional[int] = None, eta: float = 0.0,
                   variant: Optional[str] = None, clip_x0: Optional[bool] = None, seed: int = 0, device=None,
                   dtype=torch.float32,
                   backend: str = "fast", noise: str = "philox", model_batch: Optional[int] = None,
                   image_size=None, channels_last: bool = False) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Yield (indices [b] int64, images uint8 [b, H, W, C]) for images 0 .. num_images - 1 (or `indices`,
    a sorted subset), in batches of at most `batch_size`, one batch in memory at a time. Image i is the
    same whatever the batch size (see the module docstring). Defaults: the fast backend, Philox noise."""
    model, config, opts = _setup(model_or_checkpoint, config, device, dtype, num_images, batch_size, locals())
    wanted = _ranges(sorted(set(indices)) if indices is not None else range(num_images))
    yield from _iterate(model, config, opts, wanted, opts["batch_size"])


def _setup(model_or_checkpoint, config, device, dtype, num_images, batch_size, kw):
    from ..devices import parse_device, parse_dtype

    dev = parse_device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = parse_dtype(dtype)
    model, config = _load(model_or_checkpoint, config, dev, dtype)
    batch_size = batch_size if batch_size is not None else default_batch_size(dev)
    opts = _options(config, dev, num_images=num_images, batch_size=batch_size, dtype=dtype,
                    **{k: kw[k] for k in ("sampler", "num_inference_steps", "eta", "variant", "clip_x0", "seed",
                                          "backend", "noise", "model_batch", "image_size", "channels_last")})
    opts["batch_size"] = batch_size
    return model, config, opts


def _iterate(model, config, opts, ranges, batch_size):
    for start, stop in _batches(ranges, batch_size):
        # Every batch has batch_size images (the last padded with the ones after it, dropped here): one
        # shape per run, so the fast backend's kept CUDA graph serves every batch.
        images = _batch(model, config, start, batch_size, opts)
        yield np.arange(start, stop), images[:stop - start]


# --- writing ----------------------------------------------------------------------------------------
class _Writer:
    """PNG encode + atomic write on a thread behind a bounded queue. put() blocks when _QUEUE_BATCHES
    batches wait (memory stays bounded); an error on the thread is raised by the next put() or close()."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.queue: "queue.Queue" = queue.Queue(maxsize=_QUEUE_BATCHES)
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="ddpm_fast-png-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain, so put() never blocks forever after a failure
            try:
                for i, a in zip(*item):
                    img = Image.fromarray(np.ascontiguousarray(a[..., 0] if a.shape[-1] == 1 else a))
                    # No fsync per image: the rename is atomic against a killed process (the page cache
                    # survives it); the manifest and .npz, written once, are fsynced.
                    write_atomic(self.out_dir / image_name(int(i)), lambda f, img=img: img.save(f, format="PNG"),
                                 durable=False)
            except BaseException as e:  # noqa: BLE001 - re-raised on the sampling thread
                self.error = e

    def _raise(self) -> None:
        if self.error is not None:
            raise ValueError(f"writing images to {self.out_dir} failed: {self.error}") from self.error

    def put(self, indices: np.ndarray, images: np.ndarray) -> None:
        self._raise()
        self.queue.put((indices, images))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise()


def read_images(out_dir, num_images: int) -> Iterator[np.ndarray]:
    """The run's images 0 .. num_images - 1 as uint8 [H, W, C] arrays, in order."""
    out_dir = Path(out_dir)
    for i in range(num_images):
        with Image.open(out_dir / image_name(i)) as im:
            a = np.asarray(im)
        yield a[..., None] if a.ndim == 2 else a


def _write_npz(path: Path, out_dir: Path, num_images: int, hwc: Tuple[int, int, int]) -> None:
    """ADM's layout (np.load(path)["arr_0"]: uint8 [N, H, W, C]), streamed one image at a time into the
    zip member so memory stays flat; written atomically like every other file."""
    header = {"descr": "|u1", "fortran_order": False, "shape": (num_images, *hwc)}

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
            with z.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, header)
                for a in read_images(out_dir, num_images):
                    if a.shape != hwc:
                        raise ValueError(f"an image in {out_dir} has shape {a.shape}, expected {hwc}")
                    member.write(np.ascontiguousarray(a, dtype=np.uint8).tobytes())

    write_atomic(path, write)


# --- processes ---------------------------------------------------------------------------------------
def _distributed(device):
    """(rank, world, device, opened): WORLD_SIZE > 1 (torchrun) opens a process group (NCCL on CUDA, gloo
    on CPU) with a timeout, so no collective waits forever for a rank that died."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device, False
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device, False
    timeout = timedelta(seconds=float(os.environ.get("DDPM_FAST_DIST_TIMEOUT", "1800")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device, True


def _from_rank0(value, world: int):
    """Rank 0's `value` on every rank: (missing ranges, skipped count) or an error message to raise."""
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sample_to_folder(model_or_checkpoint, out_dir, num_images: int, batch_size: Optional[int] = None, *,
                     npz=None, progress: bool = True, config: Optional[ModelConfig] = None, device=None,
                     **kwargs) -> RunResult:
    """Write images 0 .. num_images - 1 to out_dir/000000.png ... (and, with `npz`, one .npz in ADM's
    layout), skipping those already there; under torchrun each rank draws its share. Keyword arguments
    as sample_batches (sampler, num_inference_steps, eta, variant, clip_x0, seed, dtype, backend, noise,
    model_batch, image_size, channels_last). Raises ValueError naming the problem for bad arguments, a
    folder that is not a directory, unwritable, holds foreign files or a run with other settings."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    npz = Path(npz) if npz is not None else None
    if npz is not None and (npz.suffix != ".npz" or npz.is_dir()):
        raise ValueError(f"--npz {npz}: must be a file name ending in .npz")
    if npz is not None and not (npz.parent.is_dir() and os.access(npz.parent, os.W_OK | os.X_OK)):
        # Checked now, not when the run is over.
        raise ValueError(f"--npz {npz}: its folder {npz.parent} does not exist or is not writable")
    from ..devices import parse_device

    dev = parse_device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, dev, opened = _distributed(dev)
    held = ExitStack()  # rank 0's folder lock, for the whole run (npz included)
    try:
        _check_num_images(num_images)
        if world > num_images:
            raise ValueError(f"{world} processes for {num_images} images: use at most as many processes as images")
        dtype = kwargs.pop("dtype", torch.float32)
        model, config, opts = _setup(model_or_checkpoint, config, dev, dtype, num_images, batch_size,
                                     _defaults(kwargs))
        state = None
        if rank == 0:
            try:
                settings = _settings(model, config, device=dev, image_hw=opts["image_hw"],
                                     **{k: opts[k] for k in ("sampler", "steps", "eta", "variant", "clip_x0", "seed",
                                                             "dtype", "backend", "noise", "model_batch",
                                                             "channels_last")})
                _make_folder(out_dir)
                held.enter_context(folder_lock(out_dir))
                present = _prepare_folder(out_dir, num_images, settings, npz)
                missing = _ranges(sorted(set(range(num_images)) - set(present)))
                state = (missing, len(present))
            except ValueError as e:
                state = str(e)
        state = _from_rank0(state, world)
        if isinstance(state, str):
            raise ValueError(state)
        missing, skipped = state
        mine = _share(missing, rank, world)
        written = _draw_share(model, config, opts, out_dir, mine, num_images, skipped, world,
                              progress and rank == 0)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        if npz is not None and rank == 0:
            _write_npz(npz, out_dir, num_images, (*opts["image_hw"], config.unet.image_channels))
        return RunResult(out_dir, num_images, written, skipped, time.perf_counter() - start, npz, rank, world)
    finally:
        held.close()
        if opened:
            import torch.distributed as dist

            dist.destroy_process_group()


def _defaults(kwargs: dict) -> dict:
    known = {"sampler": "ddpm", "num_inference_steps": None, "eta": 0.0, "variant": None, "clip_x0": None,
             "seed": 0, "backend": "fast", "noise": "philox", "model_batch": None, "image_size": None,
             "channels_last": False}
    unknown = set(kwargs) - set(known)
    if unknown:
        raise TypeError(f"sample_to_folder() got unexpected keyword arguments {sorted(unknown)}")
    return {**known, **kwargs}


def _draw_share(model, config, opts, out_dir, ranges, num_images, skipped, world, progress) -> int:
    """Sample and write this rank's ranges; returns the number of images written."""
    from tqdm.auto import tqdm

    # Rank 0's bar stands for the whole run: it advances by world x its own images (the shares are equal).
    bar = tqdm(total=num_images, initial=skipped, unit="img", desc="sampling to files", disable=not progress,
               dynamic_ncols=True)
    writer = _Writer(out_dir)
    written = 0
    try:
        for idx, images in _iterate(model, config, opts, ranges, opts["batch_size"]):
            writer.put(idx, images)
            written += len(idx)
            bar.update(min(len(idx) * world, num_images - bar.n))
    finally:
        try:
            writer.close()
        finally:
            bar.close()
    return written
