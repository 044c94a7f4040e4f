// Scalar arithmetic shared by the CPU path and the CUDA kernels.
//
// Every float step that decides an output byte lives here, written as plain
// IEEE single operations (no FMA: the CPU side builds with -ffp-contract=off,
// the CUDA side with -fmad=false; no fast-math, no flush-to-zero) and integer
// bit manipulation. Both sides call these same functions in the same order, so
// they produce the same bytes by construction; tests/kernels/ checks it.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#if defined(__CUDACC__)
#define KVQ_HD __host__ __device__ __forceinline__
#else
#define KVQ_HD inline
#endif

namespace kvstrata::kernels::math {

KVQ_HD float AsFloat(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

KVQ_HD uint32_t AsUint(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

KVQ_HD float Min(float a, float b) { return a < b ? a : b; }
KVQ_HD float Max(float a, float b) { return a > b ? a : b; }
KVQ_HD float Abs(float a) { return AsFloat(AsUint(a) & 0x7fffffffu); }

// Round to nearest integer, ties to even, for |x| <= 2^22: adding and
// removing 1.5 * 2^23 leaves the float add's own round-to-nearest-even on the
// integer grid. Plain IEEE adds (no libm call), so it vectorises on any x86-64
// and gives the same result on the device. Every caller's argument is small
// (|x| <= 127).
KVQ_HD float RoundEven(float x) {
  const float kMagic = 12582912.0f;
  float t = x + kMagic;
  return t - kMagic;
}

constexpr float kFltMinNormal = 1.17549435e-38f;  // 2^-126
constexpr float kFltMax = 3.40282347e+38f;

// ---- 16-bit float formats -------------------------------------------------

KVQ_HD bool HalfIsFinite(uint16_t h) { return (h & 0x7c00u) != 0x7c00u; }
KVQ_HD bool Bf16IsFinite(uint16_t h) { return (h & 0x7f80u) != 0x7f80u; }

// Exact for every finite half (subnormals included: the product by 2^112 is
// exact because flush-to-zero is off on both sides). The device uses its
// conversion instruction: an exact conversion has only one answer.
KVQ_HD float HalfToFloat(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#endif
  uint32_t em = h & 0x7fffu;
  float f = AsFloat(em << 13) * 5.192296858534828e+33f;  // 2^112
  if (em >= 0x7c00u) f = AsFloat(0x7f800000u | (em & 0x3ffu) << 13);
  return AsFloat(AsUint(f) | (uint32_t(h & 0x8000u) << 16));
}

KVQ_HD float Bf16ToFloat(uint16_t h) { return AsFloat(uint32_t(h) << 16); }

// Round to nearest even; overflow goes to infinity, NaN stays NaN. The device
// uses its round-to-nearest-even conversion instruction: a correctly rounded
// result is unique, and tests check this bit version against the host
// compiler's conversion for every half and a million random floats. (NaN
// payloads could differ; no NaN reaches a conversion that writes output.)
KVQ_HD uint16_t FloatToHalf(float x) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(x));
#endif
  uint32_t f = AsUint(x);
  uint32_t sign = f & 0x80000000u;
  f ^= sign;
  // All three cases are computed and one selected, so loops vectorise.
  // Infinity or NaN (>= 65536 rounds to infinity):
  uint32_t big = f > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // Below 2^-14 the result is subnormal: adding 0.5 lines the half's
  // subnormal lsb up with the float's lsb, so the (round-to-nearest-even)
  // float add does the rounding.
  uint32_t sub = AsUint(AsFloat(f) + 0.5f) - 0x3f000000u;
  // Normal: rebias the exponent ((15 - 127) << 23) and round the 13 dropped
  // bits to nearest even.
  uint32_t norm = (f + 0xc8000fffu + ((f >> 13) & 1u)) >> 13;
  uint32_t o = f >= 0x47800000u ? big : (f < 0x38800000u ? sub : norm);
  return uint16_t(o | (sign >> 16));
}

// Round to nearest even (the device: its correctly rounded instruction).
KVQ_HD uint16_t FloatToBf16(float x) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
#endif
  uint32_t f = AsUint(x);
  if ((f & 0x7fffffffu) > 0x7f800000u) return uint16_t((f >> 16) | 0x40u);  // quiet NaN
  f += 0x7fffu + ((f >> 16) & 1u);
  return uint16_t(f >> 16);
}

template <bool kBf16>
KVQ_HD float ToFloat(uint16_t h) {
  if constexpr (kBf16) return Bf16ToFloat(h); else return HalfToFloat(h);
}
template <bool kBf16>
KVQ_HD uint16_t FromFloat(float x) {
  if constexpr (kBf16) return FloatToBf16(x); else return FloatToHalf(x);
}
template <bool kBf16>
KVQ_HD bool IsFinite(uint16_t h) {
  if constexpr (kBf16) return Bf16IsFinite(h); else return HalfIsFinite(h);
}
// Largest finite value of the 16-bit type, as a float.
template <bool kBf16>
KVQ_HD float MaxFinite() {
  if constexpr (kBf16) return 3.38953139e+38f; else return 65504.0f;
}

// What dequantizing writes: a decoded value beyond the type's range (a KIVI
// scale rounded up at the top of fp16's range) saturates instead of
// becoming infinity.
template <bool kBf16>
KVQ_HD uint16_t FromFloatSat(float x) {
  const float m = MaxFinite<kBf16>();
  return FromFloat<kBf16>(Min(Max(x, -m), m));
}

// ---- fp8 e4m3 (OCP "fn": bias 7, no infinities, max 448) -------------------

// x must be finite. Saturates to +-448; rounds to nearest even. Branch-free
// (both cases computed, one selected) so loops vectorise.
KVQ_HD uint8_t FloatToE4m3(float x) {
  uint32_t f = AsUint(x);
  uint32_t sign = (f >> 24) & 0x80u;
  float a = AsFloat(f & 0x7fffffffu);
  // Below 2^-6: subnormal, steps of 2^-9 (the scaling is exact; 8 becomes
  // the smallest normal, code 0x08).
  uint32_t sub = uint32_t(RoundEven(Min(a, 0.015625f) * 512.0f));
  // Normal: round the float's mantissa to 3 bits (a carry moves into the
  // exponent), then rebias the exponent from 127 to 7.
  uint32_t b = AsUint(a);
  uint32_t norm = ((b + 0x7ffffu + ((b >> 20) & 1u)) >> 20) - (120u << 3);
  norm = norm > 0x7eu ? 0x7eu : norm;
  uint32_t code = a >= 448.0f ? 0x7eu : (a < 0.015625f ? sub : norm);
  return uint8_t(code | sign);
}

KVQ_HD float E4m3ToFloat(uint8_t c) {
  uint32_t exp = (c >> 3) & 0xfu;
  uint32_t mant = c & 7u;
  float v;
  if (exp == 0) {
    v = float(mant) * 0.001953125f;  // 2^-9, exact
  } else {
    v = AsFloat(((exp + 120u) << 23) | (mant << 20));
  }
  if ((c & 0x7fu) == 0x7fu) v = AsFloat(0x7fc00000u);  // the NaN code; never produced
  return (c & 0x80u) ? -v : v;
}

// ---- scales ------------------------------------------------------------------

// Scale of a symmetric format with `qmax` as the largest code magnitude.
// Kept at or above the smallest normal float so its reciprocal is finite.
KVQ_HD float SymmetricScale(float amax, float qmax) {
  float s = amax / qmax;
  return s < kFltMinNormal ? kFltMinNormal : s;
}
KVQ_HD float Reciprocal(float s) { return 1.0f / s; }

KVQ_HD int8_t Int8Code(float x, float rcp) {
  float v = x * rcp;
  v = Min(Max(v, -127.0f), 127.0f);
  return int8_t(int(RoundEven(v)));
}

// KIVI scale before it is stored in the block's 16-bit type.
template <bool kBf16>
KVQ_HD float KiviScale(float mn, float mx, float qmax) {
  float s = (mx - mn) / qmax;
  return Min(s, MaxFinite<kBf16>());
}
// Reciprocal of the stored (rounded) scale; 0 for a zero scale so a
// constant group gets code 0 and decodes to its zero point.
KVQ_HD float KiviReciprocal(float s) {
  if (!(s > 0.0f)) return 0.0f;
  float r = 1.0f / s;
  return r > kFltMax ? kFltMax : r;
}
KVQ_HD uint32_t KiviCode(float x, float zero, float rcp, float qmax) {
  float v = (x - zero) * rcp;
  v = Min(Max(v, 0.0f), qmax);
  return uint32_t(RoundEven(v));
}
KVQ_HD float KiviDecode(uint32_t q, float scale, float zero) {
  float t = float(q) * scale;
  return t + zero;
}

}  // namespace kvstrata::kernels::math
