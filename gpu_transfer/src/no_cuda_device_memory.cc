// OpenCudaDevice in a build without CUDA: a clear error, never a crash.
#include "kvstrata/transfer/device_memory.h"

namespace kvstrata::transfer {

absl::StatusOr<std::unique_ptr<DeviceMemory>> OpenCudaDevice(int /*device*/) {
  return absl::UnimplementedError(
      "this build has no CUDA (CMake found no CUDA compiler): no HBM tier; rebuild where "
      "/usr/local/cuda or nvcc is present");
}

bool CudaDeviceMemoryBuilt() { return false; }

}  // namespace kvstrata::transfer
