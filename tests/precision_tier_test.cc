// The DRAM tier with precision tiers on: the real PrecisionTranscoder reading
// budgets from a real NamespaceRegistry, the kernels' CPU path, LRU. What a
// transcode must keep: the checksum and header of the stored bytes, the
// parent link, the bytes a reader pinned before it, and namespaces without a
// budget untouched.
#include <gtest/gtest.h>

#include <cstring>
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
