// Blocks on their way between tiers (a demotion: HBM -> DRAM -> NVMe; a
// promotion: NVMe -> DRAM -> HBM), so that a Delete can wait for them.
//
// Why: a moving block is in no index while it is copied (a demotion took it
// out of its tier) or will be committed above a copy the Delete already
// erased (a promotion), so a Delete that only erased what it found would let
// the copy land afterwards and serve a deleted block. TieredStore::Erase
// therefore runs its erase through Erase here: every tier is erased, and
// erased again after any move of that key that was in flight during the
// pass (or began since) has ended, until a pass saw none
// (cachenode/README.md, "Delete").
//
// A mover calls Begin before it looks at (or takes) its source and End
// after it committed, or gave up on, the copy; the DRAM tier begins an
// eviction's move under its lock, with the block's removal. Thread-safe; a
// leaf lock.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/function_ref.h"
#include "absl/synchronization/mutex.h"
#include "kvstrata/cachenode/block.h"

namespace kvstrata::cachenode {

class BlockMoves {
 public:
  // Registers a move of `id`; pass the result to End.
  uint64_t Begin(const BlockId& id);
  void End(uint64_t ticket);
  // Runs `erase_everywhere` (which removes `id` from every tier and says
  // whether it found it), then waits for the moves of `id` in flight, and
  // runs it again while a move overlapped the last pass. True when some
  // pass found the block.
  bool Erase(const BlockId& id, absl::FunctionRef<bool()> erase_everywhere);
  size_t in_flight() const;

 private:
  mutable absl::Mutex mu_;
  uint64_t next_ ABSL_GUARDED_BY(mu_) = 1;
  absl::flat_hash_map<uint64_t, BlockId> moves_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<BlockId, uint32_t> per_block_ ABSL_GUARDED_BY(mu_);  // moves in flight
  struct Erasing {
    uint32_t erasers = 0;
    uint64_t moves_begun = 0;  // moves of the block begun while it is being erased
  };
  absl::flat_hash_map<BlockId, Erasing> erasing_ ABSL_GUARDED_BY(mu_);
};

// Begin ... End for one scope; empty (no registry) is a no-op.
class ScopedMove {
 public:
  ScopedMove(BlockMoves* moves, const BlockId& id)
      : moves_(moves), ticket_(moves != nullptr ? moves->Begin(id) : 0) {}
  ~ScopedMove() {
    if (moves_ != nullptr) moves_->End(ticket_);
  }
  ScopedMove(const ScopedMove&) = delete;
  ScopedMove& operator=(const ScopedMove&) = delete;

 private:
  BlockMoves* moves_;
  uint64_t ticket_;
};

}  // namespace kvstrata::cachenode
