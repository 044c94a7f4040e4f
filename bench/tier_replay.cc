#include "tier_replay.h"

#include <algorithm>
#include <cstring>
#include <random>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "kvstrata/cachenode/dram_tier.h"
#include "kvstrata/cachenode/eviction_policy.h"
#include "kvstrata/cachenode/namespace_registry.h"
#include "kvstrata/common/block_key.h"
#include "kvstrata/cachenode/stored_format.h"
#include "precision_transcoder.h"

namespace kvstrata::bench {
namespace {

constexpr uint32_t kTokens = 128, kHeads = 4, kHeadDim = 64;
constexpr uint64_t kRawBytes = uint64_t{2} * kTokens * kHeads * kHeadDim * 2;  // K and V, fp16
constexpr uint64_t kSlabBytes = 1 << 20;
constexpr uint64_t kPiece = 4096;  // SlabAllocator::AllocatePiece's granularity

// The real transcoder less RawSize: one lease per format.
class OneLeaseTranscoder : public cachenode::BlockTranscoder {
 public:
  explicit OneLeaseTranscoder(const cachenode::BlockTranscoder& real) : real_(real) {}
  std::optional<uint64_t> CoarserSize(const cachenode::BlockId& id,
                                      const cachenode::StoredBlock& block) const override {
    return real_.CoarserSize(id, block);
  }
  absl::Status Transcode(const cachenode::BlockId& id, const cachenode::StoredBlock& from,
                         cachenode::StoredBlock& to) const override {
    return real_.Transcode(id, from, to);
  }

 private:
  const cachenode::BlockTranscoder& real_;
};

std::vector<uint8_t> GaussianKv() {
  std::vector<uint8_t> kv(kRawBytes);
  std::mt19937_64 rng(7);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (size_t i = 0; i < kRawBytes / 2; ++i) {
    const _Float16 h = static_cast<_Float16>(n(rng));
    std::memcpy(kv.data() + 2 * i, &h, 2);
  }
  return kv;
}

}  // namespace

double TierReplayResult::mean_error(const cachenode::PrecisionLadder& ladder) const {
  double weighted = 0;
  uint64_t blocks = 0;
  for (size_t f = 0; f < hit_blocks.size(); ++f) {
    if (hit_blocks[f] == 0) continue;
    const std::string name =
        absl::AsciiStrToLower(v1::StoredFormat_Name(static_cast<v1::StoredFormat>(f)));
    const std::string bare = absl::StartsWith(name, "format_") ? name.substr(7) : name;
    double error = 0;
    for (size_t l = 0; l < ladder.formats.size(); ++l) {
      if (ladder.formats[l] == bare) error = ladder.attention_error[l];
    }
    weighted += hit_blocks[f] * error;
    blocks += hit_blocks[f];
  }
  return blocks ? weighted / blocks : 0;
}

absl::StatusOr<TierReplayResult> ReplayThroughDramTier(
    const std::vector<cachenode::TraceRequest>& trace, uint64_t capacity_raw_blocks,
    v1::StoredFormat coarsest, bool leases_by_bytes, std::string_view policy) {
  cachenode::NamespaceRegistry registry(kSlabBytes);
  v1::NamespaceSpec spec;
  spec.set_model("tier-replay");
  spec.set_dtype(v1::DTYPE_FP16);
  spec.set_num_layers(1);
  spec.set_num_kv_heads(kHeads);
  spec.set_head_dim(kHeadDim);
  spec.set_tokens_per_block(kTokens);
  spec.set_coarsest_format(coarsest);
  absl::StatusOr<cachenode::NamespaceInfo> info = registry.Open(spec);
  if (!info.ok()) return info.status();
  if (info->block_bytes != kRawBytes) {
    return absl::InternalError(absl::StrCat("blocks of ", info->block_bytes, " bytes"));
  }
  const uint64_t ns = info->id;

  const uint64_t capacity = std::max<uint64_t>(capacity_raw_blocks * kRawBytes, 2 * kSlabBytes);
  std::vector<uint8_t> arena(capacity);
  absl::StatusOr<std::unique_ptr<cachenode::EvictionPolicy>> made =
      cachenode::MakeEvictionPolicy(policy);
  if (!made.ok()) return made.status();
  cachenode::DramTier tier(arena.data(), capacity, kSlabBytes, *std::move(made));
  cachenode::PrecisionTranscoder transcoder(registry);
  OneLeaseTranscoder one_lease(transcoder);
  if (coarsest != v1::FORMAT_RAW) {
    tier.set_transcoder(leases_by_bytes ? static_cast<const cachenode::BlockTranscoder*>(&transcoder)
                                        : &one_lease);
  }
  const std::vector<uint8_t> kv = GaussianKv();
  const uint64_t checksum = BlockChecksum(kv.data(), kv.size());

  TierReplayResult result;
  result.hit_blocks.assign(cachenode::kStoredFormats, 0);
  std::vector<BlockKey> keys;
  for (const cachenode::TraceRequest& request : trace) {
    keys.clear();
    for (uint64_t hash : request.hash_ids) keys.push_back(cachenode::NumberedBlockId(hash, ns).key);
    const size_t prefix = tier.PrefixLength(ns, keys);
    for (size_t i = 0; i < prefix; ++i) {
      std::shared_ptr<cachenode::StoredBlock> block =
          tier.Find(cachenode::BlockId{ns, keys[i]}, /*hit=*/false);
      if (block != nullptr && block->format < cachenode::kStoredFormats) {
        ++result.hit_blocks[block->format];
      }
    }
    result.total.prefix_hit_blocks += prefix;
    result.total.total_blocks += keys.size();
    result.total.hit_tokens += std::min<uint64_t>(prefix * cachenode::kTraceTokensPerBlock,
                                                  request.input_length);
    result.total.total_tokens += request.input_length;
    // Then every block in order, as ReplayPrecision: hits refresh, misses
    // are computed by the engine and published.
    for (size_t i = 0; i < keys.size(); ++i) {
      const cachenode::BlockId id{ns, keys[i]};
      ++result.total.operations;
      if (tier.Find(id, /*hit=*/true) != nullptr) {
        ++result.total.access_hits;
        continue;
      }
      absl::StatusOr<std::shared_ptr<cachenode::StoredBlock>> block = tier.Reserve(kRawBytes);
      if (!block.ok()) continue;  // nothing evictable: not cached
      std::memcpy((*block)->data(), kv.data(), kRawBytes);
      (*block)->checksum = checksum;
      if (i > 0) {
        (*block)->parent = keys[i - 1];
        (*block)->has_parent = true;
      }
      tier.Commit(id, *std::move(block));
    }
  }
  const cachenode::TierCounters counters = tier.counters();
  result.transcodes = counters.transcodes;
  result.stored_bytes = counters.stored_bytes;
  result.used_bytes = counters.used_bytes;
  result.blocks = counters.blocks;
  for (size_t f = 0; f < cachenode::kStoredFormats; ++f) {
    const uint64_t size = cachenode::StoredBytes(spec, static_cast<v1::StoredFormat>(f), kRawBytes);
    result.piece_ratio[f] = static_cast<double>((size + kPiece - 1) / kPiece * kPiece) / kRawBytes;
  }
  result.precision_leases = counters.precision_leases;
  return result;
}

}  // namespace kvstrata::bench
