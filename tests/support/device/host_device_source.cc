// The tests' node binary's GPU: the host-memory double (cachenode/src/device_source.h).
#include <cstdlib>

#include "device_source.h"
#include "host_device_memory.h"

namespace kvstrata::cachenode {

absl::StatusOr<std::unique_ptr<transfer::DeviceMemory>> OpenNodeDevice(int device) {
  if (device != 0) {
    return absl::FailedPreconditionError("the host double has one device, 0");
  }
  // Fault injection for tests: KVSTRATA_TEST_DEVICE_COPIES=N lets N copies
  // happen and fails every later one.
  uint64_t copies = UINT64_MAX;
  if (const char* limit = std::getenv("KVSTRATA_TEST_DEVICE_COPIES"))
    copies = std::strtoull(limit, nullptr, 10);
  return std::make_unique<testing::HostDeviceMemory>(copies);
}

}  // namespace kvstrata::cachenode
