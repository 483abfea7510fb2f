// Internal: the element-wise math of the codecs, shared by the CPU reference (lib/compress,
// g++) and the CUDA kernels (nvcc), so that both produce the same bits.
//
// C++17, header-only, no CUDA headers. Every floating-point operation that decides a result
// goes through add_rn / mul_rn / div_rn, which on the device are the explicitly rounded
// intrinsics: nvcc would otherwise contract a * b + c into an FMA and the GPU would round
// differently from the CPU (lib/compress is compiled with -ffp-contract=off for the same
// reason). Functions are branch-free selects so that g++ vectorises the loops that call them.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MT_HD __host__ __device__ __forceinline__
#else
#define MT_HD inline __attribute__((always_inline))
#endif

namespace meshtrain::compress::math {

MT_HD uint32_t f2u(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return __builtin_bit_cast(uint32_t, f);
#endif
}
MT_HD float u2f(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return __builtin_bit_cast(float, u);
#endif
}
MT_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
MT_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
MT_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
MT_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// c ? a : b for c in {0, 1}, without a branch.
MT_HD uint32_t select(uint32_t c, uint32_t a, uint32_t b) {
  uint32_t m = 0u - c;
  return (a & m) | (b & ~m);
}

// 1 when the fp32 bits are NaN or +-Inf.
MT_HD uint32_t nonfinite(uint32_t bits) { return (bits & 0x7f800000u) == 0x7f800000u; }

// ---- fp16. Round to nearest even; finite inputs only. |x| >= 65520 (which would round to
// Inf) is clamped to +-65504 and counted in `clamped`; a non-zero x that rounds to +-0 is
// counted in `flushed`. Equal to collective/half.h's float_to_half for every finite input that
// does not clamp (tests/compress check all cases).
MT_HD uint16_t fp32_to_fp16(uint32_t b, uint32_t& clamped, uint32_t& flushed) {
  uint32_t sign = (b >> 16) & 0x8000u;
  uint32_t a = b & 0x7fffffffu;
  uint32_t over = a >= 0x477ff000u;
  clamped += over;
  a = select(over, 0x477fe000u, a);  // 65504
  // Subnormal or zero in fp16: adding 0.5 (bits 126 << 23), whose ulp 2^-24 is the fp16
  // subnormal unit, puts the 10 mantissa bits at the bottom of the float; the float addition
  // rounds to nearest even.
  uint32_t sub = f2u(add_rn(u2f(a), u2f(126u << 23))) - (126u << 23);
  uint32_t norm = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;  // rebias exponent, round even
  uint32_t r = select(a < (113u << 23), sub, norm);
  flushed += (a != 0u) & (r == 0u);
  return static_cast<uint16_t>(r | sign);
}
MT_HD uint32_t fp16_special(uint16_t h) { return (h & 0x7c00u) == 0x7c00u; }  // Inf or NaN
MT_HD float fp16_to_fp32(uint16_t h) {
  uint32_t u = h;
  uint32_t m = (u & 0x7fffu) << 13;
  uint32_t e = m & (0x7c00u << 13);
  uint32_t normal = m + (112u << 23);
  uint32_t sub = f2u(sub_rn(u2f(m + (113u << 23)), u2f(113u << 23)));  // exact
  uint32_t r = select(e == 0u, sub, normal);
  return u2f(r | ((u & 0x8000u) << 16));
}

// ---- bf16. Round to nearest even; finite inputs only; |x| that would round to Inf is
// clamped to +-(largest bf16) and counted; non-zero results of 0 are counted in `flushed`.
MT_HD uint16_t fp32_to_bf16(uint32_t b, uint32_t& clamped, uint32_t& flushed) {
  uint32_t a = b & 0x7fffffffu;
  uint32_t over = a >= 0x7f7f8000u;
  clamped += over;
  uint32_t r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  r = select(over, ((b >> 16) & 0x8000u) | 0x7f7fu, r);
  flushed += (a != 0u) & ((r & 0x7fffu) == 0u);
  return static_cast<uint16_t>(r);
}
MT_HD uint32_t bf16_special(uint16_t h) { return (h & 0x7f80u) == 0x7f80u; }
MT_HD float bf16_to_fp32(uint16_t h) { return u2f(static_cast<uint32_t>(h) << 16); }

// ---- int8 blockwise.
constexpr float kInt8Max = 127.0f;

// scale = absmax / 127 (the value one quantum stands for); inverse = 127 / absmax; both 0 for
// a block whose absmax is below 2^-120, all-zero blocks included. Below that 127 / absmax
// overflows to Inf: every non-zero element became +-127 and every zero 0 * Inf = NaN, a NaN
// residual that silenced the block for good (a block without gradient for ~14 steps of error
// feedback decays that far). Such a block is sent as zeros and its residual keeps the values.
constexpr float kInt8MinAbsmax = 0x1p-120f;  // 127 / 2^-120 < FLT_MAX
// The largest scale whose 127 quanta stay finite: FLT_MAX / 127 rounds up, and 127 times it is
// Inf, so a block whose absmax is FLT_MAX takes this one (decoded 127 is 3.4028233e38, and the
// residual keeps the difference). The decoders refuse larger scales.
constexpr float kInt8MaxScale = 0x1.020406p+121f;  // 2.6793884e36
MT_HD float int8_scale(float absmax) {
  const float scale = absmax >= kInt8MinAbsmax ? div_rn(absmax, kInt8Max) : 0.0f;
  return scale > kInt8MaxScale ? kInt8MaxScale : scale;
}
MT_HD float int8_inverse(float absmax) { return absmax >= kInt8MinAbsmax ? div_rn(kInt8Max, absmax) : 0.0f; }

// Round to nearest even for |y| < 2^22: the addition of 1.5 * 2^23 drops the fraction bits.
MT_HD float round_even(float y) { return sub_rn(add_rn(y, 12582912.0f), 12582912.0f); }
MT_HD float clamp127(float t) {
  t = t > kInt8Max ? kInt8Max : t;
  return t < -kInt8Max ? -kInt8Max : t;
}
// floor(z) for |z| < 2^22: round to nearest even, then step down where that rounded up. The
// "rounded up" test compares bits, not floats: with -ftrapping-math (the default) g++ will not
// vectorise a float comparison that feeds arithmetic.
MT_HD float floor_small(float z) {
  const float r = round_even(z);
  const uint32_t up = (f2u(sub_rn(r, z)) - 1u) < 0x7f800000u;  // r - z > 0 (finite)
  return sub_rn(r, u2f(up * 0x3f800000u));                      // r - 1.0f or r - 0.0f
}

// Stochastic rounding noise: a counter-based hash, so the result depends only on (seed, step,
// block, element index) and not on how the work is split between threads.
MT_HD uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}
MT_HD uint32_t block_key(uint64_t seed, uint64_t step, uint64_t block) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * (step + 1) + 0xbf58476d1ce4e5b9ull * (block + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return static_cast<uint32_t>(z ^ (z >> 31));
}
// Uniform in [0, 1) with 24 bits.
MT_HD float noise(uint32_t key, uint32_t element_in_block) {
  return static_cast<float>(mix32(key ^ (element_in_block * 0x9e3779b9u)) >> 8) *
         (1.0f / 16777216.0f);
}

// q for one element of a block: y = v * inverse, rounded (nearest even, or floor(y + u) with
// u = noise), clamped to [-127, 127]. Returned as a float holding an integer.
MT_HD float int8_nearest(float v, float inverse) { return clamp127(round_even(mul_rn(v, inverse))); }
MT_HD float int8_stochastic(float v, float inverse, float u) {
  return clamp127(floor_small(add_rn(mul_rn(v, inverse), u)));
}
// What the decoder reconstructs; the residual is v - int8_value(q, scale).
MT_HD float int8_value(float q, float scale) { return mul_rn(q, scale); }

// ---- top-k: the selection key of v (bits of |v|, monotonic in |v| for finite v).
MT_HD uint32_t magnitude_key(float v) { return f2u(v) & 0x7fffffffu; }

// The element that sample s of m reads from n elements (api.h topk_sample_plan; m <= n < 2^32):
// stratum s is [s n / m, (s + 1) n / m), so the strata cover all n, and the offset in it is
// hashed, so that data laid out in runs or periods (rows of a weight matrix) is sampled like
// shuffled data.
MT_HD uint64_t topk_sample_index(uint64_t s, uint64_t n, uint64_t m) {
  const uint64_t begin = s * n / m, width = (s + 1) * n / m - begin;
  return begin + mix32(static_cast<uint32_t>(s) * 0x9e3779b9u + 0x7f4a7c15u) % width;
}

// ---- PowerSGD's products (lib/compress/powersgd.cpp, powersgd_kernels.cuh). The sums run in
// double, in a fixed order; a float times a float is exact in double, so only the additions
// round, and an FMA would round the same (the explicit intrinsics keep nvcc honest anyway).
MT_HD double dadd_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
MT_HD double dmul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
// acc[l] += sum over j ascending of m_row[j] * q[j r + l], for the r columns of Q: one row of
// P = M Q (acc starts at 0).
MT_HD void lowrank_project_row(const float* m_row, const float* q, uint64_t cols, uint32_t r, double* acc) {
  for (uint64_t j = 0; j < cols; ++j) {
    const double v = m_row[j];
    const float* qj = q + j * r;
    for (uint32_t l = 0; l < r; ++l) acc[l] = dadd_rn(acc[l], dmul_rn(v, qj[l]));
  }
}
// One element of P Q^T: sum over l ascending of p_row[l] * q_row[l], in float. What decode
// writes and what the residual subtracts, bit for bit.
MT_HD float lowrank_element(const float* p_row, const float* q_row, uint32_t r) {
  float acc = 0.0f;
  for (uint32_t l = 0; l < r; ++l) acc = add_rn(acc, mul_rn(p_row[l], q_row[l]));
  return acc;
}

}  // namespace meshtrain::compress::math
