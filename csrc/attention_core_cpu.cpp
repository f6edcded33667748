// CPU kernel of the short-sequence attention core (attention_core.h). Why: at the UNet's low
// resolutions (digits16's 4 x 4 blocks: 16 tokens, d_k = 128) ATen's flash SDPA spends ~50 us per call
// at batch 16 for ~2 MFLOP, most of it per-(sample, head) setup, and its output then needs a transposing
// copy before the out projection. Here one (sample, head) is one work item held in L1: K is staged
// transposed, so every query's scores are d_k broadcast multiply-adds over a row of keys (no horizontal
// sums), then a softmax over that row and the weighted sum of V rows, all loops GCC vectorizes for each
// ISA variant (cpu_math.h).
#include "attention_core.h"

#include "cpu_elem.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <memory>

namespace ddpm_fast {
namespace {

constexpr int64_t kParallelMin = 1 << 15;  // multiply-adds per thread below which fork/join costs more

constexpr int64_t kKeyBlock = 16;   // keys per score block: one 16-lane fp32 vector
constexpr int64_t kQueryBlock = 4;  // queries scored together: four independent FMA chains
constexpr int64_t kValueBlock = 64; // output columns accumulated together: four 16-lane vectors

CPU_INLINE int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Scratch layout of one item, all fp32 and zero-padded: Q (scaled) [Np][Dp], K^T [D][Np], V [N][Dp],
// scores [Np][Np], with Np = N rounded up to kKeyBlock and Dp = d_k rounded up to kValueBlock, so the
// blocked loops below have fixed trip counts (registers, not memory, carry their sums).
struct CoreScratch {
  int64_t np, dp;
  std::unique_ptr<float[]> buf;
  float *q, *kt, *v, *s;
  CoreScratch(int64_t N, int64_t D) : np(round_up(N, kKeyBlock)), dp(round_up(D, kValueBlock)) {
    const int64_t nq = np * dp, nk = D * np, nv = N * dp, ns = np * np;
    buf.reset(new float[static_cast<size_t>(nq + nk + nv + ns)]());
    q = buf.get(), kt = q + nq, v = kt + nk, s = v + nv;
  }
};

template <typename T>
CPU_INLINE void stage_item(const AttentionCoreParams& p, const T* base, CoreScratch& w) {
  const int64_t N = p.tokens, D = p.d_k;
  for (int64_t j = 0; j < N; ++j) {
    const T* row = base + j * p.qkv_row;
    for (int64_t d = 0; d < D; ++d) w.q[j * w.dp + d] = Elem<T>::load(row[d]) * p.scale;
    for (int64_t d = 0; d < D; ++d) w.kt[d * w.np + j] = Elem<T>::load(row[D + d]);
    for (int64_t d = 0; d < D; ++d) w.v[j * w.dp + d] = Elem<T>::load(row[2 * D + d]);
  }
}

// scores[i][j] = q_i . k_j for every query (padded rows included: zero queries, never stored). Four
// queries at a time, written out as four accumulators so that GCC keeps each in a vector register
// and broadcasts the query values (as a [4][16] array it vectorized across queries, with shuffles).
CPU_INLINE void score_item(int64_t D, CoreScratch& w) {
  static_assert(kQueryBlock == 4, "score_item unrolls four queries");
  for (int64_t i0 = 0; i0 < w.np; i0 += kQueryBlock)
    for (int64_t j0 = 0; j0 < w.np; j0 += kKeyBlock) {
      float a0[kKeyBlock] = {}, a1[kKeyBlock] = {}, a2[kKeyBlock] = {}, a3[kKeyBlock] = {};
      const float* __restrict q = w.q + i0 * w.dp;
      for (int64_t d = 0; d < D; ++d) {
        const float* __restrict k = w.kt + d * w.np + j0;
        const float q0 = q[d], q1 = q[w.dp + d], q2 = q[2 * w.dp + d], q3 = q[3 * w.dp + d];
        for (int64_t jj = 0; jj < kKeyBlock; ++jj) {
          a0[jj] += q0 * k[jj];
          a1[jj] += q1 * k[jj];
          a2[jj] += q2 * k[jj];
          a3[jj] += q3 * k[jj];
        }
      }
      float* __restrict out = w.s + i0 * w.np + j0;
      for (int64_t jj = 0; jj < kKeyBlock; ++jj) {
        out[jj] = a0[jj];
        out[w.np + jj] = a1[jj];
        out[2 * w.np + jj] = a2[jj];
        out[3 * w.np + jj] = a3[jj];
      }
    }
}

// Row i of the scores -> softmax weights over the N real keys, in place; returns 1 / their sum.
CPU_INLINE float softmax_row(float* __restrict s, int64_t N) {
  float m = s[0];
  for (int64_t j = 1; j < N; ++j) m = s[j] > m ? s[j] : m;
  float sum = 0.0f;
  for (int64_t j = 0; j < N; ++j) {
    s[j] = exp_nonpositive(s[j] - m);
    sum += s[j];
  }
  return 1.0f / sum;
}

// One (sample b, head h): stage, score, then per query the softmax and the weighted sum of V rows.
template <typename T>
CPU_INLINE void core_item(const AttentionCoreParams& p, int64_t b, int64_t h, CoreScratch& w) {
  const int64_t N = p.tokens, D = p.d_k;
  stage_item<T>(p, static_cast<const T*>(p.qkv) + b * N * p.qkv_row + h * 3 * D, w);
  score_item(D, w);
  T* out = static_cast<T*>(p.out) + b * N * (p.heads * D) + h * D;
  for (int64_t i = 0; i < N; ++i) {
    float* __restrict s = w.s + i * w.np;
    const float inv = softmax_row(s, N);
    T* orow = out + i * (p.heads * D);
    for (int64_t d0 = 0; d0 < D; d0 += kValueBlock) {  // four 16-wide accumulators (see score_item)
      float a0[16] = {}, a1[16] = {}, a2[16] = {}, a3[16] = {};
      for (int64_t j = 0; j < N; ++j) {
        const float pj = s[j];
        const float* __restrict vj = w.v + j * w.dp + d0;
        for (int64_t dd = 0; dd < 16; ++dd) {
          a0[dd] += pj * vj[dd];
          a1[dd] += pj * vj[16 + dd];
          a2[dd] += pj * vj[32 + dd];
          a3[dd] += pj * vj[48 + dd];
        }
      }
      float acc[kValueBlock];
      for (int64_t dd = 0; dd < 16; ++dd) acc[dd] = a0[dd], acc[16 + dd] = a1[dd], acc[32 + dd] = a2[dd], acc[48 + dd] = a3[dd];
      const int64_t n = std::min(kValueBlock, D - d0);
      for (int64_t dd = 0; dd < n; ++dd) orow[d0 + dd] = Elem<T>::store(acc[dd] * inv);
    }
  }
}

template <typename T>
CPU_INLINE void core_range(const AttentionCoreParams& p, int64_t begin, int64_t end) {
  CoreScratch w(p.tokens, p.d_k);
  for (int64_t item = begin; item < end; ++item) core_item<T>(p, item / p.heads, item % p.heads, w);
}

#define DDPM_CORE_ENTRY_POINTS(T, SUFFIX, TARGET, ISA) \
  TARGET void core_##SUFFIX(const AttentionCoreParams& p, int64_t begin, int64_t end) { core_range<T>(p, begin, end); }
CPU_FOR_EACH_VARIANT(DDPM_CORE_ENTRY_POINTS)
#undef DDPM_CORE_ENTRY_POINTS

}  // namespace

void attention_core_cpu(const AttentionCoreParams& p) {
  if (p.batch == 0 || p.tokens == 0 || p.heads == 0 || p.d_k == 0) return;
  void (*fn)(const AttentionCoreParams&, int64_t, int64_t);
  switch (p.type) {
    case ElemType::kBFloat16: fn = CPU_PICK(core, bf16); break;
    case ElemType::kFloat16: fn = CPU_PICK(core, f16); break;
    default: fn = CPU_PICK(core, f32); break;
  }
  const int64_t work = 2 * p.tokens * p.tokens * p.d_k;  // multiply-adds of one item
  const int64_t grain = std::max<int64_t>(1, kParallelMin / std::max<int64_t>(1, work));
  at::parallel_for(0, p.batch * p.heads, grain, [&](int64_t begin, int64_t end) { fn(p, begin, end); });
}

}  // namespace ddpm_fast
