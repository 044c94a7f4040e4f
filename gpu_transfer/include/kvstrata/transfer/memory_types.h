// Which memory UCX can move itself. Debian's UCX 1.13 is built without CUDA
// (no cuda_copy, cuda_ipc or gdr_copy transports), so device memory must be
// staged through pinned host memory (staging.h); a UCX that reports CUDA
// memory could be handed device memory directly (not built yet).
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace kvstrata::transfer {

// Whether UCX, with `transports` (UCX_TLS syntax; empty: UCX_TLS or UCX's
// choice), reports CUDA device memory among its memory types
// (ucp_context_query). Opens and closes a UCX context of its own.
absl::StatusOr<bool> UcxSupportsCudaMemory(const std::string& transports);

}  // namespace kvstrata::transfer
