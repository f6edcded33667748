// The torch-aware side of the fused reverse step: op schemas, input checks, memory-format
// handling, dtype mapping, the current CUDA stream and the launch check. The kernels themselves
// (reverse_step_cpu.cpp, reverse_step_cuda.cu) see only the plain ReverseStepParams.
//
// Ops (namespace ddpm_fast):
//   reverse_step(x_t, eps, step, coeffs, noise?, seed, clip_lo, clip_hi, clip, seed_tensor?, image_offset,
//                image_offset_tensor?) -> Tensor
//   reverse_step_(x_t!, <same arguments>) -> ()  (in place)
// The in-place form is the one a CUDA-graph sampler replays: x_t is its static state buffer, the
// step tensor a static device scalar it refills before each replay, and seed_tensor (when given, it
// replaces `seed`) a static device scalar it refills before each sampling run; image_offset_tensor
// (replacing image_offset, the global index of the batch's first image in the noise key) likewise
// before each batch of a large run.
//
// CUDA parts use only device-generic c10 headers (DeviceGuard, VirtualGuardImpl, Stream::
// native_handle) plus cuda_runtime_api.h, so this file also compiles against a CPU-only torch with
// DDPM_FAST_WITH_CUDA defined (the tests syntax-check it that way).
// Narrow includes rather than torch/extension.h: this file is compiled twice (build, and the
// tests' syntax check of the CUDA section), and the full torch API costs most of that time.
// torch 2.13's c10 headers use C++20 bit-field initializers, which GCC accepts in C++17 with a
// warning per translation unit: silenced for the torch headers only.
#pragma GCC diagnostic push
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#pragma GCC diagnostic ignored "-Wc++20-extensions"
#endif
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <ATen/record_function.h>        // RECORD_FUNCTION for the direct out-variant calls
#include <torch/csrc/utils/pybind.h>  // at::Tensor <-> torch.Tensor for those calls
#include <torch/library.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <optional>
#include <vector>

#include "groupnorm_swish.h"
#include "residual_add.h"
#include "attention_core.h"
#include "reverse_step.h"

namespace ddpm_fast {
namespace {

constexpr const char* kOp = "ddpm_fast::reverse_step";

// Error messages are assembled from strings only. On the H100 machine's toolchain (/opt/gcc g++,
// torch 2.11) streaming an integer into TORCH_CHECK's std::ostringstream from this extension
// segfaulted (in std::ostream::_M_insert<long>), so a bad input crashed the process instead of
// raising; strings stream fine. Hence these formatters (std::to_string / snprintf, no ostream).
std::string str_of(int64_t v) { return std::to_string(v); }
std::string str_of(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}
std::string str_of(at::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}
std::string str_of(const c10::Device& d) { return d.str(); }
const char* str_of(at::ScalarType s) { return c10::toString(s); }

bool is_kernel_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

DType to_dtype(at::ScalarType s) {
  switch (s) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kFloat32;
  }
}

// Every rule the kernels rely on, raised as Python TypeError / ValueError / RuntimeError.
void check_inputs(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& step, const at::Tensor& coeffs,
                  const std::optional<at::Tensor>& noise, double clip_lo, double clip_hi, bool clip,
                  const std::optional<at::Tensor>& seed_tensor, int64_t image_offset,
                  const std::optional<at::Tensor>& image_offset_tensor) {
  const auto dev = x.device();
  TORCH_CHECK(dev.is_cpu() || dev.is_cuda(), kOp, ": x_t must be a CPU or CUDA tensor, got device ", str_of(dev));
  TORCH_CHECK_TYPE(is_kernel_dtype(x.scalar_type()), kOp, ": x_t must be float32, float16 or bfloat16, got ",
                   str_of(x.scalar_type()));
  TORCH_CHECK_TYPE(is_kernel_dtype(eps.scalar_type()), kOp, ": eps must be float32, float16 or bfloat16, got ",
                   str_of(eps.scalar_type()));
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || eps.scalar_type() == x.scalar_type(), kOp,
                   ": x_t of dtype ", str_of(x.scalar_type()), " needs eps of the same dtype (or keep x_t in float32), "
                   "got eps ", str_of(eps.scalar_type()));
  TORCH_CHECK(eps.device() == dev, kOp, ": eps is on ", str_of(eps.device()), " but x_t is on ", str_of(dev));
  TORCH_CHECK_VALUE(eps.sizes() == x.sizes(), kOp, ": eps shape ", str_of(eps.sizes()), " differs from x_t shape ",
                    str_of(x.sizes()));

  TORCH_CHECK_TYPE(step.scalar_type() == at::kLong, kOp, ": step must be an int64 tensor, got ", str_of(step.scalar_type()));
  TORCH_CHECK_VALUE(step.numel() == 1, kOp, ": step must hold exactly one index, got shape ", str_of(step.sizes()));
  TORCH_CHECK(step.device() == dev || step.device().is_cpu(), kOp, ": step is on ", str_of(step.device()),
              "; it must be on x_t's device (", str_of(dev), ") or the CPU");

  TORCH_CHECK_TYPE(coeffs.scalar_type() == at::kFloat, kOp, ": coeffs must be float32, got ", str_of(coeffs.scalar_type()));
  TORCH_CHECK_VALUE(coeffs.dim() == 2 && coeffs.size(1) == kNumCoeffs && coeffs.size(0) >= 1, kOp,
                    ": coeffs must be a [S, ", str_of(int64_t{kNumCoeffs}), "] table with S >= 1, got shape ",
                    str_of(coeffs.sizes()));
  TORCH_CHECK(coeffs.device() == dev, kOp, ": coeffs is on ", str_of(coeffs.device()), " but x_t is on ", str_of(dev));
  TORCH_CHECK_VALUE(coeffs.is_contiguous(), kOp, ": coeffs must be contiguous (call .contiguous() once when "
                    "building the table)");

  if (noise.has_value()) {
    const at::Tensor& z = *noise;
    TORCH_CHECK(z.device() == dev, kOp, ": noise is on ", str_of(z.device()), " but x_t is on ", str_of(dev));
    TORCH_CHECK_VALUE(z.sizes() == x.sizes(), kOp, ": noise shape ", str_of(z.sizes()), " differs from x_t shape ",
                      str_of(x.sizes()));
    TORCH_CHECK_TYPE(is_kernel_dtype(z.scalar_type()) || z.scalar_type() == at::kDouble, kOp,
                     ": noise must be a floating tensor (float32/float16/bfloat16/float64), got ", str_of(z.scalar_type()));
  }
  if (seed_tensor.has_value()) {
    const at::Tensor& st = *seed_tensor;
    TORCH_CHECK_TYPE(st.scalar_type() == at::kLong, kOp, ": seed_tensor must be an int64 tensor, got ",
                     str_of(st.scalar_type()));
    TORCH_CHECK_VALUE(st.numel() == 1, kOp, ": seed_tensor must hold exactly one seed, got shape ", str_of(st.sizes()));
    TORCH_CHECK(st.device() == dev || st.device().is_cpu(), kOp, ": seed_tensor is on ", str_of(st.device()),
                "; it must be on x_t's device (", str_of(dev), ") or the CPU");
  }
  TORCH_CHECK_VALUE(image_offset >= 0, kOp, ": image_offset must be >= 0, got ", str_of(image_offset));
  if (image_offset_tensor.has_value()) {
    const at::Tensor& ot = *image_offset_tensor;
    TORCH_CHECK_TYPE(ot.scalar_type() == at::kLong, kOp, ": image_offset_tensor must be an int64 tensor, got ",
                     str_of(ot.scalar_type()));
    TORCH_CHECK_VALUE(ot.numel() == 1, kOp, ": image_offset_tensor must hold exactly one index, got shape ",
                      str_of(ot.sizes()));
    TORCH_CHECK(ot.device() == dev || ot.device().is_cpu(), kOp, ": image_offset_tensor is on ",
                str_of(ot.device()), "; it must be on x_t's device (", str_of(dev), ") or the CPU");
  }
  if (clip) {
    TORCH_CHECK_VALUE(!std::isnan(clip_lo) && !std::isnan(clip_hi) && clip_lo <= clip_hi, kOp,
                      ": clip range must satisfy lo <= hi, got (", str_of(clip_lo), ", ", str_of(clip_hi), ")");
  }
}

// Contiguous and channels_last tensors are processed in memory order; anything else is copied
// to contiguous first. A tensor that is both (C == 1 or H * W == 1) takes the row-major path,
// where memory order already is logical order.
bool use_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Fill the params and run the kernel of x's device, writing `out` (dense in x_work's format).
void launch(const at::Tensor& x_work, const at::Tensor& eps_work, const at::Tensor& step, const at::Tensor& coeffs,
            const at::Tensor& noise_work, int64_t seed, double clip_lo, double clip_hi, bool clip,
            const std::optional<at::Tensor>& seed_tensor, int64_t image_offset,
            const std::optional<at::Tensor>& image_offset_tensor, bool channels_last, const at::Tensor& out) {
  ReverseStepParams p;
  p.x = x_work.data_ptr();
  p.eps = eps_work.data_ptr();
  p.noise = noise_work.defined() ? noise_work.const_data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.coeffs = coeffs.const_data_ptr<float>();
  p.num_steps = coeffs.size(0);
  p.numel = x_work.numel();
  p.channels_last = channels_last ? 1 : 0;
  if (channels_last) {
    p.channels = x_work.size(1);
    p.spatial = x_work.size(2) * x_work.size(3);
  }
  p.seed = static_cast<uint64_t>(seed);
  if (seed_tensor.has_value()) {
    if (seed_tensor->device().is_cpu()) {
      p.seed = static_cast<uint64_t>(seed_tensor->reshape({}).item<int64_t>());
    } else {
      // Read by the kernel: no host sync, and a captured graph sees whatever the tensor holds.
      p.seed_ptr = seed_tensor->const_data_ptr<int64_t>();
    }
  }
  // Images are the first dimension; the noise of logical element e is keyed by offset * per_image + e.
  p.per_image = (x_work.dim() >= 1 && x_work.size(0) > 0) ? p.numel / x_work.size(0) : 1;
  p.image_offset = image_offset;
  if (image_offset_tensor.has_value()) {
    if (image_offset_tensor->device().is_cpu()) {
      p.image_offset = image_offset_tensor->reshape({}).item<int64_t>();
      TORCH_CHECK_VALUE(p.image_offset >= 0, kOp, ": image_offset must be >= 0, got ", str_of(p.image_offset));
    } else {
      p.image_offset_ptr = image_offset_tensor->const_data_ptr<int64_t>();  // read by the kernel
    }
  }
  // The global element index must not wrap: offset * per_image + numel < 2^63.
  TORCH_CHECK_VALUE(p.image_offset <= (INT64_MAX - p.numel) / std::max<int64_t>(p.per_image, 1), kOp,
                    ": image_offset ", str_of(p.image_offset), " is too large for images of ",
                    str_of(p.per_image), " elements");
  p.clip = clip ? 1 : 0;
  p.clip_lo = static_cast<float>(clip_lo);
  p.clip_hi = static_cast<float>(clip_hi);
  p.x_dtype = to_dtype(x_work.scalar_type());
  p.eps_dtype = to_dtype(eps_work.scalar_type());

  if (step.device().is_cpu()) {
    // A host-side step costs nothing to read, so its range is checked here on every device.
    const int64_t s = step.reshape({}).item<int64_t>();
    TORCH_CHECK_VALUE(s >= 0 && s < p.num_steps, kOp, ": step ", str_of(s), " is out of range for a coefficient table "
                      "of ", str_of(p.num_steps), " rows");
    p.step_value = s;
  } else {
    // Device step (CUDA): no host read, so the launch stays asynchronous and graph-capturable;
    // the kernel guards the range itself and writes NaN everywhere when it is violated.
    p.step_ptr = step.const_data_ptr<int64_t>();
  }

  if (x_work.device().is_cpu()) {
    reverse_step_cpu(p);
    return;
  }
#ifdef DDPM_FAST_WITH_CUDA
  const c10::DeviceGuard guard(x_work.device());
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  auto stream = static_cast<cudaStream_t>(impl.getStream(x_work.device()).native_handle());
  const cudaError_t err = reverse_step_cuda(p, stream);
  TORCH_CHECK(err == cudaSuccess, kOp, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
#else
  TORCH_CHECK(false, kOp, ": ddpm_fast._C was built without CUDA support");
#endif
}

struct Work {
  at::Tensor x, eps, noise;
  bool channels_last;
};

Work prepare(const at::Tensor& x, const at::Tensor& eps, const std::optional<at::Tensor>& noise) {
  Work w;
  w.channels_last = use_channels_last(x);
  const auto fmt = w.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  w.x = x.contiguous(fmt);  // no copy when x is already dense in fmt
  w.eps = eps.contiguous(fmt);
  if (noise.has_value()) w.noise = noise->to(at::kFloat).contiguous(fmt);  // exact upcast, as the reference
  return w;
}

at::Tensor reverse_step(const at::Tensor& x_t, const at::Tensor& eps, const at::Tensor& step, const at::Tensor& coeffs,
                        const std::optional<at::Tensor>& noise, int64_t seed, double clip_lo, double clip_hi,
                        bool clip, const std::optional<at::Tensor>& seed_tensor, int64_t image_offset,
                        const std::optional<at::Tensor>& image_offset_tensor) {
  check_inputs(x_t, eps, step, coeffs, noise, clip_lo, clip_hi, clip, seed_tensor, image_offset, image_offset_tensor);
  Work w = prepare(x_t, eps, noise);
  const auto fmt = w.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty(x_t.sizes(), x_t.options().memory_format(fmt));
  launch(w.x, w.eps, step, coeffs, w.noise, seed, clip_lo, clip_hi, clip, seed_tensor, image_offset, image_offset_tensor,
         w.channels_last, out);
  return out;
}

void reverse_step_(const at::Tensor& x_t, const at::Tensor& eps, const at::Tensor& step, const at::Tensor& coeffs,
                   const std::optional<at::Tensor>& noise, int64_t seed, double clip_lo, double clip_hi, bool clip,
                   const std::optional<at::Tensor>& seed_tensor, int64_t image_offset,
                   const std::optional<at::Tensor>& image_offset_tensor) {
  check_inputs(x_t, eps, step, coeffs, noise, clip_lo, clip_hi, clip, seed_tensor, image_offset, image_offset_tensor);
  at::assert_no_internal_overlap(x_t);
  // Element i reads x[i], eps[i], noise[i] before writing out[i] (same thread), so exact aliasing
  // is safe; a shifted overlap would read values already overwritten.
  at::assert_no_partial_overlap(x_t, eps);
  if (noise.has_value()) at::assert_no_partial_overlap(x_t, *noise);
  Work w = prepare(x_t, eps, noise);
  if (w.x.is_same(x_t)) {
    launch(w.x, w.eps, step, coeffs, w.noise, seed, clip_lo, clip_hi, clip, seed_tensor, image_offset, image_offset_tensor, w.channels_last, x_t);
  } else {
    // x_t is strided in a way the kernel does not walk: update its dense copy, then write back.
    launch(w.x, w.eps, step, coeffs, w.noise, seed, clip_lo, clip_hi, clip, seed_tensor, image_offset, image_offset_tensor, w.channels_last, w.x);
    x_t.copy_(w.x);
  }
}

// Raw Philox4x32-10 words for one counter/key (the known-answer tests of the C++ generator).
std::vector<int64_t> philox4x32_words(std::vector<int64_t> counter, std::vector<int64_t> key) {
  TORCH_CHECK_VALUE(counter.size() == 4 && key.size() == 2, "philox4x32: need 4 counter words and 2 key words");
  uint32_t c[4];
  for (int i = 0; i < 4; ++i) c[i] = static_cast<uint32_t>(counter[i]);
  philox4x32_10(c[0], c[1], c[2], c[3], static_cast<uint32_t>(key[0]), static_cast<uint32_t>(key[1]));
  return {c[0], c[1], c[2], c[3]};
}

}  // namespace
}  // namespace ddpm_fast

// FRAGMENT, not TORCH_LIBRARY: the other ddpm_fast ops (Triton) are defined from Python in the same
// namespace, and a fragment composes with them whatever the import order.
TORCH_LIBRARY_FRAGMENT(ddpm_fast, m) {
  m.def("reverse_step(Tensor x_t, Tensor eps, Tensor step, Tensor coeffs, Tensor? noise, int seed, "
        "float clip_lo, float clip_hi, bool clip, Tensor? seed_tensor=None, int image_offset=0, "
        "Tensor? image_offset_tensor=None) -> Tensor");
  m.def("reverse_step_(Tensor(a!) x_t, Tensor eps, Tensor step, Tensor coeffs, Tensor? noise, int seed, "
        "float clip_lo, float clip_hi, bool clip, Tensor? seed_tensor=None, int image_offset=0, "
        "Tensor? image_offset_tensor=None) -> ()");
}

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("reverse_step", &ddpm_fast::reverse_step);
  m.impl("reverse_step_", &ddpm_fast::reverse_step_);
}

#ifdef DDPM_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("reverse_step", &ddpm_fast::reverse_step);
  m.impl("reverse_step_", &ddpm_fast::reverse_step_);
}
#endif

// ---------------------------------------------------------------------------------------------
// CPU kernels of the fused UNet ops (groupnorm_swish_cpu.cpp, residual_add_cpu.cpp, attention_core_cpu.cpp).
// Their ops (groupnorm_swish, residual_add, attention) are defined in Python (Triton on CUDA); these out-variants are
// what those ops' CPU kernels call, writing into a buffer the caller allocated in the op's output
// format (so tests can poison it):
//   groupnorm_swish_out(x, weight, bias, num_groups, eps, add?, swish, out!) -> ()
//   residual_add_out(x, bias?, residual, residual_bias?, out!) -> ()
//   attention_core_out(qkv, batch, n_heads, d_k, scale, out!) -> ()   (the core inside attention_cpu)
// The Python wrappers validate arguments first; the checks here keep a direct call from crashing.
namespace ddpm_fast {
namespace {

ElemType elem_type(at::ScalarType s) {
  switch (s) {
    case at::kHalf: return ElemType::kFloat16;
    case at::kBFloat16: return ElemType::kBFloat16;
    default: return ElemType::kFloat32;
  }
}

void check_cpu_tensor(const char* op, const char* name, const at::Tensor& t, at::ScalarType x_type) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", str_of(t.device()));
  TORCH_CHECK_TYPE(t.scalar_type() == x_type || t.scalar_type() == at::kFloat, op, ": ", name, " dtype ",
                   str_of(t.scalar_type()), " must be x's dtype (", str_of(x_type), ") or float32");
}

void check_x_out(const char* op, const at::Tensor& x, const at::Tensor& out) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got device ", str_of(x.device()));
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D [B, C, H, W], got shape ", str_of(x.sizes()));
  TORCH_CHECK_TYPE(is_kernel_dtype(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ",
                   str_of(x.scalar_type()));
  TORCH_CHECK(out.device().is_cpu(), op, ": out must be a CPU tensor, got device ", str_of(out.device()));
  TORCH_CHECK_VALUE(out.sizes() == x.sizes(), op, ": out shape ", str_of(out.sizes()), " differs from x shape ",
                    str_of(x.sizes()));
  TORCH_CHECK_TYPE(out.scalar_type() == x.scalar_type(), op, ": out dtype ", str_of(out.scalar_type()),
                   " differs from x dtype ", str_of(x.scalar_type()));
  at::assert_no_internal_overlap(out);
  at::assert_no_partial_overlap(out, x);  // exactly x is fine: every element is read before it is written
}

// Stride of the flattened H*W axis, or -1 when H and W do not merge into one strided axis.
int64_t hw_stride(const at::Tensor& t) {
  if (t.size(3) == 1) return t.stride(2);
  if (t.size(2) == 1 || t.stride(2) == t.size(3) * t.stride(3)) return t.stride(3);
  return -1;
}

void set_gn_strides(GroupNormSwishParams& p, const at::Tensor& x, const at::Tensor& out) {
  p.x = x.const_data_ptr();
  p.out = out.data_ptr();
  p.sx_b = x.stride(0), p.sx_c = x.stride(1), p.sx_hw = hw_stride(x);
  p.sy_b = out.stride(0), p.sy_c = out.stride(1), p.sy_hw = hw_stride(out);
}

void groupnorm_swish_out(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t num_groups,
                         double eps, const std::optional<at::Tensor>& add, bool swish, const at::Tensor& out) {
  constexpr const char* op = "ddpm_fast::groupnorm_swish_out";
  check_x_out(op, x, out);
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(num_groups > 0 && C % num_groups == 0, op, ": channels C=", str_of(C),
                    " are not divisible by num_groups=", str_of(num_groups));
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be non-negative, got ", str_of(eps));
  check_cpu_tensor(op, "weight", weight, x.scalar_type());
  check_cpu_tensor(op, "bias", bias, x.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == C && bias.dim() == 1 && bias.size(0) == C, op,
                    ": weight and bias must have shape [", str_of(C), "]");
  TORCH_CHECK_TYPE(weight.scalar_type() == bias.scalar_type(), op, ": weight and bias dtypes differ");
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  GroupNormSwishParams p;
  p.weight = w.const_data_ptr();
  p.bias = b.const_data_ptr();
  p.param_type = elem_type(w.scalar_type());
  if (add.has_value()) {
    check_cpu_tensor(op, "add", *add, x.scalar_type());
    TORCH_CHECK_VALUE(add->dim() == 2 && add->size(0) == x.size(0) && add->size(1) == C, op, ": add must have shape [",
                      str_of(x.size(0)), ", ", str_of(C), "], got ", str_of(add->sizes()));
    p.add = add->const_data_ptr();
    p.sa_b = add->stride(0), p.sa_c = add->stride(1);
    p.add_type = elem_type(add->scalar_type());
  }
  p.batch = x.size(0), p.channels = C, p.hw = x.size(2) * x.size(3), p.groups = num_groups;
  p.eps = static_cast<float>(eps);
  p.swish = swish;
  p.x_type = elem_type(x.scalar_type());
  if (x.numel() == 0) return;
  // The kernel walks planar or interleaved strides; anything else is first copied into out's layout
  // (and an out of neither layout gets a contiguous buffer, copied back).
  const bool out_planar = hw_stride(out) == 1, out_interleaved = out.stride(1) == 1 || C == 1;
  const at::Tensor y = (out_planar || out_interleaved) ? out : at::empty(out.sizes(), out.options());
  at::Tensor xw = x;
  set_gn_strides(p, xw, y);
  if (!groupnorm_swish_planar(p) && !groupnorm_swish_interleaved(p)) {
    const bool planar = hw_stride(y) == 1;
    xw = x.contiguous(planar ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast);
    set_gn_strides(p, xw, y);
    if (C == 1) p.sx_c = p.sy_c = 1;  // one channel: the channel stride is never used
  }
  groupnorm_swish_cpu(p);
  if (!y.is_same(out)) out.copy_(y);
}

// groupnorm_swish's output allocated here (the op's format: empty_like for a dense x, which keeps its
// layout; NCHW-contiguous otherwise, as ops/_common.new_output) and written by groupnorm_swish_out: the
// op wrapper's plain-eager CPU path, ~3 us of Python a call less than allocating in Python and checking
// every argument there first. DDPM_FAST_POISON_OUTPUTS=1 (the tests set it) fills the buffer with NaN
// before the kernel runs, so an element the kernel leaves unwritten cannot pass.
bool poison_outputs() {
  static const bool on = [] {
    const char* v = std::getenv("DDPM_FAST_POISON_OUTPUTS");
    return v != nullptr && std::string(v) == "1";
  }();
  return on;
}

at::Tensor groupnorm_swish_new(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                               int64_t num_groups, double eps, const std::optional<at::Tensor>& add, bool swish) {
  const bool dense = x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = dense ? at::empty_like(x) : at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (poison_outputs() && out.is_floating_point()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  groupnorm_swish_out(x, weight, bias, num_groups, eps, add, swish, out);
  return out;
}

// True (channels_last) / false (NCHW) when t is dense in that layout.
bool dense_channels_last(const at::Tensor& t) { return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast); }

void residual_add_out(const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                      const std::optional<at::Tensor>& residual_bias, const at::Tensor& out) {
  constexpr const char* op = "ddpm_fast::residual_add_out";
  check_x_out(op, x, out);
  TORCH_CHECK(residual.device().is_cpu(), op, ": residual must be a CPU tensor");
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes(), op, ": residual shape ", str_of(residual.sizes()),
                    " differs from x shape ", str_of(x.sizes()));
  TORCH_CHECK_TYPE(residual.scalar_type() == x.scalar_type(), op, ": residual dtype differs from x dtype");
  const bool cl = dense_channels_last(x);
  TORCH_CHECK_VALUE((cl || x.is_contiguous()) && residual.strides() == x.strides() && out.strides() == x.strides(),
                    op, ": x, residual and out must share one dense NCHW or channels_last layout");
  at::assert_no_partial_overlap(out, residual);
  const int64_t C = x.size(1);
  ResidualAddParams p;
  at::Tensor bias_c, rbias_c;  // contiguous copies (when needed) live until the kernel returns
  if (bias.has_value()) {
    check_cpu_tensor(op, "bias", *bias, x.scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == C, op, ": bias must have shape [", str_of(C), "]");
    bias_c = bias->contiguous();
    p.bias = bias_c.const_data_ptr();
    p.bias_type = elem_type(bias_c.scalar_type());
  }
  if (residual_bias.has_value()) {
    check_cpu_tensor(op, "residual_bias", *residual_bias, x.scalar_type());
    TORCH_CHECK_VALUE(residual_bias->dim() == 1 && residual_bias->size(0) == C, op,
                      ": residual_bias must have shape [", str_of(C), "]");
    rbias_c = residual_bias->contiguous();
    p.residual_bias = rbias_c.const_data_ptr();
    p.residual_bias_type = elem_type(rbias_c.scalar_type());
  }
  p.x = x.const_data_ptr();
  p.residual = residual.const_data_ptr();
  p.out = out.data_ptr();
  p.batch = x.size(0), p.channels = C, p.hw = x.size(2) * x.size(3);
  p.channels_last = cl;
  p.x_type = elem_type(x.scalar_type());
  residual_add_cpu(p);
}

void attention_core_out(const at::Tensor& qkv, int64_t batch, int64_t n_heads, int64_t d_k, double scale,
                        const at::Tensor& out) {
  constexpr const char* op = "ddpm_fast::attention_core_out";
  TORCH_CHECK(qkv.device().is_cpu() && out.device().is_cpu(), op, ": qkv and out must be CPU tensors");
  TORCH_CHECK_TYPE(is_kernel_dtype(qkv.scalar_type()) && out.scalar_type() == qkv.scalar_type(), op,
                   ": qkv and out must share one dtype of float32, float16 or bfloat16, got ",
                   str_of(qkv.scalar_type()), " and ", str_of(out.scalar_type()));
  TORCH_CHECK_VALUE(batch > 0 && n_heads > 0 && d_k > 0, op, ": batch, n_heads and d_k must be positive");
  TORCH_CHECK_VALUE(qkv.dim() == 2 && qkv.size(0) % batch == 0 && qkv.size(1) == 3 * n_heads * d_k &&
                        qkv.stride(1) == 1 && qkv.stride(0) >= qkv.size(1),
                    op, ": qkv must be [batch * tokens, 3 * n_heads * d_k] with unit column stride, got shape ",
                    str_of(qkv.sizes()), " strides ", str_of(qkv.strides()));
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == qkv.size(0) && out.size(1) == n_heads * d_k && out.is_contiguous(),
                    op, ": out must be a contiguous [", str_of(qkv.size(0)), ", ", str_of(n_heads * d_k), "], got shape ",
                    str_of(out.sizes()), " strides ", str_of(out.strides()));
  const at::MemOverlapStatus overlap = at::get_overlap_status(out, qkv);  // TooHard: strided, as ATen allows
  TORCH_CHECK_VALUE(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, op,
                    ": out must not overlap qkv (the core reads every row of qkv while writing out)");
  AttentionCoreParams p;
  p.qkv = qkv.const_data_ptr();
  p.out = out.data_ptr();
  p.batch = batch, p.tokens = qkv.size(0) / batch, p.heads = n_heads, p.d_k = d_k;
  p.qkv_row = qkv.stride(0);
  p.scale = static_cast<float>(scale);
  p.type = elem_type(qkv.scalar_type());
  attention_core_cpu(p);
}

}  // namespace
}  // namespace ddpm_fast

TORCH_LIBRARY_FRAGMENT(ddpm_fast, m) {
  m.def("groupnorm_swish_out(Tensor x, Tensor weight, Tensor bias, int num_groups, float eps, Tensor? add, "
        "bool swish, Tensor(a!) out) -> ()");
  m.def("residual_add_out(Tensor x, Tensor? bias, Tensor residual, Tensor? residual_bias, Tensor(a!) out) -> ()");
  m.def("attention_core_out(Tensor qkv, int batch, int n_heads, int d_k, float scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("groupnorm_swish_out", &ddpm_fast::groupnorm_swish_out);
  m.impl("residual_add_out", &ddpm_fast::residual_add_out);
  m.impl("attention_core_out", &ddpm_fast::attention_core_out);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ddpm_fast C++/CUDA kernels: registers ddpm_fast::reverse_step and ddpm_fast::reverse_step_";
#ifdef DDPM_FAST_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.def("philox4x32", &ddpm_fast::philox4x32_words, "Philox4x32-10 words of one (counter[4], key[2])",
        pybind11::arg("counter"), pybind11::arg("key"));
  // The same out-variant kernels as the ops below, callable without the dispatcher: the op wrappers'
  // plain-eager path (ops/_eager.py) takes these, saving ~4 us of Python dispatch per call.
  // RECORD_FUNCTION keeps them visible to torch.profiler under the op's name (a no-op when it is off).
  // Both release the GIL while the kernel runs, as torch's own bindings do, so that a caller's other
  // Python threads run meanwhile; the arguments are tensors the caller holds, alive for the call.
  m.def(
      "groupnorm_swish_out",
      [](const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, int64_t g, double eps,
         const std::optional<at::Tensor>& add, bool swish, const at::Tensor& out) {
        RECORD_FUNCTION("ddpm_fast::groupnorm_swish_out", std::vector<c10::IValue>());
        ddpm_fast::groupnorm_swish_out(x, w, b, g, eps, add, swish, out);
      },
      "groupnorm_swish_out without the dispatcher", pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def(
      "groupnorm_swish_new",
      [](const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, int64_t g, double eps,
         const std::optional<at::Tensor>& add, bool swish) {
        RECORD_FUNCTION("ddpm_fast::groupnorm_swish_out", std::vector<c10::IValue>());
        return ddpm_fast::groupnorm_swish_new(x, w, b, g, eps, add, swish);
      },
      "groupnorm_swish with its output allocated here", pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def(
      "residual_add_out",
      [](const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& r,
         const std::optional<at::Tensor>& rbias, const at::Tensor& out) {
        RECORD_FUNCTION("ddpm_fast::residual_add_out", std::vector<c10::IValue>());
        ddpm_fast::residual_add_out(x, bias, r, rbias, out);
      },
      "residual_add_out without the dispatcher", pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def(
      "attention_core_out",
      [](const at::Tensor& qkv, int64_t batch, int64_t n_heads, int64_t d_k, double scale, const at::Tensor& out) {
        RECORD_FUNCTION("ddpm_fast::attention_core_out", std::vector<c10::IValue>());
        ddpm_fast::attention_core_out(qkv, batch, n_heads, d_k, scale, out);
      },
      "attention_core_out without the dispatcher", pybind11::call_guard<pybind11::gil_scoped_release>());
}
