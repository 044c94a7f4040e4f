// The tests' node binary's GPU: the host-memory double (cachenode/src/device_source.h).
#include "device_source.h"
#include "host_device_memory.h"

namespace kvstrata::cachenode {

absl::StatusOr<std::unique_ptr<transfer::DeviceMemory>> OpenNodeDevice(int device) {
  if (device != 0) {
    return absl::FailedPreconditionError("the host double has one device, 0");
  }
  return std::make_unique<testing::HostDeviceMemory>();
}

}  // namespace kvstrata::cachenode
