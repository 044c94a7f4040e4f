// Leases on HBM blocks that same-host clients copy device-to-device through
// the arena's CUDA IPC mapping (node_service_ipc.cc). A lease holds its
// blocks (so their chunks are neither evicted into reuse nor overwritten)
// until the client releases it or it expires: a client that died mid-copy
// pins nothing for longer than the node's transfer timeout.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/random/random.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kvstrata/cachenode/block.h"

namespace kvstrata::cachenode {

class DeviceIpcLeases {
 public:
  // `pinned` counts the blocks held now (a Stats gauge); `ttl`: how long a
  // lease lives unreleased.
  DeviceIpcLeases(std::atomic<uint64_t>& pinned, absl::Duration ttl) : pinned_(pinned), ttl_(ttl) {}
  ~DeviceIpcLeases();

  // Holds `blocks` under a new lease; its id is random (a client cannot
  // release another's lease by guessing), never 0. RESOURCE_EXHAUSTED when
  // kMaxLeases are live: a client that never releases cannot pin all of HBM.
  absl::StatusOr<uint64_t> Add(std::vector<std::shared_ptr<StoredBlock>> blocks);
  // Drops the lease; false when unknown (released, expired, never made).
  bool Release(uint64_t lease);
  // Drops expired leases (every call above does, so no thread is needed).
  void Sweep();

  static constexpr size_t kMaxLeases = 4096;

 private:
  struct Lease {
    std::vector<std::shared_ptr<StoredBlock>> blocks;
    absl::Time expires;
  };
  void SweepLocked(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Drop(Lease& lease) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  std::atomic<uint64_t>& pinned_;
  const absl::Duration ttl_;
  absl::Mutex mu_;
  absl::BitGen random_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, Lease> leases_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvstrata::cachenode
