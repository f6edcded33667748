// Per-element float math shared by the fused CPU kernels (groupnorm_swish_cpu.cpp,
// residual_add_cpu.cpp): dtype widening/rounding and a vectorizable exp/Swish. No torch types.
//
// Everything here is branch-free straight-line float/integer code, so that GCC's loop vectorizer
// turns a loop calling these into SIMD code for each ISA variant of the kernel (see CPU_AVX2_TARGET).
// libm's expf is a call the vectorizer cannot widen (without -ffast-math), which would leave the
// Swish -- the largest memory-bound cost in a CPU profile of the UNet -- scalar.
#pragma once

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

// One build serves every x86-64 CPU: the hot loops are compiled twice, for the SSE2 baseline and
// with AVX2 + FMA (CPU_AVX2_TARGET), and the kernels pick one at run time (cpu_use_avx2). Not
// target_clones: GCC splits its "avx2,fma" into two separate clones and may run the FMA-only one.
#if defined(__GNUC__) && defined(__x86_64__)
#define CPU_HAVE_AVX2_PATH 1
#define CPU_AVX2_TARGET __attribute__((target("avx2,fma")))
#else
#define CPU_AVX2_TARGET
#endif
#define CPU_INLINE inline __attribute__((always_inline))

// Instantiates ENTRY(element type, name suffix, target attribute) once per element type (fp32, bf16 as
// its bits, fp16) and ISA variant: the one list every kernel's entry points come from.
#ifdef CPU_HAVE_AVX2_PATH
#define CPU_FOR_EACH_VARIANT(ENTRY)                                                              \
  ENTRY(float, f32, ) ENTRY(uint16_t, bf16, ) ENTRY(c10::Half, f16, )                               \
  ENTRY(float, f32_avx2, CPU_AVX2_TARGET) ENTRY(uint16_t, bf16_avx2, CPU_AVX2_TARGET)               \
  ENTRY(c10::Half, f16_avx2, CPU_AVX2_TARGET)
#else
#define CPU_FOR_EACH_VARIANT(ENTRY) ENTRY(float, f32, ) ENTRY(uint16_t, bf16, ) ENTRY(c10::Half, f16, )
#endif

namespace ddpm_fast {

// True when the AVX2 + FMA variants may run: the CPU has both, and DDPM_FAST_CPU_ISA is not
// "generic" (which forces the baseline variants, as for reverse_step, so tests can compare them).
inline bool cpu_use_avx2() {
#ifdef CPU_HAVE_AVX2_PATH
  static const bool use = [] {
    const char* isa = getenv("DDPM_FAST_CPU_ISA");
    if (isa != nullptr && strcmp(isa, "generic") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return use;
#else
  return false;
#endif
}

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

// exp(a) for float a <= 0, within ~1 ulp (Cephes' expf: a = n ln2 + r, |r| <= ln2 / 2, degree-6
// polynomial). The clamp keeps 2^n a normal float: exp(a) below e^-87 comes out as ~1.6e-38, which
// the Swish below only ever adds to 1 or multiplies by a value that makes the product ~0 anyway.
CPU_INLINE float exp_nonpositive(float a) {
  a = a < -87.0f ? -87.0f : a;
  // Round a / ln2 to the nearest integer with the 1.5 * 2^23 trick (no libm call, vectorizes).
  const float magic = 12582912.0f;
  const float n = (a * 1.44269504088896341f + magic) - magic;
  const float r = (a - n * 0.693359375f) - n * -2.12194440e-4f;
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

// Swish(y) = y * sigmoid(y), with sigmoid from e = exp(-|y|) in (0, 1]: 1 / (1 + e) for y >= 0,
// e / (1 + e) below. One division and one clamp per value (an exp of -y needed clamps on both
// sides, which GCC turned into extra divisions: 2.4x slower); measured within 1.8e-7 relative of
// the float64 value over 1024 N(0, 9) inputs.
CPU_INLINE float swish(float y) {
  const float e = exp_nonpositive(y < 0.0f ? y : -y);
  const float r = 1.0f / (1.0f + e);
  return y * (y >= 0.0f ? r : e * r);
}

}  // namespace ddpm_fast
