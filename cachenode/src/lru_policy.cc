#include <iterator>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "kvstrata/cachenode/eviction_policy.h"
#include "node_pool.h"

namespace kvstrata::cachenode {
namespace {

class LruPolicy final : public EvictionPolicy {
 public:
  void OnInsert(const BlockId& id, const std::optional<BlockId>& /*parent*/) override {
    auto [it, inserted] = position_.try_emplace(id);
    if (!inserted) {
      order_.splice(order_.begin(), order_, it->second);
      return;
    }
    order_.push_front(id);
    it->second = order_.begin();
  }
  void OnHit(const BlockId& id) override {
    if (auto it = position_.find(id); it != position_.end()) {
      order_.splice(order_.begin(), order_, it->second);
    }
  }
  void OnErase(const BlockId& id) override {
    if (auto it = position_.find(id); it != position_.end()) {
      order_.erase(it->second);
      position_.erase(it);
    }
  }
  std::optional<BlockId> Victim() override {
    if (order_.empty()) return std::nullopt;
    return order_.back();
  }
  size_t size() const override { return order_.size(); }

 private:
  NodePool pool_;  // the list's nodes (before it: it outlives it)
  PooledList<BlockId> order_{PoolAllocator<BlockId>(&pool_)};  // most recent first
  absl::flat_hash_map<BlockId, PooledList<BlockId>::iterator> position_;
};

// Leaves (blocks without cached children) in LRU order; inner blocks wait
// until their last cached child goes.
class PrefixLruPolicy final : public EvictionPolicy {
 public:
  void OnInsert(const BlockId& id, const std::optional<BlockId>& parent) override {
    auto [it, inserted] = blocks_.try_emplace(id);
    Block& block = it->second;
    if (!inserted) {
      Touch(id, block);
      return;
    }
    if (parent.has_value() && !(*parent == id)) {
      block.parent = *parent;
      ++children_[*parent];
      if (auto p = blocks_.find(*parent); p != blocks_.end() && p->second.is_leaf) {
        leaves_.erase(p->second.position);  // no longer a leaf
        p->second.is_leaf = false;
      }
    }
    if (children_.contains(id)) return;  // its children came first (it had been evicted)
    leaves_.push_front(id);
    block.position = leaves_.begin();
    block.is_leaf = true;
  }
  void OnHit(const BlockId& id) override {
    if (auto it = blocks_.find(id); it != blocks_.end()) Touch(id, it->second);
  }
  void OnErase(const BlockId& id) override {
    auto it = blocks_.find(id);
    if (it == blocks_.end()) return;
    if (it->second.is_leaf) leaves_.erase(it->second.position);
    const std::optional<BlockId> parent = it->second.parent;
    blocks_.erase(it);
    if (!parent.has_value()) return;
    auto count = children_.find(*parent);
    if (count == children_.end() || --count->second > 0) return;
    children_.erase(count);
    // The parent became a leaf. Its subtree was just evicted as the oldest,
    // so it joins the leaves at the old end: a chain leaves from its tail.
    if (auto p = blocks_.find(*parent); p != blocks_.end() && !p->second.is_leaf) {
      leaves_.push_back(*parent);
      p->second.position = std::prev(leaves_.end());
      p->second.is_leaf = true;
    }
  }
  std::optional<BlockId> Victim() override {
    if (leaves_.empty()) return std::nullopt;
    return leaves_.back();
  }
  size_t size() const override { return blocks_.size(); }

 private:
  struct Block {
    std::optional<BlockId> parent;
    PooledList<BlockId>::iterator position;  // valid when is_leaf
    bool is_leaf = false;
  };
  void Touch(const BlockId& id, Block& block) {
    if (block.is_leaf) leaves_.splice(leaves_.begin(), leaves_, block.position);
  }

  NodePool pool_;  // the list's nodes (before it: it outlives it)
  PooledList<BlockId> leaves_{PoolAllocator<BlockId>(&pool_)};  // most recent first
  absl::flat_hash_map<BlockId, Block> blocks_;
  absl::flat_hash_map<BlockId, uint32_t> children_;  // cached children per parent
};

}  // namespace

std::unique_ptr<EvictionPolicy> MakeLruPolicy() { return std::make_unique<LruPolicy>(); }
std::unique_ptr<EvictionPolicy> MakePrefixLruPolicy() { return std::make_unique<PrefixLruPolicy>(); }

absl::StatusOr<std::unique_ptr<EvictionPolicy>> MakeEvictionPolicy(std::string_view name) {
  if (name == "adaptive") {
    absl::StatusOr<std::unique_ptr<AdaptiveEvictionPolicy>> adaptive = MakeAdaptivePolicy();
    if (!adaptive.ok()) return adaptive.status();
    return std::unique_ptr<EvictionPolicy>(*std::move(adaptive));
  }
  if (name == "lru") return MakeLruPolicy();
  if (name == "prefix-freq") return MakePrefixFreqPolicy();
  if (name == "prefix-lru") return MakePrefixLruPolicy();
  if (name == "chain-protect") return MakeChainProtectPolicy(0.0);
  if (name == "chain-slru") return MakeChainProtectPolicy(0.1);
  if (name == "return-aware") return MakeReturnAwarePolicy();
  return absl::InvalidArgumentError(absl::StrCat("unknown eviction policy '", std::string(name),
                                                 "' (known: ", kEvictionPolicyNames, ")"));
}

}  // namespace kvstrata::cachenode
