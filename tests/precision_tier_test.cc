// The DRAM tier with precision tiers on: the real PrecisionTranscoder reading
// budgets from a real NamespaceRegistry, the kernels' CPU path, LRU. What a
// transcode must keep: the checksum and header of the stored bytes, the
// parent link, the bytes a reader pinned before it, and namespaces without a
// budget untouched.
#include <gtest/gtest.h>

#include <cstring>
#include <deque>
#include <map>
#include <random>
#include <vector>

#include "kvstrata/cachenode/dram_tier.h"
#include "kvstrata/cachenode/eviction_policy.h"
#include "kvstrata/cachenode/namespace_registry.h"
#include "kvstrata/common/block_key.h"
#include "kvstrata/kernels/quant.h"
#include "precision_transcoder.h"

namespace kvstrata::cachenode {
namespace {

constexpr uint32_t kTokens = 16, kHeads = 8, kHeadDim = 128;
constexpr uint64_t kRaw = uint64_t{1} * 2 * kTokens * kHeads * kHeadDim * 2;  // 64 KiB
constexpr uint64_t kSlab = 256 << 10;
constexpr uint64_t kArena = 16 * kSlab;  // 64 raw blocks

v1::NamespaceSpec Spec(const std::string& model, v1::StoredFormat coarsest) {
  v1::NamespaceSpec spec;
  spec.set_model(model);
  spec.set_dtype(v1::DTYPE_FP16);
  spec.set_num_layers(1);
  spec.set_num_kv_heads(kHeads);
  spec.set_head_dim(kHeadDim);
  spec.set_tokens_per_block(kTokens);
  spec.set_coarsest_format(coarsest);
  return spec;
}

kernels::QuantParams Params(kernels::Format f) {
  return {f, kernels::DType::kFp16, {1, kTokens, kHeads, kHeadDim}, 32};
}

class PrecisionTierTest : public ::testing::Test {
 protected:
  PrecisionTierTest()
      : arena_(kArena), registry_(kSlab), transcoder_(registry_),
        tier_(arena_.data(), kArena, kSlab, MakeLruPolicy()) {
    tier_.set_transcoder(&transcoder_);
    tier_.set_eviction_hook([this](const BlockId& id, std::shared_ptr<StoredBlock>) { evicted_.push_back(id); });
  }

  uint64_t Open(v1::StoredFormat coarsest) {
    auto info = registry_.Open(Spec(model_ + std::to_string(coarsest), coarsest));
    EXPECT_TRUE(info.ok()) << info.status();
    return info.ok() ? info->id : 0;
  }

  std::vector<uint8_t> Kv(uint64_t seed) {
    std::vector<uint8_t> kv(kRaw);
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> n(0.0f, 1.0f);
    for (size_t i = 0; i < kRaw / 2; ++i) {
      _Float16 h = static_cast<_Float16>(n(rng));
      std::memcpy(kv.data() + 2 * i, &h, 2);
    }
    return kv;
  }

  BlockId Put(uint64_t ns, uint64_t n) {
    const BlockId id = NumberedBlockId(n, ns);
    auto block = tier_.Reserve(kRaw);
    EXPECT_TRUE(block.ok()) << block.status();
    const std::vector<uint8_t> kv = Kv(n);
    std::memcpy((*block)->data(), kv.data(), kRaw);
    (*block)->checksum = BlockChecksum(kv.data(), kRaw);
    if (n > 0) {
      (*block)->parent = NumberedBlockId(n - 1, ns).key;
      (*block)->has_parent = true;
    }
    EXPECT_TRUE(tier_.Commit(id, *block));
    return id;
  }

  const std::string model_ = "m";
  std::vector<uint8_t> arena_;
  NamespaceRegistry registry_;
  PrecisionTranscoder transcoder_;
  DramTier tier_;
  std::vector<BlockId> evicted_;
};

TEST_F(PrecisionTierTest, VictimsAreTranscodedWithRightChecksumHeaderAndParent) {
  const uint64_t ns = Open(v1::FORMAT_INT4_KIVI);
  std::shared_ptr<StoredBlock> pinned;  // a reader's pin on block 60, raw
  std::vector<uint8_t> pinned_bytes;
  for (uint64_t n = 0; n < 200; ++n) {
    Put(ns, n);
    if (n == 60) {
      pinned = tier_.Find(NumberedBlockId(60, ns), /*hit=*/false);
      pinned_bytes.assign(pinned->data(), pinned->data() + kRaw);
    }
  }
  const TierCounters c = tier_.counters();
  EXPECT_GT(c.transcodes, 0u);
  EXPECT_GT(c.blocks, kArena / kRaw) << "more blocks than fit raw";
  EXPECT_EQ(c.format_blocks[0] + c.format_blocks[1] + c.format_blocks[3], c.blocks);
  EXPECT_EQ(c.format_blocks[4], 0u) << "below the budget";
  EXPECT_EQ(c.format_bytes[0] + c.format_bytes[1] + c.format_bytes[3], c.stored_bytes);
  size_t coarse = 0;
  for (uint64_t n = 0; n < 200; ++n) {
    std::shared_ptr<StoredBlock> b = tier_.Find(NumberedBlockId(n, ns), /*hit=*/false);
    if (b == nullptr || b->format == 0) continue;
    ++coarse;
    ASSERT_TRUE(b->format == v1::FORMAT_FP8_E4M3 || b->format == v1::FORMAT_INT4_KIVI);
    EXPECT_EQ(b->checksum, BlockChecksum(b->data(), b->size())) << "re-checksummed";
    kernels::Header h;
    ASSERT_TRUE(kernels::ParseHeader(b->data(), b->size(), &h).ok());
    EXPECT_EQ(static_cast<int>(h.params.format), b->format) << "the header says the same format";
    EXPECT_EQ(h.total_bytes(), b->size());
    EXPECT_TRUE(b->has_parent == (n > 0));
    if (n > 0) {
      EXPECT_EQ(b->parent, NumberedBlockId(n - 1, ns).key);
    }
    // The bytes are the ladder's: fp8 of the original, then int4 of that.
    std::vector<uint8_t> want = Kv(n), enc;
    for (kernels::Format f : {kernels::Format::kFp8E4m3, kernels::Format::kInt4Kivi}) {
      enc.assign(kernels::EncodedBytes(Params(f)), 0);
      ASSERT_TRUE(kernels::Quantize(Params(f), want.data(), kRaw, enc.data(), enc.size()).ok());
      if (static_cast<int>(f) == b->format) break;
      ASSERT_TRUE(kernels::Dequantize(enc.data(), enc.size(), want.data(), kRaw).ok());
    }
    ASSERT_EQ(enc.size(), b->size());
    EXPECT_EQ(std::memcmp(enc.data(), b->data(), enc.size()), 0) << "block " << n;
  }
  EXPECT_GT(coarse, 0u);
  // The reader that pinned block 60 before it moved still holds it whole.
  EXPECT_EQ(pinned->format, 0);
  EXPECT_EQ(std::memcmp(pinned->data(), pinned_bytes.data(), kRaw), 0);
}

// A full tier has no slab for a coarser size class: encoded copies go into
// pieces of raw-sized chunks (SlabAllocator::AllocatePiece), several per
// chunk. A reader's pin on one piece keeps its bytes while the blocks around
// it in the same chunk are transcoded, evicted and their pieces reused.
TEST_F(PrecisionTierTest, EncodedCopiesShareRawChunksAndAPinnedPieceKeepsItsBytes) {
  const uint64_t ns = Open(v1::FORMAT_INT4_KIVI);
  for (uint64_t n = 0; n < 200; ++n) Put(ns, n);
  TierCounters c = tier_.counters();
  EXPECT_EQ(tier_.counters().used_bytes, kArena) << "full";
  // Raw and fp8 and int4 all in raw-class chunks: with one slab class only,
  // well over the 64 blocks raw chunks hold (draining slabs for the coarser
  // classes, before pieces, held fewer).
  EXPECT_GT(c.blocks, kArena / kRaw * 14 / 10) << c.blocks;
  EXPECT_GT(c.format_blocks[v1::FORMAT_FP8_E4M3], 0u);
  EXPECT_GT(c.format_blocks[v1::FORMAT_INT4_KIVI], 0u);
  std::shared_ptr<StoredBlock> pinned;
  uint64_t pinned_n = 0;
  for (uint64_t n = 0; n < 200 && pinned == nullptr; ++n) {
    std::shared_ptr<StoredBlock> b = tier_.Find(NumberedBlockId(n, ns), /*hit=*/false);
    if (b != nullptr && b->format == v1::FORMAT_INT4_KIVI) pinned = b, pinned_n = n;
  }
  ASSERT_NE(pinned, nullptr);
  const std::vector<uint8_t> bytes(pinned->data(), pinned->data() + pinned->size());
  for (uint64_t n = 200; n < 600; ++n) Put(ns, n);  // everything before 200 moves or goes
  EXPECT_EQ(tier_.Find(NumberedBlockId(pinned_n, ns), /*hit=*/false), nullptr) << "evicted";
  EXPECT_EQ(pinned->checksum, BlockChecksum(pinned->data(), pinned->size()));
  EXPECT_EQ(std::memcmp(pinned->data(), bytes.data(), bytes.size()), 0)
      << "a piece was handed out again while a reader held it";
  pinned.reset();
  for (uint64_t n = 600; n < 700; ++n) Put(ns, n);  // its host is usable again
  c = tier_.counters();
  EXPECT_LE(c.used_bytes, kArena);
  EXPECT_GT(c.blocks, kArena / kRaw * 14 / 10) << c.blocks;
  // Every stored block reads back with its checksum.
  size_t checked = 0;
  for (uint64_t n = 0; n < 700; ++n) {
    std::shared_ptr<StoredBlock> b = tier_.Find(NumberedBlockId(n, ns), /*hit=*/false);
    if (b == nullptr) continue;
    ++checked;
    EXPECT_EQ(b->checksum, BlockChecksum(b->data(), b->size())) << "block " << n;
  }
  EXPECT_EQ(checked, c.blocks);
}

// With an NVMe tier an evicted block's memory stays taken until the
// write-behind queue has written it, so evicting a raw victim frees nothing
// at once and the next victim finds no memory for its coarser copy. It is
// then encoded over itself. Deterministic (one thread, LRU): before that,
// 66 of 218 evictions here were raw and 8 fp8 (the ttft smoke's node sent
// most blocks to NVMe raw); now 37 of 210 raw, none half-way.
TEST_F(PrecisionTierTest, VictimsAreTranscodedWhileEvictedMemoryIsStillHeld) {
  const uint64_t ns = Open(v1::FORMAT_INT4_KIVI);
  std::deque<std::shared_ptr<StoredBlock>> queue;  // the write-behind queue's hold
  std::map<int, size_t> evicted_formats;
  tier_.set_eviction_hook([&](const BlockId&, std::shared_ptr<StoredBlock> block) {
    ++evicted_formats[block->format];
    queue.push_back(std::move(block));
    if (queue.size() > 8) queue.pop_front();  // written: its memory returns
  });
  for (uint64_t n = 0; n < 300; ++n) Put(ns, n);
  const TierCounters c = tier_.counters();
  size_t evictions = 0;
  for (const auto& [format, count] : evicted_formats) evictions += count;
  ASSERT_GT(evictions, 0u);
  EXPECT_EQ(evicted_formats[v1::FORMAT_FP8_E4M3], 0u) << "evicted half-way down the ladder";
  EXPECT_LT(evicted_formats[0] * 4, evictions) << "raw: " << evicted_formats[0];
  EXPECT_GT(evicted_formats[v1::FORMAT_INT4_KIVI], evictions / 2);
  EXPECT_GT(c.blocks, kArena / kRaw * 13 / 10) << "more blocks than fit raw (82 before)";
  EXPECT_LE(c.used_bytes, kArena);
  for (uint64_t n = 0; n < 300; ++n) {
    std::shared_ptr<StoredBlock> b = tier_.Find(NumberedBlockId(n, ns), /*hit=*/false);
    if (b == nullptr) continue;
    EXPECT_EQ(b->checksum, BlockChecksum(b->data(), b->size())) << "block " << n;
    EXPECT_TRUE(b->has_parent == (n > 0));
  }
  for (const auto& b : queue) {
    EXPECT_EQ(b->checksum, BlockChecksum(b->data(), b->size())) << "queued bytes overwritten";
  }
}

// The real transcoder, with a Delete of the block it is encoding run from
// inside the encode (outside the tier's lock, where a concurrent Delete
// lands): the coarser copy must not be swapped in for a deleted block.
class DeletingTranscoder : public BlockTranscoder {
 public:
  DeletingTranscoder(const BlockTranscoder& real, DramTier& tier) : real_(real), tier_(tier) {}
  std::optional<uint64_t> CoarserSize(const BlockId& id, const StoredBlock& block) const override {
    return real_.CoarserSize(id, block);
  }
  absl::Status Transcode(const BlockId& id, const StoredBlock& from, StoredBlock& to) const override {
    if (deleted_.empty()) {
      EXPECT_TRUE(tier_.Erase(id));
      deleted_.push_back(id);
    }
    return real_.Transcode(id, from, to);
  }
  const std::vector<BlockId>& deleted() const { return deleted_; }

 private:
  const BlockTranscoder& real_;
  DramTier& tier_;
  mutable std::vector<BlockId> deleted_;
};

TEST_F(PrecisionTierTest, ADeleteDuringATranscodeIsNotUndone) {
  const uint64_t ns = Open(v1::FORMAT_INT4_KIVI);
  DeletingTranscoder deleting(transcoder_, tier_);
  tier_.set_transcoder(&deleting);
  for (uint64_t n = 0; n < 80; ++n) Put(ns, n);  // past 64 raw blocks: victims are transcoded
  tier_.set_transcoder(&transcoder_);
  ASSERT_EQ(deleting.deleted().size(), 1u) << "no transcode ran";
  EXPECT_EQ(tier_.Find(deleting.deleted()[0], /*hit=*/false), nullptr)
      << "the transcode brought a deleted block back";
  const TierCounters c = tier_.counters();
  uint64_t blocks = 0, bytes = 0;
  for (uint64_t n = 0; n < 80; ++n) {
    if (auto b = tier_.Find(NumberedBlockId(n, ns), /*hit=*/false)) ++blocks, bytes += b->size();
  }
  EXPECT_EQ(c.blocks, blocks);
  EXPECT_EQ(c.stored_bytes, bytes) << "the dropped copy is not counted";
}

// A small block reserved in a full tier (an encoded block promoted from
// NVMe, a quantized namespace's) takes a piece too, instead of evicting
// until a whole slab frees for its size class.
TEST_F(PrecisionTierTest, ASmallBlockInAFullTierTakesAPiece) {
  const uint64_t ns = Open(v1::FORMAT_INT4_KIVI);
  for (uint64_t n = 0; n < 200; ++n) Put(ns, n);
  const TierCounters before = tier_.counters();
  std::vector<std::shared_ptr<StoredBlock>> small;
  for (int i = 0; i < 4; ++i) {
    auto block = tier_.Reserve(20000);  // no slab of this class exists
    ASSERT_TRUE(block.ok()) << block.status();
    std::memset((*block)->data(), 0x5a, 20000);
    small.push_back(*std::move(block));
  }
  const TierCounters after = tier_.counters();
  EXPECT_LE(after.evictions - before.evictions, 4u) << "at most one eviction per block";
  EXPECT_LE(after.used_bytes, kArena);
  for (const auto& b : small) {
    for (size_t k = 0; k < 20000; k += 997) ASSERT_EQ(b->data()[k], 0x5a) << "pieces overlap";
  }
}

TEST_F(PrecisionTierTest, NamespaceWithoutBudgetIsEvictedNeverTranscoded) {
  const uint64_t ns = Open(v1::FORMAT_RAW);
  for (uint64_t n = 0; n < 100; ++n) Put(ns, n);
  const TierCounters c = tier_.counters();
  EXPECT_EQ(c.transcodes, 0u);
  EXPECT_EQ(c.blocks, kArena / kRaw);
  EXPECT_EQ(c.format_blocks[0], c.blocks);
  EXPECT_EQ(evicted_.size(), 100 - kArena / kRaw);
  EXPECT_EQ(evicted_.front(), NumberedBlockId(0, ns)) << "in LRU order";
}

TEST_F(PrecisionTierTest, BlocksOfANamespaceNotOpenAreNotTranscoded) {
  // Blocks recovered from NVMe before their namespace is reopened: no spec,
  // so no budget to apply.
  const uint64_t unknown = 0x1234;
  for (uint64_t n = 0; n < 80; ++n) Put(unknown, n);
  EXPECT_EQ(tier_.counters().transcodes, 0u);
}

// The real transcoder without RawSize: one lease per format, as the tier
// gave before leases by bytes.
class OneLeaseTranscoder : public BlockTranscoder {
 public:
  explicit OneLeaseTranscoder(const BlockTranscoder& real) : real_(real) {}
  std::optional<uint64_t> CoarserSize(const BlockId& id, const StoredBlock& block) const override {
    return real_.CoarserSize(id, block);
  }
  absl::Status Transcode(const BlockId& id, const StoredBlock& from, StoredBlock& to) const override {
    return real_.Transcode(id, from, to);
  }

 private:
  const BlockTranscoder& real_;
};

// Leases by bytes: a copy at 1/k of the raw bytes is kept round(k) leases
// (fp8 2, int4 3 here), renewed by a hit, so coarser copies hold more of the
// memory and the tier more blocks than with one lease per format, on the
// same stream of publishes into the same bytes.
TEST_F(PrecisionTierTest, CoarserCopiesAreKeptLeasesByTheirBytes) {
  const uint64_t ns = Open(v1::FORMAT_INT4_KIVI);
  std::vector<uint8_t> other_arena(kArena);
  DramTier one_lease(other_arena.data(), kArena, kSlab, MakeLruPolicy());
  OneLeaseTranscoder plain(transcoder_);
  one_lease.set_transcoder(&plain);
  for (uint64_t n = 0; n < 300; ++n) {
    Put(ns, n);
    auto block = one_lease.Reserve(kRaw);
    ASSERT_TRUE(block.ok()) << block.status();
    const std::vector<uint8_t> kv = Kv(n);
    std::memcpy((*block)->data(), kv.data(), kRaw);
    (*block)->checksum = BlockChecksum(kv.data(), kRaw);
    ASSERT_TRUE(one_lease.Commit(NumberedBlockId(n, ns), *block));
  }
  const TierCounters by_bytes = tier_.counters(), fresh = one_lease.counters();
  // Deterministic (one thread, LRU): 105 blocks, 41% of the bytes raw, 580
  // leases; with one lease per format 95 blocks, 53% raw.
  EXPECT_GT(by_bytes.precision_leases, 0u);
  EXPECT_EQ(fresh.precision_leases, 0u);
  EXPECT_GT(by_bytes.blocks, fresh.blocks * 108 / 100);
  EXPECT_LT(by_bytes.format_bytes[0] * 100, by_bytes.stored_bytes * 45);
  EXPECT_GT(fresh.format_bytes[0] * 100, fresh.stored_bytes * 50);
  EXPECT_LE(by_bytes.used_bytes, kArena);
  size_t coarse = 0;
  for (uint64_t n = 0; n < 300; ++n) {
    std::shared_ptr<StoredBlock> b = tier_.Find(NumberedBlockId(n, ns), /*hit=*/false);
    if (b == nullptr) continue;
    const int grant = b->format == v1::FORMAT_INT4_KIVI  ? 3
                      : b->format == v1::FORMAT_FP8_E4M3 ? 2
                                                         : 1;
    EXPECT_EQ(b->lease_grant, grant) << n << " at format " << int{b->format};
    EXPECT_LT(b->leases_left, grant);
    coarse += b->format != 0;
  }
  EXPECT_GT(coarse, by_bytes.blocks / 2);
  // A hit renews all of a copy's leases.
  bool renewed = false;
  for (uint64_t n = 0; n < 300 && !renewed; ++n) {
    std::shared_ptr<StoredBlock> b = tier_.Find(NumberedBlockId(n, ns), /*hit=*/false);
    if (b == nullptr || b->format != v1::FORMAT_INT4_KIVI || b->leases_left == 2) continue;
    tier_.Find(NumberedBlockId(n, ns), /*hit=*/true);
    EXPECT_EQ(b->leases_left, 2);
    renewed = true;
  }
  EXPECT_TRUE(renewed) << "no int4 copy had spent a lease";
  // And so does a lookup's prefix.
  renewed = false;
  for (uint64_t n = 0; n < 300 && !renewed; ++n) {
    std::shared_ptr<StoredBlock> b = tier_.Find(NumberedBlockId(n, ns), /*hit=*/false);
    if (b == nullptr || b->format != v1::FORMAT_INT4_KIVI || b->leases_left == 2) continue;
    const BlockKey key = NumberedBlockId(n, ns).key;
    EXPECT_EQ(tier_.PrefixLength(ns, absl::MakeConstSpan(&key, 1)), 1u);
    EXPECT_EQ(b->leases_left, 2);
    renewed = true;
  }
  EXPECT_TRUE(renewed) << "no other int4 copy had spent a lease";
}

TEST(PrecisionLadderTest, BudgetsAndNamespaceIds) {
  NamespaceRegistry registry(1 << 20);
  v1::NamespaceSpec int8 = Spec("a", v1::FORMAT_INT2_KIVI);
  int8.set_format(v1::FORMAT_INT8);
  EXPECT_TRUE(registry.Open(int8).ok()) << "int8 > int4 > int2";
  v1::NamespaceSpec fp8_over_int8 = Spec("b", v1::FORMAT_FP8_E4M3);
  fp8_over_int8.set_format(v1::FORMAT_INT8);
  EXPECT_FALSE(registry.Open(fp8_over_int8).ok()) << "fp8 is not coarser than int8";
  v1::NamespaceSpec bad = Spec("c", static_cast<v1::StoredFormat>(9));
  EXPECT_FALSE(registry.Open(bad).ok());
  // A budget splits the id; no budget keeps it.
  auto with = registry.Open(Spec("d", v1::FORMAT_INT4_KIVI));
  auto without = registry.Open(Spec("d", v1::FORMAT_RAW));
  ASSERT_TRUE(with.ok() && without.ok());
  EXPECT_NE(with->id, without->id);
}

}  // namespace
}  // namespace kvstrata::cachenode
