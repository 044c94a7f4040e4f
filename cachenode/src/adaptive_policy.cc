// adaptive: follows whichever candidate policy would have had the most prefix
// hits lately, judged by miniature simulations on a sample of the blocks
// (see eviction_policy.h and cachenode/README.md, "adaptive").
//
// Why this shape: no single policy wins on every workload (return-aware wins
// on conversations whose output length says whether they return, chain-slru
// on scans and templated prompts, LRU is never far off) and a cache does not
// know its workload. Running every candidate on every block would cost their
// sum per call; SHARDS-style spatial sampling (Waldspurger et al., FAST 2015)
// runs each on 1/8 of the keys at 1/8 of the capacity.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "kvstrata/cachenode/eviction_policy.h"

namespace kvstrata::cachenode {
namespace {

// One key in 8 is simulated. A power of two so sampling is a mask; 1/8
// keeps the simulations' cost near half of one policy's while a tier of a
// few thousand blocks still gives each simulation hundreds (SHARDS reports
// errors of a few thousandths at rates down to 1/100 for large caches).
constexpr uint64_t kSampleMask = 7;
// Scores are prefix hits with exponential decay: a hit counts half after
// this many sampled accesses per block of simulated capacity (at least
// kMinHalfLife). Sixteen turnovers of the cache: long enough that a policy's
// bet on blocks it keeps for a long time (protected chains, returning
// conversations) pays off inside the window, short enough to follow a
// workload that changes within a trace of a few thousand requests.
constexpr double kHalfLifeTurnovers = 16;
constexpr double kMinHalfLife = 1024;
// The leader changes when another candidate's score beats it by three
// standard deviations of the difference (scores are roughly Poisson counts:
// sd(a - b) <= sqrt(a + b)), and at most once per turnover of the real
// cache, so rebuilding the new leader's state (O(n log n) over the blocks
// held) costs O(log n) per access amortised. A fixed 2% margin flapped (at
// 5% of the shared trace the candidates differ by ~5% and a window's noise
// is about as large); two standard deviations switched to prefix-freq on
// the agent shape, whose simulation overrates it, and lost 0.13 there.
constexpr double kSwitchSigmas = 3;
constexpr int kDecideEvery = 64;  // sampled accesses between decisions

uint64_t Fingerprint(const BlockId& id) {
  uint64_t a, b;
  std::memcpy(&a, id.key.bytes.data(), 8);
  std::memcpy(&b, id.key.bytes.data() + 8, 8);
  // splitmix64's finaliser over the three words: stable across processes and
  // builds (absl::Hash is not), so a replay gives the same figures each run.
  uint64_t x = a ^ (b * 0x9e3779b97f4a7c15ULL) ^ (id.namespace_id * 0xc2b2ae3d27d4eb4fULL);
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x | 1;  // 0 means "none" below
}
bool Sampled(uint64_t fingerprint) { return ((fingerprint >> 40) & kSampleMask) == 0; }

class AdaptivePolicy final : public AdaptiveEvictionPolicy {
 public:
  // `simulations[i]` runs candidate `names[i]`; `leader` is a fresh
  // instance of names[0].
  AdaptivePolicy(std::vector<std::string> names,
                 std::vector<std::unique_ptr<EvictionPolicy>> simulations,
                 std::unique_ptr<EvictionPolicy> leader)
      : policy_(std::move(leader)) {
    for (size_t i = 0; i < names.size(); ++i) {
      candidates_.push_back(Candidate{.name = std::move(names[i]), .sim = std::move(simulations[i])});
    }
  }

  void OnInsert(const BlockId& id, const std::optional<BlockId>& parent) override {
    ++clock_;
    const uint64_t fingerprint = Fingerprint(id);
    auto [it, inserted] = blocks_.try_emplace(fingerprint);
    Meta& meta = it->second;
    if (inserted) {
      meta.id = id;
      if (parent.has_value() && !(*parent == id)) {
        meta.parent = parent->key;
        meta.has_parent = true;
        const uint64_t up = Fingerprint(*parent);
        if (Sampled(up)) {
          meta.sampled_ancestor = up;
        } else if (auto p = blocks_.find(up); p != blocks_.end()) {
          meta.sampled_ancestor = p->second.sampled_ancestor;
        }
      }
    }
    high_water_ = std::max(high_water_, blocks_.size());
    policy_->OnInsert(id, parent);
    Access(fingerprint, meta);
  }

  void OnHit(const BlockId& id) override {
    ++clock_;
    const uint64_t fingerprint = Fingerprint(id);
    auto it = blocks_.find(fingerprint);
    if (it == blocks_.end()) return;
    policy_->OnHit(id);
    it->second.hit = true;
    Access(fingerprint, it->second);
  }

  void OnErase(const BlockId& id) override {
    if (blocks_.erase(Fingerprint(id)) == 0) return;
    policy_->OnErase(id);
  }

  std::optional<BlockId> Victim() override { return policy_->Victim(); }
  size_t size() const override { return blocks_.size(); }

  void OnRequestFinished(const BlockId& last_block, uint32_t output_tokens) override {
    policy_->OnRequestFinished(last_block, output_tokens);
    // The simulations hear it for the request's deepest sampled block.
    uint64_t fingerprint = Fingerprint(last_block);
    if (!Sampled(fingerprint)) {
      auto it = blocks_.find(fingerprint);
      if (it == blocks_.end() || it->second.sampled_ancestor == 0) return;
      fingerprint = it->second.sampled_ancestor;
    }
    for (Candidate& c : candidates_) {
      c.sim->OnRequestFinished(NumberedBlockId(fingerprint), output_tokens);
    }
  }

  std::string_view leader() const override { return candidates_[leader_].name; }
  std::vector<Score> scores() const override {
    std::vector<Score> out;
    for (const Candidate& c : candidates_) out.push_back({c.name, c.score});
    return out;
  }
  uint64_t switches() const override { return switches_; }

 private:
  // Blocks are keyed by their 64-bit fingerprint: two blocks held at once
  // share one with probability ~n^2/2^64 (a mix-up then only misorders
  // those two in the simulations and the rebuild; the tier's own index
  // never relies on it).
  struct Meta {
    BlockId id;
    BlockKey parent;  // same namespace as the block
    uint64_t touched = 0;
    uint64_t sampled_ancestor = 0;  // fingerprint of the nearest sampled ancestor, 0: none
    bool has_parent = false;
    bool hit = false;  // accessed again since it was inserted
  };
  struct Candidate {
    std::string name;
    std::unique_ptr<EvictionPolicy> sim;
    // Sampled blocks the simulation holds -> whether their last access was a
    // prefix hit there (all sampled ancestors hit too).
    absl::flat_hash_map<uint64_t, bool> cached;
    double score = 0;
  };

  void Access(uint64_t fingerprint, Meta& meta) {
    meta.touched = clock_;
    if (!Sampled(fingerprint)) return;
    Simulate(fingerprint, meta.sampled_ancestor);
    if (++sampled_accesses_ % kDecideEvery == 0) Decide();
  }

  // One sampled access in every simulation. Its blocks form the prefix tree
  // restricted to sampled keys (a block's parent is its nearest sampled
  // ancestor), so prefix-aware candidates see the structure they rely on,
  // and a prefix hit is a hit whose sampled ancestors hit in this request.
  // (Sampling whole branches instead, so that a conversation is in or out
  // as a unit, was tried: the simulations then rated prefix-freq like LRU on
  // the agent shape, where it loses 0.23 of the token hit rate.)
  void Simulate(uint64_t fingerprint, uint64_t ancestor) {
    const size_t capacity = std::max<size_t>(
        1, static_cast<size_t>(high_water_ / static_cast<double>(kSampleMask + 1) + 0.5));
    const double half_life = std::max(kMinHalfLife, kHalfLifeTurnovers * capacity);
    const double decay = 1.0 - 0.6931471805599453 / half_life;
    const BlockId block = NumberedBlockId(fingerprint);
    for (Candidate& c : candidates_) {
      c.score *= decay;
      auto it = c.cached.find(fingerprint);
      bool prefix = it != c.cached.end();
      if (prefix && ancestor != 0) {
        auto a = c.cached.find(ancestor);
        prefix = a != c.cached.end() && a->second;
      }
      if (it != c.cached.end()) {
        c.score += prefix;
        it->second = prefix;
        c.sim->OnHit(block);
        continue;
      }
      while (c.cached.size() >= capacity) {
        std::optional<BlockId> victim = c.sim->Victim();
        if (!victim.has_value()) break;
        uint64_t gone;
        std::memcpy(&gone, victim->key.bytes.data(), sizeof(gone));
        c.cached.erase(gone);
        c.sim->OnErase(*victim);
      }
      c.cached.emplace(fingerprint, false);
      c.sim->OnInsert(block, ancestor != 0 ? std::optional<BlockId>(NumberedBlockId(ancestor))
                                           : std::nullopt);
    }
  }

  void Decide() {
    size_t best = leader_;
    for (size_t i = 0; i < candidates_.size(); ++i) {
      if (candidates_[i].score > candidates_[best].score) best = i;
    }
    if (best == leader_) return;
    const double lead = candidates_[best].score - candidates_[leader_].score;
    if (lead * lead < kSwitchSigmas * kSwitchSigmas *
                          (candidates_[best].score + candidates_[leader_].score + 1)) {
      return;
    }
    if (clock_ - last_switch_ < blocks_.size()) return;
    Switch(best);
  }

  // The new leader learns the blocks held, least recently touched first, as
  // a tier that had run it would have inserted them, each hit once more if
  // it had been hit (so reuse is known: chain-slru protects it, prefix-freq
  // counts it); what a policy learns over time (hint statistics, exact
  // frequencies) starts afresh.
  void Switch(size_t to) {
    std::vector<std::pair<uint64_t, const Meta*>> order;
    order.reserve(blocks_.size());
    for (const auto& [fingerprint, meta] : blocks_) order.push_back({meta.touched, &meta});
    std::sort(order.begin(), order.end());
    std::unique_ptr<EvictionPolicy> next = *MakeEvictionPolicy(candidates_[to].name);
    for (const auto& [touched, m] : order) {
      const Meta& meta = *m;
      const BlockId* id = &meta.id;
      next->OnInsert(*id, meta.has_parent
                              ? std::optional<BlockId>(BlockId{id->namespace_id, meta.parent})
                              : std::nullopt);
      if (meta.hit) next->OnHit(*id);
    }
    policy_ = std::move(next);
    leader_ = to;
    last_switch_ = clock_;
    ++switches_;
  }

  std::vector<Candidate> candidates_;
  size_t leader_ = 0;
  std::unique_ptr<EvictionPolicy> policy_;  // the leader, over every block held
  absl::flat_hash_map<uint64_t, Meta> blocks_;  // by fingerprint
  uint64_t clock_ = 0;  // accesses
  uint64_t sampled_accesses_ = 0;
  uint64_t last_switch_ = 0;
  uint64_t switches_ = 0;
  size_t high_water_ = 0;  // the most blocks held: the tier's capacity, once full
};

}  // namespace

absl::StatusOr<std::unique_ptr<AdaptiveEvictionPolicy>> MakeAdaptivePolicy(
    std::vector<std::string> candidates) {
  if (candidates.empty()) candidates = {"chain-slru", "lru", "return-aware", "prefix-freq"};
  std::vector<std::unique_ptr<EvictionPolicy>> simulations;
  for (const std::string& name : candidates) {
    if (name == "adaptive") return absl::InvalidArgumentError("adaptive cannot be its own candidate");
    absl::StatusOr<std::unique_ptr<EvictionPolicy>> made = MakeEvictionPolicy(name);
    if (!made.ok()) return made.status();
    simulations.push_back(*std::move(made));
  }
  std::unique_ptr<EvictionPolicy> leader = *MakeEvictionPolicy(candidates.front());
  return std::make_unique<AdaptivePolicy>(std::move(candidates), std::move(simulations),
                                          std::move(leader));
}

}  // namespace kvstrata::cachenode
