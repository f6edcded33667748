// The ResidualBlock's output on the CPU: out = x + bias[c] + residual (+ residual_bias[c]).
//
// The spec is ddpm_fast/reference/functional.py (residual_add); the biases are cast to x's dtype
// first, as the spec does. Sums run in fp32 in the spec's order ((x + bias) + residual) +
// residual_bias, rounded once to x's dtype: bit for bit the spec in fp32. No torch types.
#pragma once

#include <stdint.h>

#include "cpu_math.h"

namespace ddpm_fast {

struct ResidualAddParams {
  const void* x = nullptr;          // dense NCHW or channels_last
  const void* residual = nullptr;   // same shape and strides as x
  const void* bias = nullptr;       // [C] or nullptr
  const void* residual_bias = nullptr;  // [C] or nullptr
  void* out = nullptr;              // same shape and strides as x
  int64_t batch = 0, channels = 0, hw = 0;
  bool channels_last = false;
  ElemType x_type = ElemType::kFloat32;  // x, residual, out
  ElemType bias_type = ElemType::kFloat32;
  ElemType residual_bias_type = ElemType::kFloat32;
};

// Elementwise, split over planes (NCHW) or pixels (channels_last) by at::parallel_for.
void residual_add_cpu(const ResidualAddParams& p);

}  // namespace ddpm_fast
