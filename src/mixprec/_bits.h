// The bit-level helpers every mixprec kernel uses, included textually (mixprec._cpp.load) inside
// each kernel's anonymous namespace, after the torch headers.

// Inlined into the loops: a call inside a loop stops it from vectorizing.
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

// A branch-free choice (bit masks), so that loops over it vectorize.
MIXPREC_INLINE uint32_t pick(bool condition, uint32_t a, uint32_t b) {
  uint32_t mask = 0u - static_cast<uint32_t>(condition);
  return (a & mask) | (b & ~mask);
}

// The bf16 bits of x rounded to nearest even; a NaN becomes the quiet NaN 0x7FC0, as
// c10::BFloat16 makes it.
MIXPREC_INLINE uint16_t bf16_nearest(float x) {
  uint32_t u = bits_of(x);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(pick(x != x, 0x7FC0u, rounded));
}

// A 16-bit or fp32 value as the fp32 number it is exactly.
MIXPREC_INLINE float widen(float x) { return x; }
MIXPREC_INLINE float widen(c10::BFloat16 x) { return float_of(uint32_t(x.x) << 16); }
MIXPREC_INLINE float widen(c10::Half x) { return static_cast<float>(x); }
