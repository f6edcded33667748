"""Read a diffusers DDPM model folder (google/ddpm-cifar10-32 and kin) without importing diffusers.

A folder as `DDPMPipeline.save_pretrained` writes it (unet/config.json, unet/diffusion_pytorch_model.safetensors
or .bin, scheduler/scheduler_config.json), a flat one (config.json, the weights and scheduler_config.json side by
side), or the unet folder itself (its parent's scheduler/ is used when there is one, else DDPMScheduler's
defaults). Weights come from safetensors (no pickle at all) or, for older
folders, from a .bin read with torch.load(weights_only=True), whose unpickler refuses anything but tensors
and plain containers. Every config value is checked against the UNet2DModel / scheduler family ddpm_fast
implements, and anything outside it is refused with a ValueError naming the file and the field: a config
this code does not understand is never half-read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors import safe_open

from ..config import MAX_JSON_BYTES, DDPMUNetConfig, DiffusionConfig, ModelConfig, load_json
from ..reference.ddpm_unet import DDPMUNet
from .state import (build_model, first_line, match_config, parse_load_device, parse_load_dtype,
                    read_pickled_state_dict)

__all__ = ["is_diffusers_folder", "load_diffusers", "unet_config_from_diffusers", "diffusion_config_from_diffusers"]

UNET_CONFIG = "config.json"
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# UNet2DModel config keys ddpm_fast reads, each with the DDPMUNetConfig field it becomes.
_UNET_FIELDS = ("sample_size", "in_channels", "out_channels", "block_out_channels", "down_block_types",
                "up_block_types", "layers_per_block", "norm_num_groups", "norm_eps", "attention_head_dim",
                "downsample_padding", "freq_shift", "flip_sin_to_cos", "add_attention", "dropout")
# Keys whose only supported value is UNet2DModel's default for this family: another value is another network.
_UNET_FIXED = {"center_input_sample": False, "time_embedding_type": "positional", "time_embedding_dim": None,
               "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_type": "conv",
               "upsample_type": "conv", "act_fn": "silu", "attn_norm_num_groups": None,
               "resnet_time_scale_shift": "default", "class_embed_type": None, "num_class_embeds": None}
# Keys that do not change the network of a positional-embedding UNet2DModel.
_UNET_IGNORED = {"num_train_timesteps"}
# diffusers' own defaults for keys a config.json may omit (UNet2DModel.__init__).
_UNET_DEFAULTS = {"in_channels": 3, "out_channels": 3, "layers_per_block": 2, "norm_num_groups": 32,
                  "norm_eps": 1e-5, "attention_head_dim": 8, "downsample_padding": 1, "freq_shift": 0,
                  "flip_sin_to_cos": True, "add_attention": True, "dropout": 0.0,
                  "block_out_channels": (224, 448, 672, 896),
                  "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                  "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")}

_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
# Scheduler keys with only one supported value (the sampler implements exactly that).
_SCHED_FIXED = {"prediction_type": "epsilon", "thresholding": False, "timestep_spacing": "leading",
                "steps_offset": 0, "rescale_betas_zero_snr": False, "set_alpha_to_one": True}
_SCHED_IGNORED = {"tensor_format", "dynamic_thresholding_ratio", "sample_max_value", "variance_type",
                  "clip_sample", "clip_sample_range", "num_train_timesteps", "beta_start", "beta_end",
                  "beta_schedule", "trained_betas"}
# fixed_small: the posterior variance beta_tilde; fixed_large: beta_t, no noise at t = 0 (DDPMScheduler).
_VARIANCE = {"fixed_small": "posterior", "fixed_large": "paper"}


def is_diffusers_folder(path) -> bool:
    """True for a folder laid out as a diffusers model: unet/config.json, or a config.json of its own."""
    p = Path(path)
    return p.is_dir() and ((p / "unet" / UNET_CONFIG).is_file() or (p / UNET_CONFIG).is_file())


def load_diffusers(path, device="cpu", dtype=None) -> Tuple[DDPMUNet, ModelConfig]:
    """(DDPMUNet in eval mode, ModelConfig) from a diffusers model folder or its unet folder."""
    root = Path(path)
    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    dev, dtype = parse_load_device(root, device), parse_load_dtype(dtype)
    unet_cfg = unet_config_from_diffusers(_read_json(unet_dir / UNET_CONFIG))
    sched_path = _scheduler_path(root, unet_dir)
    sched = _read_json(sched_path) if sched_path is not None else {"_class_name": "DDPMScheduler"}
    try:
        diffusion = diffusion_config_from_diffusers(sched)
    except ValueError as e:
        raise ValueError(f"{sched_path}: {e}") from None
    config = ModelConfig(unet=unet_cfg, diffusion=diffusion)
    weights = _weights_file(unet_dir)
    # Sizes are checked before any tensor is read: a config may describe a network the file does not hold.
    shapes = _tensor_shapes(weights)
    match_config(str(weights), unet_cfg, {_new_name(k): s for k, s in shapes.items()},
                  "tensors do not match the UNet2DModel of its config.json")
    state = {_new_name(k): v for k, v in _read_tensors(weights).items()}
    return build_model(weights, config, state, dev, dtype), config


def unet_config_from_diffusers(raw: Dict[str, Any], where: str = UNET_CONFIG) -> DDPMUNetConfig:
    """The DDPMUNetConfig of a UNet2DModel config.json (a dict), or a ValueError naming the unsupported field."""
    cls = raw.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ValueError(f"{where}: _class_name {cls!r} is not supported (only UNet2DModel)")
    for key, value in raw.items():
        if key.startswith("_") or key in _UNET_FIELDS or key in _UNET_IGNORED:
            continue
        if key not in _UNET_FIXED:
            raise ValueError(f"{where}: unknown UNet2DModel field {key!r}; ddpm_fast does not guess what it means")
        if value != _UNET_FIXED[key] or isinstance(value, bool) != isinstance(_UNET_FIXED[key], bool):
            raise ValueError(f"{where}: {key} = {_short(value)} is not supported (only {_UNET_FIXED[key]!r})")
    fields = {k: raw.get(k, _UNET_DEFAULTS.get(k)) for k in _UNET_FIELDS}
    fields["sample_size"] = _square(raw.get("sample_size"), where)
    try:
        return DDPMUNetConfig(**fields)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {first_line(e)}") from None


def diffusion_config_from_diffusers(raw: Dict[str, Any]) -> DiffusionConfig:
    """The DiffusionConfig (schedule + DDPMScheduler's sampling defaults) of a DDPM/DDIM scheduler config."""
    cls = raw.get("_class_name", "DDPMScheduler")
    if cls not in _SCHEDULERS:
        raise ValueError(f"scheduler _class_name {cls!r} is not supported (only {' or '.join(_SCHEDULERS)})")
    for key, value in raw.items():
        if key.startswith("_") or key in _SCHED_IGNORED:
            continue
        if key not in _SCHED_FIXED:
            raise ValueError(f"unknown scheduler field {key!r}; ddpm_fast does not guess what it means")
        if value != _SCHED_FIXED[key] or isinstance(value, bool) != isinstance(_SCHED_FIXED[key], bool):
            raise ValueError(f"{key} = {_short(value)} is not supported (only {_SCHED_FIXED[key]!r})")
    variance = raw.get("variance_type", "fixed_small")
    if variance not in _VARIANCE:
        raise ValueError(f"variance_type {_short(variance)} is not supported (only {sorted(_VARIANCE)})")
    clip, clip_range = raw.get("clip_sample", True), raw.get("clip_sample_range", 1.0)
    if not isinstance(clip, bool):
        raise ValueError(f"clip_sample must be true or false, got {_short(clip)}")
    fields = {"n_steps": raw.get("num_train_timesteps", 1000), "beta_start": raw.get("beta_start", 1e-4),
              "beta_end": raw.get("beta_end", 0.02), "beta_schedule": raw.get("beta_schedule", "linear"),
              "trained_betas": raw.get("trained_betas"), "data_range": (-1.0, 1.0),
              "variant": _VARIANCE[variance], "clip_x0": clip, "clip_range": clip_range}
    try:
        return DiffusionConfig(**fields)
    except (ValueError, TypeError) as e:
        raise ValueError(first_line(e)) from None


# --------------------------------------------------------------------------------------------

def _read_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (a diffusers model folder holds unet/{UNET_CONFIG})")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{path}: {size} bytes, more than the {MAX_JSON_BYTES} a config may have")
    try:
        data = load_json(path.read_bytes(), str(path))
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _scheduler_path(root: Path, unet_dir: Path) -> Optional[Path]:
    """scheduler/scheduler_config.json beside unet/ (save_pretrained's layout), a scheduler_config.json beside
    the unet's own files (the flat layout of some hub repositories), or the unet folder's parent's scheduler/."""
    candidates = [root / SCHEDULER_CONFIG, unet_dir / SCHEDULER_CONFIG.name]
    if unet_dir == root:
        candidates.append(root.parent / SCHEDULER_CONFIG)
    return next((c for c in candidates if c.is_file()), None)


def _weights_file(unet_dir: Path) -> Path:
    for name in WEIGHT_FILES:
        if (unet_dir / name).is_file():
            return unet_dir / name
    if any(unet_dir.glob("*.index.json")):
        raise ValueError(f"{unet_dir}: sharded weights (*.index.json) are not supported")
    raise FileNotFoundError(f"{unet_dir}: no weights: expected {' or '.join(WEIGHT_FILES)}")


def _tensor_shapes(path: Path) -> Dict[str, tuple]:
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # SafetensorError, OSError
            raise ValueError(f"{path}: not a valid safetensors file: {first_line(e)}") from None
    return {k: tuple(v.shape) for k, v in _read_tensors(path).items()}


def _read_tensors(path: Path) -> Dict[str, torch.Tensor]:
    if path.suffix != ".safetensors":
        return read_pickled_state_dict(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path}: cannot read tensors: {first_line(e)}") from None


# The attention weights' names before diffusers 0.15 (its AttentionBlock), which old model folders still use.
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _new_name(key: str) -> str:
    parts = key.split(".")
    if len(parts) >= 3 and "attentions" in parts and parts[-2] in _OLD_ATTENTION_NAMES:
        parts[-2] = _OLD_ATTENTION_NAMES[parts[-2]]
    return ".".join(parts)


def _square(size, where: str) -> int:
    """sample_size as one int: an int, or an (H, W) pair with H == W (the sampler draws square images by default)."""
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError(f"{where}: sample_size must be an int (or a square [H, W]), got {_short(size)}")
    return size


def _short(v) -> str:
    s = repr(v)
    return s if len(s) < 80 else s[:77] + "..."

