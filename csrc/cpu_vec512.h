// AVX-512 forms of cpu_math.h's per-element math, 16 fp32 lanes at a time, for the loops where GCC's
// vectorizer leaves speed behind: it widens cpu_math.h's Swish well, but keeps its exact vdivps (the
// largest single cost of groupnorm_swish's apply loop in a perf annotation), and cannot use scalef
// for the exponent. Here 1 / (1 + e) is rcp14 + one Newton step (within ~2 ulp of the division),
// 2^n comes from vscalefps, and the fp32 Swish needs no branch on the sign. Compiled only into functions with CPU_AVX512_TARGET (their callers pick them
// at run time through cpu_isa()), or CPU_AVX512_BF16_TARGET for the native bf16 conversions
// (cpu_avx512_bf16()), so one build still runs on any x86-64 CPU.
#pragma once

#include "cpu_math.h"

#ifdef CPU_HAVE_AVX2_PATH
#include <immintrin.h>

#define CPU_VEC512 CPU_AVX512_TARGET inline __attribute__((always_inline))

namespace ddpm_fast {

// Lanes [0, n) of a 16-lane group: the mask of a row's tail.
CPU_VEC512 __mmask16 vec512_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// fp32 and bfloat16 (as bits) rows: widen to fp32, round fp32 to the type, narrow for the store, with
// cpu_math.h's rounding (to nearest even on the bit pattern; NaN stays NaN).
CPU_VEC512 __m512 vec512_load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
CPU_VEC512 __m512 vec512_load(const uint16_t* p, __mmask16 m) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// The bf16 bits of v (rounded to nearest even) in the high half of each 32-bit lane.
CPU_VEC512 __m512i vec512_bf16_high(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
}

CPU_VEC512 __m512 vec512_round(__m512 v, const float*) { return v; }
CPU_VEC512 __m512 vec512_round(__m512 v, const uint16_t*) {
  return _mm512_castsi512_ps(_mm512_and_si512(vec512_bf16_high(v), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

CPU_VEC512 void vec512_store(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
CPU_VEC512 void vec512_store(uint16_t* p, __mmask16 m, __m512 v) {
  const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(vec512_bf16_high(v), 16));
  _mm256_mask_storeu_epi16(p, m, h);
}

#ifdef CPU_HAVE_AVX512_BF16
// The same rounding and narrowing with AVX512_BF16's vcvtneps2bf16 (one instruction for the five or six
// integer ones above), for functions compiled with CPU_AVX512_BF16_TARGET. It rounds to nearest even and
// keeps NaN a NaN, as the integer path does, but treats fp32 denormal inputs (|v| < 2^-126) as zero.
#define CPU_VEC512_BF16 CPU_AVX512_BF16_TARGET inline __attribute__((always_inline))
// (A C-style cast between same-size vector types: the idiom both GCC and clang accept.)
CPU_VEC512_BF16 __m256i vec512_bf16_native(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }
CPU_VEC512_BF16 __m512 vec512_round_native(__m512 v, const uint16_t*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(vec512_bf16_native(v)), 16));
}
CPU_VEC512_BF16 void vec512_store_native(uint16_t* p, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(p, m, vec512_bf16_native(v));
}
#endif

// exp's range reduction, as cpu_math.h's exp_nonpositive's: t (clamped to >= -87) = n ln2 + r, |r| <= ln2 / 2;
// sets n.
CPU_VEC512 __m512 vec512_exp_reduce(__m512 t, __m512& n) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-87.0f));
  n = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(1.44269504088896341f)),
                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), t);
  return _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
}

// Swish(y) = y / (1 + exp(-y)), with exp(-y) for y clamped to [-88, 87] (so it stays finite: beyond
// the clamp sigmoid is 1 to fp32 precision above, and Swish is within 1e-36 of 0 below): the reduction
// and a degree-5 polynomial (relative error <= r^6 / 720 = 2.4e-6 on |r| <= ln2 / 2, which moves Swish
// by at most 2.4e-6 * e / (1 + e)^2 <= 6e-7 of y), 2^n by vscalefps, and 1 / (1 + e) by rcp14 and one
// Newton step (~2^-28 relative). No branch on y's sign, unlike cpu_math.h's scalar form.
CPU_VEC512 __m512 vec512_swish(__m512 y, const float*) {
  __m512 n;
  const __m512 t = _mm512_xor_ps(_mm512_max_ps(y, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(-0.0f));  // -y <= 88
  const __m512 r = vec512_exp_reduce(t, n);  // also clamps -y >= -87
  __m512 p = _mm512_set1_ps(1.3981999507e-3f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_scalef_ps(p, n));
  __m512 inv = _mm512_rcp14_ps(d);
  inv = _mm512_fmadd_ps(inv, _mm512_fnmadd_ps(d, inv, _mm512_set1_ps(1.0f)), inv);  // Newton: ~2^-28 relative
  return _mm512_mul_ps(y, inv);
}

// Swish(y) for a value that is stored as bf16 next (8 significant bits, so half an ulp is >= 2^-9 =
// 2e-3 relative): exp with a degree-4 Taylor polynomial on |r| <= ln2 / 2 (relative error <= r^5 / 120 =
// 4.2e-5) and rcp14 without the Newton step (<= 2^-14 = 6.1e-5), so sigmoid and Swish are within ~1.1e-4
// relative of the fp32 value: 1/18 of bf16's half ulp, which moves a rounded result by one ulp only
// where the exact value lies that close to a rounding boundary. Five vector ops fewer than the fp32 form,
// on the apply loop's dependency chain (its bf16 rows ran ~15% faster on the dev VM).
CPU_VEC512 __m512 vec512_swish(__m512 y, const uint16_t*) {
  __m512 n;
  const __m512 r = vec512_exp_reduce(_mm512_or_ps(y, _mm512_set1_ps(-0.0f)), n);  // exp(-|y|) = 2^n e^r
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 24.0f), r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  const __m512 e = _mm512_scalef_ps(p, n);
  const __m512 inv = _mm512_rcp14_ps(_mm512_add_ps(_mm512_set1_ps(1.0f), e));
  const __mmask16 below = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mul_ps(y, _mm512_mask_mul_ps(inv, below, e, inv));
}

}  // namespace ddpm_fast

#endif  // CPU_HAVE_AVX2_PATH
