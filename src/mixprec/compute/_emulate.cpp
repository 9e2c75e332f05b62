// One-pass fake quantization of a GEMM operand (see mixprec/compute/emulate_build.py).
//
// out = round_to_format(clamp(x * scale, -max, max)) / scale, per element, in fp32, with the
// scale of the element's block: the values of dequantize(quantize_blocks(x, ...)) without the
// fp8 tensor, its bit-pattern decode or the widened copy of x in between. The rounding is to
// nearest, ties to even, onto a grid of `mbits` mantissa bits whose smallest normal exponent is
// `min_exp` (subnormals below it): the grid of torch's fp32 -> fp8 cast for every value that the
// clamp leaves (the cast's overflow handling never applies). -ffp-contract=off keeps x * scale and
// the division separate roundings, as torch's kernels do.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

#define MIXPREC_INLINE inline __attribute__((always_inline))

MIXPREC_INLINE uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

MIXPREC_INLINE float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

MIXPREC_INLINE float widen(float x) { return x; }
MIXPREC_INLINE float widen(c10::BFloat16 x) { return float_of(uint32_t(x.x) << 16); }
MIXPREC_INLINE float widen(c10::Half x) { return static_cast<float>(x); }

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

at::Tensor round_to(const at::Tensor& x, c10::ScalarType dtype) {
  return x.scalar_type() == dtype ? x : x.to(dtype);
}

bool column_major(const at::Tensor& t) {
  return t.dim() == 2 && t.stride(0) == 1 && t.stride(1) == t.size(0);
}

// addmm(bias, a, b, beta, alpha) in fp32 on 16-bit operands, one rounding; mm without a bias.
at::Tensor gemm16(const std::optional<at::Tensor>& bias, const at::Tensor& a, const at::Tensor& b,
                  double beta, double alpha) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_keys());
  at::Tensor wa = a.to(at::kFloat);
  at::Tensor wb = b.to(at::kFloat);
  at::Tensor out = bias.has_value()
                       ? at::addmm(bias->to(at::kFloat), wa, wb, beta, alpha)
                       : at::mm(wa, wb);
  return out.to(a.scalar_type());
}

// The gradients of gemm16 (emulated.py's _addmm_backward and _mm_backward on 2-D operands): the
// wanted ones, in the order bias, a, b.
std::vector<at::Tensor> gemm16_backward(const at::Tensor& grad,
                                        const std::optional<at::Tensor>& bias,
                                        const at::Tensor& a, const at::Tensor& b, double beta,
                                        double alpha, bool want_bias, bool want_a, bool want_b) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_keys());
  std::vector<at::Tensor> out;
  at::Tensor g = grad.to(at::kFloat);
  if (bias.has_value() && want_bias) {
    at::Tensor gb = beta == 1 ? g : g * beta;
    out.push_back(round_to(gb.sum_to_size(bias->sizes()), bias->scalar_type()));
  }
  if (alpha != 1) g = g * alpha;
  // Laid out as torch's fp32 backward (mm_mat1_backward, mm_mat2_backward) lays them out.
  if (want_a) {
    at::Tensor ga = column_major(a) ? at::matmul(b.to(at::kFloat), g.mT()).mT()
                                    : at::matmul(g, b.to(at::kFloat).mT());
    out.push_back(round_to(ga, a.scalar_type()));
  }
  if (want_b) {
    at::Tensor gb = column_major(b) ? at::matmul(g.mT(), a.to(at::kFloat)).mT()
                                    : at::matmul(a.to(at::kFloat).mT(), g);
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
  if (bias.has_value()) wide_bias = bias->to(at::kFloat);
  at::Tensor out = at::convolution(x.to(at::kFloat), weight.to(at::kFloat), wide_bias, stride,
                                   padding, dilation, transposed, output_padding, groups);
  return out.to(x.scalar_type());
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
      grad.to(at::kFloat), x.to(at::kFloat), weight.to(at::kFloat), bias_sizes, stride, padding,
      dilation, transposed, output_padding, groups, {want_x, want_weight, want_bias});
  std::vector<at::Tensor> out;
  if (want_x) out.push_back(round_to(gx, x.scalar_type()));
  if (want_weight) out.push_back(round_to(gw, weight.scalar_type()));
  if (want_bias) out.push_back(round_to(gb, *bias_dtype));
  return out;
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
  m.def(
      "conv16(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
      "bool transposed, int[] output_padding, int groups) -> Tensor");
  m.def(
      "conv16_backward(Tensor grad, Tensor x, Tensor weight, int[]? bias_sizes, int[] stride, "
      "int[] padding, int[] dilation, bool transposed, int[] output_padding, int groups, "
      "bool want_x, bool want_weight, bool want_bias, ScalarType? bias_dtype) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mixprec_emulate, CPU, m) {
  m.impl("fake_quantize", &fake_quantize);
  m.impl("fake_quantize_dynamic", &fake_quantize_dynamic);
  m.impl("gemm16", &gemm16);
  m.impl("gemm16_backward", &gemm16_backward);
  m.impl("conv16", &conv16);
  m.impl("conv16_backward", &conv16_backward);
}
