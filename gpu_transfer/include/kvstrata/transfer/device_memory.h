// Device (GPU) memory and copies, behind one small interface so the node's
// HBM tier and the staging path run on a real GPU (OpenCudaDevice) or, where
// none exists, on a host-memory test double (tests/support, never here).
//
// A device pointer is not host memory: only Copy() may read or write it (the
// test double maps it inaccessible, so a stray host access crashes a test).
// Errors are values; nothing here throws or aborts.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvstrata::transfer {

enum class CopyKind { kHostToDevice, kDeviceToHost, kDeviceToDevice };

// Memory the caller owns: a device arena, pinned host memory, an imported
// IPC mapping or a host range pinned for fast copies. Freed (unmapped,
// unregistered) when destroyed. Move-only.
class DeviceAllocation {
 public:
  DeviceAllocation() = default;
  DeviceAllocation(uint8_t* data, uint64_t size, std::function<void()> release)
      : data_(data), size_(size), release_(std::move(release)) {}
  DeviceAllocation(DeviceAllocation&& other) noexcept { *this = std::move(other); }
  DeviceAllocation& operator=(DeviceAllocation&& other) noexcept {
    if (this != &other) {
      Reset();
      data_ = other.data_;
      size_ = other.size_;
      release_ = std::move(other.release_);
      other.data_ = nullptr;
      other.size_ = 0;
      other.release_ = nullptr;
    }
    return *this;
  }
  DeviceAllocation(const DeviceAllocation&) = delete;
  DeviceAllocation& operator=(const DeviceAllocation&) = delete;
  ~DeviceAllocation() { Reset(); }

  uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }

 private:
  void Reset() {
    if (release_) release_();
    release_ = nullptr;
  }
  uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  std::function<void()> release_;
};

// Completes when everything queued on its stream before it has.
class DeviceEvent {
 public:
  virtual ~DeviceEvent() = default;
  // True once complete; an error if a copy before it failed.
  virtual absl::StatusOr<bool> Done() = 0;
  virtual absl::Status Wait() = 0;
};

// An ordered queue of copies (a CUDA stream). One thread at a time.
class DeviceStream {
 public:
  virtual ~DeviceStream() = default;
  // Queues a copy and returns at once. `src` and `dst` must stay valid and
  // unchanged until a later event or Synchronize() says it is done. Host
  // sides should be pinned (AllocatePinnedHost, PinHost) for the copy to be
  // asynchronous on a GPU; pageable memory works, synchronously.
  virtual absl::Status Copy(void* dst, const void* src, uint64_t bytes, CopyKind kind) = 0;
  virtual absl::StatusOr<std::unique_ptr<DeviceEvent>> Record() = 0;
  // Waits for every copy queued so far; the first failure among them.
  virtual absl::Status Synchronize() = 0;
};

// One GPU. Thread-safe (streams are not: one per thread).
class DeviceMemory {
 public:
  virtual ~DeviceMemory() = default;

  // What this is, for logs and Stats: "cuda:0 NVIDIA H200", "host double".
  virtual std::string description() const = 0;
  // Device memory of `bytes` bytes (RESOURCE_EXHAUSTED when the GPU has not
  // that much free).
  virtual absl::StatusOr<DeviceAllocation> Allocate(uint64_t bytes) = 0;
  // Page-locked host memory (cudaHostAlloc), for staging copies.
  virtual absl::StatusOr<DeviceAllocation> AllocatePinnedHost(uint64_t bytes) = 0;
  // Page-locks caller-owned host memory for fast copies (cudaHostRegister)
  // until the returned allocation is destroyed; its data() is `addr`.
  virtual absl::StatusOr<DeviceAllocation> PinHost(void* addr, uint64_t bytes) = 0;
  virtual absl::StatusOr<std::unique_ptr<DeviceStream>> CreateStream() = 0;
  // An opaque handle another process on this host passes to ImportIpc to map
  // `allocation` (which must come from Allocate) into its address space.
  virtual absl::StatusOr<std::string> ExportIpc(const DeviceAllocation& allocation) = 0;
  // Maps a peer's exported allocation; INVALID_ARGUMENT for a malformed handle.
  virtual absl::StatusOr<DeviceAllocation> ImportIpc(std::string_view handle) = 0;
  // OK when [device, device + bytes) is memory of this device (from Allocate,
  // an IPC import, or the caller's own cudaMalloc); INVALID_ARGUMENT naming
  // the address otherwise (a host pointer, another GPU's, freed memory). The
  // client checks a buffer when it is registered, so a wrong pointer is a
  // clear error there instead of a failed copy in the middle of a transfer.
  virtual absl::Status CheckDeviceRange(const void* device, uint64_t bytes) const = 0;
};

// The CUDA runtime's device `device`. UNIMPLEMENTED in a build without CUDA,
// FAILED_PRECONDITION when the process sees no such GPU.
absl::StatusOr<std::unique_ptr<DeviceMemory>> OpenCudaDevice(int device);

// Whether this build has the CUDA implementation.
bool CudaDeviceMemoryBuilt();

}  // namespace kvstrata::transfer
