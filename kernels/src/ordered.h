// 16-bit float bit patterns mapped to integers whose order is the values'
// order, so min, max and max-magnitude reductions run on integers: exact,
// independent of evaluation order (CPU and GPU agree), and they vectorise.
#pragma once

#include <cstdint>

#include "quant_math.h"

namespace kvstrata::kernels::math {

// Magnitude bits: for finite values their order is the order of |x|; NaN and
// infinity sort above every finite value (>= InfBits()).
KVQ_HD uint32_t AbsBits(uint16_t h) { return h & 0x7fffu; }
template <bool kBf16>
KVQ_HD uint32_t InfBits() { return kBf16 ? 0x7f80u : 0x7c00u; }

// Signed order: negative values flipped below positive ones (-0 < +0).
KVQ_HD uint32_t OrderKey(uint16_t h) { return (h & 0x8000u) ? (~uint32_t(h) & 0xffffu) : (h | 0x8000u); }
KVQ_HD uint16_t FromOrderKey(uint32_t k) { return uint16_t((k & 0x8000u) ? (k & 0x7fffu) : (~k & 0xffffu)); }

}  // namespace kvstrata::kernels::math
