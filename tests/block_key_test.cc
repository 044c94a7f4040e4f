#include "kvstrata/common/block_key.h"

#include <gtest/gtest.h>

#include <numeric>

#include "kvstrata.pb.h"
#include "kvstrata/common/namespace_spec.h"

namespace kvstrata {
namespace {

std::vector<std::string> Hex(const std::vector<BlockKey>& keys) {
  std::vector<std::string> out;
  for (const BlockKey& k : keys) out.push_back(k.Hex());
  return out;
}

// Vectors computed independently with Python's hashlib:
//   sha256(pack('<Q', ns) + previous_key + b''.join(pack('<I', t) for t in block))[:16]
TEST(BlockKeyTest, MatchesIndependentVectors) {
  std::vector<uint32_t> tokens(8);
  std::iota(tokens.begin(), tokens.end(), 0);
  EXPECT_EQ(Hex(ComputeBlockKeys(0x0123456789abcdefULL, tokens, 4)),
            (std::vector<std::string>{"fca41ba1df85097534eac94507e4c469",
                                      "a5947f00c72703880dec0771040f7875"}));
  const std::vector<uint32_t> sevens = {7, 7, 7};
  EXPECT_EQ(Hex(ComputeBlockKeys(42, sevens, 1)),
            (std::vector<std::string>{"ff15abd7445559e0736aecc820d9ccc1",
                                      "aa340ce7e8634ffafe8e4859b6b881c8",
                                      "5ab0b93d18ecda1293eec2738cd99975"}));
}

TEST(BlockKeyTest, PartialBlocksGetNoKey) {
  std::vector<uint32_t> tokens(10, 1);
  EXPECT_EQ(ComputeBlockKeys(1, tokens, 4).size(), 2u);
  EXPECT_TRUE(ComputeBlockKeys(1, {}, 4).empty());
  EXPECT_TRUE(ComputeBlockKeys(1, tokens, 0).empty());
}

TEST(BlockKeyTest, ChainsFromParentAndDependsOnEverything) {
  std::vector<uint32_t> tokens(16);
  std::iota(tokens.begin(), tokens.end(), 100);
  const auto all = ComputeBlockKeys(9, tokens, 4);
  ASSERT_EQ(all.size(), 4u);
  // Continuing from key 1 reproduces keys 2 and 3.
  const auto tail = ComputeBlockKeys(9, absl::MakeConstSpan(tokens).subspan(8), 4, all[1]);
  EXPECT_EQ(tail[0], all[2]);
  EXPECT_EQ(tail[1], all[3]);
  // Another namespace, or one changed token early on, changes every later key.
  EXPECT_NE(ComputeBlockKeys(10, tokens, 4)[0], all[0]);
  tokens[0] ^= 1;
  const auto changed = ComputeBlockKeys(9, tokens, 4);
  for (size_t i = 0; i < 4; ++i) EXPECT_NE(changed[i], all[i]);
  // Deterministic.
  tokens[0] ^= 1;
  EXPECT_EQ(ComputeBlockKeys(9, tokens, 4), all);
}

TEST(BlockKeyTest, WireAndHexForms) {
  const auto key = BlockKey::FromHex("fca41ba1df85097534eac94507e4c469");
  ASSERT_TRUE(key.ok());
  EXPECT_EQ(key->Hex(), "fca41ba1df85097534eac94507e4c469");
  EXPECT_EQ(BlockKey::FromWire(std::string(key->view())).value(), *key);
  // 32-byte engine hashes fold to 16 bytes, deterministically and distinctly.
  const std::string a(32, 'a'), b(32, 'b');
  EXPECT_EQ(BlockKey::FromWire(a).value(), BlockKey::FromWire(a).value());
  EXPECT_NE(BlockKey::FromWire(a).value(), BlockKey::FromWire(b).value());
  EXPECT_FALSE(BlockKey::FromWire("short").ok());
  EXPECT_FALSE(BlockKey::FromHex("xyz").ok());
  EXPECT_FALSE(BlockKey::FromHex(std::string(32, 'g')).ok());
}

TEST(BlockChecksumTest, DetectsAnyFlip) {
  std::vector<uint8_t> data(4096, 0x5a);
  const uint64_t sum = BlockChecksum(data.data(), data.size());
  data[1234] ^= 0x10;
  EXPECT_NE(BlockChecksum(data.data(), data.size()), sum);
}

v1::NamespaceSpec Layout() {
  v1::NamespaceSpec spec;
  spec.set_tenant("acme");
  spec.set_model("llama-3-8b");
  spec.set_dtype(v1::DTYPE_FP16);
  spec.set_num_layers(32);
  spec.set_num_kv_heads(8);
  spec.set_head_dim(128);
  spec.set_tokens_per_block(256);
  return spec;
}

TEST(NamespaceSpecTest, BlockSizeFromLayout) {
  EXPECT_EQ(ValidateNamespaceSpec(Layout(), 1ull << 30).value(), 32ull * 2 * 256 * 8 * 128 * 2);
  v1::NamespaceSpec spec = Layout();
  spec.set_block_bytes(123);
  EXPECT_FALSE(ValidateNamespaceSpec(spec, 1ull << 30).ok());  // disagrees with the layout
  EXPECT_EQ(ValidateNamespaceSpec(Layout(), 1 << 20).status().code(),
            absl::StatusCode::kInvalidArgument);  // larger than the node allows
}

TEST(NamespaceSpecTest, RejectsBadSpecs) {
  v1::NamespaceSpec opaque;
  EXPECT_FALSE(ValidateNamespaceSpec(opaque, 1 << 20).ok());  // no size at all
  opaque.set_block_bytes(4096);
  EXPECT_EQ(ValidateNamespaceSpec(opaque, 1 << 20).value(), 4096u);
  v1::NamespaceSpec spec = Layout();
  spec.set_tp_size(2);
  spec.set_tp_rank(2);
  EXPECT_FALSE(ValidateNamespaceSpec(spec, 1ull << 30).ok());
  spec = Layout();
  spec.set_dtype(v1::DTYPE_UNSPECIFIED);
  EXPECT_FALSE(ValidateNamespaceSpec(spec, 1ull << 30).ok());
  spec = Layout();
  spec.set_tenant(std::string(300, 't'));
  EXPECT_FALSE(ValidateNamespaceSpec(spec, 1ull << 30).ok());
}

TEST(NamespaceSpecTest, IdIsStableAndSeparatesLayouts) {
  // Pinned: the id must never change across versions, or caches go cold.
  EXPECT_EQ(NamespaceId(Layout()), 0x34f93392bd535515ULL);
  v1::NamespaceSpec explicit_size = Layout();
  explicit_size.set_block_bytes(32ull * 2 * 256 * 8 * 128 * 2);
  EXPECT_EQ(NamespaceId(explicit_size), NamespaceId(Layout()));
  v1::NamespaceSpec other_rank = Layout();
  other_rank.set_tp_size(2);
  other_rank.set_tp_rank(1);
  EXPECT_NE(NamespaceId(other_rank), NamespaceId(Layout()));
}

}  // namespace
}  // namespace kvstrata
