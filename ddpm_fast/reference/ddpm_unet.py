"""The DDPM paper's UNet as diffusers' UNet2DModel lays it out, so a diffusers state_dict loads with strict=True.

The family of google/ddpm-cifar10-32, ddpm-celebahq-256, ddpm-church-256 and the models diffusers'
train_unconditional.py writes. Module names are UNet2DModel's (down_blocks.0.resnets.1.conv1, ...), the
math is its forward, and every fusible step goes through `self.F` as in the labml UNet (reference/unet.py),
so `ops.fused(model)` routes this network through the fast ops too. What differs from labml's network:
attention normalises its input first; Downsample pads right/bottom by one and convolves unpadded
(downsample_padding 0); Upsample is nearest x2 then a 3x3 conv; an up block narrows its channels in its last
ResNet; the norms use the config's eps.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from ..config import DDPMUNetConfig
from .unet import OpsModule, ResidualBlock, check_inputs


class ResnetBlock2D(ResidualBlock):
    """diffusers' ResnetBlock2D ("default" time scale shift): labml's ResidualBlock math under diffusers' names."""

    TIME_LINEAR = "time_emb_proj"

    def __init__(self, in_channels: int, out_channels: int, time_channels: int, groups: int, eps: float,
                 dropout: float):
        OpsModule.__init__(self)
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(time_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    @property
    def shortcut(self) -> nn.Module:
        conv = self._modules.get("conv_shortcut")
        return _IDENTITY if conv is None else conv


_IDENTITY = nn.Identity()


class Attention(OpsModule):
    """diffusers' Attention as UNet2DModel uses it: GroupNorm, q/k/v Linears, softmax(q k^T / sqrt(d)), to_out, + x."""

    def __init__(self, channels: int, heads: int, head_dim: int, groups: int, eps: float):
        super().__init__()
        inner = heads * head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, inner)
        self.to_k = nn.Linear(channels, inner)
        self.to_v = nn.Linear(channels, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, channels), nn.Dropout(0.0)])
        self.heads, self.head_dim = heads, head_dim

    def qkv_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """to_q/k/v as the one [3 * heads * d, C] projection the attention op takes, whose output viewed
        [..., heads, 3 * d] chunks into q, k, v per head (labml's layout). A few small copies per call."""
        h, d = self.heads, self.head_dim
        w = torch.cat([m.weight.view(h, d, -1) for m in (self.to_q, self.to_k, self.to_v)], dim=1)
        b = torch.cat([m.bias.view(h, d) for m in (self.to_q, self.to_k, self.to_v)], dim=1)
        return w.reshape(3 * h * d, -1), b.reshape(3 * h * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.group_norm
        h = self.F.groupnorm_swish(x, n.weight, n.bias, n.num_groups, n.eps, swish=False)
        w, b = self.qkv_weights()
        out = self.to_out[0]
        return self.F.attention(h, w, b, out.weight, out.bias, self.heads, self.head_dim, residual=x)


class Downsample2D(OpsModule):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)
        # padding 0: diffusers pads right and bottom by one first (F.pad's (left, right, top, bottom) order).
        self.pad = (0, 1, 0, 1) if padding == 0 else tuple(self.conv.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return self.F.conv2d(x, c.weight, c.bias, c.stride, self.pad)


class Upsample2D(OpsModule):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.F.upsample_conv2d(x, self.conv.weight, self.conv.bias)


class _Level(nn.Module):
    """A down or up block: ResNets, each followed by attention in the Attn* types, then a resampler."""

    def __init__(self, resnets: List[ResnetBlock2D], attentions: Optional[List[Attention]], sampler_name: str,
                 sampler: Optional[nn.Module]):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if attentions is not None:
            self.attentions = nn.ModuleList(attentions)
        if sampler is not None:
            self.add_module(sampler_name, nn.ModuleList([sampler]))
        self.sampler_name = sampler_name

    def layers(self):
        """(resnet, attention or None) pairs in forward order."""
        attns = self._modules.get("attentions")
        return [(r, attns[i] if attns is not None else None) for i, r in enumerate(self.resnets)]

    def resample(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        sampler = self._modules.get(self.sampler_name)
        return None if sampler is None else sampler[0](x)


class TimestepEmbedding(OpsModule):
    """Timesteps (the sinusoid) + TimestepEmbedding (linear_1, SiLU, linear_2): [B] steps -> [B, 4 C0]."""

    def __init__(self, channels: int, freq_shift: float, flip_sin_to_cos: bool):
        super().__init__()
        self.linear_1 = nn.Linear(channels, 4 * channels)
        self.linear_2 = nn.Linear(4 * channels, 4 * channels)
        self.freq_shift, self.flip_sin_to_cos = float(freq_shift), bool(flip_sin_to_cos)

    def sinusoid_args(self) -> dict:
        return {"freq_shift": self.freq_shift, "flip_sin_to_cos": self.flip_sin_to_cos}

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a, b = self.linear_1, self.linear_2
        return self.F.time_embedding(t, a.weight, a.bias, b.weight, b.bias, **self.sinusoid_args())


class DDPMUNet(OpsModule):
    """UNet2DModel of the DDPM family. `DDPMUNet(cfg)`; forward(x [B, C, H, W], t [B] int) -> eps."""

    # The time MLP's module and its two Linears (sampling.time_table reads them by these names).
    TIME_PATH = ("time_embedding", "linear_1", "linear_2")

    def __init__(self, config: DDPMUNetConfig = DDPMUNetConfig()):
        super().__init__()
        self.config = c = config
        chans, time_c = c.block_out_channels, c.time_channels

        def resnet(c_in: int, c_out: int) -> ResnetBlock2D:
            return ResnetBlock2D(c_in, c_out, time_c, c.norm_num_groups, c.norm_eps, c.dropout)

        def attention(ch: int) -> Attention:
            return Attention(ch, *c.heads(ch), c.norm_num_groups, c.norm_eps)

        self.conv_in = nn.Conv2d(c.in_channels, chans[0], kernel_size=3, padding=1)
        self.time_embedding = TimestepEmbedding(chans[0], c.freq_shift, c.flip_sin_to_cos)
        down, c_prev = [], chans[0]
        for i, (kind, ch) in enumerate(zip(c.down_block_types, chans)):
            res = [resnet(c_prev if j == 0 else ch, ch) for j in range(c.layers_per_block)]
            attn = [attention(ch) for _ in res] if kind.startswith("Attn") else None
            last = i == len(chans) - 1
            down.append(_Level(res, attn, "downsamplers", None if last else Downsample2D(ch, c.downsample_padding)))
            c_prev = ch
        self.down_blocks = nn.ModuleList(down)
        self.mid_block = _MidBlock(resnet(chans[-1], chans[-1]), attention(chans[-1]) if c.add_attention else None,
                                   resnet(chans[-1], chans[-1]))
        up, spec = [], c.up_resnets()
        for i, kind in enumerate(c.up_block_types):
            res = [resnet(c_in, c_out) for lvl, _, c_in, c_out in spec if lvl == i]
            ch = res[0].conv1.out_channels
            attn = [attention(ch) for _ in res] if kind.startswith("Attn") else None
            up.append(_Level(res, attn, "upsamplers", None if i == len(chans) - 1 else Upsample2D(ch)))
        self.up_blocks = nn.ModuleList(up)
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, chans[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(chans[0], c.out_channels, kernel_size=3, padding=1)
        self.time_table = None  # as UNet.time_table: an optional precomputed time-projection table

    @classmethod
    def from_config(cls, config: DDPMUNetConfig) -> "DDPMUNet":
        return cls(config)

    def res_blocks(self) -> List[ResnetBlock2D]:
        """Every ResNet block in the order forward consumes time projections."""
        m = self.mid_block
        return ([r for blk in self.down_blocks for r in blk.resnets] + [m.resnets[0], m.resnets[1]]
                + [r for blk in self.up_blocks for r in blk.resnets])

    def time_projections(self, t: torch.Tensor) -> List[torch.Tensor]:
        """Each ResNet block's time_emb_proj(SiLU(time_embedding(t))) + conv1.bias, in res_blocks() order."""
        if self.time_table is not None:
            return self.time_table.lookup(t)
        t_emb = self.time_embedding(t)
        return [blk.time_projection(t_emb) for blk in self.res_blocks()]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        check_inputs(self.config, x, t)
        proj = iter(self.time_projections(t))
        x = self._conv(self.conv_in, x)
        skips = [x]
        for blk in self.down_blocks:
            for res, attn in blk.layers():
                x = res(x, time_proj=next(proj))
                x = x if attn is None else attn(x)
                skips.append(x)
            down = blk.resample(x)
            if down is not None:
                x = down
                skips.append(x)
        x = self.mid_block(x, next(proj), next(proj))
        for blk in self.up_blocks:
            for res, attn in blk.layers():
                x = res(torch.cat((x, skips.pop()), dim=1), time_proj=next(proj))
                x = x if attn is None else attn(x)
            up = blk.resample(x)
            x = x if up is None else up
        n = self.conv_norm_out
        return self._conv(self.conv_out, self.F.groupnorm_swish(x, n.weight, n.bias, n.num_groups, n.eps))


class _MidBlock(nn.Module):
    """UNetMidBlock2D: resnets.0, attentions.0 (unless add_attention is false), resnets.1."""

    def __init__(self, res1: ResnetBlock2D, attn: Optional[Attention], res2: ResnetBlock2D):
        super().__init__()
        self.resnets = nn.ModuleList([res1, res2])
        if attn is not None:
            self.attentions = nn.ModuleList([attn])

    def forward(self, x: torch.Tensor, proj1: torch.Tensor, proj2: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, time_proj=proj1)
        attns = self._modules.get("attentions")
        if attns is not None:
            x = attns[0](x)
        return self.resnets[1](x, time_proj=proj2)
