// Invariants every eviction policy keeps, and what chain-protect and
// return-aware do that LRU does not.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "kvstrata/cachenode/eviction_policy.h"
#include "kvstrata/cachenode/replay.h"
#include "hint_recording_policy.h"

namespace kvstrata::cachenode {
namespace {

BlockId Id(uint64_t n) { return NumberedBlockId(n); }

uint64_t Number(const BlockId& id) {
  uint64_t n;
  std::memcpy(&n, id.key.bytes.data(), sizeof(n));
  return n;
}

TraceRequest Request(std::vector<uint64_t> ids) {
  TraceRequest r;
  r.input_length = ids.size() * kTraceTokensPerBlock;
  r.hash_ids = std::move(ids);
  return r;
}

// The order in which a policy gives up everything it holds.
std::vector<uint64_t> EvictionOrder(EvictionPolicy& policy) {
  std::vector<uint64_t> order;
  while (std::optional<BlockId> victim = policy.Victim()) {
    order.push_back(Number(*victim));
    policy.OnErase(*victim);
  }
  return order;
}

// Conversations: a root, a body that grows by a block or two per turn, and a
// partial tail block that the next turn replaces.
std::vector<TraceRequest> RandomConversations(uint32_t seed, int requests) {
  std::mt19937 rng(seed);
  std::vector<std::vector<uint64_t>> bodies;
  uint64_t next_id = 1;
  std::vector<TraceRequest> trace;
  for (int i = 0; i < requests; ++i) {
    if (bodies.empty() || rng() % 3 == 0) {
      bodies.emplace_back();
      for (int d = 0, n = 1 + rng() % 8; d < n; ++d) bodies.back().push_back(next_id++);
    }
    std::vector<uint64_t>& body = bodies[rng() % bodies.size()];
    for (int d = 0, n = rng() % 3; d < n; ++d) body.push_back(next_id++);
    std::vector<uint64_t> ids = body;
    ids.push_back(next_id++);  // this turn's partial tail
    trace.push_back(Request(ids));
    trace.back().timestamp = 100.0 * i;
    trace.back().output_length = rng() % 600;  // hints for return-aware
  }
  return trace;
}

class PolicyInvariants : public ::testing::TestWithParam<std::string> {};

// Drives the policy as a tier does, checking after every step that it never
// holds more than the capacity, only names blocks it holds as victims, and,
// for prefix-lru, never strands a child by evicting its parent.
TEST_P(PolicyInvariants, CapacityVictimsAndPrefixes) {
  for (size_t capacity : {1u, 7u, 40u}) {
    auto made = MakeEvictionPolicy(GetParam());
    ASSERT_TRUE(made.ok());
    EvictionPolicy& policy = **made;
    absl::flat_hash_set<uint64_t> cached;
    absl::flat_hash_map<uint64_t, uint64_t> parent_of;
    for (const TraceRequest& request : RandomConversations(7, 400)) {
      for (size_t i = 0; i < request.hash_ids.size(); ++i) {
        const uint64_t id = request.hash_ids[i];
        if (cached.contains(id)) {
          policy.OnHit(Id(id));
          continue;
        }
        while (cached.size() >= capacity) {
          std::optional<BlockId> victim = policy.Victim();
          ASSERT_TRUE(victim.has_value());
          const uint64_t v = Number(*victim);
          ASSERT_TRUE(cached.contains(v)) << GetParam() << " named a block it does not hold";
          if (GetParam() == "prefix-lru" || GetParam() == "prefix-freq") {
            for (uint64_t c : cached) {
              auto p = parent_of.find(c);
              ASSERT_FALSE(p != parent_of.end() && p->second == v) << "strands child " << c;
            }
          }
          cached.erase(v);
          policy.OnErase(*victim);
        }
        std::optional<BlockId> parent;
        if (i > 0) {
          parent = Id(request.hash_ids[i - 1]);
          parent_of[id] = request.hash_ids[i - 1];
        }
        cached.insert(id);
        policy.OnInsert(Id(id), parent);
        ASSERT_EQ(policy.size(), cached.size());
        ASSERT_LE(policy.size(), capacity);
      }
      // Hints, for the blocks held or long gone, change nothing here.
      policy.OnRequestFinished(Id(request.hash_ids.back()), request.output_length);
      policy.OnRequestFinished(Id(request.hash_ids.front() + 100000), 5);
      ASSERT_EQ(policy.size(), cached.size());
    }
    // Draining through Victim empties the policy.
    while (std::optional<BlockId> victim = policy.Victim()) {
      ASSERT_TRUE(cached.erase(Number(*victim)));
      policy.OnErase(*victim);
    }
    EXPECT_EQ(policy.size(), 0u);
    EXPECT_TRUE(cached.empty());
  }
}

TEST_P(PolicyInvariants, DeterministicForAFixedTrace) {
  const std::vector<TraceRequest> trace = RandomConversations(5, 600);
  auto first = MakeEvictionPolicy(GetParam());
  auto second = MakeEvictionPolicy(GetParam());
  ASSERT_TRUE(first.ok() && second.ok());
  const ReplayResult a = Replay(trace, 30, **first);
  const ReplayResult b = Replay(trace, 30, **second);
  EXPECT_EQ(a.hit_tokens, b.hit_tokens);
  EXPECT_EQ(a.access_hits, b.access_hits);
  EXPECT_EQ(a.operations, b.operations);
  EXPECT_GT(a.hit_tokens, 0u);
  EXPECT_LE(a.access_hits, ReplayBelady(trace, 30).access_hits);
}

// A victim the tier kept (precision tiers) is not named again at once:
// each of a chain's blocks, and of unrelated ones, in turn before any again.
// (return-aware named the same block again, so a kept block went down every
// rung at once and was evicted.) Policies that evict only leaves have just
// one candidate in a chain.
TEST_P(PolicyInvariants, AKeptVictimIsNotNamedAgainFirst) {
  const bool leaves_only = GetParam() == "prefix-lru" || GetParam() == "prefix-freq";
  for (bool chained : {false, true}) {
    if (chained && leaves_only) continue;
    auto made = MakeEvictionPolicy(GetParam());
    ASSERT_TRUE(made.ok());
    EvictionPolicy& policy = **made;
    for (uint64_t n = 1; n <= 4; ++n) {
      policy.OnInsert(Id(n), chained && n > 1 ? std::optional<BlockId>(Id(n - 1)) : std::nullopt);
    }
    absl::flat_hash_set<uint64_t> named;
    for (int turn = 0; turn < 4; ++turn) {
      std::optional<BlockId> victim = policy.Victim();
      ASSERT_TRUE(victim.has_value());
      EXPECT_TRUE(named.insert(Number(*victim)).second)
          << GetParam() << (chained ? " chain" : "") << ": named " << Number(*victim) << " again";
      policy.OnKept(*victim);
    }
    EXPECT_EQ(policy.size(), 4u);
  }
}

INSTANTIATE_TEST_SUITE_P(AllPolicies, PolicyInvariants,
                         ::testing::Values("lru", "prefix-lru", "prefix-freq", "chain-protect",
                                           "chain-slru", "return-aware", "adaptive"),
                         [](const auto& info) {
                           std::string name = info.param;
                           for (char& c : name) c = c == '-' ? '_' : c;
                           return name;
                         });

// The most prefix-hit blocks any schedule (cache or bypass each miss, evict
// any block) gets: prefixes are counted when each request starts.
uint64_t BestPrefixHits(const std::vector<TraceRequest>& trace, size_t r, size_t i,
                        std::vector<uint64_t> cached, size_t capacity) {
  if (r == trace.size()) return 0;
  const std::vector<uint64_t>& ids = trace[r].hash_ids;
  if (i == ids.size()) return BestPrefixHits(trace, r + 1, 0, cached, capacity);
  uint64_t gained = 0;
  if (i == 0) {
    while (gained < ids.size() &&
           std::find(cached.begin(), cached.end(), ids[gained]) != cached.end()) {
      ++gained;
    }
  }
  const uint64_t id = ids[i];
  if (std::find(cached.begin(), cached.end(), id) != cached.end()) {
    return gained + BestPrefixHits(trace, r, i + 1, cached, capacity);
  }
  uint64_t best = BestPrefixHits(trace, r, i + 1, cached, capacity);  // bypass
  if (cached.size() < capacity) {
    auto with = cached;
    with.push_back(id);
    best = std::max(best, BestPrefixHits(trace, r, i + 1, with, capacity));
  } else {
    for (size_t victim = 0; victim < cached.size(); ++victim) {
      auto with = cached;
      with[victim] = id;
      best = std::max(best, BestPrefixHits(trace, r, i + 1, with, capacity));
    }
  }
  return gained + best;
}

// Belady optimises access hits; for prefix hits it is a yardstick, not a
// bound. Neither it nor any online policy may beat the true prefix optimum.
TEST(BeladyPrefixTest, NoPolicyBeatsThePrefixOptimum) {
  std::mt19937 rng(23);
  int belady_below = 0;
  for (int round = 0; round < 150; ++round) {
    std::vector<TraceRequest> trace;
    for (int n = 2 + rng() % 3; n > 0; --n) {
      std::vector<uint64_t> ids;
      const uint64_t root = rng() % 3;
      for (int d = 0, m = 1 + rng() % 3; d < m; ++d)
        ids.push_back(root * 10 + d + (rng() % 4 == 0));
      trace.push_back(Request(ids));
    }
    const size_t capacity = 1 + rng() % 3;
    const uint64_t best = BestPrefixHits(trace, 0, 0, {}, capacity);
    const uint64_t belady = ReplayBelady(trace, capacity).prefix_hit_blocks;
    ASSERT_LE(belady, best) << "round " << round;
    belady_below += belady < best;
    for (const char* name : {"lru", "prefix-lru", "prefix-freq", "chain-protect", "chain-slru",
                             "return-aware", "adaptive"}) {
      auto policy = MakeEvictionPolicy(name);
      ASSERT_TRUE(policy.ok());
      ASSERT_LE(Replay(trace, capacity, **policy).prefix_hit_blocks, best)
          << name << " round " << round;
    }
  }
  // Recorded, not required: how often Belady misses the prefix optimum.
  ::testing::Test::RecordProperty("belady_below_prefix_optimum", belady_below);
  std::printf("Belady below the prefix optimum in %d of 150 tiny traces\n", belady_below);
}

TEST(ChainProtectTest, SmallTraceGivesKnownNumbers) {
  // r2 reuses 1,2 and replaces tail 3 with 4 (3 is dead, 1,2,4 protected);
  // r3, a new chain, gives up 3 and then its own 5; r4 reuses 1,2,4. LRU
  // instead loses root 1 to r3 and r4 misses entirely.
  const std::vector<TraceRequest> trace = {Request({1, 2, 3}), Request({1, 2, 4}), Request({5, 6}),
                                           Request({1, 2, 4, 8})};
  auto policy = MakeChainProtectPolicy(0.0);
  const ReplayResult r = Replay(trace, 4, *policy);
  EXPECT_EQ(r.prefix_hit_blocks, 5u);
  EXPECT_EQ(r.total_blocks, 12u);
  EXPECT_EQ(r.hit_tokens, 5 * kTraceTokensPerBlock);
  auto lru = MakeLruPolicy();
  EXPECT_EQ(Replay(trace, 4, *lru).prefix_hit_blocks, 2u);
}

TEST(ChainProtectTest, SupersededTailGoesFirst) {
  auto policy = MakeChainProtectPolicy(0.0);
  policy->OnInsert(Id(1), std::nullopt);
  policy->OnInsert(Id(2), Id(1));
  policy->OnInsert(Id(3), Id(2));
  policy->OnHit(Id(1));
  policy->OnHit(Id(2));
  policy->OnInsert(Id(4), Id(2));  // the next turn: 3 is replaced by 4
  EXPECT_EQ(policy->Victim(), Id(3));
}

TEST(ChainProtectTest, ARootSeenBeforeIsProtected) {
  auto policy = MakeChainProtectPolicy(0.0);
  policy->OnInsert(Id(1), std::nullopt);
  policy->OnInsert(Id(2), std::nullopt);
  policy->OnErase(Id(1));
  policy->OnInsert(Id(1), std::nullopt);  // a repeat of a chain let go
  policy->OnInsert(Id(9), Id(1));         // its extension
  policy->OnInsert(Id(3), std::nullopt);  // a new chain
  // New chains (2, 3) go before the repeated chain (1, 9), oldest first.
  EXPECT_EQ(policy->Victim(), Id(2));
  policy->OnErase(Id(2));
  EXPECT_EQ(policy->Victim(), Id(3));
  policy->OnErase(Id(3));
  EXPECT_EQ(policy->Victim(), Id(1));
}

TEST(ChainProtectTest, ABlockWhoseParentIsElsewhereStartsAChain) {
  // A cluster node holds block 7 of a conversation whose block 6 lives on
  // another node: 7 is remembered like a root, so when it comes back after
  // being evicted it is protected, not one more new chain.
  auto policy = MakeChainProtectPolicy(0.0);
  policy->OnInsert(Id(7), Id(6));
  policy->OnInsert(Id(20), std::nullopt);
  policy->OnErase(Id(7));
  policy->OnInsert(Id(7), Id(6));          // it comes back
  policy->OnInsert(Id(30), std::nullopt);  // a new chain
  EXPECT_EQ(policy->Victim(), Id(20));
  policy->OnErase(Id(20));
  EXPECT_EQ(policy->Victim(), Id(30));
}

TEST(ChainProtectTest, ChildrenOfASharedPrefixAreAllAlive) {
  // 1-2 is a system prompt; 3 and 5 start two conversations (3 already
  // extended by 4): 5 does not replace 3, and a third conversation 6 does
  // not replace 5 either, though 5 is a leaf: 2 has branched.
  auto policy = MakeChainProtectPolicy(0.0);
  policy->OnInsert(Id(1), std::nullopt);
  policy->OnInsert(Id(2), Id(1));
  policy->OnInsert(Id(3), Id(2));
  policy->OnInsert(Id(4), Id(3));
  policy->OnInsert(Id(5), Id(2));
  policy->OnInsert(Id(6), Id(2));
  // Nothing is dead: the oldest block goes first (a superseded 3 or 5 would).
  EXPECT_EQ(policy->Victim(), Id(1));
  // Once the prompt is gone, only its newest child is known to be orphaned
  // (it goes next); the others follow in insertion order.
  EXPECT_EQ(EvictionOrder(*policy), (std::vector<uint64_t>{1, 2, 6, 3, 4, 5}));
}

TEST(ChainProtectTest, ProbationKeepsItsShare) {
  auto policy = MakeChainProtectPolicy(0.5);
  for (uint64_t n = 1; n <= 4; ++n) {
    policy->OnInsert(Id(n), std::nullopt);
    policy->OnHit(Id(n));  // protected
  }
  policy->OnInsert(Id(10), std::nullopt);  // probation: 1 of 5 blocks, under half
  EXPECT_EQ(policy->Victim(), Id(1));
}

TEST(ChainProtectTest, NodeFlagNamesThePolicies) {
  EXPECT_TRUE(MakeEvictionPolicy("chain-protect").ok());
  EXPECT_TRUE(MakeEvictionPolicy("chain-slru").ok());
  EXPECT_FALSE(MakeEvictionPolicy("belady").ok());
}

// Teaches a return-aware policy that chains whose requests ended after 8
// output tokens come back and those ending after 1000 do not: 30 of each,
// ids from `base`, two blocks per chain (root, then root + 1).
void TeachOutputClasses(EvictionPolicy& policy, uint64_t base) {
  for (uint64_t c = 0; c < 60; ++c) {
    const uint64_t root = base + 10 * c;
    policy.OnInsert(Id(root), std::nullopt);
    policy.OnInsert(Id(root + 1), Id(root));
    policy.OnRequestFinished(Id(root + 1), c % 2 == 0 ? 8 : 1000);
  }
  for (uint64_t c = 0; c < 60; c += 2) {  // the short ones come back
    policy.OnHit(Id(base + 10 * c));
    policy.OnHit(Id(base + 10 * c + 1));
    policy.OnRequestFinished(Id(base + 10 * c + 1), 8);
  }
}


size_t Position(const std::vector<uint64_t>& order, uint64_t n) {
  return std::find(order.begin(), order.end(), n) - order.begin();
}

TEST(ReturnAwareTest, KeepsTheChainsItsHintsSayComeBack) {
  auto policy = MakeReturnAwarePolicy();
  TeachOutputClasses(*policy, 1000);
  // Two new chains: A (short output) first, then B (long output). LRU would
  // give up A first; return-aware gives up B, deepest block first.
  policy->OnInsert(Id(1), std::nullopt);
  policy->OnInsert(Id(2), Id(1));
  policy->OnRequestFinished(Id(2), 8);
  policy->OnInsert(Id(5), std::nullopt);
  policy->OnInsert(Id(6), Id(5));
  policy->OnInsert(Id(7), Id(6));
  policy->OnRequestFinished(Id(7), 1000);
  const std::vector<uint64_t> order = EvictionOrder(*policy);
  EXPECT_LT(Position(order, 7), Position(order, 6));
  EXPECT_LT(Position(order, 6), Position(order, 5));
  EXPECT_LT(Position(order, 5), Position(order, 1));
  EXPECT_LT(Position(order, 2), Position(order, 1));  // A's tail before its root
  EXPECT_LT(Position(order, 1010), Position(order, 1))
      << "an unreturned long-output chain outlived a new short-output one";
}

TEST(ReturnAwareTest, ATurnWaitingForItsHintIsKept) {
  auto policy = MakeReturnAwarePolicy();
  TeachOutputClasses(*policy, 1000);
  policy->OnInsert(Id(1), std::nullopt);  // D: no hint yet
  policy->OnInsert(Id(2), Id(1));
  policy->OnInsert(Id(5), std::nullopt);  // C: newer, but its hint says it will not return
  policy->OnRequestFinished(Id(5), 1000);
  const std::vector<uint64_t> order = EvictionOrder(*policy);
  EXPECT_LT(Position(order, 5), Position(order, 2));
  EXPECT_LT(Position(order, 5), Position(order, 1));
}

TEST(ReturnAwareTest, AFetchBeforeTheHintIsTheSameRequest) {
  auto policy = MakeReturnAwarePolicy();
  // Taught: first turns ending after 8 tokens come back, their later turns
  // (also 8 tokens) never do, and first turns ending after 1000 never do.
  TeachOutputClasses(*policy, 1000);
  // Hints arrive a few requests late here.
  policy->OnInsert(Id(900), std::nullopt);
  for (uint64_t n = 901; n <= 904; ++n) policy->OnInsert(Id(n), std::nullopt);
  policy->OnRequestFinished(Id(900), 1000);
  // X: a new chain, hit again (its Fetch) after another request came in, then
  // finished after 8 tokens. Still X's first turn: worth keeping. Counted as a
  // second turn it would be worth as little as Y.
  policy->OnInsert(Id(1), std::nullopt);
  policy->OnInsert(Id(2), Id(1));
  policy->OnInsert(Id(5), std::nullopt);  // Y, another request
  policy->OnHit(Id(1));
  policy->OnHit(Id(2));
  policy->OnRequestFinished(Id(2), 8);
  policy->OnInsert(Id(6), Id(5));
  policy->OnRequestFinished(Id(6), 1000);
  const std::vector<uint64_t> order = EvictionOrder(*policy);
  EXPECT_LT(Position(order, 5), Position(order, 1));
  EXPECT_LT(Position(order, 6), Position(order, 2));
}

TEST(ReturnAwareTest, WithoutHintsNewChainsGoBeforeReusedOnes) {
  auto policy = MakeReturnAwarePolicy();
  policy->OnInsert(Id(1), std::nullopt);
  policy->OnInsert(Id(2), Id(1));
  policy->OnInsert(Id(5), std::nullopt);
  policy->OnHit(Id(1));  // chain 1's second request
  policy->OnInsert(Id(8), std::nullopt);
  // New chains oldest first, then the reused chain from its tail (LRU: 2, 5, 1, 8).
  EXPECT_EQ(EvictionOrder(*policy), (std::vector<uint64_t>{5, 8, 2, 1}));
}

TEST(ReturnAwareTest, SupersededTailGoesFirst) {
  auto policy = MakeReturnAwarePolicy();
  policy->OnInsert(Id(1), std::nullopt);
  policy->OnInsert(Id(2), Id(1));
  policy->OnInsert(Id(3), Id(2));
  policy->OnInsert(Id(8), std::nullopt);  // another chain, newer
  policy->OnHit(Id(1));                   // the next turn of the first
  policy->OnHit(Id(2));
  policy->OnInsert(Id(4), Id(2));  // 3 is replaced by 4
  EXPECT_EQ(policy->Victim(), Id(3));
}

// What a cluster node sees with blocks placed one by one: nearly every block
// arrives with a parent it does not hold, so each is a chain of its own. The
// chain memory once ran dry of entries while over its limit and crashed.
TEST(PolicyInvariantsTest, OrphanedBlocksAtCapacityNeverBreakAPolicy) {
  for (const char* name : {"lru", "prefix-lru", "prefix-freq", "chain-protect", "chain-slru",
                           "return-aware", "adaptive"}) {
    auto policy = MakeEvictionPolicy(name);
    ASSERT_TRUE(policy.ok());
    std::mt19937 rng(3);
    absl::flat_hash_set<uint64_t> held;
    for (uint64_t n = 1; n <= 20000; ++n) {
      // Every third block is a conversation's next block held elsewhere;
      // some come back (hits), a few with a parent that is held.
      const uint64_t id = rng() % 4 == 0 && n > 10 ? n - 1 - rng() % 10 : 1000000 + n;
      if (held.contains(id)) {
        (*policy)->OnHit(Id(id));
        continue;
      }
      while (held.size() >= 100) {
        std::optional<BlockId> victim = (*policy)->Victim();
        ASSERT_TRUE(victim.has_value()) << name;
        ASSERT_TRUE(held.erase(Number(*victim))) << name;
        (*policy)->OnErase(*victim);
      }
      held.insert(id);
      (*policy)->OnInsert(Id(id), Id(id + 5000000));  // a parent on another node
      if (n % 7 == 0) (*policy)->OnRequestFinished(Id(id), 10 + n % 300);
    }
    EXPECT_EQ((*policy)->size(), held.size()) << name;
  }
}

TEST(ReplayHintsTest, HintsArriveAfterTheirDecodeTime) {
  // Requests every 100 ms, all distinct; request 0 decodes 10 tokens (500 ms
  // at 50 ms per token), the others one token (50 ms).
  std::vector<TraceRequest> trace;
  for (uint64_t i = 0; i < 8; ++i) {
    trace.push_back(Request({100 * (i + 1), 100 * (i + 1) + 1}));
    trace.back().timestamp = 100.0 * i;
    trace.back().output_length = i == 0 ? 10 : 1;
  }
  testing::HintRecordingPolicy policy;
  Replay(trace, 100, policy, ReplayOptions{.decode_ms_per_token = 50});
  const auto& hints = policy.hints();
  ASSERT_EQ(hints.size(), 7u);  // the last request's hint is never due
  // Request 1's hint (due at 150 ms) lands before request 2 (200 ms)...
  EXPECT_EQ(Number(hints[0].block), 201u);
  EXPECT_EQ(hints[0].roots_before, 2);
  // ...and request 0's (due at 500 ms) with request 4's, before request 5.
  auto first = std::find_if(hints.begin(), hints.end(),
                            [](const auto& h) { return Number(h.block) == 101; });
  ASSERT_NE(first, hints.end());
  EXPECT_EQ(first->output_tokens, 10u);
  EXPECT_EQ(first->roots_before, 5);
  testing::HintRecordingPolicy silent;
  Replay(trace, 100, silent, ReplayOptions{.decode_ms_per_token = -1});
  EXPECT_TRUE(silent.hints().empty());
}

}  // namespace
}  // namespace kvstrata::cachenode
