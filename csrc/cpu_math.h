// Per-element float math shared by the fused CPU kernels (groupnorm_swish_cpu.cpp,
// residual_add_cpu.cpp): dtype widening/rounding and a vectorizable exp/Swish. No torch types.
//
// Everything here is branch-free straight-line float/integer code, so that GCC's loop vectorizer
// turns a loop calling these into SIMD code for each ISA clone of the kernel (see CPU_KERNEL_CLONES).
// libm's expf is a call the vectorizer cannot widen (without -ffast-math), which would leave the
// Swish -- the largest memory-bound cost in a CPU profile of the UNet -- scalar.
#pragma once

#include <stdint.h>
#include <string.h>

// One build serves every x86-64 CPU: the hot loops are compiled for AVX-512, AVX2+FMA and the SSE2
// baseline, and the loader's ifunc resolver picks the best the CPU has, once. FMA contraction makes
// the clones round differently from each other (never between thread counts on one machine).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CPU_KERNEL_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define CPU_KERNEL_CLONES
#endif
#define CPU_INLINE inline __attribute__((always_inline))

namespace ddpm_fast {

// Element types of the tensors these kernels read and write.
enum class ElemType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

CPU_INLINE float cpu_bits_to_float(uint32_t b) {
  float f;
  memcpy(&f, &b, sizeof f);
  return f;
}

CPU_INLINE uint32_t cpu_float_to_bits(float f) {
  uint32_t b;
  memcpy(&b, &f, sizeof b);
  return b;
}

// bfloat16 <-> float on the raw 16-bit pattern. Rounding is to nearest even, as torch's conversion
// (NaN stays NaN: a quiet NaN's payload bits sit above the rounding increment).
CPU_INLINE float bf16_bits_to_float(uint16_t h) { return cpu_bits_to_float(static_cast<uint32_t>(h) << 16); }

CPU_INLINE uint16_t float_to_bf16_bits(float f) {
  const uint32_t b = cpu_float_to_bits(f);
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

// f rounded to bfloat16 and back: the value a bf16 tensor op would store.
CPU_INLINE float round_bf16(float f) { return bf16_bits_to_float(float_to_bf16_bits(f)); }

// exp(x) for float x, within ~1 ulp (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, degree-6
// polynomial). The clamp keeps 2^n a normal float: exp underflows to ~1e-38 instead of 0 and
// saturates at ~2e38, which is all the Swish below needs (1 + e^-y is then 1 or y / e^-y ~ 0).
CPU_INLINE float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // Round x / ln2 to the nearest integer with the 1.5 * 2^23 trick (no libm call, vectorizes).
  const float magic = 12582912.0f;
  const float n = (x * 1.44269504088896341f + magic) - magic;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = static_cast<int32_t>(n) + 127;
  return p * cpu_bits_to_float(static_cast<uint32_t>(e) << 23);
}

// Swish(y) = y * sigmoid(y) = y / (1 + e^-y); ~2 ulp from the exact value.
CPU_INLINE float swish(float y) { return y / (1.0f + exp_approx(-y)); }

}  // namespace ddpm_fast
