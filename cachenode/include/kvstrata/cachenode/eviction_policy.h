// Which block a full tier gives up (DESIGN.md §5). A tier tells its policy
// about every insert, hit and erase, and asks it for a victim when it needs
// room. Policies are not thread-safe: the tier serializes calls.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "kvstrata/cachenode/block.h"

namespace kvstrata::cachenode {

class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  // `parent`: the block's parent in the prefix tree, when it has one.
  virtual void OnInsert(const BlockId& id, const std::optional<BlockId>& parent = std::nullopt) = 0;
  virtual void OnHit(const BlockId& id) = 0;
  // The tier kept the victim the policy named instead of evicting it
  // (precision tiers: transcoded it, or gave it another lease at its
  // format): it should not be named again before the others, but nothing
  // used it. By default a hit; policies for which a hit means more (a turn
  // of a conversation, an access their simulations learn from) override it.
  virtual void OnKept(const BlockId& id) { OnHit(id); }
  // Called for every removal (eviction or delete). Unknown ids are ignored.
  virtual void OnErase(const BlockId& id) = 0;
  // The block to evict next, or nullopt when the policy tracks none. Does not
  // remove it: the tier erases it and then calls OnErase.
  virtual std::optional<BlockId> Victim() = 0;
  virtual size_t size() const = 0;
  // The engine finished the request whose prompt ended with `last_block`,
  // generating `output_tokens` tokens (vLLM's request_finished). A hint that
  // arrives after the request's blocks were inserted, maybe after other
  // requests; policies that do not use it ignore it. Unknown ids are ignored.
  virtual void OnRequestFinished(const BlockId& last_block, uint32_t output_tokens) {
    (void)last_block;
    (void)output_tokens;
  }
};

// Least recently used: O(1) per operation; about 80 bytes per block.
std::unique_ptr<EvictionPolicy> MakeLruPolicy();

// Least recently used among leaves of the prefix tree: a block is never
// evicted while a descendant is cached, so a cached block's prefix stays
// cached; evicting bottom-up frees a whole chain from its tail. O(1) per
// operation; about 150 bytes per block.
std::unique_ptr<EvictionPolicy> MakePrefixLruPolicy();

// Three classes, each in LRU order, evicted in this order: dead (a block whose
// parent has since gained a newer child — the previous request's partial
// tail — or was evicted: it cannot extend a cached prefix),
// probation (blocks of a chain never seen before: most are never reused),
// protected (blocks hit at least once, extensions of protected blocks, chains
// whose root was seen before). Probation yields first only while it holds more
// than `probation_share` of the blocks. Roots seen are remembered, at most as
// many as the blocks the policy ever tracked. O(1) per operation; about 120
// bytes per block (map entry with the newest child's key, list node) plus
// about 70 bytes per remembered root.
// "chain-protect" is share 0, "chain-slru" share 0.1 (S3-FIFO's small queue).
std::unique_ptr<EvictionPolicy> MakeChainProtectPolicy(double probation_share);

// Conversations ranked by the chance they come back, learned online from
// the hints of OnRequestFinished: per turn kind (a chain's first request or a
// later one) and output-length class (log2 of the output tokens), the share
// of turns that came back, and per kind the gaps after which they did. A
// chain's value is P(it comes back | its class, the turns since its last
// request), by Bayes; the victim is the deepest block of the least valuable
// chain (O(number of classes) = O(1) per call), after dead blocks as in
// chain-protect. A turn waiting for its hint is kept; until a first hint
// arrives, chains go in chain-protect's order (new ones first, oldest
// first). About 150 bytes per block plus about 150 per remembered chain (as
// many as the blocks it ever held).
std::unique_ptr<EvictionPolicy> MakeReturnAwarePolicy();

// Frequency with ageing over the leaves of the prefix tree: a block is never
// evicted while a cached block extends it (as in prefix-lru); among leaves,
// those accessed least often go first (four levels by log2 of the count, LRU
// within a level), and a leaf untouched for as many accesses as the policy
// holds blocks loses a level (Multi-Queue's expiry), so counts follow a
// workload that changes. O(1) per operation; about 110 bytes per block.
std::unique_ptr<EvictionPolicy> MakePrefixFreqPolicy();

// Follows the candidate policy that would have had the most prefix hits
// lately. Every candidate runs as a miniature simulation on 1/8 of the keys
// (by a hash of the key) at 1/8 of the capacity, scoring prefix hits with
// exponential decay (half-life: sixteen turnovers of the simulated cache);
// the leader, the one policy that orders the real blocks, changes when
// another candidate's score leads by three standard deviations, at most once
// per turnover of the real cache. A new leader starts empty and takes each
// block over when it is hit; the previous one gives up the rest first.
// Starts with the first candidate. O(1) per call plus the leader's cost (and
// the previous leader's while a switch is under way); memory: the leader's,
// plus about 500 bytes per sampled block for four candidates and about 30
// per sampled block the real cache holds (about 66 bytes per block in all),
// plus 64 KiB.
class AdaptiveEvictionPolicy : public EvictionPolicy {
 public:
  struct Score {
    std::string_view policy;
    double prefix_hits;  // decayed, in the simulation
  };
  virtual std::string_view leader() const = 0;
  virtual std::vector<Score> scores() const = 0;
  virtual uint64_t switches() const = 0;
};
// Default candidates: chain-slru (the first leader: at or above LRU on every
// trace of the suite), lru, return-aware, prefix-freq.
// INVALID_ARGUMENT for an unknown candidate, or adaptive itself.
absl::StatusOr<std::unique_ptr<AdaptiveEvictionPolicy>> MakeAdaptivePolicy(
    std::vector<std::string> candidates = {});

// A policy by its flag name (kEvictionPolicyNames).
absl::StatusOr<std::unique_ptr<EvictionPolicy>> MakeEvictionPolicy(std::string_view name);
inline constexpr char kEvictionPolicyNames[] =
    "adaptive, lru, prefix-lru, prefix-freq, chain-protect, chain-slru, return-aware";

}  // namespace kvstrata::cachenode
