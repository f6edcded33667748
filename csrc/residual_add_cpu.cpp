// CPU kernel of the fused residual add: one read of x and of the residual, one write, in place of
// the spec's three elementwise passes (bias, residual, residual bias).
#include "residual_add.h"

#include "cpu_elem.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

namespace ddpm_fast {
namespace {

constexpr int64_t kParallelMin = 1 << 15;  // fewer elements per thread than this: fork/join costs more

// bias[c] cast to T (the spec's `.to(x.dtype)`), as fp32; 0 without a bias.
template <typename T>
float bias_value(const void* ptr, ElemType t, int64_t c) {
  if (ptr == nullptr) return 0.0f;
  float v;
  switch (t) {
    case ElemType::kBFloat16: v = bf16_bits_to_float(static_cast<const uint16_t*>(ptr)[c]); break;
    case ElemType::kFloat16: v = static_cast<float>(static_cast<const c10::Half*>(ptr)[c]); break;
    default: v = static_cast<const float*>(ptr)[c]; break;
  }
  return Elem<T>::load(Elem<T>::store(v));
}

template <typename T>
CPU_INLINE void add_row_scalar(const T* __restrict x, const T* __restrict r, T* __restrict y, int64_t n, float b,
                               float rb) {
  for (int64_t i = 0; i < n; ++i) y[i] = Elem<T>::store(((Elem<T>::load(x[i]) + b) + Elem<T>::load(r[i])) + rb);
}

template <typename T>
CPU_INLINE void add_row_vector(const T* __restrict x, const T* __restrict r, T* __restrict y, int64_t n,
                               const float* __restrict b, const float* __restrict rb) {
  for (int64_t i = 0; i < n; ++i)
    y[i] = Elem<T>::store(((Elem<T>::load(x[i]) + b[i]) + Elem<T>::load(r[i])) + rb[i]);
}

// NCHW: planes [begin, end) of H*W elements, each with its channel's biases.
template <typename T>
CPU_INLINE void planes(const ResidualAddParams& p, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(p.x);
  const T* r = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.out);
  for (int64_t plane = begin; plane < end; ++plane) {
    const int64_t c = plane % p.channels, off = plane * p.hw;
    add_row_scalar<T>(x + off, r + off, y + off, p.hw, bias_value<T>(p.bias, p.bias_type, c),
                      bias_value<T>(p.residual_bias, p.residual_bias_type, c));
  }
}

// channels_last: pixels [begin, end) of C elements, with the per-channel bias rows b, rb.
template <typename T>
CPU_INLINE void pixels(const ResidualAddParams& p, int64_t begin, int64_t end, const float* b, const float* rb) {
  const int64_t C = p.channels;
  const T* x = static_cast<const T*>(p.x);
  const T* r = static_cast<const T*>(p.residual);
  T* y = static_cast<T*>(p.out);
  for (int64_t px = begin; px < end; ++px) add_row_vector<T>(x + px * C, r + px * C, y + px * C, C, b, rb);
}

#define DDPM_RA_ENTRY_POINTS(T, SUFFIX, TARGET, ISA)                                                     \
  TARGET void planes_##SUFFIX(const ResidualAddParams& p, int64_t begin, int64_t end) {             \
    planes<T>(p, begin, end);                                                                       \
  }                                                                                                  \
  TARGET void pixels_##SUFFIX(const ResidualAddParams& p, int64_t begin, int64_t end, const float* b, \
                              const float* rb) {                                                     \
    pixels<T>(p, begin, end, b, rb);                                                                \
  }

CPU_FOR_EACH_VARIANT(DDPM_RA_ENTRY_POINTS)
#undef DDPM_RA_ENTRY_POINTS

template <typename T>
std::vector<float> bias_row(const void* ptr, ElemType t, int64_t C) {
  std::vector<float> row(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) row[c] = bias_value<T>(ptr, t, c);
  return row;
}

template <typename T>
void run(const ResidualAddParams& p, void (*planes_fn)(const ResidualAddParams&, int64_t, int64_t),
         void (*pixels_fn)(const ResidualAddParams&, int64_t, int64_t, const float*, const float*)) {
  if (!p.channels_last) {
    const int64_t grain = std::max<int64_t>(1, kParallelMin / std::max<int64_t>(1, p.hw));
    at::parallel_for(0, p.batch * p.channels, grain, [&](int64_t b, int64_t e) { planes_fn(p, b, e); });
    return;
  }
  const std::vector<float> b = bias_row<T>(p.bias, p.bias_type, p.channels);
  const std::vector<float> rb = bias_row<T>(p.residual_bias, p.residual_bias_type, p.channels);
  const int64_t grain = std::max<int64_t>(1, kParallelMin / std::max<int64_t>(1, p.channels));
  at::parallel_for(0, p.batch * p.hw, grain, [&](int64_t s, int64_t e) { pixels_fn(p, s, e, b.data(), rb.data()); });
}

}  // namespace

void residual_add_cpu(const ResidualAddParams& p) {
  if (p.batch == 0 || p.channels == 0 || p.hw == 0) return;
  switch (p.x_type) {
    case ElemType::kBFloat16: return run<uint16_t>(p, CPU_PICK(planes, bf16), CPU_PICK(pixels, bf16));
    case ElemType::kFloat16: return run<c10::Half>(p, CPU_PICK(planes, f16), CPU_PICK(pixels, f16));
    default: return run<float>(p, CPU_PICK(planes, f32), CPU_PICK(pixels, f32));
  }
}

}  // namespace ddpm_fast
