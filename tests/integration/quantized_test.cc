// Quantized stored formats end to end: a real kvstrata-node encodes published
// blocks on ingest, stores them smaller (Stats shows it), and Fetch returns
// the encoded bytes, which the client decodes within the format's bound.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "kvstrata.pb.h"
#include "kvstrata/client/client.h"
#include "kvstrata/client/quantized.h"
#include "kvstrata/kernels/quant.h"
#include "kvstrata/testing/blocks.h"
#include "kvstrata/testing/node_fixture.h"
#include "kvstrata/testing/process.h"
#if defined(KVSTRATA_KERNELS_CUDA)
#include <cuda_runtime.h>

#include "kvstrata/kernels/quant_cuda.h"
#endif

namespace kvstrata {
namespace {

using client::BlockOutcome;
using client::Client;
using client::FetchItem;
using client::PublishItem;
using testing::NodeProcess;

constexpr uint32_t kLayers = 4, kTokens = 16, kHeads = 8, kHeadDim = 128;

v1::NamespaceSpec LayoutSpec(const std::string& model, v1::StoredFormat format,
                             v1::DType dtype = v1::DTYPE_FP16, uint32_t head_dim = kHeadDim) {
  v1::NamespaceSpec spec;
  spec.set_tenant("test");
  spec.set_model(model);
  spec.set_dtype(dtype);
  spec.set_num_layers(kLayers);
  spec.set_num_kv_heads(kHeads);
  spec.set_head_dim(head_dim);
  spec.set_tokens_per_block(kTokens);
  spec.set_format(format);
  return spec;
}

// fp16 KV with unit-scale values and one 30x channel per head.
void FillKv(uint64_t seed, uint8_t* data, size_t bytes) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (size_t i = 0; i < bytes / 2; ++i) {
    _Float16 h = static_cast<_Float16>(n(rng) * (i % kHeadDim == 7 ? 30.0f : 1.0f));
    std::memcpy(data + 2 * i, &h, 2);
  }
}

float Half(const uint8_t* p) {
  _Float16 h;
  std::memcpy(&h, p, 2);
  return float(h);
}

class QuantizedStoreTest : public testing::SharedNodeTest<QuantizedStoreTest> {
 protected:
  static void SetUpTestSuite() {
    StartSharedNode(KVSTRATA_NODE_BINARY,
                    {"--dram_bytes=268435456", "--slab_bytes=4194304", "--transfer_timeout=5s"});
  }
  void SetUp() override {
    ASSERT_NE(node_, nullptr);
    auto c = Client::Connect({.node_address = node_->address(), .timeout = absl::Seconds(20)});
    ASSERT_TRUE(c.ok()) << c.status();
    client_ = *std::move(c);
  }
  uint64_t DramStoredBytes() {
    v1::StatsResponse stats;
    EXPECT_TRUE(client_->Stats(&stats).ok());
    for (const auto& t : stats.tiers())
      if (t.tier() == v1::TIER_DRAM) return t.stored_bytes();
    return 0;
  }

  std::unique_ptr<Client> client_;
};

TEST_F(QuantizedStoreTest, Int4KiviIsStoredSmallerAndFetchesBackWithinBound) {
  constexpr size_t kCount = 6;
  auto ns = client_->OpenNamespace(LayoutSpec("kivi4", v1::FORMAT_INT4_KIVI));
  ASSERT_TRUE(ns.ok()) << ns.status();
  const uint64_t block = ns->block_bytes();
  ASSERT_EQ(block, uint64_t(kLayers) * 2 * kTokens * kHeads * kHeadDim * 2);
  const kernels::QuantParams params{kernels::Format::kInt4Kivi, kernels::DType::kFp16,
                                    {kLayers, kTokens, kHeads, kHeadDim}, 32};
  const uint64_t encoded = kernels::EncodedBytes(params);
  ASSERT_LT(encoded * 5, block * 2);  // > 2.5x: 16-token blocks leave key groups half full

  auto buffer = client_->Allocate(kCount * block);
  ASSERT_TRUE(buffer.ok()) << buffer.status();
  const std::vector<BlockKey> keys = ns->Keys(testing::Tokens(77, kCount, kTokens));
  std::vector<PublishItem> pub;
  for (size_t i = 0; i < kCount; ++i) {
    FillKv(1000 + i, (*buffer)->data() + i * block, block);
    pub.push_back({keys[i], i ? std::optional(keys[i - 1]) : std::nullopt, buffer->get(), i * block});
  }
  const std::vector<uint8_t> original((*buffer)->data(), (*buffer)->data() + kCount * block);
  const uint64_t stored_before = DramStoredBytes();
  auto published = ns->Publish(pub);
  ASSERT_TRUE(published.ok()) << published.status();
  EXPECT_EQ(published->count(BlockOutcome::kOk), kCount);
  // The node keeps the encoded blocks only.
  EXPECT_EQ(DramStoredBytes() - stored_before, kCount * encoded);

  std::memset((*buffer)->data(), 0, kCount * block);
  std::vector<FetchItem> fetch;
  for (size_t i = 0; i < kCount; ++i) fetch.push_back({keys[i], buffer->get(), i * block});
  auto fetched = ns->Fetch(fetch);
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  ASSERT_EQ(fetched->sizes.size(), kCount);
  std::vector<uint8_t> local(encoded), decoded(block);
  for (size_t i = 0; i < kCount; ++i) {
    ASSERT_EQ(fetched->outcomes[i], BlockOutcome::kOk) << i;
    ASSERT_EQ(fetched->sizes[i], encoded) << i;
    const uint8_t* stored = (*buffer)->data() + i * block;
    // The node's encoding is the library's, byte for byte.
    ASSERT_TRUE(kernels::Quantize(params, original.data() + i * block, block, local.data(), encoded).ok());
    ASSERT_EQ(std::memcmp(stored, local.data(), encoded), 0) << "block " << i;
    ASSERT_TRUE(client::IsEncodedBlock(stored, fetched->sizes[i]));
    ASSERT_TRUE(client::DequantizeBlock(stored, fetched->sizes[i], decoded.data(), decoded.size()).ok());
    // Within int4 KIVI's bound: per-token value groups of 32 channels, so the
    // 30x channel widens one group's step; half a step of a group spanning
    // the whole block's range is a loose but failing-on-garbage ceiling.
    double num = 0, den = 0, lo = 1e30, hi = -1e30;
    for (size_t e = 0; e < block / 2; ++e) {
      double x = Half(&original[i * block + 2 * e]);
      lo = std::min(lo, x), hi = std::max(hi, x);
    }
    for (size_t e = 0; e < block / 2; ++e) {
      double x = Half(&original[i * block + 2 * e]), y = Half(&decoded[2 * e]);
      ASSERT_LE(std::fabs(x - y), (hi - lo) / 15 * 0.51 + std::fabs(x) / 1024) << "element " << e;
      num += (x - y) * (x - y);
      den += x * x;
    }
    EXPECT_LT(std::sqrt(num / den), 0.1) << "block " << i;
  }
  EXPECT_EQ(client::DequantizeBlock((*buffer)->data(), 100, decoded.data(), decoded.size()).code(),
            absl::StatusCode::kDataLoss);
}

TEST_F(QuantizedStoreTest, GpuDecodeGivesTheCpuBytes) {
#if defined(KVSTRATA_KERNELS_CUDA)
  if (kernels::CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA GPU: DequantizeBlockOnGpu not run";
#endif
  auto ns = client_->OpenNamespace(LayoutSpec("kivi2-gpu", v1::FORMAT_INT2_KIVI, v1::DTYPE_BF16));
  ASSERT_TRUE(ns.ok()) << ns.status();
  const uint64_t block = ns->block_bytes();
  auto buffer = client_->Allocate(block);
  ASSERT_TRUE(buffer.ok());
  FillKv(11, (*buffer)->data(), block);  // fp16 bit patterns read as bf16: finite, wide range
  const std::vector<BlockKey> keys = ns->Keys(testing::Tokens(80, 1, kTokens));
  auto published = ns->Publish({{keys[0], std::nullopt, buffer->get(), 0}});
  ASSERT_TRUE(published.ok() && published->outcomes[0] == BlockOutcome::kOk);
  auto fetched = ns->Fetch({{keys[0], buffer->get(), 0}});
  ASSERT_TRUE(fetched.ok() && fetched->outcomes[0] == BlockOutcome::kOk);
  const size_t stored = fetched->sizes[0];
  std::vector<uint8_t> cpu(block);
  ASSERT_TRUE(client::DequantizeBlock((*buffer)->data(), stored, cpu.data(), block).ok());
#if defined(KVSTRATA_KERNELS_CUDA)
  void *d_scratch = nullptr, *d_out = nullptr;
  ASSERT_EQ(cudaMalloc(&d_scratch, stored), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&d_out, block), cudaSuccess);
  absl::Status gpu = client::DequantizeBlockOnGpu((*buffer)->data(), stored, d_scratch, d_out, block, nullptr);
  ASSERT_TRUE(gpu.ok()) << gpu;
  std::vector<uint8_t> from_gpu(block);
  ASSERT_EQ(cudaMemcpy(from_gpu.data(), d_out, block, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(from_gpu, cpu);
  cudaFree(d_scratch);
  cudaFree(d_out);
#else
  EXPECT_EQ(client::DequantizeBlockOnGpu((*buffer)->data(), stored, nullptr, nullptr, block, nullptr).code(),
            absl::StatusCode::kUnimplemented);
#endif
}

TEST_F(QuantizedStoreTest, NonFiniteBlocksAreRejected) {
  auto ns = client_->OpenNamespace(LayoutSpec("fp8-nan", v1::FORMAT_FP8_E4M3));
  ASSERT_TRUE(ns.ok()) << ns.status();
  const uint64_t block = ns->block_bytes();
  auto buffer = client_->Allocate(2 * block);
  ASSERT_TRUE(buffer.ok());
  FillKv(5, (*buffer)->data(), block);
  FillKv(6, (*buffer)->data() + block, block);
  const uint16_t nan = 0x7e00;
  std::memcpy((*buffer)->data() + block + 1234, &nan, 2);
  const std::vector<BlockKey> keys = ns->Keys(testing::Tokens(78, 2, kTokens));
  auto published = ns->Publish({{keys[0], std::nullopt, buffer->get(), 0}, {keys[1], keys[0], buffer->get(), block}});
  ASSERT_TRUE(published.ok()) << published.status();
  EXPECT_EQ(published->outcomes[0], BlockOutcome::kOk);
  EXPECT_EQ(published->outcomes[1], BlockOutcome::kRejected);
  auto found = ns->Lookup(keys);
  ASSERT_TRUE(found.ok());
  EXPECT_EQ(found->prefix_length, 1u);
}

TEST_F(QuantizedStoreTest, LayoutsTheKernelsCannotTakeAreRefused) {
  EXPECT_EQ(client_->OpenNamespace(LayoutSpec("bad-dim", v1::FORMAT_INT8, v1::DTYPE_FP16, 60)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(client_->OpenNamespace(LayoutSpec("fp32", v1::FORMAT_INT8, v1::DTYPE_FP32)).status().code(),
            absl::StatusCode::kInvalidArgument);
  v1::NamespaceSpec opaque = testing::OpaqueSpec("opaque-int4", 65536, kTokens);
  opaque.set_format(v1::FORMAT_INT4_KIVI);
  EXPECT_EQ(client_->OpenNamespace(opaque).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(QuantizedStoreTest, RawNamespacesReportFullSizes) {
  auto ns = client_->OpenNamespace(LayoutSpec("raw", v1::FORMAT_RAW));
  ASSERT_TRUE(ns.ok()) << ns.status();
  auto buffer = client_->Allocate(ns->block_bytes());
  ASSERT_TRUE(buffer.ok());
  FillKv(9, (*buffer)->data(), ns->block_bytes());
  const std::vector<BlockKey> keys = ns->Keys(testing::Tokens(79, 1, kTokens));
  ASSERT_TRUE(ns->Publish({{keys[0], std::nullopt, buffer->get(), 0}}).ok());
  auto fetched = ns->Fetch({{keys[0], buffer->get(), 0}});
  ASSERT_TRUE(fetched.ok());
  ASSERT_EQ(fetched->outcomes[0], BlockOutcome::kOk);
  EXPECT_EQ(fetched->sizes[0], ns->block_bytes());
}

}  // namespace
}  // namespace kvstrata
