"""Frozen configuration for the UNet and the diffusion schedule, presets, and a JSON round trip.

A checkpoint is weights plus one of these configs, so everything needed to rebuild a model
(and to map its samples back to images) lives here and nowhere else.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

# Upper bounds on what a config may ask for. A checkpoint's config is untrusted input: without them a
# few bytes of JSON could make the loader build a UNet with millions of blocks, a tensor shape whose
# byte size overflows, or a sampler that allocates terabytes. Each is far beyond any real DDPM (the
# 168M-parameter labml-cifar32 has 1024 channels, 4 levels, 2 blocks per level, 32x32 images, T=1000).
MAX_CHANNELS = 2 ** 16  # any channel count: image, base, every level's, an attention block's n_heads * d_k
MAX_LEVELS = 8  # len(ch_mults): resolutions
MAX_BLOCKS = 64  # n_blocks per resolution
MAX_IMAGE_SIZE = 4096
MAX_STEPS = 100_000  # the schedule's T
MAX_DATA_MAGNITUDE = 1e6  # |data_range| bound: the sampler maps x to pixels in float32
# The signal left at the last step, alpha_bar[T-1], must stay above this. Below it float32 alpha_bar
# approaches its smallest normal value, 1/sqrt(alpha_bar) in the sampler's coefficients overflows or
# loses all precision, and sampling returns NaN (measured: 4e-35 still samples, 2e-47 gives NaN).
# The DDPM paper's schedule leaves 4e-5.
MIN_ALPHA_BAR = 1e-30
# Bounds on any JSON read from a file (a checkpoint's metadata, a run's manifest): Python's json module
# recurses once per nesting level, so a few kilobytes of '[' would otherwise surface as a RecursionError.
MAX_JSON_BYTES = 16 * 2 ** 20
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


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
        # Tuples, not lists, so the config hashes and compares equal after a JSON round trip. The
        # entries are checked before conversion: int(1.5) and bool("no") would silently succeed.
        for name, ok, convert, what in (("ch_mults", _is_integral, int, "ints"),
                                        ("is_attn", _is_flag, bool, "booleans")):
            v = getattr(self, name)
            items = _items(v)
            if items is None or not all(ok(m) for m in items):
                raise ValueError(f"UNetConfig: {name} must be a list of {what}, got {_short(v)}")
            object.__setattr__(self, name, tuple(convert(m) for m in items))
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"UNetConfig: {msg}")

        for name in ("image_channels", "n_channels", "n_blocks", "image_size", "n_groups", "n_heads"):
            v = getattr(self, name)
            need(_is_int(v) and v > 0, f"{name} must be a positive int, got {v!r}")
        need(len(self.ch_mults) > 0, "ch_mults must not be empty")
        need(all(m > 0 for m in self.ch_mults), f"ch_mults must be positive, got {self.ch_mults}")
        need(len(self.ch_mults) <= MAX_LEVELS, f"ch_mults has {len(self.ch_mults)} levels, at most {MAX_LEVELS}")
        need(len(self.is_attn) == len(self.ch_mults),
             f"is_attn has {len(self.is_attn)} entries but ch_mults has {len(self.ch_mults)}")
        need(self.n_blocks <= MAX_BLOCKS, f"n_blocks must be <= {MAX_BLOCKS}, got {self.n_blocks}")
        need(self.image_size <= MAX_IMAGE_SIZE, f"image_size must be <= {MAX_IMAGE_SIZE}, got {self.image_size}")
        need(self.image_channels <= MAX_CHANNELS,
             f"image_channels must be <= {MAX_CHANNELS}, got {self.image_channels}")
        # Multipliers compound, so the last level has the most channels (every multiplier is >= 1).
        widest = self.level_channels()[-1]
        need(widest <= MAX_CHANNELS, f"n_channels * product(ch_mults) = {widest} channels, at most {MAX_CHANNELS} "
                                     f"(n_channels={self.n_channels}, ch_mults={self.ch_mults})")
        need(_is_real(self.dropout) and 0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        need(self.d_k is None or (_is_int(self.d_k) and self.d_k > 0),
             f"d_k must be None or a positive int, got {self.d_k!r}")
        # The middle block always has attention, over the widest level; d_k None means that width.
        attn_width = self.n_heads * (self.d_k or widest)
        need(attn_width <= MAX_CHANNELS, f"n_heads * d_k = {attn_width} (n_heads={self.n_heads}, d_k={self.d_k}, "
                                         f"{widest} channels at the widest level), at most {MAX_CHANNELS}")
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
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"DiffusionConfig: {msg}")

        r = self.data_range
        need(isinstance(r, (list, tuple)) and len(r) == 2 and all(_is_real(v) for v in r),
             f"data_range must be (low, high), two numbers, got {_short(r)}")
        object.__setattr__(self, "data_range", tuple(float(v) for v in r))
        low, high = self.data_range
        need(all(math.isfinite(v) and abs(v) <= MAX_DATA_MAGNITUDE for v in self.data_range),
             f"data_range values must be finite with |value| <= {MAX_DATA_MAGNITUDE:g}, got {self.data_range}")
        # The sampler divides by (high - low) in float32: a range narrower than float32 can resolve maps
        # every sample to NaN or to one pixel value.
        need(high - low >= 1e-6 * max(1.0, abs(low), abs(high)),
             f"data_range must be (low, high) with low < high (and not narrower than 1e-6 relative), "
             f"got {self.data_range}")
        need(_is_int(self.n_steps) and 2 <= self.n_steps <= MAX_STEPS,
             f"n_steps must be an int in [2, {MAX_STEPS}], got {self.n_steps!r}")
        need(_is_real(self.beta_start) and _is_real(self.beta_end) and 0.0 < self.beta_start < self.beta_end < 1.0,
             f"need 0 < beta_start < beta_end < 1, got {self.beta_start!r}, {self.beta_end!r}")
        alpha_bar = self.final_alpha_bar()
        need(alpha_bar >= MIN_ALPHA_BAR,
             f"the schedule (beta {self.beta_start:g} to {self.beta_end:g} over n_steps={self.n_steps}) leaves "
             f"alpha_bar = {alpha_bar:.3g} at the last step, below {MIN_ALPHA_BAR:g}: the sampler's float32 "
             "coefficients (1/sqrt(alpha_bar)) would overflow; use smaller betas or fewer steps")

    def final_alpha_bar(self) -> float:
        """alpha_bar at the last step, prod(1 - beta_t) over the linear schedule (in float64, as Schedule)."""
        step = (self.beta_end - self.beta_start) / (self.n_steps - 1)
        return math.exp(math.fsum(math.log1p(-(self.beta_start + i * step)) for i in range(self.n_steps)))

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
        return cls.from_dict(load_json(text, "ModelConfig"))


def load_json(text, what: str = "JSON"):
    """json.loads of untrusted text, refusing (ValueError naming `what`) more than MAX_JSON_BYTES or
    nesting deeper than MAX_JSON_DEPTH before it is parsed."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{what}: not UTF-8 text") from None
    if not isinstance(text, str):
        raise ValueError(f"{what}: expected JSON text, got {type(text).__name__}")
    if len(text) > MAX_JSON_BYTES:
        raise ValueError(f"{what}: {len(text)} characters of JSON, more than the {MAX_JSON_BYTES} allowed")
    depth = deepest = 0
    for ch in re.findall(r"[\[\]{}]", _JSON_STRING.sub('""', text)):  # brackets outside strings
        depth += 1 if ch in "[{" else -1
        deepest = max(deepest, depth)
    if deepest > MAX_JSON_DEPTH:
        raise ValueError(f"{what}: JSON nested {deepest} levels deep, more than the {MAX_JSON_DEPTH} allowed")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: not valid JSON ({e})") from None


def check_int(name: str, value, low: int) -> int:
    """`value` as a Python int >= `low`; integer-likes (numpy ints) pass, as plain ints for what comes after."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _is_int(v: Any) -> bool:
    # A plain int: the field goes into JSON as is (numpy integers would not serialise).
    return isinstance(v, int) and not isinstance(v, bool)


def _is_integral(v: Any) -> bool:
    # Sequence entries (ch_mults) are converted with int(), so numpy integers are fine there.
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_flag(v: Any) -> bool:
    # True/False, 0/1, numpy booleans; never a string, which bool() would turn into True ("no" too).
    try:
        return not isinstance(v, (str, bytes)) and bool(v in (0, 1))
    except (TypeError, ValueError):  # e.g. an array, whose == is elementwise
        return False


def _items(v: Any):
    """The entries of a list, tuple or other iterable (a numpy array), or None for a string or non-iterable."""
    if isinstance(v, (str, bytes, dict)):
        return None
    try:
        return tuple(v)
    except TypeError:
        return None


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
