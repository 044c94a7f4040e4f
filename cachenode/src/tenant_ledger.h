// What each tenant holds in the node's memory tiers (DRAM and, on a node
// with one, HBM: a block is in one of them, never both, so their capacities
// add), and its quota.
//
// The tiers report every block entering and leaving them (DramTier's
// residency hook, on both); the ledger adds them up per tenant and remembers
// each tenant's blocks in arrival order. A publish from a tenant at its quota
// first evicts that tenant's oldest blocks out of memory (to NVMe, or
// dropped without one), so a tenant that floods the node displaces its own
// blocks, not other tenants'. A block moving between HBM and DRAM leaves one
// tier and enters the other: counted once, and then as newly arrived.
// Within a tenant the order is first-in first-out, not the tier's policy: the
// policy ranks all blocks together and cannot be asked for one tenant's.
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "kvstrata/cachenode/block.h"
#include "tiered_store.h"

namespace kvstrata::cachenode {

class TenantLedger {
 public:
  // `store` evicts and finds blocks in memory (TieredStore::EvictFromMemory);
  // it must outlive the ledger.
  explicit TenantLedger(TieredStore& store) : store_(store) {}

  // Namespaces map to tenants from their opening on; a closed namespace's
  // entry stays while blocks of it are resident.
  void NamespaceOpened(uint64_t namespace_id, const std::string& tenant);
  void NamespaceClosed(uint64_t namespace_id);

  // The residency hook.
  void OnResidency(const BlockId& id, uint64_t size, bool resident);

  // How many of `count` new blocks of `block_bytes` `tenant` may add without
  // passing `quota_bytes` (0: no quota, all of them), after evicting as many
  // of its own oldest blocks as that takes. Concurrent publishes of one
  // tenant may together pass the quota by what they have in flight.
  size_t MakeRoom(const std::string& tenant, uint64_t quota_bytes, size_t count,
                  uint64_t block_bytes);

  struct Usage {
    std::string tenant;
    uint64_t dram_bytes = 0;   // in memory: DRAM and HBM
    uint64_t dram_blocks = 0;
    uint64_t quota_evictions = 0;  // own blocks evicted to stay within the quota
  };
  std::vector<Usage> Snapshot() const;

 private:
  struct Namespace {
    std::string tenant;
    uint64_t blocks = 0;
    bool open = true;
  };
  struct Account {
    uint64_t bytes = 0;
    uint64_t blocks = 0;
    uint64_t quota_evictions = 0;
    // Arrival order; entries of blocks that left since are skipped (and
    // compacted away once they outnumber the live ones).
    std::deque<std::pair<BlockId, uint64_t>> order;
  };

  TieredStore& store_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<uint64_t, Namespace> namespaces_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, Account> accounts_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvstrata::cachenode
