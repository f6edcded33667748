// The attention core of the CPU AttentionBlock for short sequences: softmax(q k^T * scale) v per
// (sample, head), read straight from the qkv projection's rows and written token-major, ready for the
// out projection's GEMM. No torch types.
//
// Layout (labml's AttentionBlock): qkv is [B * N, heads * 3 * d_k] with rows of stride `qkv_row`; the
// row of token n holds, per head h, [q_h | k_h | v_h], each d_k wide. out is [B * N, heads * d_k]
// (contiguous), head h at columns [h * d_k, (h + 1) * d_k). Scores, softmax and the weighted sum run in
// fp32 (inputs widened), the output is rounded once to the element type, as ATen's SDPA does.
#pragma once

#include <stdint.h>

#include "cpu_math.h"

namespace ddpm_fast {

struct AttentionCoreParams {
  const void* qkv = nullptr;
  void* out = nullptr;
  int64_t batch = 0, tokens = 0, heads = 0, d_k = 0;
  int64_t qkv_row = 0;  // elements between consecutive token rows of qkv
  float scale = 1.0f;
  ElemType type = ElemType::kFloat32;  // qkv and out
};

// Parallel over (sample, head) by at::parallel_for; each item's result does not depend on the thread count.
void attention_core_cpu(const AttentionCoreParams& p);

}  // namespace ddpm_fast
