"""What every model loader checks, once: tensor names and shapes against the network a config builds, dtypes,
finiteness, and pickled files read without running code. Each failure is a ValueError naming the file."""
from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Dict, Mapping, Tuple

import torch

from ..config import ModelConfig, UNetConfig
from ..devices import WEIGHT_DTYPES, parse_device, parse_dtype
from ..reference import build_unet

__all__ = ["read_pickled_state_dict", "match_config", "build_model", "parse_load_device", "parse_load_dtype",
           "first_line", "listing"]


def read_pickled_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """The name -> tensor mapping in a pickled PyTorch file (a bare state_dict, or {"model"|"state_dict": sd}),
    read with torch.load(weights_only=True): a pickle naming anything but tensors and plain containers is
    refused with a ValueError, and nothing in it is executed."""
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it did not write; the refusal below says what matters.
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused to load: the pickle holds more than tensors and plain containers "
                         f"({_unpickler_reason(e)}); nothing in it was executed") from None
    except Exception as e:  # zipfile/EOF/RuntimeError on corrupt or truncated files
        raise ValueError(f"{path}: not a readable PyTorch file: {type(e).__name__}: {first_line(e)}") from None

    state = obj
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                state = obj[key]
                break
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{path}: expected a state_dict (or {{'model'|'state_dict': state_dict}}), "
                         f"got {type(obj).__name__}")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: the state_dict has non-tensor entries: {listing(map(str, bad))}")
    return dict(state)


def match_config(where: str, unet_config: UNetConfig, found: Dict[str, tuple], what: str) -> None:
    """Raise a ValueError '<where>: <what>: <differences>' unless `found` (name -> shape) is exactly the
    state_dict of the UNet that `unet_config` describes."""
    # Even on the meta device a UNet costs about 1 ms per block to build and the config allows ~1000
    # blocks, so a file with far fewer tensors than its config needs is refused before anything is built.
    least = _min_tensor_count(unet_config)
    if len(found) < least:
        raise ValueError(f"{where}: {what}: {len(found)} tensor(s), but that UNet has at least {least}")
    try:
        expected = _expected_shapes(unet_config)
    except Exception as e:  # the config bounds should make this unreachable; an error must still name the file
        raise ValueError(f"{where}: cannot build the UNet of its config: "
                         f"{type(e).__name__}: {first_line(e)}") from None
    problems = _mismatch(expected, found)
    if problems:
        raise ValueError(f"{where}: {what}: {problems}")


def _min_tensor_count(unet_config) -> int:
    # A lower bound, without building anything: n_blocks ResidualBlocks per level down, n_blocks + 1 up,
    # 2 in the middle, each with at least 10 tensors (weight and bias of norm1, conv1, time_emb, norm2, conv2).
    c = unet_config
    if isinstance(c, UNetConfig):
        return 10 * (len(c.ch_mults) * (2 * c.n_blocks + 1) + 2)
    return 10 * (len(c.block_out_channels) * (2 * c.layers_per_block + 1) + 2)


def _expected_shapes(unet_config: UNetConfig) -> Dict[str, Tuple[int, ...]]:
    # On the meta device: no memory, no initialisation, even for the 168M-parameter preset.
    with torch.device("meta"):
        model = build_unet(unet_config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _mismatch(expected: Dict[str, tuple], found: Dict[str, tuple]) -> str:
    """'' when the key sets and shapes agree exactly, else a one-line description of every difference."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} {found[k]} (expected {expected[k]})" for k in expected if k in found and found[k] != expected[k]]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {listing(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} shape mismatch(es): {listing(wrong)}")
    return "; ".join(parts)


def listing(items, limit: int = 6) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def build_model(path: Path, config: ModelConfig, state: Dict[str, torch.Tensor], dev: torch.device,
                dtype: torch.dtype) -> torch.nn.Module:
    """The UNet (or DDPMUNet) holding `state`, on `dev` in `dtype` (both already parsed), after the dtype and finiteness checks."""
    bad_dtype = [f"{k} ({v.dtype})" for k, v in state.items() if v.dtype not in WEIGHT_DTYPES]
    if bad_dtype:
        raise ValueError(f"{path}: tensors must be float16, bfloat16, float32 or float64: {listing(bad_dtype)}")
    non_finite = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if non_finite:
        raise ValueError(f"{path}: tensors hold NaN or Inf: {listing(non_finite)}")
    with torch.device("meta"):
        model = build_unet(config.unet)
    # assign=True adopts the loaded tensors instead of copying into freshly initialised ones.
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=dev, dtype=dtype).eval()


def parse_load_device(path: Path, device) -> torch.device:
    try:
        return parse_device(device)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def parse_load_dtype(dtype) -> torch.dtype:
    """A torch dtype from WEIGHT_DTYPES or a name sample() accepts; None means float32."""
    return torch.float32 if dtype is None else parse_dtype(dtype, WEIGHT_DTYPES)


def _unpickler_reason(e: BaseException) -> str:
    # torch's message is a paragraph of advice; the line naming the refused global/opcode is the news.
    # Its case varies between versions ("Unsupported global: GLOBAL posix.system", torch 2.13's
    # "unsupported GLOBAL posix.system"). Never its advice: weights_only=False would run the code.
    for line in str(e).splitlines():
        m = re.search(r"unsupported (global|operand)[^\n]*", line, re.IGNORECASE)
        if m:
            return re.split(r" was not |\. Please|\. Check", m.group(0))[0].strip().rstrip(".")
    return "it names something other than tensors and plain containers"


def first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
