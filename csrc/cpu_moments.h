// groupnorm_swish's statistics helpers (csrc/groupnorm_swish_cpu.cpp): an uninitialised scratch array,
// running moments merged in double (Chan et al.), and the exact two-pass moments of one staged chunk.
#pragma once

#include "cpu_math.h"

#include <algorithm>
#include <cstdint>
#include <memory>

namespace ddpm_fast {

constexpr int64_t kLanes = 16;  // independent accumulators: a 16-wide fp32 SIMD register

// An uninitialised scratch array (std::vector would zero it: a 1 MB memset per call at 16x128x32x32).
template <typename V>
struct Scratch {
  std::unique_ptr<V[]> buf;
  explicit Scratch(int64_t n) : buf(new V[static_cast<size_t>(std::max<int64_t>(n, 1))]) {}
  V* data() { return buf.get(); }
  const V* data() const { return buf.get(); }
  V& operator[](int64_t i) { return buf[static_cast<size_t>(i)]; }
};

// Running moments about the pivot (double: thousands of merges must not drift).
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void merge(double nb, double mean_b, double m2_b) {
    const double tot = n + nb;
    const double delta = mean_b - mean;
    mean += delta * (nb / tot);
    m2 += m2_b + delta * delta * (n * nb / tot);
    n = tot;
  }
};

// Exact two-pass moments of s[0..n): adds (n, mean, M2) to m.
CPU_INLINE void chunk_moments(const float* __restrict s, int64_t n, Moments& m) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += s[i + j];
  float sum = 0.0f;
  for (; i < n; ++i) sum += s[i];
  for (int64_t j = 0; j < kLanes; ++j) sum += acc[j];
  const float mean = sum / static_cast<float>(n);
  float sq[kLanes] = {};
  for (i = 0; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const float d = s[i + j] - mean;
      sq[j] += d * d;
    }
  float m2 = 0.0f;
  for (; i < n; ++i) m2 += (s[i] - mean) * (s[i] - mean);
  for (int64_t j = 0; j < kLanes; ++j) m2 += sq[j];
  m.merge(static_cast<double>(n), mean, m2);
}

}  // namespace ddpm_fast
