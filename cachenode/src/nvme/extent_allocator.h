// Space in one preallocated data file, handed out as 4 KiB-aligned extents.
// Best fit by size (O(log n)), neighbours coalesced on free, so a tier of
// uniform blocks never fragments and mixed sizes fragment slowly. Not
// thread-safe: the NVMe tier serializes calls.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <utility>

namespace kvstrata::cachenode::nvme {

inline constexpr uint64_t kExtentAlignment = 4096;

inline uint64_t AlignUp(uint64_t n) {
  return (n + kExtentAlignment - 1) / kExtentAlignment * kExtentAlignment;
}

class ExtentAllocator {
 public:
  explicit ExtentAllocator(uint64_t capacity);

  // Offset of `length` bytes (rounded up to the alignment), or nullopt.
  std::optional<uint64_t> Allocate(uint64_t length);
  // Claims a specific extent (used when the index is recovered). False when
  // any part of it is not free: two index records claim the same bytes.
  bool Claim(uint64_t offset, uint64_t length);
  void Free(uint64_t offset, uint64_t length);

  uint64_t capacity() const { return capacity_; }
  uint64_t used_bytes() const { return used_; }

 private:
  void AddFree(uint64_t offset, uint64_t length);
  void RemoveFree(std::map<uint64_t, uint64_t>::iterator it);

  const uint64_t capacity_;
  uint64_t used_ = 0;
  std::map<uint64_t, uint64_t> by_offset_;              // free extents: offset -> length
  std::set<std::pair<uint64_t, uint64_t>> by_length_;   // (length, offset)
};

}  // namespace kvstrata::cachenode::nvme
