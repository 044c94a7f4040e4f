// Index, LRU policy and the DRAM tier that combines them with the allocator.
#include "kvstrata/cachenode/dram_tier.h"

#include <gtest/gtest.h>

#include <thread>

#include "kvstrata/cachenode/block_index.h"
#include "kvstrata/cachenode/eviction_policy.h"
#include "hint_recording_policy.h"

namespace kvstrata::cachenode {
namespace {

BlockId Id(uint64_t ns, uint8_t n) {
  BlockId id{ns, {}};
  id.key.bytes[0] = n;
  id.key.bytes[15] = n * 7;
  return id;
}

TEST(LruPolicyTest, EvictsLeastRecentlyUsed) {
  auto lru = MakeLruPolicy();
  EXPECT_FALSE(lru->Victim().has_value());
  for (uint8_t i = 0; i < 4; ++i) lru->OnInsert(Id(1, i));
  EXPECT_EQ(lru->Victim(), Id(1, 0));
  lru->OnHit(Id(1, 0));
  EXPECT_EQ(lru->Victim(), Id(1, 1));
  lru->OnErase(Id(1, 1));
  EXPECT_EQ(lru->Victim(), Id(1, 2));
  lru->OnErase(Id(1, 99));  // unknown ids are ignored
  lru->OnHit(Id(1, 99));
  EXPECT_EQ(lru->size(), 3u);
  lru->OnInsert(Id(1, 2));  // re-insert refreshes
  EXPECT_EQ(lru->Victim(), Id(1, 3));
  EXPECT_FALSE(MakeEvictionPolicy("nope").ok());
}

TEST(BlockIndexTest, InsertFindEraseAcrossNamespaces) {
  BlockIndex index;
  auto block = std::make_shared<StoredBlock>(nullptr, 10, nullptr);
  EXPECT_TRUE(index.Insert(Id(1, 1), block));
  EXPECT_FALSE(index.Insert(Id(1, 1), block));  // no overwrite
  EXPECT_EQ(index.Find(Id(1, 1)), block);
  EXPECT_EQ(index.Find(Id(2, 1)), nullptr);  // same key, other namespace
  EXPECT_EQ(index.size(), 1u);
  EXPECT_EQ(index.Erase(Id(1, 1)), block);
  EXPECT_EQ(index.Erase(Id(1, 1)), nullptr);
  EXPECT_EQ(index.size(), 0u);
}

TEST(BlockIndexTest, ConcurrentInsertsLoseNothing) {
  BlockIndex index;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&index, t] {
      for (int i = 0; i < 2000; ++i) {
        BlockId id{static_cast<uint64_t>(t), {}};
        std::memcpy(id.key.bytes.data(), &i, sizeof(i));
        index.Insert(id, std::make_shared<StoredBlock>(nullptr, 1, nullptr));
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(index.size(), 8000u);
}

class DramTierTest : public ::testing::Test {
 protected:
  static constexpr uint64_t kSlab = 64 * 1024;
  DramTierTest() : arena_(4 * kSlab), tier_(arena_.data(), arena_.size(), kSlab, MakeLruPolicy()) {}

  std::shared_ptr<StoredBlock> Store(const BlockId& id, uint64_t size, uint8_t fill) {
    auto block = tier_.Reserve(size);
    EXPECT_TRUE(block.ok()) << block.status();
    std::memset((*block)->data(), fill, size);
    EXPECT_TRUE(tier_.Commit(id, *block));
    return *block;
  }

  std::vector<uint8_t> arena_;
  DramTier tier_;
};

TEST_F(DramTierTest, FullTierEvictsLeastRecentlyUsedAndKeepsAccepting) {
  constexpr uint64_t kBlock = 32 * 1024;  // 2 per slab, 8 in the arena
  for (uint8_t i = 0; i < 8; ++i) Store(Id(1, i), kBlock, i);
  EXPECT_EQ(tier_.counters().blocks, 8u);
  EXPECT_EQ(tier_.counters().evictions, 0u);
  ASSERT_NE(tier_.Find(Id(1, 0), /*hit=*/true), nullptr);  // 0 is now most recent
  Store(Id(1, 8), kBlock, 8);
  EXPECT_EQ(tier_.counters().evictions, 1u);
  EXPECT_EQ(tier_.Find(Id(1, 1), false), nullptr);  // the LRU one went
  EXPECT_NE(tier_.Find(Id(1, 0), false), nullptr);
  for (uint8_t i = 9; i < 40; ++i) Store(Id(1, i), kBlock, i);
  EXPECT_EQ(tier_.counters().blocks, 8u);
  // Survivors still hold their own bytes (no chunk was handed out twice).
  for (uint8_t i = 32; i < 40; ++i) {
    auto block = tier_.Find(Id(1, i), false);
    ASSERT_NE(block, nullptr);
    EXPECT_EQ(block->data()[0], i);
    EXPECT_EQ(block->data()[kBlock - 1], i);
  }
}

TEST_F(DramTierTest, PinnedBlocksAreNotReusedUntilReleased) {
  constexpr uint64_t kBlock = kSlab;  // one per slab
  auto pinned = Store(Id(1, 0), kBlock, 0xAA);
  for (uint8_t i = 1; i < 12; ++i) Store(Id(1, i), kBlock, i);
  EXPECT_EQ(tier_.Find(Id(1, 0), false), nullptr);  // evicted from the index...
  EXPECT_EQ(pinned->data()[0], 0xAA);               // ...but its bytes are intact while pinned
  EXPECT_EQ(pinned->data()[kBlock - 1], 0xAA);
  EXPECT_EQ(tier_.counters().used_bytes, 4 * kSlab);
}

TEST_F(DramTierTest, PrefixLengthStopsAtFirstGap) {
  std::vector<BlockKey> keys;
  for (uint8_t i = 0; i < 6; ++i) {
    Store(Id(7, i), 4096, i);
    keys.push_back(Id(7, i).key);
  }
  EXPECT_EQ(tier_.PrefixLength(7, keys), 6u);
  EXPECT_EQ(tier_.PrefixLength(8, keys), 0u);  // other namespace
  EXPECT_TRUE(tier_.Erase(Id(7, 3)));
  EXPECT_FALSE(tier_.Erase(Id(7, 3)));
  EXPECT_EQ(tier_.PrefixLength(7, keys), 3u);
}

TEST_F(DramTierTest, ReserveRejectsOversizeAndReportsFullWhenNothingEvictable) {
  EXPECT_EQ(tier_.Reserve(kSlab + 1).status().code(), absl::StatusCode::kInvalidArgument);
  std::vector<std::shared_ptr<StoredBlock>> uncommitted;
  for (int i = 0; i < 4; ++i) uncommitted.push_back(*tier_.Reserve(kSlab));
  EXPECT_EQ(tier_.Reserve(kSlab).status().code(), absl::StatusCode::kResourceExhausted);
  uncommitted.clear();  // dropping reservations frees their memory
  EXPECT_TRUE(tier_.Reserve(kSlab).ok());
}

TEST_F(DramTierTest, DuplicateCommitIsRefused) {
  Store(Id(1, 1), 4096, 1);
  auto again = tier_.Reserve(4096);
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(tier_.Commit(Id(1, 1), *again));
  EXPECT_EQ(tier_.counters().blocks, 1u);
}

TEST(DramTierHintTest, RequestFinishedReachesThePolicyAndSaysWhetherTheBlockIsStored) {
  auto policy = std::make_unique<testing::HintRecordingPolicy>();
  const testing::HintRecordingPolicy& recorder = *policy;  // owned by the tier below
  std::vector<uint8_t> arena(64 * 1024);
  DramTier tier(arena.data(), arena.size(), arena.size(), std::move(policy));
  auto block = tier.Reserve(4096);
  ASSERT_TRUE(block.ok());
  ASSERT_TRUE(tier.Commit(Id(1, 1), *block));
  EXPECT_TRUE(tier.RequestFinished(Id(1, 1), 42));
  EXPECT_FALSE(tier.RequestFinished(Id(1, 2), 7));  // unknown: still the policy's to ignore
  const auto& hints = recorder.hints();
  ASSERT_EQ(hints.size(), 2u);
  EXPECT_EQ(hints[0].block, Id(1, 1));
  EXPECT_EQ(hints[0].output_tokens, 42u);
  EXPECT_EQ(hints[1].block, Id(1, 2));
  EXPECT_EQ(hints[1].output_tokens, 7u);
  EXPECT_EQ(tier.counters().blocks, 1u);  // a hint stores and removes nothing
}

}  // namespace
}  // namespace kvstrata::cachenode
