"""The `ddpm-fast` command (also `python -m ddpm_fast`).

    ddpm-fast sample [--checkpoint PATH | --preset NAME] [--num-images N] [--steps S] [--sampler ddpm|ddim]
                     [--eta E] [--variant labml|paper|posterior] [--clip-x0] [--seed K] [--device D]
                     [--dtype auto|fp32|fp16|bf16] [--backend reference|fast] [--channels-last] [--nrow R]
                     [--out grid.png | --out-dir DIR [--batch-size B] [--npz FILE] [--noise philox|generator]
                     [--model-batch C]] [--no-progress]
    ddpm-fast train --data DIR|digits --out RUN [--preset NAME] [--steps N] [--resume] ...
    ddpm-fast bench-report results.json [--out-dir DIR]   (a development tool: ddpm_fast.testing)

Every argparse parser of the package lives here; the library (sampling, training, io) takes plain
arguments. The commands import what they run lazily, so `ddpm-fast --help` stays quick.

User errors (bad arguments, unreadable checkpoints, unwritable outputs) print one line,
`ddpm-fast: error: ...`, exit non-zero and write nothing; only bugs show a traceback.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

from .config import DDPM_PRESETS, PRESETS, get_preset

PROG = "ddpm-fast"
DEFAULT_PRESET = "tiny"
# The seed of a randomly initialised model is fixed, so --seed picks the samples, not the network.
INIT_SEED = 0
# All images are drawn as one batch: a typo such as 100000000 should be refused at once, not end in an
# allocator error. 65536 tiny-preset images are ~200 MB per x_t; larger models run out of memory
# sooner, which main() reports as one line too.
MAX_IMAGES = 65536
# With --out-dir the images go in batches to six-digit file names (ddpm_fast.sampling.runs: MAX_IMAGES, MAX_BATCH).
MAX_RUN_IMAGES = 1_000_000
MAX_RUN_BATCH = 65536



class UserError(Exception):
    """A problem with the user's input; reported as one line without a traceback."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage block and then the error; the contract is a single line.
    def error(self, message):
        raise UserError(message)


def number_arg(kind, lo, hi=None, lo_open=False, hi_open=True):
    """An argparse type (shared by every subcommand): `kind` (int or float) in the given range, with a clear message otherwise."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
        if not ok:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text}" if kind is int and hi is None else
                                             f"must be in {'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}"
                                             f"{')' if hi_open or hi is None else ']'}, got {text}")
        return v
    return parse


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="PATH",
                     help="a model file, a training checkpoint (its EMA weights), a run folder or a diffusers "
                          "DDPM model folder such as google/ddpm-cifar10-32's (default: the "
                          f"shipped model if installed, else a randomly initialised '{DEFAULT_PRESET}' model)")
    src.add_argument("--preset", metavar="NAME", choices=sorted(PRESETS) + sorted(DDPM_PRESETS),
                     help=f"sample from a randomly initialised preset "
                          f"({', '.join(sorted(PRESETS) + sorted(DDPM_PRESETS))}): noise, "
                          "for trying the pipeline")
    p.add_argument("--num-images", type=number_arg(int, 1, MAX_RUN_IMAGES, hi_open=False), default=16, metavar="N",
                   help=f"images to draw (default 16): in one batch for the grid (at most {MAX_IMAGES}), in "
                        f"batches with --out-dir (at most {MAX_RUN_IMAGES})")
    p.add_argument("--steps", type=number_arg(int, 1), default=None, metavar="S",
                   help="sampler steps, strided over the schedule (default: T for ddpm, 50 for ddim)")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="(default: ddpm)")
    p.add_argument("--eta", type=number_arg(float, 0.0, 1.0, hi_open=False), default=0.0, metavar="E",
                   help="DDIM noise scale in [0, 1] (ddim only; default 0)")
    p.add_argument("--variant", choices=["labml", "paper", "posterior"], default=None,
                   help="DDPM variance (ddpm only): labml (noise at every step), paper (none at the last), "
                        "posterior (default: the model's own: labml, or what a diffusers scheduler config says)")
    p.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None,
                   help="clip the predicted x0 to the data range (default: the model's own: off, or a diffusers "
                        "scheduler config's clip_sample)")
    p.add_argument("--seed", type=number_arg(int, 0, 2 ** 63), default=0, metavar="K", help="noise seed (default 0)")
    p.add_argument("--device", default=None, metavar="D", help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="model compute dtype (default auto: the fast backend on a CPU runs with --channels-last, in "
                        "bf16 where the CPU has native bf16 (AVX512_BF16 / AMX: measured faster with the same sample "
                        "quality), else fp32; fp32 everywhere else)")
    p.add_argument("--backend", choices=["reference", "fast"], default="fast",
                   help="fast (default): fused kernels, fused step, CUDA graph on a GPU; reference: plain PyTorch")
    p.add_argument("--channels-last", action="store_true",
                   help="fast backend: run the UNet in NHWC (opt-in; not yet timed on a GPU)")
    p.add_argument("--nrow", type=number_arg(int, 1), default=None, metavar="R", help="images per grid row")
    p.add_argument("--out", default="samples.png", metavar="PATH", help="output image (default samples.png)")
    run = p.add_argument_group("runs to a folder (one PNG per image, resumable, torchrun-aware)")
    run.add_argument("--out-dir", default=None, metavar="DIR",
                     help="write DIR/000000.png ... instead of a grid; a rerun skips the images already there")
    run.add_argument("--batch-size", type=number_arg(int, 1, MAX_RUN_BATCH, hi_open=False), default=None,
                     metavar="B", help="images per batch (default: 16 on CPU, 64 on CUDA); never changes an image")
    run.add_argument("--npz", default=None, metavar="FILE",
                     help="also write FILE.npz at the end (arr_0: uint8 [N, H, W, C], the ADM evaluator's input)")
    run.add_argument("--noise", choices=["philox", "generator"], default=None,
                     help="philox (default): counter-based noise keyed by (seed, image), the same on both "
                          "backends; generator: a CPU torch.Generator per image seeded from (seed, image)")
    run.add_argument("--model-batch", type=number_arg(int, 1, MAX_RUN_BATCH, hi_open=False), default=None,
                     metavar="C", help="images per model call (default: 16 on CPU, 64 on CUDA); part of the "
                                       "run's settings, since kernels sum in a shape-dependent order")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_sample_from_args)


def run_sample_from_args(args: argparse.Namespace) -> int:
    # Imported here so `ddpm-fast --help` stays quick and the parser does not depend on them.
    from .devices import DTYPE_NAMES, parse_device
    from .io.images import image_format_for_path, image_mode, make_grid, save_image_atomic
    from .sampling import DEFAULT_DDIM_STEPS, DEFAULT_VARIANT, sample

    _check_run_flags(args)
    out = Path(args.out)
    if args.out_dir is None:
        image_format_for_path(out)  # refuse a bad output path before any work
    if args.sampler == "ddpm" and args.eta != 0.0:
        raise UserError("--eta applies to --sampler ddim only")
    if args.sampler == "ddim" and args.variant not in (None, DEFAULT_VARIANT):
        raise UserError("--variant applies to --sampler ddpm only (DDIM's noise is set by --eta)")
    if args.channels_last and args.backend != "fast":
        raise UserError("--channels-last applies to --backend fast only")
    # `is not None`, not truthiness: an empty --device or --checkpoint (an unset shell variable) is an
    # error, not a request for the default.
    device = parse_device(args.device, what="--device") if args.device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    args.dtype, args.channels_last = _auto_dtype(args, device)
    dtype = DTYPE_NAMES[args.dtype]

    if args.out_dir is not None:
        return _sample_to_folder_from_args(args, device, dtype)
    model, config, source, notice = _model_from_args(args, device, dtype)
    n_train = config.diffusion.n_steps
    if args.steps is not None and args.steps > n_train:
        raise UserError(f"--steps {args.steps} exceeds the model's schedule length T={n_train}")
    # Now that the channel count is known, before any sampling: can the grid be made and written at all?
    if config.unet.image_channels not in (1, 3):
        raise UserError(f"this model makes {config.unet.image_channels}-channel images; the image grid takes "
                        "1 (grayscale) or 3 (RGB) channels: use ddpm_fast.sample() from Python instead")
    image_format_for_path(out, mode=image_mode(config.unet.image_channels))
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    images = sample(model, batch_size=args.num_images, num_inference_steps=args.steps, sampler=args.sampler,
                    eta=args.eta, generator=generator, output_type="pt", progress=not args.no_progress,
                    device=device, dtype=dtype, backend=args.backend, variant=args.variant,
                    clip_x0=args.clip_x0, config=config, channels_last=args.channels_last)
    seconds = time.perf_counter() - start
    save_image_atomic(make_grid(images, nrow=args.nrow), out)
    if notice:  # only after a successful save, so an error stays the only line
        print(f"{PROG}: note: {notice}", file=sys.stderr)
    n_steps = args.steps or (n_train if args.sampler == "ddpm" else min(DEFAULT_DDIM_STEPS, n_train))
    print(out)
    print(f"{args.num_images} images, {n_steps} steps, {args.sampler} sampler, {source}, {device}, "
          f"{args.dtype}, {args.backend} backend, {seconds:.2f} s")
    return 0


def _check_run_flags(args: argparse.Namespace) -> None:
    """The flags that only make sense with (or without) --out-dir."""
    if args.out_dir is None:
        for flag, value in (("--npz", args.npz), ("--batch-size", args.batch_size),
                            ("--model-batch", args.model_batch), ("--noise", args.noise)):
            if value is not None:
                raise UserError(f"{flag} applies to runs into a folder: add --out-dir DIR")
        if args.num_images > MAX_IMAGES:
            raise UserError(f"--num-images {args.num_images}: the grid draws every image in one batch, at most "
                            f"{MAX_IMAGES}; use --out-dir DIR for more")
        return
    if not args.out_dir.strip():
        raise UserError("--out-dir must not be empty")
    if args.out != "samples.png":
        raise UserError("--out (the grid image) and --out-dir (one file per image) exclude each other")
    if args.nrow is not None:
        raise UserError("--nrow applies to the grid image, not to --out-dir")
    if args.npz is not None and not args.npz.endswith(".npz"):
        raise UserError(f"--npz {args.npz}: the file name must end in .npz")


def _auto_dtype(args: argparse.Namespace, device) -> tuple:
    """(dtype name, channels_last) for --dtype auto: see its help; benchmarks/PERF_NOTES.md has the numbers."""
    from .devices import cpu_has_native_bf16

    if args.dtype != "auto":
        return args.dtype, args.channels_last
    if device.type == "cpu" and args.backend == "fast":
        # channels_last: the packed oneDNN convs take it (main job fp32: 1.41x the reference vs 1.25x in NCHW).
        return ("bf16" if cpu_has_native_bf16() else "fp32"), True
    return "fp32", args.channels_last


def _model_from_args(args: argparse.Namespace, device, dtype):
    """(model, config, source description, notice or None) for --checkpoint / --preset / the default."""
    from .io.checkpoint import default_checkpoint_path, load_checkpoint
    from .reference import build_unet

    if args.checkpoint is not None and not args.checkpoint.strip():
        raise UserError("--checkpoint must not be empty (give a .safetensors path, or leave it out for the "
                        "default model)")
    checkpoint = Path(args.checkpoint) if args.checkpoint is not None else None
    if checkpoint is None and args.preset is None:
        checkpoint = default_checkpoint_path()
    notice = None
    if checkpoint is not None:
        model, config = load_checkpoint(checkpoint, device=device, dtype=dtype)
        source = str(checkpoint)
    else:
        preset = args.preset or DEFAULT_PRESET
        if args.preset is None:
            notice = (f"no trained model is installed; sampling from a randomly initialised '{preset}' model, "
                      "so the images are noise until a model is trained")
        else:
            notice = f"preset '{preset}' is randomly initialised; the images are noise"
        config = get_preset(preset)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            model = build_unet(config.unet)
        model = model.to(device=device, dtype=dtype)
        source = f"random {preset}"
    return model, config, source, notice


def _sample_to_folder_from_args(args: argparse.Namespace, device, dtype) -> int:
    from .sampling.runs import sample_to_folder

    # Loaded on the CPU: under torchrun each rank moves it to its own GPU (cuda:LOCAL_RANK).
    model, config, source, notice = _model_from_args(args, torch.device("cpu"), dtype)
    if args.steps is not None and args.steps > config.diffusion.n_steps:
        raise UserError(f"--steps {args.steps} exceeds the model's schedule length T={config.diffusion.n_steps}")
    if config.unet.image_channels not in (1, 3, 4):
        raise UserError(f"this model makes {config.unet.image_channels}-channel images; PNG takes 1, 3 or 4")
    result = sample_to_folder(model, args.out_dir, args.num_images, args.batch_size, npz=args.npz, config=config,
                              device=device, progress=not args.no_progress, sampler=args.sampler,
                              num_inference_steps=args.steps, eta=args.eta, variant=args.variant,
                              clip_x0=args.clip_x0, seed=args.seed, dtype=dtype, backend=args.backend,
                              noise=args.noise or "philox", model_batch=args.model_batch,
                              channels_last=args.channels_last)
    if result.rank != 0:
        return 0
    if notice:
        print(f"{PROG}: note: {notice}", file=sys.stderr)
    rate = result.written / result.seconds if result.seconds > 0 else 0.0
    print(result.out_dir)
    extra = f", {result.npz}" if result.npz is not None else ""
    print(f"{args.num_images} images ({result.skipped} already there, {result.written} drawn by rank 0 of "
          f"{result.world}){extra}, {args.sampler} sampler, {source}, {args.backend} backend, {args.dtype}, "
          f"{result.seconds:.2f} s, {rate * result.world:.1f} images/s")
    return 0


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `train` subcommand's flags; values are range-checked at parse time."""
    from .training.loop import MAX_IMAGE_SIZE

    a = parser.add_argument
    a("--data", required=True, help="a folder of PNG/JPEG images (searched recursively), or 'digits' "
      "(scikit-learn's handwritten digits, upscaled to 16x16)")
    a("--out", required=True, help="run folder: checkpoint, model, loss.csv, samples/")
    a("--preset", default=None, choices=sorted(PRESETS) + sorted(DDPM_PRESETS),
      help="model shape: a labml UNet preset or a DDPM-paper one in diffusers' layout (ddpm-cifar10, ddpm-256) "
           "(default: digits16, or the checkpoint's with --resume)")
    a("--image-size", type=number_arg(int, 1, MAX_IMAGE_SIZE, hi_open=False), default=None,
      help=f"override the preset's image size (at most {MAX_IMAGE_SIZE})")
    a("--channels", type=int, choices=(1, 3), default=None, help="override the preset's image channels")
    a("--steps", type=number_arg(int, 1), default=10_000, help="total optimizer steps (default: 10000)")
    a("--batch-size", type=number_arg(int, 1), default=64, help="global batch size (default: 64)")
    a("--lr", type=number_arg(float, 0.0, lo_open=True), default=3e-4, help="Adam learning rate (default: 3e-4)")
    a("--warmup-steps", type=number_arg(int, 0), default=100, help="linear lr warm-up steps (default: 100)")
    a("--ema-decay", type=number_arg(float, 0.0, 1.0), default=0.999, help="EMA decay in [0, 1) (default: 0.999)")
    a("--grad-clip", type=number_arg(float, 0.0), default=1.0, help="max gradient norm, 0 = off (default: 1.0)")
    a("--amp", choices=("off", "bf16", "fp16"), default="off", help="mixed precision on CUDA (default: off)")
    a("--resume", action="store_true",
      help="continue from OUT/checkpoint.safetensors if it exists (else start a new run)")
    a("--sample-every", type=number_arg(int, 0), default=1000, help="steps between sample grids, 0 = off")
    a("--checkpoint-every", type=number_arg(int, 1), default=500, help="steps between checkpoints (default: 500)")
    a("--log-every", type=number_arg(int, 1), default=50, help="steps per loss.csv row (default: 50)")
    a("--seed", type=number_arg(int, 0, 2 ** 63), default=0)
    a("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available); ignored under torchrun")
    a("--num-workers", type=number_arg(int, 0), default=0, help="DataLoader workers for image folders")
    a("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_train_from_args(args: argparse.Namespace) -> int:
    """Validate parsed `train` arguments, run training, print where things went. Returns 0."""
    import dataclasses

    from .config import DDPMUNetConfig, ModelConfig
    from .devices import parse_device
    from .training import train

    over = {k: v for k, v in (("image_size", args.image_size), ("image_channels", args.channels)) if v is not None}
    config = None if args.preset is None and not over else get_preset(args.preset or "digits16")
    if over and isinstance(config.unet, DDPMUNetConfig):  # diffusers' names for the same two fields
        over = {"sample_size": over.get("image_size", config.unet.sample_size),
                "in_channels": over.get("image_channels", config.unet.in_channels),
                "out_channels": over.get("image_channels", config.unet.out_channels)}
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


def add_bench_report_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("json", help="pytest-benchmark JSON (pytest benchmarks/ --benchmark-only "
                                     "--benchmark-json=FILE)")
    parser.add_argument("--out-dir", default=None,
                        help="where to write <stem>.md and <stem>.png (default: next to the JSON)")
    parser.add_argument("--note", default=None, help="a sentence to show under the report's header")
    return parser


def run_bench_report_from_args(args: argparse.Namespace) -> int:
    from .testing.bench_report import make_report  # a development tool, imported only for this command

    md, png = make_report(args.json, args.out_dir, note=args.note)
    print(f"wrote {md}")
    print(f"wrote {png}" if png else "no PNG chart: matplotlib is not installed")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Fast DDPM/DDIM sampling with a plain PyTorch reference.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_sample_arguments(sub.add_parser("sample", help="draw images and write them as one grid image",
                                        description="Draw images from a DDPM model and write a grid image."))
    p = sub.add_parser("train", help="train a model", description="Train a DDPM UNet (see ddpm_fast.train).")
    add_train_arguments(p).set_defaults(func=run_train_from_args)
    p = sub.add_parser("bench-report", help="summarise benchmark results",
                       description="pytest-benchmark JSON -> a markdown speedup table and a PNG chart.")
    add_bench_report_arguments(p).set_defaults(func=run_bench_report_from_args)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help / --version
            return int(e.code or 0)
        return int(args.func(args) or 0)
    except (UserError, ValueError, OSError) as e:
        # ValueError/OSError are what the library raises for bad input and bad files.
        _print_error(str(e) or type(e).__name__)
        return 2
    except (MemoryError, RuntimeError) as e:
        # Running out of memory is the size the user asked for, not a bug (torch.OutOfMemoryError is a
        # RuntimeError; the CPU allocator raises a plain RuntimeError); any other RuntimeError is a bug.
        if not _is_out_of_memory(e):
            raise
        _print_error(f"out of memory: {str(e) or type(e).__name__} (try fewer images or a smaller batch)")
        return 2
    except KeyboardInterrupt as e:
        print(f"{PROG}: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130


def _is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e).lower()
    return "can't allocate memory" in text or "out of memory" in text


def _print_error(message: str) -> None:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
