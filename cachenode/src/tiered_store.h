// The node's view over its tiers: the DRAM tier, and the NVMe tier and the
// HBM tier when configured. Finds a block wherever it is, promotes NVMe hits
// into DRAM and demotes DRAM evictions to NVMe (wired at construction). With
// HBM (tiered_store_hbm.cc): new and hit blocks go to HBM, HBM evictions to
// DRAM; a block is in HBM or DRAM, never both, and HBM bytes leave the GPU
// only as staged host copies.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/types/span.h"
#include "kvstrata.pb.h"
#include "kvstrata/cachenode/block_moves.h"
#include "kvstrata/cachenode/dram_tier.h"
#include "kvstrata/cachenode/hbm_tier.h"
#include "kvstrata/cachenode/nvme_tier.h"

namespace kvstrata::cachenode {

class TieredStore {
 public:
  // `nvme` may be null. Both must outlive the store. With `prefetch`,
  // PrefixTiers queues the NVMe blocks it finds for promotion in the
  // background, so the Fetch that usually follows a Lookup finds them in DRAM.
  // `hbm` may be null (no GPU tier); it must outlive the store too.
  TieredStore(DramTier& dram, NvmeTier* nvme, bool prefetch = false, HbmTier* hbm = nullptr);
  ~TieredStore();
  // Ends background promotion (before the node flushes DRAM at shutdown).
  void StopPrefetch();

  DramTier& dram() { return dram_; }
  NvmeTier* nvme() { return nvme_; }
  HbmTier* hbm() { return hbm_; }

  // Memory for a block on its way in (a publish): with HBM, pinned staging
  // memory when the pool has room (so landing evicts nothing from DRAM),
  // else a DRAM reservation (DramTier::Reserve).
  absl::StatusOr<std::shared_ptr<StoredBlock>> Reserve(uint64_t size);
  // Makes a reserved, filled and verified block visible: copied into
  // HBM when the node has it (hot-first placement; the DRAM chunk is then
  // only the landing buffer), else, or when HBM cannot make room, committed
  // to DRAM. True when stored, false when `id` is stored already;
  // RESOURCE_EXHAUSTED when (with HBM, rarely) neither HBM nor DRAM has an
  // unpinned chunk for it, so the publisher hears NO_SPACE, not "present".
  absl::StatusOr<bool> Commit(const BlockId& id, std::shared_ptr<StoredBlock> block);

  // Blocks moved between HBM and DRAM.
  struct HbmMoves {
    uint64_t promoted = 0;        // DRAM (or NVMe) hits moved up into HBM
    uint64_t demoted = 0;         // HBM evictions kept in DRAM
    uint64_t demotion_drops = 0;  // HBM evictions DRAM had no room for (then gone)
  };
  HbmMoves hbm_moves() const;
  // The HBM blocks among `ids` (null for the rest), as hits, without
  // staging: held, each chunk stays allocated, for a same-host client's
  // device-to-device copy through the arena's IPC mapping.
  std::vector<std::shared_ptr<StoredBlock>> PinHbm(absl::Span<const BlockId> ids);

  // The tier of each leading stored key (the longest cached prefix); tells
  // the policies of the tiers they were hit.
  std::vector<v1::Tier> PrefixTiers(uint64_t namespace_id, absl::Span<const BlockKey> keys);
  bool Contains(const BlockId& id);
  // The stored format (v1::StoredFormat) of `id` wherever it is, nullopt
  // when not stored; not a hit.
  std::optional<uint8_t> StoredFormatOf(const BlockId& id);
  // Pins each block that is stored, null for a miss. Blocks on NVMe are read
  // into DRAM (verified against their checksums) and committed there: a hit
  // promotes. A block whose NVMe bytes are damaged is a miss. With HBM, a
  // DRAM hit moves up into HBM, and an HBM hit comes back as a staged host
  // copy that pins the HBM chunk until it is dropped.
  std::vector<std::shared_ptr<StoredBlock>> Pin(absl::Span<const BlockId> ids);
  // Removes `id` from every tier. Waits for a move of the block in flight
  // (a demotion or promotion copying it) to land, and erases that copy too,
  // so a deleted block is never served after this returns.
  bool Erase(const BlockId& id);
  // Moves between tiers in flight (for tests).
  size_t moves_in_flight() const { return moves_.in_flight(); }
  // The namespace's blocks with keys after `after`, in key order, at most
  // `limit`; `more` says whether others follow. A block in both tiers is
  // listed once, as DRAM.
  std::vector<ListedBlock> List(uint64_t namespace_id, const std::optional<BlockKey>& after,
                                size_t limit, bool* more);
  // Those of `ids` stored (in key order), without counting them as hits.
  std::vector<ListedBlock> Describe(absl::Span<const BlockId> ids);
  // The engine's hint that the request whose prompt ended with `last_block`
  // finished, generating `output_tokens` tokens: passed to the policy of
  // every tier. True when some tier holds the block (or it is queued for
  // NVMe).
  bool RequestFinished(const BlockId& last_block, uint32_t output_tokens);

  // Tenant quotas (TenantLedger) count the memory tiers, HBM and DRAM, whose
  // blocks are exclusive and whose capacities add. InMemory: `id` is in one
  // of them. EvictFromMemory: takes `id` out of memory (an HBM block goes
  // to NVMe, or is dropped without one: demoting it into DRAM would keep it
  // in memory), as an eviction; false when it is in neither.
  bool InMemory(const BlockId& id);
  bool EvictFromMemory(const BlockId& id);
  // Tells `hook` of every block entering and leaving HBM and DRAM (both
  // tiers' residency hooks). Set once, before use.
  void set_memory_residency_hook(const DramTier::ResidencyHook& hook);

  uint64_t promoted_blocks() const { return promoted_.load(std::memory_order_relaxed); }

 private:
  std::vector<std::shared_ptr<StoredBlock>> PinDramOrNvme(absl::Span<const BlockId> ids);
  bool EraseEverywhere(const BlockId& id);
  // tiered_store_hbm.cc
  void WireHbm();
  // `into_dram`: false for a quota eviction (straight to NVMe, or dropped).
  void DemoteFromHbm(const BlockId& id, std::shared_ptr<StoredBlock> block, bool into_dram = true);
  void PromoteToHbm(const BlockId& id, const std::shared_ptr<StoredBlock>& block);
  void Prefetch(std::vector<BlockId> ids);
  void PrefetchLoop();

  DramTier& dram_;
  NvmeTier* const nvme_;
  std::atomic<uint64_t> promoted_{0};
  HbmTier* const hbm_;
  std::atomic<uint64_t> hbm_promoted_{0};
  std::atomic<uint64_t> hbm_demoted_{0};
  std::atomic<uint64_t> hbm_demotion_drops_{0};
  BlockMoves moves_;  // before the tiers use it: set on them in the constructor

  // Background promotion: a bounded queue (beyond it, Lookup hints are
  // dropped; the Fetch then promotes) and one thread.
  static constexpr size_t kMaxPrefetchQueue = 4096;
  std::mutex prefetch_mu_;
  std::condition_variable prefetch_cv_;
  std::deque<BlockId> prefetch_queue_;
  bool prefetch_stopping_ = false;
  std::thread prefetcher_;
};

}  // namespace kvstrata::cachenode
