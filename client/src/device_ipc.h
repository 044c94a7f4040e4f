// The same-host CUDA IPC path for device buffers (issue 19, item 5): the
// node's HBM arena mapped into this process once, so a fetch of HBM blocks
// into device buffers is a device-to-device copy under a node-side pin
// (Namespace::FetchWithDeviceIpc in device_ipc.cc).
#pragma once

#include <atomic>
#include <cstdint>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kvstrata.grpc.pb.h"
#include "kvstrata/client/client.h"
#include "kvstrata/transfer/device_memory.h"

namespace kvstrata::client {

class DeviceStager;

class DeviceIpcPath {
 public:
  struct Arena {
    const uint8_t* data = nullptr;  // null: this client stages (the node's choice, or no mapping)
    uint64_t bytes = 0;
  };
  // The mapped arena, asking the node (OpenDeviceIpc) on the first call
  // only: its answer (and a failed mapping) holds for the client's life.
  Arena Get(v1::CacheNode::Stub& stub, DeviceStager& device, absl::Duration timeout);
  void CountBlocks(uint64_t n) { blocks_.fetch_add(n, std::memory_order_relaxed); }
  void AddCounters(DeviceStagingCounters& counters);

 private:
  absl::Mutex mu_;
  bool asked_ ABSL_GUARDED_BY(mu_) = false;
  transfer::DeviceAllocation mapping_ ABSL_GUARDED_BY(mu_);
  std::atomic<uint64_t> blocks_{0};
};

}  // namespace kvstrata::client
