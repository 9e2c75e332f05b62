// One-pass fake quantization of a GEMM operand, and the emulated 16-bit GEMMs as one call (and
// one autograd node) each way (see mixprec/compute/emulate_build.py and emulated_cpp.py).
//
// out = round_to_format(clamp(x * scale, -max, max)) / scale, per element, in fp32, with the
// scale of the element's block: the values of dequantize(quantize_blocks(x, ...)) without the
// fp8 tensor, its bit-pattern decode or the widened copy of x in between. The rounding is to
// nearest, ties to even, onto a grid of `mbits` mantissa bits whose smallest normal exponent is
// `min_exp` (subnormals below it): the grid of torch's fp32 -> fp8 cast for every value that the
// clamp leaves (the cast's overflow handling never applies). -ffp-contract=off keeps x * scale and
// the division separate roundings, as torch's kernels do.
#include <torch/library.h>
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

#include "_bits.h"

// Round a clamped fp32 value onto the grid: its quantum is 2**(exponent - mbits), the exponent
// no smaller than min_exp; scaling by a power of two is exact, so rint does the one rounding.
struct Grid {
  float fmax;
  int32_t mbits;
  int32_t min_biased;  // 127 + min_exp
};

MIXPREC_INLINE float fake(float x, float scale, const Grid& g) {
  float y = x * scale;
  y = std::min(std::max(y, -g.fmax), g.fmax);  // NaN stays NaN (torch.clamp's behaviour)
  int32_t e = int32_t((bits_of(y) >> 23) & 0xFFu);
  e = std::max(e, g.min_biased);
  int32_t qe = std::min(e - g.mbits, 253);  // NaN's exponent 255: any finite quantum will do
  float quantum = float_of(uint32_t(qe) << 23);
  float inv = float_of(uint32_t(254 - qe) << 23);
  float r = std::rint(y * inv) * quantum;
  return r / scale;
}

template <typename T>
void run(const at::Tensor& x, const at::Tensor& scale, at::Tensor& out, int64_t br, int64_t bc,
         const Grid& g) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const int64_t n_cols = (cols + bc - 1) / bc;
  const T* src = x.data_ptr<T>();
  const float* sc = scale.data_ptr<float>();
  const bool single = scale.numel() == 1;
  float* dst = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* in = src + i * cols;
      float* o = dst + i * cols;
      const float* srow = sc + (single ? 0 : (i / br) * n_cols);
      if (!single && bc == 1) {  // a scale per column
        for (int64_t j = 0; j < cols; ++j) o[j] = fake(widen(in[j]), srow[j], g);
        continue;
      }
      for (int64_t c = 0; c < n_cols; ++c) {
        const float s = single ? sc[0] : srow[c];
        const int64_t lo = c * bc, hi = std::min(cols, lo + bc);
        for (int64_t j = lo; j < hi; ++j) o[j] = fake(widen(in[j]), s, g);
      }
    }
  });
}

at::Tensor fake_quantize(const at::Tensor& x, const at::Tensor& scale, int64_t br, int64_t bc,
                         double fmax, int64_t mbits, int64_t min_exp) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "fake_quantize: a contiguous 2-D operand");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous(),
              "fake_quantize: contiguous fp32 scales");
  TORCH_CHECK(br >= 1 && bc >= 1, "fake_quantize: block lengths >= 1");
  const int64_t blocks = ((x.size(0) + br - 1) / br) * ((x.size(1) + bc - 1) / bc);
  TORCH_CHECK(scale.numel() == 1 || scale.numel() == blocks,
              "fake_quantize: one scale, or one per block");
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  const Grid g{static_cast<float>(fmax), static_cast<int32_t>(mbits),
               static_cast<int32_t>(127 + min_exp)};
  switch (x.scalar_type()) {
    case at::kFloat: run<float>(x, scale, out, br, bc, g); break;
    case at::kBFloat16: run<c10::BFloat16>(x, scale, out, br, bc, g); break;
    case at::kHalf: run<c10::Half>(x, scale, out, br, bc, g); break;
    default: TORCH_CHECK(false, "fake_quantize: fp32, bf16 or fp16 operands");
  }
  return out;
}

// max |x| of each (br, bc) block (NaN if the block holds one), rows of blocks in parallel.
// |x| is compared as the integer of its bits: for non-negative floats that is their order, NaN
// above inf, and an integer max vectorizes where a NaN-propagating float max does not.
MIXPREC_INLINE uint32_t abs_bits(float x) { return bits_of(x) & 0x7FFFFFFFu; }

template <typename T>
void block_amax(const at::Tensor& x, float* amax, int64_t br, int64_t bc) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const int64_t n_rows = (rows + br - 1) / br, n_cols = (cols + bc - 1) / bc;
  const T* src = x.data_ptr<T>();
  at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> acc(n_cols == 1 ? 1 : (bc == 1 ? cols : n_cols));
    for (int64_t rb = begin; rb < end; ++rb) {
      std::fill(acc.begin(), acc.end(), 0u);
      for (int64_t i = rb * br; i < std::min(rows, (rb + 1) * br); ++i) {
        const T* in = src + i * cols;
        if (bc == 1) {  // a block per column: the max runs along the row, column by column
          uint32_t* a = acc.data();
          for (int64_t j = 0; j < cols; ++j) a[j] = std::max(a[j], abs_bits(widen(in[j])));
          continue;
        }
        for (int64_t c = 0; c < n_cols; ++c) {
          const int64_t lo = c * bc, hi = std::min(cols, lo + bc);
          uint32_t m = acc[c];
          for (int64_t j = lo; j < hi; ++j) m = std::max(m, abs_bits(widen(in[j])));
          acc[c] = m;
        }
      }
      for (int64_t c = 0; c < n_cols; ++c) amax[rb * n_cols + c] = float_of(acc[c]);
    }
  });
}

// The scale of a block from its amax, as mixprec.recipes computes it: fmax / max(amax, 1e-12)
// in double rounded to float once (rule 0), rounded down to a power of two (rule 1), or the
// E8M0 scale 2**-(floor(log2(amax)) - max_exp) clamped to [-127, 127] (rule 2).
float scale_of(float amax, double fmax, int64_t rule, int64_t max_exp) {
  if (rule == 2) {
    if (!std::isfinite(amax)) return NAN;
    int e = 0;
    std::frexp(amax, &e);
    int64_t shared = amax > 0 ? int64_t(e) - 1 - max_exp : -127;
    shared = std::min<int64_t>(std::max<int64_t>(shared, -127), 127);
    return std::ldexp(1.0f, int(-shared));
  }
  const double a = double(amax);
  const float s = static_cast<float>(fmax / (a != a ? a : std::max(a, 1e-12)));
  if (rule == 0 || s != s) return s;
  return float_of(bits_of(s) & ~uint32_t((1u << 23) - 1));
}

at::Tensor fake_quantize_dynamic(const at::Tensor& x, int64_t br, int64_t bc, double fmax,
                                 int64_t mbits, int64_t min_exp, int64_t rule, int64_t max_exp) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "fake_quantize: a contiguous 2-D operand");
  TORCH_CHECK(br >= 1 && bc >= 1, "fake_quantize: block lengths >= 1");
  const int64_t n_rows = (x.size(0) + br - 1) / br, n_cols = (x.size(1) + bc - 1) / bc;
  at::Tensor scale = at::empty({n_rows, 1, n_cols, 1}, x.options().dtype(at::kFloat));
  float* sc = scale.data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kFloat: block_amax<float>(x, sc, br, bc); break;
    case at::kBFloat16: block_amax<c10::BFloat16>(x, sc, br, bc); break;
    case at::kHalf: block_amax<c10::Half>(x, sc, br, bc); break;
    default: TORCH_CHECK(false, "fake_quantize: fp32, bf16 or fp16 operands");
  }
  for (int64_t k = 0; k < n_rows * n_cols; ++k) sc[k] = scale_of(sc[k], fmax, rule, max_exp);
  return fake_quantize(x, scale, br, bc, fmax, mbits, min_exp);
}

// The 16-bit GEMMs of the emulated backend (mixprec/compute/emulated.py), each one call: the
// widenings, the fp32 GEMM and the rounding that its Python function runs as separate torch ops,
// the same ATen ops in the same order (so the same bits), without a trip through Python for each.
// Autocast stays out: these run inside mixprec's autocast kernels, and an fp32 GEMM reaching
// autocast again would be lowered.
c10::DispatchKeySet autocast_keys() {
  return c10::DispatchKeySet({c10::DispatchKey::AutocastCPU, c10::DispatchKey::AutocastCUDA});
}

// Widening and rounding between fp32 and 16 bits: x.to(dtype) (same layout, same values), as one
// loop instead of four dispatcher ops; on a small model the ops cost more than the pass. Where
// autograd records (a double backward) or the layout is not dense, torch's cast runs instead.
// Rounding to bf16 is torch's (to nearest even); its NaNs are quiet NaNs, as torch's, whose
// payload bits torch itself sets differently in its vector loop and its scalar tail.
MIXPREC_INLINE void convert(const c10::BFloat16* s, float* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = widen(s[i]);
}

MIXPREC_INLINE void convert(const float* s, c10::BFloat16* d, int64_t n) {
  auto* out = reinterpret_cast<uint16_t*>(d);
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_nearest(s[i]);
}

MIXPREC_INLINE void convert(const c10::Half* s, float* d, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    _mm512_storeu_ps(d + i, _mm512_cvtph_ps(h));
  }
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) d[i] = static_cast<float>(s[i]);
}

MIXPREC_INLINE void convert(const float* s, c10::Half* d, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), h);
  }
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), h);
  }
#endif
  for (; i < n; ++i) d[i] = c10::Half(s[i]);
}

// The keys of tensors that are not plain dense CPU tensors: subclasses, functorch wrappers, ...
const c10::DispatchKeySet& not_plain_keys() {
  static const c10::DispatchKeySet keys({
      c10::DispatchKey::Python,
      c10::DispatchKey::PythonTLSSnapshot,
      c10::DispatchKey::Functionalize,
      c10::DispatchKey::FuncTorchGradWrapper,
      c10::DispatchKey::FuncTorchBatched,
      c10::DispatchKey::BatchedNestedTensor,
      c10::DispatchKey::Conjugate,
      c10::DispatchKey::Negative,
      c10::DispatchKey::ZeroTensor,
  });
  return keys;
}

template <typename From, typename To>
at::Tensor converted(const at::Tensor& x, c10::ScalarType dtype) {
  at::Tensor out = at::empty_strided(x.sizes(), x.strides(), x.options().dtype(dtype));
  const From* s = x.const_data_ptr<From>();
  To* d = out.mutable_data_ptr<To>();
  at::parallel_for(0, x.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    convert(s + begin, d + begin, end - begin);
  });
  return out;
}

at::Tensor round_to(const at::Tensor& x, c10::ScalarType dtype) {
  auto from = x.scalar_type();
  if (from == dtype) return x;
  bool plain = x.device().is_cpu() && x.layout() == at::kStrided &&
               !(x.requires_grad() && at::GradMode::is_enabled()) &&
               !x.key_set().has_any(not_plain_keys()) && x.is_non_overlapping_and_dense();
  if (plain && from == at::kFloat && dtype == at::kBFloat16) {
    return converted<float, c10::BFloat16>(x, dtype);
  }
  if (plain && from == at::kFloat && dtype == at::kHalf) return converted<float, c10::Half>(x, dtype);
  if (plain && from == at::kBFloat16 && dtype == at::kFloat) {
    return converted<c10::BFloat16, float>(x, dtype);
  }
  if (plain && from == at::kHalf && dtype == at::kFloat) return converted<c10::Half, float>(x, dtype);
  return x.to(dtype);
}

at::Tensor wide(const at::Tensor& x) { return round_to(x, at::kFloat); }

bool column_major(const at::Tensor& t) {
  return t.dim() == 2 && t.stride(0) == 1 && t.stride(1) == t.size(0);
}

// addmm(bias, a, b, beta, alpha) in fp32 on 16-bit operands, one rounding; mm without a bias.
at::Tensor gemm16(const std::optional<at::Tensor>& bias, const at::Tensor& a, const at::Tensor& b,
                  double beta, double alpha) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_keys());
  at::Tensor wa = wide(a);
  at::Tensor wb = wide(b);
  at::Tensor out = bias.has_value()
                       ? at::addmm(wide(*bias), wa, wb, beta, alpha)
                       : at::mm(wa, wb);
  return round_to(out, a.scalar_type());
}

// The gradients of gemm16 (emulated.py's _addmm_backward and _mm_backward on 2-D operands): the
// wanted ones, in the order bias, a, b.
std::vector<at::Tensor> gemm16_backward(const at::Tensor& grad,
                                        const std::optional<at::Tensor>& bias,
                                        const at::Tensor& a, const at::Tensor& b, double beta,
                                        double alpha, bool want_bias, bool want_a, bool want_b) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_keys());
  std::vector<at::Tensor> out;
  at::Tensor g = wide(grad);
  if (bias.has_value() && want_bias) {
    at::Tensor gb = beta == 1 ? g : g * beta;
    out.push_back(round_to(gb.sum_to_size(bias->sizes()), bias->scalar_type()));
  }
  if (alpha != 1) g = g * alpha;
  // Laid out as torch's fp32 backward (mm_mat1_backward, mm_mat2_backward) lays them out.
  if (want_a) {
    at::Tensor ga = column_major(a) ? at::matmul(wide(b), g.mT()).mT()
                                    : at::matmul(g, wide(b).mT());
    out.push_back(round_to(ga, a.scalar_type()));
  }
  if (want_b) {
    at::Tensor gb = column_major(b) ? at::matmul(g.mT(), wide(a)).mT()
                                    : at::matmul(wide(a).mT(), g);
    out.push_back(round_to(gb, b.scalar_type()));
  }
  return out;
}

// The emulated convolution (emulated.py's _convolution and its backward): fp32 on widened
// 16-bit operands, each result rounded once.
at::Tensor conv16(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                  bool transposed, at::IntArrayRef output_padding, int64_t groups) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_keys());
  std::optional<at::Tensor> wide_bias;
  if (bias.has_value()) wide_bias = wide(*bias);
  at::Tensor out = at::convolution(wide(x), wide(weight), wide_bias, stride,
                                   padding, dilation, transposed, output_padding, groups);
  return round_to(out, x.scalar_type());
}

// The wanted gradients (input, weight, bias by `mask`), in that order, each rounded to its
// operand's dtype (the bias's is `bias_dtype`).
std::vector<at::Tensor> conv16_backward(const at::Tensor& grad, const at::Tensor& x,
                                        const at::Tensor& weight, at::OptionalIntArrayRef bias_sizes,
                                        at::IntArrayRef stride, at::IntArrayRef padding,
                                        at::IntArrayRef dilation, bool transposed,
                                        at::IntArrayRef output_padding, int64_t groups,
                                        bool want_x, bool want_weight, bool want_bias,
                                        std::optional<c10::ScalarType> bias_dtype) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_keys());
  auto [gx, gw, gb] = at::convolution_backward(
      wide(grad), wide(x), wide(weight), bias_sizes, stride, padding,
      dilation, transposed, output_padding, groups, {want_x, want_weight, want_bias});
  std::vector<at::Tensor> out;
  if (want_x) out.push_back(round_to(gx, x.scalar_type()));
  if (want_weight) out.push_back(round_to(gw, weight.scalar_type()));
  if (want_bias) out.push_back(round_to(gb, *bias_dtype));
  return out;
}

// gemm16 and its backward as one C++ autograd node (no Python on either side). The backward runs
// the ATen ops of gemm16_backward; in a double backward (grad mode on) they record autograd.
// Without a bias the node has two inputs (autograd takes no undefined input).
at::Tensor gemm16_node_backward(torch::autograd::AutogradContext* ctx, const at::Tensor& grad,
                                const std::optional<at::Tensor>& bias, const at::Tensor& a,
                                const at::Tensor& b, bool want_bias, bool want_a, bool want_b,
                                at::Tensor* g_bias, at::Tensor* ga) {
  double beta = ctx->saved_data["beta"].toDouble();
  double alpha = ctx->saved_data["alpha"].toDouble();
  auto found = gemm16_backward(grad, bias, a, b, beta, alpha, want_bias, want_a, want_b);
  size_t i = 0;
  if (want_bias) *g_bias = found[i++];
  if (want_a) *ga = found[i++];
  return want_b ? found[i] : at::Tensor();
}

struct Addmm16Function : public torch::autograd::Function<Addmm16Function> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& bias,
                            const at::Tensor& a, const at::Tensor& b, double beta, double alpha) {
    ctx->save_for_backward({bias, a, b});
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["alpha"] = alpha;
    return gemm16(bias, a, b, beta, alpha);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    at::Tensor g_bias, ga;
    at::Tensor gb = gemm16_node_backward(ctx, grads[0], saved[0], saved[1], saved[2],
                                         ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                         ctx->needs_input_grad(2), &g_bias, &ga);
    return {g_bias, ga, gb, at::Tensor(), at::Tensor()};
  }
};

struct Mm16Function : public torch::autograd::Function<Mm16Function> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& a,
                            const at::Tensor& b) {
    ctx->save_for_backward({a, b});
    ctx->saved_data["beta"] = 1.0;
    ctx->saved_data["alpha"] = 1.0;
    return gemm16(std::nullopt, a, b, 1.0, 1.0);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    at::Tensor ga;
    at::Tensor gb = gemm16_node_backward(ctx, grads[0], std::nullopt, saved[0], saved[1], false,
                                         ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                         nullptr, &ga);
    return {ga, gb};
  }
};

// gemm16 as an autograd node: addmm with a bias, mm without.
at::Tensor gemm16_autograd(const std::optional<at::Tensor>& bias, const at::Tensor& a,
                           const at::Tensor& b, double beta, double alpha) {
  if (bias.has_value()) return Addmm16Function::apply(*bias, a, b, beta, alpha);
  return Mm16Function::apply(a, b);
}

// conv16 and its backward as one C++ autograd node, as gemm16_autograd (with and without a bias).
void save_geometry(torch::autograd::AutogradContext* ctx, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                   at::IntArrayRef output_padding, int64_t groups) {
  ctx->saved_data["stride"] = stride.vec();
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["dilation"] = dilation.vec();
  ctx->saved_data["transposed"] = transposed;
  ctx->saved_data["output_padding"] = output_padding.vec();
  ctx->saved_data["groups"] = groups;
}

std::vector<at::Tensor> conv16_node_backward(torch::autograd::AutogradContext* ctx,
                                             const at::Tensor& grad, const at::Tensor& x,
                                             const at::Tensor& weight,
                                             at::OptionalIntArrayRef bias_sizes, bool want_x,
                                             bool want_weight, bool want_bias,
                                             std::optional<c10::ScalarType> bias_dtype) {
  auto& d = ctx->saved_data;
  auto found = conv16_backward(grad, x, weight, bias_sizes, d["stride"].toIntVector(),
                               d["padding"].toIntVector(), d["dilation"].toIntVector(),
                               d["transposed"].toBool(), d["output_padding"].toIntVector(),
                               d["groups"].toInt(), want_x, want_weight, want_bias, bias_dtype);
  std::vector<at::Tensor> out(3);
  size_t i = 0;
  if (want_x) out[0] = found[i++];
  if (want_weight) out[1] = found[i++];
  if (want_bias) out[2] = found[i++];
  return out;
}

struct ConvBias16Function : public torch::autograd::Function<ConvBias16Function> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, const at::Tensor& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, bool transposed,
                            at::IntArrayRef output_padding, int64_t groups) {
    ctx->save_for_backward({x, weight});
    save_geometry(ctx, stride, padding, dilation, transposed, output_padding, groups);
    ctx->saved_data["bias_sizes"] = bias.sizes().vec();
    ctx->saved_data["bias_dtype"] = bias.scalar_type();
    return conv16(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    std::vector<int64_t> bias_sizes = ctx->saved_data["bias_sizes"].toIntVector();
    auto g = conv16_node_backward(ctx, grads[0], saved[0], saved[1], bias_sizes,
                                  ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                  ctx->needs_input_grad(2),
                                  ctx->saved_data["bias_dtype"].toScalarType());
    return {g[0], g[1], g[2], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

struct Conv16Function : public torch::autograd::Function<Conv16Function> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                            at::IntArrayRef output_padding, int64_t groups) {
    ctx->save_for_backward({x, weight});
    save_geometry(ctx, stride, padding, dilation, transposed, output_padding, groups);
    return conv16(x, weight, std::nullopt, stride, padding, dilation, transposed,
                  output_padding, groups);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto g = conv16_node_backward(ctx, grads[0], saved[0], saved[1], std::nullopt,
                                  ctx->needs_input_grad(0), ctx->needs_input_grad(1), false,
                                  std::nullopt);
    return {g[0], g[1], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor conv16_autograd(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                           at::IntArrayRef output_padding, int64_t groups) {
  if (bias.has_value()) {
    return ConvBias16Function::apply(x, weight, *bias, stride, padding, dilation, transposed,
                                     output_padding, groups);
  }
  return Conv16Function::apply(x, weight, stride, padding, dilation, transposed, output_padding,
                               groups);
}

}  // namespace

TORCH_LIBRARY(mixprec_emulate, m) {
  m.def(
      "fake_quantize(Tensor x, Tensor scale, int br, int bc, float fmax, int mbits, "
      "int min_exp) -> Tensor");
  m.def(
      "fake_quantize_dynamic(Tensor x, int br, int bc, float fmax, int mbits, int min_exp, "
      "int rule, int max_exp) -> Tensor");
  m.def("gemm16(Tensor? bias, Tensor a, Tensor b, float beta, float alpha) -> Tensor");
  m.def(
      "gemm16_backward(Tensor grad, Tensor? bias, Tensor a, Tensor b, float beta, float alpha, "
      "bool want_bias, bool want_a, bool want_b) -> Tensor[]");
  m.def("gemm16_autograd(Tensor? bias, Tensor a, Tensor b, float beta, float alpha) -> Tensor");
  m.def(
      "conv16_autograd(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
      "int[] dilation, bool transposed, int[] output_padding, int groups) -> Tensor");
  m.def(
      "conv16(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
      "bool transposed, int[] output_padding, int groups) -> Tensor");
  m.def(
      "conv16_backward(Tensor grad, Tensor x, Tensor weight, int[]? bias_sizes, int[] stride, "
      "int[] padding, int[] dilation, bool transposed, int[] output_padding, int groups, "
      "bool want_x, bool want_weight, bool want_bias, ScalarType? bias_dtype) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mixprec_emulate, CompositeImplicitAutograd, m) {
  m.impl("gemm16_autograd", &gemm16_autograd);
  m.impl("conv16_autograd", &conv16_autograd);
}

TORCH_LIBRARY_IMPL(mixprec_emulate, CPU, m) {
  m.impl("fake_quantize", &fake_quantize);
  m.impl("fake_quantize_dynamic", &fake_quantize_dynamic);
  m.impl("gemm16", &gemm16);
  m.impl("gemm16_backward", &gemm16_backward);
  m.impl("conv16", &conv16);
  m.impl("conv16_backward", &conv16_backward);
}
