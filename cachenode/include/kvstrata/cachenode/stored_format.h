// A namespace's stored format (NamespaceSpec.format) applied on ingest: raw
// blocks are kept as they came, quantized formats are encoded with the
// kernels/ CPU path into a smaller block (kernels/README.md has the layout).
#pragma once

#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvstrata.pb.h"
#include "kvstrata/cachenode/block.h"
#include "kvstrata/cachenode/dram_tier.h"

namespace kvstrata::cachenode {

// OK for FORMAT_RAW; for a quantized format, INVALID_ARGUMENT unless the spec
// has a KV layout the kernels take (fp16/bf16, head_dim % 8 == 0, <= 256).
absl::Status ValidateStoredFormat(const v1::NamespaceSpec& spec);

// The block to commit for `received` (a verified raw block of `spec`'s
// namespace): `received` itself for FORMAT_RAW, else a new reservation in
// `dram` holding the encoded block, its checksum set to the encoded bytes'.
// INVALID_ARGUMENT when the block holds NaN or Inf, RESOURCE_EXHAUSTED when
// no memory is left for the encoded copy.
absl::StatusOr<std::shared_ptr<StoredBlock>> ApplyStoredFormat(
    DramTier& dram, const v1::NamespaceSpec& spec, std::shared_ptr<StoredBlock> received);

}  // namespace kvstrata::cachenode
