// chain-protect and chain-slru: see eviction_policy.h and cachenode/README.md
// ("Why Belady wins") for the trace facts behind the three classes.
#include <cstdint>
#include <deque>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "kvstrata/cachenode/eviction_policy.h"
#include "node_pool.h"

namespace kvstrata::cachenode {
namespace {

// A bounded set of ids, forgetting the least recently remembered first. A
// FIFO of (id, stamp) with the newest stamp per id in a map: remembering an id
// again appends it and leaves its old FIFO entry stale, so no operation
// allocates a node or walks a list.
class Ghost {
 public:
  bool Contains(const BlockId& id) const { return stamp_.contains(id); }
  void Remember(const BlockId& id, size_t capacity) {
    stamp_[id] = next_;
    fifo_.push_back({id, next_++});
    while (stamp_.size() > capacity || fifo_.size() > 2 * capacity + 16) {
      const auto& [old, stamp] = fifo_.front();
      if (auto it = stamp_.find(old); it != stamp_.end() && it->second == stamp) stamp_.erase(it);
      fifo_.pop_front();
    }
  }

 private:
  std::deque<std::pair<BlockId, uint64_t>> fifo_;
  absl::flat_hash_map<BlockId, uint64_t> stamp_;  // id -> its newest FIFO stamp
  uint64_t next_ = 0;
};

class ChainProtectPolicy final : public EvictionPolicy {
 public:
  explicit ChainProtectPolicy(double probation_share) : probation_share_(probation_share) {}

  void OnInsert(const BlockId& id, const std::optional<BlockId>& parent) override {
    auto [it, inserted] = blocks_.try_emplace(id);
    Entry& entry = it->second;  // stable: nothing is inserted below
    if (!inserted) {
      Move(entry, kProtected);
      return;
    }
    high_water_ = std::max(high_water_, blocks_.size());
    Class cls = kProbation;
    Entry* parent_entry = nullptr;
    if (parent.has_value() && !(*parent == id)) {
      if (auto p = blocks_.find(*parent); p != blocks_.end()) parent_entry = &p->second;
    }
    if (parent_entry != nullptr) {
      if (parent_entry->has_last_child && !(parent_entry->last_child == id.key)) {
        auto old = blocks_.find(BlockId{id.namespace_id, parent_entry->last_child});
        if (old != blocks_.end()) {
          // On a path of one conversation, a new child replaces the previous
          // request's partial tail, which is unlikely to be asked for again.
          // A child that was extended, or a parent that already branched, is
          // a shared prefix (a system prompt, a document): its children are
          // other conversations, all alive.
          if (!old->second.has_last_child && parent_entry->branches <= 1) {
            if (old->second.cls != kDead) Move(old->second, kDead);
          } else if (parent_entry->branches < UINT8_MAX) {
            ++parent_entry->branches;
          }
        }
      } else if (parent_entry->branches == 0) {
        parent_entry->branches = 1;
      }
      parent_entry->last_child = id.key;
      parent_entry->has_last_child = true;
      if (parent_entry->branches >= 2) {
        // A new branch below a shared prefix starts a chain of its own.
        if (roots_.Contains(id)) cls = kProtected;
        roots_.Remember(id, high_water_);
        entry.is_root = true;
      } else if (parent_entry->cls == kProtected) {
        // A chain that has been reused once is reused again (P ~ 0.8): its
        // extensions inherit its protection.
        cls = kProtected;
      }
    } else {
      // A root, or a block whose parent this tier does not hold: in a
      // cluster that places blocks one by one, most parents live on other
      // nodes, so each block a node holds starts a chain of its own there
      // (treating such blocks as roots took 3 nodes on the shared trace from
      // 0.46x to 0.88x of one node's token hit rate at 2%; one node replaying
      // a trace always holds the parent). A root seen before starts a repeat
      // of an earlier prefix.
      if (roots_.Contains(id)) cls = kProtected;
      roots_.Remember(id, high_water_);
      entry.is_root = true;
    }
    entry.cls = cls;
    lists_[cls].push_front(id);
    entry.position = lists_[cls].begin();
  }

  void OnHit(const BlockId& id) override {
    auto it = blocks_.find(id);
    if (it == blocks_.end()) return;
    Move(it->second, kProtected);
    if (it->second.is_root) roots_.Remember(id, high_water_);
  }

  void OnErase(const BlockId& id) override {
    auto it = blocks_.find(id);
    if (it == blocks_.end()) return;
    lists_[it->second.cls].erase(it->second.position);
    const bool had_child = it->second.has_last_child;
    const BlockKey child = it->second.last_child;
    blocks_.erase(it);
    // Its newest child can no longer extend a cached prefix (older children
    // are dead already): it goes next, and so on down the chain.
    if (had_child) {
      if (auto c = blocks_.find(BlockId{id.namespace_id, child});
          c != blocks_.end() && c->second.cls != kDead) {
        Move(c->second, kDead);
      }
    }
  }

  std::optional<BlockId> Victim() override {
    if (!lists_[kDead].empty()) return lists_[kDead].back();
    const auto& probation = lists_[kProbation];
    if (!probation.empty() &&
        (probation.size() > probation_share_ * blocks_.size() || lists_[kProtected].empty())) {
      return probation.back();
    }
    if (!lists_[kProtected].empty()) return lists_[kProtected].back();
    return std::nullopt;
  }

  size_t size() const override { return blocks_.size(); }

 private:
  enum Class : uint8_t { kDead = 0, kProbation = 1, kProtected = 2 };
  struct Entry {
    PooledList<BlockId>::iterator position;
    BlockKey last_child;  // the newest child inserted under this block
    bool has_last_child = false;
    bool is_root = false;  // a chain's first block: no parent, or a new branch
    Class cls = kProbation;
    uint8_t branches = 0;  // children that did not replace a partial tail
  };
  // To the front of class `to`; splicing keeps the node and its iterator.
  void Move(Entry& entry, Class to) {
    lists_[to].splice(lists_[to].begin(), lists_[entry.cls], entry.position);
    entry.cls = to;
  }

  const double probation_share_;
  NodePool pool_;  // the lists' nodes (before them: it outlives them)
  PooledList<BlockId> lists_[3] = {PooledList<BlockId>(PoolAllocator<BlockId>(&pool_)),
                                   PooledList<BlockId>(PoolAllocator<BlockId>(&pool_)),
                                   PooledList<BlockId>(PoolAllocator<BlockId>(&pool_))};  // per class, most recent first
  absl::flat_hash_map<BlockId, Entry> blocks_;
  // Roots seen, at most as many as the blocks the policy ever tracked, so the
  // memory follows the tier's size without the policy knowing it. (A ghost of
  // evicted blocks as well changed no hit rate in the third decimal on the
  // Mooncake trace and cost 1.5x more per call: dropped.)
  Ghost roots_;
  size_t high_water_ = 0;
};

}  // namespace

std::unique_ptr<EvictionPolicy> MakeChainProtectPolicy(double probation_share) {
  return std::make_unique<ChainProtectPolicy>(probation_share);
}

}  // namespace kvstrata::cachenode
