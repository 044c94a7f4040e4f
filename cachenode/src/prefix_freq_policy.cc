// prefix-freq: frequency with ageing over the leaves of the prefix tree (see
// eviction_policy.h). A block is only evicted once no cached block extends
// it, as in prefix-lru; among those leaves, the ones accessed least often go
// first, and counts age, so yesterday's popular document does not stay for
// ever (Multi-Queue's expiry, Zhou et al., USENIX ATC 2001).
#include <algorithm>
#include <array>
#include <bit>
#include <iterator>

#include "absl/container/flat_hash_map.h"
#include "kvstrata/cachenode/eviction_policy.h"
#include "node_pool.h"

namespace kvstrata::cachenode {
namespace {

// Levels by log2 of the access count: 1, 2-3, 4-7, 8+. Four, as in the
// Multi-Queue paper's recommendation for second-level caches (beyond a few
// levels the top ones hold too few blocks to matter).
constexpr int kLevels = 4;

class PrefixFreqPolicy final : public EvictionPolicy {
 public:
  void OnInsert(const BlockId& id, const std::optional<BlockId>& parent) override {
    ++clock_;
    auto [it, inserted] = blocks_.try_emplace(id);
    Block& block = it->second;
    if (!inserted) {
      Access(block);
      return;
    }
    block.touched = clock_;
    if (parent.has_value() && !(*parent == id)) {
      block.parent = *parent;
      if (auto p = blocks_.find(*parent); p != blocks_.end()) {
        Block& up = p->second;
        block.counted = true;
        // Not a leaf any more. (A prefix is accessed whenever what extends
        // it is, and only leaves age, so its count never falls below its
        // children's.)
        if (up.children++ == 0 && up.listed) Unlist(up);
      }
    }
    if (block.children == 0) List(block, id, /*front=*/true);
  }

  void OnHit(const BlockId& id) override {
    ++clock_;
    if (auto it = blocks_.find(id); it != blocks_.end()) Access(it->second);
  }

  void OnErase(const BlockId& id) override {
    auto it = blocks_.find(id);
    if (it == blocks_.end()) return;
    if (it->second.listed) Unlist(it->second);
    const bool counted = it->second.counted;
    const BlockId parent = it->second.parent;
    blocks_.erase(it);
    if (!counted) return;
    auto p = blocks_.find(parent);
    // (children is 0 when the parent was erased and inserted again since.)
    if (p == blocks_.end() || p->second.children == 0 || --p->second.children > 0) return;
    // The parent became a leaf: its subtree just went as the least valuable,
    // so it joins its level at the old end and a chain leaves from its tail.
    List(p->second, parent, /*front=*/false);
  }

  std::optional<BlockId> Victim() override {
    Age();
    for (auto& level : levels_) {
      if (!level.empty()) return level.back().id;
    }
    return std::nullopt;
  }

  size_t size() const override { return blocks_.size(); }

 private:
  // A leaf in its level's list, with its last access (as in its Block).
  struct Leaf {
    BlockId id;
    uint64_t touched = 0;
  };
  struct Block {
    BlockId parent;
    PooledList<Leaf>::iterator position;  // valid while listed
    uint64_t touched = 0;                   // clock of the last access
    uint32_t count = 1;                     // accesses, halved as it ages
    uint32_t children = 0;                  // cached blocks extending it
    // Counted in its parent's children: the parent was held when it came.
    // (A parent inserted after its child does not count it, so erasing
    // that child must not uncount it.)
    bool counted = false;
    bool listed = false;  // a leaf, in levels_[Level()]
    int Level() const {
      return std::min<int>(std::bit_width(std::max<uint32_t>(count, 1)) - 1, kLevels - 1);
    }
  };

  void Access(Block& block) {
    const int from = block.Level();
    block.count = block.count < (1u << 30) ? block.count + 1 : block.count;
    block.touched = clock_;
    if (block.listed) {
      // To the front of its (maybe new) level; splicing keeps the node.
      auto& to = levels_[block.Level()];
      to.splice(to.begin(), levels_[from], block.position);
      block.position->touched = clock_;
    }
  }
  void List(Block& block, const BlockId& id, bool front) {
    auto& level = levels_[block.Level()];
    const Leaf leaf{id, block.touched};
    block.position = front ? level.insert(level.begin(), leaf) : level.insert(level.end(), leaf);
    block.listed = true;
  }
  void Unlist(Block& block) {
    levels_[block.Level()].erase(block.position);
    block.listed = false;
  }
  // A leaf untouched for longer than the cache takes to turn over (as many
  // accesses as blocks held) loses a level: its count is halved. One check
  // per level and call keeps this O(1); the oldest leaf of each level is the
  // first to expire.
  void Age() {
    const uint64_t lifetime = std::max<size_t>(blocks_.size(), 1);
    for (int l = kLevels - 1; l > 0; --l) {
      auto& level = levels_[l];
      if (level.empty()) continue;
      // The leaf's node carries its last access, so only an expiring leaf
      // costs a lookup.
      if (clock_ - level.back().touched <= lifetime) continue;
      const BlockId id = level.back().id;
      Block& oldest = blocks_.find(id)->second;
      Unlist(oldest);
      oldest.count /= 2;
      oldest.touched = clock_;  // a fresh lifetime at its new level
      List(oldest, id, /*front=*/true);
    }
  }

  uint64_t clock_ = 0;  // accesses
  NodePool pool_;  // the levels' nodes (before them: it outlives them)
  std::array<PooledList<Leaf>, kLevels> levels_ = {
      PooledList<Leaf>(PoolAllocator<Leaf>(&pool_)), PooledList<Leaf>(PoolAllocator<Leaf>(&pool_)),
      PooledList<Leaf>(PoolAllocator<Leaf>(&pool_)),
      PooledList<Leaf>(PoolAllocator<Leaf>(&pool_))};  // leaves per level, most recent first
  absl::flat_hash_map<BlockId, Block> blocks_;
};

}  // namespace

std::unique_ptr<EvictionPolicy> MakePrefixFreqPolicy() {
  return std::make_unique<PrefixFreqPolicy>();
}

}  // namespace kvstrata::cachenode
