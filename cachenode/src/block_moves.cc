#include "kvstrata/cachenode/block_moves.h"

namespace kvstrata::cachenode {

uint64_t BlockMoves::Begin(const BlockId& id) {
  absl::MutexLock lock(&mu_);
  const uint64_t ticket = next_++;
  moves_.emplace(ticket, id);
  ++per_block_[id];
  if (auto e = erasing_.find(id); e != erasing_.end()) ++e->second.moves_begun;
  return ticket;
}

void BlockMoves::End(uint64_t ticket) {
  absl::MutexLock lock(&mu_);
  auto it = moves_.find(ticket);
  if (it == moves_.end()) return;
  auto count = per_block_.find(it->second);
  if (--count->second == 0) per_block_.erase(count);
  moves_.erase(it);
}

bool BlockMoves::Erase(const BlockId& id, absl::FunctionRef<bool()> erase_everywhere) {
  uint64_t seen = 0;
  bool pending = false;  // a move began before this erase and may commit after a pass
  {
    absl::MutexLock lock(&mu_);
    Erasing& e = erasing_[id];
    ++e.erasers;
    seen = e.moves_begun;
    pending = per_block_.contains(id);
  }
  bool erased = false;
  while (true) {
    erased = erase_everywhere() || erased;
    absl::MutexLock lock(&mu_);
    // Woken on every End; a Delete waits at most one device copy, NVMe read
    // or bounded demotion wait.
    const auto settled = [this, &id]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return !per_block_.contains(id);
    };
    const bool waited = !settled();
    mu_.Await(absl::Condition(&settled));
    Erasing& e = erasing_[id];
    // A move in flight during the pass, or begun since the last one, may
    // have committed a copy into a tier the pass had already erased.
    const bool again = pending || waited || e.moves_begun != seen;
    seen = e.moves_begun;
    pending = false;
    if (!again) {
      if (--e.erasers == 0) erasing_.erase(id);
      return erased;
    }
  }
}

size_t BlockMoves::in_flight() const {
  absl::MutexLock lock(&mu_);
  return moves_.size();
}

}  // namespace kvstrata::cachenode
