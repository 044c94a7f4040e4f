#include "host_device_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"

namespace kvstrata::testing {
namespace {

constexpr char kIpcMagic[8] = {'k', 'v', 's', 'h', 'd', 'b', 'l', '1'};
struct IpcHandle {
  char magic[8];
  int64_t pid;
  int64_t fd;
  uint64_t size;
};

// Copies in order on one thread, like a CUDA stream on its copy engine.
class HostStream : public transfer::DeviceStream {
 public:
  explicit HostStream(HostDeviceMemory& device) : device_(device), worker_([this] { Run(); }) {}
  ~HostStream() override {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    worker_.join();
  }

  absl::Status Copy(void* dst, const void* src, uint64_t bytes, transfer::CopyKind kind) override {
    if (bytes == 0) return absl::OkStatus();
    const bool src_device = kind != transfer::CopyKind::kHostToDevice;
    const bool dst_device = kind != transfer::CopyKind::kDeviceToHost;
    absl::StatusOr<uint8_t*> from = Side(src, bytes, src_device, "source");
    if (!from.ok()) return from.status();
    absl::StatusOr<uint8_t*> to = Side(dst, bytes, dst_device, "destination");
    if (!to.ok()) return to.status();
    device_.RunCopyHook(kind);
    const bool fail = !device_.TakeCopy();
    std::lock_guard lock(mu_);
    queue_.push_back([this, from = *from, to = *to, bytes, fail] {
      if (fail) {
        failed_ = true;
      } else {
        std::memmove(to, from, bytes);
      }
    });
    ++queued_;
    cv_.notify_all();
    return absl::OkStatus();
  }

  absl::StatusOr<std::unique_ptr<transfer::DeviceEvent>> Record() override {
    std::lock_guard lock(mu_);
    return std::unique_ptr<transfer::DeviceEvent>(new Event(*this, queued_));
  }

  absl::Status Synchronize() override {
    std::lock_guard lock(mu_);
    return WaitFor(queued_);
  }

 private:
  class Event : public transfer::DeviceEvent {
   public:
    Event(HostStream& stream, uint64_t sequence) : stream_(stream), sequence_(sequence) {}
    absl::StatusOr<bool> Done() override {
      std::lock_guard lock(stream_.mu_);
      return stream_.done_ >= sequence_;
    }
    absl::Status Wait() override {
      std::lock_guard lock(stream_.mu_);
      return stream_.WaitFor(sequence_);
    }

   private:
    HostStream& stream_;
    const uint64_t sequence_;
  };

  // REQUIRES: mu_ held (through the caller's lock_guard).
  absl::Status WaitFor(uint64_t sequence) {
    std::unique_lock lock(mu_, std::adopt_lock);
    cv_.wait(lock, [&] { return done_ >= sequence; });
    lock.release();
    if (failed_) return absl::InternalError("host double: injected copy failure");
    return absl::OkStatus();
  }

  absl::StatusOr<uint8_t*> Side(const void* p, uint64_t bytes, bool device, const char* what) {
    if (device) return device_.Backing(p, bytes);
    if (p == nullptr) return absl::InvalidArgumentError(absl::StrCat("null host ", what));
    if (device_.OverlapsDevice(p, bytes)) {
      return absl::InvalidArgumentError(
          absl::StrCat("the host ", what, " of a copy is device memory"));
    }
    return static_cast<uint8_t*>(const_cast<void*>(p));
  }

  void Run() {
    std::unique_lock lock(mu_);
    while (true) {
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, everything done
      std::function<void()> copy = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      copy();
      lock.lock();
      ++done_;
      cv_.notify_all();
    }
  }

  HostDeviceMemory& device_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  uint64_t queued_ = 0;
  uint64_t done_ = 0;
  bool stopping_ = false;
  std::atomic<bool> failed_{false};  // sticky, like a CUDA stream's error
  std::thread worker_;               // last: starts after the rest is ready
};

}  // namespace

HostDeviceMemory::~HostDeviceMemory() = default;

absl::StatusOr<transfer::DeviceAllocation> HostDeviceMemory::Map(int fd, uint64_t bytes,
                                                                 bool keep_fd) {
  void* backing = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (backing == MAP_FAILED) {
    close(fd);
    return absl::ResourceExhaustedError(absl::StrCat("mmap ", bytes, ": ", std::strerror(errno)));
  }
  // The device address: the same pages, inaccessible to the host.
  void* device = mmap(nullptr, bytes, PROT_NONE, MAP_SHARED, fd, 0);
  if (device == MAP_FAILED) {
    munmap(backing, bytes);
    close(fd);
    return absl::ResourceExhaustedError(absl::StrCat("mmap ", bytes, ": ", std::strerror(errno)));
  }
  if (!keep_fd) {
    close(fd);
    fd = -1;
  }
  {
    absl::MutexLock lock(&mu_);
    ranges_[reinterpret_cast<uintptr_t>(device)] = {bytes, static_cast<uint8_t*>(backing), fd};
  }
  return transfer::DeviceAllocation(static_cast<uint8_t*>(device), bytes,
                                    [this, device, backing, bytes] {
                                      int fd = -1;
                                      {
                                        absl::MutexLock lock(&mu_);
                                        auto it = ranges_.find(reinterpret_cast<uintptr_t>(device));
                                        if (it != ranges_.end()) {
                                          fd = it->second.fd;
                                          ranges_.erase(it);
                                        }
                                      }
                                      munmap(device, bytes);
                                      munmap(backing, bytes);
                                      if (fd >= 0) close(fd);
                                    });
}

absl::StatusOr<transfer::DeviceAllocation> HostDeviceMemory::Allocate(uint64_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("device allocation of 0 bytes");
  const int fd = memfd_create("kvstrata-device-double", MFD_CLOEXEC);
  if (fd < 0) return absl::InternalError(absl::StrCat("memfd_create: ", std::strerror(errno)));
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    close(fd);
    return absl::ResourceExhaustedError(
        absl::StrCat("ftruncate ", bytes, ": ", std::strerror(errno)));
  }
  return Map(fd, bytes, /*keep_fd=*/true);
}

absl::StatusOr<transfer::DeviceAllocation> HostDeviceMemory::AllocatePinnedHost(uint64_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("pinned allocation of 0 bytes");
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return absl::ResourceExhaustedError("mmap of pinned host memory failed");
  return transfer::DeviceAllocation(static_cast<uint8_t*>(p), bytes,
                                    [p, bytes] { munmap(p, bytes); });
}

absl::StatusOr<transfer::DeviceAllocation> HostDeviceMemory::PinHost(void* addr, uint64_t bytes) {
  if (addr == nullptr || bytes == 0) return absl::InvalidArgumentError("pinning an empty range");
  if (OverlapsDevice(addr, bytes))
    return absl::InvalidArgumentError("pinning device memory as host");
  return transfer::DeviceAllocation(static_cast<uint8_t*>(addr), bytes, [] {});
}

absl::StatusOr<std::unique_ptr<transfer::DeviceStream>> HostDeviceMemory::CreateStream() {
  return std::unique_ptr<transfer::DeviceStream>(new HostStream(*this));
}

absl::StatusOr<std::string> HostDeviceMemory::ExportIpc(
    const transfer::DeviceAllocation& allocation) {
  absl::MutexLock lock(&mu_);
  auto it = ranges_.find(reinterpret_cast<uintptr_t>(allocation.data()));
  if (it == ranges_.end() || it->second.fd < 0) {
    return absl::InvalidArgumentError("only memory from Allocate can be exported");
  }
  IpcHandle handle{};
  std::memcpy(handle.magic, kIpcMagic, sizeof(kIpcMagic));
  handle.pid = getpid();
  handle.fd = it->second.fd;
  handle.size = it->second.size;
  return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

absl::StatusOr<transfer::DeviceAllocation> HostDeviceMemory::ImportIpc(std::string_view bytes) {
  IpcHandle handle{};
  if (bytes.size() != sizeof(handle)) {
    return absl::InvalidArgumentError(absl::StrCat("an IPC handle has ", sizeof(handle), " bytes"));
  }
  std::memcpy(&handle, bytes.data(), sizeof(handle));
  if (std::memcmp(handle.magic, kIpcMagic, sizeof(kIpcMagic)) != 0 || handle.size == 0) {
    return absl::InvalidArgumentError("not an IPC handle of the host double");
  }
  const std::string path = absl::StrCat("/proc/", handle.pid, "/fd/", handle.fd);
  const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  }
  return Map(fd, handle.size, /*keep_fd=*/false);
}

absl::StatusOr<uint8_t*> HostDeviceMemory::Backing(const void* device, uint64_t bytes) const {
  const auto at = reinterpret_cast<uintptr_t>(device);
  absl::MutexLock lock(&mu_);
  auto it = ranges_.upper_bound(at);
  if (it != ranges_.begin()) {
    --it;
    const uint64_t offset = at - it->first;
    if (at >= it->first && offset <= it->second.size && bytes <= it->second.size - offset) {
      return it->second.backing + offset;
    }
  }
  return absl::InvalidArgumentError("not a device pointer (or the range runs past its allocation)");
}

bool HostDeviceMemory::OverlapsDevice(const void* host, uint64_t bytes) const {
  const auto begin = reinterpret_cast<uintptr_t>(host);
  const uintptr_t end = begin + bytes;
  absl::MutexLock lock(&mu_);
  auto it = ranges_.lower_bound(end);  // first range starting at or after `end`
  if (it == ranges_.begin()) return false;
  --it;
  return it->first + it->second.size > begin;
}

}  // namespace kvstrata::testing
