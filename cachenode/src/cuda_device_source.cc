// kvstrata-node's GPU: the CUDA runtime's (device_source.h).
#include "device_source.h"

namespace kvstrata::cachenode {

absl::StatusOr<std::unique_ptr<transfer::DeviceMemory>> OpenNodeDevice(int device) {
  return transfer::OpenCudaDevice(device);
}

}  // namespace kvstrata::cachenode
