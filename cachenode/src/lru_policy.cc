#include <list>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "kvstrata/cachenode/eviction_policy.h"

namespace kvstrata::cachenode {
namespace {

class LruPolicy final : public EvictionPolicy {
 public:
  void OnInsert(const BlockId& id) override {
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
  std::list<BlockId> order_;  // most recent first
  absl::flat_hash_map<BlockId, std::list<BlockId>::iterator> position_;
};

}  // namespace

std::unique_ptr<EvictionPolicy> MakeLruPolicy() { return std::make_unique<LruPolicy>(); }

absl::StatusOr<std::unique_ptr<EvictionPolicy>> MakeEvictionPolicy(std::string_view name) {
  if (name == "lru") return MakeLruPolicy();
  return absl::InvalidArgumentError(
      absl::StrCat("unknown eviction policy '", std::string(name), "' (known: lru)"));
}

}  // namespace kvstrata::cachenode
