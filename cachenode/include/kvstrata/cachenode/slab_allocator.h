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
#include <optional>
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

  // Stops handing out chunks of the slab holding `offset` (a chunk Allocate
  // returned): once its last chunk is freed it returns to the pool, where
  // another size class may take it. At most kMaxDraining slabs drain at a
  // time (one for each rung of a precision ladder to win), and one in eight
  // of the arena's: false when that many do already, or this one does. Precision tiers use it to win whole slabs for
  // transcoded blocks, whose size class differs from the raw blocks'.
  bool DrainSlabOf(uint64_t offset);
  // The slab that started draining first, if any, serves its class again.
  void StopDraining();
  static constexpr size_t kMaxDraining = 2;
  bool draining() const;

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
    bool draining = false;
    std::vector<uint32_t> free_chunks;
  };
  size_t ClassOf(uint64_t size) const;

  const uint64_t slab_bytes_;
  std::vector<uint64_t> class_sizes_;  // ascending, multiples of 4 KiB
  mutable absl::Mutex mu_;
  std::vector<Slab> slabs_ ABSL_GUARDED_BY(mu_);
  std::vector<uint32_t> unassigned_ ABSL_GUARDED_BY(mu_);
  std::vector<std::vector<uint32_t>> partial_
      ABSL_GUARDED_BY(mu_);  // per class: slabs with free chunks
  uint64_t used_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<uint32_t> draining_ ABSL_GUARDED_BY(mu_);  // oldest first
};

}  // namespace kvstrata::cachenode
