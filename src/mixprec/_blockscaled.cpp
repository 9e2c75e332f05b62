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
// uniform draw is below the fraction; the draws are torch.rand's, made here from the same
// generator). -ffp-contract=off keeps every product and quotient a separate rounding, as
// torch's kernels do. NaNs land where torch's do; their sign and payload are not promised.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/MT19937RNGEngine.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace {

#include "_bits.h"

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

// The element rounding of blockscaled._round_elements on a clamped value `y`. Dividing by a
// power of two is multiplying by its reciprocal, bit for bit, so the kernel multiplies.
template <bool FP4, bool STOCH>
MIXPREC_INLINE float round_elem(float y, float u) {
  if constexpr (!STOCH) {
    if constexpr (FP4) {  // _round_fp4_in_range: rint(|y| / spacing) * spacing
      const float a = std::fabs(y);
      const float spacing = a < 2.0f ? 0.5f : (a < 4.0f ? 1.0f : 2.0f);
      const float inv = a < 2.0f ? 2.0f : (a < 4.0f ? 1.0f : 0.5f);
      return std::copysign(std::rint(a * inv) * spacing, y);
    } else {
      return e4m3_nearest(y);
    }
  } else {  // quantize.round_to_grid, rounding="stochastic", saturating
    using E = Elem<FP4>;
    const float mag = std::fabs(y);
    int32_t e = int32_t(bits_of(mag) >> 23) - 127;
    e = std::min(std::max(e, E::min_exp), E::max_exp) - E::mbits;
    const float step = float_of(uint32_t(e + 127) << 23);
    const float q = mag * float_of(uint32_t(127 - e) << 23);  // mag / step, exact
    const float fl = std::floor(q);
    const float units = fl + (u < q - fl ? 1.0f : 0.0f);
    float rounded = units * step;
    rounded = rounded > E::max ? E::max : rounded;
    rounded = std::isnan(y) ? y : rounded;
    return std::copysign(rounded, y);
  }
}

// One element: scale (MX divides by a power of two: a product with its reciprocal, exact;
// NVFP4 multiplies), clamp, round, dequantize. A NaN block (NaN decode) is all NaN; which NaN
// torch returns where two NaNs meet depends on its vector width, the kernel returns the scale's.
template <bool FP4, bool STOCH>
MIXPREC_INLINE float element(float x, float factor, float decode, float u) {
  const float y = clamp(x * factor, -Elem<FP4>::max, Elem<FP4>::max);
  const float r = round_elem<FP4, STOCH>(y, u) * decode;
  return std::isnan(decode) ? decode : r;
}

MIXPREC_INLINE uint32_t abs_bits(float x) { return bits_of(x) & 0x7FFFFFFFu; }

// The scales of n blocks from their amax bits (NaN above inf: an integer max of the
// sign-cleared bits orders non-negative floats, and vectorizes): the factor the elements are
// multiplied by and the decode scale the rounded elements are multiplied by.
template <bool NV, bool FP4>
MIXPREC_INLINE void block_scales(const uint32_t* amax, float* factor, float* decode, int64_t n,
                                 float tensor_scale, float inv_tensor_scale) {
  for (int64_t k = 0; k < n; ++k) {
    if constexpr (NV) {
      float s = float_of(amax[k]) / 6.0f / tensor_scale;
      s = e4m3_scale(clamp(s, 0x1p-6f, 448.0f));
      factor[k] = inv_tensor_scale / s;
      decode[k] = tensor_scale * s;
    } else {
      constexpr int32_t emax = Elem<FP4>::max_exp;
      const uint32_t a = amax[k];
      const int32_t code =
          a > 0x7F800000u ? 255 : std::min(std::max(int32_t(a >> 23) - emax, 0), 255);
      // Encoding divides by at least 2**-126 (torchao's clamp); finite codes stop at 253, so
      // the reciprocal is exact. Code 255 (NaN) encodes with inf, decodes NaN.
      const float encode = std::max(float_of(uint32_t(code) << 23), 0x1p-126f);
      factor[k] = 1.0f / encode;
      decode[k] = code == 0 ? 0x1p-127f : (code == 255 ? NAN : float_of(uint32_t(code) << 23));
    }
  }
}

struct Blocks {
  const void* x;  // float, c10::BFloat16 or c10::Half: widened exactly on reading
  float* out;
  const float* uniform;  // null for nearest rounding; the draw for x[r, c] at uniform[r * uld + c]
  int64_t rows, cols, br, bc;
  int64_t ld, uld;  // the row strides of x and out (cols, or more for a strip of columns), and of
                    // the draws
  // Where x is read as it lies under a .t() view, the draws are in the order of x.t(): down x's
  // columns (run_stochastic lays them out as above).
  bool draws_transposed;
};

constexpr int64_t kChunk = 256;  // blocks whose scales are computed together

// The blocks of `b` in bands of br rows, each band cut into chunks of up to kChunk blocks: the
// work items, run in parallel. BC is the block's width when known at compile time (1: a block
// down a column; 0: b.bc).
template <int BC>
struct Items {
  explicit Items(const Blocks& b)
      : bc(BC ? BC : b.bc),
        cols(b.cols),
        ld(b.ld),
        br(b.br),
        per_band(cols / bc),
        chunks((per_band + kChunk - 1) / kChunk),
        count((b.rows / br) * chunks),
        grain(std::max<int64_t>(1, (1 << 15) / (br * std::min(per_band, kChunk) * bc))) {}
  int64_t k0(int64_t item) const { return (item % chunks) * kChunk; }
  int64_t n(int64_t item) const { return std::min(kChunk, per_band - k0(item)); }
  int64_t base(int64_t item) const { return (item / chunks) * br * ld + k0(item) * bc; }

  // The amax bits of the item's blocks.
  template <typename T>
  void amax(const Blocks& b, int64_t item, uint32_t* out) const {
    const int64_t n_ = n(item), base_ = base(item);
    std::fill_n(out, n_, 0u);
    for (int64_t r = 0; r < br; ++r) {
      const T* in = static_cast<const T*>(b.x) + base_ + r * ld;
      if constexpr (BC == 1) {
        for (int64_t k = 0; k < n_; ++k) out[k] = std::max(out[k], abs_bits(widen(in[k])));
      } else {
        for (int64_t k = 0; k < n_; ++k) {
          uint32_t m = out[k];
          for (int64_t j = 0; j < bc; ++j) m = std::max(m, abs_bits(widen(in[k * bc + j])));
          out[k] = m;
        }
      }
    }
  }

  const int64_t bc, cols, ld, br, per_band, chunks, count, grain;
};

// NVFP4's default tensor scale, nvfp4_tensor_scale(x.abs().amax()): amax / 2688 floored at
// 2**-121 (NaN stays NaN, as torch.clamp leaves it), from the blocks' amaxes, which are kept
// (kChunk per item) so that the elements' pass does not read each block twice more.
template <typename T, int BC>
float tensor_scale_of(const Blocks& b, const Items<BC>& items, std::vector<uint32_t>& amaxes) {
  amaxes.assign(items.count * kChunk, 0u);
  at::parallel_for(0, items.count, items.grain, [&](int64_t i0, int64_t i1) {
    for (int64_t item = i0; item < i1; ++item)
      items.template amax<T>(b, item, amaxes.data() + item * kChunk);
  });
  const uint32_t m = *std::max_element(amaxes.begin(), amaxes.end());
  return std::max(float_of(m) / 2688.0f, 0x1p-121f);  // std::max(NaN, lo) is NaN
}

// Every block of `b`, items in parallel: the item's amaxes (or the kept ones), its scales (a
// loop over blocks), then its elements. With NV and default_scale, the tensor scale is the default one.
template <typename T, bool NV, bool FP4, bool STOCH, int BC>
void run(const Blocks& b, float tensor_scale, bool default_scale) {
  const Items<BC> items(b);
  const int64_t bc = items.bc, br = b.br, ld = b.ld;
  std::vector<uint32_t> kept;
  if (NV && default_scale) tensor_scale = tensor_scale_of<T>(b, items, kept);
  const float inv_tensor_scale = 1.0f / tensor_scale;
  at::parallel_for(0, items.count, items.grain, [&](int64_t i0, int64_t i1) {
    uint32_t own[kChunk];
    float factor[kChunk], decode[kChunk];
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t k0 = items.k0(item), n = items.n(item), base = items.base(item);
      const uint32_t* amax = own;
      if (kept.empty()) {
        items.template amax<T>(b, item, own);
      } else {
        amax = kept.data() + item * kChunk;
      }
      block_scales<NV, FP4>(amax, factor, decode, n, tensor_scale, inv_tensor_scale);
      for (int64_t r = 0; r < br; ++r) {
        const int64_t row = base + r * ld;
        const T* in = static_cast<const T*>(b.x) + row;
        float* o = b.out + row;
        const float* u =
            STOCH ? b.uniform + ((item / items.chunks) * br + r) * b.uld + k0 * bc : nullptr;
        if constexpr (BC == 1) {
          for (int64_t k = 0; k < n; ++k)
            o[k] = element<FP4, STOCH>(widen(in[k]), factor[k], decode[k], STOCH ? u[k] : 0.0f);
        } else {
          for (int64_t k = 0; k < n; ++k) {
            const float f = factor[k], d = decode[k];
            for (int64_t j = 0; j < bc; ++j) {
              const int64_t at = k * bc + j;
              o[at] = element<FP4, STOCH>(widen(in[at]), f, d, STOCH ? u[at] : 0.0f);
            }
          }
        }
      }
    }
  });
}

template <typename T, bool NV, bool FP4, bool STOCH>
void run_width(const Blocks& b, float tensor_scale, bool default_scale) {
  switch (b.bc) {
    case 1: return run<T, NV, FP4, STOCH, 1>(b, tensor_scale, default_scale);
    case 16: return run<T, NV, FP4, STOCH, 16>(b, tensor_scale, default_scale);
    case 32: return run<T, NV, FP4, STOCH, 32>(b, tensor_scale, default_scale);
    default: return run<T, NV, FP4, STOCH, 0>(b, tensor_scale, default_scale);
  }
}

template <bool NV, bool FP4, bool STOCH>
void run_typed(const at::ScalarType dtype, const Blocks& b, float tensor_scale,
               bool default_scale = false) {
  switch (dtype) {
    case at::kBFloat16:
      return run_width<c10::BFloat16, NV, FP4, STOCH>(b, tensor_scale, default_scale);
    case at::kHalf: return run_width<c10::Half, NV, FP4, STOCH>(b, tensor_scale, default_scale);
    default: return run_width<float, NV, FP4, STOCH>(b, tensor_scale, default_scale);
  }
}

// torch.rand(n) from `gen` (torch's default CPU generator when absent) into `out`: the same
// numbers, leaving the generator in the same state. torch draws them one call at a time
// (at::mt19937's operator(), then uniform_real: the low 24 bits times 2**-24); this is that
// engine's code on its own state, the tempering of a run of outputs in one loop.
MIXPREC_INLINE float draw_of(uint32_t y) {
  y ^= (y >> 11);
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  y ^= (y >> 18);
  return float(y & 0xFFFFFFu) * 0x1p-24f;
}

MIXPREC_INLINE uint32_t twist(uint32_t u, uint32_t v) {
  return (((u & at::UMASK) | (v & at::LMASK)) >> 1) ^ (v & 1 ? at::MATRIX_A : 0);
}

void next_state(at::mt19937_data_pod& d) {  // at::mt19937::next_state
  constexpr int N = at::MERSENNE_STATE_N, M = at::MERSENNE_STATE_M;
  uint32_t* p = d.state_.data();
  d.left_ = N;
  d.next_ = 0;
  // The same steps by index, vectorized: word i reads words i + 1 and i + M before they change
  // (the first loop) or i + M - N, changed at least N - M words before (the second loop).
#pragma GCC ivdep
  for (int i = 0; i < N - M; ++i) p[i] = p[i + M] ^ twist(p[i], p[i + 1]);
#pragma GCC ivdep
  for (int i = N - M; i < N - 1; ++i) p[i] = p[i + M - N] ^ twist(p[i], p[i + 1]);
  p[N - 1] = p[M - 1] ^ twist(p[N - 1], p[0]);
}

// The generator's engine, held (and the generator locked) while a kernel draws from it; the
// engine's state goes back to the generator at the end.
class Drawer {
 public:
  explicit Drawer(const std::optional<at::Generator>& generator)
      : gen_(at::get_generator_or_default<at::CPUGeneratorImpl>(
            generator, at::detail::getDefaultCPUGenerator())),
        lock_(gen_->mutex_),
        engine_(gen_->engine()),
        d_(engine_.data()) {}
  ~Drawer() {
    engine_.set_data(d_);
    gen_->set_engine(engine_);
  }
  Drawer(const Drawer&) = delete;
  Drawer& operator=(const Drawer&) = delete;

  // The next `len` numbers of torch.rand into out[0..len).
  void take(float* out, int64_t len) {
    int64_t i = 0;
    while (i < len) {
      // each draw first decrements left_; the one that reaches 0 regenerates the state
      const int64_t run = std::min<int64_t>(d_.left_ - 1, len - i);
      const uint32_t* state = d_.state_.data() + d_.next_;
      for (int64_t k = 0; k < run; ++k) out[i + k] = draw_of(state[k]);
      d_.next_ += uint32_t(run);
      d_.left_ -= int(run);
      i += run;
      if (i < len) {
        next_state(d_);
        out[i++] = draw_of(d_.state_[d_.next_++]);
      }
    }
  }

 private:
  at::CPUGeneratorImpl* gen_;
  std::lock_guard<std::mutex> lock_;
  at::mt19937 engine_;
  at::mt19937_data_pod d_;
};

void check(const at::Tensor& x, int64_t br, int64_t bc, bool uniform_transposed) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "blockscaled: a contiguous 2-D tensor");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "blockscaled: an fp32, bf16 or fp16 tensor");
  TORCH_CHECK(br >= 1 && bc >= 1 && x.size(0) % br == 0 && x.size(1) % bc == 0,
              "blockscaled: blocks must tile the tensor");
  TORCH_CHECK(!uniform_transposed || bc == 1 || br == 1,
              "blockscaled: transposed draws need 1-D blocks");
}

at::Tensor new_out(const at::Tensor& x) {
  return at::empty(x.sizes(), x.options().dtype(at::kFloat));
}

// The in-place ops write over an fp32 x: each element is read before it is written, and only
// there (a NVFP4 tensor scale reads all of x first).
void check_in_place(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "blockscaled: in place needs an fp32 tensor");
}

Blocks blocks_of(const at::Tensor& x, at::Tensor& out, int64_t br, int64_t bc, bool transposed) {
  return Blocks{x.data_ptr(), out.data_ptr<float>(), nullptr,   x.size(0), x.size(1),
                br,           bc,                    x.size(1), x.size(1), transposed};
}

// out (cols x rows) = in (rows x cols), in tiles that stay in cache.
void transpose(const float* in, float* out, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) out[c * rows + r] = in[r * cols + c];
    }
  }
}

// The draws of one piece of an operand, held in cache: about 512 KiB.
constexpr int64_t kPieceDraws = 1 << 17;

// NVFP4's default tensor scale of the whole of `b` (tensor_scale_of).
template <typename T>
float default_tensor_scale_of(const Blocks& b) {
  std::vector<uint32_t> amaxes;
  switch (b.bc) {
    case 1: return tensor_scale_of<T>(b, Items<1>(b), amaxes);
    case 16: return tensor_scale_of<T>(b, Items<16>(b), amaxes);
    case 32: return tensor_scale_of<T>(b, Items<32>(b), amaxes);
    default: return tensor_scale_of<T>(b, Items<0>(b), amaxes);
  }
}

float default_tensor_scale(const at::ScalarType dtype, const Blocks& b) {
  switch (dtype) {
    case at::kBFloat16: return default_tensor_scale_of<c10::BFloat16>(b);
    case at::kHalf: return default_tensor_scale_of<c10::Half>(b);
    default: return default_tensor_scale_of<float>(b);
  }
}

// Every block of `b` (stochastic rounding), in pieces along the order of the draws: each piece's
// numbers are drawn into a buffer that stays in cache, then the piece is quantized (its items
// in parallel), instead of drawing the whole operand's numbers into memory first. The same
// numbers reach the same elements. The pieces: runs of whole rows of blocks (x's draws run along
// its rows), or, where the draws are those of x.t() (blocks down x's columns), strips of columns.
template <bool NV, bool FP4>
void run_stochastic(const at::ScalarType dtype, const Blocks& b, float tensor_scale,
                    bool default_scale, const std::optional<at::Generator>& generator) {
  if (NV && default_scale) tensor_scale = default_tensor_scale(dtype, b);  // before any piece
  const int64_t esize = dtype == at::kFloat ? 4 : 2;
  const char* x = static_cast<const char*>(b.x);
  Drawer drawer(generator);
  if (b.draws_transposed) {  // strips of columns; a column's draws laid down the strip's column
    int64_t width = std::max<int64_t>(1, kPieceDraws / std::max<int64_t>(b.rows, 1));
    const int64_t unit = width >= 16 * b.bc ? 16 * b.bc : b.bc;  // whole blocks (and lines)
    width = std::max(unit, width / unit * unit);
    std::vector<float> drawn(std::min(width, b.cols) * b.rows), u(drawn.size());
    for (int64_t c0 = 0; c0 < b.cols; c0 += width) {
      const int64_t w = std::min(width, b.cols - c0);
      for (int64_t c = 0; c < w; ++c) drawer.take(drawn.data() + c * b.rows, b.rows);
      transpose(drawn.data(), u.data(), w, b.rows);
      run_typed<NV, FP4, true>(dtype, Blocks{x + c0 * esize, b.out + c0, u.data(), b.rows, w,
                                             b.br, b.bc, b.ld, w, false},
                               tensor_scale);
    }
    return;
  }
  if (b.br == 1) {  // the draws in x's memory order: segments of whole blocks
    const int64_t n = b.rows * b.cols, len = std::max(b.bc, kPieceDraws / b.bc * b.bc);
    std::vector<float> u(std::min(len, n));
    for (int64_t e0 = 0; e0 < n; e0 += len) {
      const int64_t l = std::min(len, n - e0);
      drawer.take(u.data(), l);
      run_typed<NV, FP4, true>(dtype, Blocks{x + e0 * esize, b.out + e0, u.data(), 1, l, 1, b.bc,
                                             l, l, false},
                               tensor_scale);
    }
    return;
  }
  const int64_t band = b.br * b.cols;  // the draws of a row of blocks (square tiles)
  const int64_t bands = std::max<int64_t>(1, kPieceDraws / band);
  std::vector<float> u(std::min(bands, b.rows / b.br) * band);
  for (int64_t r0 = 0; r0 < b.rows; r0 += bands * b.br) {
    const int64_t h = std::min(bands * b.br, b.rows - r0);
    drawer.take(u.data(), h * b.cols);
    run_typed<NV, FP4, true>(dtype, Blocks{x + r0 * b.ld * esize, b.out + r0 * b.ld, u.data(), h,
                                           b.cols, b.br, b.bc, b.ld, b.cols, false},
                             tensor_scale);
  }
}

void mx_into(const at::Tensor& x, at::Tensor& out, int64_t br, int64_t bc, bool fp4,
             bool stochastic, const std::optional<at::Generator>& generator, bool transposed) {
  const Blocks b = blocks_of(x, out, br, bc, transposed && stochastic);
  const auto dtype = x.scalar_type();
  if (fp4) {
    stochastic ? run_stochastic<false, true>(dtype, b, 1.0f, false, generator)
               : run_typed<false, true, false>(dtype, b, 1.0f);
  } else {
    stochastic ? run_stochastic<false, false>(dtype, b, 1.0f, false, generator)
               : run_typed<false, false, false>(dtype, b, 1.0f);
  }
}

at::Tensor mx(const at::Tensor& x, int64_t br, int64_t bc, bool fp4, bool stochastic,
              std::optional<at::Generator> generator, bool transposed) {
  check(x, br, bc, transposed && stochastic);
  at::Tensor out = new_out(x);
  mx_into(x, out, br, bc, fp4, stochastic, generator, transposed);
  return out;
}

void mx_(at::Tensor& x, int64_t br, int64_t bc, bool fp4, bool stochastic,
         std::optional<at::Generator> generator, bool transposed) {
  check(x, br, bc, transposed && stochastic);
  check_in_place(x);
  mx_into(x, x, br, bc, fp4, stochastic, generator, transposed);
}

void nvfp4_into(const at::Tensor& x, at::Tensor& out, const std::optional<at::Tensor>& tensor_scale,
                int64_t br, int64_t bc, bool stochastic,
                const std::optional<at::Generator>& generator, bool transposed) {
  float scale = 1.0f;
  if (tensor_scale.has_value()) {
    TORCH_CHECK(tensor_scale->numel() == 1 && tensor_scale->scalar_type() == at::kFloat,
                "blockscaled: one fp32 tensor scale");
    scale = tensor_scale->item<float>();
  }
  const bool by_default = !tensor_scale.has_value() && x.numel() > 0;
  const Blocks b = blocks_of(x, out, br, bc, transposed && stochastic);
  stochastic ? run_stochastic<true, true>(x.scalar_type(), b, scale, by_default, generator)
             : run_typed<true, true, false>(x.scalar_type(), b, scale, by_default);
}

at::Tensor nvfp4(const at::Tensor& x, const std::optional<at::Tensor>& tensor_scale, int64_t br,
                 int64_t bc, bool stochastic, std::optional<at::Generator> generator,
                 bool transposed) {
  check(x, br, bc, transposed && stochastic);
  at::Tensor out = new_out(x);
  nvfp4_into(x, out, tensor_scale, br, bc, stochastic, generator, transposed);
  return out;
}

void nvfp4_(at::Tensor& x, const std::optional<at::Tensor>& tensor_scale, int64_t br, int64_t bc,
            bool stochastic, std::optional<at::Generator> generator, bool transposed) {
  check(x, br, bc, transposed && stochastic);
  check_in_place(x);
  nvfp4_into(x, x, tensor_scale, br, bc, stochastic, generator, transposed);
}

at::Tensor mx_meta(const at::Tensor& x, int64_t, int64_t, bool, bool,
                   std::optional<at::Generator>, bool) {
  return at::empty_like(x, x.options().dtype(at::kFloat));
}

at::Tensor nvfp4_meta(const at::Tensor& x, const std::optional<at::Tensor>&, int64_t, int64_t,
                      bool, std::optional<at::Generator>, bool) {
  return at::empty_like(x, x.options().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY(mixprec_blockscaled, m) {
  m.def(
      "mx(Tensor x, int br, int bc, bool fp4, bool stochastic, Generator? generator, "
      "bool transposed) -> Tensor");
  m.def(
      "nvfp4(Tensor x, Tensor? tensor_scale, int br, int bc, bool stochastic, "
      "Generator? generator, bool transposed) -> Tensor");
  // the same, written over an fp32 x
  m.def(
      "mx_(Tensor(a!) x, int br, int bc, bool fp4, bool stochastic, Generator? generator, "
      "bool transposed) -> ()");
  m.def(
      "nvfp4_(Tensor(a!) x, Tensor? tensor_scale, int br, int bc, bool stochastic, "
      "Generator? generator, bool transposed) -> ()");
}

TORCH_LIBRARY_IMPL(mixprec_blockscaled, CPU, m) {
  m.impl("mx", &mx);
  m.impl("nvfp4", &nvfp4);
  m.impl("mx_", &mx_);
  m.impl("nvfp4_", &nvfp4_);
}

TORCH_LIBRARY_IMPL(mixprec_blockscaled, Meta, m) {
  m.impl("mx", &mx_meta);
  m.impl("nvfp4", &nvfp4_meta);
}
