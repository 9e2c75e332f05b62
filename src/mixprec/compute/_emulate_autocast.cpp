// Appended to _emulate.cpp (one library, torch.ops.mixprec_emulate): its autocast kernels call
// that file's emulated GEMMs and conversions.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <memory>
#include <string>

namespace {

// mixprec's autocast kernels for linear and conv1d/2d/3d on the CPU, in C++ (kernels.py's
// _linear_shortcut and _conv_shortcut): inside an emulated region, on plain eager tensors, the
// casts of autocast and the emulated GEMM's autograd node, with no Python on the way. The Python
// kernel decides everything else: the region pushes, per thread, which of these ops may take the
// shortcut (set_fast_autocast); anywhere else (a plain torch.autocast region, a dispatch or
// function mode, a functorch transform, a tensor subclass, a recomputation inside backward, an
// operand the shortcut does not take) the call goes to the Python kernel, registered for the
// op's twin mixprec_emulate::autocast_<op> at the same key and reached by redispatch, which
// handles it as before.
enum FastOp : int64_t { kLinear = 1, kConv1d = 2, kConv2d = 4, kConv3d = 8 };

thread_local int64_t fast_ops = 0;

void set_fast_autocast(int64_t ops) { fast_ops = ops; }

// Whether nobody can observe the shortcut (_eager.plain_eager) and the region lets `op` take it.
bool fast_region(FastOp op) {
  if (!(fast_ops & op) || at::autocast::is_autocast_cache_enabled()) return false;
  if (c10::impl::TorchDispatchModeTLS::any_modes_set() || at::impl::torch_function_mode_enabled()) {
    return false;
  }
  return !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

// kernels.py's _lowered: a plain strided CPU fp32/bf16/fp16 tensor. The input is cast by round_to
// (torch's own cast where autograd records it); fp32 parameters are cast inside the layer's node
// (_emulate_fold.cpp), others by round_to.
bool lowerable(const at::Tensor& t) {
  if (!t.defined() || t.layout() != at::kStrided || !t.device().is_cpu()) return false;
  if (t.key_set().has_any(not_plain_keys())) return false;
  auto dtype = t.scalar_type();
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

bool records_grad(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& c) {
  if (!at::GradMode::is_enabled()) return false;
  return a.requires_grad() || b.requires_grad() || (c.has_value() && c->requires_grad());
}

// The region's 16-bit dtype, or Undefined where the shortcut does not apply.
c10::ScalarType region_dtype() {
  auto dtype = at::autocast::get_autocast_dtype(at::kCPU);
  return dtype == at::kBFloat16 || dtype == at::kHalf ? dtype : c10::ScalarType::Undefined;
}

at::Tensor linear_autocast(c10::DispatchKeySet ks, const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias) {
  auto dtype = region_dtype();
  bool has_bias = bias.has_value() && bias->defined();
  // fp32 parameters are cast inside the GEMM's node (linear16). A contiguous 3-D input is taken
  // only then, as torch's linear takes it (_flatten_nd_linear; matmul's folding without a
  // bias): one GEMM on its 2-D view, the output viewed back; else the Python kernel.
  bool fold = weight.dim() == 2 && fp32_params(weight, bias, true);
  bool flat = fold && x.dim() == 3 && x.is_contiguous();
  if (dtype != c10::ScalarType::Undefined && fast_region(kLinear) && lowerable(x) &&
      lowerable(weight) && (x.dim() == 2 || flat) && weight.dim() == 2 &&
      (!has_bias || lowerable(*bias))) {
    at::Tensor a = round_to(x, dtype);
    if (flat) a = a.view({-1, a.size(2)});
    if (fold) {
      at::Tensor out = records_grad(a, weight, bias) ? linear16_autograd(a, weight, bias)
                                                     : linear16(a, weight, bias);
      return flat ? out.view({x.size(0), x.size(1), out.size(1)}) : out;
    }
    at::Tensor w = round_to(weight, dtype).t();
    std::optional<at::Tensor> b;
    if (has_bias) b = round_to(*bias, dtype);
    if (records_grad(a, w, b)) return gemm16_autograd(b, a, w, 1.0, 1.0);
    return gemm16(b, a, w, 1.0, 1.0);
  }
  static auto fallback = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mixprec_emulate::autocast_linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&)>();
  return fallback.redispatch(ks, x, weight, bias);
}

using ConvSignature = at::Tensor(const at::Tensor&, const at::Tensor&,
                                 const std::optional<at::Tensor>&, c10::SymIntArrayRef,
                                 c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymInt);

template <FastOp Op, int64_t Spatial>
at::Tensor conv_autocast(c10::DispatchKeySet ks, const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, c10::SymIntArrayRef stride,
                         c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation,
                         c10::SymInt groups) {
  auto dtype = region_dtype();
  bool has_bias = bias.has_value() && bias->defined();
  auto concrete = [](c10::SymIntArrayRef v) {
    return static_cast<int64_t>(v.size()) == Spatial &&
           std::all_of(v.begin(), v.end(), [](const c10::SymInt& i) { return !i.is_symbolic(); });
  };
  if (dtype != c10::ScalarType::Undefined && fast_region(Op) && lowerable(x) &&
      lowerable(weight) && x.dim() == Spatial + 2 && weight.dim() == Spatial + 2 &&
      (!has_bias || lowerable(*bias)) && concrete(stride) && concrete(padding) &&
      concrete(dilation) && !groups.is_symbolic()) {
    at::Tensor a = round_to(x, dtype);
    auto s = C10_AS_INTARRAYREF_SLOW(stride);
    auto p = C10_AS_INTARRAYREF_SLOW(padding);
    auto d = C10_AS_INTARRAYREF_SLOW(dilation);
    int64_t g = groups.expect_int();
    if (fp32_params(weight, bias, false)) {  // cast inside the convolution's node
      if (records_grad(a, weight, bias)) return convolution16_autograd(a, weight, bias, s, p, d, g);
      return convolution16(a, weight, bias, s, p, d, g);
    }
    at::Tensor w = round_to(weight, dtype);
    std::optional<at::Tensor> b;
    if (has_bias) b = round_to(*bias, dtype);
    std::vector<int64_t> no_output_padding(Spatial, 0);
    if (records_grad(a, w, b)) {
      return conv16_autograd(a, w, b, s, p, d, false, no_output_padding, g);
    }
    return conv16(a, w, b, s, p, d, false, no_output_padding, g);
  }
  static const char* names[] = {"", "mixprec_emulate::autocast_conv1d",
                                "mixprec_emulate::autocast_conv2d",
                                "mixprec_emulate::autocast_conv3d"};
  static auto fallback =
      c10::Dispatcher::singleton().findSchemaOrThrow(names[Spatial], "").typed<ConvSignature>();
  return fallback.redispatch(ks, x, weight, bias, stride, padding, dilation, groups);
}

// Install the C++ kernel of `name` ("linear", "conv1d", "conv2d", "conv3d") at AutocastCPU, in
// front of the Python kernel that kernels.py registered for its twin. Registrations live as long
// as the process.
void install_autocast(const std::string& name) {
  static std::vector<std::unique_ptr<torch::Library>> libraries;
  auto library = std::make_unique<torch::Library>(
      torch::Library::IMPL, "aten", c10::DispatchKey::AutocastCPU, __FILE__, __LINE__);
  if (name == "linear") {
    library->impl("linear", TORCH_FN(linear_autocast));
  } else if (name == "conv1d") {
    library->impl("conv1d", TORCH_FN((conv_autocast<kConv1d, 1>)));
  } else if (name == "conv2d") {
    library->impl("conv2d", TORCH_FN((conv_autocast<kConv2d, 2>)));
  } else if (name == "conv3d") {
    library->impl("conv3d", TORCH_FN((conv_autocast<kConv3d, 3>)));
  } else {
    TORCH_CHECK(false, "install_autocast: no C++ autocast kernel for ", name,
                "; valid names: linear, conv1d, conv2d, conv3d");
  }
  libraries.push_back(std::move(library));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec_emulate, m) {
  m.def("set_fast_autocast(int ops) -> ()", &set_fast_autocast);
  m.def("install_autocast(str name) -> ()", &install_autocast);
  m.def("autocast_linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor");
  for (const char* n : {"1", "2", "3"}) {
    std::string schema = std::string("autocast_conv") + n +
                         "d(Tensor input, Tensor weight, Tensor? bias=None, SymInt[" + n +
                         "] stride=1, SymInt[" + n + "] padding=0, SymInt[" + n +
                         "] dilation=1, SymInt groups=1) -> Tensor";
    m.def(schema.c_str());
  }
}
