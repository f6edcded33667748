// CPU kernel of the fused reverse step over the shared math in reverse_step.h.
//
// Work is split by at::parallel_for into chunks of kChunk elements in memory order. Each chunk
// (1) widens x and eps into float buffers, (2) fills a float buffer of noise (copied, or drawn
// with one Philox call per 4 elements), (3) runs the update in a branch-free loop over those local
// buffers and narrows into `out`. Staging in locals is what lets the compiler vectorize steps 1
// and 3 even when out == x (in place): the final loop reads only stack arrays it can prove
// distinct from `out`, so no runtime alias check falls back to scalar code.
#include "reverse_step.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>

namespace ddpm_fast {
namespace {

constexpr int64_t kChunk = 512;                // elements per chunk; a multiple of 4 (Philox blocks)
constexpr int64_t kGrainElements = 1 << 15;    // below this, one thread: fork/join costs more

template <typename T>
inline float widen(T v) {
  return static_cast<float>(v);
}

template <typename T>
inline T narrow(float v) {
  return static_cast<T>(v);  // c10::Half / c10::BFloat16 round to nearest even, as Tensor.to does
}

// x86-64 builds target the SSE2 baseline; an AVX2 clone of the noise loops (picked at load time by
// the CPU's features) doubles their vector width. AVX2 without FMA: the clones round identically.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define DDPM_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DDPM_CPU_CLONES
#endif

constexpr int64_t kChunkBlocks = kChunk / 4;

// Noise for `nblocks` consecutive Philox blocks starting at `first_block` (4 normals each, in
// element order) into z. Integer words first, then Box-Muller on separate arrays, then interleave:
// each loop is straight-line over j, which is what the vectorizer needs.
DDPM_CPU_CLONES __attribute__((noinline)) void fill_noise_blocks(uint64_t seed, uint64_t step, uint64_t first_block,
                                                                  int64_t nblocks, float* z) {
  uint32_t w0[kChunkBlocks], w1[kChunkBlocks], w2[kChunkBlocks], w3[kChunkBlocks];
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t s = static_cast<uint32_t>(step);
  for (int64_t j = 0; j < nblocks; ++j) {
    const uint64_t block = first_block + static_cast<uint64_t>(j);
    uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32), c2 = s, c3 = 0u;
    philox4x32_10(c0, c1, c2, c3, k0, k1);
    w0[j] = c0;
    w1[j] = c1;
    w2[j] = c2;
    w3[j] = c3;
  }
  float a[kChunkBlocks], b[kChunkBlocks], c[kChunkBlocks], d[kChunkBlocks];
  for (int64_t j = 0; j < nblocks; ++j) {
    box_muller(w0[j], w1[j], &a[j], &b[j]);
    box_muller(w2[j], w3[j], &c[j], &d[j]);
  }
  for (int64_t j = 0; j < nblocks; ++j) {
    z[4 * j] = a[j];
    z[4 * j + 1] = b[j];
    z[4 * j + 2] = c[j];
    z[4 * j + 3] = d[j];
  }
}

// Noise for a channels_last chunk: memory neighbours are channels of one pixel, which sit in
// different Philox blocks, so each element maps back to its logical index and draws its own.
inline void fill_noise_channels_last(const ReverseStepParams& p, uint64_t step, int64_t start, int64_t len,
                                     float* z) {
  for (int64_t i = 0; i < len; ++i) {
    const int64_t logical = channels_last_logical(start + i, p.channels, p.spatial);
    z[i] = philox_normal1(p.seed, step, static_cast<uint64_t>(logical));
  }
}

template <typename X, typename E>
void run(const ReverseStepParams& p) {
  const int64_t n = p.numel;
  if (n == 0) return;
  const int64_t step = p.step_ptr != nullptr ? *p.step_ptr : p.step_value;
  const StepRow row = make_row(p.coeffs + step * kNumCoeffs);
  const X* x = static_cast<const X*>(p.x);
  const E* eps = static_cast<const E*>(p.eps);
  X* out = static_cast<X*>(p.out);
  const bool clip = p.clip != 0;
  const float lo = p.clip_lo, hi = p.clip_hi;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;

  at::parallel_for(0, nchunks, std::max<int64_t>(1, kGrainElements / kChunk), [&](int64_t cb, int64_t ce) {
    // Locals, not the captured references: the compiler must see that `out` cannot alias them.
    const StepRow r = row;
    const float clo = lo, chi = hi;
    X* const dst = out;
    alignas(64) float xs[kChunk];
    alignas(64) float es[kChunk];
    alignas(64) float zs[kChunk];
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      const int64_t start = chunk * kChunk;
      const int64_t len = std::min(kChunk, n - start);
      const X* xc = x + start;
      const E* ec = eps + start;
      for (int64_t i = 0; i < len; ++i) xs[i] = widen(xc[i]);
      for (int64_t i = 0; i < len; ++i) es[i] = widen(ec[i]);
      if (p.noise != nullptr) {
        std::memcpy(zs, p.noise + start, static_cast<size_t>(len) * sizeof(float));
      } else if (p.channels_last) {
        fill_noise_channels_last(p, static_cast<uint64_t>(step), start, len, zs);
      } else {
        // Row-major: memory index = logical index and chunks start on a block boundary. z has room
        // for kChunk floats, so a partial last block may write up to 3 unused values.
        fill_noise_blocks(p.seed, static_cast<uint64_t>(step), static_cast<uint64_t>(start) >> 2, (len + 3) / 4, zs);
      }
      X* oc = dst + start;
      if (clip) {
        for (int64_t i = 0; i < len; ++i) oc[i] = narrow<X>(reverse_step_element(r, xs[i], es[i], zs[i], true, clo, chi));
      } else {
        for (int64_t i = 0; i < len; ++i) oc[i] = narrow<X>(reverse_step_element(r, xs[i], es[i], zs[i], false, clo, chi));
      }
    }
  });
}

}  // namespace

void reverse_step_cpu(const ReverseStepParams& p) {
  using c10::BFloat16;
  using c10::Half;
  // The binding admits x float32 with any eps dtype, or x and eps of one low-precision dtype.
  if (p.x_dtype == DType::kFloat32) {
    switch (p.eps_dtype) {
      case DType::kFloat32: return run<float, float>(p);
      case DType::kFloat16: return run<float, Half>(p);
      case DType::kBFloat16: return run<float, BFloat16>(p);
    }
  } else if (p.x_dtype == DType::kFloat16 && p.eps_dtype == DType::kFloat16) {
    return run<Half, Half>(p);
  } else if (p.x_dtype == DType::kBFloat16 && p.eps_dtype == DType::kBFloat16) {
    return run<BFloat16, BFloat16>(p);
  }
}

}  // namespace ddpm_fast
