// What the node stores per block, and how it names one.
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>

#include "kvstrata/common/block_key.h"

namespace kvstrata::cachenode {

struct BlockId {
  uint64_t namespace_id = 0;
  BlockKey key;

  friend bool operator==(const BlockId&, const BlockId&) = default;
  template <typename H>
  friend H AbslHashValue(H h, const BlockId& id) {
    return H::combine(std::move(h), id.namespace_id, id.key);
  }
};

// A block named by a number: its 8 bytes (host order) lead the key. Trace
// replay names blocks by the trace's hash ids this way; tests and benchmarks
// too.
inline BlockId NumberedBlockId(uint64_t number, uint64_t namespace_id = 0) {
  BlockId id{.namespace_id = namespace_id};
  std::memcpy(id.key.bytes.data(), &number, sizeof(number));
  return id;
}

// A block's bytes in a tier and what is known about them. Shared ownership is
// the pin: the index holds one reference, every transfer in flight another,
// and the memory goes back to its allocator when the last one is dropped, so
// eviction never waits for a reader and never frees bytes still being sent.
class StoredBlock {
 public:
  StoredBlock(uint8_t* data, uint64_t size, std::function<void()> release)
      : data_(data), size_(size), release_(std::move(release)) {}
  ~StoredBlock() {
    if (release_) release_();
  }
  StoredBlock(const StoredBlock&) = delete;
  StoredBlock& operator=(const StoredBlock&) = delete;

  uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  // The memory now belongs to the caller: the destructor releases nothing.
  // For reusing the bytes of a block nobody else holds.
  void Disown() { release_ = nullptr; }

  uint64_t checksum = 0;  // XXH3-64 of the stored bytes
  BlockKey parent;        // parent link of the prefix tree
  bool has_parent = false;
  // How the bytes are stored (a v1::StoredFormat value): the namespace's
  // format, or a coarser one after a precision transcode. Encoded blocks
  // also say it in their header; this is what the node trusts and reports.
  uint8_t format = 0;
  // Precision tiers' leases by bytes (DramTier): how many leases the block
  // gets each time it is named a victim at this format or hit, and how many
  // of them are left beyond the one it holds. Guarded by its tier's lock.
  uint8_t lease_grant = 1;
  uint8_t leases_left = 0;

 private:
  uint8_t* data_;
  uint64_t size_;
  std::function<void()> release_;
};

}  // namespace kvstrata::cachenode
