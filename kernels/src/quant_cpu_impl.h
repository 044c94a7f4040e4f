// The CPU row loops, compiled once per instruction-set variant
// (quant_cpu_generic.cc, quant_cpu_avx2.cc); quant_cpu.cc picks one at run
// time. The per-element arithmetic is quant_math.h's, shared with the CUDA
// kernels; reductions run on ordered integer keys (ordered.h). Inner loops are
// plain counted loops over one row so the compiler vectorises them. Every
// variant produces the same bytes: vector and scalar IEEE single operations
// round alike, and no variant may enable FMA contraction.
//
// REQUIRES: KVQ_CPU_VARIANT names the variant's namespace.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#endif

#include "layout.h"
#include "ordered.h"
#include "quant_cpu_variants.h"
#include "quant_math.h"
#include "kvstrata/kernels/quant.h"

namespace kvstrata::kernels::KVQ_CPU_VARIANT {
namespace {


using namespace math;

Status NonFinite(const Layout y, uint64_t row) {
  // row = ((l * 2 + kv) * T + t) * H + h
  uint64_t h = row % y.H, t = row / y.H % y.T, kv = row / y.H / y.T % 2, l = row / y.H / y.T / 2;
  return Status{Code::kNonFinite, "input holds NaN or Inf at layer " + std::to_string(l) +
                                      (kv ? " V" : " K") + " token " + std::to_string(t) +
                                      " head " + std::to_string(h)};
}

uint32_t RowAbsMax(const uint16_t* x, uint32_t n) {
  uint32_t m = 0;
  for (uint32_t i = 0; i < n; ++i) m = std::max(m, AbsBits(x[i]));
  return m;
}

// Packs 8-bit codes (values < 2^bits) little-end first into bytes.
void Pack(const uint8_t* c, uint32_t n, uint32_t bits, uint8_t* out) {
  if (bits == 4) {
    for (uint32_t i = 0; i < n / 2; ++i) out[i] = uint8_t(c[2 * i] | c[2 * i + 1] << 4);
  } else {
    for (uint32_t i = 0; i < n / 4; ++i)
      out[i] = uint8_t(c[4 * i] | c[4 * i + 1] << 2 | c[4 * i + 2] << 4 | c[4 * i + 3] << 6);
  }
}

// Inverse of Pack().
void Unpack(const uint8_t* in, uint32_t n, uint32_t bits, uint8_t* c) {
  if (bits == 4) {
    for (uint32_t i = 0; i < n / 2; ++i) {
      c[2 * i] = in[i] & 15;
      c[2 * i + 1] = in[i] >> 4;
    }
  } else {
    for (uint32_t i = 0; i < n / 4; ++i) {
      c[4 * i] = in[i] & 3;
      c[4 * i + 1] = (in[i] >> 2) & 3;
      c[4 * i + 2] = (in[i] >> 4) & 3;
      c[4 * i + 3] = in[i] >> 6;
    }
  }
}

// Reads a row of the block's dtype as floats: ToFloat(). With F16C, fp16
// rows use the processor's conversion (exact, so the same values).
template <bool B>
void LoadRow(const uint16_t* x, uint32_t n, float* f) {
  uint32_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  if constexpr (!B) {
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
  }
#endif
  for (; i < n; ++i) f[i] = ToFloat<B>(x[i]);
}

template <bool B>
Status QuantFp8(const Layout y, const uint16_t* in, float* scales, uint8_t* codes) {
  const uint64_t slab = uint64_t(y.T) * y.H * y.D;
  std::vector<uint32_t> amax(y.H);
  std::vector<float> rcp(y.H), f(y.D);
  for (uint64_t s = 0; s < 2ull * y.L; ++s) {
    const uint16_t* x = in + s * slab;
    std::fill(amax.begin(), amax.end(), 0);
    for (uint32_t t = 0; t < y.T; ++t) {
      for (uint32_t h = 0; h < y.H; ++h) {
        uint32_t m = RowAbsMax(x + (uint64_t(t) * y.H + h) * y.D, y.D);
        if (m >= InfBits<B>()) return NonFinite(y, (s * y.T + t) * y.H + h);
        amax[h] = std::max(amax[h], m);
      }
    }
    for (uint32_t h = 0; h < y.H; ++h) {
      float sc = SymmetricScale(ToFloat<B>(uint16_t(amax[h])), 448.0f);
      scales[s * y.H + h] = sc;
      rcp[h] = Reciprocal(sc);
    }
    uint8_t* c = codes + s * slab;
    for (uint64_t r = 0; r < uint64_t(y.T) * y.H; ++r) {
      const float k = rcp[r % y.H];
      const uint16_t* xr = x + r * y.D;
      uint8_t* cr = c + r * y.D;
      LoadRow<B>(xr, y.D, f.data());
      for (uint32_t d = 0; d < y.D; ++d) cr[d] = FloatToE4m3(f[d] * k);
    }
  }
  return Status{};
}

template <bool B>
Status QuantInt8(const Layout y, const uint16_t* in, float* scales, uint8_t* codes) {
  std::vector<float> f(y.D);
  const uint64_t rows = 2ull * y.L * y.T * y.H;
  for (uint64_t r = 0; r < rows; ++r) {
    const uint16_t* x = in + r * y.D;
    uint32_t m = RowAbsMax(x, y.D);
    if (m >= InfBits<B>()) return NonFinite(y, r);
    float sc = SymmetricScale(ToFloat<B>(uint16_t(m)), 127.0f);
    scales[r] = sc;
    const float k = Reciprocal(sc);
    int8_t* c = reinterpret_cast<int8_t*>(codes + r * y.D);
    LoadRow<B>(x, y.D, f.data());
    for (uint32_t d = 0; d < y.D; ++d) c[d] = Int8Code(f[d], k);
  }
  return Status{};
}

// KIVI groups' stored metadata (scale16, zero16 interleaved into `meta`) and
// the values quantizing needs (zero, rcp), for n groups from their min and
// max keys. One counted loop, so it vectorises (divisions included).
template <bool B>
void MakeGroups(const uint32_t* lo, const uint32_t* hi, uint32_t n, float qmax, uint16_t* meta, float* zero,
                float* rcp) {
  for (uint32_t j = 0; j < n; ++j) {
    uint16_t z16 = FromOrderKey(lo[j]);
    float mn = ToFloat<B>(z16), mx = ToFloat<B>(FromOrderKey(hi[j]));
    uint16_t s16 = FromFloat<B>(KiviScale<B>(mn, mx, qmax));
    meta[2 * j] = s16;
    meta[2 * j + 1] = z16;
    zero[j] = mn;
    rcp[j] = KiviReciprocal(ToFloat<B>(s16));
  }
}

template <bool B>
Status QuantKivi(const Layout y, const uint16_t* in, uint16_t* meta, uint8_t* codes) {
  const float qmax = float((1u << y.bits) - 1);
  const uint32_t row_elems = y.H * y.D;  // one token of one slab
  const uint64_t slab = uint64_t(y.T) * row_elems;
  const uint32_t row_groups = y.H * y.DG;  // value groups in one token
  std::vector<uint32_t> mn(row_elems), mx(row_elems), am(row_elems);
  std::vector<float> zero(row_elems), rcp(row_elems), gzero(row_groups), grcp(row_groups), f(row_elems);
  std::vector<uint8_t> c(row_elems);
  uint16_t* kmeta = meta;
  uint16_t* vmeta = meta + 2 * y.k_meta_entries;
  for (uint32_t l = 0; l < y.L; ++l) {
    // Keys: per channel, groups of G tokens.
    const uint16_t* k = in + (2ull * l) * slab;
    for (uint32_t tg = 0; tg < y.TG; ++tg) {
      uint32_t t0 = tg * y.G, t1 = std::min(y.T, t0 + y.G);
      std::fill(mn.begin(), mn.end(), 0xffffu);
      std::fill(mx.begin(), mx.end(), 0u);
      std::fill(am.begin(), am.end(), 0u);
      for (uint32_t t = t0; t < t1; ++t) {
        const uint16_t* x = k + t * uint64_t(row_elems);
        for (uint32_t j = 0; j < row_elems; ++j) {
          uint32_t key = OrderKey(x[j]);
          mn[j] = std::min(mn[j], key);
          mx[j] = std::max(mx[j], key);
          am[j] = std::max(am[j], AbsBits(x[j]));
        }
      }
      if (*std::max_element(am.begin(), am.end()) >= InfBits<B>()) {
        for (uint32_t t = t0; t < t1; ++t)
          for (uint32_t h = 0; h < y.H; ++h)
            if (RowAbsMax(k + t * uint64_t(row_elems) + h * y.D, y.D) >= InfBits<B>())
              return NonFinite(y, ((2ull * l) * y.T + t) * y.H + h);
      }
      MakeGroups<B>(mn.data(), mx.data(), row_elems, qmax,
                    kmeta + 2 * ((uint64_t(l) * y.TG + tg) * row_elems), zero.data(), rcp.data());
      for (uint32_t t = t0; t < t1; ++t) {
        const uint16_t* x = k + t * uint64_t(row_elems);
        LoadRow<B>(x, row_elems, f.data());
        for (uint32_t j = 0; j < row_elems; ++j) c[j] = uint8_t(KiviCode(f[j], zero[j], rcp[j], qmax));
        Pack(c.data(), row_elems, y.bits, codes + ((2ull * l) * slab + t * uint64_t(row_elems)) * y.bits / 8);
      }
    }
    // Values: per token, groups of G channels; one token (all heads) at a time.
    const uint16_t* v = in + (2ull * l + 1) * slab;
    for (uint32_t t = 0; t < y.T; ++t) {
      const uint16_t* x = v + t * uint64_t(row_elems);
      for (uint32_t h = 0; h < y.H; ++h) {
        if (RowAbsMax(x + h * y.D, y.D) >= InfBits<B>()) return NonFinite(y, ((2ull * l + 1) * y.T + t) * y.H + h);
        for (uint32_t g = 0; g < y.DG; ++g) {
          uint32_t d0 = h * y.D + g * y.G, d1 = h * y.D + std::min(y.D, (g + 1) * y.G);
          uint32_t lo = 0xffffu, hi = 0;
          for (uint32_t d = d0; d < d1; ++d) {
            lo = std::min(lo, OrderKey(x[d]));
            hi = std::max(hi, OrderKey(x[d]));
          }
          mn[h * y.DG + g] = lo;
          mx[h * y.DG + g] = hi;
        }
      }
      MakeGroups<B>(mn.data(), mx.data(), row_groups, qmax, vmeta + 2 * (uint64_t(l) * y.T + t) * row_groups,
                    gzero.data(), grcp.data());
      for (uint32_t g = 0; g < row_groups; ++g) {  // each channel's group constants
        uint32_t h = g / y.DG, d0 = h * y.D + g % y.DG * y.G, d1 = std::min(d0 + y.G, (h + 1) * y.D);
        std::fill(zero.begin() + d0, zero.begin() + d1, gzero[g]);
        std::fill(rcp.begin() + d0, rcp.begin() + d1, grcp[g]);
      }
      LoadRow<B>(x, row_elems, f.data());
      for (uint32_t j = 0; j < row_elems; ++j) c[j] = uint8_t(KiviCode(f[j], zero[j], rcp[j], qmax));
      Pack(c.data(), row_elems, y.bits, codes + ((2ull * l + 1) * slab + t * uint64_t(row_elems)) * y.bits / 8);
    }
  }
  return Status{};
}

// Writes decoded floats as the block's dtype: FromFloatSat(). With F16C,
// fp16 rows use the processor's conversion (round to nearest even, the one
// correctly rounded answer) after the same saturating clamp (max/min with
// the same NaN and signed-zero behaviour as Max/Min).
template <bool B>
void StoreRow(const float* v, uint32_t n, uint16_t* out) {
  uint32_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  if constexpr (!B) {
    const __m256 lo = _mm256_set1_ps(-65504.0f), hi = _mm256_set1_ps(65504.0f);
    for (; i + 8 <= n; i += 8) {
      __m256 x = _mm256_min_ps(_mm256_max_ps(_mm256_loadu_ps(v + i), lo), hi);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                       _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
#endif
  for (; i < n; ++i) out[i] = FromFloatSat<B>(v[i]);
}

template <bool B>
void DequantFp8(const Layout y, const float* scales, const uint8_t* codes, uint16_t* out) {
  const uint64_t slab_rows = uint64_t(y.T) * y.H;
  std::vector<float> f(y.D);
  for (uint64_t r = 0; r < 2ull * y.L * slab_rows; ++r) {
    const float s = scales[r / slab_rows * y.H + r % y.H];
    const uint8_t* c = codes + r * y.D;
    for (uint32_t d = 0; d < y.D; ++d) f[d] = E4m3ToFloat(c[d]) * s;
    StoreRow<B>(f.data(), y.D, out + r * y.D);
  }
}

template <bool B>
void DequantInt8(const Layout y, const float* scales, const uint8_t* codes, uint16_t* out) {
  std::vector<float> f(y.D);
  for (uint64_t r = 0; r < 2ull * y.L * y.T * y.H; ++r) {
    const float s = scales[r];
    const int8_t* c = reinterpret_cast<const int8_t*>(codes + r * y.D);
    for (uint32_t d = 0; d < y.D; ++d) f[d] = float(c[d]) * s;
    StoreRow<B>(f.data(), y.D, out + r * y.D);
  }
}

// Decodes one row of codes with per-element scale and zero point; `f` is
// scratch of n floats.
template <bool B>
void DecodeRow(const uint8_t* c, const float* scale, const float* zero, uint32_t n, float* f, uint16_t* out) {
  for (uint32_t j = 0; j < n; ++j) f[j] = KiviDecode(c[j], scale[j], zero[j]);
  StoreRow<B>(f, n, out);
}

template <bool B>
void DequantKivi(const Layout y, const uint16_t* meta, const uint8_t* codes, uint16_t* out) {
  const uint32_t row_elems = y.H * y.D;
  const uint64_t slab = uint64_t(y.T) * row_elems;
  const uint16_t* kmeta = meta;
  const uint16_t* vmeta = meta + 2 * y.k_meta_entries;
  const uint32_t row_groups = y.H * y.DG;
  std::vector<float> scale(row_elems), zero(row_elems), gscale(row_groups), gzero(row_groups), f(row_elems);
  std::vector<uint8_t> c(row_elems);
  for (uint32_t l = 0; l < y.L; ++l) {
    for (uint32_t t = 0; t < y.T; ++t) {
      if (t % y.G == 0) {  // a new key group: its per-channel scales and zero points
        const uint16_t* m = kmeta + 2 * (uint64_t(l) * y.TG + t / y.G) * row_elems;
        for (uint32_t j = 0; j < row_elems; ++j) {
          scale[j] = ToFloat<B>(m[2 * j]);
          zero[j] = ToFloat<B>(m[2 * j + 1]);
        }
      }
      uint64_t e0 = (2ull * l) * slab + uint64_t(t) * row_elems;
      Unpack(codes + e0 * y.bits / 8, row_elems, y.bits, c.data());
      DecodeRow<B>(c.data(), scale.data(), zero.data(), row_elems, f.data(), out + e0);
    }
    for (uint32_t t = 0; t < y.T; ++t) {  // values: one token (all heads) at a time
      const uint16_t* m = vmeta + 2 * (uint64_t(l) * y.T + t) * row_groups;
      for (uint32_t g = 0; g < row_groups; ++g) {
        gscale[g] = ToFloat<B>(m[2 * g]);
        gzero[g] = ToFloat<B>(m[2 * g + 1]);
      }
      for (uint32_t g = 0; g < row_groups; ++g) {
        uint32_t h = g / y.DG, d0 = h * y.D + g % y.DG * y.G, d1 = std::min(d0 + y.G, (h + 1) * y.D);
        std::fill(scale.begin() + d0, scale.begin() + d1, gscale[g]);
        std::fill(zero.begin() + d0, zero.begin() + d1, gzero[g]);
      }
      uint64_t e0 = (2ull * l + 1) * slab + uint64_t(t) * row_elems;
      Unpack(codes + e0 * y.bits / 8, row_elems, y.bits, c.data());
      DecodeRow<B>(c.data(), scale.data(), zero.data(), row_elems, f.data(), out + e0);
    }
  }
}

template <bool B>
Status QuantizeTyped(const Layout y, Format f, const uint16_t* in, uint8_t* meta, uint8_t* codes) {
  switch (f) {
    case Format::kFp8E4m3: return QuantFp8<B>(y, in, reinterpret_cast<float*>(meta), codes);
    case Format::kInt8: return QuantInt8<B>(y, in, reinterpret_cast<float*>(meta), codes);
    default: return QuantKivi<B>(y, in, reinterpret_cast<uint16_t*>(meta), codes);
  }
}

template <bool B>
void DequantizeTyped(const Layout y, Format f, const uint8_t* meta, const uint8_t* codes, uint16_t* out) {
  switch (f) {
    case Format::kFp8E4m3: return DequantFp8<B>(y, reinterpret_cast<const float*>(meta), codes, out);
    case Format::kInt8: return DequantInt8<B>(y, reinterpret_cast<const float*>(meta), codes, out);
    default: return DequantKivi<B>(y, reinterpret_cast<const uint16_t*>(meta), codes, out);
  }
}

}  // namespace

Status QuantizeRows(const Layout& y, Format f, DType dt, const uint16_t* in, uint8_t* meta, uint8_t* codes) {
  return dt == DType::kBf16 ? QuantizeTyped<true>(y, f, in, meta, codes) : QuantizeTyped<false>(y, f, in, meta, codes);
}

void DequantizeRows(const Layout& y, Format f, DType dt, const uint8_t* meta, const uint8_t* codes, uint16_t* out) {
  if (dt == DType::kBf16) DequantizeTyped<true>(y, f, meta, codes, out);
  else DequantizeTyped<false>(y, f, meta, codes, out);
}

}  // namespace kvstrata::kernels::KVQ_CPU_VARIANT
