#include "kvstrata/cachenode/slab_allocator.h"

#include <gtest/gtest.h>

#include <iterator>
#include <map>
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

// Pieces: encoded blocks packed into raw-sized chunks (precision tiers).
constexpr uint64_t kRaw = 128 << 10;

TEST(SlabAllocatorPieceTest, PiecesShareAHostChunkAndItReturnsWhenTheLastIsFreed) {
  SlabAllocator allocator(kSlab, kSlab);  // eight 128 KiB chunks
  std::vector<uint64_t> raw;
  for (int i = 0; i < 7; ++i) raw.push_back(*allocator.Allocate(kRaw));
  // One raw chunk left: an fp8 copy of a 128 KiB block (65728 bytes, 68 KiB
  // of pieces) and an int4 one (45120 bytes, 48 KiB) go into it, a second
  // int4 does not fit.
  std::optional<uint64_t> fp8 = allocator.AllocatePiece(65728, kRaw);
  ASSERT_TRUE(fp8.has_value());
  EXPECT_FALSE(allocator.Allocate(kRaw).has_value()) << "the host chunk is taken";
  std::optional<uint64_t> int4 = allocator.AllocatePiece(45120, /*host_size=*/0);
  ASSERT_TRUE(int4.has_value()) << "the fp8 piece's host has a 60 KiB hole";
  EXPECT_EQ(*fp8 / kRaw, *int4 / kRaw) << "same host";
  EXPECT_NE(*fp8, *int4);
  EXPECT_EQ(*fp8 % 4096, 0u);
  EXPECT_EQ(*int4 % 4096, 0u);
  EXPECT_GE(*int4, *fp8 + (68 << 10)) << "after the fp8 piece, no overlap";
  EXPECT_FALSE(allocator.AllocatePiece(45120, kRaw).has_value()) << "no hole, no free chunk";
  EXPECT_EQ(allocator.piece_bytes(), uint64_t{116} << 10);
  EXPECT_EQ(allocator.used_bytes(), 8 * kRaw) << "a host counts whole";
  allocator.Free(*fp8);
  EXPECT_FALSE(allocator.Allocate(kRaw).has_value()) << "the int4 piece still holds the host";
  std::optional<uint64_t> again = allocator.AllocatePiece(60 << 10, 0);
  ASSERT_TRUE(again.has_value()) << "the freed hole is reused";
  allocator.Free(*again);
  allocator.Free(*int4);
  EXPECT_EQ(allocator.piece_bytes(), 0u);
  std::optional<uint64_t> back = allocator.Allocate(kRaw);
  ASSERT_TRUE(back.has_value()) << "the empty host returned to its slab";
  for (uint64_t offset : raw) allocator.Free(offset);
  allocator.Free(*back);
  EXPECT_EQ(allocator.used_bytes(), 0u);
  EXPECT_EQ(allocator.free_slabs(), 1u);
}

TEST(SlabAllocatorPieceTest, ShrinkInPlaceKeepsTheOffsetAndFreesTheRest) {
  SlabAllocator allocator(kSlab, kSlab);  // eight 128 KiB chunks
  std::vector<uint64_t> raw;
  for (int i = 0; i < 8; ++i) raw.push_back(*allocator.Allocate(kRaw));
  EXPECT_FALSE(allocator.AllocatePiece(45120, 0).has_value()) << "full, no holes";
  // A raw chunk shrunk to an fp8 block's 65728 bytes (68 KiB): its tail is a
  // 60 KiB hole, the chunk stays allocated (a host counts whole).
  allocator.ShrinkInPlace(raw[3], 65728);
  EXPECT_EQ(allocator.used_bytes(), 8 * kRaw);
  EXPECT_EQ(allocator.piece_bytes(), uint64_t{68} << 10);
  std::optional<uint64_t> int4 = allocator.AllocatePiece(45120, 0);
  ASSERT_TRUE(int4.has_value()) << "the tail is a hole";
  EXPECT_EQ(*int4, raw[3] + (68 << 10));
  // A piece shrunk in place (fp8 -> int4): the same offset, a larger hole.
  allocator.ShrinkInPlace(raw[3], 45120);
  EXPECT_EQ(allocator.piece_bytes(), uint64_t{96} << 10);
  std::optional<uint64_t> small = allocator.AllocatePiece(20 << 10, 0);
  ASSERT_TRUE(small.has_value()) << "the freed 20 KiB between the two pieces";
  EXPECT_EQ(*small, raw[3] + (48 << 10));
  // A size that rounds to the whole chunk changes nothing.
  allocator.ShrinkInPlace(raw[5], kRaw - 100);
  EXPECT_EQ(allocator.piece_bytes(), uint64_t{116} << 10);
  allocator.Free(raw[3]);
  allocator.Free(*int4);
  allocator.Free(*small);
  EXPECT_EQ(allocator.piece_bytes(), 0u);
  for (int i = 0; i < 8; ++i) {
    if (i != 3) allocator.Free(raw[i]);
  }
  EXPECT_EQ(allocator.used_bytes(), 0u);
  EXPECT_EQ(allocator.free_slabs(), 1u);
}

TEST(SlabAllocatorPieceTest, APieceAsLargeAsItsHostIsRefused) {
  SlabAllocator allocator(kSlab, kSlab);
  EXPECT_FALSE(allocator.AllocatePiece(kRaw, kRaw).has_value());
  EXPECT_FALSE(allocator.AllocatePiece(0, kRaw).has_value());
  EXPECT_FALSE(allocator.AllocatePiece(4096, 0).has_value()) << "holes only, and none";
  EXPECT_EQ(allocator.used_bytes(), 0u);
}

TEST(SlabAllocatorPieceTest, RandomPiecesAndChunksNeverOverlapAndAccountingReturnsToZero) {
  SlabAllocator allocator(4 * kSlab, kSlab);
  std::mt19937 rng(7);
  std::map<uint64_t, uint64_t> live;  // offset -> footprint
  auto overlaps = [&](uint64_t at, uint64_t size) {
    auto next = live.lower_bound(at);
    if (next != live.end() && next->first < at + size) return true;
    if (next != live.begin() && std::prev(next)->first + std::prev(next)->second > at) return true;
    return false;
  };
  for (int i = 0; i < 20000; ++i) {
    if (!live.empty() && rng() % 5 == 0) {
      // Shrink one in place (a block encoded over itself): the rest of its
      // footprint must become reusable, the part kept must stay its own.
      auto it = live.begin();
      std::advance(it, rng() % live.size());
      const uint64_t size = 1 + rng() % it->second;
      allocator.ShrinkInPlace(it->first, size);
      it->second = (size + 4095) / 4096 * 4096;
      continue;
    }
    if (!live.empty() && rng() % 2 == 0) {
      auto it = live.begin();
      std::advance(it, rng() % live.size());
      allocator.Free(it->first);
      live.erase(it);
      continue;
    }
    std::optional<uint64_t> at;
    uint64_t footprint;
    if (rng() % 3 == 0) {
      at = allocator.Allocate(kRaw);
      footprint = kRaw;
    } else {
      const uint64_t size = 1 + rng() % (kRaw - 4096);
      at = allocator.AllocatePiece(size, kRaw);
      footprint = (size + 4095) / 4096 * 4096;
    }
    if (!at.has_value()) continue;
    ASSERT_EQ(*at % 4096, 0u);
    ASSERT_LE(*at + footprint, allocator.capacity());
    ASSERT_FALSE(overlaps(*at, footprint)) << "at " << *at;
    live[*at] = footprint;
  }
  for (const auto& [offset, footprint] : live) allocator.Free(offset);
  EXPECT_EQ(allocator.used_bytes(), 0u);
  EXPECT_EQ(allocator.piece_bytes(), 0u);
  EXPECT_EQ(allocator.free_slabs(), 4u);
}

}  // namespace
}  // namespace kvstrata::cachenode
