"""THE SPEC: every op the fast path fuses, written once in plain PyTorch.

Each function here is the definition its fused counterpart in `ddpm_fast.ops` must match
(same name, same signature). The UNet calls these through `self.F`, so swapping the namespace
swaps the implementation while the weights and the forward stay the same.
Nothing here imports the fast path.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["conv2d", "conv_transpose2d", "upsample_conv2d", "groupnorm_swish", "residual_add", "attention",
           "time_embedding", "reverse_step", "philox_normal", "N_COEFFS", "STREAM_STEP", "STREAM_X_T"]


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def groupnorm_swish(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int,
                    eps: float = 1e-5, add: Optional[torch.Tensor] = None, swish: bool = True) -> torch.Tensor:
    """Swish(GroupNorm(x + add[:, :, None, None])), or without the Swish when `swish` is False.

    x: [B, C, H, W]; weight, bias: [C]; add: optional [B, C], the ResidualBlock's time projection,
    added before the statistics so the fused kernel can fold it into its single read of x.
    """
    if add is not None:
        x = x + add[:, :, None, None].to(x.dtype)
    wide = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), bias.dtype)
    if wide != x.dtype or weight.dtype != bias.dtype:
        # Mixed precision (fp32 affine parameters with fp16/bf16 activations, as autocast keeps them):
        # normalise in the widest dtype, return x's. CUDA's group_norm refuses mixed dtypes outright.
        y = groupnorm_swish(x.to(wide), weight.to(wide), bias.to(wide), num_groups, eps, None, swish)
        return y.to(x.dtype)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return _swish(y) if swish else y


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
           padding: Sequence[int]) -> torch.Tensor:
    """The UNet's Conv2d layers: zero padding, no dilation, one group. x: [B, Ci, H, W]; weight:
    [Co, Ci, KH, KW]; bias: [Co] or None; stride: an (h, w) pair; padding: an (h, w) pair, as an
    nn.Conv2d holds it, or four values (left, right, top, bottom), F.pad's order, for an asymmetric pad
    (the DDPM UNet's Downsample pads only right and bottom: (0, 1, 0, 1))."""
    padding = tuple(padding)
    if len(padding) == 4:
        return F.conv2d(F.pad(x, padding), weight, bias, tuple(stride), 0)
    return F.conv2d(x, weight, bias, tuple(stride), padding)


def upsample_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The DDPM UNet's Upsample: nearest-neighbour x2, then a 3x3 conv with padding 1.

    x: [B, Ci, H, W]; weight: [Co, Ci, 3, 3]; bias: [Co] or None -> [B, Co, 2H, 2W]. The same map is a
    4x4 stride-2 transposed conv (padding 1) whose kernel sums the 3x3 taps each output parity sees,
    which the fast op uses to skip the 4x larger upsampled intermediate.
    """
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, 1, 1)


def conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
                     padding: Sequence[int]) -> torch.Tensor:
    """The UNet's Upsample: F.conv_transpose2d without output padding, dilation or groups. x: [B, Ci, H, W];
    weight: [Ci, Co, K, K]; bias: [Co] or None; stride, padding: (h, w) pairs, as nn.ConvTranspose2d."""
    return F.conv_transpose2d(x, weight, bias, tuple(stride), tuple(padding))


def residual_add(x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor,
                 residual_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x + bias[:, None, None] + residual (+ residual_bias[:, None, None]): the ResidualBlock's output.

    x: [B, C, H, W], conv2's output computed without its bias; bias: conv2's bias [C] (or None);
    residual: the shortcut, [B, C, H, W] in x's dtype, computed without its bias when it is a 1x1 conv,
    whose bias is then `residual_bias`. Keeping the biases out of the convs lets the fused op add all
    four terms in one pass, where a conv with bias costs an extra read and write for each bias.
    """
    out = x if bias is None else x + bias[:, None, None].to(x.dtype)
    out = out + residual
    return out if residual_bias is None else out + residual_bias[:, None, None].to(x.dtype)


def attention(x: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor, out_weight: torch.Tensor,
              out_bias: torch.Tensor, n_heads: int, d_k: int, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """labml's AttentionBlock forward (its GroupNorm is never applied), residual included.

    x: [B, C, H, W] -> tokens [B, N=H*W, C]; qkv = Linear(C, 3*heads*d_k) viewed [B, N, heads, 3*d_k]
    and chunked into q, k, v; softmax(q k^T / sqrt(d_k)) over the keys; Linear(heads*d_k, C); + x,
    or + `residual` ([B, C, H, W], x's dtype) when given: the DDPM UNet's attention normalises its input
    first (x = GroupNorm(h)) and adds the un-normalised h.
    """
    b, c, h, w = x.shape
    tokens = x.reshape(b, c, h * w).permute(0, 2, 1)
    qkv = F.linear(tokens, proj_weight, proj_bias).view(b, h * w, n_heads, 3 * d_k)
    q, k, v = torch.chunk(qkv, 3, dim=-1)
    scores = torch.einsum("bihd,bjhd->bijh", q, k) * (d_k ** -0.5)
    probs = scores.softmax(dim=2)
    res = torch.einsum("bijh,bjhd->bihd", probs, v).reshape(b, h * w, n_heads * d_k)
    if residual is not None:
        tokens = residual.reshape(b, c, h * w).permute(0, 2, 1)
    res = F.linear(res, out_weight, out_bias) + tokens
    return res.permute(0, 2, 1).reshape(b, c, h, w)


def sinusoidal_embedding(t: torch.Tensor, width: int, freq_shift: Optional[float] = None,
                         flip_sin_to_cos: bool = False) -> torch.Tensor:
    """[B] steps -> [B, width] float32: half = width // 2 frequencies, sin then cos (cos then sin when
    `flip_sin_to_cos`).

    freq_shift None: labml's frequencies exp(i * -(ln(1e4) / (half - 1))). A number s: the DDPM paper's as
    diffusers writes them, exp((-ln(1e4) * i) / (half - s)), rounded in that order (s = 1 is labml's
    formula, but the float32 rounding differs by an ulp, which at t ~ 1000 moves the sinusoid by ~1e-4).
    """
    half = width // 2
    i = torch.arange(half, device=t.device, dtype=torch.float32)
    if freq_shift is None:
        freqs = torch.exp(i * -(math.log(10_000) / (half - 1)))
    else:
        freqs = torch.exp((-math.log(10_000) * i) / (half - freq_shift))
    arg = t.to(torch.float32)[:, None] * freqs[None, :]
    pair = (arg.cos(), arg.sin()) if flip_sin_to_cos else (arg.sin(), arg.cos())
    return torch.cat(pair, dim=1)


def time_embedding(t: torch.Tensor, lin1_weight: torch.Tensor, lin1_bias: torch.Tensor,
                   lin2_weight: torch.Tensor, lin2_bias: torch.Tensor, freq_shift: Optional[float] = None,
                   flip_sin_to_cos: bool = False) -> torch.Tensor:
    """TimeEmbedding: lin2(Swish(lin1(sinusoid(t)))) for integer steps t: [B] -> [B, E], the sinusoid as
    wide as lin1's input (labml: E // 4; the DDPM UNet: its base channels); see sinusoidal_embedding for
    freq_shift and flip_sin_to_cos (defaults: labml's).

    The sinusoid is computed in float32 and cast to the weights' dtype, as a float32 labml model
    under autocast would see it.
    """
    emb = sinusoidal_embedding(t, lin1_weight.shape[1], freq_shift, flip_sin_to_cos).to(lin1_weight.dtype)
    return F.linear(_swish(F.linear(emb, lin1_weight, lin1_bias)), lin2_weight, lin2_bias)


# ---------------------------------------------------------------------------------------------
# The reverse-diffusion step.
#
# Every sampler variant (labml DDPM, paper DDPM, posterior variance, DDIM with eta, strided
# schedules) is one row of six coefficients per sampling step, computed in float64 on the host by
# `ddpm_fast.reference.diffusion` and stored float32:
#     x0   = c_x0_x * x_t + c_x0_eps * eps          (clamped to [clip_lo, clip_hi] when clipping)
#     prev = m_x0 * x0 + m_x * x_t + m_eps * eps + sigma * z
# So the kernel has no variant branches, the last step's "no noise" is sigma = 0 in the table (data,
# not a host branch), and one CUDA graph can replay every step with a device-side step index.
# ---------------------------------------------------------------------------------------------
N_COEFFS = 6
C_X0_X, C_X0_EPS, M_X0, M_X, M_EPS, SIGMA = range(N_COEFFS)


def reverse_step(x_t: torch.Tensor, eps: torch.Tensor, step: torch.Tensor, coeffs: torch.Tensor,
                 noise: Optional[torch.Tensor] = None, seed: int = 0,
                 clip: Optional[Tuple[float, float]] = None, image_offset: int = 0) -> torch.Tensor:
    """One reverse step x_t -> x_{t-1} from the coefficient row `coeffs[step]`.

    x_t: float32 [B, C, H, W] (any strides); eps: same shape, fp32/fp16/bf16; step: int64 scalar tensor
    (the row index, on any device); coeffs: float32 [S, 6]; noise: same shape as x_t, or None to draw
    z from the counter-based generator `philox_normal(x_t.shape, seed, step, image_offset=image_offset)`;
    seed, image_offset: integers or one-element integer tensors (image_offset: the global index of the
    batch's first image, so that image i draws the same noise in any batch position).
    Returns a new tensor with x_t's dtype and shape (contiguous in x_t's memory format).
    """
    # float32 arithmetic (float64 when x_t is float64, for high-precision reference runs).
    acc = torch.promote_types(x_t.dtype, torch.float32)
    row = coeffs.index_select(0, step.reshape(1).to(coeffs.device, torch.long))[0].to(acc)
    x = x_t.to(acc)
    e = eps.to(acc)
    x0 = row[C_X0_X] * x + row[C_X0_EPS] * e
    if clip is not None:
        x0 = x0.clamp(clip[0], clip[1])
    if noise is None:
        noise = philox_normal(x_t.shape, seed, step, device=x_t.device, image_offset=image_offset)
    out = row[M_X0] * x0 + row[M_X] * x + row[M_EPS] * e + row[SIGMA] * noise.to(acc)
    return out.to(x_t.dtype)


# --- Philox4x32-10, in int64 tensor arithmetic so the spec runs anywhere -----------------------
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_MASK32 = 0xFFFFFFFF


def _mulhilo32(m: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of m * b for uint32 values held in int64, without int64 overflow."""
    t_lo = m * (b & 0xFFFF)              # < 2^48
    t_hi = m * (b >> 16)                 # < 2^48
    lo_full = t_lo + ((t_hi & 0xFFFF) << 16)
    lo = lo_full & _MASK32
    hi = ((t_hi >> 16) + (lo_full >> 32)) & _MASK32
    return hi, lo


def philox4x32(counter: Tuple[torch.Tensor, ...], key: Tuple[int, int]) -> Tuple[torch.Tensor, ...]:
    """Philox4x32 with 10 rounds (Salmon et al., SC'11) on uint32 words held in int64 tensors."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
    return c0, c1, c2, c3


# Philox streams (the counter's last word): one for the reverse steps' noise, one for the initial x_T.
STREAM_STEP, STREAM_X_T = 0, 1


def philox_normal(shape, seed: int, step, device=None, image_offset: int = 0, stream: int = STREAM_STEP
                  ) -> torch.Tensor:
    """Standard normal noise keyed by (seed, stream, step, global element index), float32.

    `shape[0]` counts images: element e (row-major index over `shape`) has the global index
    g = image_offset * P + e, P = prod(shape[1:]) the elements of one image, so the images of a run drawn
    in batches (image_offset = the batch's first image) get the noise of the run drawn in one batch.
    g takes Philox block g // 4 with counter (block_lo, block_hi, step, stream) and key
    (seed_lo, seed_hi); `stream` STREAM_STEP is the reverse step's noise (the fused kernel draws only
    that one), STREAM_X_T the initial noise x_T (step 0). Of the block's four words, the pair
    (w0, w1) feeds elements 4k, 4k+1 and (w2, w3) elements 4k+2, 4k+3 through Box-Muller:
    u = ((w >> 8) + 0.5) / 2^24 (exact in float32, never 0 or 1), r = sqrt(-2 ln u_a),
    z = r cos(2 pi u_b) for the even element, r sin(2 pi u_b) for the odd one.
    """
    shape = tuple(shape)
    n = math.prod(shape)
    step = int(step.item()) if torch.is_tensor(step) else int(step)
    seed = (int(seed.item()) if torch.is_tensor(seed) else int(seed)) & 0xFFFFFFFFFFFFFFFF
    offset = int(image_offset.item()) if torch.is_tensor(image_offset) else int(image_offset)
    per_image = math.prod(shape[1:]) if shape else 1
    if offset < 0 or offset * per_image + n >= 2 ** 63:
        raise ValueError(f"philox_normal: image_offset must be >= 0 and keep the element index below 2^63, "
                         f"got {offset}")
    if stream not in (STREAM_STEP, STREAM_X_T):
        raise ValueError(f"philox_normal: stream must be {STREAM_STEP} (steps) or {STREAM_X_T} (x_T), got {stream!r}")
    e = torch.arange(n, dtype=torch.int64, device=device) + offset * per_image
    block = e >> 2
    zeros = torch.zeros_like(block)
    words = philox4x32((block & _MASK32, block >> 32, zeros + (step & _MASK32), zeros + stream),
                       (seed & _MASK32, seed >> 32))
    lane = e & 3
    w_a = torch.where(lane < 2, words[0], words[2])
    w_b = torch.where(lane < 2, words[1], words[3])
    u_a = ((w_a >> 8).to(torch.float32) + 0.5) * (2.0 ** -24)
    u_b = ((w_b >> 8).to(torch.float32) + 0.5) * (2.0 ** -24)
    r = torch.sqrt(-2.0 * torch.log(u_a))
    theta = (2.0 * math.pi) * u_b
    z = torch.where((lane & 1) == 0, r * torch.cos(theta), r * torch.sin(theta))
    return z.reshape(shape)
