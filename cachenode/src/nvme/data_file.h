// One preallocated data file of the NVMe tier, opened for O_DIRECT I/O, with
// the extent allocator for its space.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "nvme/extent_allocator.h"

namespace kvstrata::cachenode::nvme {

class DataFile {
 public:
  // Creates `directory` if needed, opens <directory>/kvstrata-data with
  // O_DIRECT and preallocates `capacity` bytes (fallocate), so the disk
  // filling up later cannot fail a write.
  static absl::StatusOr<std::unique_ptr<DataFile>> Open(const std::string& directory,
                                                       uint64_t capacity);
  ~DataFile();

  int fd() const { return fd_; }
  const std::string& path() const { return path_; }
  ExtentAllocator& extents() { return extents_; }

 private:
  DataFile(std::string path, int fd, uint64_t capacity)
      : path_(std::move(path)), fd_(fd), extents_(capacity) {}
  std::string path_;
  int fd_;
  ExtentAllocator extents_;
};

// Memory aligned for O_DIRECT, for blocks whose own memory is not.
struct AlignedFree {
  void operator()(void* p) const;
};
using AlignedBuffer = std::unique_ptr<uint8_t[], AlignedFree>;
AlignedBuffer AllocateAligned(uint64_t bytes);

// True when [data, data + AlignUp(size)) may be handed to O_DIRECT as is.
bool DirectIoCapable(const void* data, uint64_t size);

}  // namespace kvstrata::cachenode::nvme
