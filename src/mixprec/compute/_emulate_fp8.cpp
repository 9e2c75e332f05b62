// Appended to _emulate.cpp (one library, torch.ops.mixprec_emulate): its FP8 layer node calls
// that file's fake_quantize_dynamic.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <vector>

namespace {

// A dynamically scaled emulated FP8 linear layer as one C++ autograd node: the forward of
// mixprec/compute/fp8_linear.py's _fp8_linear, and its backward's two gradient GEMMs and bias
// gradient, the same ATen ops in the same order (so the same bits), without Python either way.
// Each of the six operands (the forward's input and weight, the input gradient's output gradient
// and weight, the weight gradient's output gradient and input) is fake-quantized by
// fake_quantize_dynamic with the plan Python worked out for it: seven numbers (br, bc, fmax,
// mbits, min_exp, rule, max_exp), six plans one after the other.
at::Tensor fp8_operand(const at::Tensor& t, const std::vector<double>& plans, int k) {
  const double* p = plans.data() + 7 * k;
  return fake_quantize_dynamic(t.contiguous(), int64_t(p[0]), int64_t(p[1]), p[2], int64_t(p[3]),
                               int64_t(p[4]), int64_t(p[5]), int64_t(p[6]));
}

at::Tensor fp8_linear_forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                              const at::Tensor& weight, const at::Tensor* bias,
                              const std::vector<double>& plans, at::ScalarType out_dtype) {
  TORCH_CHECK(plans.size() == 42, "fp8_linear_autograd: six plans of seven numbers");
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_keys());
  ctx->save_for_backward({x, weight});
  ctx->saved_data["plans"] = plans;
  ctx->saved_data["out_dtype"] = static_cast<int64_t>(out_dtype);
  if (bias != nullptr) ctx->saved_data["bias_dtype"] = static_cast<int64_t>(bias->scalar_type());
  at::Tensor out = at::mm(fp8_operand(x, plans, 0), fp8_operand(weight, plans, 1).t());
  if (bias != nullptr) out.add_(bias->to(at::kFloat));
  return out.to(out_dtype);
}

// The gradients of x, weight and (with a bias) the bias, undefined where not wanted.
std::vector<at::Tensor> fp8_linear_backward(torch::autograd::AutogradContext* ctx,
                                            const at::Tensor& grad, bool want_bias) {
  if (at::GradMode::is_enabled()) {  // create_graph=True, as the op's Python backward warns
    TORCH_WARN(
        "mixprec fp8_linear: its gradient GEMMs have no autograd, so a double backward "
        "(create_graph=True) gets no second-order term through an FP8 layer; keep the layers "
        "a gradient penalty differentiates out of FP8 (a policy rule, or compute=bf16)");
  }
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_keys());
  auto saved = ctx->get_saved_variables();
  const at::Tensor &x = saved[0], &weight = saved[1];
  const std::vector<double> plans = ctx->saved_data["plans"].toDoubleVector();
  const auto out_dtype = static_cast<at::ScalarType>(ctx->saved_data["out_dtype"].toInt());
  at::Tensor gx, gw, gb;
  if (ctx->needs_input_grad(0)) {
    gx = at::mm(fp8_operand(grad, plans, 2), fp8_operand(weight, plans, 3))
             .to(out_dtype)
             .to(x.scalar_type());
  }
  if (ctx->needs_input_grad(1)) {
    gw = at::mm(fp8_operand(grad, plans, 4).t(), fp8_operand(x, plans, 5))
             .to(out_dtype)
             .to(weight.scalar_type());
  }
  if (want_bias && ctx->needs_input_grad(2)) {
    const auto bias_dtype = static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt());
    gb = grad.sum_to_size({grad.size(1)}).to(bias_dtype);
  }
  return {gx, gw, gb};
}

struct Fp8LinearBiasFunction : public torch::autograd::Function<Fp8LinearBiasFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, const at::Tensor& bias,
                            std::vector<double> plans, int64_t out_dtype) {
    return fp8_linear_forward(ctx, x, weight, &bias, plans,
                              static_cast<at::ScalarType>(out_dtype));
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto g = fp8_linear_backward(ctx, grads[0], true);
    return {g[0], g[1], g[2], at::Tensor(), at::Tensor()};
  }
};

struct Fp8LinearFunction : public torch::autograd::Function<Fp8LinearFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, std::vector<double> plans,
                            int64_t out_dtype) {
    return fp8_linear_forward(ctx, x, weight, nullptr, plans,
                              static_cast<at::ScalarType>(out_dtype));
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto g = fp8_linear_backward(ctx, grads[0], false);
    return {g[0], g[1], at::Tensor(), at::Tensor()};
  }
};

at::Tensor fp8_linear_autograd(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::ArrayRef<double> plans,
                               at::ScalarType out_dtype) {
  std::vector<double> p(plans.begin(), plans.end());
  const auto dtype = static_cast<int64_t>(out_dtype);
  if (bias.has_value()) return Fp8LinearBiasFunction::apply(x, weight, *bias, p, dtype);
  return Fp8LinearFunction::apply(x, weight, p, dtype);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec_emulate, m) {
  m.def(
      "fp8_linear_autograd(Tensor x, Tensor weight, Tensor? bias, float[] plans, "
      "ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixprec_emulate, CompositeImplicitAutograd, m) {
  m.impl("fp8_linear_autograd", &fp8_linear_autograd);
}
