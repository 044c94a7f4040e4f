// Staging between device memory and UCX: pinned host buffers, allocated and
// registered with UCX once, lent out and reused. Debian's UCX 1.13 has no
// CUDA transports, so a device pointer must never reach UCX; every transfer
// of device bytes goes device -> staging -> UCX (and back). The node's HBM
// tier uses it for Fetch; client-side CUDA memory is meant to use it too.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "kvstrata/transfer/device_memory.h"

namespace kvstrata::transfer {

class Engine;
class MemoryRegion;

struct StagingOptions {
  uint64_t bytes = 64ull << 20;       // the whole pinned region
  uint64_t chunk_bytes = 1ull << 20;  // lease granularity and copy size
};

struct StagingCounters {
  uint64_t capacity_bytes = 0;
  uint64_t leased_bytes = 0;  // held by leases now
  uint64_t leases = 0;        // taken so far
  uint64_t exhausted = 0;     // Take() found no room (the caller fell back)
};

class StagingPool {
 public:
  // A run of whole chunks of the pinned region, back to the pool when
  // destroyed. Keeps the region (and its UCX registration) alive, so a lease
  // may outlive the pool; not the engine it was registered with.
  class Lease {
   public:
    ~Lease();
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    uint8_t* data() const { return data_; }
    uint64_t size() const { return size_; }

   private:
    friend class StagingPool;
    struct State;
    Lease(std::shared_ptr<State> state, size_t first, size_t count, uint8_t* data, uint64_t size)
        : state_(std::move(state)), first_(first), count_(count), data_(data), size_(size) {}
    std::shared_ptr<State> state_;
    size_t first_, count_;
    uint8_t* data_;
    uint64_t size_;
  };

  // Allocates `options.bytes` of pinned host memory from `device` (rounded
  // up to whole chunks) and registers it with `engine` (none when null).
  // `device` must outlive the pool and its leases.
  static absl::StatusOr<std::unique_ptr<StagingPool>> Create(DeviceMemory& device, Engine* engine,
                                                             const StagingOptions& options);
  ~StagingPool();

  // Contiguous staging memory for `bytes` bytes, or RESOURCE_EXHAUSTED when
  // no run of free chunks is long enough now. Never waits: leases are held
  // by transfers that may last until their deadline, so a caller falls back
  // (to memory of its own) instead.
  absl::StatusOr<std::unique_ptr<Lease>> Take(uint64_t bytes);

  // Copies device bytes to host memory (a lease's, or any host memory) and
  // back, in chunk-sized copies on a stream of the pool; returns when done.
  absl::Status CopyToHost(uint8_t* host, const uint8_t* device, uint64_t bytes);
  absl::Status CopyToDevice(uint8_t* device, const uint8_t* host, uint64_t bytes);
  // Many copies of one direction on one stream with one wait at the end
  // (a batch of blocks: the copies queue back to back instead of each
  // waiting for the last).
  struct Copy {
    uint8_t* dst;
    const uint8_t* src;
    uint64_t bytes;
  };
  absl::Status CopyAll(absl::Span<const Copy> copies, CopyKind kind);

  StagingCounters counters() const;
  uint64_t chunk_bytes() const { return chunk_bytes_; }

 private:
  StagingPool(DeviceMemory& device, uint64_t chunk_bytes, std::shared_ptr<Lease::State> state)
      : device_(device), chunk_bytes_(chunk_bytes), state_(std::move(state)) {}

  DeviceMemory& device_;
  const uint64_t chunk_bytes_;
  std::shared_ptr<Lease::State> state_;
  // Streams not in use; a copier takes one (or makes one) and gives it back.
  absl::Mutex streams_mu_;
  std::vector<std::unique_ptr<DeviceStream>> idle_streams_ ABSL_GUARDED_BY(streams_mu_);
};

}  // namespace kvstrata::transfer
