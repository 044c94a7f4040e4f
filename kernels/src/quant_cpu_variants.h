// The CPU row loops, one copy per instruction-set variant (quant_cpu_impl.h).
#pragma once

#include <cstdint>

#include "layout.h"
#include "kvstrata/kernels/quant.h"

#define KVQ_DECLARE_CPU_VARIANT(ns)                                                                    \
  namespace kvstrata::kernels::ns {                                                                    \
  Status QuantizeRows(const Layout& y, Format f, DType dt, const uint16_t* in, uint8_t* meta,          \
                      uint8_t* codes);                                                                 \
  void DequantizeRows(const Layout& y, Format f, DType dt, const uint8_t* meta, const uint8_t* codes,  \
                      uint16_t* out);                                                                  \
  }

KVQ_DECLARE_CPU_VARIANT(generic)
#if defined(KVQ_HAVE_AVX2_VARIANT)
KVQ_DECLARE_CPU_VARIANT(avx2)
#else
// Not built: calls are compiled out by Avx2() returning false.
namespace kvstrata::kernels::avx2 {
inline Status QuantizeRows(const Layout&, Format, DType, const uint16_t*, uint8_t*, uint8_t*) { return {}; }
inline void DequantizeRows(const Layout&, Format, DType, const uint8_t*, const uint8_t*, uint16_t*) {}
}  // namespace kvstrata::kernels::avx2
#endif
