// Appended to _emulate.cpp (one library, torch.ops.mixprec_emulate), before
// _emulate_autocast.cpp, whose kernels call it: the emulated linear and convolution layers on
// fp32 parameters, autocast's casts of the weight and bias folded into the layer's autograd node.
//
// Under autocast an fp32 weight reaches the emulated GEMM as torch's cast (a ToCopyBackward0 node,
// and a 16-bit copy that the GEMM's node saves); on a small model each of those casts costs more
// than its arithmetic, forward and backward. These nodes round the parameters into fp32 storage
// (the values the GEMM would widen the cast copy to), save the fp32 weight itself and round the
// parameters' gradients in place: the same values, bit for bit, one node instead of three
// (emulated_cpp.py's note says what else it changes).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <immintrin.h>

namespace {

// fp32 values rounded to a 16-bit dtype and kept in fp32: wide(round_to(x, dtype)) bit for bit,
// in one pass and without the 16-bit tensor between (the same conversions as `convert`). `d` may
// be `s` (a gradient rounded in place).
MIXPREC_INLINE void round_wide(const float* s, float* d, int64_t n, c10::ScalarType dtype) {
  if (dtype == at::kBFloat16) {
    for (int64_t i = 0; i < n; ++i) d[i] = float_of(uint32_t(bf16_nearest(s[i])) << 16);
    return;
  }
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm512_storeu_ps(d + i, _mm512_cvtph_ps(h));
  }
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) d[i] = static_cast<float>(c10::Half(s[i]));
}

// A dense fp32 tensor rounded to `dtype` into `out` (same strides), which may be `x` itself: a
// non-overlapping and dense tensor's elements fill numel() consecutive floats.
void round_wide_into(const at::Tensor& x, const at::Tensor& out, c10::ScalarType dtype) {
  const float* s = x.const_data_ptr<float>();
  float* d = out.mutable_data_ptr<float>();
  at::parallel_for(0, x.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    round_wide(s + begin, d + begin, end - begin, dtype);
  });
}

at::Tensor rounded_wide(const at::Tensor& x, c10::ScalarType dtype) {
  at::Tensor out = at::empty_like(x);  // x's strides, as round_to's copy keeps them
  round_wide_into(x, out, dtype);
  return out;
}

// A gradient computed in fp32 rounded to `dtype` and widened back, as autocast's cast backward
// widens the 16-bit gradient of a parameter's cast: in place where it is dense.
at::Tensor rounded_grad(at::Tensor g, c10::ScalarType dtype) {
  if (!g.is_non_overlapping_and_dense()) return wide(round_to(g, dtype));
  round_wide_into(g, g, dtype);
  return g;
}

// A parameter these nodes cast themselves: a plain fp32 CPU tensor, contiguous (or, for a
// convolution, channels-last). emulated_cpp.py's _fp32_params is the same test.
bool fp32_param(const at::Tensor& t, bool contiguous) {
  if (t.scalar_type() != at::kFloat || !t.device().is_cpu() || t.layout() != at::kStrided ||
      t.key_set().has_any(not_plain_keys())) {
    return false;
  }
  return t.is_contiguous() ||
         (!contiguous && (t.is_contiguous(at::MemoryFormat::ChannelsLast) ||
                          t.is_contiguous(at::MemoryFormat::ChannelsLast3d)));
}

// The weight also a leaf (a parameter or a constant): a weight computed in the forward (a
// parametrization, a merged adapter) would be kept alive in fp32 where autocast keeps a 16-bit
// copy of it.
bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

bool fp32_params(const at::Tensor& weight, const std::optional<at::Tensor>& bias, bool contiguous) {
  return weight.is_leaf() && fp32_param(weight, contiguous) &&
         (!has(bias) || fp32_param(*bias, contiguous));
}

// Whether linear16 takes (x, weight, bias): a 2-D input, a contiguous fp32 2-D weight, a
// contiguous fp32 bias or none.
bool linear_foldable(const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias) {
  return x.dim() == 2 && weight.dim() == 2 && fp32_params(weight, bias, true);
}

// linear(x, round(weight), round(bias)) on a 16-bit x and fp32 parameters, rounded once to
// x's dtype: autocast's casts of the parameters folded into the emulated GEMM. The values are
// gemm16's on the parameters cast to x's dtype (addmm, or mm, on the weight's transpose).
at::Tensor linear16(const at::Tensor& x, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(linear_foldable(x, weight, bias),
              "linear16: a 2-D input with a contiguous fp32 weight and bias");
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_keys());
  auto dtype = x.scalar_type();
  at::Tensor w = rounded_wide(weight, dtype).t();
  at::Tensor out = has(bias) ? at::addmm(rounded_wide(*bias, dtype), wide(x), w)
                             : at::mm(wide(x), w);
  return round_to(out, dtype);
}

// linear16 as one autograd node that saves the 16-bit input and the fp32 weight itself (no
// 16-bit copy of it). The gradients are gemm16_backward's on the cast parameters, laid out as
// it lays them out, the parameters' widened to fp32 as the cast's backward widens them. In a
// double backward (grad mode on) the casts and GEMMs record autograd, so a second-order
// gradient reaches the parameters through the cast.
struct Linear16Function : public torch::autograd::Function<Linear16Function> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
    // The weight only where the input's gradient needs it, as torch's linear saves it (so that
    // autograd's check of saved tensors, on the parameter itself here, is fp32's).
    ctx->save_for_backward({x, x.requires_grad() ? weight : at::Tensor()});
    ctx->saved_data["bias"] = has(bias);
    return linear16(x, weight, bias);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    bool want_x = ctx->needs_input_grad(0), want_w = ctx->needs_input_grad(1);
    bool want_bias = ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2);
    auto dtype = x.scalar_type();
    at::Tensor gx, gw, gb;
    if (at::GradMode::is_enabled()) {
      std::optional<at::Tensor> b16;  // only its size and dtype are read
      if (want_bias) b16 = at::empty({grads[0].size(1)}, x.options());
      at::Tensor w16 = want_x ? weight.to(dtype)  // else only its shape and layout are read
                              : at::empty({grads[0].size(1), x.size(1)}, x.options());
      auto found = gemm16_backward(grads[0], b16, x, w16.t(), 1.0, 1.0, want_bias, want_x, want_w);
      size_t i = 0;
      if (want_bias) gb = found[i++].to(at::kFloat);
      if (want_x) gx = found[i++];
      if (want_w) gw = found[i].t().to(at::kFloat);
      return {gx, gw, gb};
    }
    c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_keys());
    at::Tensor g = wide(grads[0]);
    if (want_bias) gb = rounded_grad(g.sum_to_size({g.size(1)}), dtype);
    if (want_x) {
      at::Tensor w = rounded_wide(weight, dtype);
      gx = round_to(column_major(x) ? at::matmul(w.t(), g.mT()).mT() : at::matmul(g, w), dtype);
    }
    if (want_w) gw = rounded_grad(at::matmul(g.mT(), wide(x)), dtype);
    return {gx, gw, gb};
  }
};

at::Tensor linear16_autograd(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias) {
  return Linear16Function::apply(x, weight, bias);
}

// conv16 (not transposed, no output padding: conv1d/2d/3d) on a 16-bit x and dense fp32
// parameters, which it rounds itself.
at::Tensor convolution16(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(fp32_params(weight, bias, false),
              "convolution16: a contiguous or channels-last fp32 weight and bias");
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_keys());
  auto dtype = x.scalar_type();
  std::optional<at::Tensor> b;
  if (has(bias)) b = rounded_wide(*bias, dtype);
  std::vector<int64_t> no_output_padding(stride.size(), 0);
  at::Tensor out = at::convolution(wide(x), rounded_wide(weight, dtype), b, stride, padding,
                                   dilation, false, no_output_padding, groups);
  return round_to(out, dtype);
}

// convolution16 as one autograd node, as Linear16Function: conv16_backward's gradients on the
// cast parameters, the parameters' widened to fp32.
struct Convolution16Function : public torch::autograd::Function<Convolution16Function> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups) {
    ctx->save_for_backward({x, weight});
    ctx->saved_data["bias"] = has(bias);
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    return convolution16(x, weight, bias, stride, padding, dilation, groups);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    auto& d = ctx->saved_data;
    bool want_x = ctx->needs_input_grad(0), want_w = ctx->needs_input_grad(1);
    bool want_bias = d["bias"].toBool() && ctx->needs_input_grad(2);
    auto dtype = x.scalar_type();
    std::vector<int64_t> stride = d["stride"].toIntVector(), padding = d["padding"].toIntVector();
    std::vector<int64_t> dilation = d["dilation"].toIntVector();
    std::vector<int64_t> no_output_padding(stride.size(), 0);
    std::vector<int64_t> bias_size{weight.size(0)};
    at::OptionalIntArrayRef bias_sizes;
    if (want_bias) bias_sizes = bias_size;
    int64_t groups = d["groups"].toInt();
    at::Tensor gx, gw, gb;
    if (at::GradMode::is_enabled()) {
      std::optional<c10::ScalarType> bias_dtype;
      if (want_bias) bias_dtype = dtype;
      auto found = conv16_backward(grads[0], x, weight.to(dtype), bias_sizes, stride, padding,
                                   dilation, false, no_output_padding, groups, want_x, want_w,
                                   want_bias, bias_dtype);
      size_t i = 0;
      if (want_x) gx = found[i++];
      if (want_w) gw = found[i++].to(at::kFloat);
      if (want_bias) gb = found[i].to(at::kFloat);
      return {gx, gw, gb, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_keys());
    auto [cx, cw, cb] = at::convolution_backward(
        wide(grads[0]), wide(x), rounded_wide(weight, dtype), bias_sizes, stride, padding,
        dilation, false, no_output_padding, groups, {want_x, want_w, want_bias});
    if (want_x) gx = round_to(cx, dtype);
    if (want_w) gw = rounded_grad(cw, dtype);
    if (want_bias) gb = rounded_grad(cb, dtype);
    return {gx, gw, gb, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor convolution16_autograd(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups) {
  return Convolution16Function::apply(x, weight, bias, stride, padding, dilation, groups);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec_emulate, m) {
  m.def("linear16(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear16_autograd(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "convolution16(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
      "int[] dilation, int groups) -> Tensor");
  m.def(
      "convolution16_autograd(Tensor x, Tensor weight, Tensor? bias, int[] stride, "
      "int[] padding, int[] dilation, int groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixprec_emulate, CompositeImplicitAutograd, m) {
  m.impl("linear16_autograd", &linear16_autograd);
  m.impl("convolution16_autograd", &convolution16_autograd);
}

TORCH_LIBRARY_IMPL(mixprec_emulate, CPU, m) {
  m.impl("linear16", &linear16);
  m.impl("convolution16", &convolution16);
}
