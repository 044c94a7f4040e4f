// Where the node binary gets its GPU from: a link-time choice, not a flag.
// kvstrata-node links cuda_device_source.cc (the CUDA runtime); the tests'
// node binary (tests/support/device/) links one that returns the host-memory
// test double, so the double never enters cachenode/ or gpu_transfer/.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "kvstrata/transfer/device_memory.h"

namespace kvstrata::cachenode {

absl::StatusOr<std::unique_ptr<transfer::DeviceMemory>> OpenNodeDevice(int device);

}  // namespace kvstrata::cachenode
