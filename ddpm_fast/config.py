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
        down = self.downsample_factor
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

    @property
    def downsample_factor(self) -> int:
        """How many times smaller the innermost resolution is: H and W must be multiples of it."""
        return 2 ** (len(self.ch_mults) - 1)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ch_mults"] = list(self.ch_mults)
        d["is_attn"] = list(self.is_attn)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "UNetConfig":
        return _from_dict(cls, d)

DDPM_DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
DDPM_UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")


@dataclass(frozen=True)
class DDPMUNetConfig:
    """Shape of the DDPM paper's UNet as diffusers' UNet2DModel lays it out (google/ddpm-cifar10-32 and kin).

    Field names and meanings are UNet2DModel's config keys, for the configs of that family only: ResNet
    blocks with the time embedding added before the second norm ("default" time scale shift), attention
    with a GroupNorm in front, conv Downsample/Upsample, a positional sinusoid, eps prediction.
    """

    sample_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Tuple[int, ...] = (128, 256, 256, 256)
    down_block_types: Tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    up_block_types: Tuple[str, ...] = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    attention_head_dim: int | None = None  # None: one head as wide as the block
    downsample_padding: int = 0  # 0: pad right/bottom by one, then an unpadded stride-2 conv
    freq_shift: float = 1
    flip_sin_to_cos: bool = False
    add_attention: bool = True  # the middle block's attention
    dropout: float = 0.0

    def __post_init__(self):
        for name, ok, convert, what in (("block_out_channels", _is_integral, int, "ints"),
                                        ("down_block_types", _is_str, str, "block type names"),
                                        ("up_block_types", _is_str, str, "block type names")):
            items = _items(getattr(self, name))
            if items is None or not all(ok(m) for m in items):
                raise ValueError(f"DDPMUNetConfig: {name} must be a list of {what}, got {_short(getattr(self, name))}")
            object.__setattr__(self, name, tuple(convert(m) for m in items))
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"DDPMUNetConfig: {msg}")

        for name in ("sample_size", "in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
            v = getattr(self, name)
            need(_is_int(v) and v > 0, f"{name} must be a positive int, got {v!r}")
        chans = self.block_out_channels
        need(0 < len(chans) <= MAX_LEVELS, f"block_out_channels needs 1 to {MAX_LEVELS} levels, got {len(chans)}")
        need(all(0 < c <= MAX_CHANNELS for c in chans), f"block_out_channels must be in [1, {MAX_CHANNELS}], got {chans}")
        need(self.in_channels <= MAX_CHANNELS, f"in_channels must be <= {MAX_CHANNELS}, got {self.in_channels}")
        need(self.out_channels == self.in_channels,
             f"out_channels ({self.out_channels}) must equal in_channels ({self.in_channels}): only eps prediction "
             "is supported (2 x in_channels would be a learned variance)")
        for name, allowed in (("down_block_types", DDPM_DOWN_BLOCKS), ("up_block_types", DDPM_UP_BLOCKS)):
            types = getattr(self, name)
            need(len(types) == len(chans), f"{name} has {len(types)} entries but block_out_channels has {len(chans)}")
            bad = [b for b in types if b not in allowed]
            need(not bad, f"unsupported {name} {bad}; supported: {list(allowed)}")
        need(self.layers_per_block <= MAX_BLOCKS, f"layers_per_block must be <= {MAX_BLOCKS}, got {self.layers_per_block}")
        need(self.sample_size <= MAX_IMAGE_SIZE, f"sample_size must be <= {MAX_IMAGE_SIZE}, got {self.sample_size}")
        need(_is_real(self.norm_eps) and 0.0 < self.norm_eps < 1.0, f"norm_eps must be in (0, 1), got {self.norm_eps!r}")
        need(self.attention_head_dim is None or (_is_int(self.attention_head_dim) and
                                                 0 < self.attention_head_dim <= min(chans)),
             f"attention_head_dim must be None or an int in [1, {min(chans)}] (the narrowest block), "
             f"got {self.attention_head_dim!r}")
        need(self.downsample_padding in (0, 1) and _is_int(self.downsample_padding),
             f"downsample_padding must be 0 or 1, got {self.downsample_padding!r}")
        need(_is_real(self.freq_shift) and 0 <= self.freq_shift < chans[0] // 2,
             f"freq_shift must be a number in [0, {chans[0] // 2}), got {self.freq_shift!r}")
        need(chans[0] % 2 == 0 and chans[0] >= 4, f"block_out_channels[0] = {chans[0]} must be even and >= 4 (the sinusoid)")
        for name in ("flip_sin_to_cos", "add_attention"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        need(_is_real(self.dropout) and 0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        need(self.sample_size % self.downsample_factor == 0,
             f"sample_size {self.sample_size} must be divisible by {self.downsample_factor} ({len(chans)} levels)")
        for c in self.block_channels():
            need(c % self.norm_num_groups == 0,
                 f"a block has {c} channels, not divisible by norm_num_groups={self.norm_num_groups}")

    @property
    def image_channels(self) -> int:
        return self.in_channels

    @property
    def image_size(self) -> int:
        return self.sample_size

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def time_channels(self) -> int:
        return 4 * self.block_out_channels[0]

    def block_channels(self) -> Tuple[int, ...]:
        """Every channel count a GroupNorm sees: each level's width and each up block's concatenated input."""
        chans = set(self.block_out_channels)
        for _, _, c_in, c_out in self.up_resnets():
            chans.update({c_in, c_out})
        return tuple(sorted(chans))

    def up_resnets(self):
        """(level from the top, index in the block, input channels incl. the skip, output channels) of every up
        ResNet block, in forward order: UNet2DModel's up path, where a block narrows to the next level's width
        in its last ResNet, the one that takes the skip from before that level's Downsample."""
        rev = list(reversed(self.block_out_channels))
        out = []
        prev = rev[0]
        for i, c_out in enumerate(rev):
            skip_last = rev[min(i + 1, len(rev) - 1)]
            for j in range(self.layers_per_block + 1):
                skip = skip_last if j == self.layers_per_block else c_out
                out.append((i, j, (prev if j == 0 else c_out) + skip, c_out))
            prev = c_out
        return out

    def heads(self, channels: int) -> Tuple[int, int]:
        """(heads, head width) of an attention block over `channels` (diffusers: channels // head_dim heads)."""
        d = self.attention_head_dim or channels
        return channels // d, d

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("block_out_channels", "down_block_types", "up_block_types"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DDPMUNetConfig":
        return _from_dict(cls, d)


# ModelConfig's "architecture" names: which network a checkpoint holds.
ARCHITECTURES = {"labml": UNetConfig, "ddpm": DDPMUNetConfig}


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
DDPM_VARIANTS = ("labml", "paper", "posterior")


@dataclass(frozen=True)
class DiffusionConfig:
    """The noise schedule, the data range the model was trained on, and its sampling defaults.

    labml trains on images in [0, 1]; the DDPM paper (and our own training) uses [-1, 1].
    The sampler maps from `data_range` to pixels and clips x0 to it when asked.
    beta_schedule: "linear" (beta_start..beta_end), "scaled_linear" (linear in sqrt(beta)) or
    "squaredcos_cap_v2" (the improved-DDPM cosine alpha_bar, betas capped at 0.999; beta_start/end unused);
    trained_betas, when given, are the n_steps betas themselves and override the schedule.
    variant, clip_x0, clip_range: the DDPM sampler's defaults for this model (sample() and the CLI use them
    when not told otherwise): the variance variant, whether to clip the predicted x0, and to what
    (clip_range r: [-r, r]; None: data_range). A diffusers model's scheduler config sets them.
    """

    n_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    data_range: Tuple[float, float] = (-1.0, 1.0)
    beta_schedule: str = "linear"
    trained_betas: Tuple[float, ...] | None = None
    variant: str = "labml"
    clip_x0: bool = False
    clip_range: float | None = None

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
        need(self.beta_schedule in BETA_SCHEDULES,
             f"beta_schedule must be one of {list(BETA_SCHEDULES)}, got {_short(self.beta_schedule)}")
        self._check_trained_betas(need)
        need(self.variant in DDPM_VARIANTS, f"variant must be one of {list(DDPM_VARIANTS)}, got {_short(self.variant)}")
        need(isinstance(self.clip_x0, bool), f"clip_x0 must be true or false, got {self.clip_x0!r}")
        need(self.clip_range is None or (_is_real(self.clip_range) and 0.0 < self.clip_range <= MAX_DATA_MAGNITUDE),
             f"clip_range must be None or a number in (0, {MAX_DATA_MAGNITUDE:g}], got {self.clip_range!r}")
        alpha_bar = self.final_alpha_bar()
        need(alpha_bar >= MIN_ALPHA_BAR,
             f"the schedule ({self._describe()} over n_steps={self.n_steps}) leaves alpha_bar = {alpha_bar:.3g} at "
             f"the last step, below {MIN_ALPHA_BAR:g}: the sampler's float32 coefficients (1/sqrt(alpha_bar)) "
             "would overflow; use smaller betas or fewer steps")

    def _check_trained_betas(self, need) -> None:
        if self.trained_betas is None:
            return
        items = _items(self.trained_betas)
        need(items is not None and len(items) == self.n_steps and all(_is_real(b) for b in items),
             f"trained_betas must be a list of n_steps={self.n_steps} numbers, got {_short(self.trained_betas)}")
        object.__setattr__(self, "trained_betas", tuple(float(b) for b in items))
        need(all(0.0 < b < 1.0 for b in self.trained_betas), "trained_betas must all lie in (0, 1)")

    def _describe(self) -> str:
        if self.trained_betas is not None:
            return "trained betas"
        if self.beta_schedule == "squaredcos_cap_v2":
            return "the cosine schedule"
        return f"{self.beta_schedule} beta {self.beta_start:g} to {self.beta_end:g}"

    def betas(self) -> Tuple[float, ...]:
        """The n_steps betas in float64 (Python floats). Schedule computes the linear one with torch.linspace."""
        n = self.n_steps
        if self.trained_betas is not None:
            return self.trained_betas
        if self.beta_schedule == "squaredcos_cap_v2":
            def alpha_bar(s: float) -> float:
                return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
            return tuple(min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n))
        lo, hi = ((self.beta_start, self.beta_end) if self.beta_schedule == "linear"
                  else (math.sqrt(self.beta_start), math.sqrt(self.beta_end)))
        step = (hi - lo) / (n - 1)
        values = [lo + i * step for i in range(n)]
        return tuple(values if self.beta_schedule == "linear" else [v * v for v in values])

    def final_alpha_bar(self) -> float:
        """alpha_bar at the last step, prod(1 - beta_t) (in float64, as Schedule)."""
        return math.exp(math.fsum(math.log1p(-b) for b in self.betas()))

    def clip_bounds(self) -> Tuple[float, float]:
        """What x0 is clipped to when clipping: [-clip_range, clip_range], or the data range."""
        return self.data_range if self.clip_range is None else (-float(self.clip_range), float(self.clip_range))

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data_range"] = list(self.data_range)
        if self.trained_betas is not None:
            d["trained_betas"] = list(self.trained_betas)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DiffusionConfig":
        return _from_dict(cls, d)


@dataclass(frozen=True)
class ModelConfig:
    """What a checkpoint's JSON holds: the network (labml's UNet or the DDPM paper's) and its schedule."""

    unet: UNetConfig | DDPMUNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def __post_init__(self):
        if not isinstance(self.unet, tuple(ARCHITECTURES.values())):
            raise ValueError(f"ModelConfig: unet must be a UNetConfig or DDPMUNetConfig, got {type(self.unet).__name__}")
        if not isinstance(self.diffusion, DiffusionConfig):
            raise ValueError(f"ModelConfig: diffusion must be a DiffusionConfig, got {type(self.diffusion).__name__}")

    @property
    def architecture(self) -> str:
        return next(name for name, cls in ARCHITECTURES.items() if isinstance(self.unet, cls))

    def to_dict(self) -> Dict[str, Any]:
        d = {"unet": self.unet.to_dict(), "diffusion": self.diffusion.to_dict()}
        if self.architecture != "labml":  # labml files stay as they were before a second architecture existed
            d["architecture"] = self.architecture
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict) or set(d) - {"unet", "diffusion", "architecture"} or "unet" not in d:
            raise ValueError(f"ModelConfig: expected a dict with keys 'unet', 'diffusion' (and optionally "
                             f"'architecture'), got {_short(d)}")
        arch = d.get("architecture", "labml")
        if not isinstance(arch, str) or arch not in ARCHITECTURES:
            raise ValueError(f"ModelConfig: architecture must be one of {sorted(ARCHITECTURES)}, got {_short(arch)}")
        return cls(unet=ARCHITECTURES[arch].from_dict(d["unet"]),
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


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


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


# The DDPM paper's networks in diffusers' layout, with the sampling defaults of google's models (DDPMScheduler,
# linear betas, clip_sample true): ddpm-cifar10 is google/ddpm-cifar10-32 (35.7M parameters, variance
# fixed_large); ddpm-256 is the layout of google/ddpm-celebahq-256 / -church-256 / -bedroom-256 (attention
# at 16x16, variance fixed_small). Kept apart from PRESETS, whose every entry the op tests walk.
_DDPM_SAMPLING = dict(clip_x0=True, clip_range=1.0)
DDPM_PRESETS: Dict[str, ModelConfig] = {
    "ddpm-cifar10": ModelConfig(DDPMUNetConfig(), DiffusionConfig(variant="paper", **_DDPM_SAMPLING)),
    "ddpm-256": ModelConfig(
        DDPMUNetConfig(sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
                       down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4),
        DiffusionConfig(variant="posterior", **_DDPM_SAMPLING)),
}


def get_preset(name: str) -> ModelConfig:
    """A preset by name: PRESETS (labml's UNet) or DDPM_PRESETS (the DDPM paper's)."""
    try:
        return PRESETS[name] if name in PRESETS else DDPM_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS) + sorted(DDPM_PRESETS)}") from None
