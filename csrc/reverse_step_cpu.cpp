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
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

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

constexpr int64_t kChunkBlocks = kChunk / 4;

// The four Philox words of each block of a chunk, one array per word so loops over blocks are
// straight-line code the vectorizer can use.
struct ChunkWords {
  uint32_t w0[kChunkBlocks], w1[kChunkBlocks], w2[kChunkBlocks], w3[kChunkBlocks];
};

// Philox words of blocks first_block .. first_block + nblocks - 1 (portable).
inline void philox_words(uint64_t seed, uint64_t step, uint64_t first_block, int64_t nblocks, ChunkWords& w) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t s = static_cast<uint32_t>(step);
  for (int64_t j = 0; j < nblocks; ++j) {
    const uint64_t block = first_block + static_cast<uint64_t>(j);
    uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32), c2 = s, c3 = 0u;
    philox4x32_10(c0, c1, c2, c3, k0, k1);
    w.w0[j] = c0;
    w.w1[j] = c1;
    w.w2[j] = c2;
    w.w3[j] = c3;
  }
}

// Box-Muller on every block's two word pairs, then interleave into element order
// (z[4j .. 4j+3] = normals of block j). always_inline: it must compile inside each ISA variant.
__attribute__((always_inline)) inline void normals_from_words(const ChunkWords& w, int64_t nblocks, float* z) {
  float a[kChunkBlocks], b[kChunkBlocks], c[kChunkBlocks], d[kChunkBlocks];
  for (int64_t j = 0; j < nblocks; ++j) {
    box_muller(w.w0[j], w.w1[j], &a[j], &b[j]);
    box_muller(w.w2[j], w.w3[j], &c[j], &d[j]);
  }
  for (int64_t j = 0; j < nblocks; ++j) {
    z[4 * j] = a[j];
    z[4 * j + 1] = b[j];
    z[4 * j + 2] = c[j];
    z[4 * j + 3] = d[j];
  }
}

// Noise for `nblocks` consecutive Philox blocks starting at `first_block` into z (4 per block).
void fill_noise_generic(uint64_t seed, uint64_t step, uint64_t first_block, int64_t nblocks, float* z) {
  ChunkWords w;
  philox_words(seed, step, first_block, nblocks, w);
  normals_from_words(w, nblocks, z);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define DDPM_HAVE_AVX2_PATH 1
// x86-64 builds target the SSE2 baseline. On AVX2 machines this variant runs instead (chosen once at
// run time): Philox on 8 blocks per instruction with explicit intrinsics -- the 32x32 -> 64-bit
// high products that GCC's vectorizer emits for the portable loop cost ~3x more -- and the
// Box-Muller loop compiled for 8-wide vectors. AVX2 has no FMA, so both variants round identically.
__attribute__((target("avx2"))) void fill_noise_avx2(uint64_t seed, uint64_t step, uint64_t first_block,
                                                     int64_t nblocks, float* z) {
  ChunkWords w;
  const uint64_t lo = first_block & 0xFFFFFFFFull;
  if (lo + static_cast<uint64_t>(nblocks) + 8 > (1ull << 32)) {
    philox_words(seed, step, first_block, nblocks, w);  // block index carries into the high word
  } else {
    const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
    const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i hi_word = _mm256_set1_epi32(static_cast<int>(first_block >> 32));
    const __m256i step_word = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(step)));
    // Groups of 8 blocks; a partial last group computes a few unused blocks inside the arrays.
    for (int64_t j = 0; j < nblocks; j += 8) {
      __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(lo + static_cast<uint64_t>(j))), lane);
      __m256i c1 = hi_word, c2 = step_word, c3 = _mm256_setzero_si256();
      uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
      for (int round = 0; round < 10; ++round) {
        // mulhilo: low halves by vpmulld; high halves from the 64-bit products of the even and
        // odd lanes (vpmuludq), blended back into 32-bit lanes.
        const __m256i lo0 = _mm256_mullo_epi32(c0, m0);
        const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(_mm256_mul_epu32(c0, m0), 32),
                                               _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0), 0xAA);
        const __m256i lo1 = _mm256_mullo_epi32(c2, m1);
        const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(_mm256_mul_epu32(c2, m1), 32),
                                               _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1), 0xAA);
        c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
        c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
        c1 = lo1;
        c3 = lo0;
        k0 += kPhiloxW0;
        k1 += kPhiloxW1;
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w.w0 + j), c0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w.w1 + j), c1);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w.w2 + j), c2);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w.w3 + j), c3);
    }
  }
  normals_from_words(w, nblocks, z);
}
#endif

using FillNoiseFn = void (*)(uint64_t, uint64_t, uint64_t, int64_t, float*);

// DDPM_FAST_CPU_ISA=generic forces the portable variant (the tests compare the two bit for bit).
FillNoiseFn pick_fill_noise() {
  const char* isa = std::getenv("DDPM_FAST_CPU_ISA");
  if (isa != nullptr && std::strcmp(isa, "generic") == 0) return &fill_noise_generic;
#ifdef DDPM_HAVE_AVX2_PATH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) return &fill_noise_avx2;
#endif
  return &fill_noise_generic;
}

// Noise for a channels_last chunk: memory neighbours are channels of one pixel, which sit in
// different Philox blocks, so each element maps back to its logical index and draws its own.
inline void fill_noise_channels_last(const ReverseStepParams& p, uint64_t step, uint64_t base, int64_t start,
                                     int64_t len, float* z) {
  for (int64_t i = 0; i < len; ++i) {
    const int64_t logical = channels_last_logical(start + i, p.channels, p.spatial);
    z[i] = philox_normal1(p.seed, step, base + static_cast<uint64_t>(logical));
  }
}

template <typename X, typename E>
void run(const ReverseStepParams& p) {
  const int64_t n = p.numel;
  if (n == 0) return;
  const int64_t step = p.step_ptr != nullptr ? *p.step_ptr : p.step_value;
  const StepRow row = make_row(p.coeffs + step * kNumCoeffs);
  // Global logical index of this batch's element 0 (the binding checked the product fits).
  const uint64_t base = static_cast<uint64_t>(p.image_offset) * static_cast<uint64_t>(p.per_image);
  const X* x = static_cast<const X*>(p.x);
  const E* eps = static_cast<const E*>(p.eps);
  X* out = static_cast<X*>(p.out);
  const bool clip = p.clip != 0;
  const float lo = p.clip_lo, hi = p.clip_hi;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  static const FillNoiseFn fill_noise = pick_fill_noise();

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
        fill_noise_channels_last(p, static_cast<uint64_t>(step), base, start, len, zs);
      } else if ((base & 3u) != 0) {
        // The batch starts inside a Philox block (per_image not a multiple of 4): element by element.
        for (int64_t i = 0; i < len; ++i) {
          zs[i] = philox_normal1(p.seed, static_cast<uint64_t>(step), base + static_cast<uint64_t>(start + i));
        }
      } else {
        // Row-major: memory index = logical index and chunks start on a block boundary. z has room
        // for kChunk floats, so a partial last block may write up to 3 unused values.
        fill_noise(p.seed, static_cast<uint64_t>(step), (base + static_cast<uint64_t>(start)) >> 2, (len + 3) / 4, zs);
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
