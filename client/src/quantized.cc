#include "kvstrata/client/quantized.h"

#include "absl/strings/str_cat.h"
#include "kvstrata/kernels/quant.h"
#if defined(KVSTRATA_KERNELS_CUDA)
#include <cuda_runtime.h>

#include "kvstrata/kernels/quant_cuda.h"
#endif

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

absl::Status DequantizeBlockOnGpu(const void* stored, size_t stored_bytes, void* d_scratch, void* d_out,
                                  size_t out_bytes, void* stream) {
#if defined(KVSTRATA_KERNELS_CUDA)
  kernels::Header h;
  if (kernels::Status s = kernels::ParseHeader(stored, stored_bytes, &h); !s.ok()) {
    return absl::DataLossError(s.message);
  }
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (cudaError_t e = cudaMemcpyAsync(d_scratch, stored, h.total_bytes(), cudaMemcpyHostToDevice, st);
      e != cudaSuccess) {
    return absl::InternalError(absl::StrCat("copy to the GPU: ", cudaGetErrorString(e)));
  }
  kernels::Status s = kernels::DequantizeCudaAsync(h, d_scratch, d_out, out_bytes, st);
  if (s.ok()) return absl::OkStatus();
  return s.code == kernels::Code::kBufferTooSmall || s.code == kernels::Code::kInvalidArgument
             ? absl::InvalidArgumentError(s.message)
             : absl::InternalError(s.message);
#else
  return absl::UnimplementedError("this client library was built without CUDA");
#endif
}

bool IsEncodedBlock(const void* stored, size_t stored_bytes) {
  kernels::Header h;
  return kernels::ParseHeader(stored, stored_bytes, &h).ok();
}

}  // namespace kvstrata::client
