#include "kvstrata/cachenode/slab_allocator.h"

#include <gtest/gtest.h>

#include <random>
#include <set>

namespace kvstrata::cachenode {
namespace {

constexpr uint64_t kSlab = 1 << 20;

TEST(SlabAllocatorTest, ChunksAreDistinctAlignedAndWithinTheArena) {
  SlabAllocator allocator(4 * kSlab, kSlab);
  std::set<uint64_t> offsets;
  const uint64_t chunk = allocator.ChunkSize(100000);
  EXPECT_GE(chunk, 100000u);
  EXPECT_LE(chunk, 100000u * 9 / 8 + 4096);  // at most 12.5% (plus a page) wasted
  EXPECT_EQ(chunk % 4096, 0u);
  while (auto offset = allocator.Allocate(100000)) {
    EXPECT_EQ(*offset % 4096, 0u);
    EXPECT_LE(*offset + chunk, allocator.capacity());
    EXPECT_TRUE(offsets.insert(*offset).second) << "chunk handed out twice";
  }
  EXPECT_EQ(offsets.size(), 4 * (kSlab / chunk));
  EXPECT_EQ(allocator.used_bytes(), offsets.size() * chunk);
}

TEST(SlabAllocatorTest, EmptySlabsMoveBetweenSizeClasses) {
  SlabAllocator allocator(2 * kSlab, kSlab);
  std::vector<uint64_t> small;
  while (auto offset = allocator.Allocate(4096)) small.push_back(*offset);
  EXPECT_FALSE(allocator.Allocate(kSlab).has_value());  // every slab is taken by 4 KiB chunks
  for (uint64_t offset : small) allocator.Free(offset);
  EXPECT_EQ(allocator.used_bytes(), 0u);
  EXPECT_EQ(allocator.free_slabs(), 2u);
  EXPECT_TRUE(allocator.Allocate(kSlab).has_value());
  EXPECT_TRUE(allocator.Allocate(kSlab).has_value());
  EXPECT_FALSE(allocator.Allocate(1).has_value());
}

TEST(SlabAllocatorTest, PowersOfTwoFitExactly) {
  SlabAllocator allocator(4 * kSlab, kSlab);
  for (uint64_t size = 4096; size <= kSlab; size *= 2) EXPECT_EQ(allocator.ChunkSize(size), size);
  EXPECT_EQ(allocator.ChunkSize(1), 4096u);
  EXPECT_EQ(allocator.ChunkSize(4097), 8192u);
}

TEST(SlabAllocatorTest, RejectsImpossibleSizes) {
  SlabAllocator allocator(kSlab, kSlab);
  EXPECT_FALSE(allocator.Allocate(0).has_value());
  EXPECT_FALSE(allocator.Allocate(kSlab + 1).has_value());
}

TEST(SlabAllocatorTest, RandomAllocFreeKeepsAccounting) {
  SlabAllocator allocator(8 * kSlab, kSlab);
  std::mt19937 rng(1);
  std::vector<std::pair<uint64_t, uint64_t>> live;  // offset, chunk size
  std::set<uint64_t> starts;
  for (int i = 0; i < 20000; ++i) {
    if (!live.empty() && rng() % 2 == 0) {
      size_t pick = rng() % live.size();
      allocator.Free(live[pick].first);
      starts.erase(live[pick].first);
      live[pick] = live.back();
      live.pop_back();
    } else {
      const uint64_t size = 1 + rng() % (kSlab / 2);
      if (auto offset = allocator.Allocate(size)) {
        ASSERT_TRUE(starts.insert(*offset).second);
        live.push_back({*offset, allocator.ChunkSize(size)});
      }
    }
    uint64_t used = 0;
    for (auto& [offset, chunk] : live) used += chunk;
    ASSERT_EQ(allocator.used_bytes(), used);
  }
  // No two live chunks overlap.
  std::vector<std::pair<uint64_t, uint64_t>> sorted(live.begin(), live.end());
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 1; i < sorted.size(); ++i) {
    EXPECT_LE(sorted[i - 1].first + sorted[i - 1].second, sorted[i].first);
  }
}

}  // namespace
}  // namespace kvstrata::cachenode

namespace kvstrata::cachenode {
namespace {

TEST(SlabAllocatorDrainTest, ADrainingSlabIsNotRefilledAndReturnsToThePoolWhenEmpty) {
  constexpr uint64_t kSlabBytes = 16 * 4096;
  SlabAllocator allocator(8 * kSlabBytes, kSlabBytes);
  std::vector<uint64_t> chunks;
  while (auto offset = allocator.Allocate(4096)) chunks.push_back(*offset);
  ASSERT_EQ(chunks.size(), 128u);
  EXPECT_FALSE(allocator.draining());
  ASSERT_TRUE(allocator.DrainSlabOf(chunks[0]));
  EXPECT_FALSE(allocator.DrainSlabOf(chunks[0])) << "draining already";
  EXPECT_TRUE(allocator.draining());
  // Chunks freed in the draining slab are not handed out again...
  for (size_t i = 0; i < 15; ++i) allocator.Free(chunks[i]);
  EXPECT_FALSE(allocator.Allocate(4096).has_value());
  // ...and its last one frees the whole slab, for any class.
  allocator.Free(chunks[15]);
  EXPECT_FALSE(allocator.draining());
  EXPECT_EQ(allocator.free_slabs(), 1u);
  EXPECT_TRUE(allocator.Allocate(3 * 4096).has_value());
}

TEST(SlabAllocatorDrainTest, StoppingADrainServesItsFreeChunksAgain) {
  constexpr uint64_t kSlabBytes = 16 * 4096;
  SlabAllocator allocator(16 * kSlabBytes, kSlabBytes);
  std::vector<uint64_t> chunks;
  while (auto offset = allocator.Allocate(4096)) chunks.push_back(*offset);
  ASSERT_TRUE(allocator.DrainSlabOf(chunks[0]));
  ASSERT_TRUE(allocator.DrainSlabOf(chunks[16]));
  EXPECT_FALSE(allocator.DrainSlabOf(chunks[32])) << "at most kMaxDraining at once";
  allocator.Free(chunks[0]);
  EXPECT_FALSE(allocator.Allocate(4096).has_value());
  allocator.StopDraining();  // the first one
  EXPECT_EQ(allocator.Allocate(4096), chunks[0]);
  EXPECT_TRUE(allocator.draining());  // the second still drains
}

TEST(SlabAllocatorDrainTest, ASmallArenaNeverDrains) {
  constexpr uint64_t kSlabBytes = 16 * 4096;
  SlabAllocator allocator(7 * kSlabBytes, kSlabBytes);
  auto offset = allocator.Allocate(4096);
  ASSERT_TRUE(offset.has_value());
  EXPECT_FALSE(allocator.DrainSlabOf(*offset)) << "one slab in eight at most";
}

}  // namespace
}  // namespace kvstrata::cachenode
