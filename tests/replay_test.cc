#include "kvstrata/cachenode/replay.h"

#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <random>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"

namespace kvstrata::cachenode {
namespace {

TraceRequest Request(std::vector<uint64_t> ids) {
  TraceRequest r;
  r.input_length = ids.size() * kTraceTokensPerBlock;
  r.hash_ids = std::move(ids);
  return r;
}

TEST(ReplayTest, SmallTraceGivesKnownNumbers) {
  const std::vector<TraceRequest> trace = {Request({1, 2, 3}), Request({1, 2, 4}), Request({5}),
                                           Request({2, 4})};
  auto lru = MakeLruPolicy();
  const ReplayResult r = Replay(trace, 3, *lru);
  // r2 reuses 1,2 (evicts 3 for 4); r3 misses (evicts 1); r4 reuses 2,4.
  EXPECT_EQ(r.prefix_hit_blocks, 4u);
  EXPECT_EQ(r.total_blocks, 9u);
  EXPECT_EQ(r.hit_tokens, 4 * kTraceTokensPerBlock);
  EXPECT_EQ(r.total_tokens, 9 * kTraceTokensPerBlock);
  EXPECT_EQ(r.access_hits, 4u);
  EXPECT_LE(lru->size(), 3u);
  const ReplayResult b = ReplayBelady(trace, 3);
  EXPECT_GE(b.prefix_hit_blocks, r.prefix_hit_blocks);
  EXPECT_EQ(b.prefix_hit_blocks, 4u);
}

TEST(ReplayTest, DeterministicAndWithinCapacity) {
  std::mt19937 rng(3);
  std::vector<TraceRequest> trace;
  for (int i = 0; i < 300; ++i) {
    std::vector<uint64_t> ids;
    const uint64_t root = rng() % 20;
    for (int d = 0, n = 1 + rng() % 6; d < n; ++d) ids.push_back(root * 100 + d);
    trace.push_back(Request(ids));
  }
  auto first = MakeLruPolicy();
  auto second = MakeLruPolicy();
  const ReplayResult a = Replay(trace, 16, *first);
  const ReplayResult b = Replay(trace, 16, *second);
  EXPECT_EQ(a.hit_tokens, b.hit_tokens);
  EXPECT_EQ(a.access_hits, b.access_hits);
  EXPECT_LE(first->size(), 16u);
  const ReplayResult belady = ReplayBelady(trace, 16);
  EXPECT_GE(belady.access_hits, a.access_hits);
}

// The most access hits any eviction schedule can get, by trying them all.
uint64_t BruteForceHits(const std::vector<uint64_t>& sequence, size_t k, std::vector<uint64_t> cached,
                        size_t capacity) {
  if (k == sequence.size()) return 0;
  const uint64_t id = sequence[k];
  if (std::find(cached.begin(), cached.end(), id) != cached.end()) {
    return 1 + BruteForceHits(sequence, k + 1, cached, capacity);
  }
  uint64_t best = BruteForceHits(sequence, k + 1, cached, capacity);  // do not cache it
  if (cached.size() < capacity) {
    auto with = cached;
    with.push_back(id);
    return std::max(best, BruteForceHits(sequence, k + 1, with, capacity));
  }
  for (size_t victim = 0; victim < cached.size(); ++victim) {
    auto with = cached;
    with[victim] = id;
    best = std::max(best, BruteForceHits(sequence, k + 1, with, capacity));
  }
  return best;
}

TEST(ReplayTest, BeladyMatchesBruteForceOnTinyTraces) {
  std::mt19937 rng(11);
  for (int round = 0; round < 200; ++round) {
    std::vector<TraceRequest> trace;
    std::vector<uint64_t> sequence;
    for (int i = 0, n = 2 + rng() % 4; i < n; ++i) {
      std::vector<uint64_t> ids;
      for (int j = 0, m = 1 + rng() % 3; j < m; ++j) ids.push_back(rng() % 5);
      sequence.insert(sequence.end(), ids.begin(), ids.end());
      trace.push_back(Request(ids));
    }
    const size_t capacity = 1 + rng() % 3;
    EXPECT_EQ(ReplayBelady(trace, capacity).access_hits, BruteForceHits(sequence, 0, {}, capacity))
        << "round " << round;
  }
}

TEST(ReplayTest, LoadsMooncakeLines) {
  const std::string path = ::testing::TempDir() + "/trace.jsonl";
  {
    std::ofstream out(path);
    out << R"({"timestamp": 0, "input_length": 1500, "output_length": 6, "hash_ids": [0, 1, 2]})" << "\n";
    out << R"({"timestamp": 27, "input_length": 700, "output_length": 4, "hash_ids": [0, 3]})" << "\n";
  }
  auto trace = LoadMooncakeTrace(path);
  ASSERT_TRUE(trace.ok()) << trace.status();
  ASSERT_EQ(trace->size(), 2u);
  EXPECT_EQ((*trace)[0].hash_ids, (std::vector<uint64_t>{0, 1, 2}));
  EXPECT_EQ((*trace)[1].input_length, 700u);
  EXPECT_EQ((*trace)[1].timestamp, 27);
  EXPECT_EQ(DistinctBlocks(*trace), 4u);
  {
    std::ofstream out(path);
    out << "{\"timestamp\": 0, \"hash_ids\": [1]}\n";  // no input_length
  }
  EXPECT_FALSE(LoadMooncakeTrace(path).ok());
  EXPECT_FALSE(LoadMooncakeTrace(path + ".missing").ok());
}

// Found by tests/fuzz/trace_fuzzer.cc: a line that ends right after a key's
// colon made the parser read one byte past the line.
TEST(ReplayTest, RejectsLineEndingAfterAColon) {
  const std::string line = R"({"input_length": 512, "hash_ids": [1], "timestamp":)";
  // Exactly the line's bytes, so a read past them is a read past the buffer.
  std::unique_ptr<char[]> exact(new char[line.size()]);
  std::memcpy(exact.get(), line.data(), line.size());
  EXPECT_FALSE(ParseMooncakeRequest(std::string_view(exact.get(), line.size())).ok());
  auto request = ParseMooncakeRequest(
      R"({"timestamp": 1.5, "input_length": 512, "output_length": 7, "hash_ids": [4, 2]})");
  ASSERT_TRUE(request.ok()) << request.status();
  EXPECT_EQ(request->hash_ids, (std::vector<uint64_t>{4, 2}));
  EXPECT_EQ(request->output_length, 7u);
}

}  // namespace
}  // namespace kvstrata::cachenode

namespace kvstrata::cachenode {
namespace {

BlockId Node(uint64_t n) { return NumberedBlockId(n); }

TEST(PrefixLruTest, NeverEvictsABlockWithCachedChildren) {
  auto policy = MakePrefixLruPolicy();
  std::mt19937 rng(5);
  absl::flat_hash_set<uint64_t> cached;
  absl::flat_hash_map<uint64_t, uint64_t> parent_of;
  constexpr size_t kCapacity = 40;
  for (int round = 0; round < 3000; ++round) {
    // A chain of up to 8 blocks under one of 30 roots (ids: root * 100 + depth).
    const uint64_t root = rng() % 30;
    const int depth = 1 + rng() % 8;
    for (int d = 0; d < depth; ++d) {
      const uint64_t id = root * 100 + d;
      if (cached.contains(id)) {
        policy->OnHit(Node(id));
        continue;
      }
      while (cached.size() >= kCapacity) {
        auto victim = policy->Victim();
        ASSERT_TRUE(victim.has_value());
        uint64_t v;
        std::memcpy(&v, victim->key.bytes.data(), sizeof(v));
        for (uint64_t other : cached) {
          ASSERT_FALSE(parent_of.contains(other) && parent_of[other] == v && other != v)
              << "evicted " << v << " while its child " << other << " is cached";
        }
        cached.erase(v);
        policy->OnErase(*victim);
      }
      std::optional<BlockId> parent;
      if (d > 0) {
        parent = Node(id - 1);
        parent_of[id] = id - 1;
      }
      cached.insert(id);
      policy->OnInsert(Node(id), parent);
      ASSERT_LE(policy->size(), kCapacity);
    }
  }
  // A cached block's prefix is cached (chains were inserted head first).
  for (uint64_t id : cached) {
    if (parent_of.contains(id)) {
      EXPECT_TRUE(cached.contains(parent_of[id])) << id;
    }
  }
}

TEST(PrefixLruTest, EvictsChainsFromTheTail) {
  auto policy = MakePrefixLruPolicy();
  for (uint64_t d = 0; d < 4; ++d) {
    policy->OnInsert(Node(d), d ? std::optional<BlockId>(Node(d - 1)) : std::nullopt);
  }
  policy->OnInsert(Node(100));  // a newer, separate block
  for (uint64_t expected : {3, 2, 1, 0, 100}) {
    auto victim = policy->Victim();
    ASSERT_TRUE(victim.has_value());
    EXPECT_EQ(*victim, Node(expected));
    policy->OnErase(*victim);
  }
  EXPECT_FALSE(policy->Victim().has_value());
  EXPECT_TRUE(MakeEvictionPolicy("prefix-lru").ok());
}

}  // namespace
}  // namespace kvstrata::cachenode
