// Client-side CUDA memory: device buffers, and the staging of their blocks
// through pinned host memory registered with UCX once (the same
// transfer::StagingPool the node's HBM tier uses). A device pointer never
// reaches UCX or host code: Debian's UCX 1.13 has no CUDA transports.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kvstrata/client/client.h"
#include "kvstrata/transfer/device_memory.h"
#include "kvstrata/transfer/staging.h"

namespace kvstrata::client {

// Memory of the client's GPU: owned (Allocate) or the caller's (Register).
class DeviceBuffer final : public Buffer {
 public:
  DeviceBuffer(uint8_t* data, size_t size, transfer::DeviceAllocation owned)
      : data_(data), size_(size), owned_(std::move(owned)) {}
  uint8_t* data() const override { return data_; }
  size_t size() const override { return size_; }
  MemoryKind kind() const override { return MemoryKind::kDevice; }

 private:
  uint8_t* data_;
  size_t size_;
  transfer::DeviceAllocation owned_;  // empty for registered memory
};

// Host stand-ins for the device blocks of one batch. Held by the transfer
// (and by UCX, as a receive's keep_alive) until nothing writes into it.
struct StagedBlocks {
  std::vector<uint8_t*> host;    // per item: where its bytes are staged; null: a host item
  std::vector<uint8_t*> device;  // per item: its device address; null: a host item
  std::vector<std::unique_ptr<transfer::StagingPool::Lease>> leases;
  std::vector<std::unique_ptr<uint8_t[]>> own;  // blocks the pool had no room for
};

// The client's GPU and staging pool, opened on the first device buffer.
class DeviceStager {
 public:
  DeviceStager(const ClientOptions& options, transfer::Engine* engine)
      : options_(options), engine_(engine) {}

  absl::StatusOr<std::unique_ptr<Buffer>> Register(void* data, size_t size);
  absl::StatusOr<std::unique_ptr<Buffer>> Allocate(size_t size);

  // Staging for a batch whose item i is at `device[i]` on the GPU (null for
  // host items); null when no item is on the device.
  absl::StatusOr<std::shared_ptr<StagedBlocks>> Stage(std::vector<uint8_t*> device,
                                                      uint64_t block_bytes);
  // Publish: every device block down into its staging, one stream, one wait.
  absl::Status CopyDown(const StagedBlocks& staged, uint64_t block_bytes);
  // Fetch: the staged bytes of the items with `sizes[i] > 0` up to the GPU.
  absl::Status CopyUp(const StagedBlocks& staged, const std::vector<uint64_t>& sizes);

  DeviceStagingCounters counters() const;
  // Device-to-device copies on one stream, one wait (the CUDA IPC path).
  absl::Status CopyOnDevice(absl::Span<const transfer::StagingPool::Copy> copies);
  // The device (opening it as Register would); for importing IPC handles.
  absl::StatusOr<transfer::DeviceMemory*> Device();

 private:
  // The device and pool, opened on first use (the CUDA runtime is not
  // touched by a client that never sees a device buffer).
  absl::StatusOr<transfer::StagingPool*> Pool();

  const ClientOptions& options_;
  transfer::Engine* const engine_;
  mutable absl::Mutex mu_;
  std::shared_ptr<transfer::DeviceMemory> device_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<transfer::StagingPool> pool_ ABSL_GUARDED_BY(mu_);  // before device_ goes
  std::atomic<uint64_t> staged_blocks_{0};
  std::atomic<uint64_t> fallback_blocks_{0};
};

}  // namespace kvstrata::client
