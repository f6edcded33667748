// The fused reverse-diffusion step: the parameters and the per-element math shared by the CPU
// kernel (reverse_step_cpu.cpp) and the CUDA kernel (reverse_step_cuda.cu).
//
// No torch types here, so nvcc compiles the CUDA side without torch headers. The spec is
// ddpm_fast/reference/functional.py (reverse_step, philox4x32, philox_normal):
//     row  = coeffs[step]                                   (6 floats, gathered by the kernel)
//     x0   = row[0] * x + row[1] * eps                      (clamped to [clip_lo, clip_hi] if clip)
//     prev = row[2] * x0 + row[3] * x + row[4] * eps + row[5] * z
// z is an injected noise tensor or the Philox4x32-10 normal keyed by (seed, step, global logical index),
// the global index of element e of a batch whose first image is image `image_offset` being
// image_offset * per_image + e: image i draws the same noise in any batch position.
#pragma once

#include <stdint.h>
#include <math.h>

#if defined(__CUDACC__)
#define DDPM_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always_inline: the CPU kernel's loops only vectorize (per ISA variant) with these bodies inlined.
#define DDPM_HOST_DEVICE inline __attribute__((always_inline))
#else
#define DDPM_HOST_DEVICE inline
#endif

#if defined(__CUDACC__) || defined(DDPM_FAST_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace ddpm_fast {

constexpr int kNumCoeffs = 6;  // columns of a coefficient row, as N_COEFFS in the reference

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Everything one launch needs. Pointers are raw device (or host) addresses; x, eps, noise and out
// are dense in the same memory order (row-major, or channels_last when `channels_last` is set).
struct ReverseStepParams {
  const void* x = nullptr;        // x_t, x_dtype
  const void* eps = nullptr;      // model output, eps_dtype
  const float* noise = nullptr;   // injected z (float32), or nullptr: draw z with Philox in the kernel
  void* out = nullptr;            // x_{t-1}, x_dtype; may be exactly x (in place), never a partial overlap
  const float* coeffs = nullptr;  // [num_steps, 6] float32, row-major
  int64_t num_steps = 0;
  // The step index: read from step_ptr (same device as the kernel) when set, so a captured CUDA
  // graph replays with whatever the step tensor holds; otherwise step_value (a host-known step).
  const int64_t* step_ptr = nullptr;
  int64_t step_value = 0;
  int64_t numel = 0;
  // channels_last: memory order (N, H, W, C) of a logical [N, C, H, W] tensor; the noise counter
  // uses the logical row-major index, so memory index m maps back through C and H*W.
  int32_t channels_last = 0;
  int64_t channels = 1;
  int64_t spatial = 1;
  // The Philox key: read from seed_ptr (an int64 on the GPU, its bits taken as uint64; CUDA kernel
  // only, the binding reads a CPU seed tensor into `seed`) when set, so a captured CUDA graph can be
  // replayed for another sampling run with a new seed; else seed.
  const int64_t* seed_ptr = nullptr;
  uint64_t seed = 0;
  // The global index of the batch's first image, read from image_offset_ptr (a device int64, CUDA
  // kernel only; a negative value there makes every output NaN) when set, else image_offset (the
  // binding checks it is >= 0 and that image_offset * per_image fits). per_image = numel / batch.
  const int64_t* image_offset_ptr = nullptr;
  int64_t image_offset = 0;
  int64_t per_image = 1;
  int32_t clip = 0;
  float clip_lo = 0.f;
  float clip_hi = 0.f;
  DType x_dtype = DType::kFloat32;
  DType eps_dtype = DType::kFloat32;
};

// One coefficient row, in the reference's column order (C_X0_X, C_X0_EPS, M_X0, M_X, M_EPS, SIGMA).
struct StepRow {
  float c_x0_x, c_x0_eps, m_x0, m_x, m_eps, sigma;
};

DDPM_HOST_DEVICE StepRow make_row(const float* r) {
  return StepRow{r[0], r[1], r[2], r[3], r[4], r[5]};
}

// The per-element update, term by term in the reference's order so that the CPU kernel rounds
// like the reference (nvcc may contract into FMAs, which is only more accurate). The clamp is
// written with comparisons so that a NaN x0 stays NaN, as torch.clamp does.
DDPM_HOST_DEVICE float reverse_step_element(const StepRow& r, float x, float e, float z, bool clip,
                                            float lo, float hi) {
  float x0 = r.c_x0_x * x + r.c_x0_eps * e;
  if (clip) x0 = x0 < lo ? lo : (x0 > hi ? hi : x0);
  return r.m_x0 * x0 + r.m_x * x + r.m_eps * e + r.sigma * z;
}

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., SC'11), exactly as reference.functional.philox4x32.
// ---------------------------------------------------------------------------------------------
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

DDPM_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// In place on the 4 counter words; the key is bumped after every round, as in Random123.
DDPM_HOST_DEVICE void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                                    uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kPhiloxM0, c0, &hi0);
    const uint32_t lo1 = mulhilo32(kPhiloxM1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// The four words of noise block `block` (elements 4*block .. 4*block+3) for (seed, step):
// counter (block_lo, block_hi, step_lo, 0), key (seed_lo, seed_hi).
DDPM_HOST_DEVICE void philox_block(uint64_t seed, uint64_t step, uint64_t block, uint32_t w[4]) {
  uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32);
  uint32_t c2 = static_cast<uint32_t>(step), c3 = 0u;
  philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  w[0] = c0;
  w[1] = c1;
  w[2] = c2;
  w[3] = c3;
}

// u = ((w >> 8) + 0.5) / 2^24 in float32 arithmetic, rounding the sum as the reference does.
DDPM_HOST_DEVICE float philox_unit(uint32_t w) {
  return (static_cast<float>(w >> 8) + 0.5f) * 5.9604644775390625e-08f;  // 2^-24
}

// ---------------------------------------------------------------------------------------------
// log and sin/cos for Box-Muller in plain float arithmetic, the same code on CPU and GPU:
// - branch-free, so the CPU kernel's loop over a chunk of Philox words vectorizes (libm calls
//   would keep it scalar, at ~4x the cost of the Philox rounds themselves);
// - independent of --use_fast_math on the GPU, which turns logf/sinf/cosf into intrinsics with
//   large absolute error near u = 1 (log) and outside [-pi, pi] (sin/cos).
// Domains are what Box-Muller feeds them: u in [2^-25, 1] and theta in (0, 2 pi]. Checked
// exhaustively over every u the generator can produce: log <= 0.81 ulp, sin/cos <= 1.6 ulp from
// the exact values (glibc: 0.79 / 0.56), so the kernels match the reference's own vectorized
// log/cos/sin to a few ulps.
// ---------------------------------------------------------------------------------------------
DDPM_HOST_DEVICE float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  __builtin_memcpy(&f, &b, sizeof f);
  return f;
#endif
}

DDPM_HOST_DEVICE uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  __builtin_memcpy(&b, &f, sizeof b);
  return b;
#endif
}

// ln(u) for a positive normal float u: u = 2^k m with m in [sqrt(1/2), sqrt(2)), f = m - 1 (exact),
// s = f / (2 + f); ln(1 + f) = 2 atanh(s) = f - f^2/2 + s (f^2/2 + R), R = sum_{j>=1} 2 s^2j / (2j + 1)
// (Taylor to s^10: the first omitted term, 2 s^13 / 13 < 2e-11 for |s| <= 0.1716, is far below an
// ulp). k ln 2 is split so that k * kLn2Hi is exact for |k| < 2^15.
DDPM_HOST_DEVICE float philox_log(float u) {
  constexpr float kLn2Hi = 0.693359375f;              // 355 / 512
  constexpr float kLn2Lo = -2.12194440054690583e-4f;  // ln 2 - kLn2Hi
  const uint32_t ix = float_to_bits(u) + (0x3f800000u - 0x3f3504f3u);  // moves m's cut to sqrt(1/2)
  const int32_t k = static_cast<int32_t>(ix >> 23) - 127;
  const float m = bits_to_float((ix & 0x007fffffu) + 0x3f3504f3u);
  const float f = m - 1.0f;
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float R = z * (2.0f / 3 + z * (2.0f / 5 + z * (2.0f / 7 + z * (2.0f / 9 + z * (2.0f / 11)))));
  const float hfsq = 0.5f * f * f;
  const float dk = static_cast<float>(k);
  return dk * kLn2Hi + (f - (hfsq - (s * (hfsq + R) + dk * kLn2Lo)));
}

// sin and cos of theta in [0, 8): quadrant q = round(theta / (pi/2)) in 0..5, r = theta - q pi/2
// by a four-part Cody-Waite split of pi/2 (A, B, C short enough that q * part is exact; D the
// float remainder), so that r keeps full relative precision even next to a zero of sin or cos;
// then Taylor polynomials on |r| <= pi/4 (the first omitted terms, r^11/11! and r^12/12!, are
// below 3e-9 relative; they stay accurate slightly past pi/4 should q round the other way).
DDPM_HOST_DEVICE void philox_sincos(float theta, float* sin_out, float* cos_out) {
  constexpr float kTwoOverPi = 0.636619772367581343f;
  constexpr float kPio2A = 1.5703125f;                 // 8 significant bits
  constexpr float kPio2B = 4.837512969970703125e-4f;   // 12 bits
  constexpr float kPio2C = 7.549795100203482e-08f;     // 20 bits
  constexpr float kPio2D = -5.1453116002649896e-14f;   // pi/2 - A - B - C, to 1.4e-21
  const int32_t q = static_cast<int32_t>(theta * kTwoOverPi + 0.5f);  // theta >= 0: truncation rounds
  const float fq = static_cast<float>(q);
  const float r = (((theta - fq * kPio2A) - fq * kPio2B) - fq * kPio2C) - fq * kPio2D;
  const float z = r * r;
  const float sr = r + r * z * (-1.0f / 6 + z * (1.0f / 120 + z * (-1.0f / 5040 + z * (1.0f / 362880))));
  const float cr = 1.0f - 0.5f * z + z * z * (1.0f / 24 + z * (-1.0f / 720 + z * (1.0f / 40320 + z * (-1.0f / 3628800))));
  // Quadrant q: (sin, cos) = (sr, cr), (cr, -sr), (-sr, -cr), (-cr, sr) for q mod 4 = 0, 1, 2, 3.
  const bool swap = (q & 1) != 0;
  const float s_abs = swap ? cr : sr;
  const float c_abs = swap ? sr : cr;
  *sin_out = (q & 2) ? -s_abs : s_abs;
  *cos_out = ((q + 1) & 2) ? -c_abs : c_abs;
}

// Box-Muller on one word pair, in the reference's float32 formula:
// r = sqrt(-2 ln u_a), theta = float(2 pi) * u_b, (z_cos, z_sin) = (r cos theta, r sin theta).
DDPM_HOST_DEVICE void box_muller(uint32_t wa, uint32_t wb, float* z_cos, float* z_sin) {
  const float ua = philox_unit(wa);
  const float ub = philox_unit(wb);
  const float r = sqrtf(-2.0f * philox_log(ua));
  const float theta = 6.28318530717958647692f * ub;
  float s, c;
  philox_sincos(theta, &s, &c);
  *z_cos = r * c;
  *z_sin = r * s;
}

// The four normals of block `block`: z[0], z[1] from (w0, w1) and z[2], z[3] from (w2, w3).
DDPM_HOST_DEVICE void philox_normal4(uint64_t seed, uint64_t step, uint64_t block, float z[4]) {
  uint32_t w[4];
  philox_block(seed, step, block, w);
  box_muller(w[0], w[1], &z[0], &z[1]);
  box_muller(w[2], w[3], &z[2], &z[3]);
}

// The normal of one logical element (used where memory order is not logical order).
DDPM_HOST_DEVICE float philox_normal1(uint64_t seed, uint64_t step, uint64_t logical) {
  uint32_t w[4];
  philox_block(seed, step, logical >> 2, w);
  const unsigned lane = static_cast<unsigned>(logical & 3u);
  float zc, zs;
  if (lane < 2) {
    box_muller(w[0], w[1], &zc, &zs);
  } else {
    box_muller(w[2], w[3], &zc, &zs);
  }
  return (lane & 1u) ? zs : zc;
}

// Memory index -> logical row-major index for a channels_last [N, C, H, W] tensor.
DDPM_HOST_DEVICE int64_t channels_last_logical(int64_t m, int64_t channels, int64_t spatial) {
  const int64_t c = m % channels;
  const int64_t pixel = m / channels;  // n * HW + s
  const int64_t s = pixel % spatial;
  const int64_t n = pixel / spatial;
  return (n * channels + c) * spatial + s;
}

// Launchers. The CPU one runs on host pointers (the binding has checked the step range); the
// CUDA one enqueues on `stream`, never synchronizes, and returns the launch status. On CUDA a step
// outside [0, num_steps) cannot be raised without a host read (a sync, and impossible inside a
// captured graph), so the kernel writes NaN to every output element instead.
void reverse_step_cpu(const ReverseStepParams& p);
#if defined(__CUDACC__) || defined(DDPM_FAST_WITH_CUDA)
cudaError_t reverse_step_cuda(const ReverseStepParams& p, cudaStream_t stream);
#endif

}  // namespace ddpm_fast
