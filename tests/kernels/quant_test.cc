// CPU quantize/dequantize: error bounds, NaN/Inf, odd shapes, header checks
// and the scalar conversions every format is built on.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kv_random.h"
#include "layout.h"
#include "ordered.h"
#include "quant_cpu_variants.h"
#include "quant_math.h"
#include "kvstrata/kernels/quant.h"

namespace kvstrata::kernels {
namespace {

using testing::FromFloat;
using testing::RandomBlock;
using testing::ToFloat;

uint64_t FreshSeed() { return std::random_device{}() ^ (uint64_t(std::random_device{}()) << 32); }

std::vector<uint8_t> Encode(const QuantParams& p, const std::vector<uint16_t>& in) {
  std::vector<uint8_t> out(EncodedBytes(p));
  Status st = Quantize(p, in.data(), in.size() * 2, out.data(), out.size());
  EXPECT_TRUE(st.ok()) << st.message;
  return out;
}

std::vector<uint16_t> Decode(const std::vector<uint8_t>& enc) {
  Header h;
  EXPECT_TRUE(ParseHeader(enc.data(), enc.size(), &h).ok());
  std::vector<uint16_t> out(ElementCount(h.params.shape));
  Status st = Dequantize(enc.data(), enc.size(), out.data(), out.size() * 2);
  EXPECT_TRUE(st.ok()) << st.message;
  return out;
}

// Index helpers over [L][2][T][H][D].
struct Idx {
  uint32_t l, kv, t, h, d;
};
Idx Split(const BlockShape& s, uint64_t e) {
  Idx i;
  i.d = e % s.head_dim;
  e /= s.head_dim;
  i.h = e % s.kv_heads;
  e /= s.kv_heads;
  i.t = e % s.tokens;
  e /= s.tokens;
  i.kv = e % 2;
  i.l = uint32_t(e / 2);
  return i;
}
uint64_t Join(const BlockShape& s, Idx i) {
  return ((((uint64_t(i.l) * 2 + i.kv) * s.tokens + i.t) * s.kv_heads + i.h) * s.head_dim + i.d);
}

// The documented per-element bound (kernels/README.md, "Error bounds").
std::vector<double> Bounds(const QuantParams& p, const std::vector<uint16_t>& in) {
  const BlockShape& s = p.shape;
  const double out_rel = p.dtype == DType::kBf16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
  const double out_abs = std::ldexp(1.0, -24);
  std::vector<double> x(in.size());
  for (size_t i = 0; i < in.size(); ++i) x[i] = ToFloat(p.dtype, in[i]);
  std::vector<double> b(in.size());
  for (uint64_t e = 0; e < in.size(); ++e) {
    Idx i = Split(s, e);
    double q;  // quantization step bound before the output rounding
    double ax = std::fabs(x[e]);
    if (p.format == Format::kFp8E4m3) {
      double amax = 0;
      for (uint32_t t = 0; t < s.tokens; ++t)
        for (uint32_t d = 0; d < s.head_dim; ++d) amax = std::max(amax, std::fabs(x[Join(s, {i.l, i.kv, t, i.h, d})]));
      q = ax * 0.0625 * (1 + 1e-6) + amax / 448 * std::ldexp(1.0, -10);
    } else if (p.format == Format::kInt8) {
      double amax = 0;
      for (uint32_t d = 0; d < s.head_dim; ++d) amax = std::max(amax, std::fabs(x[Join(s, {i.l, i.kv, i.t, i.h, d})]));
      q = amax / 127 * 0.5 * (1 + 1e-5);
    } else {
      double qmax = p.format == Format::kInt4Kivi ? 15 : 3;
      double mn = INFINITY, mx = -INFINITY;
      const uint32_t G = p.group_size;
      if (i.kv == 0) {
        for (uint32_t t = i.t / G * G; t < std::min(s.tokens, i.t / G * G + G); ++t) {
          double v = x[Join(s, {i.l, 0, t, i.h, i.d})];
          mn = std::min(mn, v), mx = std::max(mx, v);
        }
      } else {
        for (uint32_t d = i.d / G * G; d < std::min(s.head_dim, i.d / G * G + G); ++d) {
          double v = x[Join(s, {i.l, 1, i.t, i.h, d})];
          mn = std::min(mn, v), mx = std::max(mx, v);
        }
      }
      double step = (mx - mn) / qmax;
      q = step * (0.5 + qmax * out_rel) * (1 + 1e-5);
    }
    b[e] = q + (ax + q) * out_rel + out_abs;
  }
  return b;
}

using Case = std::tuple<Format, DType, BlockShape>;

class RoundTrip : public ::testing::TestWithParam<Case> {};

TEST_P(RoundTrip, WithinDocumentedBound) {
  auto [format, dtype, shape] = GetParam();
  QuantParams p{format, dtype, shape, 32};
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::vector<uint16_t> in = RandomBlock(p, seed);
  std::vector<uint8_t> enc = Encode(p, in);
  ASSERT_EQ(enc.size(), EncodedBytes(p));
  std::vector<uint16_t> out = Decode(enc);
  std::vector<double> bound = Bounds(p, in);
  double worst = 0;  // largest error as a fraction of its bound
  for (uint64_t e = 0; e < in.size(); ++e) {
    double x = ToFloat(dtype, in[e]), y = ToFloat(dtype, out[e]);
    ASSERT_TRUE(std::isfinite(y)) << "element " << e;
    ASSERT_LE(std::fabs(x - y), bound[e]) << "element " << e << " x=" << x << " y=" << y;
    worst = std::max(worst, std::fabs(x - y) / bound[e]);
  }
  // The bound is not vacuous: some element comes close to it (one token
  // with one head has too few elements for that to be sure).
  if (in.size() > 4096) {
    EXPECT_GT(worst, 0.25);
  }
  // Deterministic: the same input encodes to the same bytes.
  EXPECT_EQ(Encode(p, in), enc);
}

const BlockShape kShapes[] = {
    {2, 100, 4, 128},  // tokens not a multiple of 32: partial last key group
    {1, 1, 1, 64},     // one token
    {1, 33, 2, 256},
    {3, 64, 2, 80},    // head_dim 80: partial last value group
    {1, 40, 1, 8},
};

INSTANTIATE_TEST_SUITE_P(
    AllFormats, RoundTrip,
    ::testing::Combine(::testing::Values(Format::kFp8E4m3, Format::kInt8, Format::kInt4Kivi, Format::kInt2Kivi),
                       ::testing::Values(DType::kFp16, DType::kBf16), ::testing::ValuesIn(kShapes)),
    [](const auto& info) { return testing::ParamName(info.param); });

class NonFinite : public ::testing::TestWithParam<std::tuple<Format, DType>> {};

TEST_P(NonFinite, RejectedWithLocation) {
  auto [format, dtype] = GetParam();
  QuantParams p{format, dtype, {2, 50, 3, 64}, 32};
  std::vector<uint16_t> in = RandomBlock(p, FreshSeed());
  const uint16_t bad[] = {uint16_t(dtype == DType::kBf16 ? 0x7fc0 : 0x7e00),   // NaN
                          uint16_t(dtype == DType::kBf16 ? 0xff80 : 0xfc00)};  // -Inf
  for (uint16_t b : bad) {
    for (uint32_t kv : {0u, 1u}) {
      std::vector<uint16_t> x = in;
      x[Join(p.shape, {1, kv, 37, 2, 63})] = b;
      std::vector<uint8_t> out(EncodedBytes(p));
      Status st = Quantize(p, x.data(), x.size() * 2, out.data(), out.size());
      EXPECT_EQ(st.code, Code::kNonFinite);
      EXPECT_NE(st.message.find(std::string("layer 1 ") + (kv ? "V" : "K") + " token 37 head 2"), std::string::npos)
          << st.message;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllFormats, NonFinite,
                         ::testing::Combine(::testing::Values(Format::kFp8E4m3, Format::kInt8, Format::kInt4Kivi,
                                                              Format::kInt2Kivi),
                                            ::testing::Values(DType::kFp16, DType::kBf16)));

TEST(Quant, LargestFiniteValuesDoNotOverflow) {
  for (DType dt : {DType::kFp16, DType::kBf16}) {
    for (Format f : {Format::kFp8E4m3, Format::kInt8, Format::kInt4Kivi, Format::kInt2Kivi}) {
      QuantParams p{f, dt, {1, 8, 1, 16}, 8};
      std::vector<uint16_t> in(ElementCount(p.shape));
      uint16_t big = dt == DType::kBf16 ? 0x7f7f : 0x7bff;  // largest finite
      for (size_t i = 0; i < in.size(); ++i) in[i] = uint16_t(big | (i % 2 ? 0x8000 : 0));
      std::vector<uint16_t> out = Decode(Encode(p, in));
      for (size_t i = 0; i < in.size(); ++i) {
        float x = ToFloat(dt, in[i]), y = ToFloat(dt, out[i]);
        ASSERT_TRUE(std::isfinite(y)) << FormatName(f) << " " << DTypeName(dt) << " element " << i;
        ASSERT_LE(std::fabs(x - y), std::fabs(x) * 0.07f) << FormatName(f) << " " << DTypeName(dt);
      }
    }
  }
}

TEST(Quant, ConstantAndZeroBlocksAreExact) {
  for (Format f : {Format::kFp8E4m3, Format::kInt8, Format::kInt4Kivi, Format::kInt2Kivi}) {
    QuantParams p{f, DType::kFp16, {1, 40, 2, 64}, 32};
    for (float c : {0.0f, 1.5f, -3.0f}) {
      std::vector<uint16_t> in(ElementCount(p.shape), math::FloatToHalf(c));
      std::vector<uint16_t> out = Decode(Encode(p, in));
      for (size_t i = 0; i < in.size(); ++i) ASSERT_EQ(math::HalfToFloat(out[i]), c) << FormatName(f);
    }
  }
}

TEST(Quant, SizesAndCompression) {
  QuantParams p{Format::kInt4Kivi, DType::kFp16, {32, 64, 8, 128}, 32};
  uint64_t raw = RawBytes(p.shape);
  // int4: half a byte per element; scale+zero (4 bytes) per 32 keys and per 32 values.
  uint64_t n = ElementCount(p.shape);
  EXPECT_EQ(EncodedBytes(p), 64 + n / 32 * 4 + n / 2);
  EXPECT_GT(double(raw) / EncodedBytes(p), 3.1);
  p.format = Format::kInt2Kivi;
  EXPECT_EQ(EncodedBytes(p), 64 + n / 32 * 4 + n / 4);
  p.format = Format::kInt8;
  EXPECT_EQ(EncodedBytes(p), 64 + n / 128 * 4 + n);
  p.format = Format::kFp8E4m3;
  EXPECT_EQ(EncodedBytes(p), 64 + 32 * 2 * 8 * 4 + n);
}

TEST(Quant, InvalidParamsAreRejected) {
  std::vector<uint8_t> buf(1 << 20);
  std::vector<uint16_t> in(1 << 18);
  auto code = [&](QuantParams p) { return Quantize(p, in.data(), in.size() * 2, buf.data(), buf.size()).code; };
  EXPECT_EQ(code({Format::kInt8, DType::kFp16, {1, 4, 1, 60}, 32}), Code::kInvalidArgument);   // head_dim % 8
  EXPECT_EQ(code({Format::kInt8, DType::kFp16, {1, 4, 1, 512}, 32}), Code::kInvalidArgument);  // head_dim > 256
  EXPECT_EQ(code({Format::kInt8, DType::kFp16, {1, 0, 1, 64}, 32}), Code::kInvalidArgument);
  EXPECT_EQ(code({Format::kInt4Kivi, DType::kFp16, {1, 4, 1, 64}, 24}), Code::kInvalidArgument);  // not 2^k
  EXPECT_EQ(code({Format::kInt4Kivi, DType::kFp16, {1, 4, 1, 64}, 4}), Code::kInvalidArgument);
  EXPECT_EQ(code({static_cast<Format>(9), DType::kFp16, {1, 4, 1, 64}, 32}), Code::kInvalidArgument);
  EXPECT_EQ(code({Format::kInt8, static_cast<DType>(7), {1, 4, 1, 64}, 32}), Code::kInvalidArgument);
  // Buffers too small.
  QuantParams p{Format::kInt8, DType::kFp16, {1, 4, 1, 64}, 32};
  EXPECT_EQ(Quantize(p, in.data(), 10, buf.data(), buf.size()).code, Code::kBufferTooSmall);
  EXPECT_EQ(Quantize(p, in.data(), in.size() * 2, buf.data(), 100).code, Code::kBufferTooSmall);
}

// The bytes of fixed inputs are pinned: stored blocks must decode the same
// forever, so a change here means a new header version, not a new hash.
TEST(Quant, EncodingsArePinned) {
  const BlockShape shapes[] = {{2, 100, 4, 128}, {1, 1, 1, 64}, {1, 33, 2, 256},
                               {3, 64, 2, 80},   {1, 40, 1, 8},  {2, 77, 3, 96}};
  uint64_t hash = 1469598103934665603ull;  // FNV-1a 64 over every encoding and decoding
  int n = 0;
  for (int f = 1; f <= 4; ++f)
    for (int dt = 1; dt <= 2; ++dt)
      for (const BlockShape& s : shapes)
        for (uint32_t g : {8u, 32u, 64u}) {
          QuantParams p{Format(f), DType(dt), s, g};
          std::mt19937_64 rng(n++);
          std::vector<uint16_t> in(ElementCount(s));
          for (auto& v : in) {  // any finite bit pattern: subnormals and extremes included
            v = uint16_t(rng());
            if (!(dt == 1 ? math::HalfIsFinite(v) : math::Bf16IsFinite(v))) v &= 0xbfff;
          }
          std::vector<uint8_t> enc = Encode(p, in);
          std::vector<uint16_t> out = Decode(enc);
          for (uint8_t b : enc) hash = (hash ^ b) * 1099511628211ull;
          for (uint16_t b : out) hash = (hash ^ b) * 1099511628211ull;
        }
  EXPECT_EQ(hash, 0x181359dead5429acull);
}

// ---- header ----

uint32_t Fnv1a60(const uint8_t* p) {  // as kernels/README.md documents it
  uint32_t h = 2166136261u;
  for (int i = 0; i < 60; ++i) h = (h ^ p[i]) * 16777619u;
  return h;
}

class HeaderTest : public ::testing::Test {
 protected:
  QuantParams p_{Format::kInt4Kivi, DType::kBf16, {2, 70, 2, 64}, 16};
  std::vector<uint8_t> enc_ = Encode(p_, RandomBlock(p_, 7));
};

TEST_F(HeaderTest, DocumentedLayout) {
  const uint8_t* b = enc_.data();
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(b), 4), "KVQB");
  uint16_t version;
  std::memcpy(&version, b + 4, 2);
  EXPECT_EQ(version, 1);
  EXPECT_EQ(b[6], 3);  // int4_kivi
  EXPECT_EQ(b[7], 2);  // bf16
  uint32_t u[6];
  std::memcpy(u, b + 8, 24);
  EXPECT_EQ(u[0], 2u);
  EXPECT_EQ(u[1], 70u);
  EXPECT_EQ(u[2], 2u);
  EXPECT_EQ(u[3], 64u);
  EXPECT_EQ(u[4], 16u);
  EXPECT_EQ(u[5], 64u);
  uint64_t meta, codes;
  std::memcpy(&meta, b + 32, 8);
  std::memcpy(&codes, b + 40, 8);
  EXPECT_EQ(meta % 16, 0u);
  EXPECT_EQ(codes, ElementCount(p_.shape) / 2);
  EXPECT_EQ(64 + meta + codes, enc_.size());
  uint32_t sum;
  std::memcpy(&sum, b + 60, 4);
  EXPECT_EQ(sum, Fnv1a60(b));
  Header h;
  ASSERT_TRUE(ParseHeader(enc_.data(), enc_.size(), &h).ok());
  EXPECT_EQ(h.params.group_size, 16u);
  EXPECT_EQ(h.params.format, Format::kInt4Kivi);
}

TEST_F(HeaderTest, EveryCorruptedByteIsRejected) {
  for (int i = 0; i < 64; ++i) {
    std::vector<uint8_t> bad = enc_;
    bad[i] ^= 0x10;
    Header h;
    EXPECT_EQ(ParseHeader(bad.data(), bad.size(), &h).code, Code::kCorrupt) << "byte " << i;
    std::vector<uint16_t> out(ElementCount(p_.shape));
    EXPECT_FALSE(Dequantize(bad.data(), bad.size(), out.data(), out.size() * 2).ok());
  }
}

TEST_F(HeaderTest, TruncatedBlocksAreRejected) {
  Header h;
  for (size_t n : {size_t(0), size_t(10), size_t(63), size_t(64), enc_.size() - 1}) {
    Status st = ParseHeader(enc_.data(), n, &h);
    EXPECT_EQ(st.code, Code::kCorrupt) << n;
    EXPECT_FALSE(st.message.empty());
  }
  EXPECT_TRUE(ParseHeader(enc_.data(), enc_.size() + 5, &h).ok());  // trailing bytes are the caller's
}

TEST_F(HeaderTest, ConsistentButWrongFieldsAreRejected) {
  // Fields changed with a valid checksum: an inconsistent shape or a newer version.
  auto reseal = [](std::vector<uint8_t>& b) {
    uint32_t s = Fnv1a60(b.data());
    std::memcpy(b.data() + 60, &s, 4);
  };
  Header h;
  std::vector<uint8_t> b = enc_;
  b[12] = 71;  // tokens: the section sizes no longer fit
  reseal(b);
  EXPECT_EQ(ParseHeader(b.data(), b.size(), &h).code, Code::kCorrupt);
  b = enc_;
  b[4] = 2;  // version 2
  reseal(b);
  EXPECT_EQ(ParseHeader(b.data(), b.size(), &h).code, Code::kUnsupported);
  b = enc_;
  b[6] = 9;  // unknown format
  reseal(b);
  EXPECT_EQ(ParseHeader(b.data(), b.size(), &h).code, Code::kCorrupt);
  b = enc_;
  b[24] = 24;  // group size not a power of two
  reseal(b);
  EXPECT_EQ(ParseHeader(b.data(), b.size(), &h).code, Code::kCorrupt);
}

// ---- scalar conversions ----

TEST(Math, HalfConversionsMatchTheCompiler) {
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = math::HalfToFloat(uint16_t(h));
    _Float16 ref;
    uint16_t hh = uint16_t(h);
    std::memcpy(&ref, &hh, 2);
    if (std::isnan(float(ref))) {
      ASSERT_TRUE(std::isnan(f));
      continue;
    }
    ASSERT_EQ(f, float(ref)) << h;
    ASSERT_EQ(math::FloatToHalf(f), h) << h;
  }
  std::mt19937 rng(FreshSeed());
  for (int i = 0; i < 1000000; ++i) {
    uint32_t bits = rng();
    float f = math::AsFloat(bits);
    if (std::isnan(f)) continue;
    _Float16 ref = static_cast<_Float16>(f);
    uint16_t r;
    std::memcpy(&r, &ref, 2);
    ASSERT_EQ(math::FloatToHalf(f), r) << f;
  }
}

TEST(Math, Bf16RoundsToNearestEven) {
  EXPECT_EQ(math::FloatToBf16(math::AsFloat(0x3f808000)), 0x3f80);  // tie, even stays
  EXPECT_EQ(math::FloatToBf16(math::AsFloat(0x3f818000)), 0x3f82);  // tie, odd rounds up
  EXPECT_EQ(math::FloatToBf16(math::AsFloat(0x3f808001)), 0x3f81);
  EXPECT_EQ(math::FloatToBf16(math::AsFloat(0x7f7fffff)), 0x7f80);  // overflow to Inf
  EXPECT_EQ(math::FloatToBf16(math::AsFloat(0x7fc00001)) & 0x7fc0, 0x7fc0);
}

TEST(Math, E4m3IsNearestWithTiesToEvenAndSaturates) {
  std::vector<float> values;
  for (uint32_t c = 0; c < 256; ++c)
    if ((c & 0x7f) != 0x7f) {
      float v = math::E4m3ToFloat(uint8_t(c));
      ASSERT_EQ(math::FloatToE4m3(v), (c == 0x80 ? 0x80 : c)) << c;
      if (!(c & 0x80)) values.push_back(v);
    }
  EXPECT_EQ(math::E4m3ToFloat(0x7e), 448.0f);
  EXPECT_EQ(math::E4m3ToFloat(0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(math::FloatToE4m3(1e6f), 0x7e);
  EXPECT_EQ(math::FloatToE4m3(-460.0f), 0xfe);
  std::mt19937 rng(FreshSeed());
  std::uniform_real_distribution<float> u(0.0f, 460.0f);
  for (int i = 0; i < 200000; ++i) {
    float x = i % 2 ? u(rng) : std::ldexp(u(rng), -12);
    uint8_t c = math::FloatToE4m3(x);
    float got = math::E4m3ToFloat(c);
    for (float v : values) {
      ASSERT_LE(std::fabs(got - x), std::fabs(v - x) + (x >= 448 ? 1e9f : 0.0f)) << x;
      if (std::fabs(got - x) == std::fabs(v - x) && v != got) {
        ASSERT_EQ(c & 1, 0) << x;  // tie: even code
      }
    }
  }
}

TEST(Math, OrderKeysSortLikeValues) {
  for (uint32_t a = 0; a < 65536; a += 7) {
    for (uint32_t b = 0; b < 65536; b += 331) {
      float fa = math::HalfToFloat(uint16_t(a)), fb = math::HalfToFloat(uint16_t(b));
      if (!std::isfinite(fa) || !std::isfinite(fb) || fa == fb) continue;
      ASSERT_EQ(fa < fb, math::OrderKey(uint16_t(a)) < math::OrderKey(uint16_t(b)));
    }
    ASSERT_EQ(math::FromOrderKey(math::OrderKey(uint16_t(a))), a);
  }
}

// ---- CPU variants ----

#if defined(__x86_64__)
TEST(CpuVariants, Avx2AndGenericWriteTheSameBytes) {
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("f16c"))
    GTEST_SKIP() << "this processor has no AVX2 and F16C";
  for (Format f : {Format::kFp8E4m3, Format::kInt8, Format::kInt4Kivi, Format::kInt2Kivi}) {
    for (DType dt : {DType::kFp16, DType::kBf16}) {
      QuantParams p{f, dt, {2, 70, 3, 80}, 16};
      std::vector<uint16_t> in = RandomBlock(p, FreshSeed());
      Header h = MakeHeader(p);
      Layout y = MakeLayout(h.params);
      std::vector<uint8_t> a(h.total_bytes()), b(h.total_bytes());
      ASSERT_TRUE(generic::QuantizeRows(y, f, dt, in.data(), a.data(), a.data() + h.meta_bytes).ok());
      ASSERT_TRUE(avx2::QuantizeRows(y, f, dt, in.data(), b.data(), b.data() + h.meta_bytes).ok());
      ASSERT_EQ(a, b) << FormatName(f) << " " << DTypeName(dt);
      std::vector<uint16_t> da(in.size()), db(in.size());
      generic::DequantizeRows(y, f, dt, a.data(), a.data() + h.meta_bytes, da.data());
      avx2::DequantizeRows(y, f, dt, a.data(), a.data() + h.meta_bytes, db.data());
      ASSERT_EQ(da, db) << FormatName(f) << " " << DTypeName(dt);
    }
  }
}
#endif

}  // namespace
}  // namespace kvstrata::kernels
