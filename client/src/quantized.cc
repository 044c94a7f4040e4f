#include "kvstrata/client/quantized.h"

#include "kvstrata/kernels/quant.h"

namespace kvstrata::client {

absl::Status DequantizeBlock(const void* stored, size_t stored_bytes, void* out, size_t out_bytes) {
  kernels::Status s = kernels::Dequantize(stored, stored_bytes, out, out_bytes);
  switch (s.code) {
    case kernels::Code::kOk: return absl::OkStatus();
    case kernels::Code::kCorrupt:
    case kernels::Code::kUnsupported: return absl::DataLossError(s.message);
    default: return absl::InvalidArgumentError(s.message);
  }
}

bool IsEncodedBlock(const void* stored, size_t stored_bytes) {
  kernels::Header h;
  return kernels::ParseHeader(stored, stored_bytes, &h).ok();
}

}  // namespace kvstrata::client
