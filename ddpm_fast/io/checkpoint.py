"""Checkpoints: one .safetensors file = the UNet's tensors + its ModelConfig as JSON metadata.

safetensors holds tensors only (no pickle), so loading a checkpoint can never run code. Every
check a loader can make is made, and every failure is a ValueError (FileNotFoundError for a
missing file) whose message starts with the path: the file parses, carries our metadata, the
config is valid, the tensor names and shapes are exactly those of the UNet the config builds,
and every tensor is float16/bfloat16/float32/float64 and finite.

load_checkpoint also takes what training writes: a training checkpoint (its EMA weights, the ones a
run samples with) and a run folder.

labml's own checkpoints are pickled state_dicts (.pt); `load_labml_state_dict` reads them with
torch.load(weights_only=True), whose unpickler refuses anything but tensors and plain containers.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..config import DiffusionConfig, ModelConfig, UNetConfig, get_preset
from ..reference.unet import UNet
from .atomic import write_atomic
from .diffusers import is_diffusers_folder, load_diffusers
from .state import (build_model, first_line, listing, match_config, parse_load_device, parse_load_dtype,
                    read_pickled_state_dict)

__all__ = ["save_checkpoint", "load_checkpoint", "load_extra_tensors", "load_labml_state_dict",
           "default_checkpoint_path", "write_model_file", "CONFIG_KEY", "FORMAT", "MODEL_FORMAT", "TRAIN_FORMAT",
           "EXTRA_PREFIX"]

# The package's two file formats, named in each file's "format" metadata: a model file (weights +
# config: what sample() loads) and a training checkpoint (training/checkpoint.py writes it).
CONFIG_KEY = "ddpm_fast_config"
MODEL_FORMAT = FORMAT = "ddpm_fast/1"
TRAIN_FORMAT = "ddpm_fast/train-1"
# Extra tensors (EMA weights, optimizer moments, step counters...) live beside the model's under this
# prefix; no UNet state_dict key contains a '/', so the two can never collide.
EXTRA_PREFIX = "extra/"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "digits16.safetensors"
# Where each format keeps the weights to sample with: a model file at the top level (its extras under
# EXTRA_PREFIX), a training checkpoint as the EMA copy beside model.*, optim.* and rng.* tensors.
WEIGHTS_PREFIX = {FORMAT: "", TRAIN_FORMAT: "ema."}
# What a training run folder holds (training.MODEL_NAME / CHECKPOINT_NAME), in the order load_checkpoint
# tries them: the exported EMA weights, then the full training state.
RUN_FILES = ("model.safetensors", "checkpoint.safetensors")

PathLike = Union[str, os.PathLike]


def default_checkpoint_path() -> Optional[Path]:
    """The shipped default model (ddpm_fast/assets/digits16.safetensors), or None if not installed."""
    return DEFAULT_CHECKPOINT if DEFAULT_CHECKPOINT.is_file() else None


def save_checkpoint(path: PathLike, model: torch.nn.Module, config: ModelConfig,
                    extra_tensors: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """Write the model's state_dict and `config` to ONE .safetensors file, atomically.

    The tensors are stored in their own dtype. `extra_tensors` (name -> tensor) are stored under
    'extra/<name>' and read back with `load_extra_tensors`. The file appears complete or not at all:
    it is written to a temporary file in the same directory, flushed, then os.replace'd into place.
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    path = Path(path)
    state = model.state_dict()
    match_config(f"cannot save {path}", config.unet, {k: tuple(v.shape) for k, v in state.items()},
                  "the model does not match config.unet")
    tensors: Dict[str, torch.Tensor] = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    for name, t in (extra_tensors or {}).items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"extra tensor names must be non-empty strings, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"extra tensor {name!r} is a {type(t).__name__}, not a tensor")
        # A clone: safetensors refuses tensors that share storage (e.g. views of one flat buffer).
        tensors[EXTRA_PREFIX + name] = t.detach().to("cpu").clone().contiguous()
    return write_model_file(path, tensors, config)


def write_model_file(path: PathLike, tensors: Mapping[str, torch.Tensor], config: ModelConfig,
                     metadata: Optional[Mapping[str, str]] = None) -> Path:
    """The one writer of model files: `tensors` (CPU, contiguous) + `config` (+ `metadata`), atomically.

    Refuses weights holding NaN or Inf (load_checkpoint would refuse the file) and destinations that
    are not regular files, each with a ValueError naming the path.
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"cannot save {path}: directory {parent} does not exist")
    if path.is_dir():  # else os.replace fails with an IsADirectoryError naming the temporary file
        raise ValueError(f"cannot save {path}: it is a directory; give a file name "
                         f"such as {path / 'model.safetensors'}")
    non_finite = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if non_finite:
        raise ValueError(f"cannot save {path}: tensors hold NaN or Inf: {listing(non_finite)}")
    meta = {CONFIG_KEY: config.to_json(), "format": MODEL_FORMAT, **(metadata or {})}
    data = save(dict(tensors), metadata=meta)
    write_atomic(path, lambda f: f.write(data))
    return path


def load_checkpoint(path: PathLike, device="cpu", dtype: Union[torch.dtype, str, None] = None
                    ) -> Tuple[UNet, ModelConfig]:
    """Load (UNet, ModelConfig) from a checkpoint; the model is in eval mode.

    path: a file written by save_checkpoint (as training writes RUN/model.safetensors), a training
    checkpoint (RUN/checkpoint.safetensors: its EMA weights are loaded, the ones a run samples with),
    a run folder (its model.safetensors, else its checkpoint.safetensors), or a diffusers model folder
    (unet/ + scheduler/, or a unet folder: a DDPMUNet, see io.diffusers).
    device: cpu or cuda[:i]. dtype: the parameters' dtype (default float32, whatever the file stores):
    a torch dtype or a name sample() accepts ("fp32", "fp16", "bf16", ...).
    """
    if (isinstance(path, (str, os.PathLike)) and os.fspath(path) and is_diffusers_folder(path)
            and not any((Path(path) / name).is_file() for name in RUN_FILES)):  # a run folder stays one
        return load_diffusers(path, device=device, dtype=dtype)
    path = _existing_file(path, run_folder=True)
    dev, dtype = parse_load_device(path, device), parse_load_dtype(dtype)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    except Exception as e:  # safetensors raises its own SafetensorError (an Exception) and OSError
        hint = ""
        if path.suffix in (".pt", ".pth", ".ckpt"):
            hint = " (a pickled labml state_dict? read it with ddpm_fast.load_labml_state_dict)"
        raise ValueError(f"{path}: not a valid safetensors file: {first_line(e)}{hint}") from None

    fmt = metadata.get("format")
    if fmt not in WEIGHTS_PREFIX or CONFIG_KEY not in metadata:
        raise ValueError(f"{path}: not a ddpm_fast checkpoint (metadata has format={fmt!r}, expected {FORMAT!r} "
                         f"(a model file) or {TRAIN_FORMAT!r} (a training checkpoint) and a {CONFIG_KEY!r} entry)")
    try:
        config = ModelConfig.from_json(metadata[CONFIG_KEY])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: bad config in metadata: {first_line(e)}") from None

    prefix = WEIGHTS_PREFIX[fmt]
    names = {k[len(prefix):]: k for k in keys if k.startswith(prefix) and not k.startswith(EXTRA_PREFIX)}
    what = "tensors do not match the UNet of its config" + (f" ({prefix}* tensors)" if prefix else "")
    match_config(str(path), config.unet, {name: shapes[k] for name, k in names.items()}, what)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            state = {name: f.get_tensor(k) for name, k in names.items()}
    except Exception as e:
        raise ValueError(f"{path}: cannot read tensors: {first_line(e)}") from None
    return build_model(path, config, state, dev, dtype), config


def load_extra_tensors(path: PathLike, device="cpu") -> Dict[str, torch.Tensor]:
    """The extra tensors save_checkpoint stored beside the model (names without the prefix)."""
    path = _existing_file(path)
    dev = parse_load_device(path, device)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            out = {k[len(EXTRA_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(EXTRA_PREFIX)}
    except Exception as e:
        raise ValueError(f"{path}: not a valid safetensors file: {first_line(e)}") from None
    return {k: v.to(dev) for k, v in out.items()}


def load_labml_state_dict(path: PathLike, config: Union[ModelConfig, UNetConfig, str], device="cpu",
                          dtype: Union[torch.dtype, str, None] = None) -> Tuple[UNet, ModelConfig]:
    """Load a labml-style pickled state_dict (.pt/.pth) into a UNet: (model in eval mode, config).

    The file may hold the bare state_dict or {"model": sd} / {"state_dict": sd}; a DDP "module." prefix
    is stripped. It is read with torch.load(weights_only=True): a pickle that carries code (or any
    object but tensors and plain containers) is refused with a ValueError and never executed.
    config: a ModelConfig, a UNetConfig (labml trains on [0, 1] images, so it gets
    DiffusionConfig(data_range=(0, 1))) or a preset name. device, dtype: as for load_checkpoint.
    """
    if isinstance(config, str):
        config = get_preset(config)
    elif isinstance(config, UNetConfig):
        config = ModelConfig(unet=config, diffusion=DiffusionConfig(data_range=(0.0, 1.0)))
    elif not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, UNetConfig or preset name, got {type(config).__name__}")
    path = _existing_file(path)
    dev, dtype = parse_load_device(path, device), parse_load_dtype(dtype)
    state = read_pickled_state_dict(path)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    match_config(str(path), config.unet, {k: tuple(v.shape) for k, v in state.items()},
                  "state_dict does not match the UNet of the given config")
    return build_model(path, config, dict(state), dev, dtype), config


# --------------------------------------------------------------------------------------------

def _existing_file(path: PathLike, run_folder: bool = False) -> Path:
    """`path` as a Path to an existing file; with `run_folder`, a folder stands for the first of RUN_FILES in it."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"expected a file path, got {type(path).__name__}")
    if not os.fspath(path):  # Path("") is the current directory
        raise ValueError("the checkpoint path is empty")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if run_folder and path.is_dir():
        for name in RUN_FILES:
            if (path / name).is_file():
                return path / name
        raise ValueError(f"{path}: not a file, nor a training run folder (it holds neither {' nor '.join(RUN_FILES)}), "
                         "nor a diffusers model folder (no config.json or unet/config.json)")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    return path


