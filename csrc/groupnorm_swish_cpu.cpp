// CPU kernel of the fused GroupNorm (+ add) (+ Swish) over the math in cpu_math.h.
//
// Two reads of x and one write of y per call (the reference composition makes ~6 passes: the add,
// group_norm's statistics and normalisation, sigmoid, mul). Statistics are fp32 per chunk and
// merged in double:
//   * every value is taken relative to a pivot, the (x + add) value at (b, first channel of the
//     group, pixel 0): for data with a large common offset (x = 1000 + N(0, 1)) the differences are
//     exact and the mean stays a small offset from an exact data value, so nothing is lost to
//     ulp(1000) (the spec's fp32 group_norm itself folds the mean into a shift, which does lose it);
//   * within a chunk of <= kChunk values staged in L1 the moments are exact two-pass (mean, then
//     the sum of squared deviations), and chunks merge by Chan et al.'s formula: never
//     E[x^2] - E[x]^2.
// Layouts: planar (NCHW: a work item is one (sample, group), its channels' pixel rows contiguous)
// and interleaved (channels_last: a work item is a block of pixel rows of one sample, all channels,
// so the inner loops run along contiguous channels; per-channel moments of each block are merged
// per group afterwards; with >= 2 samples per thread, each thread runs whole samples, one fork per
// call). Work items and their merge order are fixed, so the result is the same for any thread count.
// The AVX-512 variant's apply loops for fp32 and bf16 are written with intrinsics (cpu_vec512.h: the
// Swish without a division); everything else is autovectorized from the scalar code here.
#include "groupnorm_swish.h"
#include "cpu_elem.h"
#include "cpu_moments.h"
#include "cpu_vec512.h"

// GCC 12 warns that the AVX-512 intrinsics' own _mm512_undefined_* placeholders "may be used
// uninitialized" once inlined (GCC bug 105593, fixed in GCC 13): a false positive.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <memory>

namespace ddpm_fast {
namespace {

constexpr int64_t kChunk = 2048;          // values staged per chunk (8 KiB of fp32: L1-resident)
// Fewer elements per thread than this: fork/join costs more. 2^15 kept 16 x 128 x 4 x 4 (2048 values a
// sample) on one thread; from 2^13 it splits: 32 -> 18 us in bf16 on the 2-core dev VM.
constexpr int64_t kParallelMin = 1 << 13;
// Values of one sample (channels_last) that the statistics pass keeps staged for the apply pass (64 KiB of
// fp32: with the sample's x and y, still in a core's L2).
constexpr int64_t kStageSample = 1 << 14;

float load_param(const void* ptr, ElemType t, int64_t i) {
  switch (t) {
    case ElemType::kBFloat16: return bf16_bits_to_float(static_cast<const uint16_t*>(ptr)[i]);
    case ElemType::kFloat16: return static_cast<float>(static_cast<const c10::Half*>(ptr)[i]);
    default: return static_cast<const float*>(ptr)[i];
  }
}

// add[b, c] cast to x's dtype (the spec's `add.to(x.dtype)`), as fp32; 0 without an add.
template <typename T>
float add_value(const GroupNormSwishParams& p, int64_t b, int64_t c) {
  if (p.add == nullptr) return 0.0f;
  return Elem<T>::round(load_param(p.add, p.add_type, b * p.sa_b + c * p.sa_c));
}

// s[i] = round_T(x[i] + a) - pivot: the value the statistics see, relative to the pivot.
template <typename T, bool ADD>
CPU_INLINE void stage_row(const T* __restrict x, float* __restrict s, int64_t n, float a, float pivot) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = ADD ? Elem<T>::round(Elem<T>::load(x[i]) + a) : Elem<T>::load(x[i]);
    s[i] = v - pivot;
  }
}

// y[i] = act((round_T(x[i] + a) - pivot - mean) * scale + shift), narrowed to T.
template <typename T, bool ADD, bool SWISH>
CPU_INLINE void normalize_row(const T* __restrict x, T* __restrict y, int64_t n, float a, float pivot, float mean,
                              float scale, float shift) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = ADD ? Elem<T>::round(Elem<T>::load(x[i]) + a) : Elem<T>::load(x[i]);
    const float z = ((v - pivot) - mean) * scale + shift;
    y[i] = Elem<T>::store(SWISH ? swish(z) : z);
  }
}

// normalize_row from the staged values s[i] = round_T(x[i] + a) - pivot (see planar_item): its last steps.
template <typename T, bool SWISH>
CPU_INLINE void normalize_staged_row(const float* __restrict s, T* __restrict y, int64_t n, float mean, float scale,
                                     float shift) {
  for (int64_t i = 0; i < n; ++i) {
    const float z = (s[i] - mean) * scale + shift;
    y[i] = Elem<T>::store(SWISH ? swish(z) : z);
  }
}

// normalize_row (and its staged form) for one storage type and ISA variant (as InterleavedApply below):
// AVX-512 fp32 and bf16 rows take cpu_vec512.h's Swish.
template <typename T, CpuIsa ISA>
struct RowNormalize {
  template <bool ADD, bool SWISH>
  static CPU_INLINE void run(const T* x, T* y, int64_t n, float a, float pivot, float mean, float scale, float shift) {
    normalize_row<T, ADD, SWISH>(x, y, n, a, pivot, mean, scale, shift);
  }
  template <bool SWISH>
  static CPU_INLINE void run_staged(const float* s, T* y, int64_t n, float mean, float scale, float shift) {
    normalize_staged_row<T, SWISH>(s, y, n, mean, scale, shift);
  }
};

#ifdef CPU_HAVE_AVX2_PATH
// The AVX-512 form of one normalize step for lanes m: y = act(((round_T(x + a) - pivot) - mean) * scale
// + shift), as normalize_row and interleaved_apply_item compute it per value. Stamped out twice: with
// the integer bf16 rounding (any AVX-512 CPU) and with vcvtneps2bf16 (bf16 rows where the CPU has it).
#define DDPM_GN_VEC512_NORMALIZE(NAME, ATTR, ROUND, STORE)                                                        \
  template <typename T, bool ADD, bool SWISH>                                                                  \
  ATTR void NAME(const T* x, T* y, __mmask16 m, __m512 a, __m512 pivot, __m512 mean, __m512 scale, __m512 shift) { \
    __m512 v = vec512_load(x, m);                                                                              \
    if (ADD) v = ROUND(_mm512_add_ps(v, a), x);                                                                \
    v = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_sub_ps(v, pivot), mean), scale, shift);                           \
    STORE(y, m, SWISH ? vec512_swish(v, y) : v);                                                               \
  }
DDPM_GN_VEC512_NORMALIZE(vec512_normalize, CPU_VEC512, vec512_round, vec512_store)
#ifdef CPU_HAVE_AVX512_BF16
DDPM_GN_VEC512_NORMALIZE(vec512_normalize_bf16n, CPU_VEC512_BF16, vec512_round_native, vec512_store_native)
#endif
#undef DDPM_GN_VEC512_NORMALIZE

// The AVX-512 row normalize (planar) and apply pass (interleaved) around one NORMALIZE of the two
// above, compiled with its target ATTR.
#define DDPM_GN_AVX512_LOOPS(ROW, APPLY, ATTR, NORMALIZE, STORE)                                                  \
  template <typename T>                                                                                        \
  struct ROW {                                                                                                 \
    /* Not always_inline: the planar loops that call it carry no target attribute themselves (GCC may */      \
    /* still inline it once they are inlined into their AVX-512 entry point). */                              \
    template <bool ADD, bool SWISH>                                                                            \
    static ATTR void run(const T* x, T* y, int64_t n, float a, float pivot, float mean, float scale, float shift) { \
      const __m512 va = _mm512_set1_ps(a), vp = _mm512_set1_ps(pivot), vm = _mm512_set1_ps(mean);             \
      const __m512 vs = _mm512_set1_ps(scale), vb = _mm512_set1_ps(shift);                                    \
      for (int64_t i = 0; i < n; i += 16)                                                                      \
        NORMALIZE<T, ADD, SWISH>(x + i, y + i, vec512_mask(n - i), va, vp, vm, vs, vb);                        \
    }                                                                                                          \
    template <bool SWISH>                                                                                      \
    static ATTR void run_staged(const float* s, T* y, int64_t n, float mean, float scale, float shift) {       \
      const __m512 vm = _mm512_set1_ps(mean), vs = _mm512_set1_ps(scale), vb = _mm512_set1_ps(shift);          \
      for (int64_t i = 0; i < n; i += 16) {                                                                    \
        const __mmask16 m = vec512_mask(n - i);                                                                \
        const __m512 z = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + i), vm), vs, vb);          \
        STORE(y + i, m, SWISH ? vec512_swish(z, y) : z);                                                       \
      }                                                                                                        \
    }                                                                                                          \
  };                                                                                                           \
  template <typename T>                                                                                        \
  struct APPLY {                                                                                               \
    template <bool ADD, bool SWISH>                                                                            \
    static ATTR inline __attribute__((always_inline)) void run(const GroupNormSwishParams& p, const ChannelTables& t, \
                                                               int64_t b, int64_t r0, int64_t rows) {          \
      const int64_t C = p.channels;                                                                            \
      const float* a = t.add.data() + b * C;                                                                   \
      const float* piv = t.pivot.data() + b * C;                                                               \
      const float* mean = t.mean.data() + b * C;                                                               \
      const float* scale = t.scale.data() + b * C;                                                             \
      const float* shift = t.shift.data() + b * C;                                                             \
      for (int64_t r = r0; r < r0 + rows; ++r) {                                                               \
        const T* xr = static_cast<const T*>(p.x) + b * p.sx_b + r * p.sx_hw;                                   \
        T* yr = static_cast<T*>(p.out) + b * p.sy_b + r * p.sy_hw;                                             \
        for (int64_t c = 0; c < C; c += 16) {                                                                  \
          const __mmask16 m = vec512_mask(C - c);                                                              \
          NORMALIZE<T, ADD, SWISH>(xr + c, yr + c, m, ADD ? _mm512_maskz_loadu_ps(m, a + c) : _mm512_setzero_ps(), \
                                   _mm512_maskz_loadu_ps(m, piv + c), _mm512_maskz_loadu_ps(m, mean + c),      \
                                   _mm512_maskz_loadu_ps(m, scale + c), _mm512_maskz_loadu_ps(m, shift + c));  \
        }                                                                                                      \
      }                                                                                                        \
    }                                                                                                          \
    /* From the staged values s = round_T(x + a) - pivot (interleaved_apply_staged_item). */                  \
    template <bool SWISH>                                                                                      \
    static ATTR inline __attribute__((always_inline)) void run_staged(const GroupNormSwishParams& p,            \
                                                                      const ChannelTables& t, int64_t b,       \
                                                                      int64_t r0, int64_t rows, const float* s) { \
      const int64_t C = p.channels;                                                                            \
      const float* mean = t.mean.data() + b * C;                                                               \
      const float* scale = t.scale.data() + b * C;                                                             \
      const float* shift = t.shift.data() + b * C;                                                             \
      for (int64_t r = r0; r < r0 + rows; ++r, s += C) {                                                       \
        T* yr = static_cast<T*>(p.out) + b * p.sy_b + r * p.sy_hw;                                             \
        for (int64_t c = 0; c < C; c += 16) {                                                                  \
          const __mmask16 m = vec512_mask(C - c);                                                              \
          const __m512 z = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + c), _mm512_maskz_loadu_ps(m, mean + c)), \
                                           _mm512_maskz_loadu_ps(m, scale + c), _mm512_maskz_loadu_ps(m, shift + c)); \
          STORE(yr + c, m, SWISH ? vec512_swish(z, yr) : z);                                                   \
        }                                                                                                      \
      }                                                                                                        \
    }                                                                                                          \
  };
#endif

// The pivot of group g of sample b: (x + add) at its first channel, pixel 0, in x's dtype.
template <typename T>
float group_pivot(const GroupNormSwishParams& p, int64_t b, int64_t c0) {
  const T* x = static_cast<const T*>(p.x) + b * p.sx_b + c0 * p.sx_c;
  const float v = Elem<T>::load(x[0]);
  return p.add == nullptr ? v : Elem<T>::round(v + add_value<T>(p, b, c0));
}

// --- planar (NCHW): one work item = one (sample, group) ------------------------------------------
template <typename T, CpuIsa ISA, bool ADD>
CPU_INLINE void planar_item(const GroupNormSwishParams& p, int64_t b, int64_t g, float* stage) {
  const int64_t cg = p.channels / p.groups, c0 = g * cg, hw = p.hw;
  const T* xb = static_cast<const T*>(p.x) + b * p.sx_b;
  T* yb = static_cast<T*>(p.out) + b * p.sy_b;
  const float pivot = group_pivot<T>(p, b, c0);
  // A group of up to kStageSample values stays staged for the apply pass, chunk after chunk (as the
  // interleaved schedule keeps a sample): the apply then reads round_T(x + a) - pivot instead of
  // recomputing it from x. Larger groups reuse one chunk's stage.
  const bool keep = cg * hw <= kStageSample;
  Moments m;
  float* chunk = stage;
  int64_t fill = 0;
  for (int64_t c = c0; c < c0 + cg; ++c) {  // the group's values in order, staged chunk by chunk
    const float a = add_value<T>(p, b, c);
    for (int64_t h0 = 0; h0 < hw;) {
      const int64_t take = std::min(hw - h0, kChunk - fill);
      stage_row<T, ADD>(xb + c * p.sx_c + h0, chunk + fill, take, a, pivot);
      fill += take;
      h0 += take;
      if (fill == kChunk) {
        chunk_moments(chunk, fill, m);
        chunk = keep ? chunk + fill : stage;
        fill = 0;
      }
    }
  }
  if (fill > 0) chunk_moments(chunk, fill, m);
  const float mean = static_cast<float>(m.mean);
  const float rstd = static_cast<float>(1.0 / std::sqrt(m.m2 / m.n + static_cast<double>(p.eps)));
  for (int64_t c = c0; c < c0 + cg; ++c) {
    const float scale = rstd * load_param(p.weight, p.param_type, c);
    const float shift = load_param(p.bias, p.param_type, c);
    T* yr = yb + c * p.sy_c;
    if (keep) {
      const float* sr = stage + (c - c0) * hw;
      if (p.swish) {
        RowNormalize<T, ISA>::template run_staged<true>(sr, yr, hw, mean, scale, shift);
      } else {
        RowNormalize<T, ISA>::template run_staged<false>(sr, yr, hw, mean, scale, shift);
      }
      continue;
    }
    const float a = add_value<T>(p, b, c);
    const T* xr = xb + c * p.sx_c;
    if (p.swish) {
      RowNormalize<T, ISA>::template run<ADD, true>(xr, yr, hw, a, pivot, mean, scale, shift);
    } else {
      RowNormalize<T, ISA>::template run<ADD, false>(xr, yr, hw, a, pivot, mean, scale, shift);
    }
  }
}

template <typename T, CpuIsa ISA>
CPU_INLINE void planar_range(const GroupNormSwishParams& p, int64_t begin, int64_t end) {
  Scratch<float> stage((p.channels / p.groups) * p.hw <= kStageSample ? kStageSample : kChunk);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / p.groups, g = item % p.groups;
    if (p.add != nullptr) {
      planar_item<T, ISA, true>(p, b, g, stage.data());
    } else {
      planar_item<T, ISA, false>(p, b, g, stage.data());
    }
  }
}

// --- interleaved (channels_last): one work item = `rows` pixels of one sample, every channel ------
// Per sample, per channel (filled before the passes): the add, the pivot of the channel's group,
// and after the statistics the group mean (about the pivot), scale and shift.
struct ChannelTables {
  Scratch<float> add, pivot, mean, scale, shift;  // [B * C] each
  explicit ChannelTables(int64_t n) : add(n), pivot(n), mean(n), scale(n), shift(n) {}
};

template <typename T, bool ADD>
CPU_INLINE void interleaved_stats_item(const GroupNormSwishParams& p, const ChannelTables& t, int64_t b, int64_t r0,
                                       int64_t rows, float* __restrict stage, float* __restrict out_mean,
                                       float* __restrict out_m2) {
  const int64_t C = p.channels;
  const T* xb = static_cast<const T*>(p.x) + b * p.sx_b + r0 * p.sx_hw;
  const float* a = t.add.data() + b * C;
  const float* piv = t.pivot.data() + b * C;
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict xr = xb + r * p.sx_hw;
    float* __restrict s = stage + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const float v = ADD ? Elem<T>::round(Elem<T>::load(xr[c]) + a[c]) : Elem<T>::load(xr[c]);
      s[c] = v - piv[c];
    }
  }
  for (int64_t c = 0; c < C; ++c) out_mean[c] = 0.0f;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) out_mean[c] += stage[r * C + c];
  const float inv = 1.0f / static_cast<float>(rows);
  for (int64_t c = 0; c < C; ++c) out_mean[c] *= inv;
  for (int64_t c = 0; c < C; ++c) out_m2[c] = 0.0f;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const float d = stage[r * C + c] - out_mean[c];
      out_m2[c] += d * d;
    }
}

template <typename T, bool ADD, bool SWISH>
CPU_INLINE void interleaved_apply_item(const GroupNormSwishParams& p, const ChannelTables& t, int64_t b, int64_t r0,
                                       int64_t rows) {
  const int64_t C = p.channels;
  const float* __restrict a = t.add.data() + b * C;
  const float* __restrict piv = t.pivot.data() + b * C;
  const float* __restrict mean = t.mean.data() + b * C;
  const float* __restrict scale = t.scale.data() + b * C;
  const float* __restrict shift = t.shift.data() + b * C;
  for (int64_t r = r0; r < r0 + rows; ++r) {
    const T* __restrict xr = static_cast<const T*>(p.x) + b * p.sx_b + r * p.sx_hw;
    T* __restrict yr = static_cast<T*>(p.out) + b * p.sy_b + r * p.sy_hw;
    for (int64_t c = 0; c < C; ++c) {
      const float v = ADD ? Elem<T>::round(Elem<T>::load(xr[c]) + a[c]) : Elem<T>::load(xr[c]);
      const float z = ((v - piv[c]) - mean[c]) * scale[c] + shift[c];
      yr[c] = Elem<T>::store(SWISH ? swish(z) : z);
    }
  }
}

// The apply pass from the values the statistics pass staged, s = round_T(x + a) - pivot, where a whole
// sample's fit the stage (kStageSample): the same arithmetic as interleaved_apply_item from its third
// step, so the same bits, without reading x again, converting it and redoing the add and its rounding.
template <typename T, bool SWISH>
CPU_INLINE void interleaved_apply_staged_item(const GroupNormSwishParams& p, const ChannelTables& t, int64_t b,
                                              int64_t r0, int64_t rows, const float* __restrict s) {
  const int64_t C = p.channels;
  const float* __restrict mean = t.mean.data() + b * C;
  const float* __restrict scale = t.scale.data() + b * C;
  const float* __restrict shift = t.shift.data() + b * C;
  for (int64_t r = r0; r < r0 + rows; ++r, s += C) {
    T* __restrict yr = static_cast<T*>(p.out) + b * p.sy_b + r * p.sy_hw;
    for (int64_t c = 0; c < C; ++c) {
      const float z = (s[c] - mean[c]) * scale[c] + shift[c];
      yr[c] = Elem<T>::store(SWISH ? swish(z) : z);
    }
  }
}

// The apply pass for one storage type and ISA variant: the autovectorized loop above, except where
// AVX-512 has fp32 or bf16 rows (the same math with cpu_vec512.h's Swish: within ~4 fp32 ulp of the exact
// Swish for fp32 outputs (measured 2.6e-7 relative at most), ~1.1e-4 relative for bf16 outputs).
template <typename T, CpuIsa ISA>
struct InterleavedApply {
  template <bool ADD, bool SWISH>
  static CPU_INLINE void run(const GroupNormSwishParams& p, const ChannelTables& t, int64_t b, int64_t r0,
                             int64_t rows) {
    interleaved_apply_item<T, ADD, SWISH>(p, t, b, r0, rows);
  }
  template <bool SWISH>
  static CPU_INLINE void run_staged(const GroupNormSwishParams& p, const ChannelTables& t, int64_t b, int64_t r0,
                                    int64_t rows, const float* s) {
    interleaved_apply_staged_item<T, SWISH>(p, t, b, r0, rows, s);
  }
};

#ifdef CPU_HAVE_AVX2_PATH
DDPM_GN_AVX512_LOOPS(RowNormalizeAvx512, InterleavedApplyAvx512, CPU_AVX512_TARGET, vec512_normalize, vec512_store)
template <> struct RowNormalize<float, CpuIsa::kAvx512> : RowNormalizeAvx512<float> {};
template <> struct RowNormalize<uint16_t, CpuIsa::kAvx512> : RowNormalizeAvx512<uint16_t> {};
template <> struct InterleavedApply<float, CpuIsa::kAvx512> : InterleavedApplyAvx512<float> {};
template <> struct InterleavedApply<uint16_t, CpuIsa::kAvx512> : InterleavedApplyAvx512<uint16_t> {};
#ifdef CPU_HAVE_AVX512_BF16
// The bf16 rows of the AVX512_BF16 variant (its own ISA tag: only bf16 entry points are built for it).
DDPM_GN_AVX512_LOOPS(RowNormalizeAvx512Bf16, InterleavedApplyAvx512Bf16, CPU_AVX512_BF16_TARGET, vec512_normalize_bf16n,
                     vec512_store_native)
template <> struct RowNormalize<uint16_t, CpuIsa::kAvx512Bf16> : RowNormalizeAvx512Bf16<uint16_t> {};
template <> struct InterleavedApply<uint16_t, CpuIsa::kAvx512Bf16> : InterleavedApplyAvx512Bf16<uint16_t> {};
#endif
#undef DDPM_GN_AVX512_LOOPS
#endif

// The per-item loops, compiled for each storage type and each ISA variant (see cpu_math.h).
#define DDPM_GN_ENTRY_POINTS(T, SUFFIX, TARGET, ISA)                                                             \
  TARGET void planar_##SUFFIX(const GroupNormSwishParams& p, int64_t begin, int64_t end) {                  \
    planar_range<T, ISA>(p, begin, end);                                                                       \
  }                                                                                                          \
  TARGET void istats_##SUFFIX(const GroupNormSwishParams& p, const ChannelTables& t, int64_t b, int64_t r0,  \
                              int64_t rows, float* stage, float* mean, float* m2) {                          \
    if (p.add != nullptr) {                                                                                  \
      interleaved_stats_item<T, true>(p, t, b, r0, rows, stage, mean, m2);                                  \
    } else {                                                                                                 \
      interleaved_stats_item<T, false>(p, t, b, r0, rows, stage, mean, m2);                                 \
    }                                                                                                        \
  }                                                                                                          \
  TARGET void iapply_##SUFFIX(const GroupNormSwishParams& p, const ChannelTables& t, int64_t b, int64_t r0,  \
                              int64_t rows) {                                                                \
    const bool add = p.add != nullptr;                                                                       \
    using A = InterleavedApply<T, ISA>;                                                                      \
    if (add && p.swish) A::template run<true, true>(p, t, b, r0, rows);                                      \
    else if (add) A::template run<true, false>(p, t, b, r0, rows);                                           \
    else if (p.swish) A::template run<false, true>(p, t, b, r0, rows);                                       \
    else A::template run<false, false>(p, t, b, r0, rows);                                                   \
  }                                                                                                          \
  TARGET void iapply_staged_##SUFFIX(const GroupNormSwishParams& p, const ChannelTables& t, int64_t b, int64_t r0, \
                                     int64_t rows, const float* stage) {                                     \
    using A = InterleavedApply<T, ISA>;                                                                      \
    if (p.swish) A::template run_staged<true>(p, t, b, r0, rows, stage);                                     \
    else A::template run_staged<false>(p, t, b, r0, rows, stage);                                            \
  }                                                                                                          \
  TARGET void imerge_##SUFFIX(const float* bmean, const float* bm2, int64_t b, int64_t nblk, int64_t rows,      \
                              int64_t hw, int64_t C, int64_t G, double* acc, Moments* m) {                   \
    merge_sample_parts(bmean, bm2, b, nblk, rows, hw, C, G, acc, m);                                         \
  }

CPU_FOR_EACH_VARIANT(DDPM_GN_ENTRY_POINTS)
#ifdef CPU_HAVE_AVX512_BF16
DDPM_GN_ENTRY_POINTS(uint16_t, bf16_avx512bf16, CPU_AVX512_BF16_TARGET, CpuIsa::kAvx512Bf16)
#endif
#undef DDPM_GN_ENTRY_POINTS

struct Entry {
  void (*planar)(const GroupNormSwishParams&, int64_t, int64_t);
  void (*istats)(const GroupNormSwishParams&, const ChannelTables&, int64_t, int64_t, int64_t, float*, float*, float*);
  void (*iapply)(const GroupNormSwishParams&, const ChannelTables&, int64_t, int64_t, int64_t);
  void (*imerge)(const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double*, Moments*);
  void (*iapply_staged)(const GroupNormSwishParams&, const ChannelTables&, int64_t, int64_t, int64_t, const float*);
};

Entry entry_for(ElemType t) {
  switch (t) {
    case ElemType::kBFloat16:
#ifdef CPU_HAVE_AVX512_BF16
      if (cpu_avx512_bf16())
        return {&planar_bf16_avx512bf16, &istats_bf16_avx512bf16, &iapply_bf16_avx512bf16, &imerge_bf16_avx512bf16,
                &iapply_staged_bf16_avx512bf16};
#endif
      return {CPU_PICK(planar, bf16), CPU_PICK(istats, bf16), CPU_PICK(iapply, bf16), CPU_PICK(imerge, bf16),
              CPU_PICK(iapply_staged, bf16)};
    case ElemType::kFloat16:
      return {CPU_PICK(planar, f16), CPU_PICK(istats, f16), CPU_PICK(iapply, f16), CPU_PICK(imerge, f16),
              CPU_PICK(iapply_staged, f16)};
    default:
      return {CPU_PICK(planar, f32), CPU_PICK(istats, f32), CPU_PICK(iapply, f32), CPU_PICK(imerge, f32),
              CPU_PICK(iapply_staged, f32)};
  }
}

int64_t grain_for(int64_t elems_per_item) { return std::max<int64_t>(1, kParallelMin / std::max<int64_t>(1, elems_per_item)); }

template <typename T>
void fill_add_pivot(const GroupNormSwishParams& p, ChannelTables& t, int64_t b) {
  const int64_t C = p.channels, cg = C / p.groups;
  for (int64_t c = 0; c < C; ++c) {
    t.add[b * C + c] = add_value<T>(p, b, c);
    t.pivot[b * C + c] = group_pivot<T>(p, b, c - c % cg);
  }
}

// The interleaved walk's shape: `rows` pixel rows per block (~kChunk values), nblk blocks per sample.
struct Blocks {
  int64_t rows, nblk;
  explicit Blocks(const GroupNormSwishParams& p)
      : rows(std::max<int64_t>(1, kChunk / p.channels)), nblk((p.hw + rows - 1) / rows) {}
};

// Per (sample, block, channel): the block's mean and M2 of the channel about its pivot, and the
// tables the apply pass reads. Filled by the phases below, which every schedule runs in the same
// per-item order, so each value is the same whichever schedule and thread count computed it.
struct Interleaved {
  const GroupNormSwishParams& p;
  const Entry& e;
  Blocks k;
  ChannelTables t;
  Scratch<float> bmean, bm2;
  Interleaved(const GroupNormSwishParams& p_, const Entry& e_)
      : p(p_), e(e_), k(p_), t(p_.batch * p_.channels), bmean(p_.batch * k.nblk * p_.channels),
        bm2(p_.batch * k.nblk * p_.channels) {}
  void fill(int64_t b) {
    switch (p.x_type) {
      case ElemType::kBFloat16: fill_add_pivot<uint16_t>(p, t, b); break;
      case ElemType::kFloat16: fill_add_pivot<c10::Half>(p, t, b); break;
      default: fill_add_pivot<float>(p, t, b); break;
    }
  }
  // Block item = b * nblk + blk: its per-channel moments.
  void stats(int64_t item, float* stage) {
    const int64_t b = item / k.nblk, r0 = (item % k.nblk) * k.rows, C = p.channels;
    e.istats(p, t, b, r0, std::min(k.rows, p.hw - r0), stage, &bmean[item * C], &bm2[item * C]);
  }
  // Sample b's group moments -> its per-channel mean, scale and shift.
  void merge(int64_t b) {
    const int64_t G = p.groups, C = p.channels, cg = C / G;
    Scratch<double> acc(2 * C);
    Scratch<Moments> m(G);
    e.imerge(bmean.data(), bm2.data(), b, k.nblk, k.rows, p.hw, C, G, acc.data(), m.data());
    for (int64_t g = 0; g < G; ++g) {
      const float rstd = static_cast<float>(1.0 / std::sqrt(m[g].m2 / m[g].n + static_cast<double>(p.eps)));
      for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
        t.mean[b * C + c] = static_cast<float>(m[g].mean);
        t.scale[b * C + c] = rstd * load_param(p.weight, p.param_type, c);
        t.shift[b * C + c] = load_param(p.bias, p.param_type, c);
      }
    }
  }
  void apply(int64_t item) {
    const int64_t b = item / k.nblk, r0 = (item % k.nblk) * k.rows;
    e.iapply(p, t, b, r0, std::min(k.rows, p.hw - r0));
  }
  // The same from the values `stats` staged for this block.
  void apply_staged(int64_t item, const float* stage) {
    const int64_t b = item / k.nblk, r0 = (item % k.nblk) * k.rows;
    e.iapply_staged(p, t, b, r0, std::min(k.rows, p.hw - r0), stage);
  }
};

// channels_last. With at least two samples per thread, one parallel region over samples runs every
// phase of a sample back to back (its data is still in this core's cache for the second read, and
// there is one fork/join instead of three). Fewer samples than that split each phase across threads.
void run_interleaved(const GroupNormSwishParams& p, const Entry& e) {
  Interleaved w(p, e);
  const int64_t B = p.batch, nblk = w.k.nblk, per_block = w.k.rows * p.channels;
  if (B >= 2 * at::get_num_threads()) {
    // A sample small enough stays staged from the statistics to the apply pass (the staged values are
    // what the apply would recompute from x): measured 0.63 -> 0.50 ns a value for 8x32x16x16 bf16 with
    // the time add, 1 thread.
    const bool keep = nblk * per_block <= kStageSample;
    at::parallel_for(0, B, grain_for(nblk * per_block), [&](int64_t begin, int64_t end) {
      Scratch<float> stage(keep ? nblk * per_block : per_block);
      for (int64_t b = begin; b < end; ++b) {
        w.fill(b);
        for (int64_t item = b * nblk, i = 0; item < (b + 1) * nblk; ++item, ++i)
          w.stats(item, stage.data() + (keep ? i * per_block : 0));
        w.merge(b);
        for (int64_t item = b * nblk, i = 0; item < (b + 1) * nblk; ++item, ++i) {
          if (keep) {
            w.apply_staged(item, stage.data() + i * per_block);
          } else {
            w.apply(item);
          }
        }
      }
    });
    return;
  }
  for (int64_t b = 0; b < B; ++b) w.fill(b);
  at::parallel_for(0, B * nblk, grain_for(per_block), [&](int64_t begin, int64_t end) {
    Scratch<float> stage(per_block);
    for (int64_t item = begin; item < end; ++item) w.stats(item, stage.data());
  });
  for (int64_t b = 0; b < B; ++b) w.merge(b);  // fewer samples than 2 per thread: not worth a fork
  at::parallel_for(0, B * nblk, grain_for(per_block), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) w.apply(item);
  });
}

}  // namespace

void groupnorm_swish_cpu(const GroupNormSwishParams& p) {
  if (p.batch == 0 || p.channels == 0 || p.hw == 0) return;
  const Entry e = entry_for(p.x_type);
  if (groupnorm_swish_planar(p)) {
    const int64_t per_item = (p.channels / p.groups) * p.hw;
    at::parallel_for(0, p.batch * p.groups, grain_for(per_item),
                     [&](int64_t begin, int64_t end) { e.planar(p, begin, end); });
  } else {
    run_interleaved(p, e);
  }
}

}  // namespace ddpm_fast
