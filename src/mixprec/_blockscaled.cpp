// One-pass block-scaled fake quantization (see mixprec/blockscaled_build.py).
//
// Each block (a run of `bc` elements of a row, or a `br` x `bc` tile of a 2-D operand) is read
// twice from cache: once for its amax, once to scale, round and dequantize each element. Every
// step is the fp32 operation mixprec.blockscaled's torch path performs, in the same order (a
// division stays a division, x * multiplier stays a product), so the results are the same bits:
//
//   MX:    code  = clamp(exponent(amax) - emax_elem, 0, 255), 255 for a NaN amax
//          value = round(clamp(x / max(2**(code-127), 2**-126), +-max)) * decode(code)
//   NVFP4: s     = e4m3(clamp(amax / 6 / tensor_scale, 2**-6, 448))
//          value = round(clamp(x * ((1 / tensor_scale) / s), +-6)) * (tensor_scale * s)
//
// `round` is fp4 e2m1 (nearest: a rint over the grid's spacing, as _round_fp4_in_range) or
// e4m3 (nearest: torch's fp32 -> float8_e4m3fn cast, which on in-range values is rint on the
// grid), or stochastic (round_to_grid: floor on the grid plus one step where the caller's
// uniform draw is below the fraction). -ffp-contract=off keeps every product and quotient a
// separate rounding, as torch's kernels do.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>

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

// torch.clamp: NaN stays NaN (std::max(NaN, lo) and std::min(NaN, hi) return their first
// argument).
MIXPREC_INLINE float clamp(float x, float lo, float hi) {
  return std::min(std::max(x, lo), hi);
}

// An element format's grid: `mbits` mantissa bits, exponents in [min_exp, max_exp].
template <bool FP4>
struct Elem;
template <>
struct Elem<true> {  // fp4 e2m1
  static constexpr float max = 6.0f;
  static constexpr int mbits = 1, min_exp = 0, max_exp = 2;
};
template <>
struct Elem<false> {  // fp8 e4m3fn
  static constexpr float max = 448.0f;
  static constexpr int mbits = 3, min_exp = -6, max_exp = 8;
};

// Nearest e4m3 (ties to even, subnormals below 2**-6) of a value within +-448 or NaN: the
// quantum is 2**(exponent - 3), exact to scale by, so rint does the one rounding.
MIXPREC_INLINE float e4m3_nearest(float y) {
  int32_t e = int32_t((bits_of(y) >> 23) & 0xFFu);
  e = std::max(e, 127 - 6);
  const int32_t qe = std::min(e - 3, 253);  // NaN's exponent 255: any finite quantum will do
  const float quantum = float_of(uint32_t(qe) << 23);
  const float inv = float_of(uint32_t(254 - qe) << 23);
  return std::rint(y * inv) * quantum;
}

// torch's fp32 -> float8_e4m3fn -> fp32 round trip of a block scale: nearest on the grid, and a
// NaN comes back as the NaN its decode builds (exponent and mantissa all ones, the sign kept).
MIXPREC_INLINE float e4m3_scale(float s) {
  return std::isnan(s) ? float_of((bits_of(s) & 0x80000000u) | 0x7FF00000u) : e4m3_nearest(s);
}

// The element rounding of blockscaled._round_elements on a clamped value `y`.
template <bool FP4, bool STOCH>
MIXPREC_INLINE float round_elem(float y, float u) {
  if constexpr (!STOCH) {
    if constexpr (FP4) {  // _round_fp4_in_range
      const float a = std::fabs(y);
      const float spacing = a < 2.0f ? 0.5f : (a < 4.0f ? 1.0f : 2.0f);
      return std::copysign(std::rint(a / spacing) * spacing, y);
    } else {
      return e4m3_nearest(y);
    }
  } else {  // quantize.round_to_grid, rounding="stochastic", saturating
    using E = Elem<FP4>;
    const float mag = std::fabs(y);
    int32_t e = int32_t(bits_of(mag) >> 23) - 127;
    e = std::min(std::max(e, E::min_exp), E::max_exp);
    const float step = float_of(uint32_t(e - E::mbits + 127) << 23);
    const float q = mag / step;  // exact
    const float fl = std::floor(q);
    const float units = fl + (u < q - fl ? 1.0f : 0.0f);
    float rounded = units * step;
    rounded = rounded > E::max ? E::max : rounded;
    rounded = std::isnan(y) ? y : rounded;
    return std::copysign(rounded, y);
  }
}

// The largest |x| of a block as fp32 bits (NaN above inf: an integer max of the sign-cleared
// bits orders non-negative floats and vectorizes).
MIXPREC_INLINE uint32_t block_amax_bits(const float* p, int64_t br, int64_t bc, int64_t cols) {
  uint32_t m = 0;
  for (int64_t r = 0; r < br; ++r, p += cols)
    for (int64_t j = 0; j < bc; ++j) m = std::max(m, bits_of(p[j]) & 0x7FFFFFFFu);
  return m;
}

struct Blocks {
  const float* x;
  float* out;
  const float* uniform;  // null for nearest rounding
  int64_t rows, cols, br, bc;
};

// Visit every block in parallel: f(offset of its first element, amax bits).
template <typename F>
void for_blocks(const Blocks& b, F&& f) {
  const int64_t n_cols = b.cols / b.bc, blocks = (b.rows / b.br) * n_cols;
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / (b.br * b.bc));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t base = (k / n_cols) * b.br * b.cols + (k % n_cols) * b.bc;
      f(base, block_amax_bits(b.x + base, b.br, b.bc, b.cols));
    }
  });
}

// out = round(clamp(x op factor, +-max)) * decode over one block; op is / (MX) or * (NVFP4).
template <bool FP4, bool STOCH, bool DIVIDE>
MIXPREC_INLINE void fake_block(const Blocks& b, int64_t base, float factor, float decode) {
  constexpr float fmax = Elem<FP4>::max;
  for (int64_t r = 0; r < b.br; ++r) {
    const int64_t row = base + r * b.cols;
    const float* in = b.x + row;
    float* o = b.out + row;
    const float* u = STOCH ? b.uniform + row : nullptr;
    for (int64_t j = 0; j < b.bc; ++j) {
      const float y = clamp(DIVIDE ? in[j] / factor : in[j] * factor, -fmax, fmax);
      o[j] = round_elem<FP4, STOCH>(y, STOCH ? u[j] : 0.0f) * decode;
    }
  }
}

template <bool FP4, bool STOCH>
void run_mx(const Blocks& b) {
  constexpr int emax = Elem<FP4>::max_exp;
  for_blocks(b, [&](int64_t base, uint32_t amax) {
    const int32_t code =
        amax > 0x7F800000u ? 255 : std::min(std::max(int32_t(amax >> 23) - emax, 0), 255);
    const float power = float_of(uint32_t(code) << 23);  // code 255: inf
    const float encode = std::max(power, 0x1p-126f);  // torchao clamps to the smallest normal
    // A NaN block is all NaN. Which NaN (sign, payload) torch returns where two meet depends on
    // its vector width and the tensor's size; the kernel writes the scale's, as torch mostly does.
    if (code == 255) {
      for (int64_t r = 0; r < b.br; ++r) std::fill_n(b.out + base + r * b.cols, b.bc, NAN);
      return;
    }
    fake_block<FP4, STOCH, true>(b, base, encode, code == 0 ? 0x1p-127f : power);
  });
}

template <bool STOCH>
void run_nvfp4(const Blocks& b, float tensor_scale) {
  const float inv = 1.0f / tensor_scale;
  for_blocks(b, [&](int64_t base, uint32_t amax) {
    float s = float_of(amax) / 6.0f / tensor_scale;
    s = e4m3_scale(clamp(s, 0x1p-6f, 448.0f));
    const float decode = tensor_scale * s;
    if (std::isnan(decode)) {  // a NaN block, as in MX
      for (int64_t r = 0; r < b.br; ++r) std::fill_n(b.out + base + r * b.cols, b.bc, decode);
      return;
    }
    fake_block<true, STOCH, false>(b, base, inv / s, decode);
  });
}

at::Tensor check(const at::Tensor& x, int64_t br, int64_t bc,
                 const std::optional<at::Tensor>& uniform) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "blockscaled: a contiguous 2-D fp32 tensor");
  TORCH_CHECK(br >= 1 && bc >= 1 && x.size(0) % br == 0 && x.size(1) % bc == 0,
              "blockscaled: blocks must tile the tensor");
  if (uniform.has_value()) {
    TORCH_CHECK(uniform->is_contiguous() && uniform->scalar_type() == at::kFloat &&
                    uniform->numel() == x.numel(),
                "blockscaled: one contiguous fp32 draw per element");
  }
  return at::empty(x.sizes(), x.options());
}

Blocks blocks_of(const at::Tensor& x, at::Tensor& out, const std::optional<at::Tensor>& uniform,
                 int64_t br, int64_t bc) {
  return Blocks{x.data_ptr<float>(), out.data_ptr<float>(),
                uniform.has_value() ? uniform->data_ptr<float>() : nullptr,
                x.size(0), x.size(1), br, bc};
}

at::Tensor mx(const at::Tensor& x, int64_t br, int64_t bc, bool fp4,
              const std::optional<at::Tensor>& uniform) {
  at::Tensor out = check(x, br, bc, uniform);
  const Blocks b = blocks_of(x, out, uniform, br, bc);
  const bool stoch = uniform.has_value();
  if (fp4) {
    stoch ? run_mx<true, true>(b) : run_mx<true, false>(b);
  } else {
    stoch ? run_mx<false, true>(b) : run_mx<false, false>(b);
  }
  return out;
}

// nvfp4_tensor_scale(x.abs().amax()): amax / 2688 floored at 2**-121 (NaN stays NaN).
float default_tensor_scale(const at::Tensor& x) {
  const float* p = x.data_ptr<float>();
  const uint32_t m = at::parallel_reduce(
      int64_t(0), x.numel(), int64_t(1) << 16, uint32_t(0),
      [&](int64_t begin, int64_t end, uint32_t acc) {
        for (int64_t i = begin; i < end; ++i) acc = std::max(acc, bits_of(p[i]) & 0x7FFFFFFFu);
        return acc;
      },
      [](uint32_t a, uint32_t c) { return std::max(a, c); });
  const float scale = float_of(m) / 2688.0f;
  return std::max(scale, 0x1p-121f);  // std::max(NaN, lo) is NaN, as torch.clamp
}

at::Tensor nvfp4(const at::Tensor& x, const std::optional<at::Tensor>& tensor_scale, int64_t br,
                 int64_t bc, const std::optional<at::Tensor>& uniform) {
  at::Tensor out = check(x, br, bc, uniform);
  float scale;
  if (tensor_scale.has_value()) {
    TORCH_CHECK(tensor_scale->numel() == 1 && tensor_scale->scalar_type() == at::kFloat,
                "blockscaled: one fp32 tensor scale");
    scale = tensor_scale->item<float>();
  } else {
    scale = x.numel() ? default_tensor_scale(x) : 1.0f;
  }
  const Blocks b = blocks_of(x, out, uniform, br, bc);
  uniform.has_value() ? run_nvfp4<true>(b, scale) : run_nvfp4<false>(b, scale);
  return out;
}

at::Tensor mx_meta(const at::Tensor& x, int64_t, int64_t, bool,
                   const std::optional<at::Tensor>&) {
  return at::empty_like(x);
}

at::Tensor nvfp4_meta(const at::Tensor& x, const std::optional<at::Tensor>&, int64_t, int64_t,
                      const std::optional<at::Tensor>&) {
  return at::empty_like(x);
}

}  // namespace

TORCH_LIBRARY(mixprec_blockscaled, m) {
  m.def("mx(Tensor x, int br, int bc, bool fp4, Tensor? uniform) -> Tensor");
  m.def("nvfp4(Tensor x, Tensor? tensor_scale, int br, int bc, Tensor? uniform) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixprec_blockscaled, CPU, m) {
  m.impl("mx", &mx);
  m.impl("nvfp4", &nvfp4);
}

TORCH_LIBRARY_IMPL(mixprec_blockscaled, Meta, m) {
  m.impl("mx", &mx_meta);
  m.impl("nvfp4", &nvfp4_meta);
}
