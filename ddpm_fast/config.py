"""Frozen configuration for the UNet and the diffusion schedule, presets, and a JSON round trip.

A checkpoint is weights plus one of these configs, so everything needed to rebuild a model
(and to map its samples back to images) lives here and nowhere else.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple


@dataclass(frozen=True)
class UNetConfig:
    """Shape of the labml UNet. Channel multipliers compound, as in labml (out = in * mult)."""

    image_channels: int = 3
    n_channels: int = 64
    ch_mults: Tuple[int, ...] = (1, 2, 2, 4)
    is_attn: Tuple[bool, ...] = (False, False, True, True)
    n_blocks: int = 2
    image_size: int = 32
    n_groups: int = 32  # GroupNorm groups in residual and attention blocks (labml: 32)
    dropout: float = 0.1
    n_heads: int = 1
    d_k: int | None = None  # attention head width; None means the block's channel count (labml)

    def __post_init__(self):
        # Tuples, not lists, so the config hashes and compares equal after a JSON round trip.
        object.__setattr__(self, "ch_mults", tuple(int(m) for m in self.ch_mults))
        object.__setattr__(self, "is_attn", tuple(bool(a) for a in self.is_attn))
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"UNetConfig: {msg}")

        for name in ("image_channels", "n_channels", "n_blocks", "image_size", "n_groups", "n_heads"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{name} must be a positive int, got {v!r}")
        need(len(self.ch_mults) > 0, "ch_mults must not be empty")
        need(all(m > 0 for m in self.ch_mults), f"ch_mults must be positive, got {self.ch_mults}")
        need(len(self.is_attn) == len(self.ch_mults),
             f"is_attn has {len(self.is_attn)} entries but ch_mults has {len(self.ch_mults)}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.d_k is None or (isinstance(self.d_k, int) and self.d_k > 0), f"d_k must be None or > 0, got {self.d_k!r}")
        down = 2 ** (len(self.ch_mults) - 1)
        need(self.image_size % down == 0,
             f"image_size {self.image_size} must be divisible by {down} ({len(self.ch_mults)} resolutions)")
        need(self.n_channels % 8 == 0, f"n_channels {self.n_channels} must be divisible by 8 (final GroupNorm(8, C))")
        for c in self.block_channels():
            need(c % self.n_groups == 0, f"a block has {c} channels, not divisible by n_groups={self.n_groups}")

    def level_channels(self) -> Tuple[int, ...]:
        """Channel count at each resolution level (multipliers compound)."""
        out, c = [], self.n_channels
        for m in self.ch_mults:
            c = c * m
            out.append(c)
        return tuple(out)

    def block_channels(self) -> Tuple[int, ...]:
        """Every channel count a GroupNorm(n_groups, C) sees, for validation."""
        chans = {self.n_channels}
        prev = self.n_channels
        for c in self.level_channels():
            chans.update({prev, c, prev + c, c + c})
            prev = c
        return tuple(sorted(chans))

    @property
    def time_channels(self) -> int:
        return 4 * self.n_channels

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ch_mults"] = list(self.ch_mults)
        d["is_attn"] = list(self.is_attn)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "UNetConfig":
        return _from_dict(cls, d)


@dataclass(frozen=True)
class DiffusionConfig:
    """The noise schedule and the data range the model was trained on.

    labml trains on images in [0, 1]; the DDPM paper (and our own training) uses [-1, 1].
    The sampler maps from `data_range` to pixels and clips x0 to it when asked.
    """

    n_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    data_range: Tuple[float, float] = (-1.0, 1.0)

    def __post_init__(self):
        object.__setattr__(self, "data_range", tuple(float(v) for v in self.data_range))
        if not (isinstance(self.n_steps, int) and self.n_steps >= 2):
            raise ValueError(f"DiffusionConfig: n_steps must be an int >= 2, got {self.n_steps!r}")
        if not (0.0 < self.beta_start < self.beta_end < 1.0):
            raise ValueError(f"DiffusionConfig: need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if len(self.data_range) != 2 or not self.data_range[0] < self.data_range[1]:
            raise ValueError(f"DiffusionConfig: data_range must be (low, high) with low < high, got {self.data_range}")

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data_range"] = list(self.data_range)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DiffusionConfig":
        return _from_dict(cls, d)


@dataclass(frozen=True)
class ModelConfig:
    """What a checkpoint's JSON holds: the network and its schedule."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def to_dict(self) -> Dict[str, Any]:
        return {"unet": self.unet.to_dict(), "diffusion": self.diffusion.to_dict()}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict) or set(d) - {"unet", "diffusion"} or "unet" not in d:
            raise ValueError(f"ModelConfig: expected a dict with keys 'unet' and 'diffusion', got {_short(d)}")
        return cls(unet=UNetConfig.from_dict(d["unet"]),
                   diffusion=DiffusionConfig.from_dict(d.get("diffusion", {})))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"ModelConfig: not valid JSON ({e})") from None
        return cls.from_dict(d)


def _short(obj: Any) -> str:
    s = repr(obj)
    return s if len(s) < 120 else s[:117] + "..."


def _from_dict(cls, d: Dict[str, Any]):
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {_short(d)}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
    try:
        return cls(**d)
    except TypeError as e:
        raise ValueError(f"{cls.__name__}: {e}") from None


# Presets. labml-cifar32 is labml's experiment default (note is_attn differs from the UNet
# constructor default); cifar35m is the DDPM paper's CIFAR-10 network expressed with labml's
# compounding multipliers (128, 256, 256, 256 channels, attention at 16x16); tiny is for tests
# and the CPU demo; digits16 is the shipped default model's shape.
PRESETS: Dict[str, ModelConfig] = {
    "labml-cifar32": ModelConfig(
        UNetConfig(image_channels=3, n_channels=64, ch_mults=(1, 2, 2, 4), is_attn=(False, False, False, True),
                   n_blocks=2, image_size=32),
        DiffusionConfig(data_range=(0.0, 1.0)),
    ),
    "cifar35m": ModelConfig(
        UNetConfig(image_channels=3, n_channels=128, ch_mults=(1, 2, 1, 1), is_attn=(False, True, False, False),
                   n_blocks=2, image_size=32),
    ),
    "tiny": ModelConfig(
        UNetConfig(image_channels=3, n_channels=32, ch_mults=(1, 2), is_attn=(False, True), n_blocks=1,
                   image_size=16, n_groups=8),
    ),
    "digits16": ModelConfig(
        UNetConfig(image_channels=1, n_channels=32, ch_mults=(1, 2, 2), is_attn=(False, False, True), n_blocks=1,
                   image_size=16, n_groups=8, dropout=0.0),
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
