#include "nvme/data_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"

namespace kvstrata::cachenode::nvme {

absl::StatusOr<std::unique_ptr<DataFile>> DataFile::Open(const std::string& directory,
                                                         uint64_t capacity) {
  std::error_code ec;
  std::filesystem::create_directories(directory, ec);
  if (ec) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot create ", directory, ": ", ec.message()));
  }
  std::string path = absl::StrCat(directory, "/kvstrata-data");
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_DIRECT | O_CLOEXEC, 0600);
  if (fd < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot open ", path, " for O_DIRECT I/O: ", std::strerror(errno)));
  }
  capacity = capacity / kExtentAlignment * kExtentAlignment;
  // Refuse up front what cannot fit: a failing fallocate may have filled the
  // disk before it gave up.
  struct stat st {};
  struct statvfs fs {};
  if (::fstat(fd, &st) == 0 && ::fstatvfs(fd, &fs) == 0) {
    const uint64_t have = static_cast<uint64_t>(st.st_blocks) * 512;
    const uint64_t available = static_cast<uint64_t>(fs.f_bavail) * fs.f_frsize;
    if (capacity > have && capacity - have > available) {
      ::close(fd);
      if (have == 0) ::unlink(path.c_str());
      return absl::ResourceExhaustedError(absl::StrCat(
          "cannot preallocate ", capacity, " bytes in ", path, ": only ", available,
          " bytes free on its filesystem"));
    }
  }
  if (int rc = ::posix_fallocate(fd, 0, static_cast<off_t>(capacity)); rc != 0) {
    ::close(fd);
    if (st.st_blocks == 0) ::unlink(path.c_str());
    return absl::ResourceExhaustedError(absl::StrCat("cannot preallocate ", capacity,
                                                     " bytes in ", path, ": ", std::strerror(rc)));
  }
  return std::unique_ptr<DataFile>(new DataFile(std::move(path), fd, capacity));
}

DataFile::~DataFile() { ::close(fd_); }

void AlignedFree::operator()(void* p) const { std::free(p); }

AlignedBuffer AllocateAligned(uint64_t bytes) {
  void* p = std::aligned_alloc(kExtentAlignment, AlignUp(bytes));
  return AlignedBuffer(static_cast<uint8_t*>(p));
}

bool DirectIoCapable(const void* data, uint64_t size) {
  return reinterpret_cast<uintptr_t>(data) % kExtentAlignment == 0 &&
         size % kExtentAlignment == 0;
}

}  // namespace kvstrata::cachenode::nvme
