// An LRU policy that also records every request-finished hint it receives,
// and how many parentless blocks (requests, in a trace replay) it had seen
// by then. For the unit tests of the tiers and of replay.
#pragma once

#include <memory>
#include <optional>
#include <vector>

#include "kvstrata/cachenode/eviction_policy.h"

namespace kvstrata::testing {

class HintRecordingPolicy final : public cachenode::EvictionPolicy {
 public:
  struct Hint {
    cachenode::BlockId block;
    uint32_t output_tokens;
    int roots_before;  // parentless inserts before the hint arrived
  };

  void OnInsert(const cachenode::BlockId& id,
                const std::optional<cachenode::BlockId>& parent) override {
    if (!parent.has_value()) ++roots_;
    lru_->OnInsert(id, parent);
  }
  void OnHit(const cachenode::BlockId& id) override { lru_->OnHit(id); }
  void OnErase(const cachenode::BlockId& id) override { lru_->OnErase(id); }
  std::optional<cachenode::BlockId> Victim() override { return lru_->Victim(); }
  size_t size() const override { return lru_->size(); }
  void OnRequestFinished(const cachenode::BlockId& last_block, uint32_t output_tokens) override {
    hints_.push_back({last_block, output_tokens, roots_});
  }

  const std::vector<Hint>& hints() const { return hints_; }

 private:
  std::unique_ptr<cachenode::EvictionPolicy> lru_ = cachenode::MakeLruPolicy();
  std::vector<Hint> hints_;
  int roots_ = 0;
};

}  // namespace kvstrata::testing
