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

// One build serves every x86-64 CPU: the hot loops are compiled three times, for the SSE2 baseline,
// with AVX2 + FMA (CPU_AVX2_TARGET) and with AVX-512 (CPU_AVX512_TARGET: F/BW/VL/DQ, 512-bit vectors
// preferred, which GCC's generic tuning would otherwise cap at 256), and the kernels pick one at run
// time (cpu_isa). Not target_clones: GCC splits its "avx2,fma" into two separate clones and may run
// the FMA-only one.
#if defined(__GNUC__) && defined(__x86_64__)
#define CPU_HAVE_AVX2_PATH 1
#define CPU_AVX2_TARGET __attribute__((target("avx2,fma")))
#define CPU_AVX512_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512")))
// AVX-512 plus AVX512_BF16 (vcvtneps2bf16: fp32 -> bf16 with round to nearest even in one instruction), for
// the bf16 loops that have a variant with it (cpu_vec512.h); picked when cpu_avx512_bf16() says so. Only
// compilers that know the extension (GCC 10, clang 9 and later) build that variant.
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10)
#define CPU_HAVE_AVX512_BF16 1
#define CPU_AVX512_BF16_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,prefer-vector-width=512")))
#endif
#else
#define CPU_AVX2_TARGET
#define CPU_AVX512_TARGET
#endif
#define CPU_INLINE inline __attribute__((always_inline))

// Instantiates ENTRY(element type, name suffix, target attribute, CpuIsa) once per element type (fp32,
// bf16 as its bits, fp16) and ISA variant: the one list every kernel's entry points come from.
#ifdef CPU_HAVE_AVX2_PATH
#define CPU_FOR_EACH_VARIANT(ENTRY)                                                                          \
  ENTRY(float, f32, , CpuIsa::kGeneric) ENTRY(uint16_t, bf16, , CpuIsa::kGeneric)                            \
  ENTRY(c10::Half, f16, , CpuIsa::kGeneric) ENTRY(float, f32_avx2, CPU_AVX2_TARGET, CpuIsa::kAvx2)          \
  ENTRY(uint16_t, bf16_avx2, CPU_AVX2_TARGET, CpuIsa::kAvx2) ENTRY(c10::Half, f16_avx2, CPU_AVX2_TARGET, CpuIsa::kAvx2) \
  ENTRY(float, f32_avx512, CPU_AVX512_TARGET, CpuIsa::kAvx512)                                               \
  ENTRY(uint16_t, bf16_avx512, CPU_AVX512_TARGET, CpuIsa::kAvx512)                                           \
  ENTRY(c10::Half, f16_avx512, CPU_AVX512_TARGET, CpuIsa::kAvx512)
#else
#define CPU_FOR_EACH_VARIANT(ENTRY) \
  ENTRY(float, f32, , CpuIsa::kGeneric) ENTRY(uint16_t, bf16, , CpuIsa::kGeneric) ENTRY(c10::Half, f16, , CpuIsa::kGeneric)
#endif

namespace ddpm_fast {

// The kernels' loop variants, widest last.
// kAvx512Bf16 tags the AVX-512 loops that also use AVX512_BF16 (built for bf16 only, see cpu_avx512_bf16);
// cpu_isa() itself never returns it.
enum class CpuIsa : int32_t { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

// The widest variant this CPU runs, detected (__builtin_cpu_supports), never assumed. DDPM_FAST_CPU_ISA
// caps it: "generic" forces the baseline (as for reverse_step), "avx2" the AVX2 + FMA variant, "avx512"
// AVX-512 without AVX512_BF16 (cpu_avx512_bf16), so tests can compare the variants on one machine.
inline CpuIsa cpu_isa() {
#ifdef CPU_HAVE_AVX2_PATH
  static const CpuIsa isa = [] {
    const char* cap = getenv("DDPM_FAST_CPU_ISA");
    if (cap != nullptr && strcmp(cap, "generic") == 0) return CpuIsa::kGeneric;
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return CpuIsa::kGeneric;
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if (!avx512 || (cap != nullptr && strcmp(cap, "avx2") == 0)) return CpuIsa::kAvx2;
    return CpuIsa::kAvx512;
  }();
  return isa;
#else
  return CpuIsa::kGeneric;
#endif
}

// Whether the AVX-512 variant may also use AVX512_BF16 instructions: detected, never assumed;
// DDPM_FAST_CPU_ISA=avx512 (or any lower cap) turns them off, so tests can compare the two on one machine.
inline bool cpu_avx512_bf16() {
#ifdef CPU_HAVE_AVX512_BF16
  static const bool yes = [] {
    const char* cap = getenv("DDPM_FAST_CPU_ISA");
    if (cpu_isa() != CpuIsa::kAvx512 || (cap != nullptr && strcmp(cap, "avx512") == 0)) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return yes;
#else
  return false;
#endif
}

// Picks the entry point for cpu_isa() among a kernel's variants (NAME##_<suffix>, see CPU_FOR_EACH_VARIANT).
#ifdef CPU_HAVE_AVX2_PATH
#define CPU_PICK(NAME, SUFFIX)                                                         \
  (cpu_isa() == CpuIsa::kAvx512 ? &NAME##_##SUFFIX##_avx512                            \
   : cpu_isa() == CpuIsa::kAvx2 ? &NAME##_##SUFFIX##_avx2 : &NAME##_##SUFFIX)
#else
#define CPU_PICK(NAME, SUFFIX) (&NAME##_##SUFFIX)
#endif

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
