// Validation, block size and id of a namespace description (DESIGN.md §3).
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "kvstrata.pb.h"

namespace kvstrata {

// Bytes per element of a dtype, or 0 for DTYPE_UNSPECIFIED.
uint32_t DTypeBytes(v1::DType dtype);

// Checks every field against kvstrata/common/limits.h and returns the block
// size the spec implies (at most max_block_bytes).
absl::StatusOr<uint64_t> ValidateNamespaceSpec(const v1::NamespaceSpec& spec,
                                               uint64_t max_block_bytes);

// 64-bit id: the first 8 bytes (little-endian) of SHA-256 over a canonical
// encoding of every field. Stable across versions of this library.
uint64_t NamespaceId(const v1::NamespaceSpec& spec);

}  // namespace kvstrata
