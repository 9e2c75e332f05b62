// One-pass updates of optimizer states stored block-quantized (int8 dynamic map or fp8 e4m3,
// one fp32 scale per block): see mixprec/optim/fused_codes.py for the design. Compiled after
// _fused.cpp, in the same translation unit (its helpers and loops are used here).
//
// Bit for bit the reference path's decode -> torch step -> encode (mixprec/optim/codecs.py):
// decode is map entry (or e4m3 value) times scale, squared for a second moment stored as its
// root; encode takes the block's absmax of the new values (NaN if one is not finite, floored at
// 1e-12), divides by it (fp8: by absmax / 448) and picks the code as codecs.py does, with the
// same counter-based draws where rounding is stochastic.
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr float kScaleFloor = 1e-12f;
constexpr float kFp8Max = 448.0f;

// One stored state: its codes and scales, the tables of its format, how it is rounded.
struct Coded {
  uint8_t* codes;
  float* scale;
  const float* values;    // the 256 decoded values of a code (the map, or the e4m3 values)
  const int32_t* nearest;  // int8, per upper-16-bit bucket: the nearest code (packed_code)
  const int32_t* below;    // int8, per bucket: 1 + the code of the entry at or below y
  bool fp8, root, stochastic;
  uint32_t k1, k2;
};

// The blocks of a (rows, cols) state: `block` elements within a row, the last one short.
struct Layout {
  int64_t cols, blocks_per_row, block;
  uint32_t offset;  // the stream position of element 0 (modulo 2**32, as the hashes take it)
  MIXPREC_INLINE int64_t start(int64_t t) const {
    const int64_t row = t / blocks_per_row;
    return row * cols + (t - row * blocks_per_row) * block;
  }
  MIXPREC_INLINE int64_t end(int64_t t) const {
    const int64_t row = t / blocks_per_row;
    const int64_t j = t - row * blocks_per_row;
    return row * cols + std::min(cols, (j + 1) * block);
  }
};

// c10's float -> float8_e4m3fn (round to nearest even, 480 and above and NaN to NaN).
MIXPREC_INLINE uint8_t e4m3_nearest(float f) {
  uint32_t bits = bits_of(f);
  const uint32_t sign = bits & 0x80000000u;
  bits ^= sign;
  const uint32_t denorm = 141u << 23;
  const uint32_t small = bits_of(float_of(bits) + float_of(denorm)) - denorm;
  const uint32_t odd = (bits >> 20) & 1u;
  const uint32_t normal = (bits + ((7u - 127u) << 23) + 0x7FFFFu + odd) >> 20;
  uint32_t r = pick(bits < (121u << 23), small, normal);
  r = pick(bits >= (1087u << 20), 0x7Fu, r);
  return static_cast<uint8_t>((r & 0xFFu) | (sign >> 24));
}

// mixprec.quantize.round_to_grid(y, e4m3, "stochastic", uniform=u) for |y| <= 448 (or NaN):
// floor of |y| in units of its e4m3 ulp, plus one where u is below the fraction, back to a value.
MIXPREC_INLINE float e4m3_stochastic(float y, float u) {
  const uint32_t a_bits = bits_of(y) & 0x7FFFFFFFu;
  int32_t exponent = static_cast<int32_t>(a_bits >> 23) - 127;
  exponent = std::min(std::max(exponent, -6), 8);
  const float step = float_of(static_cast<uint32_t>(exponent - 3 + 127) << 23);
  const float inverse = float_of(static_cast<uint32_t>(3 - exponent + 127) << 23);
  const float scaled = float_of(a_bits) * inverse;  // exact: a power of two, 24 bits at most
  float units = std::floor(scaled);
  units += static_cast<float>(u < scaled - units);
  float rounded = units * step;
  rounded = pickf(rounded > kFp8Max, kFp8Max, rounded);
  rounded = pickf(y != y, y, rounded);
  return float_of((bits_of(rounded) & 0x7FFFFFFFu) | (bits_of(y) & 0x80000000u));
}

// A bucket table's answer for y (fused_codes._packed): the code of the bucket's smallest value,
// plus one where y reaches the bound inside the bucket (the 16-bit keys order the bucket's values).
MIXPREC_INLINE int32_t packed_code(const int32_t* table, float y) {
  const uint32_t bits = bits_of(y);
  const int32_t entry = table[bits >> 16];
  const uint32_t key = (bits & 0xFFFFu) ^ ((0u - (bits >> 31)) & 0xFFFFu);
  return (entry >> 17) + static_cast<int32_t>(key >= (static_cast<uint32_t>(entry) & 0x1FFFFu));
}

// The draw in [0, 1) of stream position `position`: the top 24 bits of its word, times 2**-24.
MIXPREC_INLINE float uniform_at(uint32_t position, uint32_t k1, uint32_t k2) {
  return static_cast<float>(static_cast<int32_t>(hash_word(position, k1, k2) >> 8)) *
         5.9604644775390625e-08f;
}

#if defined(__AVX512F__)
// The gathers of the int8 loops written out: compilers tuned for CPUs with slow gathers emulate
// them with scalar loads, several times slower here. Lane by lane the arithmetic of the scalar
// loops below (which finish each block's last partial vector); the tests compare the bits.
MIXPREC_INLINE __m512i hash16(uint32_t position, uint32_t k1, uint32_t k2) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i h = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(position)), lanes);
  h = _mm512_add_epi32(_mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int32_t>(kGolden))),
                       _mm512_set1_epi32(static_cast<int32_t>(k1)));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int32_t>(kMul1)));
  h = _mm512_xor_si512(h, _mm512_set1_epi32(static_cast<int32_t>(k2)));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 15));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int32_t>(kMul2)));
  return _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
}

MIXPREC_INLINE int32_t decode16(const uint8_t* codes, int32_t n, float s, bool root,
                                const float* values, float* o) {
  const __m512 vs = _mm512_set1_ps(s);
  int32_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512i idx =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + j)));
    __m512 r = _mm512_mul_ps(_mm512_i32gather_ps(idx, values, 4), vs);
    if (root) r = _mm512_mul_ps(r, _mm512_abs_ps(r));
    _mm512_storeu_ps(o + j, r);
  }
  return j;
}

MIXPREC_INLINE int32_t int8_stochastic16(const float* v, uint8_t* codes, int32_t n, float scale,
                                         uint32_t position, uint32_t k1, uint32_t k2,
                                         const int32_t* table, const float* values) {
  const __m512 vs = _mm512_set1_ps(scale);
  const __m512i one = _mm512_set1_epi32(1), last = _mm512_set1_epi32(255);
  const __m512i low16 = _mm512_set1_epi32(0xFFFF), low17 = _mm512_set1_epi32(0x1FFFF);
  int32_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 y = _mm512_div_ps(_mm512_loadu_ps(v + j), vs);
    const __m512i bits = _mm512_castps_si512(y);
    const __m512i entry = _mm512_i32gather_epi32(_mm512_srli_epi32(bits, 16), table, 4);
    const __m512i key = _mm512_xor_si512(_mm512_and_si512(bits, low16),
                                         _mm512_and_si512(_mm512_srai_epi32(bits, 31), low16));
    const __mmask16 reach = _mm512_cmpge_epu32_mask(key, _mm512_and_si512(entry, low17));
    __m512i code = _mm512_srai_epi32(entry, 17);
    code = _mm512_mask_add_epi32(code, reach, code, one);
    const __m512i low = _mm512_min_epi32(
        _mm512_max_epi32(_mm512_sub_epi32(code, one), _mm512_setzero_si512()), last);
    const __m512i high = _mm512_min_epi32(_mm512_add_epi32(low, one), last);
    const __m512 below = _mm512_i32gather_ps(low, values, 4);
    const __m512 above = _mm512_i32gather_ps(high, values, 4);
    const __m512i h = hash16(position + static_cast<uint32_t>(j), k1, k2);
    const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(h, 8)),
                                   _mm512_set1_ps(5.9604644775390625e-08f));
    const __mmask16 up = _mm512_cmp_ps_mask(_mm512_mul_ps(u, _mm512_sub_ps(above, below)),
                                            _mm512_sub_ps(y, below), _CMP_LT_OQ);
    const __m512i out = _mm512_mask_mov_epi32(low, up, high);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + j), _mm512_cvtepi32_epi8(out));
  }
  return j;
}
#endif

// Decode elements [b, e) (blocks t0..t1) into out[0 .. e - b).
// Decode elements [b, e) (blocks t0..t1) into out[0 .. e - b). The loops index in 32 bits
// within a block (32-bit vector lanes: twice the width of 64-bit index arithmetic).
void decode_blocks(const Coded& c, const Layout& l, int64_t t0, int64_t t1, float* out) {
  const int64_t b = l.start(t0);
  const float* values = c.values;
  for (int64_t t = t0; t < t1; ++t) {
    const float s = c.scale[t];
    const int64_t s0 = l.start(t);
    const int32_t n = static_cast<int32_t>(l.end(t) - s0);
    const uint8_t* codes = c.codes + s0;
    float* o = out + (s0 - b);
    int32_t done = 0;
#if defined(__AVX512F__)
    done = decode16(codes, n, s, c.root, values, o);
#endif
    if (c.root) {
#pragma GCC ivdep
      for (int32_t j = done; j < n; ++j) {
        const float r = values[codes[j]] * s;  // (root * root.abs(): the square where r >= 0)
        o[j] = r * std::fabs(r);
      }
    } else {
#pragma GCC ivdep
      for (int32_t j = done; j < n; ++j) o[j] = values[codes[j]] * s;
    }
  }
}

// Encode x[0 .. e - b) (blocks t0..t1, the values to store: the root for a second moment).
void encode_blocks(const Coded& c, const Layout& l, int64_t t0, int64_t t1, const float* x) {
  const int64_t b = l.start(t0);
  const uint32_t k1 = c.k1, k2 = c.k2;
  const int32_t* nearest = c.nearest;
  const int32_t* below_table = c.below;
  const float* values = c.values;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t s0 = l.start(t);
    const int32_t n = static_cast<int32_t>(l.end(t) - s0);
    const float* v = x + (s0 - b);
    uint8_t* codes = c.codes + s0;
    const uint32_t position = l.offset + static_cast<uint32_t>(s0);  // in the draws' stream
    // The absmax as the largest bit pattern of |x| (the same order for non-negative floats, and
    // an integer reduction vectorizes); above the largest finite float: an inf or a NaN.
    uint32_t top = 0u;
#pragma GCC ivdep
    for (int32_t j = 0; j < n; ++j) top = std::max(top, bits_of(v[j]) & 0x7FFFFFFFu);
    float scale = top <= 0x7F7FFFFFu ? std::max(float_of(top), kScaleFloor)
                                     : std::numeric_limits<float>::quiet_NaN();
    if (c.fp8) scale = scale / kFp8Max;
    c.scale[t] = scale;
    if (c.fp8) {
      if (c.stochastic) {
#pragma GCC ivdep
        for (int32_t j = 0; j < n; ++j) {
          const float u = uniform_at(position + static_cast<uint32_t>(j), k1, k2);
          codes[j] = e4m3_nearest(e4m3_stochastic(v[j] / scale, u));
        }
      } else {
#pragma GCC ivdep
        for (int32_t j = 0; j < n; ++j) codes[j] = e4m3_nearest(v[j] / scale);
      }
    } else if (c.stochastic) {
      int32_t done = 0;
#if defined(__AVX512F__)
      done = int8_stochastic16(v, codes, n, scale, position, k1, k2, below_table, values);
#endif
#pragma GCC ivdep
      for (int32_t j = done; j < n; ++j) {
        // Between the entry at or below y and the next one (codecs._round_between).
        const float y = v[j] / scale;
        const int32_t low = std::min(std::max(packed_code(below_table, y) - 1, 0), 255);
        const int32_t high = std::min(low + 1, 255);
        const float below = values[low];
        const float u = uniform_at(position + static_cast<uint32_t>(j), k1, k2);
        const int32_t up = static_cast<int32_t>(u * (values[high] - below) < y - below);
        codes[j] = static_cast<uint8_t>(low + up * (high - low));  // up ? high : low
      }
    } else {
#pragma GCC ivdep
      for (int32_t j = 0; j < n; ++j) {
        codes[j] = static_cast<uint8_t>(packed_code(nearest, v[j] / scale));
      }
    }
  }
}

// A thread's fp32 work space of at least n elements, kept between calls: a new buffer per call
// costs page faults (its size is past malloc's threshold for fresh pages) on every step.
float* scratch(int64_t n) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// How many blocks a group takes: about kBlock elements, in cache between its loops.
int64_t group_blocks(const Layout& l) { return std::max<int64_t>(1, kBlock / l.block); }

template <typename F, int64_t MODE, int64_t WD>
void adam_coded_range(const Weight<F, MODE> wt, const uint16_t* grad, const Coded& m,
                      const Coded& v, bool fresh, const Layout& l, const AdamScalars s,
                      int64_t t0, int64_t t1) {
  const int64_t group = group_blocks(l);
  const int64_t cap = std::min(group * l.block, l.end(t1 - 1) - l.start(t0));  // >= a group
  float* mb = scratch(3 * cap);
  float* vb = mb + cap;
  float* rb = vb + cap;
  for (int64_t t = t0; t < t1; t += group) {
    const int64_t te = std::min(t1, t + group);
    const int64_t b = l.start(t), e = l.end(te - 1);
    if (fresh) {
      std::fill(mb, mb + (e - b), 0.0f);
      std::fill(vb, vb + (e - b), 0.0f);
    } else {
      decode_blocks(m, l, t, te, mb);
      decode_blocks(v, l, t, te, vb);
    }
    adam_moments<F, MODE, WD>(wt, grad, mb, vb, s, b, e, b);
    at::Tensor root = at::from_blob(rb, {e - b}, at::kFloat);
    at::sqrt_out(root, at::from_blob(vb, {e - b}, at::kFloat));
    adam_apply<F, MODE, WD>(wt, mb, rb, s, b, e, b);
    encode_blocks(m, l, t, te, mb);
    encode_blocks(v, l, t, te, v.root ? rb : vb);
  }
}

template <typename F, int64_t MODE, int64_t MOMENTUM>
void sgd_coded_range(const Weight<F, MODE> wt, const uint16_t* grad, const Coded& c,
                     const Layout& l, const SgdScalars s, bool weight_decay, int64_t t0,
                     int64_t t1) {
  const int64_t group = group_blocks(l);
  float* bb = scratch(std::min(group * l.block, l.end(t1 - 1) - l.start(t0)));
  for (int64_t t = t0; t < t1; t += group) {
    const int64_t te = std::min(t1, t + group);
    const int64_t b = l.start(t), e = l.end(te - 1);
    if (MOMENTUM == 2) decode_blocks(c, l, t, te, bb);
    if (weight_decay) {
      sgd_loop<F, MODE, MOMENTUM, true>(wt, grad, bb, s, b, e, b);
    } else {
      sgd_loop<F, MODE, MOMENTUM, false>(wt, grad, bb, s, b, e, b);
    }
    encode_blocks(c, l, t, te, bb);
  }
}

void check_coded(const at::Tensor& codes, const at::Tensor& scale, const char* name,
                 int64_t numel, int64_t blocks) {
  TORCH_CHECK(codes.device().is_cpu() && codes.is_contiguous() && codes.element_size() == 1 &&
                  codes.numel() == numel,
              name, " codes must be a contiguous CPU tensor of 1-byte codes and ", numel,
              " elements, got ", codes.scalar_type(), " ", codes.sizes());
  check16(scale, name, at::kFloat, blocks);
}

// tables: values (256 fp32), and for int8 the packed bucket tables of the nearest code and of
// the code below (65536 int32 each).
Coded coded_of(const at::Tensor& codes, const at::Tensor& scale, at::TensorList tables,
               bool fp8, bool root, bool stochastic, int64_t k1, int64_t k2) {
  TORCH_CHECK(tables.size() == (fp8 ? 1u : 3u), "bad tables");
  check16(tables[0], "values", at::kFloat, 256);
  const int32_t* nearest = nullptr;
  const int32_t* below = nullptr;
  if (!fp8) {
    check16(tables[1], "nearest codes", at::kInt, 65536);
    check16(tables[2], "codes below", at::kInt, 65536);
    nearest = tables[1].data_ptr<int32_t>();
    below = tables[2].data_ptr<int32_t>();
  }
  return Coded{reinterpret_cast<uint8_t*>(codes.data_ptr()), scale.data_ptr<float>(),
               tables[0].data_ptr<float>(), nearest, below, fp8, root, stochastic,
               static_cast<uint32_t>(k1), static_cast<uint32_t>(k2)};
}

Layout layout_of(int64_t numel, at::IntArrayRef args) {
  TORCH_CHECK(args.size() == 3, "layout: block, rows, offset");
  const int64_t block = args[0], rows = args[1];
  TORCH_CHECK(block >= 1 && rows >= 1 && numel % rows == 0, "bad block layout");
  const int64_t cols = numel / rows;
  const int64_t per_row = (cols + block - 1) / block;
  return Layout{cols, per_row, block, static_cast<uint32_t>(args[2])};
}

void adam_coded_(at::Tensor param, const at::Tensor& grad, std::optional<at::Tensor> master,
                 std::optional<at::Tensor> comp, at::Tensor m_codes, at::Tensor m_scale,
                 at::Tensor v_codes, at::Tensor v_scale, at::TensorList m_tables,
                 at::TensorList v_tables, at::ArrayRef<double> scalars,
                 int64_t weight_decay_mode, int64_t mode, int64_t k1, int64_t k2, int64_t offset,
                 at::IntArrayRef layout, at::IntArrayRef flags) {
  TORCH_CHECK(scalars.size() == 9, "adam_coded_ takes 9 scalars, got ", scalars.size());
  TORCH_CHECK(weight_decay_mode >= 0 && weight_decay_mode <= 2, "bad weight_decay_mode");
  TORCH_CHECK(flags.size() == 8, "flags: fp8, fresh, stochastic, v_root, mk1, mk2, vk1, vk2");
  const int64_t n = param.numel();
  const Layout l = layout_of(n, layout);
  const int64_t blocks = l.blocks_per_row * (n / l.cols);
  check_coded(m_codes, m_scale, "exp_avg", n, blocks);
  check_coded(v_codes, v_scale, "exp_avg_sq", n, blocks);
  const bool fp8 = flags[0] != 0, fresh = flags[1] != 0, stochastic = flags[2] != 0;
  const Coded m = coded_of(m_codes, m_scale, m_tables, fp8, false, stochastic, flags[4], flags[5]);
  const Coded v = coded_of(v_codes, v_scale, v_tables, fp8, flags[3] != 0, stochastic, flags[6],
                           flags[7]);
  AdamScalars s{static_cast<float>(scalars[0]), static_cast<float>(scalars[1]),
                static_cast<float>(scalars[2]), static_cast<float>(scalars[3]),
                static_cast<float>(scalars[4]), static_cast<float>(scalars[5]),
                static_cast<float>(scalars[6]), static_cast<float>(scalars[7]),
                static_cast<float>(scalars[8]), weight_decay_mode};
  dispatch(param, grad, master, comp, mode, k1, k2, offset, [&](auto wt, const uint16_t* g,
                                                                int64_t) {
    using F = typename decltype(wt)::Format;
    constexpr int64_t M = decltype(wt)::kMode;
    const int64_t grain = std::max<int64_t>(1, kGrain / l.block);
    at::parallel_for(0, blocks, grain, [&](int64_t t0, int64_t t1) {
      if (s.weight_decay_mode == 1) {
        adam_coded_range<F, M, 1>(wt, g, m, v, fresh, l, s, t0, t1);
      } else if (s.weight_decay_mode == 2) {
        adam_coded_range<F, M, 2>(wt, g, m, v, fresh, l, s, t0, t1);
      } else {
        adam_coded_range<F, M, 0>(wt, g, m, v, fresh, l, s, t0, t1);
      }
    });
  });
}

void sgd_coded_(at::Tensor param, const at::Tensor& grad, std::optional<at::Tensor> master,
                std::optional<at::Tensor> comp, at::Tensor codes, at::Tensor scale,
                at::TensorList tables, at::ArrayRef<double> scalars, bool first, bool nesterov,
                int64_t mode, int64_t k1, int64_t k2, int64_t offset, at::IntArrayRef layout,
                at::IntArrayRef flags) {
  TORCH_CHECK(scalars.size() == 5, "sgd_coded_ takes 5 scalars, got ", scalars.size());
  TORCH_CHECK(flags.size() == 4, "flags: fp8, stochastic, k1, k2");
  const int64_t n = param.numel();
  const Layout l = layout_of(n, layout);
  const int64_t blocks = l.blocks_per_row * (n / l.cols);
  check_coded(codes, scale, "momentum_buffer", n, blocks);
  const Coded c = coded_of(codes, scale, tables, flags[0] != 0, false, flags[1] != 0, flags[2],
                           flags[3]);
  SgdScalars s{static_cast<float>(scalars[0]), static_cast<float>(scalars[1]),
               static_cast<float>(scalars[2]), static_cast<float>(scalars[3]),
               static_cast<float>(scalars[4]), nesterov};
  const bool weight_decay = scalars[1] != 0.0;
  dispatch(param, grad, master, comp, mode, k1, k2, offset, [&](auto wt, const uint16_t* g,
                                                                int64_t) {
    using F = typename decltype(wt)::Format;
    constexpr int64_t M = decltype(wt)::kMode;
    const int64_t grain = std::max<int64_t>(1, kGrain / l.block);
    at::parallel_for(0, blocks, grain, [&](int64_t t0, int64_t t1) {
      if (first) {
        sgd_coded_range<F, M, 1>(wt, g, c, l, s, weight_decay, t0, t1);
      } else {
        sgd_coded_range<F, M, 2>(wt, g, c, l, s, weight_decay, t0, t1);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec_fused, m) {
  m.def(
      "adam_coded_(Tensor(a!) param, Tensor grad, Tensor(b!)? master, Tensor(c!)? compensation, "
      "Tensor(d!) m_codes, Tensor(e!) m_scale, Tensor(f!) v_codes, Tensor(g!) v_scale, "
      "Tensor[] m_tables, Tensor[] v_tables, float[] scalars, int weight_decay_mode, int mode, "
      "int k1, int k2, int offset, int[] layout, int[] flags) -> ()");
  m.def(
      "sgd_coded_(Tensor(a!) param, Tensor grad, Tensor(b!)? master, Tensor(c!)? compensation, "
      "Tensor(d!) codes, Tensor(e!) scale, Tensor[] tables, float[] scalars, bool first, "
      "bool nesterov, int mode, int k1, int k2, int offset, int[] layout, int[] flags) -> ()");
}

TORCH_LIBRARY_IMPL(mixprec_fused, CPU, m) {
  m.impl("adam_coded_", &adam_coded_);
  m.impl("sgd_coded_", &sgd_coded_);
}
