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
// errors of a few thousandths at rates down to 1/100 for large caches). A
// thinner sample is cheaper but biased where a policy reads structure:
// at 1/16 the simulations rate prefix-freq 15% above chain-slru on the agent
// shape of the generator's seed 2 and adaptive follows it to 0.034 below
// LRU; 1/32 escapes only by gathering too little evidence to switch at all
// (cachenode/README.md, "adaptive").
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
      : policy_(std::move(leader)), recent_(kRecentSlots) {
    for (size_t i = 0; i < names.size(); ++i) {
      candidates_.push_back(Candidate{.name = std::move(names[i]), .sim = std::move(simulations[i])});
    }
  }

  void OnInsert(const BlockId& id, const std::optional<BlockId>& parent) override {
    ++clock_;
    const uint64_t fingerprint = Fingerprint(id);
    // A request's blocks come in order, so the parent is the block accessed
    // just before; its nearest sampled ancestor-or-self is the child's
    // nearest sampled ancestor.
    const uint64_t ancestor = parent.has_value() && *parent == last_id_ ? last_anchor_ : 0;
    policy_->OnInsert(id, parent);
    high_water_ = std::max(high_water_, size());
    Access(fingerprint, ancestor);
    last_id_ = id;
  }

  void OnHit(const BlockId& id) override {
    ++clock_;
    const uint64_t fingerprint = Fingerprint(id);
    if (old_ != nullptr) {
      // Switching: a block the previous leader holds moves to the new one
      // when it is hit (it is reused: hit once more there).
      const size_t before = old_->size();
      old_->OnErase(id);
      if (old_->size() < before) {
        policy_->OnInsert(id, std::nullopt);
        DropOldWhenEmpty();
      }
    }
    policy_->OnHit(id);
    // A hit's ancestor: as recorded when it was last accessed (every sampled
    // block the real cache holds has its entry), else the block accessed
    // before it (its parent, unless it is the root of a new request).
    uint64_t ancestor = last_anchor_;
    if (Sampled(fingerprint)) {
      if (auto it = sampled_.find(fingerprint); it != sampled_.end()) ancestor = it->second.ancestor;
    }
    Access(fingerprint, ancestor);
    last_id_ = id;
  }

  // A kept victim moves in the leader only: the simulations judge the
  // candidates by accesses, and keeping a block is none.
  void OnKept(const BlockId& id) override {
    if (old_ != nullptr) {
      const size_t before = old_->size();
      old_->OnErase(id);
      if (old_->size() < before) {  // to the new leader, as a hit moves it
        policy_->OnInsert(id, std::nullopt);
        DropOldWhenEmpty();
        return;
      }
    }
    policy_->OnKept(id);
  }

  void OnErase(const BlockId& id) override {
    policy_->OnErase(id);
    if (const uint64_t fingerprint = Fingerprint(id); Sampled(fingerprint)) {
      if (auto it = sampled_.find(fingerprint); it != sampled_.end()) {
        it->second.real_held = false;
        if (it->second.held == 0) sampled_.erase(it);
      }
    }
    if (old_ != nullptr) {
      old_->OnErase(id);
      DropOldWhenEmpty();
    }
  }

  std::optional<BlockId> Victim() override {
    // The previous leader's blocks go first: they are the ones not hit since
    // the switch.
    if (old_ != nullptr) {
      if (std::optional<BlockId> victim = old_->Victim()) return victim;
    }
    return policy_->Victim();
  }
  size_t size() const override { return policy_->size() + (old_ != nullptr ? old_->size() : 0); }

  void OnRequestFinished(const BlockId& last_block, uint32_t output_tokens) override {
    policy_->OnRequestFinished(last_block, output_tokens);
    if (old_ != nullptr) old_->OnRequestFinished(last_block, output_tokens);
    // The simulations hear it for the request's deepest sampled block, if
    // the block was accessed recently enough to be remembered.
    const uint64_t fingerprint = Fingerprint(last_block);
    const Recent& recent = recent_[fingerprint % kRecentSlots];
    if (recent.fingerprint != fingerprint || recent.anchor == 0) return;
    for (Candidate& c : candidates_) {
      c.sim->OnRequestFinished(NumberedBlockId(recent.anchor), output_tokens);
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
  struct Candidate {
    std::string name;
    std::unique_ptr<EvictionPolicy> sim;
    size_t held = 0;  // sampled blocks its simulation holds
    double score = 0;
  };
  // A sampled block in the simulations or in the real cache: bit i for
  // candidate i, whether its simulation holds it and whether its last
  // access there was a prefix hit (its sampled ancestors hit too), and its
  // nearest sampled ancestor.
  struct Presence {
    uint64_t ancestor = 0;
    uint8_t held = 0;
    uint8_t prefix = 0;
    bool real_held = false;  // the real cache holds it
  };
  // The nearest sampled ancestor-or-self of a recently accessed block, for
  // finished-hints, which name a request's last block a little later.
  // Direct-mapped: 4096 slots hold the last few thousand accesses (a hint
  // arrives within a few requests), in 64 KiB.
  struct Recent {
    uint64_t fingerprint = 0;
    uint64_t anchor = 0;
  };
  static constexpr size_t kRecentSlots = 4096;

  void Access(uint64_t fingerprint, uint64_t ancestor) {
    if (Sampled(fingerprint)) {
      last_anchor_ = fingerprint;
      Simulate(fingerprint, ancestor);
      if (++sampled_accesses_ % kDecideEvery == 0) Decide();
    } else {
      last_anchor_ = ancestor;
    }
    recent_[fingerprint % kRecentSlots] = {fingerprint, last_anchor_};
  }

  void DropOldWhenEmpty() {
    if (old_ != nullptr && old_->size() == 0) old_.reset();
  }

  // One sampled access in every simulation. Its blocks form the prefix tree
  // restricted to sampled keys (a block's parent is its nearest sampled
  // ancestor), so prefix-aware candidates see the structure they rely on,
  // and a prefix hit is a hit whose sampled ancestors hit in this request.
  // (Sampling whole branches instead, so that a conversation is in or out
  // as a unit, was tried: the simulations then rated prefix-freq like LRU on
  // the agent shape, where it loses 0.23 of the token hit rate.)
  void Simulate(uint64_t fingerprint, uint64_t ancestor) {
    const size_t capacity = SimulatedCapacity();
    const double half_life = std::max(kMinHalfLife, kHalfLifeTurnovers * capacity);
    const double decay = 1.0 - 0.6931471805599453 / half_life;
    const BlockId block = NumberedBlockId(fingerprint);
    // One lookup for the block and one for its ancestor serve every
    // simulation (a map per simulation cost four of each).
    Presence& here = sampled_[fingerprint];
    here.ancestor = ancestor;
    uint8_t ancestor_prefix = 0xff;
    if (ancestor != 0) {
      auto a = sampled_.find(ancestor);
      ancestor_prefix = a == sampled_.end() ? 0 : a->second.held & a->second.prefix;
    }
    here.real_held = true;
    for (size_t i = 0; i < candidates_.size(); ++i) {
      Candidate& c = candidates_[i];
      const uint8_t bit = uint8_t{1} << i;
      c.score *= decay;
      if (here.held & bit) {
        const bool prefix = ancestor_prefix & bit;
        c.score += prefix;
        here.prefix = prefix ? here.prefix | bit : here.prefix & ~bit;
        c.sim->OnHit(block);
        continue;
      }
      while (c.held >= capacity) {
        std::optional<BlockId> victim = c.sim->Victim();
        if (!victim.has_value()) break;
        uint64_t gone;
        std::memcpy(&gone, victim->key.bytes.data(), sizeof(gone));
        c.sim->OnErase(*victim);
        --c.held;
        // (`here` stays valid: it is not held by this simulation, so it is
        // never the victim, and erasing from a flat_hash_map moves nothing.)
        if (auto g = sampled_.find(gone); g != sampled_.end()) {
          g->second.held &= ~bit;
          if (g->second.held == 0 && !g->second.real_held) sampled_.erase(g);
        }
      }
      here.held |= bit;
      here.prefix &= ~bit;
      ++c.held;
      c.sim->OnInsert(block, ancestor != 0 ? std::optional<BlockId>(NumberedBlockId(ancestor))
                                           : std::nullopt);
    }
  }

  void Decide() {
    if (old_ != nullptr) return;  // the last switch is still under way
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
    if (clock_ - last_switch_ < size()) return;
    SwitchTo(best);
  }

  void SwitchTo(size_t next) {
    // The new leader starts empty and takes over the blocks held as they
    // are hit; the old one keeps the rest and gives them up first. No state
    // per block is kept to rebuild from, and the switch costs O(1) per call
    // while both run (at most one turnover of the tier).
    old_ = std::move(policy_);
    policy_ = *MakeEvictionPolicy(candidates_[next].name);
    DropOldWhenEmpty();
    leader_ = next;
    last_switch_ = clock_;
    ++switches_;
  }

  size_t SimulatedCapacity() const {
    return std::max<size_t>(
        1, static_cast<size_t>(high_water_ / static_cast<double>(kSampleMask + 1) + 0.5));
  }

  std::vector<Candidate> candidates_;  // at most 8 (bits of a Presence)
  size_t leader_ = 0;
  std::unique_ptr<EvictionPolicy> policy_;  // the leader
  std::unique_ptr<EvictionPolicy> old_;     // the previous leader, while it holds blocks
  absl::flat_hash_map<uint64_t, Presence> sampled_;  // by fingerprint
  std::vector<Recent> recent_;
  BlockId last_id_;           // the block accessed last (compared, not hashed)
  uint64_t last_anchor_ = 0;  // its nearest sampled ancestor-or-self
  uint64_t clock_ = 0;        // accesses
  uint64_t sampled_accesses_ = 0;
  uint64_t last_switch_ = 0;
  uint64_t switches_ = 0;
  size_t high_water_ = 0;  // the most blocks held: the tier's capacity, once full
};

}  // namespace

absl::StatusOr<std::unique_ptr<AdaptiveEvictionPolicy>> MakeAdaptivePolicy(
    std::vector<std::string> candidates) {
  if (candidates.empty()) candidates = {"chain-slru", "lru", "return-aware", "prefix-freq"};
  if (candidates.size() > 8) return absl::InvalidArgumentError("at most 8 candidates");
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
