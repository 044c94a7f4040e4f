// A Mooncake trace replayed through the node's real DRAM tier with precision
// tiers on (DramTier, the real PrecisionTranscoder and NamespaceRegistry,
// the kernels' CPU encoders, an eviction policy), to check that the tier reaches what
// ReplayPrecision's byte model says: packing encoded copies into slab
// memory, in-place transcodes and leases all take part.
#pragma once

#include <array>
#include <cstdint>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "kvstrata.pb.h"
#include "kvstrata/cachenode/dram_tier.h"
#include "kvstrata/cachenode/replay.h"

namespace kvstrata::bench {

struct TierReplayResult {
  cachenode::ReplayResult total;
  // Prefix-hit blocks served per stored format (v1::StoredFormat value).
  std::vector<uint64_t> hit_blocks;
  uint64_t transcodes = 0;
  uint64_t precision_leases = 0;
  // At the end: blocks held, their bytes, and the memory they take.
  uint64_t blocks = 0, stored_bytes = 0, used_bytes = 0;
  // Per stored format: the memory of a copy (rounded up to a 4 KiB piece)
  // over the raw block's.
  std::array<double, cachenode::kStoredFormats> piece_ratio{};
  // Mean attention-output error of the prefix-hit blocks by their formats,
  // with `ladder`'s figures (formats named as v1::StoredFormat_Name in lower
  // case without FORMAT_, e.g. "int4_kivi").
  double mean_error(const cachenode::PrecisionLadder& ladder) const;
};

// Each trace block is a 128 KiB fp16 block (128 tokens, 4 KV heads of 64);
// the tier has `capacity_raw_blocks` of them in 1 MiB slabs. `coarsest`:
// the namespace's budget (FORMAT_RAW: none). `leases_by_bytes` false: every
// coarser copy gets one lease per format, as the tier gave before.
absl::StatusOr<TierReplayResult> ReplayThroughDramTier(
    const std::vector<cachenode::TraceRequest>& trace, uint64_t capacity_raw_blocks,
    v1::StoredFormat coarsest, bool leases_by_bytes, std::string_view policy = "lru");

}  // namespace kvstrata::bench
