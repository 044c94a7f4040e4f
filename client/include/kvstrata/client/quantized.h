// Decoding blocks fetched from a namespace whose stored format is quantized
// (NamespaceSpec.format FORMAT_FP8_E4M3, FORMAT_INT8, FORMAT_INT4_KIVI,
// FORMAT_INT2_KIVI). The node encodes such blocks on ingest, and Fetch
// writes the encoded bytes — TransferResult::sizes[i] of them, fewer than
// block_bytes — into the buffer. Decode them into the engine's dtype:
//
//   auto r = ns->Fetch(items);
//   DequantizeBlock(buffer->data() + offset, r->sizes[i], kv_out, ns->block_bytes());
//
// Encoded blocks describe themselves (format, dtype, shape; kernels/README.md
// has the layout and each format's error bound), so decoding needs no spec.
// Runs on the CPU; thread-safe; allocates nothing.
#pragma once

#include <cstddef>

#include "absl/status/status.h"

namespace kvstrata::client {

// Decodes `stored_bytes` bytes of an encoded block into `out` as the
// namespace's fp16 or bf16 layout [layers][2][tokens][kv_heads][head_dim]
// (block_bytes bytes). DATA_LOSS for a damaged or truncated block,
// INVALID_ARGUMENT when `out_bytes` is too small.
absl::Status DequantizeBlock(const void* stored, size_t stored_bytes, void* out, size_t out_bytes);

// The same on the engine's GPU, when the library is built with CUDA (else
// UNIMPLEMENTED): copies the `stored_bytes` encoded bytes (host memory, e.g.
// the fetch buffer) to `d_scratch` (device memory of at least stored_bytes)
// and decodes them into `d_out` (device, out_bytes), both 16-byte aligned, on
// `stream` (a cudaStream_t; nullptr: the default stream). Asynchronous: leave
// `stored` unchanged until the stream has passed this point. The bytes equal
// DequantizeBlock()'s.
absl::Status DequantizeBlockOnGpu(const void* stored, size_t stored_bytes, void* d_scratch, void* d_out,
                                  size_t out_bytes, void* stream);

// True when `stored` begins with a valid encoded-block header.
bool IsEncodedBlock(const void* stored, size_t stored_bytes);

}  // namespace kvstrata::client
