// Fused GroupNorm (+ per-(sample, channel) add) (+ Swish) on the CPU: parameters of one call.
//
// The spec is ddpm_fast/reference/functional.py (groupnorm_swish):
//     v    = x + add[b, c]                    (rounded to x's dtype, as the spec adds in that dtype)
//     mean, var over the C/G channels and H*W pixels of each (sample, group)    (fp32, two-pass)
//     y    = (v - mean) / sqrt(var + eps) * weight[c] + bias[c]
//     out  = Swish(y) = y * sigmoid(y)        (or y), rounded once to x's dtype
// No torch types, so the math stays readable apart from the glue (bindings.cpp).
#pragma once

#include <stdint.h>

#include "cpu_math.h"

namespace ddpm_fast {

struct GroupNormSwishParams {
  const void* x = nullptr;       // [B, C, H*W] through the strides below
  void* out = nullptr;           // same shape, own strides
  const void* weight = nullptr;  // [C], contiguous
  const void* bias = nullptr;    // [C], contiguous
  const void* add = nullptr;     // [B, C] through sa_b / sa_c, or nullptr
  int64_t batch = 0, channels = 0, hw = 0, groups = 1;
  // Element strides. The kernel walks one of two layouts: planar (sx_hw == sy_hw == 1: each
  // channel's H*W pixels contiguous, NCHW and channel slices of it) or interleaved (sx_c == sy_c == 1:
  // each pixel's channels contiguous, channels_last). The binding copies anything else into one.
  int64_t sx_b = 0, sx_c = 0, sx_hw = 0;
  int64_t sy_b = 0, sy_c = 0, sy_hw = 0;
  int64_t sa_b = 0, sa_c = 0;
  float eps = 1e-5f;
  bool swish = true;
  ElemType x_type = ElemType::kFloat32;      // x and out
  ElemType param_type = ElemType::kFloat32;  // weight and bias
  ElemType add_type = ElemType::kFloat32;
};

// True when the strides fit the planar or the interleaved walk.
inline bool groupnorm_swish_planar(const GroupNormSwishParams& p) { return p.sx_hw == 1 && p.sy_hw == 1; }
inline bool groupnorm_swish_interleaved(const GroupNormSwishParams& p) { return p.sx_c == 1 && p.sy_c == 1; }

// Runs the kernel (at::parallel_for over independent work items with a fixed split, so the result
// does not depend on the thread count). Requires planar or interleaved strides.
void groupnorm_swish_cpu(const GroupNormSwishParams& p);

}  // namespace ddpm_fast
