"""The labml.ai DDPM UNet, module for module, so labml state_dicts load with strict=True.

Every fusible step goes through `self.F`, the op namespace (default: `reference.functional`).
`ddpm_fast.ops.fused(model)` swaps in the fast ops from outside; this file never imports them.
"""
from __future__ import annotations

from types import ModuleType
from typing import List, Optional

import torch
from torch import nn

from ..config import UNetConfig
from . import functional


class Swish(nn.Module):
    """x * sigmoid(x). Kept as a module so labml's module tree (act1, act2, ...) is mirrored."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class OpsModule(nn.Module):
    """A module whose forward calls fusible ops through `self.F` (class default: the reference)."""

    F: ModuleType = functional

    def _conv(self, conv: nn.Conv2d, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """conv(x) through `self.F.conv2d` with the module's strides and padding; without its bias when
        `bias` is False (the caller adds it later, fused into another pass)."""
        return self.F.conv2d(x, conv.weight, conv.bias if bias else None, conv.stride, conv.padding)


class TimeEmbedding(OpsModule):
    """Sinusoidal step embedding then an MLP: [B] integer steps -> [B, n_channels]."""

    def __init__(self, n_channels: int):
        super().__init__()
        self.n_channels = n_channels
        self.lin1 = nn.Linear(n_channels // 4, n_channels)
        self.act = Swish()
        self.lin2 = nn.Linear(n_channels, n_channels)

    def sinusoid_args(self) -> dict:
        """The time_embedding op's sinusoid arguments: labml's, its defaults."""
        return {}

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.F.time_embedding(t, self.lin1.weight, self.lin1.bias, self.lin2.weight, self.lin2.bias)


class ResidualBlock(OpsModule):
    # The time projection's Linear (sampling.time_table reads it by this name).
    TIME_LINEAR = "time_emb"

    def __init__(self, in_channels: int, out_channels: int, time_channels: int, n_groups: int = 32,
                 dropout: float = 0.1):
        super().__init__()
        self.norm1 = nn.GroupNorm(n_groups, in_channels)
        self.act1 = Swish()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(n_groups, out_channels)
        self.act2 = Swish()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels
                         else nn.Identity())
        self.time_emb = nn.Linear(time_channels, out_channels)
        self.time_act = Swish()
        self.dropout = nn.Dropout(dropout)

    def time_projection(self, t_emb: torch.Tensor) -> torch.Tensor:
        """time_emb(Swish(t_emb)) + conv1.bias: [B, time_channels] -> [B, out_channels].

        Everything added per (sample, channel) to conv1's bias-free output before norm2. labml adds
        conv1's bias inside the conv and the time projection after it; the sum is the same, and with
        the bias here a precomputed table of projections (ops.time_embedding.TimeTable) carries it
        for free instead of a separate bias pass over the activation.
        """
        proj = getattr(self, self.TIME_LINEAR)(t_emb * torch.sigmoid(t_emb))  # time_act's Swish
        return proj if self.conv1.bias is None else proj + self.conv1.bias

    def forward(self, x: torch.Tensor, t_emb: Optional[torch.Tensor] = None,
                time_proj: Optional[torch.Tensor] = None) -> torch.Tensor:
        """labml's forward(x, t) when given the time embedding; or time_projection(t_emb), precomputed.

        The convs run without their biases: conv1's is in time_proj, and conv2's (and a 1x1 shortcut
        conv's) are added by residual_add together with the shortcut, so the fused path adds all of
        them in the passes it makes anyway (the math is labml's, summed in another order).
        """
        if time_proj is None:
            time_proj = self.time_projection(t_emb)
        n1, n2 = self.norm1, self.norm2
        h = self._conv(self.conv1, self.F.groupnorm_swish(x, n1.weight, n1.bias, n1.num_groups, n1.eps), bias=False)
        # labml: h += time_proj; norm2; act2. The add is folded into the normalisation's read.
        h = self.F.groupnorm_swish(h, n2.weight, n2.bias, n2.num_groups, n2.eps, add=time_proj)
        h = self._conv(self.conv2, self.dropout(h), bias=False)
        if isinstance(self.shortcut, nn.Conv2d):
            return self.F.residual_add(h, self.conv2.bias, self._conv(self.shortcut, x, bias=False), self.shortcut.bias)
        return self.F.residual_add(h, self.conv2.bias, self.shortcut(x))


class AttentionBlock(OpsModule):
    def __init__(self, n_channels: int, n_heads: int = 1, d_k: Optional[int] = None, n_groups: int = 32):
        super().__init__()
        if d_k is None:
            d_k = n_channels
        # labml owns this norm but never applies it; kept so state_dicts match.
        self.norm = nn.GroupNorm(n_groups, n_channels)
        self.projection = nn.Linear(n_channels, n_heads * d_k * 3)
        self.output = nn.Linear(n_heads * d_k, n_channels)
        self.scale = d_k ** -0.5
        self.n_heads = n_heads
        self.d_k = d_k

    def forward(self, x: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.F.attention(x, self.projection.weight, self.projection.bias, self.output.weight,
                                self.output.bias, self.n_heads, self.d_k)


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, time_channels: int, has_attn: bool, cfg: UNetConfig):
        super().__init__()
        self.res = ResidualBlock(in_channels, out_channels, time_channels, cfg.n_groups, cfg.dropout)
        self.attn = (AttentionBlock(out_channels, cfg.n_heads, cfg.d_k, cfg.n_groups) if has_attn
                     else nn.Identity())

    def forward(self, x: torch.Tensor, time_proj: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, time_proj=time_proj))


class UpBlock(DownBlock):
    """Same as DownBlock but its residual block also takes the skip connection's channels."""

    def __init__(self, in_channels: int, out_channels: int, time_channels: int, has_attn: bool, cfg: UNetConfig):
        super().__init__(in_channels + out_channels, out_channels, time_channels, has_attn, cfg)


class MiddleBlock(nn.Module):
    def __init__(self, n_channels: int, time_channels: int, cfg: UNetConfig):
        super().__init__()
        self.res1 = ResidualBlock(n_channels, n_channels, time_channels, cfg.n_groups, cfg.dropout)
        self.attn = AttentionBlock(n_channels, cfg.n_heads, cfg.d_k, cfg.n_groups)
        self.res2 = ResidualBlock(n_channels, n_channels, time_channels, cfg.n_groups, cfg.dropout)

    def forward(self, x: torch.Tensor, proj1: torch.Tensor, proj2: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x, time_proj=proj1)), time_proj=proj2)


class Upsample(OpsModule):
    def __init__(self, n_channels: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(n_channels, n_channels, (4, 4), (2, 2), (1, 1))

    def forward(self, x: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = self.conv
        return self.F.conv_transpose2d(x, c.weight, c.bias, c.stride, c.padding)


class Downsample(OpsModule):
    def __init__(self, n_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(n_channels, n_channels, (3, 3), (2, 2), (1, 1))

    def forward(self, x: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._conv(self.conv, x)


class UNet(OpsModule):
    """labml's UNet. `UNet(cfg)` or `UNet.from_config(cfg)`; forward(x [B, C, H, W], t [B] int) -> eps."""

    # The time MLP's module and its two Linears (sampling.time_table reads them by these names).
    TIME_PATH = ("time_emb", "lin1", "lin2")

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        c = config
        time_c = c.time_channels
        n_res = len(c.ch_mults)
        self.image_proj = nn.Conv2d(c.image_channels, c.n_channels, kernel_size=(3, 3), padding=(1, 1))
        self.time_emb = TimeEmbedding(time_c)

        down = []
        out_channels = in_channels = c.n_channels
        for i in range(n_res):
            out_channels = in_channels * c.ch_mults[i]
            for _ in range(c.n_blocks):
                down.append(DownBlock(in_channels, out_channels, time_c, c.is_attn[i], c))
                in_channels = out_channels
            if i < n_res - 1:
                down.append(Downsample(in_channels))
        self.down = nn.ModuleList(down)
        self.middle = MiddleBlock(out_channels, time_c, c)

        up = []
        in_channels = out_channels
        for i in reversed(range(n_res)):
            out_channels = in_channels
            for _ in range(c.n_blocks):
                up.append(UpBlock(in_channels, out_channels, time_c, c.is_attn[i], c))
            out_channels = in_channels // c.ch_mults[i]
            up.append(UpBlock(in_channels, out_channels, time_c, c.is_attn[i], c))
            in_channels = out_channels
            if i > 0:
                up.append(Upsample(in_channels))
        self.up = nn.ModuleList(up)

        self.norm = nn.GroupNorm(8, c.n_channels)
        self.act = Swish()
        self.final = nn.Conv2d(in_channels, c.image_channels, kernel_size=(3, 3), padding=(1, 1))
        # Optional precomputed [T, sum(out_c)] time-projection table (see ops.time_embedding);
        # anything with lookup(t) -> list of [B, out_c] tensors in res_blocks() order.
        self.time_table = None

    @classmethod
    def from_config(cls, config: UNetConfig) -> "UNet":
        return cls(config)

    def res_blocks(self) -> List[ResidualBlock]:
        """Every ResidualBlock in the order forward consumes time projections."""
        blocks = [m.res for m in self.down if isinstance(m, DownBlock)]
        blocks += [self.middle.res1, self.middle.res2]
        blocks += [m.res for m in self.up if isinstance(m, UpBlock)]
        return blocks

    def time_projections(self, t: torch.Tensor) -> List[torch.Tensor]:
        """Each ResidualBlock's time_emb(Swish(TimeEmbedding(t))), in res_blocks() order."""
        if self.time_table is not None:
            return self.time_table.lookup(t)
        t_emb = self.time_emb(t)
        return [blk.time_projection(t_emb) for blk in self.res_blocks()]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        check_inputs(self.config, x, t)
        proj = iter(self.time_projections(t))
        x = self._conv(self.image_proj, x)
        skips = [x]
        for m in self.down:
            x = m(x, next(proj)) if isinstance(m, DownBlock) else m(x)
            skips.append(x)
        x = self.middle(x, next(proj), next(proj))
        for m in self.up:
            if isinstance(m, Upsample):
                x = m(x)
            else:
                x = m(torch.cat((x, skips.pop()), dim=1), next(proj))
        n = self.norm
        return self._conv(self.final, self.F.groupnorm_swish(x, n.weight, n.bias, n.num_groups, n.eps))


def check_inputs(cfg, x: torch.Tensor, t: torch.Tensor) -> None:
    """Cheap shape checks only (no device sync): wrong shapes otherwise fail deep inside a conv. cfg: a
    UNetConfig or DDPMUNetConfig (anything with image_channels and downsample_factor)."""
    if x.dim() != 4 or x.shape[1] != cfg.image_channels:
        raise ValueError(f"UNet expects x of shape [B, {cfg.image_channels}, H, W], got {tuple(x.shape)}")
    down = cfg.downsample_factor
    if x.shape[2] % down or x.shape[3] % down:
        raise ValueError(f"UNet input H, W must be divisible by {down}, got {tuple(x.shape[2:])}")
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"UNet expects t of shape [{x.shape[0]}], got {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"UNet expects integer steps t, got dtype {t.dtype}")
