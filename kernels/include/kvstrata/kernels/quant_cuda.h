// CUDA quantize and dequantize (sm_80, sm_90). Same formats and the same
// bytes as quant.h's CPU functions; declared only when the library is built
// with CUDA (BuiltWithCuda()).
//
// All pointers named d_* are device memory, 16-byte aligned. Calls are
// asynchronous on `stream` (a cudaStream_t; nullptr is the default stream)
// and return an error only for bad arguments or a failed launch.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kvstrata/kernels/quant.h"

namespace kvstrata::kernels {

// Encodes d_in into d_out (EncodedBytes(p) bytes). A NaN or Inf in the input
// sets *d_error to non-zero (it is zeroed first); QuantizeCudaFinish() turns
// that into kNonFinite. The encoded bytes are usable only once
// QuantizeCudaFinish() returned OK.
Status QuantizeCudaAsync(const QuantParams& p, const void* d_in, void* d_out, size_t out_capacity,
                         uint32_t* d_error, void* stream);

// Waits for `stream` and reports what the quantize calls on it found.
Status QuantizeCudaFinish(const uint32_t* d_error, void* stream);

// Decodes the encoded block at d_encoded, whose header `h` the caller parsed
// from a host copy (ParseHeader), into d_out (RawBytes(h.params.shape) bytes).
Status DequantizeCudaAsync(const Header& h, const void* d_encoded, void* d_out, size_t out_capacity,
                           void* stream);

// Number of usable CUDA devices (0 when there is no driver or no GPU).
int CudaDeviceCount();

}  // namespace kvstrata::kernels
