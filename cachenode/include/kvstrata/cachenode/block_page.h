// One page of a namespace's blocks in key order (the ListBlocks RPC): the
// `limit` smallest keys after a cursor, collected from every tier while each
// tier is scanned once. Keys are hashes, so key order is as good as any and,
// unlike a hash map's order, stays the same while blocks come and go: a
// block stored throughout a walk of pages is listed exactly once.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <vector>

#include "kvstrata.pb.h"
#include "kvstrata/common/block_key.h"

namespace kvstrata::cachenode {

struct ListedBlock {
  BlockKey key;
  std::optional<BlockKey> parent;
  uint64_t size = 0;
  v1::Tier tier = v1::TIER_NONE;
};

class BlockPage {
 public:
  // Keys greater than `after` (all when none), at most `limit` of them.
  BlockPage(std::optional<BlockKey> after, size_t limit) : after_(after), limit_(limit) {}

  // Whether `key` could enter the page: a tier skips its blocks' details when not.
  bool Wants(const BlockKey& key) const {
    if (after_.has_value() && !(after_->bytes < key.bytes)) return false;
    return blocks_.size() <= limit_ || key.bytes < blocks_.rbegin()->first;
  }
  // Keeps the first offer of a key (tiers offer the faster one first).
  void Offer(const ListedBlock& block) {
    if (!Wants(block.key)) return;
    blocks_.emplace(block.key.bytes, block);
    // One beyond the limit tells whether another page follows.
    if (blocks_.size() > limit_ + 1) blocks_.erase(std::prev(blocks_.end()));
  }
  // True when more blocks follow the page.
  bool more() const { return blocks_.size() > limit_; }
  // The page, in key order.
  std::vector<ListedBlock> Take() {
    std::vector<ListedBlock> out;
    for (auto& [key, block] : blocks_) {
      if (out.size() == limit_) break;
      out.push_back(block);
    }
    return out;
  }

 private:
  const std::optional<BlockKey> after_;
  const size_t limit_;
  std::map<decltype(BlockKey::bytes), ListedBlock> blocks_;
};

}  // namespace kvstrata::cachenode
