// Bytes each client's publishes hold reserved and not yet committed or given
// back, capped per client, so one client's many concurrent publishes (each
// within the per-request share) cannot reserve the whole tier between them.
// A request over the cap waits (a bounded time) for the client's earlier
// requests to finish: the library's concurrent batches of one big publish
// then run one after another instead of failing.
#pragma once

#include <cstdint>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace kvstrata::cachenode {

class InflightBudget {
 public:
  // `per_client` 0: no cap.
  explicit InflightBudget(uint64_t per_client) : per_client_(per_client) {}

  // Gives its blocks back when destroyed.
  class Grant {
   public:
    Grant(InflightBudget* budget, std::string client, uint64_t bytes, size_t blocks)
        : budget_(budget), client_(std::move(client)), bytes_(bytes), blocks_(blocks) {}
    Grant(Grant&& other) noexcept
        : budget_(other.budget_), client_(std::move(other.client_)), bytes_(other.bytes_),
          blocks_(other.blocks_) {
      other.budget_ = nullptr;
    }
    Grant(const Grant&) = delete;
    Grant& operator=(const Grant&) = delete;
    Grant& operator=(Grant&&) = delete;
    ~Grant() {
      if (budget_ != nullptr && bytes_ > 0) budget_->Give(client_, bytes_);
    }
    size_t blocks() const { return blocks_; }

   private:
    InflightBudget* budget_;
    std::string client_;
    uint64_t bytes_;
    size_t blocks_;
  };

  // Up to `count` blocks of `block_bytes` for `client`, waiting until
  // `deadline` for the client's own earlier requests to make room. At least
  // one block once the client has nothing in flight.
  Grant Take(const std::string& client, size_t count, uint64_t block_bytes, absl::Time deadline) {
    if (per_client_ == 0 || count == 0 || block_bytes == 0) {
      return Grant(nullptr, client, 0, count);
    }
    const uint64_t cap_blocks = std::max<uint64_t>(per_client_ / block_bytes, 1);
    const uint64_t want = std::min<uint64_t>(count, cap_blocks);
    absl::MutexLock lock(&mu_);
    auto room = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      const uint64_t held = held_[client];
      return held == 0 || held + want * block_bytes <= per_client_;
    };
    mu_.AwaitWithDeadline(absl::Condition(&room), deadline);
    uint64_t& held = held_[client];
    const uint64_t free_blocks = held >= per_client_ ? 0 : (per_client_ - held) / block_bytes;
    const size_t granted = held == 0 ? want : std::min<uint64_t>(want, free_blocks);
    held += granted * block_bytes;
    if (held == 0) held_.erase(client);
    return Grant(this, client, granted * block_bytes, granted);
  }

 private:
  void Give(const std::string& client, uint64_t bytes) {
    absl::MutexLock lock(&mu_);
    auto it = held_.find(client);
    if (it == held_.end()) return;
    it->second -= std::min(it->second, bytes);
    if (it->second == 0) held_.erase(it);
  }

  const uint64_t per_client_;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, uint64_t> held_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvstrata::cachenode
