// Several real kvstrata-node processes as one cache, over real UCX.
#include <signal.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <cstring>
#include <optional>
#include <set>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kvstrata.grpc.pb.h"
#include "kvstrata/client/cluster.h"
#include "kvstrata/common/namespace_spec.h"
#include "kvstrata/testing/auth_file.h"
#include "kvstrata/testing/blocks.h"
#include "kvstrata/testing/process.h"

namespace kvstrata {
namespace {

using client::BlockOutcome;
using client::Cluster;
using client::ClusterNamespace;
using client::ClusterOptions;
using testing::ChildProcess;
using testing::FillBlock;
using testing::NodeProcess;
using testing::Sha256Hex;

constexpr uint64_t kBlock = 16 * 1024;
constexpr uint32_t kTokensPerBlock = 16;

v1::NamespaceSpec Spec() { return testing::OpaqueSpec("cluster", kBlock, kTokensPerBlock); }

std::unique_ptr<NodeProcess> StartNode(int port = 0) {
  std::vector<std::string> flags = {"--dram_bytes=268435456", "--slab_bytes=1048576",
                                    "--transfer_timeout=5s"};
  if (port != 0) flags.push_back(absl::StrCat("--listen=127.0.0.1:", port));  // the last --listen wins
  auto node = NodeProcess::Start(KVSTRATA_NODE_BINARY, flags);
  EXPECT_TRUE(node.ok()) << node.status();
  return node.ok() ? *std::move(node) : nullptr;
}

void StartNodes(int count, std::vector<std::unique_ptr<NodeProcess>>& nodes,
                std::vector<std::string>& addresses) {
  for (int i = 0; i < count; ++i) {
    nodes.push_back(StartNode());
    ASSERT_NE(nodes.back(), nullptr);
    addresses.push_back(nodes.back()->address());
  }
}

std::unique_ptr<Cluster> ConnectCluster(const std::vector<std::string>& nodes, int replication = 1,
                                        absl::Duration timeout = absl::Seconds(20),
                                        uint64_t repair_bytes_per_second = 64 << 20) {
  ClusterOptions options;
  options.repair_bytes_per_second = repair_bytes_per_second;
  options.nodes = nodes;
  options.replication = replication;
  options.refresh_interval = absl::Milliseconds(200);
  options.client.timeout = timeout;
  auto cluster = Cluster::Connect(options);
  EXPECT_TRUE(cluster.ok()) << cluster.status();
  return cluster.ok() ? *std::move(cluster) : nullptr;
}

// Publishes blocks [0, count) of stream `seed` in batches; returns the outcomes.
client::TransferResult PublishStream(Cluster& cluster, ClusterNamespace& ns, uint64_t seed,
                                     size_t count) {
  const auto keys = ns.Keys(testing::Tokens(seed, count, kTokensPerBlock));
  constexpr size_t kBatch = 128;
  auto buffer = cluster.Allocate(kBatch * kBlock);
  client::TransferResult all;
  for (size_t start = 0; start < count; start += kBatch) {
    std::vector<client::PublishItem> items;
    for (size_t i = start; i < std::min(count, start + kBatch); ++i) {
      FillBlock(seed, i, (*buffer)->data() + (i - start) * kBlock, kBlock);
      items.push_back({keys[i], i ? std::optional(keys[i - 1]) : std::nullopt, buffer->get(),
                       (i - start) * kBlock});
    }
    auto result = ns.Publish(items);
    EXPECT_TRUE(result.ok()) << result.status();
    if (!result.ok()) return all;
    all.outcomes.insert(all.outcomes.end(), result->outcomes.begin(), result->outcomes.end());
  }
  return all;
}

// Fetches blocks [0, count) of stream `seed`; returns {fetched, fetched with the right bytes}.
std::pair<size_t, size_t> FetchStream(Cluster& cluster, ClusterNamespace& ns, uint64_t seed,
                                      size_t count) {
  const auto keys = ns.Keys(testing::Tokens(seed, count, kTokensPerBlock));
  constexpr size_t kBatch = 128;
  auto buffer = cluster.Allocate(kBatch * kBlock);
  std::vector<uint8_t> expected(kBlock);
  size_t fetched = 0, right = 0;
  for (size_t start = 0; start < count; start += kBatch) {
    std::vector<client::FetchItem> items;
    for (size_t i = start; i < std::min(count, start + kBatch); ++i) {
      items.push_back({keys[i], buffer->get(), (i - start) * kBlock});
    }
    auto result = ns.Fetch(items);
    EXPECT_TRUE(result.ok()) << result.status();
    if (!result.ok()) continue;
    for (size_t i = start; i < std::min(count, start + kBatch); ++i) {
      if (result->outcomes[i - start] != BlockOutcome::kOk) continue;
      ++fetched;
      FillBlock(seed, i, expected.data(), kBlock);
      right += std::memcmp(expected.data(), (*buffer)->data() + (i - start) * kBlock, kBlock) == 0;
    }
  }
  return {fetched, right};
}

// Three node processes, a cluster client over them and a namespace.
class ThreeNodeTest : public ::testing::Test {
 protected:
  void Start(int replication = 1, absl::Duration timeout = absl::Seconds(20),
             uint64_t repair_bytes_per_second = 64 << 20) {
    ASSERT_NO_FATAL_FAILURE(StartNodes(3, nodes, addresses));
    cluster = ConnectCluster(addresses, replication, timeout, repair_bytes_per_second);
    ASSERT_NE(cluster, nullptr);
    // A first health check can miss its 500 ms on a loaded machine (new
    // channels, three fresh processes); the next refresh, 200 ms on, retries.
    auto opened = cluster->OpenNamespace(Spec());
    for (int i = 0; i < 50 && absl::IsUnavailable(opened.status()); ++i) {
      absl::SleepFor(absl::Milliseconds(200));
      opened = cluster->OpenNamespace(Spec());
    }
    ASSERT_TRUE(opened.ok()) << opened.status();
    ns.emplace(*opened);
  }

  std::vector<std::unique_ptr<NodeProcess>> nodes;
  std::vector<std::string> addresses;
  std::unique_ptr<Cluster> cluster;
  std::optional<ClusterNamespace> ns;
};

TEST(RendezvousTest, SpreadsEvenlyAndMovesAboutOneNth) {
  const std::vector<std::string> three = {"10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"};
  std::vector<std::string> four = three;
  four.push_back("10.0.0.4:1");
  constexpr int kKeys = 30000;
  std::map<std::string, int> per_node;
  int moved = 0;
  for (int k = 0; k < kKeys; ++k) {
    BlockKey key;
    std::memcpy(key.bytes.data(), &k, sizeof(k));
    key = ComputeBlockKeys(1, {static_cast<uint32_t>(k)}, 1, key)[0];  // realistic, uniform keys
    const std::string before = client::RendezvousOwners(key, three, 1)[0];
    ++per_node[before];
    moved += client::RendezvousOwners(key, four, 1)[0] != before;
    EXPECT_EQ(client::RendezvousOwners(key, three, 1)[0], before) << "not deterministic";
  }
  for (const auto& [node, count] : per_node) {
    EXPECT_NEAR(count, kKeys / 3.0, 0.15 * kKeys / 3.0) << node;
  }
  EXPECT_LE(moved, 0.30 * kKeys);
  EXPECT_GE(moved, 0.20 * kKeys);  // about 1/4 must move to the new node
  // Replicas are distinct nodes, the first being the single owner.
  BlockKey key;
  auto owners = client::RendezvousOwners(key, four, 3);
  EXPECT_EQ(std::set<std::string>(owners.begin(), owners.end()).size(), 3u);
  EXPECT_EQ(owners[0], client::RendezvousOwners(key, four, 1)[0]);
}

TEST_F(ThreeNodeTest, OneClientPublishesAnotherFetches) {
  ASSERT_NO_FATAL_FAILURE(Start());
  constexpr size_t kCount = 3000;
  std::vector<std::string> args = {"--child=publish", "--count=" + std::to_string(kCount)};
  for (const auto& a : addresses) args.push_back("--node=" + a);
  auto child = ChildProcess::SpawnSelf(args);
  ASSERT_TRUE(child.ok());
  ASSERT_EQ((*child)->Wait(), 0) << "the publishing process failed";

  const auto keys = ns->Keys(testing::Tokens(7, kCount, kTokensPerBlock));
  EXPECT_EQ(ns->Lookup(keys)->prefix_length, kCount);
  auto [fetched, right] = FetchStream(*cluster, *ns, 7, kCount);
  EXPECT_EQ(fetched, kCount);
  EXPECT_EQ(right, kCount) << "some fetched bytes differ";
  for (const std::string& address : addresses) {
    v1::StatsResponse stats;
    ASSERT_TRUE(cluster->Stats(address, &stats).ok());
    EXPECT_NEAR(stats.tiers(0).blocks(), kCount / 3.0, 0.15 * kCount / 3.0) << address;
    EXPECT_EQ(stats.tiers(0).evictions(), 0u) << address;
  }
}

TEST_F(ThreeNodeTest, RequestFinishedReachesTheOwnerOfTheLastBlock) {
  ASSERT_NO_FATAL_FAILURE(Start());
  constexpr size_t kCount = 12;
  const client::TransferResult published = PublishStream(*cluster, *ns, 3, kCount);
  ASSERT_EQ(std::count(published.outcomes.begin(), published.outcomes.end(),
                       client::BlockOutcome::kOk),
            kCount);
  const auto keys = ns->Keys(testing::Tokens(3, kCount, kTokensPerBlock));
  const std::string owner = client::RendezvousOwners(keys.back(), addresses, 1)[0];
  absl::StatusOr<bool> known = ns->RequestFinished(keys.back(), 42);
  ASSERT_TRUE(known.ok()) << known.status();
  EXPECT_TRUE(*known);
  absl::StatusOr<bool> unknown = ns->RequestFinished(BlockKey{}, 42);
  ASSERT_TRUE(unknown.ok()) << unknown.status();
  EXPECT_FALSE(*unknown);
  for (const std::string& address : addresses) {
    v1::StatsResponse stats;
    ASSERT_TRUE(cluster->Stats(address, &stats).ok());
    // The owner got both hints (the unknown key may be owned elsewhere).
    const uint64_t unknown_owned = client::RendezvousOwners(BlockKey{}, addresses, 1)[0] == address;
    EXPECT_EQ(stats.request_hints(), (address == owner ? 1u : 0u) + unknown_owned) << address;
  }
}

TEST_F(ThreeNodeTest, KilledNodeMeansMissesThenItRejoins) {
  ASSERT_NO_FATAL_FAILURE(Start());
  constexpr size_t kCount = 600;
  EXPECT_EQ(PublishStream(*cluster, *ns, 11, kCount).count(BlockOutcome::kOk), kCount);

  const int port = nodes[1]->port();
  nodes[1].reset();  // the node goes away mid-run
  auto [fetched, right] = FetchStream(*cluster, *ns, 11, kCount);  // no error, fewer hits
  EXPECT_EQ(fetched, right);
  EXPECT_GT(fetched, kCount / 2);
  EXPECT_LT(fetched, kCount * 85 / 100);
  // Publishing keeps working on the survivors.
  EXPECT_EQ(PublishStream(*cluster, *ns, 12, 300).count(BlockOutcome::kOk), 300u);

  nodes[1] = StartNode(port);  // back, empty, at the same address
  ASSERT_NE(nodes[1], nullptr);
  const absl::Time give_up = absl::Now() + absl::Seconds(10);
  bool back = false;
  while (!back && absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(100));
    for (const auto& status : cluster->Nodes()) back |= status.address == addresses[1] && status.healthy;
  }
  ASSERT_TRUE(back) << "the restarted node never rejoined";
  // Republishing refills the rejoined node with its share; the others have theirs.
  const auto again = PublishStream(*cluster, *ns, 11, kCount);
  EXPECT_EQ(again.count(BlockOutcome::kOk) + again.count(BlockOutcome::kAlreadyPresent), kCount);
  EXPECT_NEAR(again.count(BlockOutcome::kOk), kCount / 3.0, kCount / 6.0);
  EXPECT_EQ(FetchStream(*cluster, *ns, 11, kCount).second, kCount);
  v1::StatsResponse stats;
  ASSERT_TRUE(cluster->Stats(addresses[1], &stats).ok());
  EXPECT_GT(stats.tiers(0).blocks(), 0u) << "the rejoined node got none of its keys back";
}

TEST_F(ThreeNodeTest, HungNodeIsSkippedAfterItsDeadline) {
  ASSERT_NO_FATAL_FAILURE(Start(1, absl::Seconds(2)));
  constexpr size_t kCount = 300;
  EXPECT_EQ(PublishStream(*cluster, *ns, 51, kCount).count(BlockOutcome::kOk), kCount);
  ASSERT_TRUE(nodes[0]->process().Freeze());  // it stops answering, without refusing
  absl::Time start = absl::Now();
  auto [fetched, right] = FetchStream(*cluster, *ns, 51, kCount);
  EXPECT_LT(absl::Now() - start, absl::Seconds(8)) << "the hung node held the caller up";
  EXPECT_EQ(fetched, right);
  EXPECT_GT(fetched, kCount / 2);
  EXPECT_LT(fetched, kCount);
  // Once marked down, it costs nothing more.
  start = absl::Now();
  FetchStream(*cluster, *ns, 51, kCount);
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
}

TEST_F(ThreeNodeTest, ReplicationTwoLosesNoBlockWithOneNodeDown) {
  ASSERT_NO_FATAL_FAILURE(Start(/*replication=*/2));
  constexpr size_t kCount = 600;
  EXPECT_EQ(PublishStream(*cluster, *ns, 21, kCount).count(BlockOutcome::kOk), kCount);
  uint64_t stored = 0;
  for (const std::string& address : addresses) {
    v1::StatsResponse stats;
    ASSERT_TRUE(cluster->Stats(address, &stats).ok());
    stored += stats.tiers(0).blocks();
  }
  EXPECT_EQ(stored, 2 * kCount);
  nodes[2]->process().Signal(SIGKILL);
  nodes[2]->process().Wait();
  auto [fetched, right] = FetchStream(*cluster, *ns, 21, kCount);
  EXPECT_EQ(fetched, kCount) << "a block was lost with one of two replicas";
  EXPECT_EQ(right, kCount);
  const auto keys = ns->Keys(testing::Tokens(21, kCount, kTokensPerBlock));
  EXPECT_EQ(ns->Lookup(keys)->prefix_length, kCount);
}

// Polls `done` until it holds or `limit` passes; true when it held.
template <typename Done>
bool WaitFor(Done done, absl::Duration limit = absl::Seconds(60)) {
  const absl::Time give_up = absl::Now() + limit;
  while (!done()) {
    if (absl::Now() > give_up) return false;
    absl::SleepFor(absl::Milliseconds(50));
  }
  return true;
}

bool Healthy(Cluster& cluster, const std::string& address) {
  for (const auto& status : cluster.Nodes()) {
    if (status.address == address) return status.healthy;
  }
  return false;
}

TEST_F(ThreeNodeTest, ReplicationTwoSurvivesARestartedEmptyNodeAndThenAnotherLoss) {
  ASSERT_NO_FATAL_FAILURE(Start(/*replication=*/2));
  constexpr size_t kCount = 600;
  EXPECT_EQ(PublishStream(*cluster, *ns, 81, kCount).count(BlockOutcome::kOk), kCount);
  const auto keys = ns->Keys(testing::Tokens(81, kCount, kTokensPerBlock));
  size_t owned_by_1 = 0;  // blocks node 1 holds one of the two copies of
  for (const BlockKey& key : keys) {
    const auto owners = client::RendezvousOwners(key, addresses, 2);
    owned_by_1 += std::count(owners.begin(), owners.end(), addresses[1]);
  }

  const int port = nodes[1]->port();
  nodes[1]->process().Signal(SIGKILL);
  nodes[1]->process().Wait();
  nodes[1] = StartNode(port);  // back, empty, at the same address
  ASSERT_NE(nodes[1], nullptr);
  ASSERT_TRUE(WaitFor([&] { return Healthy(*cluster, addresses[1]); }))
      << "the restarted node never rejoined";
  // The rejoin pass copies node 1's share back from the survivors.
  absl::StatusOr<client::ReplicaCensus> census;
  ASSERT_TRUE(WaitFor([&] {
    census = ns->Census();
    return census.ok() && census->under_replicated == 0;
  })) << "still under-replicated: " << (census.ok() ? census->under_replicated : 0) << " "
      << census.status();
  EXPECT_EQ(census->blocks, kCount);
  const client::RepairStats repairs = cluster->Repairs();
  EXPECT_EQ(repairs.repaired_blocks, owned_by_1);
  EXPECT_EQ(repairs.repaired_bytes, owned_by_1 * kBlock);
  EXPECT_GE(repairs.passes, 1u);
  v1::StatsResponse stats;
  ASSERT_TRUE(cluster->Stats(addresses[1], &stats).ok());
  EXPECT_EQ(stats.tiers(0).blocks(), owned_by_1);

  // Another node lost: R=2 still holds every block, byte for byte.
  nodes[0]->process().Signal(SIGKILL);
  nodes[0]->process().Wait();
  auto [fetched, right] = FetchStream(*cluster, *ns, 81, kCount);
  EXPECT_EQ(fetched, kCount) << kCount - fetched << " blocks lost";
  EXPECT_EQ(right, kCount);
}

TEST_F(ThreeNodeTest, AFetchThatFindsABlockOnItsSecondReplicaCopiesItBack) {
  ASSERT_NO_FATAL_FAILURE(Start(/*replication=*/2));
  constexpr size_t kCount = 300;
  EXPECT_EQ(PublishStream(*cluster, *ns, 91, kCount).count(BlockOutcome::kOk), kCount);
  const auto keys = ns->Keys(testing::Tokens(91, kCount, kTokensPerBlock));
  // Node 0 loses every block it had (as if evicted), behind the cluster's back.
  auto direct = client::Client::Connect({.node_address = addresses[0]});
  ASSERT_TRUE(direct.ok());
  auto node0 = (*direct)->OpenNamespace(Spec());
  ASSERT_TRUE(node0.ok());
  ASSERT_TRUE(node0->Delete(keys).ok());
  std::vector<size_t> first_on_0;  // the fetch asks node 0 first for these, and misses
  for (size_t i = 0; i < kCount; ++i) {
    if (client::RendezvousOwners(keys[i], addresses, 1)[0] == addresses[0]) first_on_0.push_back(i);
  }
  ASSERT_GT(first_on_0.size(), kCount / 5);

  auto [fetched, right] = FetchStream(*cluster, *ns, 91, kCount);
  EXPECT_EQ(right, kCount) << "the second replica did not serve";
  ASSERT_TRUE(WaitFor([&] {
    const client::RepairStats r = cluster->Repairs();
    return r.queued_on_read >= first_on_0.size() && r.pending_blocks == 0;
  })) << cluster->Repairs().pending_blocks << " pending";
  const client::RepairStats repairs = cluster->Repairs();
  EXPECT_EQ(repairs.queued_on_read, first_on_0.size());
  EXPECT_EQ(repairs.dropped_blocks, 0u);
  EXPECT_GE(repairs.repaired_blocks, first_on_0.size());

  // Node 0 holds them again, with their bytes and their parents.
  auto buffer = (*direct)->Allocate(first_on_0.size() * kBlock);
  ASSERT_TRUE(buffer.ok());
  std::vector<client::FetchItem> items;
  for (size_t k = 0; k < first_on_0.size(); ++k) {
    items.push_back({keys[first_on_0[k]], buffer->get(), k * kBlock});
  }
  auto again = node0->Fetch(items);
  ASSERT_TRUE(again.ok()) << again.status();
  std::vector<uint8_t> expected(kBlock);
  for (size_t k = 0; k < first_on_0.size(); ++k) {
    ASSERT_EQ(again->outcomes[k], BlockOutcome::kOk) << "block " << first_on_0[k] << " not copied back";
    FillBlock(91, first_on_0[k], expected.data(), kBlock);
    EXPECT_EQ(std::memcmp(expected.data(), (*buffer)->data() + k * kBlock, kBlock), 0);
  }
  // And with their parents: node 0 lists each with the key before it.
  auto stub = v1::CacheNode::NewStub(
      grpc::CreateChannel(addresses[0], grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  v1::ListBlocksRequest request;
  request.set_namespace_id(node0->id());
  request.set_limit(4096);
  for (size_t i : first_on_0) request.add_keys(std::string(keys[i].view()));
  v1::ListBlocksResponse listed;
  ASSERT_TRUE(stub->ListBlocks(&context, request, &listed).ok());
  ASSERT_EQ(static_cast<size_t>(listed.blocks_size()), first_on_0.size());
  std::map<std::string, std::string> parent_of;
  for (const auto& block : listed.blocks()) parent_of[block.key()] = block.parent();
  for (size_t i : first_on_0) {
    EXPECT_EQ(parent_of[std::string(keys[i].view())], i == 0 ? "" : std::string(keys[i - 1].view()))
        << "block " << i << " lost its parent";
  }
}

TEST_F(ThreeNodeTest, AFullRepairQueueDropsCopiesAndCountsThem) {
  // The fixture's client repairs nothing here, so only the slow one below does.
  ASSERT_NO_FATAL_FAILURE(Start(/*replication=*/2, absl::Seconds(20), /*repair=*/0));
  constexpr size_t kCount = 300;
  EXPECT_EQ(PublishStream(*cluster, *ns, 95, kCount).count(BlockOutcome::kOk), kCount);
  const auto keys = ns->Keys(testing::Tokens(95, kCount, kTokensPerBlock));
  auto direct = client::Client::Connect({.node_address = addresses[0]});
  ASSERT_TRUE(direct.ok());
  auto node0 = (*direct)->OpenNamespace(Spec());
  ASSERT_TRUE(node0.ok());
  ASSERT_TRUE(node0->Delete(keys).ok());
  size_t first_on_0 = 0;
  for (const BlockKey& key : keys) {
    first_on_0 += client::RendezvousOwners(key, addresses, 1)[0] == addresses[0];
  }
  // A client whose repairer is slow (1 KiB/s) and has room for 8 copies.
  ClusterOptions options;
  options.nodes = addresses;
  options.replication = 2;
  options.refresh_interval = absl::Milliseconds(200);
  options.repair_bytes_per_second = 1024;
  options.repair_queue_blocks = 8;
  auto slow = Cluster::Connect(options);
  ASSERT_TRUE(slow.ok());
  auto slow_ns = (*slow)->OpenNamespace(Spec());
  ASSERT_TRUE(slow_ns.ok());
  ASSERT_TRUE(WaitFor([&] { return Healthy(**slow, addresses[0]) && Healthy(**slow, addresses[2]) &&
                                   Healthy(**slow, addresses[1]); }));
  auto [fetched, right] = FetchStream(**slow, *slow_ns, 95, kCount);
  EXPECT_EQ(right, kCount) << "a full repair queue failed a fetch";
  const client::RepairStats repairs = (*slow)->Repairs();
  EXPECT_EQ(repairs.queued_on_read + repairs.dropped_blocks, first_on_0);
  EXPECT_GT(repairs.dropped_blocks, 0u);
  EXPECT_LE(repairs.queued_on_read, 8u + 8u);  // the queue, and at most one batch taken from it
  EXPECT_EQ(cluster->Repairs().repaired_blocks, 0u);  // repair off: nothing, and no thread
}

TEST_F(ThreeNodeTest, DrainedNodeTakesNoNewBlocksButServesItsOwn) {
  ASSERT_NO_FATAL_FAILURE(Start());
  EXPECT_EQ(PublishStream(*cluster, *ns, 31, 300).count(BlockOutcome::kOk), 300u);
  ASSERT_TRUE(cluster->Drain(addresses[0], true).ok());
  v1::StatsResponse before;
  ASSERT_TRUE(cluster->Stats(addresses[0], &before).ok());
  EXPECT_EQ(PublishStream(*cluster, *ns, 32, 300).count(BlockOutcome::kOk), 300u);
  v1::StatsResponse after;
  ASSERT_TRUE(cluster->Stats(addresses[0], &after).ok());
  EXPECT_EQ(after.published_blocks(), before.published_blocks());
  EXPECT_EQ(FetchStream(*cluster, *ns, 31, 300).second, 300u);  // still serves what it had
  EXPECT_EQ(FetchStream(*cluster, *ns, 32, 300).second, 300u);
  ASSERT_TRUE(cluster->Drain(addresses[0], false).ok());
}

// ---- tenants ----------------------------------------------------------------

TEST(ClusterAuthTest, AnotherTenantCanNeitherListNorRepairANamespace) {
  auto dir = testing::TempDir::Create("kvstrata-cluster-auth");
  ASSERT_TRUE(dir.ok());
  const std::string auth_file = (*dir)->File("auth");
  {
    std::ofstream out(auth_file);
    out << "token sha256:" << Sha256Hex("acme-token") << " tenant acme\n"
        << "token sha256:" << Sha256Hex("globex-token") << " tenant globex\n"
        << "token sha256:" << Sha256Hex("admin-token") << " admin *\n";
  }
  auto start = [&](int port) {
    std::vector<std::string> flags = {"--dram_bytes=268435456", "--slab_bytes=1048576",
                                      "--transfer_timeout=5s", "--auth_file=" + auth_file};
    if (port != 0) flags.push_back(absl::StrCat("--listen=127.0.0.1:", port));
    auto node = NodeProcess::Start(KVSTRATA_NODE_BINARY, flags);
    EXPECT_TRUE(node.ok()) << node.status();
    return node.ok() ? *std::move(node) : nullptr;
  };
  std::vector<std::unique_ptr<NodeProcess>> nodes;
  std::vector<std::string> addresses;
  for (int i = 0; i < 3; ++i) {
    nodes.push_back(start(0));
    ASSERT_NE(nodes.back(), nullptr);
    addresses.push_back(nodes.back()->address());
  }
  auto connect = [&](const std::string& token, uint64_t repair) {
    ClusterOptions options;
    options.nodes = addresses;
    options.replication = 2;
    options.refresh_interval = absl::Milliseconds(200);
    options.repair_bytes_per_second = repair;
    options.client.auth_token = token;
    auto cluster = Cluster::Connect(options);
    EXPECT_TRUE(cluster.ok()) << cluster.status();
    return cluster.ok() ? *std::move(cluster) : nullptr;
  };
  v1::NamespaceSpec acme_spec = Spec();
  acme_spec.set_tenant("acme");
  v1::NamespaceSpec globex_spec = Spec();
  globex_spec.set_tenant("globex");

  // acme publishes with R=2, and repairs nothing itself for now.
  auto acme = connect("acme-token", 0);
  ASSERT_NE(acme, nullptr);
  absl::StatusOr<ClusterNamespace> acme_ns;
  ASSERT_TRUE(WaitFor([&] { return (acme_ns = acme->OpenNamespace(acme_spec)).ok(); }))
      << acme_ns.status();
  constexpr size_t kCount = 200;
  EXPECT_EQ(PublishStream(*acme, *acme_ns, 61, kCount).count(BlockOutcome::kOk), kCount);
  const auto keys = acme_ns->Keys(testing::Tokens(61, kCount, kTokensPerBlock));

  const int port = nodes[1]->port();
  nodes[1]->process().Signal(SIGKILL);
  nodes[1]->process().Wait();
  nodes[1] = start(port);
  ASSERT_NE(nodes[1], nullptr);

  // globex's cluster, repairing at full speed, sees the rejoin...
  auto globex = connect("globex-token", 64 << 20);
  ASSERT_NE(globex, nullptr);
  ASSERT_TRUE(WaitFor([&] {
    for (const auto& status : globex->Nodes()) {
      if (!status.healthy) return false;
    }
    return true;
  }));
  // ...but cannot open acme's namespace, so its repairer never walks it,
  EXPECT_TRUE(absl::IsPermissionDenied(globex->OpenNamespace(acme_spec).status()));
  absl::StatusOr<ClusterNamespace> globex_ns = globex->OpenNamespace(globex_spec);
  ASSERT_TRUE(globex_ns.ok()) << globex_ns.status();
  const uint64_t passes = globex->Repairs().passes;
  ASSERT_TRUE(WaitFor([&] { return globex->Repairs().passes > passes; }));
  // and listing it by id, a page or named keys, is refused on every node.
  for (const std::string& address : addresses) {
    auto stub = v1::CacheNode::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
    for (bool by_keys : {false, true}) {
      grpc::ClientContext context;
      context.AddMetadata("authorization", "Bearer globex-token");
      v1::ListBlocksRequest request;
      request.set_namespace_id(NamespaceId(acme_spec));
      request.set_limit(4096);
      if (by_keys) request.add_keys(std::string(keys[0].view()));
      v1::ListBlocksResponse response;
      const grpc::Status status = stub->ListBlocks(&context, request, &response);
      // The restarted node has not seen acme's namespace opened again.
      EXPECT_EQ(status.error_code(), address == addresses[1] ? grpc::StatusCode::NOT_FOUND
                                                             : grpc::StatusCode::PERMISSION_DENIED)
          << address;
      EXPECT_EQ(response.blocks_size(), 0);
    }
  }
  EXPECT_EQ(globex->Repairs().repaired_blocks, 0u);
  absl::StatusOr<client::ReplicaCensus> census = acme_ns->Census();
  ASSERT_TRUE(census.ok()) << census.status();
  EXPECT_GT(census->under_replicated, 0u) << "another tenant's client repaired acme's blocks";

  // acme's own repairer restores them (the same machinery, the right tenant).
  auto acme_repairing = connect("acme-token", 64 << 20);
  ASSERT_NE(acme_repairing, nullptr);
  ASSERT_TRUE(WaitFor([&] { return acme_repairing->OpenNamespace(acme_spec).ok(); }));
  ASSERT_TRUE(WaitFor([&] {
    census = acme_ns->Census();
    return census.ok() && census->under_replicated == 0;
  })) << (census.ok() ? census->under_replicated : 0);
  EXPECT_GT(acme_repairing->Repairs().repaired_blocks, 0u);
}

TEST(ClusterTest, MembershipFromDns) {
  auto node = StartNode();
  ASSERT_NE(node, nullptr);
  ClusterOptions options;
  options.dns = absl::StrCat("localhost:", node->port());
  auto cluster = Cluster::Connect(options);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  bool found = false;
  for (const auto& status : (*cluster)->Nodes()) {
    found |= status.address == node->address() && status.healthy;
  }
  EXPECT_TRUE(found) << "localhost did not resolve to the running node";
  auto ns = (*cluster)->OpenNamespace(Spec());
  ASSERT_TRUE(ns.ok()) << ns.status();
  EXPECT_EQ(PublishStream(**cluster, *ns, 41, 50).count(BlockOutcome::kOk), 50u);
  EXPECT_EQ(FetchStream(**cluster, *ns, 41, 50).second, 50u);
}

// ---- the publishing child process ------------------------------------------

int RunChild(int argc, char** argv) {
  ClusterOptions options;
  size_t count = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--node=", 0) == 0) options.nodes.push_back(arg.substr(7));
    if (arg.rfind("--count=", 0) == 0) count = std::stoull(arg.substr(8));
  }
  auto cluster = Cluster::Connect(options);
  if (!cluster.ok()) return 10;
  auto ns = (*cluster)->OpenNamespace(Spec());
  if (!ns.ok()) return 11;
  return PublishStream(**cluster, *ns, 7, count).count(BlockOutcome::kOk) == count ? 0 : 12;
}

}  // namespace
}  // namespace kvstrata

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--child=publish") return kvstrata::RunChild(argc, argv);
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
