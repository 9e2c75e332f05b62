// One-pass optimizer updates of 16-bit parameters (see mixprec/optim/fused.py for the design).
//
// Every element is independent: its update reads the 16-bit weight (or fp32 master), the 16-bit
// gradient and the fp32 optimizer states once, and writes them once. The arithmetic is torch's,
// operation by operation, in the order of torch's CPU kernels (their vectorized loops use fused
// multiply-adds where written below as std::fma, and separate roundings elsewhere); the file is
// compiled with -ffp-contract=off so that the compiler adds no contraction of its own.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

#include "_bits.h"

constexpr int64_t kGrain = 1 << 14;
constexpr int64_t kBlock = 1 << 14;  // 64 KiB of fp32: stays in L2 between two loops
constexpr uint32_t kGolden = 0x9E3779B9u;
constexpr uint32_t kMul1 = 0x7FEB352Du;
constexpr uint32_t kMul2 = 0x846CA68Bu;

enum Mode : int64_t { kMaster = 0, kStochastic = 1, kKahan = 2 };


// Branch-free choices (bit masks, _bits.h's pick), so that loops over them vectorize.
MIXPREC_INLINE float pickf(bool condition, float a, float b) {
  return float_of(pick(condition, bits_of(a), bits_of(b)));
}

// The keyed lowbias32 hash of mixprec.stochastic.random_bits, for word `index`.
MIXPREC_INLINE uint32_t hash_word(uint32_t index, uint32_t k1, uint32_t k2) {
  uint32_t h = index * kGolden + k1;
  h ^= h >> 16;
  h *= kMul1;
  h ^= k2;
  h ^= h >> 15;
  h *= kMul2;
  h ^= h >> 16;
  return h;
}

// Where a run of elements starts in a stochastic-rounding stream, in 32-bit parts: the hashes
// take their index modulo 2**32, and 32-bit index arithmetic vectorizes at twice the width.
struct Stream {
  uint32_t word0;     // (offset >> 1): the bf16 word of the first element
  uint32_t parity;    // offset & 1: which half of it
  uint32_t element0;  // offset modulo 2**32
  static Stream at(uint64_t offset) {
    return {static_cast<uint32_t>(offset >> 1), static_cast<uint32_t>(offset & 1u),
            static_cast<uint32_t>(offset)};
  }
};

struct BF16 {
  static MIXPREC_INLINE float widen(uint16_t v) { return float_of(static_cast<uint32_t>(v) << 16); }
  static MIXPREC_INLINE uint16_t nearest(float x) { return bf16_nearest(x); }
  // mixprec.stochastic (bf16): element e takes half e & 1 of word e >> 1,
  // shifted to [0, 2**16), added to the fp32 pattern; the low half is then cut.
  static MIXPREC_INLINE uint16_t stochastic(float x, Stream at, uint32_t i, uint32_t k1,
                                            uint32_t k2) {
    uint32_t j = at.parity + i;
    uint32_t word = hash_word(at.word0 + (j >> 1), k1, k2);
    uint32_t half = (word >> ((j & 1u) * 16u)) & 0xFFFFu;
    uint32_t u = bits_of(x) + (half ^ 0x8000u);
    return static_cast<uint16_t>(pick(x != x, 0x7FC0u, u >> 16));
  }
};

struct FP16 {
  static MIXPREC_INLINE float widen(uint16_t v) {
    uint32_t sign = static_cast<uint32_t>(v & 0x8000u) << 16;
    uint32_t em = v & 0x7FFFu;
    uint32_t normal = (em << 13) + 0x38000000u;
    uint32_t special = normal + 0x38000000u;  // exponent 31 -> 255: inf and NaN
    float subnormal = float_of((em << 13) + 0x38800000u) - 6.103515625e-05f;  // exact
    uint32_t magnitude = pick(em >= 0x7C00u, special, pick(em < 0x400u, bits_of(subnormal), normal));
    return float_of(magnitude | sign);
  }
  // Round to nearest even: overflow to inf, subnormals on the 2**-24 grid, NaN to quiet NaN.
  static MIXPREC_INLINE uint16_t nearest(float x) {
    uint32_t u = bits_of(x);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7FFFFFFFu;
    // Below 2**-14: adding 0.5 (ulp 2**-24) leaves the rounded subnormal in the low bits.
    uint32_t subnormal = bits_of(float_of(a) + 0.5f) - 0x3F000000u;
    uint32_t normal = (a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13;  // rebias 127 -> 15, round
    uint32_t h = pick(a < 0x38800000u, subnormal, normal);
    h = pick(a >= 0x477FF000u, 0x7C00u, h);  // 65520 and above (inf too) round to inf
    h = pick(a > 0x7F800000u, 0x7E00u, h);
    return static_cast<uint16_t>(h | sign);
  }
  // mixprec.quantize.round_to_grid(x, fp16, "stochastic", uniform=u) with the uniform of
  // mixprec.stochastic (other formats), u = U / 2**24 with U the top 24 bits of
  // word `element`, bit for bit. round_to_grid rounds up when u is below the fraction of an ulp
  // cut off. In the normal range that fraction is R / 2**13, R the 13 mantissa bits fp16 drops,
  // so it rounds up when (U >> 11) < R: integer work on the bit pattern, the carry moving into
  // the exponent by itself, up to inf. Below 2**-14 (the 2**-24 grid of subnormals) it is
  // round_to_grid's own exact fp32 arithmetic: units and fraction of |x| * 2**24.
  static MIXPREC_INLINE uint16_t stochastic(float x, Stream at, uint32_t i, uint32_t k1,
                                            uint32_t k2) {
    uint32_t word = hash_word(at.element0 + i, k1, k2);
    uint32_t u24 = (word >> 8) & 0xFFFFFFu;
    uint32_t bits = bits_of(x);
    uint32_t sign = (bits >> 16) & 0x8000u;
    uint32_t a = bits & 0x7FFFFFFFu;
    uint32_t up = static_cast<uint32_t>((u24 >> 11) < (a & 0x1FFFu));
    uint32_t normal = ((a - 0x38000000u) >> 13) + up;  // rebias 127 -> 15, then round
    float scaled = float_of(a) * 16777216.0f;           // |x| / 2**-24, exact
    float units = std::floor(scaled);
    float uniform = static_cast<float>(static_cast<int32_t>(u24)) * 5.9604644775390625e-08f;
    uint32_t subnormal = static_cast<uint32_t>(static_cast<int32_t>(units)) +
                         static_cast<uint32_t>(uniform < scaled - units);
    // 2**16 and above (inf too) and what rounds up to it overflow to inf.
    uint32_t h = pick(a < 0x38800000u, subnormal, std::min(normal, 0x7C00u));
    h = pick(a > 0x7F800000u, 0x7E00u, h);
    return static_cast<uint16_t>(h | sign);
  }
};

// Where an element's weight comes from and where its update goes. The loops below take it (and
// their scalars) by value and say `ivdep`: the tensors of one update never overlap, and the
// compiler, told so, vectorizes every mode.
template <typename F, int64_t MODE>
struct Weight {
  using Format = F;
  static constexpr int64_t kMode = MODE;
  uint16_t* param;
  float* master;
  uint16_t* comp;
  uint32_t k1, k2;
  Stream offset;

  MIXPREC_INLINE float load(int64_t i) const {
    if (MODE == kMaster) return master[i];
    if (MODE == kKahan) return F::widen(param[i]) + F::widen(comp[i]);
    return F::widen(param[i]);
  }
  MIXPREC_INLINE void store(int64_t i, float w) const {
    if (MODE == kMaster) {
      master[i] = w;
      param[i] = F::nearest(w);
    } else if (MODE == kKahan) {
      uint16_t rounded = F::nearest(w);
      param[i] = rounded;
      comp[i] = F::nearest(w - F::widen(rounded));  // w - rounded is exact in fp32
    } else {
      param[i] = F::stochastic(w, offset, static_cast<uint32_t>(i), k1, k2);
    }
  }
};

struct AdamScalars {
  float inv_scale, decay, weight_decay, lerp_weight, beta2, one_minus_beta2, bc2_sqrt, eps,
      neg_step_size;
  int64_t weight_decay_mode;  // 0: none, 1: decoupled (AdamW), 2: added to the gradient (Adam)
};

// Adam in two loops over a block that stays in cache, around torch's own sqrt: torch's CPU
// sqrt (a vector math library's) is not correctly rounded for about a fifth of its inputs, so
// std::sqrt would change the last bits; at::sqrt_out gives the reference path's.
template <typename F, int64_t MODE, int64_t WD>
void adam_moments(const Weight<F, MODE> wt, const uint16_t* grad, float* exp_avg,
                  float* exp_avg_sq, const AdamScalars s, int64_t begin, int64_t end,
                  int64_t base = 0) {
  // The states of element i are at i - base: the state tensors themselves (base 0), or a
  // group's decoded states (the group's first element).
  exp_avg -= base;
  exp_avg_sq -= base;
  const bool small = s.lerp_weight < 0.5f;
  const float coeff = small ? s.lerp_weight : s.lerp_weight - 1.0f;
#pragma GCC ivdep
  for (int64_t i = begin; i < end; ++i) {
    float w = wt.load(i);
    float g = F::widen(grad[i]) * s.inv_scale;
    if (WD == 2) g = std::fma(w, s.weight_decay, g);   // grad.add(param, alpha=weight_decay)
    float m = exp_avg[i];
    m = std::fma(coeff, g - m, pickf(small, m, g));    // exp_avg.lerp_(grad, 1 - beta1)
    float v = exp_avg_sq[i] * s.beta2;                 // exp_avg_sq.mul_(beta2)
    v = std::fma(s.one_minus_beta2 * g, g, v);         // .addcmul_(grad, grad, 1 - beta2)
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
  }
}

template <typename F, int64_t MODE, int64_t WD>
void adam_apply(const Weight<F, MODE> wt, const float* exp_avg, const float* root,
                const AdamScalars s, int64_t begin, int64_t end, int64_t base = 0) {
  exp_avg -= base;
#pragma GCC ivdep
  for (int64_t i = begin; i < end; ++i) {
    float w = wt.load(i);
    if (WD == 1) w = w * s.decay;                              // param.mul_(1 - lr * wd)
    float denom = root[i - begin] / s.bc2_sqrt + s.eps;        // (sqrt(v) / bc2_sqrt).add_(eps)
    w = w + s.neg_step_size * exp_avg[i] / denom;              // param.addcdiv_(m, denom, -lr')
    wt.store(i, w);
  }
}

template <typename F, int64_t MODE, int64_t WD>
void adam_range(const Weight<F, MODE> wt, const uint16_t* grad, const at::Tensor& exp_avg_sq,
                float* m, float* v, const AdamScalars s, int64_t begin, int64_t end) {
  at::Tensor root = at::empty({std::min(kBlock, end - begin)}, exp_avg_sq.options());
  at::Tensor flat = exp_avg_sq.view(-1);
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t e = std::min(end, b + kBlock);
    adam_moments<F, MODE, WD>(wt, grad, m, v, s, b, e);
    at::Tensor out = root.narrow(0, 0, e - b);
    at::sqrt_out(out, flat.narrow(0, b, e - b));
    adam_apply<F, MODE, WD>(wt, m, out.data_ptr<float>(), s, b, e);
  }
}

struct SgdScalars {
  float inv_scale, weight_decay, momentum, one_minus_dampening, neg_lr;
  bool nesterov;
};

// MOMENTUM: 0 none, 1 the first step (the buffer starts as the gradient), 2 later steps.
// Templated so that each loop is branch-free and vectorizes.
template <typename F, int64_t MODE, int64_t MOMENTUM, bool WD>
void sgd_loop(const Weight<F, MODE> wt, const uint16_t* grad, float* buf, const SgdScalars s,
              int64_t begin, int64_t end, int64_t base = 0) {
  if (buf != nullptr) buf -= base;  // as adam_moments: element i's buffer at i - base
#pragma GCC ivdep
  for (int64_t i = begin; i < end; ++i) {
    float w = wt.load(i);
    float g = F::widen(grad[i]) * s.inv_scale;
    if (WD) g = std::fma(w, s.weight_decay, g);  // grad.add(param, alpha=weight_decay)
    if (MOMENTUM != 0) {
      float b = g;  // first step: buf = grad.clone()
      if (MOMENTUM == 2) {
        b = buf[i] * s.momentum;                     // buf.mul_(momentum)
        b = std::fma(g, s.one_minus_dampening, b);   // .add_(grad, alpha=1 - dampening)
      }
      buf[i] = b;
      float ahead = std::fma(b, s.momentum, g);      // grad.add(buf, alpha=momentum)
      g = pickf(s.nesterov, ahead, b);
    }
    w = std::fma(g, s.neg_lr, w);  // param.add_(grad, alpha=-lr)
    wt.store(i, w);
  }
}

template <typename F, int64_t MODE, int64_t MOMENTUM>
void sgd_range(const Weight<F, MODE>& wt, const uint16_t* grad, float* buf, const SgdScalars& s,
               bool weight_decay, int64_t begin, int64_t end) {
  if (weight_decay) {
    sgd_loop<F, MODE, MOMENTUM, true>(wt, grad, buf, s, begin, end);
  } else {
    sgd_loop<F, MODE, MOMENTUM, false>(wt, grad, buf, s, begin, end);
  }
}

void check16(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype &&
                  t.numel() == numel,
              name, " must be a contiguous CPU tensor of dtype ", dtype, " and ", numel,
              " elements, got ", t.scalar_type(), " ", t.sizes());
}

template <typename Body>
void dispatch(const at::Tensor& param, const at::Tensor& grad,
              const std::optional<at::Tensor>& master, const std::optional<at::Tensor>& comp,
              int64_t mode, int64_t k1, int64_t k2, int64_t offset, Body body) {
  const auto dtype = param.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf,
              "param must be bfloat16 or float16, got ", dtype);
  TORCH_CHECK(mode >= 0 && mode <= 2, "mode must be 0, 1 or 2, got ", mode);
  const int64_t n = param.numel();
  check16(param, "param", dtype, n);
  check16(grad, "grad", dtype, n);
  float* master_ptr = nullptr;
  uint16_t* comp_ptr = nullptr;
  if (mode == kMaster) {
    TORCH_CHECK(master.has_value(), "mode 0 needs the fp32 master");
    check16(*master, "master", at::kFloat, n);
    master_ptr = master->data_ptr<float>();
  }
  if (mode == kKahan) {
    TORCH_CHECK(comp.has_value(), "mode 2 needs the compensation buffer");
    check16(*comp, "compensation", dtype, n);
    comp_ptr = reinterpret_cast<uint16_t*>(comp->data_ptr());
  }
  auto* p = reinterpret_cast<uint16_t*>(param.data_ptr());
  const auto* g = reinterpret_cast<const uint16_t*>(grad.data_ptr());
  const uint32_t key1 = static_cast<uint32_t>(k1), key2 = static_cast<uint32_t>(k2);
  TORCH_CHECK(n < (int64_t{1} << 31), "at most 2**31 - 1 elements per tensor, got ", n);
  const Stream off = Stream::at(static_cast<uint64_t>(offset));
  auto run = [&](auto format) {
    using F = decltype(format);
    if (mode == kMaster) {
      body(Weight<F, kMaster>{p, master_ptr, comp_ptr, key1, key2, off}, g, n);
    } else if (mode == kStochastic) {
      body(Weight<F, kStochastic>{p, master_ptr, comp_ptr, key1, key2, off}, g, n);
    } else {
      body(Weight<F, kKahan>{p, master_ptr, comp_ptr, key1, key2, off}, g, n);
    }
  };
  if (dtype == at::kBFloat16) {
    run(BF16{});
  } else {
    run(FP16{});
  }
}

void adam_(at::Tensor param, const at::Tensor& grad, std::optional<at::Tensor> master,
           std::optional<at::Tensor> comp, at::Tensor exp_avg, at::Tensor exp_avg_sq,
           at::ArrayRef<double> scalars, int64_t weight_decay_mode, int64_t mode, int64_t k1,
           int64_t k2, int64_t offset) {
  TORCH_CHECK(scalars.size() == 9, "adam_ takes 9 scalars, got ", scalars.size());
  TORCH_CHECK(weight_decay_mode >= 0 && weight_decay_mode <= 2, "bad weight_decay_mode");
  check16(exp_avg, "exp_avg", at::kFloat, param.numel());
  check16(exp_avg_sq, "exp_avg_sq", at::kFloat, param.numel());
  AdamScalars s{static_cast<float>(scalars[0]), static_cast<float>(scalars[1]),
                static_cast<float>(scalars[2]), static_cast<float>(scalars[3]),
                static_cast<float>(scalars[4]), static_cast<float>(scalars[5]),
                static_cast<float>(scalars[6]), static_cast<float>(scalars[7]),
                static_cast<float>(scalars[8]), weight_decay_mode};
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  dispatch(param, grad, master, comp, mode, k1, k2, offset, [&](auto wt, const uint16_t* g,
                                                                int64_t n) {
    using F = typename decltype(wt)::Format;
    constexpr int64_t M = decltype(wt)::kMode;
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      if (s.weight_decay_mode == 1) {
        adam_range<F, M, 1>(wt, g, exp_avg_sq, m, v, s, begin, end);
      } else if (s.weight_decay_mode == 2) {
        adam_range<F, M, 2>(wt, g, exp_avg_sq, m, v, s, begin, end);
      } else {
        adam_range<F, M, 0>(wt, g, exp_avg_sq, m, v, s, begin, end);
      }
    });
  });
}

void sgd_(at::Tensor param, const at::Tensor& grad, std::optional<at::Tensor> master,
          std::optional<at::Tensor> comp, std::optional<at::Tensor> momentum_buffer,
          at::ArrayRef<double> scalars, bool first, bool nesterov, int64_t mode, int64_t k1,
          int64_t k2, int64_t offset) {
  TORCH_CHECK(scalars.size() == 5, "sgd_ takes 5 scalars, got ", scalars.size());
  SgdScalars s{static_cast<float>(scalars[0]), static_cast<float>(scalars[1]),
               static_cast<float>(scalars[2]), static_cast<float>(scalars[3]),
               static_cast<float>(scalars[4]), nesterov};
  const bool weight_decay = scalars[1] != 0.0;
  const int64_t momentum = momentum_buffer.has_value() ? (first ? 1 : 2) : 0;
  float* buf = nullptr;
  if (momentum_buffer.has_value()) {
    check16(*momentum_buffer, "momentum_buffer", at::kFloat, param.numel());
    buf = momentum_buffer->data_ptr<float>();
  }
  dispatch(param, grad, master, comp, mode, k1, k2, offset, [&](auto wt, const uint16_t* g,
                                                                int64_t n) {
    using F = typename decltype(wt)::Format;
    constexpr int64_t M = decltype(wt)::kMode;
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      if (momentum == 2) {
        sgd_range<F, M, 2>(wt, g, buf, s, weight_decay, begin, end);
      } else if (momentum == 1) {
        sgd_range<F, M, 1>(wt, g, buf, s, weight_decay, begin, end);
      } else {
        sgd_range<F, M, 0>(wt, g, buf, s, weight_decay, begin, end);
      }
    });
  });
}

template <typename F>
void round_loop(const float* src, uint16_t* out, int64_t n, uint32_t k1, uint32_t k2,
                uint64_t offset) {
  TORCH_CHECK(n < (int64_t{1} << 31), "at most 2**31 - 1 elements per tensor, got ", n);
  const Stream at = Stream::at(offset);
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
#pragma GCC ivdep
    for (int64_t i = begin; i < end; ++i) {
      out[i] = F::stochastic(src[i], at, static_cast<uint32_t>(i), k1, k2);
    }
  });
}

void stochastic_round_(const at::Tensor& src, at::Tensor out, int64_t k1, int64_t k2,
                       int64_t offset) {
  const auto dtype = out.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf,
              "out must be bfloat16 or float16, got ", dtype);
  check16(src, "src", at::kFloat, out.numel());
  check16(out, "out", dtype, out.numel());
  auto* o = reinterpret_cast<uint16_t*>(out.data_ptr());
  const float* x = src.data_ptr<float>();
  if (dtype == at::kBFloat16) {
    round_loop<BF16>(x, o, out.numel(), static_cast<uint32_t>(k1), static_cast<uint32_t>(k2),
                     static_cast<uint64_t>(offset));
  } else {
    round_loop<FP16>(x, o, out.numel(), static_cast<uint32_t>(k1), static_cast<uint32_t>(k2),
                     static_cast<uint64_t>(offset));
  }
}

}  // namespace

TORCH_LIBRARY(mixprec_fused, m) {
  m.def(
      "adam_(Tensor(a!) param, Tensor grad, Tensor(b!)? master, Tensor(c!)? compensation, "
      "Tensor(d!) exp_avg, Tensor(e!) exp_avg_sq, float[] scalars, int weight_decay_mode, "
      "int mode, int k1, int k2, int offset) -> ()");
  m.def(
      "sgd_(Tensor(a!) param, Tensor grad, Tensor(b!)? master, Tensor(c!)? compensation, "
      "Tensor(d!)? momentum_buffer, float[] scalars, bool first, bool nesterov, int mode, "
      "int k1, int k2, int offset) -> ()");
  m.def("stochastic_round_(Tensor src, Tensor(a!) out, int k1, int k2, int offset) -> ()");
}

TORCH_LIBRARY_IMPL(mixprec_fused, CPU, m) {
  m.impl("adam_", &adam_);
  m.impl("sgd_", &sgd_);
  m.impl("stochastic_round_", &stochastic_round_);
}
