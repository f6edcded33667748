"""Training checkpoints: the full training state (model, EMA, optimizer, RNG, step) as one
safetensors file with JSON metadata, no pickle anywhere, written atomically; and the export of a
run's EMA weights as a model file (load_checkpoint's format). See training/loop.py's docstring."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import torch

from ..config import ModelConfig, load_json
from ..io.atomic import write_atomic
from ..io.checkpoint import CONFIG_KEY, TRAIN_FORMAT, write_model_file


class CheckpointError(ValueError):
    """A training checkpoint is missing, corrupt, or belongs to a different model.

    A ValueError, like io.checkpoint.load_checkpoint's errors, so the CLI reports it as bad input."""


# ---------------------------------------------------------------------------------------------
# Checkpoints (safetensors + JSON metadata; atomic replace)
# ---------------------------------------------------------------------------------------------
def _json_safe(obj):
    if isinstance(obj, torch.Tensor):
        if obj.numel() != 1:
            raise TypeError("a non-scalar tensor cannot go into JSON metadata")
        return obj.item()
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in checkpoint metadata")


def save_train_checkpoint(path, model, ema, optimizer, step: int, config: ModelConfig,
                          scaler=None, extra: Optional[Dict] = None) -> None:
    """The full training state as one safetensors file (see the module docstring), atomically."""
    from safetensors.torch import save

    tensors: Dict[str, torch.Tensor] = {}
    for prefix, module in (("model.", model), ("ema.", ema)):
        for k, v in module.state_dict().items():
            tensors[prefix + k] = v.detach().cpu().contiguous()
    osd = optimizer.state_dict()
    scalars = {}
    for idx, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = _json_safe(v)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    state = {"step": int(step), "optim_param_groups": _json_safe(osd["param_groups"]),
             "optim_scalars": scalars, "scaler": _json_safe(scaler.state_dict()) if scaler is not None else None,
             "hparams": _json_safe(extra or {})}
    meta = {"format": TRAIN_FORMAT, CONFIG_KEY: config.to_json(), "train_state": json.dumps(state)}
    write_atomic(path, lambda f: f.write(save(tensors, metadata=meta)))


def read_train_checkpoint(path) -> tuple:
    """-> (tensors, config, state) from a training checkpoint, with clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training checkpoint {str(path)!r} does not exist")
    tensors, config, meta = _read(path, with_tensors=True)
    try:
        state = load_json(meta["train_state"], "train_state")
        _check_state(state)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"training checkpoint {str(path)!r} has bad metadata ({e})") from None
    return tensors, config, state


def read_train_config(path) -> ModelConfig:
    """The model config of a training checkpoint, from its header only (no tensors are read)."""
    return _read(Path(path), with_tensors=False)[1]


def _read(path: Path, with_tensors: bool) -> tuple:
    """(tensors or None, config, metadata) of a training checkpoint; every failure a CheckpointError."""
    from safetensors import safe_open
    from safetensors.torch import load

    try:
        if with_tensors:
            data = path.read_bytes()
            tensors, meta = load(data), _read_metadata(data)
        else:
            with safe_open(str(path), framework="pt") as f:
                tensors, meta = None, f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own and json/struct errors
        raise CheckpointError(f"training checkpoint {str(path)!r} is corrupt or not a safetensors file "
                              f"({type(e).__name__}: {e})") from None
    if meta.get("format") != TRAIN_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a ddpm_fast training checkpoint "
                              f"(format {meta.get('format')!r}, expected {TRAIN_FORMAT!r})")
    try:
        config = ModelConfig.from_json(meta[CONFIG_KEY])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"training checkpoint {str(path)!r} has bad metadata ({e})") from None
    return tensors, config, meta


def _check_state(state) -> None:
    """The train_state's shape, so that a damaged or hand-made file fails here with its reason, never as
    an AttributeError inside the optimizer or a run that silently restarts at a negative step."""
    if not isinstance(state, dict):
        raise ValueError("train_state is not a JSON object")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2 ** 62:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    groups = state.get("optim_param_groups")
    if not isinstance(groups, list) or not groups or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise ValueError("optim_param_groups must be a list of parameter-group objects with 'params'")
    if not isinstance(state.get("optim_scalars", {}), dict) or not all(
            isinstance(v, dict) for v in state.get("optim_scalars", {}).values()):
        raise ValueError("optim_scalars must map parameter indices to objects")
    for key in ("scaler", "hparams"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            raise ValueError(f"{key} must be an object or null")


def _read_metadata(data: bytes) -> Dict[str, str]:
    # safetensors layout: u64 little-endian header length, then the JSON header with "__metadata__".
    n = int.from_bytes(data[:8], "little")
    header = load_json(bytes(data[8:8 + n]), "the safetensors header")
    return (header.get("__metadata__", {}) if isinstance(header, dict) else {}) or {}


def load_train_checkpoint(path, model, ema, optimizer, scaler=None) -> dict:
    """Restore model, EMA, optimizer (and scaler, RNG) in place; returns the checkpoint's train_state."""
    path = Path(path)
    tensors, config, state = read_train_checkpoint(path)
    if config.unet != model.config:
        raise CheckpointError(f"checkpoint {str(path)!r} is for a different model: {config.unet} "
                              f"vs {model.config}")

    def sub(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    n_params = len(list(model.parameters()))
    have = {int(k.split(".")[1]) for k in tensors if k.startswith("optim.") and k.split(".")[1].isdigit()}
    # Adam keeps state for every parameter that has had a gradient (labml's unused attention GroupNorm
    # never has one), so a checkpoint past step 0 without any would resume inexactly, from fresh moments.
    if (state["step"] > 0 and not have) or any(i >= n_params for i in have):
        raise CheckpointError(f"training checkpoint {str(path)!r} has no usable optimizer state "
                              f"({len(have)} parameter entries for a model of {n_params} parameters)")
    try:
        model.load_state_dict(sub("model."), strict=True)
        ema.load_state_dict(sub("ema."), strict=True)
        groups = state["optim_param_groups"]
        for g in groups:  # JSON turned tuples (Adam's betas) into lists
            for k, v in g.items():
                if k != "params" and isinstance(v, list):
                    g[k] = tuple(v)
        ostate: Dict[int, Dict] = {}
        for k, v in sub("optim.").items():
            idx, key = k.split(".", 1)
            ostate.setdefault(int(idx), {})[key] = v
        for idx, sc in state.get("optim_scalars", {}).items():
            ostate.setdefault(int(idx), {}).update(sc)
        optimizer.load_state_dict({"state": ostate, "param_groups": groups})
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if "rng.cpu" in tensors:
            torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"training checkpoint {str(path)!r} does not match this model/optimizer: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return state


def export_model(checkpoint, dest, dtype: torch.dtype = torch.float32) -> Path:
    """Write a training checkpoint's EMA weights as a model file (load_checkpoint's format).

    `dtype=torch.float16` halves the file (the shipped model); loaders upcast to float32.
    """
    tensors, config, state = read_train_checkpoint(checkpoint)
    weights = {k[4:]: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()
               if k.startswith("ema.")}
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return _write_model_file(dest, weights, config, state["step"])


def save_model_file(path, ema, config: ModelConfig, step: int) -> Path:
    """The EMA weights as a model file that records `step` (see export_model)."""
    weights = {k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
    return _write_model_file(Path(path), weights, config, step)


def _write_model_file(dest: Path, weights: Dict[str, torch.Tensor], config: ModelConfig, step: int) -> Path:
    # train_step lets a resumed run see that a model file is older than its checkpoint (run_dir.model_file_step).
    return write_model_file(dest, weights, config, metadata={"train_step": str(int(step))})
