#include "kvstrata/cachenode/slab_allocator.h"

#include <algorithm>
#include <cassert>

namespace kvstrata::cachenode {
namespace {
constexpr uint64_t kPage = 4096;
uint64_t RoundUpToPage(uint64_t v) { return (v + kPage - 1) / kPage * kPage; }
}  // namespace

SlabAllocator::SlabAllocator(uint64_t capacity, uint64_t slab_bytes) : slab_bytes_(slab_bytes) {
  assert(slab_bytes % kPage == 0 && slab_bytes > 0 && capacity >= slab_bytes);
  // Eight classes per power of two (p, 9p/8, ..., 15p/8), so powers of two —
  // the usual KV block sizes — fit exactly and nothing wastes more than 1/8.
  for (uint64_t power = kPage; power < slab_bytes_; power *= 2) {
    for (uint64_t eighth = 0; eighth < 8; ++eighth) {
      const uint64_t size = RoundUpToPage(power + power * eighth / 8);
      if (size >= slab_bytes_) break;
      if (class_sizes_.empty() || size > class_sizes_.back()) class_sizes_.push_back(size);
    }
  }
  class_sizes_.push_back(slab_bytes_);
  partial_.resize(class_sizes_.size());
  const size_t count = capacity / slab_bytes_;
  slabs_.resize(count);
  unassigned_.reserve(count);
  for (size_t i = count; i-- > 0;) unassigned_.push_back(static_cast<uint32_t>(i));
}

size_t SlabAllocator::ClassOf(uint64_t size) const {
  return std::lower_bound(class_sizes_.begin(), class_sizes_.end(), size) - class_sizes_.begin();
}

uint64_t SlabAllocator::ChunkSize(uint64_t size) const {
  size_t c = ClassOf(size);
  return c < class_sizes_.size() ? class_sizes_[c] : 0;
}

std::optional<uint64_t> SlabAllocator::Allocate(uint64_t size) {
  if (size == 0 || size > slab_bytes_) return std::nullopt;
  const size_t c = ClassOf(size);
  const uint64_t chunk = class_sizes_[c];
  absl::MutexLock lock(&mu_);
  std::vector<uint32_t>& partial = partial_[c];
  if (partial.empty()) {
    if (unassigned_.empty()) return std::nullopt;
    const uint32_t id = unassigned_.back();
    unassigned_.pop_back();
    Slab& slab = slabs_[id];
    slab.size_class = static_cast<int>(c);
    const uint32_t chunks = static_cast<uint32_t>(slab_bytes_ / chunk);
    slab.free_chunks.resize(chunks);
    for (uint32_t i = 0; i < chunks; ++i) slab.free_chunks[i] = chunks - 1 - i;  // chunk 0 first
    slab.in_partial_list = true;
    partial.push_back(id);
  }
  const uint32_t id = partial.back();
  Slab& slab = slabs_[id];
  const uint32_t index = slab.free_chunks.back();
  slab.free_chunks.pop_back();
  ++slab.used;
  if (slab.free_chunks.empty()) {
    partial.pop_back();
    slab.in_partial_list = false;
  }
  used_bytes_ += chunk;
  return uint64_t{id} * slab_bytes_ + uint64_t{index} * chunk;
}

void SlabAllocator::Free(uint64_t offset) {
  absl::MutexLock lock(&mu_);
  const uint32_t id = static_cast<uint32_t>(offset / slab_bytes_);
  assert(id < slabs_.size());
  Slab& slab = slabs_[id];
  assert(slab.size_class >= 0 && slab.used > 0);
  const size_t c = static_cast<size_t>(slab.size_class);
  const uint64_t chunk = class_sizes_[c];
  slab.free_chunks.push_back(static_cast<uint32_t>((offset % slab_bytes_) / chunk));
  --slab.used;
  used_bytes_ -= chunk;
  std::vector<uint32_t>& partial = partial_[c];
  if (slab.used == 0) {
    if (slab.in_partial_list) partial.erase(std::find(partial.begin(), partial.end(), id));
    if (slab.draining) draining_.erase(std::find(draining_.begin(), draining_.end(), id));
    slab = Slab{};
    unassigned_.push_back(id);
  } else if (!slab.in_partial_list && !slab.draining) {
    slab.in_partial_list = true;
    partial.push_back(id);
  }
}

bool SlabAllocator::DrainSlabOf(uint64_t offset) {
  absl::MutexLock lock(&mu_);
  const uint32_t id = static_cast<uint32_t>(offset / slab_bytes_);
  // A draining slab holds memory nobody uses until it empties: a small arena
  // cannot afford it (one slab in eight at most).
  const size_t max_draining = std::min(kMaxDraining, slabs_.size() / 8);
  if (draining_.size() >= max_draining || id >= slabs_.size() || slabs_[id].size_class < 0 ||
      slabs_[id].draining) {
    return false;
  }
  Slab& slab = slabs_[id];
  if (slab.in_partial_list) {
    std::vector<uint32_t>& partial = partial_[static_cast<size_t>(slab.size_class)];
    partial.erase(std::find(partial.begin(), partial.end(), id));
    slab.in_partial_list = false;
  }
  slab.draining = true;
  draining_.push_back(id);
  return true;
}

void SlabAllocator::StopDraining() {
  absl::MutexLock lock(&mu_);
  if (draining_.empty()) return;
  const uint32_t id = draining_.front();
  draining_.erase(draining_.begin());
  Slab& slab = slabs_[id];
  slab.draining = false;
  if (!slab.free_chunks.empty()) {
    slab.in_partial_list = true;
    partial_[static_cast<size_t>(slab.size_class)].push_back(id);
  }
}

bool SlabAllocator::draining() const {
  absl::MutexLock lock(&mu_);
  return !draining_.empty();
}

uint64_t SlabAllocator::used_bytes() const {
  absl::MutexLock lock(&mu_);
  return used_bytes_;
}

size_t SlabAllocator::free_slabs() const {
  absl::MutexLock lock(&mu_);
  return unassigned_.size();
}

}  // namespace kvstrata::cachenode
