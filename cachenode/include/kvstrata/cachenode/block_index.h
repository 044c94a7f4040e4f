// The node's block index: BlockId -> stored block, sharded so lookups from
// many RPC threads rarely meet on a lock. Thread-safe.
#pragma once

#include <array>
#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/function_ref.h"
#include "absl/synchronization/mutex.h"
#include "kvstrata/cachenode/block.h"
#include "kvstrata/cachenode/block_page.h"

namespace kvstrata::cachenode {

class BlockIndex {
 public:
  // The block, or null.
  std::shared_ptr<StoredBlock> Find(const BlockId& id) const;
  // False (and no change) when `id` is present already.
  bool Insert(const BlockId& id, std::shared_ptr<StoredBlock> block);
  // Puts `block` in place of the stored one if that is still `expected`
  // (readers pinning the old one keep it); false and no change otherwise.
  bool Replace(const BlockId& id, const StoredBlock* expected, std::shared_ptr<StoredBlock> block);
  // Puts `make()`'s block in place of the stored one if that is still
  // `expected` and nobody holds it but the index and the caller (one
  // reference): no reader pinned it, and none can while `make` runs, under
  // the shard's lock, so `make` may reuse its memory. False and no change
  // otherwise, or when `make` returns null.
  bool ReplaceIfSole(const BlockId& id, const StoredBlock* expected,
                     absl::FunctionRef<std::shared_ptr<StoredBlock>()> make);
  // The removed block, or null when absent.
  std::shared_ptr<StoredBlock> Erase(const BlockId& id);
  size_t size() const;
  // Offers `page` every block of the namespace (as DRAM blocks).
  void List(uint64_t namespace_id, BlockPage& page) const;

 private:
  static constexpr size_t kShards = 32;
  struct Shard {
    mutable absl::Mutex mu;
    absl::flat_hash_map<BlockId, std::shared_ptr<StoredBlock>> blocks ABSL_GUARDED_BY(mu);
  };
  Shard& ShardOf(const BlockId& id) const;

  mutable std::array<Shard, kShards> shards_;
};

}  // namespace kvstrata::cachenode
