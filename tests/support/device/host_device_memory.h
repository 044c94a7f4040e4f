// The test double for a GPU: DeviceMemory over host memory, for machines
// (development, CI) that have none. Test-only; never linked into the node's
// library (tests build a node binary with it: tests/support/device/README.md).
//
// It keeps the contract a GPU enforces: a "device pointer" names an address
// range mapped PROT_NONE, so host code that reads or writes it directly
// crashes, as it would on a GPU; only Copy() reaches the bytes (kept in a
// second, private mapping of the same memfd). Copies run on a thread per
// stream, so code that forgets to wait for one reads stale bytes here too.
// IPC handles name the memfd through /proc/<pid>/fd, so another process maps
// the same bytes, like cudaIpcOpenMemHandle.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "kvstrata/transfer/device_memory.h"

namespace kvstrata::testing {

class HostDeviceMemory : public transfer::DeviceMemory {
 public:
  // Fault injection: copies after the first `copies_before_failure` do not
  // happen, and the Synchronize or event wait after them fails, as a CUDA
  // error surfaces at the next synchronisation.
  explicit HostDeviceMemory(uint64_t copies_before_failure = UINT64_MAX)
      : copies_left_(copies_before_failure) {}
  ~HostDeviceMemory() override;

  std::string description() const override { return "host double"; }
  absl::StatusOr<transfer::DeviceAllocation> Allocate(uint64_t bytes) override;
  absl::StatusOr<transfer::DeviceAllocation> AllocatePinnedHost(uint64_t bytes) override;
  absl::StatusOr<transfer::DeviceAllocation> PinHost(void* addr, uint64_t bytes) override;
  absl::StatusOr<std::unique_ptr<transfer::DeviceStream>> CreateStream() override;
  absl::StatusOr<std::string> ExportIpc(const transfer::DeviceAllocation& allocation) override;
  absl::StatusOr<transfer::DeviceAllocation> ImportIpc(std::string_view handle) override;
  absl::Status CheckDeviceRange(const void* device, uint64_t bytes) const override {
    return Backing(device, bytes).status();
  }

  // Where the bytes of [device, device + bytes) live (for the double's own
  // copies); INVALID_ARGUMENT unless the range lies inside one allocation.
  absl::StatusOr<uint8_t*> Backing(const void* device, uint64_t bytes) const;
  // Whether [host, host + bytes) overlaps device memory (a host side of a
  // copy must not).
  bool OverlapsDevice(const void* host, uint64_t bytes) const;
  // Called on the caller's thread at every Copy, before it is queued (a test
  // holds a copy there to order it against another thread's call). Set
  // before copies run.
  using CopyHook = std::function<void(transfer::CopyKind)>;
  void set_copy_hook(CopyHook hook) { copy_hook_ = std::move(hook); }
  void RunCopyHook(transfer::CopyKind kind) const {
    if (copy_hook_) copy_hook_(kind);
  }
  // Takes one copy from the budget; false once it is spent.
  bool TakeCopy() {
    uint64_t left = copies_left_.load();
    while (left > 0 && !copies_left_.compare_exchange_weak(left, left - 1)) {
    }
    return left > 0;
  }

 private:
  struct Range {
    uint64_t size;
    uint8_t* backing;
    int fd;  // the memfd; -1 for an import (closed once mapped)
  };
  absl::StatusOr<transfer::DeviceAllocation> Map(int fd, uint64_t bytes, bool keep_fd);

  std::atomic<uint64_t> copies_left_;
  CopyHook copy_hook_;
  mutable absl::Mutex mu_;
  std::map<uintptr_t, Range> ranges_ ABSL_GUARDED_BY(mu_);  // by device address
};

}  // namespace kvstrata::testing
