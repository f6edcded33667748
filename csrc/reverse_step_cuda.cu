// CUDA kernel of the fused reverse step (no torch headers: the binding passes raw pointers and a
// stream). One thread owns VEC consecutive elements in memory order, VEC chosen so the narrowest
// tensor moves 16 bytes per thread (float: 4, half/bfloat16 eps or x: 8); x, eps, noise and out
// then go through 128-bit loads/stores when every base pointer is 16-byte aligned. Row-major
// tensors draw noise with one Philox call per 4 elements (a thread's first element is a multiple
// of 4, so its elements are whole Philox blocks); channels_last tensors map each memory index back
// to its logical index and draw per element (4x the Philox work, same stream).
//
// The step index is read from device memory by every thread, never by the host, so one captured
// CUDA graph replays any step. A step outside [0, num_steps) cannot raise from inside the kernel;
// the row is replaced by NaNs so every output element is NaN, which no sampler can mistake for data.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "reverse_step.h"

namespace ddpm_fast {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// N elements of T through N * sizeof(T) / 16 128-bit transactions (p must be 16-byte aligned).
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, float (&v)[N]) {
  static_assert((N * sizeof(T)) % 16 == 0, "vector width must be a multiple of 16 bytes");
  constexpr int kPer = 16 / sizeof(T);
#pragma unroll
  for (int w = 0; w < N / kPer; ++w) {
    const uint4 raw = reinterpret_cast<const uint4*>(p)[w];
    const T* t = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kPer; ++i) v[w * kPer + i] = Cvt<T>::load(t[i]);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const float (&v)[N]) {
  constexpr int kPer = 16 / sizeof(T);
#pragma unroll
  for (int w = 0; w < N / kPer; ++w) {
    uint4 raw;
    T* t = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < kPer; ++i) t[i] = Cvt<T>::store(v[w * kPer + i]);
    reinterpret_cast<uint4*>(p)[w] = raw;
  }
}

__device__ __forceinline__ StepRow load_row(const ReverseStepParams& p, int64_t* step_out) {
  const int64_t step = p.step_ptr != nullptr ? __ldg(p.step_ptr) : p.step_value;
  *step_out = step;
  if (step < 0 || step >= p.num_steps) {
    const float nan = __int_as_float(0x7fc00000);
    return StepRow{nan, nan, nan, nan, nan, nan};
  }
  const float* r = p.coeffs + step * kNumCoeffs;
  return StepRow{__ldg(r), __ldg(r + 1), __ldg(r + 2), __ldg(r + 3), __ldg(r + 4), __ldg(r + 5)};
}

template <typename X, typename E, int VEC, bool kGenerate, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    reverse_step_kernel(const ReverseStepParams p, const bool vectorized) {
  static_assert(VEC % 4 == 0, "a thread must own whole Philox blocks");
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * VEC;
  if (first >= p.numel) return;
  int64_t step;
  StepRow row = load_row(p, &step);
  // Global logical index of the batch's element 0; a negative device offset poisons the output, as a
  // bad step does (no host read is possible inside a captured graph).
  const int64_t offset = p.image_offset_ptr != nullptr ? __ldg(p.image_offset_ptr) : p.image_offset;
  if (offset < 0) {
    const float nan = __int_as_float(0x7fc00000);
    row = StepRow{nan, nan, nan, nan, nan, nan};
  }
  const uint64_t base = static_cast<uint64_t>(offset) * static_cast<uint64_t>(p.per_image);

  const X* x = static_cast<const X*>(p.x) + first;
  const E* e = static_cast<const E*>(p.eps) + first;
  X* out = static_cast<X*>(p.out) + first;
  const bool full = vectorized && first + VEC <= p.numel;
  const int count = full ? VEC : static_cast<int>(min(static_cast<int64_t>(VEC), p.numel - first));

  float xv[VEC], ev[VEC], zv[VEC];
  if (full) {
    load_vec<X, VEC>(x, xv);
    load_vec<E, VEC>(e, ev);
    if (!kGenerate) load_vec<float, VEC>(p.noise + first, zv);
  } else {
    // Tail (or unaligned buffers): element-wise loads; unused lanes get finite filler.
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const bool in = i < count;
      xv[i] = in ? Cvt<X>::load(x[i]) : 0.f;
      ev[i] = in ? Cvt<E>::load(e[i]) : 0.f;
      if (!kGenerate) zv[i] = in ? p.noise[first + i] : 0.f;
    }
  }

  if (kGenerate) {
    const uint64_t seed = p.seed_ptr != nullptr ? static_cast<uint64_t>(__ldg(p.seed_ptr)) : p.seed;
    if (!kChannelsLast && (base & 3u) == 0) {
      // A thread's first element is a multiple of 4 and so is base: whole Philox blocks.
#pragma unroll
      for (int g = 0; g < VEC / 4; ++g) {
        philox_normal4(seed, static_cast<uint64_t>(step), ((base + static_cast<uint64_t>(first)) >> 2) + g,
                       &zv[4 * g]);
      }
    } else if (!kChannelsLast) {
      // base inside a Philox block (per_image not a multiple of 4; uniform over the grid): per element.
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        zv[i] = i < count ? philox_normal1(seed, static_cast<uint64_t>(step), base + static_cast<uint64_t>(first + i))
                          : 0.f;
      }
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        zv[i] = i < count ? philox_normal1(seed, static_cast<uint64_t>(step),
                                           base + static_cast<uint64_t>(channels_last_logical(first + i, p.channels,
                                                                                              p.spatial)))
                          : 0.f;
      }
    }
  }

  const bool clip = p.clip != 0;
  float ov[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) ov[i] = reverse_step_element(row, xv[i], ev[i], zv[i], clip, p.clip_lo, p.clip_hi);

  if (full) {
    store_vec<X, VEC>(out, ov);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      if (i < count) out[i] = Cvt<X>::store(ov[i]);
    }
  }
}

inline bool aligned16(const void* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0;
}

template <typename X, typename E>
cudaError_t launch(const ReverseStepParams& p, cudaStream_t stream) {
  constexpr int kNarrow = sizeof(X) < sizeof(E) ? sizeof(X) : sizeof(E);
  constexpr int VEC = 16 / kNarrow;
  const bool vectorized =
      aligned16(p.x) && aligned16(p.eps) && aligned16(p.out) && (p.noise == nullptr || aligned16(p.noise));
  const int64_t threads = (p.numel + VEC - 1) / VEC;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks));
  const bool generate = p.noise == nullptr;
  if (generate && p.channels_last) {
    reverse_step_kernel<X, E, VEC, true, true><<<grid, kThreads, 0, stream>>>(p, vectorized);
  } else if (generate) {
    reverse_step_kernel<X, E, VEC, true, false><<<grid, kThreads, 0, stream>>>(p, vectorized);
  } else {
    // Injected noise is already in x's memory order: the layout does not matter.
    reverse_step_kernel<X, E, VEC, false, false><<<grid, kThreads, 0, stream>>>(p, vectorized);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t reverse_step_cuda(const ReverseStepParams& p, cudaStream_t stream) {
  if (p.numel == 0) return cudaSuccess;
  if (p.x_dtype == DType::kFloat32) {
    switch (p.eps_dtype) {
      case DType::kFloat32: return launch<float, float>(p, stream);
      case DType::kFloat16: return launch<float, __half>(p, stream);
      case DType::kBFloat16: return launch<float, __nv_bfloat16>(p, stream);
    }
  } else if (p.x_dtype == DType::kFloat16 && p.eps_dtype == DType::kFloat16) {
    return launch<__half, __half>(p, stream);
  } else if (p.x_dtype == DType::kBFloat16 && p.eps_dtype == DType::kBFloat16) {
    return launch<__nv_bfloat16, __nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;  // the binding admits no other combination
}

}  // namespace ddpm_fast
