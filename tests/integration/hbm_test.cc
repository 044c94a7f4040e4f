// The HBM tier through real node processes without a GPU: kvstrata-test-node
// is the node's own main and library with the host-memory device double
// (tests/support/device), whose device pointers the host cannot touch. Real
// UCX over loopback (ctest runs this over TCP and over shared memory), real
// RocksDB for the NVMe tier below.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kvstrata.grpc.pb.h"
#include "kvstrata/client/client.h"
#include "kvstrata/testing/blocks.h"
#include "kvstrata/testing/http.h"
#include "kvstrata/testing/node_fixture.h"
#include "kvstrata/testing/process.h"
#include "kvstrata/testing/streams.h"
#include "kvstrata/transfer/device_memory.h"

namespace kvstrata {
namespace {

using client::BlockOutcome;
using client::Client;
using client::Namespace;
using client::Tier;
using testing::ChildProcess;
using testing::FetchAndVerify;
using testing::NodeProcess;
using testing::PublishStream;

constexpr uint64_t kBlock = 256 * 1024;
constexpr uint32_t kTokensPerBlock = 16;
constexpr uint64_t kSlab = 1 << 20;

// The node under test: kvstrata-test-node (the GPU double), or the binary
// KVSTRATA_HBM_NODE names: scripts/gpu-check.sh runs these tests against the
// real kvstrata-node on a GPU.
std::string HbmNodeBinary() {
  const char* node = std::getenv("KVSTRATA_HBM_NODE");
  return node != nullptr && *node != '\0' ? node : KVSTRATA_TEST_NODE_BINARY;
}

v1::NamespaceSpec Spec() { return testing::OpaqueSpec("hbm-test", kBlock, kTokensPerBlock); }

std::string HbmFlag(uint64_t blocks) { return absl::StrCat("--hbm_bytes=", blocks * kBlock); }
std::string DramFlag(uint64_t blocks) { return absl::StrCat("--dram_bytes=", blocks * kBlock); }

const v1::TierStats* FindTier(const v1::StatsResponse& stats, v1::Tier tier) {
  for (const auto& t : stats.tiers()) {
    if (t.tier() == tier) return &t;
  }
  return nullptr;
}

class HbmNodeTest : public testing::NodeClientTest {
 protected:
  void SetUp() override {
    auto temp = testing::TempDir::Create("kvstrata-hbm-node");
    ASSERT_TRUE(temp.ok()) << temp.status();
    temp_ = *std::move(temp);
  }

  // Starts (or restarts) the test node; `nvme` adds an NVMe tier in the
  // fixture's directory (kept across restarts).
  void StartNode(std::vector<std::string> extra, bool nvme = false) {
    std::vector<std::string> flags = {absl::StrCat("--slab_bytes=", kSlab), "--transfer_timeout=5s",
                                      "--eviction_policy=lru"};
    if (nvme) {
      flags.insert(flags.end(),
                   {"--nvme_dirs=" + temp_->File("nvme0"), "--nvme_capacity_bytes=268435456",
                    "--nvme_demotion_wait=10s", "--nvme_eviction_policy=lru"});
    }
    flags.insert(flags.end(), extra.begin(), extra.end());
    StartNodeAndClient(HbmNodeBinary(), flags, {.timeout = absl::Seconds(20)}, Spec());
  }

  uint64_t Blocks(v1::Tier tier) {
    const v1::StatsResponse s = Stats();
    const v1::TierStats* t = FindTier(s, tier);
    return t == nullptr ? 0 : t->blocks();
  }
  std::vector<BlockKey> Keys(uint64_t seed, size_t count) {
    return ns_->Keys(testing::Tokens(seed, count, kTokensPerBlock));
  }
  std::vector<Tier> Tiers(uint64_t seed, size_t count) {
    auto lookup = ns_->Lookup(Keys(seed, count));
    EXPECT_TRUE(lookup.ok()) << lookup.status();
    return lookup.ok() ? lookup->tiers : std::vector<Tier>{};
  }
  size_t Publish(uint64_t seed, size_t count, size_t batch = 16) {
    auto published = PublishStream(*client_, *ns_, seed, count, batch);
    EXPECT_TRUE(published.ok()) << published.status();
    return published.ok() ? published->count(BlockOutcome::kOk) : 0;
  }
  // No transfer holds staging memory, and every allocated chunk of HBM and
  // DRAM belongs to a stored block: nothing leaked.
  void ExpectNothingHeld() {
    v1::StatsResponse s = Stats();
    const absl::Time deadline = absl::Now() + absl::Seconds(20);
    while (s.hbm_staging_leased_bytes() != 0 && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(50));
      s = Stats();
    }
    EXPECT_EQ(s.hbm_staging_leased_bytes(), 0u) << s.DebugString();
    for (v1::Tier tier : {v1::TIER_HBM, v1::TIER_DRAM}) {
      const v1::TierStats* t = FindTier(s, tier);
      ASSERT_NE(t, nullptr);
      EXPECT_EQ(t->used_bytes(), t->blocks() * kBlock)
          << v1::Tier_Name(tier) << " " << s.DebugString();
    }
  }

  std::unique_ptr<testing::TempDir> temp_;
};

TEST_F(HbmNodeTest, NewBlocksGoToHbmAndFetchByteExactThroughStaging) {
  StartNode({HbmFlag(64), DramFlag(64)});
  ASSERT_EQ(Publish(1, 32), 32u);
  EXPECT_EQ(Tiers(1, 32), std::vector<Tier>(32, Tier::kHbm));
  EXPECT_EQ(Blocks(v1::TIER_HBM), 32u);
  EXPECT_EQ(Blocks(v1::TIER_DRAM), 0u) << "a published block lands in DRAM only on its way up";
  EXPECT_EQ(FetchAndVerify(*client_, *ns_, 1, 32, 16), 32u);
  const v1::StatsResponse s = Stats();
  EXPECT_EQ(s.hbm_staged_blocks(), 32u);
  EXPECT_EQ(s.hbm_staging_fallbacks(), 0u);
  if (HbmNodeBinary() == KVSTRATA_TEST_NODE_BINARY) {
    EXPECT_EQ(s.gpu_device(), "host double");
    EXPECT_FALSE(s.hbm_ucx_cuda_memory()) << "Debian's UCX 1.13 has no CUDA support";
  }
  EXPECT_FALSE(s.gpu_device().empty());
  EXPECT_EQ(FindTier(s, v1::TIER_HBM)->capacity_bytes(), 64 * kBlock);
  EXPECT_EQ(FindTier(s, v1::TIER_HBM)->errors(), 0u);
  ExpectNothingHeld();
}

TEST_F(HbmNodeTest, EvictionsGoHbmToDramToNvmeAndHitsComeBackUp) {
  // 16 blocks of HBM over 32 of DRAM over NVMe; 120 blocks pass through.
  StartNode({HbmFlag(16), DramFlag(32)}, /*nvme=*/true);
  constexpr size_t kCount = 120;
  ASSERT_EQ(Publish(2, kCount), kCount);
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (Blocks(v1::TIER_HBM) + Blocks(v1::TIER_DRAM) + Blocks(v1::TIER_NVME) < kCount &&
         absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  v1::StatsResponse s = Stats();
  EXPECT_EQ(FindTier(s, v1::TIER_HBM)->blocks(), 16u);
  EXPECT_GT(s.hbm_demoted_blocks(), 0u);
  EXPECT_EQ(s.hbm_demotion_drops(), 0u);
  EXPECT_GT(s.demoted_blocks(), 0u) << "DRAM evictions reached NVMe";
  const std::vector<Tier> tiers = Tiers(2, kCount);
  ASSERT_EQ(tiers.size(), kCount);
  EXPECT_EQ(tiers.front(), Tier::kNvme) << "the oldest went all the way down";
  EXPECT_EQ(tiers.back(), Tier::kHbm) << "the newest are hot";
  // Oldest to newest (LRU in every tier): NVMe, then DRAM, then HBM. How
  // many DRAM holds depends on how fast NVMe writes free its chunks.
  auto rank = [](Tier t) { return t == Tier::kNvme ? 0 : t == Tier::kDram ? 1 : 2; };
  for (size_t i = 1; i < kCount; ++i) EXPECT_LE(rank(tiers[i - 1]), rank(tiers[i])) << i;
  EXPECT_GT(std::count(tiers.begin(), tiers.end(), Tier::kDram), 0);
  EXPECT_EQ(std::count(tiers.begin(), tiers.end(), Tier::kHbm), 16);

  // A hit on NVMe comes up into HBM (by way of DRAM) and stays byte-exact.
  const uint64_t promoted_before = s.hbm_promoted_blocks();
  EXPECT_EQ(FetchAndVerify(*client_, *ns_, 2, 8, 8), 8u);
  EXPECT_EQ(Tiers(2, 8), std::vector<Tier>(8, Tier::kHbm));
  s = Stats();
  EXPECT_EQ(s.hbm_promoted_blocks(), promoted_before + 8);
  EXPECT_GE(s.promoted_blocks(), 8u) << "read back from NVMe first";
  // Every block is still somewhere, and right.
  EXPECT_EQ(FetchAndVerify(*client_, *ns_, 2, kCount, 16), kCount);
  EXPECT_EQ(Stats().fetch_miss_blocks(), 0u);
  ExpectNothingHeld();
}

TEST_F(HbmNodeTest, DramHitIsPromotedAndTheTiersStayExclusive) {
  StartNode({HbmFlag(16), DramFlag(64)});
  ASSERT_EQ(Publish(3, 40), 40u);
  EXPECT_EQ(Blocks(v1::TIER_HBM), 16u);
  EXPECT_EQ(Blocks(v1::TIER_DRAM), 24u) << "HBM evictions kept in DRAM, none lost";
  EXPECT_EQ(Tiers(3, 4), std::vector<Tier>(4, Tier::kDram));
  EXPECT_EQ(FetchAndVerify(*client_, *ns_, 3, 4, 4), 4u);
  EXPECT_EQ(Tiers(3, 4), std::vector<Tier>(4, Tier::kHbm));
  const v1::StatsResponse s = Stats();
  EXPECT_EQ(s.hbm_promoted_blocks(), 4u);
  // In HBM or in DRAM, never both: the total is unchanged.
  EXPECT_EQ(FindTier(s, v1::TIER_HBM)->blocks() + FindTier(s, v1::TIER_DRAM)->blocks(), 40u);
  // ListBlocks (re-replication) names each block's tier, once.
  auto stub = v1::CacheNode::NewStub(
      grpc::CreateChannel(node_->address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  v1::ListBlocksRequest request;
  request.set_namespace_id(ns_->id());
  request.set_limit(4096);
  v1::ListBlocksResponse listed;
  ASSERT_TRUE(stub->ListBlocks(&context, request, &listed).ok());
  size_t in_hbm = 0, in_dram = 0;
  for (const v1::ListedBlock& b : listed.blocks()) {
    in_hbm += b.tier() == v1::TIER_HBM;
    in_dram += b.tier() == v1::TIER_DRAM;
  }
  EXPECT_EQ(in_hbm, 16u);
  EXPECT_EQ(in_dram, 24u);
  EXPECT_EQ(FetchAndVerify(*client_, *ns_, 3, 40, 8), 40u);
  ExpectNothingHeld();
}

TEST_F(HbmNodeTest, AFullStagingPoolFallsBackAndStaysByteExact) {
  // 4 blocks of staging for fetches of 32 HBM blocks at once.
  StartNode({HbmFlag(64), DramFlag(64), absl::StrCat("--hbm_staging_bytes=", 4 * kBlock)});
  ASSERT_EQ(Publish(4, 32), 32u);
  EXPECT_EQ(FetchAndVerify(*client_, *ns_, 4, 32, 32), 32u);
  const v1::StatsResponse s = Stats();
  EXPECT_EQ(s.hbm_staged_blocks(), 32u);
  EXPECT_EQ(s.hbm_staging_fallbacks(), 28u);
  EXPECT_EQ(s.hbm_staging_bytes(), 4 * kBlock);
  ExpectNothingHeld();
}

TEST_F(HbmNodeTest, FetchesStayByteExactWhilePublishesEvictWhatTheyRead) {
  // Fetches of HBM blocks race publishes that evict them: a fetched block is
  // pinned (its HBM chunk and its staging copy) until sent, so every block
  // that comes back OK has the right bytes.
  StartNode({HbmFlag(16), DramFlag(64)});
  ASSERT_EQ(Publish(5, 16), 16u);
  std::atomic<bool> stop{false};
  std::thread publisher([&, address = node_->address()] {
    auto c = Client::Connect({.node_address = address, .timeout = absl::Seconds(20)});
    if (!c.ok()) return;
    auto ns = (*c)->OpenNamespace(Spec());
    if (!ns.ok()) return;
    for (uint64_t seed = 100; !stop; ++seed) PublishStream(**c, *ns, seed, 16, 16).IgnoreError();
  });
  const std::vector<BlockKey> keys = Keys(5, 16);
  auto buffer = client_->Allocate(16 * kBlock);
  ASSERT_TRUE(buffer.ok());
  std::vector<uint8_t> expected(kBlock);
  size_t ok = 0, wrong = 0;
  for (int round = 0; round < 40; ++round) {
    std::vector<client::FetchItem> items;
    for (size_t i = 0; i < 16; ++i) items.push_back({keys[i], buffer->get(), i * kBlock});
    std::memset((*buffer)->data(), 0, 16 * kBlock);
    auto fetched = ns_->Fetch(items);
    ASSERT_TRUE(fetched.ok()) << fetched.status();
    for (size_t i = 0; i < 16; ++i) {
      if (fetched->outcomes[i] != BlockOutcome::kOk) continue;
      testing::FillBlock(5, i, expected.data(), kBlock);
      ++ok;
      wrong += std::memcmp(expected.data(), (*buffer)->data() + i * kBlock, kBlock) != 0;
    }
  }
  stop = true;
  publisher.join();
  EXPECT_EQ(wrong, 0u);
  EXPECT_GT(ok, 16u);
  const v1::StatsResponse s = Stats();
  EXPECT_GT(FindTier(s, v1::TIER_HBM)->evictions(), 0u) << "the publisher never evicted";
  EXPECT_EQ(FindTier(s, v1::TIER_HBM)->errors(), 0u);
  ExpectNothingHeld();
}

TEST_F(HbmNodeTest, MetricsReportEachTierAndTheStaging) {
  StartNode({HbmFlag(32), DramFlag(64), "--metrics_listen=127.0.0.1:0"});
  ASSERT_EQ(Publish(6, 8), 8u);
  EXPECT_EQ(FetchAndVerify(*client_, *ns_, 6, 8, 8), 8u);
  auto metrics = testing::HttpGet("127.0.0.1", node_->metrics_port(), "/metrics");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  const std::string& body = metrics->body;
  EXPECT_NE(body.find("kvstrata_tier_blocks{tier=\"hbm\"} 8"), std::string::npos) << body;
  EXPECT_NE(body.find("kvstrata_tier_blocks{tier=\"dram\"} 0"), std::string::npos);
  EXPECT_NE(body.find(absl::StrCat("kvstrata_tier_capacity_bytes{tier=\"hbm\"} ", 32 * kBlock)),
            std::string::npos);
  EXPECT_NE(body.find("kvstrata_hbm_staged_blocks_total{buffer=\"staging\"} 8"), std::string::npos);
  EXPECT_NE(body.find("kvstrata_hbm_moves_total{move=\"promoted\"} 0"), std::string::npos);
}

TEST_F(HbmNodeTest, AClientKilledMidStagedFetchLeaksNothing) {
  StartNode({HbmFlag(64), DramFlag(64)});
  ASSERT_EQ(Publish(7, 32), 32u);
  auto child = ChildProcess::SpawnSelf({"--child=fetch_forever", "--node=" + node_->address()});
  ASSERT_TRUE(child.ok()) << child.status();
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (Stats().hbm_staged_blocks() < 32 * 8 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_GE(Stats().hbm_staged_blocks(), 32u * 8) << "the fetcher never got going";
  (*child)->Signal(SIGKILL);
  EXPECT_EQ((*child)->Wait(), -SIGKILL);
  ExpectNothingHeld();
  EXPECT_EQ(Blocks(v1::TIER_HBM), 32u);
  EXPECT_EQ(FetchAndVerify(*client_, *ns_, 7, 32, 16), 32u);
  ASSERT_EQ(Publish(8, 8), 8u);
  EXPECT_EQ(FetchAndVerify(*client_, *ns_, 8, 8, 8), 8u);
}

// Tenant quotas cover HBM as well as DRAM (docs/ARCHITECTURE.md §4): a tenant
// flooding an HBM node keeps at most its quota in memory, and displaces its
// own blocks, not another tenant's from HBM. Before, its blocks in HBM were
// not counted: acme held all of HBM and pushed globex's blocks down to DRAM.
TEST_F(HbmNodeTest, ATenantsQuotaCoversItsHbmBlocksAndSparesOtherTenants) {
  const std::string acme_token = "acme-token", globex_token = "globex-token",
                    admin_token = "admin-token";
  const auto digest = [](const std::string& text) {
    const std::string command = "printf %s '" + text + "' | sha256sum";
    FILE* pipe = popen(command.c_str(), "r");
    char out[65] = {};
    if (pipe == nullptr || fread(out, 1, 64, pipe) != 64) ADD_FAILURE() << "sha256sum failed";
    if (pipe != nullptr) pclose(pipe);
    return std::string(out, 64);
  };
  constexpr uint64_t kQuotaBlocks = 8;
  const std::string auth = temp_->File("auth");
  {
    std::ofstream file(auth);
    file << "token sha256:" << digest(acme_token) << " tenant acme\n"
         << "token sha256:" << digest(globex_token) << " tenant globex\n"
         << "token sha256:" << digest(admin_token) << " admin *\n"
         << "quota acme dram_bytes=" << kQuotaBlocks * kBlock << "\n";
  }
  auto node = NodeProcess::Start(
      HbmNodeBinary(), {absl::StrCat("--slab_bytes=", kSlab), "--transfer_timeout=5s",
                        "--eviction_policy=lru", HbmFlag(32), DramFlag(64), "--auth_file=" + auth});
  ASSERT_TRUE(node.ok()) << node.status();
  const auto connect = [&](const std::string& token) {
    std::unique_ptr<Client> c;
    for (int i = 0; i < 100 && c == nullptr; ++i) {  // until the node serves
      auto connected = Client::Connect(
          {.node_address = (*node)->address(), .timeout = absl::Seconds(20), .auth_token = token});
      if (connected.ok()) c = *std::move(connected);
      else absl::SleepFor(absl::Milliseconds(50));
    }
    return c;
  };
  const auto spec = [](const std::string& tenant) {
    v1::NamespaceSpec s = Spec();
    s.set_tenant(tenant);
    return s;
  };
  std::unique_ptr<Client> globex = connect(globex_token), acme = connect(acme_token),
                          admin = connect(admin_token);
  ASSERT_TRUE(globex && acme && admin);
  auto kept = globex->OpenNamespace(spec("globex"));
  auto flood = acme->OpenNamespace(spec("acme"));
  ASSERT_TRUE(kept.ok() && flood.ok()) << kept.status() << flood.status();
  ASSERT_EQ(PublishStream(*globex, *kept, 70, 8, 4)->count(BlockOutcome::kOk), 8u);

  auto flooded = PublishStream(*acme, *flood, 71, 100, 4);
  ASSERT_TRUE(flooded.ok()) << flooded.status();
  EXPECT_EQ(flooded->count(BlockOutcome::kOk), 100u) << "a tenant at its quota makes room";

  v1::StatsResponse stats;
  ASSERT_TRUE(admin->Stats(&stats).ok());
  const v1::TierStats* hbm = FindTier(stats, v1::TIER_HBM);
  const v1::TierStats* dram = FindTier(stats, v1::TIER_DRAM);
  ASSERT_TRUE(hbm != nullptr && dram != nullptr);
  EXPECT_LE(hbm->blocks() + dram->blocks(), 8 + kQuotaBlocks)
      << "acme holds more than its quota in memory: " << stats.DebugString();
  bool found = false;
  for (const v1::TenantStats& tenant : stats.tenants()) {
    if (tenant.tenant() != "acme") continue;
    found = true;
    EXPECT_LE(tenant.dram_bytes(), kQuotaBlocks * kBlock) << "HBM and DRAM bytes together";
    EXPECT_GE(tenant.quota_evictions(), 100 - kQuotaBlocks);
  }
  EXPECT_TRUE(found) << stats.DebugString();
  // globex's blocks stayed where they were, in HBM, and are served.
  auto lookup = kept->Lookup(kept->Keys(testing::Tokens(70, 8, kTokensPerBlock)));
  ASSERT_TRUE(lookup.ok()) << lookup.status();
  ASSERT_EQ(lookup->tiers.size(), 8u);
  EXPECT_EQ(std::count(lookup->tiers.begin(), lookup->tiers.end(), Tier::kHbm), 8)
      << "acme's flood pushed globex's blocks out of HBM";
  EXPECT_EQ(FetchAndVerify(*globex, *kept, 70, 8, 4), 8u);
  // acme kept its newest quota's worth, and they are served.
  EXPECT_EQ(FetchAndVerify(*acme, *flood, 71, 100, 4), kQuotaBlocks);
}

// A quantized namespace's blocks keep their stored format through HBM: a
// Fetch reports int8 (not raw, which would have the client take the encoded
// bytes for KV), and a republish finds them present. HBM copies used to drop
// the format.
TEST_F(HbmNodeTest, AQuantizedNamespacesBlocksKeepTheirFormatInHbm) {
  StartNode({HbmFlag(16), DramFlag(64)});
  v1::NamespaceSpec spec;
  spec.set_model("hbm-int8");
  spec.set_dtype(v1::DTYPE_FP16);
  spec.set_num_layers(1);
  spec.set_num_kv_heads(8);
  spec.set_head_dim(128);
  spec.set_tokens_per_block(kTokensPerBlock);
  spec.set_format(v1::FORMAT_INT8);
  auto ns = client_->OpenNamespace(spec);
  ASSERT_TRUE(ns.ok()) << ns.status();
  constexpr size_t kCount = 4;
  const uint64_t block = ns->block_bytes();
  auto buffer = client_->Allocate(kCount * block);
  ASSERT_TRUE(buffer.ok()) << buffer.status();
  for (size_t i = 0; i < kCount * block / 2; ++i) {  // small fp16 values
    const _Float16 h = static_cast<_Float16>(static_cast<float>(i % 17) / 16.0f - 0.5f);
    std::memcpy((*buffer)->data() + 2 * i, &h, 2);
  }
  const std::vector<BlockKey> keys = ns->Keys(testing::Tokens(80, kCount, kTokensPerBlock));
  std::vector<client::PublishItem> publish;
  for (size_t i = 0; i < kCount; ++i) {
    publish.push_back({keys[i], i ? std::optional(keys[i - 1]) : std::nullopt, buffer->get(), i * block});
  }
  auto published = ns->Publish(publish);
  ASSERT_TRUE(published.ok()) << published.status();
  ASSERT_EQ(published->count(BlockOutcome::kOk), kCount);
  auto lookup = ns->Lookup(keys);
  ASSERT_TRUE(lookup.ok());
  EXPECT_EQ(std::count(lookup->tiers.begin(), lookup->tiers.end(), Tier::kHbm), int(kCount));

  std::vector<client::FetchItem> fetch;
  for (size_t i = 0; i < kCount; ++i) fetch.push_back({keys[i], buffer->get(), i * block});
  auto fetched = ns->Fetch(fetch);
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  for (size_t i = 0; i < kCount; ++i) {
    EXPECT_EQ(fetched->outcomes[i], BlockOutcome::kOk) << i;
    EXPECT_EQ(fetched->formats[i], client::StoredFormat::kInt8) << "block " << i << " from HBM";
  }
  auto again = ns->Publish(publish);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->count(BlockOutcome::kAlreadyPresent), kCount)
      << "a republish took the HBM copies for coarser ones";
}

TEST_F(HbmNodeTest, ARestartLosesHbmAndADeleteIsNeverServed) {
  StartNode({HbmFlag(32), DramFlag(32)});
  ASSERT_EQ(Publish(9, 8), 8u);
  const std::vector<BlockKey> keys = Keys(9, 8);
  ASSERT_EQ(ns_->Delete({keys[7]}).value(), 1u);
  {
    auto buffer = client_->Allocate(kBlock);  // released before the client is
    auto fetched = ns_->Fetch({{keys[7], buffer->get(), 0}});
    ASSERT_TRUE(fetched.ok());
    EXPECT_EQ(fetched->outcomes[0], BlockOutcome::kNotFound);
  }
  EXPECT_EQ(Tiers(9, 8).size(), 7u);
  node_->process().Signal(SIGKILL);
  node_->process().Wait();
  StartNode({HbmFlag(32), DramFlag(32)});
  EXPECT_TRUE(Tiers(9, 8).empty());
  EXPECT_EQ(FetchAndVerify(*client_, *ns_, 9, 8, 8), 0u);
  EXPECT_EQ(Stats().fetch_hit_blocks(), 0u);
}

TEST_F(HbmNodeTest, ACleanShutdownWritesHbmToNvme) {
  StartNode({HbmFlag(32), DramFlag(32)}, /*nvme=*/true);
  ASSERT_EQ(Publish(10, 12), 12u);
  ASSERT_EQ(Tiers(10, 12), std::vector<Tier>(12, Tier::kHbm));
  client_.reset();
  node_.reset();  // SIGTERM
  StartNode({HbmFlag(32), DramFlag(32)}, /*nvme=*/true);
  EXPECT_EQ(Tiers(10, 12), std::vector<Tier>(12, Tier::kNvme));
  EXPECT_EQ(FetchAndVerify(*client_, *ns_, 10, 12, 12), 12u);
  EXPECT_EQ(Tiers(10, 12), std::vector<Tier>(12, Tier::kHbm)) << "hits come back up";
}

// Device copies that fail (the double's fault injection) never turn into
// wrong bytes: a publish whose copy up fails is kept in DRAM, an HBM block
// whose copy down fails is a miss, and the node keeps serving.
TEST_F(HbmNodeTest, FailedDeviceCopiesAreMissesOrDramNeverWrongBytes) {
  if (HbmNodeBinary() != KVSTRATA_TEST_NODE_BINARY)
    GTEST_SKIP() << "fault injection is the double's";
  setenv("KVSTRATA_TEST_DEVICE_COPIES", "8", 1);  // one 256 KiB block is one copy
  StartNode({HbmFlag(32), DramFlag(64)});
  unsetenv("KVSTRATA_TEST_DEVICE_COPIES");
  ASSERT_EQ(Publish(11, 8), 8u);
  EXPECT_EQ(Tiers(11, 8), std::vector<Tier>(8, Tier::kHbm));
  // Every copy fails from here on. New blocks stay in DRAM, byte-exact.
  ASSERT_EQ(Publish(12, 8), 8u);
  EXPECT_EQ(Tiers(12, 8), std::vector<Tier>(8, Tier::kDram));
  EXPECT_EQ(FetchAndVerify(*client_, *ns_, 12, 8, 8), 8u);
  EXPECT_EQ(Tiers(12, 8), std::vector<Tier>(8, Tier::kDram)) << "a failed promotion stays put";
  // The HBM blocks cannot be copied down: misses, never other bytes.
  const std::vector<BlockKey> keys = Keys(11, 8);
  auto buffer = client_->Allocate(8 * kBlock);
  ASSERT_TRUE(buffer.ok());
  std::vector<client::FetchItem> items;
  for (size_t i = 0; i < 8; ++i) items.push_back({keys[i], buffer->get(), i * kBlock});
  auto fetched = ns_->Fetch(items);
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  EXPECT_EQ(fetched->count(BlockOutcome::kNotFound), 8u);
  buffer->reset();
  const v1::StatsResponse s = Stats();
  EXPECT_GE(FindTier(s, v1::TIER_HBM)->errors(), 8u + 8u + 1u);
  ExpectNothingHeld();
}

// The real node binary on a machine without a GPU refuses --hbm_bytes with a
// clear message instead of starting without the tier it was asked for.
TEST(HbmRealNodeTest, WithoutAGpuTheNodeRefusesToStart) {
  if (transfer::OpenCudaDevice(0).ok()) GTEST_SKIP() << "this machine has a GPU";
  auto temp = testing::TempDir::Create("kvstrata-hbm-nogpu");
  ASSERT_TRUE(temp.ok());
  auto child =
      ChildProcess::Spawn({KVSTRATA_NODE_BINARY, "--listen=127.0.0.1:0",
                           "--metrics_listen=", "--dram_bytes=67108864", "--hbm_bytes=67108864"},
                          (*temp)->File("log"));
  ASSERT_TRUE(child.ok());
  EXPECT_EQ((*child)->Wait(), 1);
  EXPECT_NE((*child)->LogTail().find("--hbm_bytes needs GPU 0"), std::string::npos)
      << (*child)->LogTail();
}

int RunChild(int argc, char** argv) {
  auto c = Client::Connect({.node_address = testing::ChildArg(argc, argv, "node")});
  if (!c.ok()) return 10;
  auto ns = (*c)->OpenNamespace(Spec());
  if (!ns.ok()) return 11;
  auto buffer = (*c)->Allocate(32 * kBlock);
  if (!buffer.ok()) return 12;
  const std::vector<BlockKey> keys = ns->Keys(testing::Tokens(7, 32, kTokensPerBlock));
  std::vector<client::FetchItem> items;
  for (size_t i = 0; i < 32; ++i) items.push_back({keys[i], buffer->get(), i * kBlock});
  while (true) ns->Fetch(items).IgnoreError();
}

}  // namespace
}  // namespace kvstrata

int main(int argc, char** argv) {
  if (!kvstrata::testing::ChildArg(argc, argv, "child").empty())
    return kvstrata::RunChild(argc, argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
