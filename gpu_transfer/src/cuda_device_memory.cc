// DeviceMemory on the CUDA runtime. Compiled only when CMake finds CUDA; no
// kernels, so the host compiler builds it against the toolkit's headers.
#include <cuda_runtime_api.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "kvstrata/transfer/device_memory.h"

namespace kvstrata::transfer {
namespace {

absl::Status CudaError(cudaError_t error, const std::string& what) {
  if (error == cudaSuccess) return absl::OkStatus();
  const std::string message =
      absl::StrCat(what, ": ", cudaGetErrorName(error), " (", cudaGetErrorString(error), ")");
  if (error == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(message);
  if (error == cudaErrorInvalidValue || error == cudaErrorInvalidResourceHandle ||
      error == cudaErrorInvalidDevicePointer) {
    return absl::InvalidArgumentError(message);
  }
  return absl::InternalError(message);
}

// cudaMemcpyKind for our kinds (cudaMemcpyDefault would also work with UVA,
// but an explicit kind makes the runtime reject a pointer of the wrong side).
cudaMemcpyKind Kind(CopyKind kind) {
  switch (kind) {
    case CopyKind::kHostToDevice:
      return cudaMemcpyHostToDevice;
    case CopyKind::kDeviceToHost:
      return cudaMemcpyDeviceToHost;
    case CopyKind::kDeviceToDevice:
      return cudaMemcpyDeviceToDevice;
  }
  return cudaMemcpyDefault;
}

class CudaEvent : public DeviceEvent {
 public:
  CudaEvent(int device, cudaEvent_t event) : device_(device), event_(event) {}
  ~CudaEvent() override {
    cudaSetDevice(device_);
    cudaEventDestroy(event_);
  }
  absl::StatusOr<bool> Done() override {
    cudaSetDevice(device_);
    const cudaError_t e = cudaEventQuery(event_);
    if (e == cudaErrorNotReady) return false;
    if (absl::Status s = CudaError(e, "cudaEventQuery"); !s.ok()) return s;
    return true;
  }
  absl::Status Wait() override {
    cudaSetDevice(device_);
    return CudaError(cudaEventSynchronize(event_), "cudaEventSynchronize");
  }

 private:
  int device_;
  cudaEvent_t event_;
};

class CudaStream : public DeviceStream {
 public:
  CudaStream(int device, cudaStream_t stream) : device_(device), stream_(stream) {}
  ~CudaStream() override {
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
  absl::Status Copy(void* dst, const void* src, uint64_t bytes, CopyKind kind) override {
    if (bytes == 0) return absl::OkStatus();
    cudaSetDevice(device_);
    return CudaError(cudaMemcpyAsync(dst, src, bytes, Kind(kind), stream_), "cudaMemcpyAsync");
  }
  absl::StatusOr<std::unique_ptr<DeviceEvent>> Record() override {
    cudaSetDevice(device_);
    cudaEvent_t event;
    if (absl::Status s =
            CudaError(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreate");
        !s.ok()) {
      return s;
    }
    if (absl::Status s = CudaError(cudaEventRecord(event, stream_), "cudaEventRecord"); !s.ok()) {
      cudaEventDestroy(event);
      return s;
    }
    return std::make_unique<CudaEvent>(device_, event);
  }
  absl::Status Synchronize() override {
    cudaSetDevice(device_);
    return CudaError(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

 private:
  int device_;
  cudaStream_t stream_;
};

class CudaDeviceMemory : public DeviceMemory {
 public:
  CudaDeviceMemory(int device, std::string name) : device_(device), name_(std::move(name)) {}

  std::string description() const override { return absl::StrCat("cuda:", device_, " ", name_); }

  absl::StatusOr<DeviceAllocation> Allocate(uint64_t bytes) override {
    cudaSetDevice(device_);
    void* p = nullptr;
    if (absl::Status s = CudaError(cudaMalloc(&p, bytes), absl::StrCat("cudaMalloc(", bytes, ")"));
        !s.ok()) {
      return s;
    }
    const int device = device_;
    return DeviceAllocation(static_cast<uint8_t*>(p), bytes, [device, p] {
      cudaSetDevice(device);
      cudaFree(p);
    });
  }

  absl::StatusOr<DeviceAllocation> AllocatePinnedHost(uint64_t bytes) override {
    cudaSetDevice(device_);
    void* p = nullptr;
    if (absl::Status s = CudaError(cudaHostAlloc(&p, bytes, cudaHostAllocPortable),
                                   absl::StrCat("cudaHostAlloc(", bytes, ")"));
        !s.ok()) {
      return s;
    }
    return DeviceAllocation(static_cast<uint8_t*>(p), bytes, [p] { cudaFreeHost(p); });
  }

  absl::StatusOr<DeviceAllocation> PinHost(void* addr, uint64_t bytes) override {
    cudaSetDevice(device_);
    if (absl::Status s =
            CudaError(cudaHostRegister(addr, bytes, cudaHostRegisterPortable), "cudaHostRegister");
        !s.ok()) {
      return s;
    }
    return DeviceAllocation(static_cast<uint8_t*>(addr), bytes,
                            [addr] { cudaHostUnregister(addr); });
  }

  absl::StatusOr<std::unique_ptr<DeviceStream>> CreateStream() override {
    cudaSetDevice(device_);
    cudaStream_t stream;
    if (absl::Status s = CudaError(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                                   "cudaStreamCreate");
        !s.ok()) {
      return s;
    }
    return std::make_unique<CudaStream>(device_, stream);
  }

  // The handle: the 64-byte cudaIpcMemHandle_t, then the size (8 bytes LE).
  absl::StatusOr<std::string> ExportIpc(const DeviceAllocation& allocation) override {
    cudaSetDevice(device_);
    cudaIpcMemHandle_t handle;
    if (absl::Status s =
            CudaError(cudaIpcGetMemHandle(&handle, allocation.data()), "cudaIpcGetMemHandle");
        !s.ok()) {
      return s;
    }
    std::string out(sizeof(handle) + sizeof(uint64_t), '\0');
    const uint64_t size = allocation.size();
    std::memcpy(out.data(), &handle, sizeof(handle));
    std::memcpy(out.data() + sizeof(handle), &size, sizeof(size));
    return out;
  }

  absl::StatusOr<DeviceAllocation> ImportIpc(std::string_view bytes) override {
    cudaIpcMemHandle_t handle;
    if (bytes.size() != sizeof(handle) + sizeof(uint64_t)) {
      return absl::InvalidArgumentError(absl::StrCat("a CUDA IPC handle has ",
                                                     sizeof(handle) + sizeof(uint64_t),
                                                     " bytes, got ", bytes.size()));
    }
    uint64_t size = 0;
    std::memcpy(&handle, bytes.data(), sizeof(handle));
    std::memcpy(&size, bytes.data() + sizeof(handle), sizeof(size));
    cudaSetDevice(device_);
    void* p = nullptr;
    if (absl::Status s = CudaError(cudaIpcOpenMemHandle(&p, handle, cudaIpcMemLazyEnablePeerAccess),
                                   "cudaIpcOpenMemHandle");
        !s.ok()) {
      return s;
    }
    const int device = device_;
    return DeviceAllocation(static_cast<uint8_t*>(p), size, [device, p] {
      cudaSetDevice(device);
      cudaIpcCloseMemHandle(p);
    });
  }

  // Both ends, so a range that starts in device memory and runs past its
  // allocation into host memory is caught too (the runtime has no query for
  // an allocation's extent short of the driver API).
  absl::Status CheckDeviceRange(const void* device, uint64_t bytes) const override {
    if (device == nullptr || bytes == 0) return absl::InvalidArgumentError("empty device range");
    const uint8_t* ends[2] = {static_cast<const uint8_t*>(device),
                              static_cast<const uint8_t*>(device) + bytes - 1};
    for (const uint8_t* p : ends) {
      cudaPointerAttributes attributes{};
      const cudaError_t error = cudaPointerGetAttributes(&attributes, p);
      if (error != cudaSuccess) cudaGetLastError();  // clear the sticky error of an unknown pointer
      if (error != cudaSuccess || attributes.type != cudaMemoryTypeDevice ||
          attributes.device != device_) {
        return absl::InvalidArgumentError(absl::StrCat(
            "0x", absl::Hex(reinterpret_cast<uintptr_t>(p)), " is not memory of GPU ", device_,
            error != cudaSuccess ? absl::StrCat(" (", cudaGetErrorName(error), ")") : ""));
      }
    }
    return absl::OkStatus();
  }

 private:
  const int device_;
  const std::string name_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<DeviceMemory>> OpenCudaDevice(int device) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("no CUDA device visible",
                     e == cudaSuccess ? "" : absl::StrCat(": ", cudaGetErrorString(e))));
  }
  if (device < 0 || device >= count) {
    return absl::FailedPreconditionError(
        absl::StrCat("GPU ", device, " requested; this process sees ", count));
  }
  cudaDeviceProp prop;
  if (absl::Status s = CudaError(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
      !s.ok()) {
    return s;
  }
  if (absl::Status s = CudaError(cudaSetDevice(device), "cudaSetDevice"); !s.ok()) return s;
  return std::make_unique<CudaDeviceMemory>(device, prop.name);
}

bool CudaDeviceMemoryBuilt() { return true; }

}  // namespace kvstrata::transfer
