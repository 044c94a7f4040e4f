// CPU quantize and dequantize: checks, header, and the choice of the row
// loops' instruction-set variant (quant_cpu_impl.h).
#include <cstring>
#include <string>

#include "layout.h"
#include "quant_cpu_variants.h"
#include "kvstrata/kernels/quant.h"

#if defined(KVQ_HAVE_AVX2_VARIANT)
#include <cpuid.h>
#endif

namespace kvstrata::kernels {
namespace {

// AVX2 (with F16C) when the build has the variant and the processor runs it.
// F16C is read from CPUID: clang before 15 has no "f16c" for
// __builtin_cpu_supports.
bool Avx2() {
#if defined(KVQ_HAVE_AVX2_VARIANT)
  static const bool yes = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
    return __builtin_cpu_supports("avx2") && f16c;
  }();
  return yes;
#else
  return false;
#endif
}

}  // namespace

Status Quantize(const QuantParams& p, const void* in, size_t in_bytes, void* out, size_t out_capacity) {
  if (Status st = Validate(p); !st.ok()) return st;
  Header h = MakeHeader(p);
  if (in_bytes < RawBytes(p.shape))
    return Status{Code::kBufferTooSmall, "input has " + std::to_string(in_bytes) + " bytes, the shape needs " +
                                             std::to_string(RawBytes(p.shape))};
  if (out_capacity < h.total_bytes())
    return Status{Code::kBufferTooSmall, "output has " + std::to_string(out_capacity) + " bytes, needs " +
                                             std::to_string(h.total_bytes())};
  Layout y = MakeLayout(h.params);
  uint8_t* o = static_cast<uint8_t*>(out);
  uint8_t* meta = o + kHeaderBytes;
  uint8_t* codes = meta + h.meta_bytes;
  std::memset(meta + y.meta_bytes, 0, h.meta_bytes - y.meta_bytes);  // padding is part of the bytes
  const uint16_t* x = static_cast<const uint16_t*>(in);
  Status st = Avx2()
                  ? avx2::QuantizeRows(y, p.format, p.dtype, x, meta, codes)
                  : generic::QuantizeRows(y, p.format, p.dtype, x, meta, codes);
  if (!st.ok()) return st;
  EncodeHeader(h, o);
  return st;
}

Status Dequantize(const void* encoded, size_t encoded_bytes, void* out, size_t out_capacity) {
  Header h;
  if (Status st = ParseHeader(encoded, encoded_bytes, &h); !st.ok()) return st;
  if (out_capacity < RawBytes(h.params.shape))
    return Status{Code::kBufferTooSmall, "output has " + std::to_string(out_capacity) + " bytes, needs " +
                                             std::to_string(RawBytes(h.params.shape))};
  Layout y = MakeLayout(h.params);
  const uint8_t* meta = static_cast<const uint8_t*>(encoded) + kHeaderBytes;
  const uint8_t* codes = meta + h.meta_bytes;
  uint16_t* o = static_cast<uint16_t*>(out);
  if (Avx2()) avx2::DequantizeRows(y, h.params.format, h.params.dtype, meta, codes, o);
  else generic::DequantizeRows(y, h.params.format, h.params.dtype, meta, codes, o);
  return Status{};
}

}  // namespace kvstrata::kernels
