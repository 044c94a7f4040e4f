// Slab allocation by size class over one arena (DESIGN.md §5).
//
// The arena is cut into equal slabs. A slab is assigned to one size class on
// demand and cut into equal chunks; when its last chunk is freed it returns to
// the pool and may serve another class. There are eight classes per power of
// two from 4 KiB (p, 9p/8, ..., 15p/8, page-rounded): powers of two fit
// exactly and a block wastes at most 1/8 of its chunk (plus the tail of a
// slab that its chunk size does not divide). Works on offsets: the allocator never touches
// the memory it manages. Thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace kvstrata::cachenode {

class SlabAllocator {
 public:
  // REQUIRES: slab_bytes is a multiple of 4 KiB and capacity >= slab_bytes.
  SlabAllocator(uint64_t capacity, uint64_t slab_bytes);

  // Offset of a free chunk of at least `size` bytes, or nullopt when the
  // size's class has no free chunk and no slab is unassigned. `size` must be
  // in 1..max_allocation().
  std::optional<uint64_t> Allocate(uint64_t size);
  // REQUIRES: offset came from Allocate and was not freed since.
  void Free(uint64_t offset);


  // Sub-allocation (precision tiers): a 4 KiB-aligned piece of `size` bytes
  // (taking `size` rounded up to 4 KiB) inside a chunk cut into pieces, so
  // several encoded blocks share one raw-sized chunk instead of needing a
  // slab of their own class. Takes the best-fitting hole of a chunk already
  // cut, else a free chunk of `host_size`'s class (Allocate(host_size); 0:
  // holes only) when the piece is smaller than it; nullopt otherwise. Each
  // piece is freed alone with Free(offset); the host chunk returns to its
  // slab when its last piece is freed.
  std::optional<uint64_t> AllocatePiece(uint64_t size, uint64_t host_size);
  // Shrinks the allocation at `offset` (a chunk or a piece) to `size` bytes
  // at the same offset; the rest becomes a hole that AllocatePiece hands
  // out. Never fails and never moves the bytes, so a block can be encoded
  // over its own memory when the tier has no free memory for the copy.
  // REQUIRES: offset is allocated and 0 < size <= its size.
  void ShrinkInPlace(uint64_t offset, uint64_t size);
  // Bytes in pieces now (part of used_bytes(), which counts host chunks whole).
  uint64_t piece_bytes() const;

  // Chunk size that Allocate(size) hands out.
  uint64_t ChunkSize(uint64_t size) const;
  uint64_t max_allocation() const { return slab_bytes_; }
  uint64_t capacity() const { return slab_bytes_ * slabs_.size(); }
  uint64_t used_bytes() const;
  size_t free_slabs() const;

 private:
  struct Slab {
    int size_class = -1;  // -1: unassigned
    uint32_t used = 0;
    bool in_partial_list = false;
    std::vector<uint32_t> free_chunks;
  };
  size_t ClassOf(uint64_t size) const;
  // A chunk cut into pieces: its live pieces by offset within it (-> size).
  struct Host {
    uint64_t chunk = 0;
    std::map<uint64_t, uint64_t> pieces;
    uint64_t largest_hole = 0;
  };
  static uint64_t LargestHole(const Host& host);
  // The host chunk that `offset` is a piece of, or end().
  std::map<uint64_t, Host>::iterator HostOf(uint64_t offset) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FreeLocked(uint64_t offset) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::optional<uint64_t> AllocateLocked(uint64_t size) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const uint64_t slab_bytes_;
  std::vector<uint64_t> class_sizes_;  // ascending, multiples of 4 KiB
  mutable absl::Mutex mu_;
  std::vector<Slab> slabs_ ABSL_GUARDED_BY(mu_);
  std::vector<uint32_t> unassigned_ ABSL_GUARDED_BY(mu_);
  std::vector<std::vector<uint32_t>> partial_
      ABSL_GUARDED_BY(mu_);  // per class: slabs with free chunks
  uint64_t used_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<uint64_t, Host> hosts_ ABSL_GUARDED_BY(mu_);  // by the host chunk's offset
  // (largest hole, host offset) of every host with a hole: best fit by lower_bound.
  std::set<std::pair<uint64_t, uint64_t>> holes_ ABSL_GUARDED_BY(mu_);
  uint64_t piece_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvstrata::cachenode
