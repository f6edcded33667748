// groupnorm_swish's statistics helpers (csrc/groupnorm_swish_cpu.cpp): an uninitialised scratch array,
// running moments merged in double (Chan et al.), the exact two-pass moments of one staged chunk, and
// the merge of a channels_last sample's per-block parts.
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

// The moments of every group of sample b from its per-(block, channel) parts (mean, M2 about the
// pivot; index (b * nblk + blk) * C + c), into m[0..G). Every block but the last holds `rows` values per
// channel, so those parts combine in closed form, as Chan's pairwise formula does for equal counts: the
// mean of their means, and M2 = sum of (their M2 + rows * squared deviation of their mean). Both sums
// run per channel across blocks (`acc`, 2 * C doubles: contiguous, so they vectorize; a serial chain over
// a group's parts cost ~20 us per sample at 128x32x32), then over the group's channels. A shorter last
// block's parts then merge one by one. Fixed order: the same for any thread count or schedule.
CPU_INLINE void merge_sample_parts(const float* __restrict bmean, const float* __restrict bm2, int64_t b,
                                   int64_t nblk, int64_t rows, int64_t hw, int64_t C, int64_t G,
                                   double* __restrict acc, Moments* m) {
  const int64_t cg = C / G, last = hw - (nblk - 1) * rows;  // values per channel in the last block
  const int64_t nfull = last == rows ? nblk : nblk - 1;
  const float* __restrict mb = bmean + b * nblk * C;
  const float* __restrict qb = bm2 + b * nblk * C;
  for (int64_t g = 0; g < G; ++g) m[g] = Moments();
  if (nfull > 0) {
    for (int64_t c = 0; c < C; ++c) acc[c] = 0.0;
    for (int64_t blk = 0; blk < nfull; ++blk)
      for (int64_t c = 0; c < C; ++c) acc[c] += mb[blk * C + c];
    const double parts = static_cast<double>(nfull * cg);
    for (int64_t g = 0; g < G; ++g) {
      double sum = 0.0;
      for (int64_t c = g * cg; c < (g + 1) * cg; ++c) sum += acc[c];
      m[g].n = parts * static_cast<double>(rows);
      m[g].mean = sum / parts;
    }
    double* __restrict gmean = acc + C;  // per channel, its group's mean
    for (int64_t c = 0; c < C; ++c) acc[c] = 0.0, gmean[c] = m[c / cg].mean;
    const double r = static_cast<double>(rows);
    for (int64_t blk = 0; blk < nfull; ++blk)
      for (int64_t c = 0; c < C; ++c) {
        const double d = mb[blk * C + c] - gmean[c];
        acc[c] += qb[blk * C + c] + r * (d * d);
      }
    for (int64_t g = 0; g < G; ++g)
      for (int64_t c = g * cg; c < (g + 1) * cg; ++c) m[g].m2 += acc[c];
  }
  if (nfull < nblk)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = (nblk - 1) * C + c;
      Moments& mg = m[c / cg];
      if (mg.n == 0) {
        mg.n = static_cast<double>(last), mg.mean = mb[i], mg.m2 = qb[i];
      } else {
        mg.merge(static_cast<double>(last), mb[i], qb[i]);
      }
    }
}

}  // namespace ddpm_fast
