// The HBM tier: an arena in GPU memory, managed by the DRAM tier's own code
// (slab allocator, block index, eviction policy: DramTier never touches a
// block's bytes, only offsets), plus the copies in and out of the GPU.
//
// The blocks of `slabs()` hold device pointers. Host code and UCX must never
// read them: bytes leave the GPU only through CopyToHost (demotion) and
// StageAll (pinned host copies for a transfer), and enter through Admit, after
// the caller verified them in host memory. Thread-safe.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kvstrata/cachenode/dram_tier.h"
#include "kvstrata/transfer/device_memory.h"
#include "kvstrata/transfer/staging.h"

namespace kvstrata::transfer {
class Engine;
}

namespace kvstrata::cachenode {

struct HbmTierOptions {
  uint64_t capacity_bytes = 0;  // rounded down to whole slabs
  uint64_t slab_bytes = 64ull << 20;
  // Pinned host memory, registered with UCX once, that Fetch of HBM blocks
  // stages through (transfer::StagingPool).
  transfer::StagingOptions staging{.chunk_bytes = 256 * 1024};
};

struct HbmCounters {
  TierCounters tier;
  transfer::StagingCounters staging;
  uint64_t staged_blocks = 0;      // host copies made for transfers
  uint64_t staging_fallbacks = 0;  // of them, in memory of their own (pool full)
  uint64_t copy_errors = 0;        // device copies that failed (block then not served from HBM)
};

class HbmTier {
 public:
  // Takes `device`, allocates the arena and the staging pool (registered
  // with `engine`, none when null).
  static absl::StatusOr<std::unique_ptr<HbmTier>> Create(
      std::unique_ptr<transfer::DeviceMemory> device, const HbmTierOptions& options,
      std::unique_ptr<EvictionPolicy> policy, transfer::Engine* engine);
  ~HbmTier();

  // The bookkeeping over the device arena (see the file comment).
  DramTier& slabs() { return *slabs_; }
  const DramTier& slabs() const { return *slabs_; }
  transfer::DeviceMemory& device() { return *device_; }

  // Copies `host` (host memory, checksum verified, parent set) into a new
  // HBM chunk and commits it as `id`, with its stored format: true when stored, false when `id` is
  // stored here already; RESOURCE_EXHAUSTED when nothing can be evicted to
  // make room (every chunk pinned), or a copy error.
  absl::StatusOr<bool> Admit(const BlockId& id, const StoredBlock& host);
  // Host copies of HBM blocks for a transfer (one Fetch's), in the staging
  // pool or, when it is full, in memory of their own; the copies queue on
  // one stream with one wait. Each copy holds its HBM block until dropped,
  // so the chunk is not reused meanwhile. Null where a block could not be
  // staged (no host memory; all null when the device copies failed).
  std::vector<std::shared_ptr<StoredBlock>> StageAll(
      std::vector<std::shared_ptr<StoredBlock>> blocks);
  // Pinned, UCX-registered host memory for a block on its way in (a
  // publish lands there, is verified, then Admit copies it up);
  // RESOURCE_EXHAUSTED when the staging pool has no room now.
  absl::StatusOr<std::shared_ptr<StoredBlock>> Landing(uint64_t size);
  // Copies an HBM block's bytes to host memory of `block->size()` bytes.
  absl::Status CopyToHost(const StoredBlock& block, uint8_t* host);

  HbmCounters counters() const;

  // The same-host CUDA IPC path (node_service_ipc.cc): the arena's IPC
  // handle (exported on first use, then the same bytes for every client)
  // and where an HBM block lies in the arena.
  absl::StatusOr<std::string> ArenaIpcHandle();
  uint64_t arena_bytes() const { return arena_.size(); }
  uint64_t ArenaOffset(const StoredBlock& block) const {
    return static_cast<uint64_t>(block.data() - arena_.data());
  }
  // Whether this node's UCX reports CUDA memory (transfer/memory_types.h);
  // transfers stage either way for now. Set once, at start.
  void set_ucx_cuda_memory(bool supported) { ucx_cuda_memory_ = supported; }
  bool ucx_cuda_memory() const { return ucx_cuda_memory_; }

 private:
  HbmTier() = default;

  std::unique_ptr<transfer::DeviceMemory> device_;
  transfer::DeviceAllocation arena_;
  std::unique_ptr<transfer::StagingPool> staging_;
  std::unique_ptr<DramTier> slabs_;  // last: its blocks point into arena_
  std::atomic<uint64_t> staged_{0};
  std::atomic<uint64_t> fallbacks_{0};
  std::atomic<uint64_t> copy_errors_{0};
  bool ucx_cuda_memory_ = false;
  absl::Mutex ipc_mu_;
  std::string ipc_handle_ ABSL_GUARDED_BY(ipc_mu_);  // empty until exported
};

}  // namespace kvstrata::cachenode
