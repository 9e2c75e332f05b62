// The random Hadamard transform of the weight-gradient GEMM's operands in one pass (see
// mixprec/blockscaled_build.py, hadamard_rows). Compiled after _blockscaled.cpp, in the same
// unit and library (torch.ops.mixprec_blockscaled), whose helpers (widen, MIXPREC_INLINE) it
// uses.
#include <immintrin.h>

namespace {

// The random Hadamard transform of mixprec.fp4_recipes.rht on a 16-bit x (rows x cols, cols a
// multiple of 16), zero rows appended up to `rows_out`, in one pass: out[16g + i, c] is the sum
// over k = 0..15, in that order and starting from 0, of r[k, i] * x[16g + k, c], each addition
// rounded to fp32: the order mixprec.fp4_recipes.rht defines (MKL's sgemm sums these products so
// too), so the result is the bits rht(pad(x.float())) gives (the tests hold the two to
// torch.equal of the bit patterns). r's entries are +-1/4 and a 16-bit value's lowest bit is
// 2**-133 or above, so every product is exact in fp32: a fused multiply-add rounds as adding the
// product does.
// Eight outputs of a column strip are summed at once, in registers, for eight independent chains.
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
using Lanes = __m512;
MIXPREC_INLINE Lanes lanes_load(const float* p) { return _mm512_loadu_ps(p); }
MIXPREC_INLINE void lanes_store(float* p, Lanes v) { _mm512_storeu_ps(p, v); }
MIXPREC_INLINE Lanes lanes_zero() { return _mm512_setzero_ps(); }
MIXPREC_INLINE Lanes lanes_madd(float r, Lanes x, Lanes acc) {
  return _mm512_fmadd_ps(_mm512_set1_ps(r), x, acc);
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t kLanes = 8;
using Lanes = __m256;
MIXPREC_INLINE Lanes lanes_load(const float* p) { return _mm256_loadu_ps(p); }
MIXPREC_INLINE void lanes_store(float* p, Lanes v) { _mm256_storeu_ps(p, v); }
MIXPREC_INLINE Lanes lanes_zero() { return _mm256_setzero_ps(); }
MIXPREC_INLINE Lanes lanes_madd(float r, Lanes x, Lanes acc) {
  return _mm256_fmadd_ps(_mm256_set1_ps(r), x, acc);
}
#else
constexpr int64_t kLanes = 1;
using Lanes = float;
MIXPREC_INLINE Lanes lanes_load(const float* p) { return *p; }
MIXPREC_INLINE void lanes_store(float* p, Lanes v) { *p = v; }
MIXPREC_INLINE Lanes lanes_zero() { return 0.0f; }
MIXPREC_INLINE Lanes lanes_madd(float r, Lanes x, Lanes acc) { return acc + r * x; }
#endif

template <typename T>
void hadamard_rows(const T* x, const float* r, float* out, int64_t rows, int64_t rows_out,
                   int64_t cols) {
  constexpr int64_t G = 16, H = 8;  // a group's rows; the outputs summed together
  at::parallel_for(0, rows_out / G, 1, [&](int64_t g0, int64_t g1) {
    alignas(64) float in[G][kLanes];
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t c0 = 0; c0 < cols; c0 += kLanes) {
        for (int64_t k = 0; k < G; ++k) {
          const int64_t row = g * G + k;
          if (row < rows) {
            const T* src = x + row * cols + c0;
            for (int64_t c = 0; c < kLanes; ++c) in[k][c] = widen(src[c]);
          } else {
            for (int64_t c = 0; c < kLanes; ++c) in[k][c] = 0.0f;  // the appended zero rows
          }
        }
        for (int64_t h = 0; h < G; h += H) {
          Lanes acc[H];
#pragma GCC unroll 8
          for (int64_t j = 0; j < H; ++j) acc[j] = lanes_zero();
#pragma GCC unroll 16
          for (int64_t k = 0; k < G; ++k) {
            const Lanes v = lanes_load(in[k]);
#pragma GCC unroll 8
            for (int64_t j = 0; j < H; ++j) acc[j] = lanes_madd(r[k * G + h + j], v, acc[j]);
          }
#pragma GCC unroll 8
          for (int64_t j = 0; j < H; ++j) lanes_store(out + (g * G + h + j) * cols + c0, acc[j]);
        }
      }
    }
  });
}

at::Tensor rht(const at::Tensor& x, const at::Tensor& r, int64_t rows_out) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "blockscaled.rht: a contiguous 2-D tensor");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "blockscaled.rht: a bf16 or fp16 tensor");
  TORCH_CHECK(r.dim() == 2 && r.size(0) == 16 && r.size(1) == 16 && r.is_contiguous() &&
                  r.scalar_type() == at::kFloat,
              "blockscaled.rht: a contiguous 16x16 fp32 transform");
  const int64_t rows = x.size(0), cols = x.size(1);
  TORCH_CHECK(cols % 16 == 0 && rows_out % 16 == 0 && rows_out >= rows,
              "blockscaled.rht: columns and rows_out multiples of 16, rows_out >= rows");
  at::Tensor out = at::empty({rows_out, cols}, x.options().dtype(at::kFloat));
  const float* rp = r.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (x.scalar_type() == at::kBFloat16) {
    hadamard_rows(x.data_ptr<c10::BFloat16>(), rp, op, rows, rows_out, cols);
  } else {
    hadamard_rows(x.data_ptr<c10::Half>(), rp, op, rows, rows_out, cols);
  }
  return out;
}

at::Tensor rht_meta(const at::Tensor& x, const at::Tensor&, int64_t rows_out) {
  return at::empty({rows_out, x.size(1)}, x.options().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec_blockscaled, m) {
  m.def("rht(Tensor x, Tensor r, int rows_out) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixprec_blockscaled, CPU, m) { m.impl("rht", &rht); }

TORCH_LIBRARY_IMPL(mixprec_blockscaled, Meta, m) { m.impl("rht", &rht_meta); }
