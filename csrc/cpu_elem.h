// Element access for the CPU kernels' storage types (groupnorm_swish_cpu.cpp, residual_add_cpu.cpp,
// attention_core_cpu.cpp): widen to fp32, round fp32 to the type (the value a tensor op would store),
// narrow for the store. bf16 is handled on its 16-bit pattern (cpu_math.h) so the loops vectorize.
#pragma once

#include <c10/util/Half.h>

#include "cpu_math.h"

namespace ddpm_fast {

template <typename T> struct Elem;
template <> struct Elem<float> {
  static CPU_INLINE float load(float v) { return v; }
  static CPU_INLINE float round(float v) { return v; }
  static CPU_INLINE float store(float v) { return v; }
};
template <> struct Elem<uint16_t> {  // bfloat16 bits
  static CPU_INLINE float load(uint16_t v) { return bf16_bits_to_float(v); }
  static CPU_INLINE float round(float v) { return round_bf16(v); }
  static CPU_INLINE uint16_t store(float v) { return float_to_bf16_bits(v); }
};
template <> struct Elem<c10::Half> {  // c10::Half rounds to nearest even, as Tensor.to does
  static CPU_INLINE float load(c10::Half v) { return static_cast<float>(v); }
  static CPU_INLINE float round(float v) { return static_cast<float>(c10::Half(v)); }
  static CPU_INLINE c10::Half store(float v) { return c10::Half(v); }
};

}  // namespace ddpm_fast
