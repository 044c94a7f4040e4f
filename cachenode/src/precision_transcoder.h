// Precision tiers on a node: the DRAM tier's BlockTranscoder, reading each
// namespace's budget (NamespaceSpec.coarsest_format) from the registry and
// encoding with the kernels/ CPU path (stored_format.h has the ladder).
#pragma once

#include <array>
#include <cstdint>
#include <optional>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "kvstrata.pb.h"
#include "kvstrata/cachenode/dram_tier.h"
#include "kvstrata/cachenode/namespace_registry.h"

namespace kvstrata::cachenode {

// Thread-safe. Blocks of a namespace not open on this node (e.g. recovered
// from NVMe and not reopened yet) are never transcoded.
class PrecisionTranscoder : public BlockTranscoder {
 public:
  // `namespaces` must outlive this.
  explicit PrecisionTranscoder(const NamespaceRegistry& namespaces) : namespaces_(namespaces) {}

  std::optional<uint64_t> CoarserSize(const BlockId& id, const StoredBlock& block) const override;
  absl::Status Transcode(const BlockId& id, const StoredBlock& from, StoredBlock& to) const override;
  uint64_t RawSize(const BlockId& id) const override;

 private:
  // A namespace's ladder, worked out once: a spec never changes under its id.
  struct Ladder {
    v1::NamespaceSpec spec;
    std::array<std::optional<v1::StoredFormat>, kStoredFormats> next;  // by current format
    std::array<uint64_t, kStoredFormats> bytes{};                      // stored size per format
  };
  // Null when the namespace is not open or has no budget.
  std::shared_ptr<const Ladder> LadderOf(uint64_t namespace_id) const;

  const NamespaceRegistry& namespaces_;
  mutable absl::Mutex mu_;
  // Bounded: cleared when it reaches kMaxCached (a miss only costs a lookup).
  static constexpr size_t kMaxCached = 4096;
  mutable absl::flat_hash_map<uint64_t, std::shared_ptr<const Ladder>> cache_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvstrata::cachenode
