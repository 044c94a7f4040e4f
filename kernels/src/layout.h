// Sizes and section offsets of an encoded block, shared by the CPU path and
// the CUDA kernels (kernels/README.md describes the same layout in prose).
#pragma once

#include <cstdint>

#include "kvstrata/kernels/quant.h"

namespace kvstrata::kernels {

struct Layout {
  uint32_t L, T, H, D, G;  // G: group size (KIVI), else 0
  uint32_t TG, DG;         // KIVI: key groups along tokens, value groups along channels
  uint32_t bits;           // code width: 8, 4 or 2
  uint64_t elements;
  uint64_t k_meta_entries;  // KIVI: L*TG*H*D (scale, zero) pairs for keys
  uint64_t meta_bytes;      // unpadded
  uint64_t code_bytes;
};

inline bool IsKivi(Format f) { return f == Format::kInt4Kivi || f == Format::kInt2Kivi; }

inline uint64_t PadTo16(uint64_t n) { return (n + 15) & ~uint64_t(15); }

inline Layout MakeLayout(const QuantParams& p) {
  Layout y{};
  y.L = p.shape.layers;
  y.T = p.shape.tokens;
  y.H = p.shape.kv_heads;
  y.D = p.shape.head_dim;
  y.elements = uint64_t(y.L) * 2 * y.T * y.H * y.D;
  switch (p.format) {
    case Format::kFp8E4m3:
      y.bits = 8;
      y.meta_bytes = uint64_t(y.L) * 2 * y.H * 4;  // fp32 scale per (layer, K/V, head)
      break;
    case Format::kInt8:
      y.bits = 8;
      y.meta_bytes = uint64_t(y.L) * 2 * y.T * y.H * 4;  // fp32 scale per (layer, K/V, token, head)
      break;
    case Format::kInt4Kivi:
    case Format::kInt2Kivi:
      y.bits = p.format == Format::kInt4Kivi ? 4 : 2;
      y.G = p.group_size;
      y.TG = (y.T + y.G - 1) / y.G;
      y.DG = (y.D + y.G - 1) / y.G;
      y.k_meta_entries = uint64_t(y.L) * y.TG * y.H * y.D;
      y.meta_bytes = (y.k_meta_entries + uint64_t(y.L) * y.T * y.H * y.DG) * 4;
      break;
  }
  y.code_bytes = y.elements * y.bits / 8;  // head_dim % 8 == 0 makes this exact
  return y;
}

}  // namespace kvstrata::kernels
