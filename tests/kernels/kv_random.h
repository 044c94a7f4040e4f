// Shared by the kernels tests: random KV blocks (fresh seed per run, printed
// on failure) and the names of (format, dtype, shape) test parameters.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kvstrata/kernels/quant.h"
#include "quant_math.h"

namespace kvstrata::kernels::testing {

inline uint16_t FromFloat(DType d, float x) {
  return d == DType::kBf16 ? math::FloatToBf16(x) : math::FloatToHalf(x);
}
inline float ToFloat(DType d, uint16_t h) {
  return d == DType::kBf16 ? math::Bf16ToFloat(h) : math::HalfToFloat(h);
}

// Normal values with a per-channel offset and a few channels scaled 30x, like
// real keys; enough to make every format's scales differ across groups.
inline std::vector<uint16_t> RandomBlock(const QuantParams& p, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  const BlockShape& s = p.shape;
  std::vector<uint16_t> v(ElementCount(s));
  std::vector<float> offset(s.head_dim), mag(s.head_dim);
  for (uint32_t d = 0; d < s.head_dim; ++d) {
    offset[d] = n(rng);
    mag[d] = (d % 37 == 5) ? 30.0f : 1.0f;
  }
  for (uint64_t i = 0; i < v.size(); ++i) {
    uint32_t d = uint32_t(i % s.head_dim);
    v[i] = FromFloat(p.dtype, mag[d] * (offset[d] + n(rng)));
  }
  return v;
}

// gtest name of a (format, dtype, shape) parameter, e.g. int4_kivi_fp16_2x100x4x128.
inline std::string ParamName(const std::tuple<Format, DType, BlockShape>& param) {
  const BlockShape& s = std::get<2>(param);
  return std::string(FormatName(std::get<0>(param))) + "_" + DTypeName(std::get<1>(param)) + "_" +
         std::to_string(s.layers) + "x" + std::to_string(s.tokens) + "x" + std::to_string(s.kv_heads) + "x" +
         std::to_string(s.head_dim);
}

}  // namespace kvstrata::kernels::testing
