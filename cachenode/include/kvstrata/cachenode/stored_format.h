// A namespace's stored format (NamespaceSpec.format) applied on ingest: raw
// blocks are kept as they came, quantized formats are encoded with the
// kernels/ CPU path into a smaller block (kernels/README.md has the layout).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvstrata.pb.h"
#include "kvstrata/cachenode/block.h"
#include "kvstrata/cachenode/dram_tier.h"

namespace kvstrata::cachenode {

// OK for FORMAT_RAW; for a quantized format, INVALID_ARGUMENT unless the spec
// has a KV layout the kernels take (fp16/bf16, head_dim % 8 == 0, <= 256).
// Likewise for a precision budget (coarsest_format), which must also be
// coarser than the stored format.
absl::Status ValidateStoredFormat(const v1::NamespaceSpec& spec);

// Precision tiers. The ladder is raw > fp8_e4m3 (int8 for a budget of int8,
// or a namespace stored as int8) > int4_kivi > int2_kivi. The next rung below
// `current` that `spec.coarsest_format()` allows; nullopt at the budget, and
// always without one.
std::optional<v1::StoredFormat> NextCoarserFormat(const v1::NamespaceSpec& spec,
                                                  v1::StoredFormat current);
// Bytes of a block of `spec` (raw size `block_bytes`) stored as `format`; 0
// when the layout cannot take it.
uint64_t StoredBytes(const v1::NamespaceSpec& spec, v1::StoredFormat format, uint64_t block_bytes);
// Encodes a block of `spec` stored as `from_format` (`from_size` bytes) as
// `to_format` into `to` (StoredBytes(to_format) bytes), through the raw
// layout when `from` is encoded. DATA_LOSS when `from` does not decode.
absl::Status Transcode(const v1::NamespaceSpec& spec, const uint8_t* from, uint64_t from_size,
                       v1::StoredFormat from_format, v1::StoredFormat to_format, uint8_t* to,
                       uint64_t to_size);

// The block to commit for `received` (a verified raw block of `spec`'s
// namespace): `received` itself for FORMAT_RAW, else a new reservation in
// `dram` holding the encoded block, its checksum set to the encoded bytes'.
// INVALID_ARGUMENT when the block holds NaN or Inf, RESOURCE_EXHAUSTED when
// no memory is left for the encoded copy.
absl::StatusOr<std::shared_ptr<StoredBlock>> ApplyStoredFormat(
    DramTier& dram, const v1::NamespaceSpec& spec, std::shared_ptr<StoredBlock> received);

}  // namespace kvstrata::cachenode
