// Precision tiers end to end (NamespaceSpec.coarsest_format): a real
// kvstrata-node with a small DRAM tier transcodes the blocks its policy gives
// up one format coarser instead of evicting them; Fetch reports each block's
// stored format and the client decodes it back to fp16. Every fetched block
// is compared with a reference computed here, with the kernels, along the
// same ladder (raw > fp8_e4m3 > int4_kivi): a byte-exact match proves the
// node's stored bytes, header and checksum were right at every step.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kvstrata.pb.h"
#include "kvstrata/client/client.h"
#include "kvstrata/kvstrata.h"
#include "kvstrata/kernels/quant.h"
#include "kvstrata/testing/blocks.h"
#include "kvstrata/testing/process.h"

namespace kvstrata {
namespace {

using client::BlockOutcome;
using client::Client;
using client::FetchItem;
using client::PublishItem;
using client::StoredFormat;
using testing::NodeProcess;

// 128 KiB raw blocks; fp8 ~64 KiB, int4 ~40 KiB.
constexpr uint32_t kLayers = 2, kTokens = 16, kHeads = 8, kHeadDim = 128;
constexpr uint64_t kRawBytes = uint64_t{kLayers} * 2 * kTokens * kHeads * kHeadDim * 2;
// 16 MiB of DRAM in 1 MiB slabs: 128 raw blocks.
constexpr uint64_t kDramBytes = 16ull << 20;

v1::NamespaceSpec Spec(const std::string& model, v1::StoredFormat coarsest) {
  v1::NamespaceSpec spec;
  spec.set_tenant("test");
  spec.set_model(model);
  spec.set_dtype(v1::DTYPE_FP16);
  spec.set_num_layers(kLayers);
  spec.set_num_kv_heads(kHeads);
  spec.set_head_dim(kHeadDim);
  spec.set_tokens_per_block(kTokens);
  spec.set_coarsest_format(coarsest);
  return spec;
}

// fp16 KV: unit normal values with one 30x channel per head (outliers KIVI
// handles per channel).
void FillKv(uint64_t seed, uint8_t* data) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (size_t i = 0; i < kRawBytes / 2; ++i) {
    _Float16 h = static_cast<_Float16>(n(rng) * (i % kHeadDim == 7 ? 30.0f : 1.0f));
    std::memcpy(data + 2 * i, &h, 2);
  }
}

kernels::QuantParams Params(kernels::Format f) {
  return {f, kernels::DType::kFp16, {kLayers, kTokens, kHeads, kHeadDim}, 32};
}

// What a block published raw decodes to after the node moved it down the
// ladder to `format`: each rung quantizes the previous rung's decoding.
std::vector<uint8_t> Reference(const uint8_t* raw, StoredFormat format) {
  std::vector<uint8_t> now(raw, raw + kRawBytes);
  std::vector<kernels::Format> steps;
  if (format >= StoredFormat::kFp8E4m3) steps.push_back(kernels::Format::kFp8E4m3);
  if (format >= StoredFormat::kInt4Kivi) steps.push_back(kernels::Format::kInt4Kivi);
  if (format >= StoredFormat::kInt2Kivi) steps.push_back(kernels::Format::kInt2Kivi);
  for (kernels::Format f : steps) {
    std::vector<uint8_t> encoded(kernels::EncodedBytes(Params(f)));
    EXPECT_TRUE(kernels::Quantize(Params(f), now.data(), now.size(), encoded.data(), encoded.size()).ok());
    EXPECT_TRUE(kernels::Dequantize(encoded.data(), encoded.size(), now.data(), now.size()).ok());
  }
  return now;
}

// Relative L2 error of `decoded` against the original.
double RelativeError(const uint8_t* original, const uint8_t* decoded) {
  double num = 0, den = 0;
  for (size_t e = 0; e < kRawBytes / 2; ++e) {
    _Float16 a, b;
    std::memcpy(&a, original + 2 * e, 2);
    std::memcpy(&b, decoded + 2 * e, 2);
    num += (double(a) - double(b)) * (double(a) - double(b));
    den += double(a) * double(a);
  }
  return std::sqrt(num / den);
}

// Ceilings that fail on garbage, from kernels/README.md's measured errors on
// this kind of data (fp8 ~3%, int4 KIVI ~10%, compounded with fp8 first).
double Ceiling(StoredFormat f) {
  switch (f) {
    case StoredFormat::kRaw: return 0;
    case StoredFormat::kFp8E4m3: return 0.06;
    case StoredFormat::kInt4Kivi: return 0.2;
    default: return 0.6;
  }
}

class PrecisionTest : public ::testing::Test {
 protected:
  void StartNode(std::vector<std::string> extra = {}) {
    std::vector<std::string> flags = {absl::StrCat("--dram_bytes=", kDramBytes), "--slab_bytes=1048576",
                                      "--eviction_policy=lru", "--transfer_timeout=10s"};
    flags.insert(flags.end(), extra.begin(), extra.end());
    client_.reset();
    node_.reset();
    auto node = NodeProcess::Start(KVSTRATA_NODE_BINARY, flags);
    ASSERT_TRUE(node.ok()) << node.status();
    node_ = *std::move(node);
    auto c = Client::Connect({.node_address = node_->address(), .timeout = absl::Seconds(30)});
    ASSERT_TRUE(c.ok()) << c.status();
    client_ = *std::move(c);
  }

  v1::StatsResponse Stats() {
    v1::StatsResponse stats;
    EXPECT_TRUE(client_->Stats(&stats).ok());
    return stats;
  }
  static uint64_t FormatBlocks(const v1::StatsResponse& s, v1::StoredFormat f) {
    for (const auto& fs : s.formats())
      if (fs.tier() == v1::TIER_DRAM && fs.format() == f) return fs.blocks();
    return 0;
  }

  // Publishes `count` blocks of stream `seed` as one prompt, a few at a time
  // (each publish makes room for the next), keeping their bytes in `raw`.
  void PublishPrompt(client::Namespace& ns, uint64_t seed, size_t count, std::vector<BlockKey>* keys,
                     std::vector<uint8_t>* raw, bool all_stored = true) {
    *keys = ns.Keys(testing::Tokens(seed, count, kTokens));
    raw->resize(count * kRawBytes);
    auto buffer = client_->Allocate(4 * kRawBytes);
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    for (size_t start = 0; start < count; start += 4) {
      std::vector<PublishItem> items;
      for (size_t i = start; i < std::min(count, start + 4); ++i) {
        FillKv(seed * 1000 + i, raw->data() + i * kRawBytes);
        std::memcpy((*buffer)->data() + (i - start) * kRawBytes, raw->data() + i * kRawBytes, kRawBytes);
        items.push_back({(*keys)[i], i ? std::optional((*keys)[i - 1]) : std::nullopt, buffer->get(),
                         (i - start) * kRawBytes});
      }
      auto published = ns.Publish(items);
      ASSERT_TRUE(published.ok()) << published.status();
      if (all_stored) {
        ASSERT_EQ(published->count(BlockOutcome::kOk), items.size());
      }
    }
  }

  // Fetches every key; checks each hit against the reference for the format
  // the node reported. Returns the hits per stored format.
  std::vector<size_t> FetchAndCheck(client::Namespace& ns, const std::vector<BlockKey>& keys,
                                    const std::vector<uint8_t>& raw) {
    std::vector<size_t> per_format(5, 0);
    auto buffer = client_->Allocate(keys.size() * kRawBytes);
    EXPECT_TRUE(buffer.ok()) << buffer.status();
    if (!buffer.ok()) return per_format;
    std::vector<FetchItem> items;
    for (size_t i = 0; i < keys.size(); ++i) items.push_back({keys[i], buffer->get(), i * kRawBytes});
    auto fetched = ns.Fetch(items);
    EXPECT_TRUE(fetched.ok()) << fetched.status();
    if (!fetched.ok()) return per_format;
    EXPECT_EQ(fetched->formats.size(), keys.size());
    for (size_t i = 0; i < keys.size(); ++i) {
      EXPECT_NE(fetched->outcomes[i], BlockOutcome::kChecksumMismatch) << "block " << i;
      if (fetched->outcomes[i] != BlockOutcome::kOk) continue;
      const StoredFormat f = fetched->formats[i];
      ++per_format[static_cast<size_t>(f)];
      EXPECT_EQ(fetched->sizes[i], kRawBytes) << "decoded to the namespace's layout";
      const uint8_t* got = (*buffer)->data() + i * kRawBytes;
      const std::vector<uint8_t> want = Reference(raw.data() + i * kRawBytes, f);
      EXPECT_EQ(std::memcmp(got, want.data(), kRawBytes), 0)
          << "block " << i << " stored as format " << int(f) << " is not the ladder's encoding";
      if (f != StoredFormat::kRaw) {
        EXPECT_LT(RelativeError(raw.data() + i * kRawBytes, got), Ceiling(f)) << "block " << i;
      }
    }
    return per_format;
  }

  std::unique_ptr<NodeProcess> node_;
  std::unique_ptr<Client> client_;
};

TEST_F(PrecisionTest, BudgetMustBeCoarserAndNeedsALayout) {
  ASSERT_NO_FATAL_FAILURE(StartNode());
  v1::NamespaceSpec opaque = testing::OpaqueSpec("opaque", kRawBytes, kTokens);
  opaque.set_coarsest_format(v1::FORMAT_INT4_KIVI);
  EXPECT_EQ(client_->OpenNamespace(opaque).status().code(), absl::StatusCode::kInvalidArgument);
  v1::NamespaceSpec same = Spec("same", v1::FORMAT_INT4_KIVI);
  same.set_format(v1::FORMAT_INT4_KIVI);
  EXPECT_EQ(client_->OpenNamespace(same).status().code(), absl::StatusCode::kInvalidArgument);
  v1::NamespaceSpec fp32 = Spec("fp32", v1::FORMAT_FP8_E4M3);
  fp32.set_dtype(v1::DTYPE_FP32);
  EXPECT_EQ(client_->OpenNamespace(fp32).status().code(), absl::StatusCode::kInvalidArgument);
  v1::NamespaceSpec odd = Spec("odd", v1::FORMAT_FP8_E4M3);
  odd.set_head_dim(100);  // the kernels need a multiple of 8
  EXPECT_EQ(client_->OpenNamespace(odd).status().code(), absl::StatusCode::kInvalidArgument);
  // A budget is part of the namespace: the same layout without one is another.
  auto with = client_->OpenNamespace(Spec("m", v1::FORMAT_INT4_KIVI));
  auto without = client_->OpenNamespace(Spec("m", v1::FORMAT_RAW));
  ASSERT_TRUE(with.ok() && without.ok());
  EXPECT_NE(with->id(), without->id());
}

TEST_F(PrecisionTest, PressureTranscodesDownTheLadderAndFetchesDecodeWithinBound) {
  ASSERT_NO_FATAL_FAILURE(StartNode());
  auto ns = client_->OpenNamespace(Spec("budget-int4", v1::FORMAT_INT4_KIVI));
  ASSERT_TRUE(ns.ok()) << ns.status();
  ASSERT_EQ(ns->block_bytes(), kRawBytes);
  constexpr size_t kCount = 320;  // 2.5x what DRAM holds raw
  std::vector<BlockKey> keys;
  std::vector<uint8_t> raw;
  ASSERT_NO_FATAL_FAILURE(PublishPrompt(*ns, 1, kCount, &keys, &raw));

  const v1::StatsResponse stats = Stats();
  EXPECT_GT(stats.transcoded_blocks(), 0u);
  const uint64_t fp8 = FormatBlocks(stats, v1::FORMAT_FP8_E4M3);
  const uint64_t int4 = FormatBlocks(stats, v1::FORMAT_INT4_KIVI);
  EXPECT_GT(fp8 + int4, 0u) << stats.DebugString();
  EXPECT_EQ(FormatBlocks(stats, v1::FORMAT_INT2_KIVI), 0u) << "below the budget";
  // Per-format bytes add up to the tier's.
  uint64_t bytes = 0, blocks = 0;
  for (const auto& f : stats.formats()) bytes += f.stored_bytes(), blocks += f.blocks();
  EXPECT_EQ(bytes, stats.tiers(0).stored_bytes());
  EXPECT_EQ(blocks, stats.tiers(0).blocks());
  RecordProperty("dram_blocks", static_cast<int>(stats.tiers(0).blocks()));
  RecordProperty("transcodes", static_cast<int>(stats.transcoded_blocks()));
  RecordProperty("precision_leases", static_cast<int>(stats.precision_leases()));
  EXPECT_GT(stats.precision_leases(), 0u) << "coarser copies are kept leases by their bytes";
  RecordProperty("fp8_blocks", static_cast<int>(fp8));
  RecordProperty("int4_blocks", static_cast<int>(int4));
  // More blocks than fit raw: the point of the exercise.
  EXPECT_GT(stats.tiers(0).blocks(), kDramBytes / kRawBytes) << stats.DebugString();

  std::vector<size_t> per_format = FetchAndCheck(*ns, keys, raw);
  EXPECT_GT(per_format[1] + per_format[3], 0u);
  EXPECT_EQ(per_format[4], 0u);

  // A republish of raw data replaces a transcoded block.
  size_t coarse = kCount;
  {
    auto buffer = client_->Allocate(kCount * kRawBytes);
    ASSERT_TRUE(buffer.ok());
    std::vector<FetchItem> items;
    for (size_t i = 0; i < kCount; ++i) items.push_back({keys[i], buffer->get(), i * kRawBytes});
    auto fetched = ns->Fetch(items);
    ASSERT_TRUE(fetched.ok());
    for (size_t i = 0; i < kCount && coarse == kCount; ++i)
      if (fetched->outcomes[i] == BlockOutcome::kOk && fetched->formats[i] != StoredFormat::kRaw) coarse = i;
  }
  ASSERT_LT(coarse, kCount) << "no transcoded block to republish";
  auto one = client_->Allocate(kRawBytes);
  ASSERT_TRUE(one.ok());
  std::memcpy((*one)->data(), raw.data() + coarse * kRawBytes, kRawBytes);
  auto republished = ns->Publish({{keys[coarse], std::nullopt, one->get(), 0}});
  ASSERT_TRUE(republished.ok());
  EXPECT_EQ(republished->outcomes[0], BlockOutcome::kOk) << "taken again, not ALREADY_PRESENT";
  std::memset((*one)->data(), 0, kRawBytes);
  auto back = ns->Fetch({{keys[coarse], one->get(), 0}});
  ASSERT_TRUE(back.ok());
  ASSERT_EQ(back->outcomes[0], BlockOutcome::kOk);
  EXPECT_EQ(back->formats[0], StoredFormat::kRaw);
  EXPECT_EQ(std::memcmp((*one)->data(), raw.data() + coarse * kRawBytes, kRawBytes), 0);
}

TEST_F(PrecisionTest, NamespaceWithoutBudgetIsNeverTranscoded) {
  ASSERT_NO_FATAL_FAILURE(StartNode());
  auto ns = client_->OpenNamespace(Spec("no-budget", v1::FORMAT_RAW));
  ASSERT_TRUE(ns.ok()) << ns.status();
  constexpr size_t kCount = 320;
  std::vector<BlockKey> keys;
  std::vector<uint8_t> raw;
  ASSERT_NO_FATAL_FAILURE(PublishPrompt(*ns, 2, kCount, &keys, &raw));
  const v1::StatsResponse stats = Stats();
  EXPECT_EQ(stats.transcoded_blocks(), 0u);
  EXPECT_EQ(FormatBlocks(stats, v1::FORMAT_FP8_E4M3) + FormatBlocks(stats, v1::FORMAT_INT4_KIVI), 0u);
  EXPECT_LE(stats.tiers(0).blocks(), kDramBytes / kRawBytes);
  std::vector<size_t> per_format = FetchAndCheck(*ns, keys, raw);
  EXPECT_GT(per_format[0], 0u);
  EXPECT_EQ(per_format[1] + per_format[2] + per_format[3] + per_format[4], 0u);
}

TEST_F(PrecisionTest, FetchesDuringTranscodesSeeOneWholeVersion) {
  ASSERT_NO_FATAL_FAILURE(StartNode());
  auto ns = client_->OpenNamespace(Spec("concurrent", v1::FORMAT_INT4_KIVI));
  ASSERT_TRUE(ns.ok()) << ns.status();
  // A reader walks the first prompt a block at a time, slowly enough that
  // its blocks age into LRU victims between visits, while a second prompt's
  // publishes transcode them: each block it gets must be one whole version
  // (raw, or a rung of the ladder), whose checksum the client verified.
  constexpr size_t kFirst = 64, kSecond = 512;
  std::vector<BlockKey> keys;
  std::vector<uint8_t> raw;
  ASSERT_NO_FATAL_FAILURE(PublishPrompt(*ns, 3, kFirst, &keys, &raw));
  std::atomic<bool> done{false};
  std::atomic<size_t> fetched_blocks{0}, coarse_seen{0};
  std::thread reader([&] {
    auto c = Client::Connect({.node_address = node_->address(), .timeout = absl::Seconds(30)});
    ASSERT_TRUE(c.ok());
    auto rns = (*c)->OpenNamespace(Spec("concurrent", v1::FORMAT_INT4_KIVI));
    ASSERT_TRUE(rns.ok());
    auto buffer = (*c)->Allocate(kRawBytes);
    ASSERT_TRUE(buffer.ok());
    for (size_t n = 0; !done.load(); ++n) {
      const size_t i = n % kFirst;
      auto fetched = rns->Fetch({{keys[i], buffer->get(), 0}});
      ASSERT_TRUE(fetched.ok()) << fetched.status();
      ASSERT_NE(fetched->outcomes[0], BlockOutcome::kChecksumMismatch) << "torn block " << i;
      if (fetched->outcomes[0] == BlockOutcome::kOk) {
        const StoredFormat f = fetched->formats[0];
        if (f != StoredFormat::kRaw) coarse_seen.fetch_add(1);
        const std::vector<uint8_t> want = Reference(raw.data() + i * kRawBytes, f);
        ASSERT_EQ(std::memcmp((*buffer)->data(), want.data(), kRawBytes), 0)
            << "block " << i << " (format " << int(f) << ") is neither version";
        fetched_blocks.fetch_add(1);
      }
      absl::SleepFor(absl::Milliseconds(2));
    }
  });
  std::vector<BlockKey> more;
  std::vector<uint8_t> more_raw;
  // The reader's pin may leave a publish without room now and then.
  PublishPrompt(*ns, 4, kSecond, &more, &more_raw, /*all_stored=*/false);
  done.store(true);
  reader.join();
  EXPECT_GT(fetched_blocks.load(), 0u);
  EXPECT_GT(coarse_seen.load(), 0u) << "the reader never met a transcoded block";
  EXPECT_GT(Stats().transcoded_blocks(), 0u);
}

TEST_F(PrecisionTest, TheCApiOpensWithABudgetAndFetchesDecodedBlocksWithTheirFormats) {
  ASSERT_NO_FATAL_FAILURE(StartNode());
  kvs_client* c = nullptr;
  ASSERT_EQ(kvs_connect(node_->address().c_str(), 20000, &c), 0) << kvs_last_error();
  kvs_namespace_spec spec{};
  spec.tenant = "test";
  spec.model = "c-api";
  spec.dtype = KVS_DTYPE_FP16;
  spec.num_layers = kLayers;
  spec.num_kv_heads = kHeads;
  spec.head_dim = kHeadDim;
  spec.tokens_per_block = kTokens;
  kvs_namespace* ns = nullptr;
  EXPECT_NE(kvs_open_namespace_with_budget(c, &spec, 17, &ns), 0) << "not a format";
  ASSERT_EQ(kvs_open_namespace_with_budget(c, &spec, KVS_FORMAT_INT4_KIVI, &ns), 0) << kvs_last_error();
  constexpr size_t kCount = 320, kBatch = 4;
  const std::vector<uint32_t> tokens = testing::Tokens(6, kCount, kTokens);
  std::vector<kvs_key> keys(kCount);
  ASSERT_EQ(kvs_compute_keys(ns, tokens.data(), tokens.size(), nullptr, keys.data(), kCount), kCount);
  kvs_buffer* buffer = nullptr;
  ASSERT_EQ(kvs_allocate(c, kCount * kRawBytes, &buffer), 0) << kvs_last_error();
  auto* bytes = static_cast<uint8_t*>(kvs_buffer_data(buffer));
  for (size_t i = 0; i < kCount; ++i) FillKv(6000 + i, bytes + i * kRawBytes);
  const std::vector<uint8_t> raw(bytes, bytes + kCount * kRawBytes);
  for (size_t start = 0; start < kCount; start += kBatch) {
    kvs_publish_item items[kBatch] = {};
    for (size_t k = 0; k < kBatch; ++k) {
      items[k].key = keys[start + k];
      items[k].has_parent = start + k > 0;
      if (items[k].has_parent) items[k].parent = keys[start + k - 1];
      items[k].offset = (start + k) * kRawBytes;
    }
    ASSERT_EQ(kvs_publish(ns, buffer, items, kBatch, nullptr), 0) << kvs_last_error();
  }
  std::memset(bytes, 0, kCount * kRawBytes);
  std::vector<size_t> offsets(kCount);
  for (size_t i = 0; i < kCount; ++i) offsets[i] = i * kRawBytes;
  std::vector<int> outcomes(kCount), formats(kCount, -1);
  ASSERT_EQ(kvs_fetch_with_formats(ns, buffer, keys.data(), offsets.data(), kCount, outcomes.data(),
                                   formats.data()),
            0)
      << kvs_last_error();
  size_t coarse = 0;
  for (size_t i = 0; i < kCount; ++i) {
    if (outcomes[i] != KVS_BLOCK_OK) continue;
    coarse += formats[i] != KVS_FORMAT_RAW;
    const std::vector<uint8_t> want = Reference(raw.data() + i * kRawBytes, static_cast<StoredFormat>(formats[i]));
    EXPECT_EQ(std::memcmp(bytes + i * kRawBytes, want.data(), kRawBytes), 0) << "block " << i;
  }
  EXPECT_GT(coarse, 0u);
  kvs_buffer_destroy(buffer);
  kvs_namespace_destroy(ns);
  kvs_client_destroy(c);
}

TEST_F(PrecisionTest, TranscodedBlocksDemoteToNvmeAndRecoverWithTheirFormat) {
  auto temp = testing::TempDir::Create("kvstrata-precision");
  ASSERT_TRUE(temp.ok()) << temp.status();
  const std::vector<std::string> nvme = {"--nvme_dirs=" + (*temp)->path() + "/nvme0",
                                         "--nvme_capacity_bytes=268435456", "--nvme_demotion_wait=10s",
                                         "--nvme_flush_on_shutdown=false"};
  ASSERT_NO_FATAL_FAILURE(StartNode(nvme));
  // Budget fp8: a block is transcoded once, then demoted as fp8.
  auto ns = client_->OpenNamespace(Spec("nvme-fp8", v1::FORMAT_FP8_E4M3));
  ASSERT_TRUE(ns.ok()) << ns.status();
  constexpr size_t kCount = 400;
  std::vector<BlockKey> keys;
  std::vector<uint8_t> raw;
  ASSERT_NO_FATAL_FAILURE(PublishPrompt(*ns, 5, kCount, &keys, &raw));
  // Wait until the write-behind caught up with what DRAM gave up.
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  uint64_t on_nvme = 0;
  while (absl::Now() < deadline) {
    const v1::StatsResponse s = Stats();
    if (s.tiers_size() > 1 && s.tiers(0).blocks() + s.tiers(1).blocks() >= kCount) {
      on_nvme = s.tiers(1).blocks();
      break;
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
  ASSERT_GT(on_nvme, 0u) << Stats().DebugString();

  ASSERT_NO_FATAL_FAILURE(StartNode(nvme));  // SIGTERM, DRAM not flushed, same directory
  auto reopened = client_->OpenNamespace(Spec("nvme-fp8", v1::FORMAT_FP8_E4M3));
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  auto lookup = reopened->Lookup(keys);
  ASSERT_TRUE(lookup.ok());
  ASSERT_GT(lookup->prefix_length, 0u) << "blocks on NVMe survive the restart";
  uint64_t nvme_fp8 = 0;
  const v1::StatsResponse recovered = Stats();
  for (const auto& f : recovered.formats())
    if (f.tier() == v1::TIER_NVME && f.format() == v1::FORMAT_FP8_E4M3) nvme_fp8 = f.blocks();
  EXPECT_GT(nvme_fp8, 0u) << "the recovered index knows each block's format";
  std::vector<BlockKey> head(keys.begin(), keys.begin() + lookup->prefix_length);
  std::vector<size_t> per_format = FetchAndCheck(*reopened, head, raw);
  // Demotion is LRU order, so the recovered head was transcoded before it left.
  EXPECT_GT(per_format[1], 0u) << "recovered blocks keep their fp8 format";
  EXPECT_EQ(per_format[1] + per_format[0], lookup->prefix_length);
}

}  // namespace
}  // namespace kvstrata
