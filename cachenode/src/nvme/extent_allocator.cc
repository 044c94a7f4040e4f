#include "nvme/extent_allocator.h"

namespace kvstrata::cachenode::nvme {

ExtentAllocator::ExtentAllocator(uint64_t capacity)
    : capacity_(capacity / kExtentAlignment * kExtentAlignment) {
  if (capacity_ > 0) AddFree(0, capacity_);
}

void ExtentAllocator::AddFree(uint64_t offset, uint64_t length) {
  by_offset_.emplace(offset, length);
  by_length_.emplace(length, offset);
}

void ExtentAllocator::RemoveFree(std::map<uint64_t, uint64_t>::iterator it) {
  by_length_.erase({it->second, it->first});
  by_offset_.erase(it);
}

std::optional<uint64_t> ExtentAllocator::Allocate(uint64_t length) {
  length = AlignUp(length);
  if (length == 0) return std::nullopt;
  auto fit = by_length_.lower_bound({length, 0});
  if (fit == by_length_.end()) return std::nullopt;
  const auto [free_length, offset] = *fit;
  RemoveFree(by_offset_.find(offset));
  if (free_length > length) AddFree(offset + length, free_length - length);
  used_ += length;
  return offset;
}

bool ExtentAllocator::Claim(uint64_t offset, uint64_t length) {
  length = AlignUp(length);
  if (length == 0 || offset % kExtentAlignment != 0 || offset > capacity_ ||
      length > capacity_ - offset) {
    return false;
  }
  auto it = by_offset_.upper_bound(offset);
  if (it == by_offset_.begin()) return false;
  --it;  // the free extent starting at or before `offset`
  const uint64_t start = it->first, free_length = it->second;
  if (offset + length > start + free_length) return false;
  RemoveFree(it);
  if (offset > start) AddFree(start, offset - start);
  if (start + free_length > offset + length) {
    AddFree(offset + length, start + free_length - offset - length);
  }
  used_ += length;
  return true;
}

void ExtentAllocator::Free(uint64_t offset, uint64_t length) {
  length = AlignUp(length);
  used_ -= length;
  auto next = by_offset_.lower_bound(offset);
  if (next != by_offset_.end() && offset + length == next->first) {
    length += next->second;
    RemoveFree(next);
  }
  auto prev = by_offset_.lower_bound(offset);
  if (prev != by_offset_.begin()) {
    --prev;
    if (prev->first + prev->second == offset) {
      offset = prev->first;
      length += prev->second;
      RemoveFree(prev);
    }
  }
  AddFree(offset, length);
}

}  // namespace kvstrata::cachenode::nvme
