#include "kvstrata/cachenode/slab_allocator.h"

#include <algorithm>
#include <cassert>
#include <iterator>

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
  absl::MutexLock lock(&mu_);
  return AllocateLocked(size);
}

std::optional<uint64_t> SlabAllocator::AllocateLocked(uint64_t size) {
  const size_t c = ClassOf(size);
  const uint64_t chunk = class_sizes_[c];
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

uint64_t SlabAllocator::LargestHole(const Host& host) {
  uint64_t largest = 0, at = 0;
  for (const auto& [start, size] : host.pieces) {
    largest = std::max(largest, start - at);
    at = start + RoundUpToPage(size);
  }
  return std::max(largest, host.chunk - at);
}

std::optional<uint64_t> SlabAllocator::AllocatePiece(uint64_t size, uint64_t host_size) {
  if (size == 0 || size > slab_bytes_ || host_size > slab_bytes_) return std::nullopt;
  const uint64_t chunk = host_size == 0 ? 0 : ChunkSize(host_size);
  const uint64_t need = RoundUpToPage(size);
  absl::MutexLock lock(&mu_);
  uint64_t base;
  Host* host;
  auto fit = holes_.lower_bound({need, 0});  // best fit, in a host of any class
  if (fit != holes_.end()) {
    base = fit->second;
    host = &hosts_.at(base);
    holes_.erase(fit);
  } else {
    if (need >= chunk) return std::nullopt;  // also: host_size 0, holes only
    std::optional<uint64_t> fresh = AllocateLocked(host_size);
    if (!fresh.has_value()) return std::nullopt;
    base = *fresh;
    host = &hosts_[base];
    host->chunk = chunk;
  }
  // First fit inside the host (a chunk holds a handful of pieces).
  uint64_t at = 0;
  for (const auto& [start, piece] : host->pieces) {
    if (start - at >= need) break;
    at = start + RoundUpToPage(piece);
  }
  assert(at + need <= host->chunk);
  host->pieces[at] = size;
  host->largest_hole = LargestHole(*host);
  if (host->largest_hole > 0) holes_.insert({host->largest_hole, base});
  piece_bytes_ += need;
  return base + at;
}

uint64_t SlabAllocator::piece_bytes() const {
  absl::MutexLock lock(&mu_);
  return piece_bytes_;
}

std::map<uint64_t, SlabAllocator::Host>::iterator SlabAllocator::HostOf(uint64_t offset) {
  // Its host is the last one at or before it (hosts never overlap).
  auto host = hosts_.upper_bound(offset);
  if (host == hosts_.begin()) return hosts_.end();
  --host;
  return offset < host->first + host->second.chunk ? host : hosts_.end();
}

void SlabAllocator::Free(uint64_t offset) {
  absl::MutexLock lock(&mu_);
  if (auto host = HostOf(offset); host != hosts_.end()) {
    const uint64_t base = host->first;
    Host& h = host->second;
    auto piece = h.pieces.find(offset - base);
    assert(piece != h.pieces.end());
    if (piece == h.pieces.end()) return;
    piece_bytes_ -= RoundUpToPage(piece->second);
    h.pieces.erase(piece);
    if (h.largest_hole > 0) holes_.erase({h.largest_hole, base});
    if (h.pieces.empty()) {
      hosts_.erase(host);
      FreeLocked(base);
    } else {
      h.largest_hole = LargestHole(h);
      holes_.insert({h.largest_hole, base});
    }
    return;
  }
  FreeLocked(offset);
}

void SlabAllocator::ShrinkInPlace(uint64_t offset, uint64_t size) {
  const uint64_t need = RoundUpToPage(size);
  absl::MutexLock lock(&mu_);
  uint64_t base;
  Host* h;
  if (auto host = HostOf(offset); host != hosts_.end()) {
    base = host->first;
    h = &host->second;
    auto piece = h->pieces.find(offset - base);
    assert(piece != h->pieces.end() && size <= piece->second);
    if (piece == h->pieces.end()) return;
    piece_bytes_ -= RoundUpToPage(piece->second);
    piece->second = size;
  } else {
    // A whole chunk becomes the host of one piece at its start.
    const Slab& slab = slabs_[offset / slab_bytes_];
    assert(slab.size_class >= 0);
    const uint64_t chunk = class_sizes_[static_cast<size_t>(slab.size_class)];
    assert(size <= chunk);
    if (need >= chunk) return;  // nothing to give back
    base = offset;
    h = &hosts_[base];
    h->chunk = chunk;
    h->pieces[0] = size;
  }
  piece_bytes_ += need;
  if (h->largest_hole > 0) holes_.erase({h->largest_hole, base});
  h->largest_hole = LargestHole(*h);
  if (h->largest_hole > 0) holes_.insert({h->largest_hole, base});
}

void SlabAllocator::FreeLocked(uint64_t offset) {
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
    slab = Slab{};
    unassigned_.push_back(id);
  } else if (!slab.in_partial_list) {
    slab.in_partial_list = true;
    partial.push_back(id);
  }
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
