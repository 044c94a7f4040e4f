// repair_bench: how fast a Cluster's repairer refills a node that came back
// empty (3 nodes, R = 2), unbounded and at a byte-rate bound, against copying
// the same blocks by hand with Fetch and Publish through a buffer of the same
// size (the baseline, measured in the same run).
//
//   repair_bench            # UCX over TCP, 3 x 1 GiB nodes, about 30 s
//   repair_bench --quick    # the ctest smoke version
//
// The repairer's rate counts bytes fetched plus bytes published, so a bound
// of B bytes/s copies B/2 bytes/s into the node.
#include <signal.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kvstrata.pb.h"
#include "kvstrata/client/cluster.h"
#include "kvstrata/testing/blocks.h"
#include "kvstrata/testing/process.h"

#ifndef KVSTRATA_NODE_BINARY
#define KVSTRATA_NODE_BINARY "kvstrata-node"
#endif

ABSL_FLAG(std::string, node_binary, KVSTRATA_NODE_BINARY, "kvstrata-node to start.");
ABSL_FLAG(std::string, transports, "tcp", "UCX_TLS for the nodes and the client.");
ABSL_FLAG(uint64_t, block_bytes, 1 << 20, "Block size.");
ABSL_FLAG(int, blocks, 384, "Blocks published (R = 2: each node holds about 2/3).");
ABSL_FLAG(uint64_t, bound, 64ull << 20, "The bounded run's repair_bytes_per_second.");
ABSL_FLAG(bool, quick, false, "Smoke test: 48 blocks of 256 KiB.");

namespace {

using kvstrata::client::BlockOutcome;
using kvstrata::client::Cluster;
using kvstrata::client::ClusterNamespace;
using kvstrata::testing::NodeProcess;

constexpr uint64_t kBufferBytes = 16ull << 20;  // ClusterOptions' default repair buffer

struct Setup {
  std::vector<std::unique_ptr<NodeProcess>> nodes;
  std::vector<std::string> addresses;
  std::unique_ptr<Cluster> cluster;
  std::optional<ClusterNamespace> ns;
  std::vector<kvstrata::BlockKey> keys;
};

absl::StatusOr<std::unique_ptr<NodeProcess>> StartNode(int port) {
  std::vector<std::string> flags = {"--dram_bytes=1073741824"};
  if (port != 0) flags.push_back(absl::StrCat("--listen=127.0.0.1:", port));
  return NodeProcess::Start(absl::GetFlag(FLAGS_node_binary), flags, "/dev/null");
}

bool WaitFor(const std::function<bool()>& done, absl::Duration limit) {
  const absl::Time give_up = absl::Now() + limit;
  while (!done()) {
    if (absl::Now() > give_up) return false;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return true;
}

// Three nodes, a cluster with `repair` bytes/s, `blocks` blocks published.
absl::Status Prepare(Setup& s, uint64_t repair, uint64_t block, int blocks) {
  kvstrata::client::ClusterOptions options;
  for (int i = 0; i < 3; ++i) {
    auto node = StartNode(0);
    if (!node.ok()) return node.status();
    s.addresses.push_back((*node)->address());
    s.nodes.push_back(*std::move(node));
  }
  options.nodes = s.addresses;
  options.replication = 2;
  options.refresh_interval = absl::Milliseconds(100);
  options.repair_bytes_per_second = repair;
  auto cluster = Cluster::Connect(options);
  if (!cluster.ok()) return cluster.status();
  s.cluster = *std::move(cluster);
  kvstrata::v1::NamespaceSpec spec;
  spec.set_tenant("bench");
  spec.set_model("repair");
  spec.set_tokens_per_block(16);
  spec.set_block_bytes(block);
  absl::StatusOr<ClusterNamespace> ns;
  if (!WaitFor([&] { return (ns = s.cluster->OpenNamespace(spec)).ok(); }, absl::Seconds(20))) {
    return ns.status();
  }
  s.ns.emplace(*ns);
  s.keys = s.ns->Keys(kvstrata::testing::Tokens(1, blocks, 16));
  const int batch = static_cast<int>(kBufferBytes / block);
  auto buffer = s.cluster->Allocate(kBufferBytes);
  if (!buffer.ok()) return buffer.status();
  for (int start = 0; start < blocks; start += batch) {
    std::vector<kvstrata::client::PublishItem> items;
    for (int i = start; i < std::min(blocks, start + batch); ++i) {
      kvstrata::testing::FillBlock(1, i, (*buffer)->data() + (i - start) * block, block);
      items.push_back({s.keys[i], i ? std::optional(s.keys[i - 1]) : std::nullopt, buffer->get(),
                       (i - start) * block});
    }
    auto published = s.ns->Publish(items);
    if (!published.ok()) return published.status();
    if (published->count(BlockOutcome::kOk) != items.size()) {
      return absl::InternalError("publish did not store every block");
    }
  }
  return absl::OkStatus();
}

// Kills node 1 and starts it again, empty, on its address; returns once the
// cluster sees it healthy.
absl::Status RestartEmpty(Setup& s) {
  const int port = s.nodes[1]->port();
  s.nodes[1]->process().Signal(SIGKILL);
  s.nodes[1]->process().Wait();
  s.nodes[1].reset();
  auto node = StartNode(port);
  if (!node.ok()) return node.status();
  s.nodes[1] = *std::move(node);
  const bool back = WaitFor([&] {
    for (const auto& n : s.cluster->Nodes()) {
      if (n.address == s.addresses[1]) return n.healthy;
    }
    return false;
  }, absl::Seconds(20));
  return back ? absl::OkStatus() : absl::UnavailableError("the restarted node never rejoined");
}

// Node 1's share: the blocks it is one of the two owners of.
std::vector<size_t> ShareOf1(const Setup& s) {
  std::vector<size_t> share;
  for (size_t i = 0; i < s.keys.size(); ++i) {
    const auto owners = kvstrata::client::RendezvousOwners(s.keys[i], s.addresses, 2);
    if (std::count(owners.begin(), owners.end(), s.addresses[1])) share.push_back(i);
  }
  return share;
}

// Bytes/s copied into node 1 by the repairer over the pass that refilled it
// (listing and replica checks included).
absl::StatusOr<double> RepairRate(uint64_t repair, uint64_t block, int blocks) {
  Setup s;
  if (absl::Status st = Prepare(s, repair, block, blocks); !st.ok()) return st;
  const size_t share = ShareOf1(s).size();
  const kvstrata::client::RepairStats before = s.cluster->Repairs();
  if (absl::Status st = RestartEmpty(s); !st.ok()) return st;
  kvstrata::client::RepairStats after;
  if (!WaitFor([&] {
        after = s.cluster->Repairs();
        return after.repaired_blocks >= before.repaired_blocks + share &&
               after.passes > before.passes && after.last_pass_end > absl::Now() - absl::Seconds(1);
      }, absl::Minutes(5))) {
    return absl::DeadlineExceededError("the repair never finished");
  }
  return static_cast<double>(share * block) / absl::ToDoubleSeconds(after.last_pass_duration);
}

// Bytes/s of the same copy by hand: fetch node 1's share from its other
// owner and publish it to node 1, a buffer at a time (what the repairer
// does, without its listing and replica checks).
absl::StatusOr<double> HandCopyRate(uint64_t block, int blocks) {
  Setup s;
  if (absl::Status st = Prepare(s, /*repair=*/0, block, blocks); !st.ok()) return st;
  const std::vector<size_t> share = ShareOf1(s);
  if (absl::Status st = RestartEmpty(s); !st.ok()) return st;
  kvstrata::v1::NamespaceSpec spec;
  spec.set_tenant("bench");
  spec.set_model("repair");
  spec.set_tokens_per_block(16);
  spec.set_block_bytes(block);
  std::vector<std::unique_ptr<kvstrata::client::Client>> clients;
  std::vector<kvstrata::client::Namespace> handles;
  for (const std::string& address : s.addresses) {
    auto c = kvstrata::client::Client::Connect({.node_address = address});
    if (!c.ok()) return c.status();
    auto ns = (*c)->OpenNamespace(spec);
    if (!ns.ok()) return ns.status();
    clients.push_back(*std::move(c));
    handles.push_back(*ns);
  }
  // One buffer, registered with every client's engine.
  auto buffer = clients[1]->Allocate(kBufferBytes);
  if (!buffer.ok()) return buffer.status();
  std::vector<std::unique_ptr<kvstrata::client::Buffer>> views;
  for (auto& c : clients) {
    auto view = c->Register((*buffer)->data(), kBufferBytes);
    if (!view.ok()) return view.status();
    views.push_back(*std::move(view));
  }
  const size_t batch = kBufferBytes / block;
  // Connections first, as the repairer's cluster has them: a fetch from each
  // source, a publish of a block outside the share to node 1.
  for (size_t source : {0, 2}) {
    kvstrata::client::FetchItem warm{s.keys[0], views[source].get(), 0};
    if (!handles[source].Fetch({&warm, 1}).ok()) return absl::InternalError("warm-up fetch failed");
  }
  const kvstrata::BlockKey outside = s.ns->Keys(kvstrata::testing::Tokens(2, 1, 16))[0];
  kvstrata::client::PublishItem warm{outside, std::nullopt, views[1].get(), 0};
  if (!handles[1].Publish({&warm, 1}).ok()) return absl::InternalError("warm-up publish failed");
  const absl::Time start = absl::Now();
  for (size_t source : {0, 2}) {
    std::vector<size_t> from_source;
    for (size_t i : share) {
      const auto owners = kvstrata::client::RendezvousOwners(s.keys[i], s.addresses, 2);
      if (std::count(owners.begin(), owners.end(), s.addresses[source])) from_source.push_back(i);
    }
    for (size_t from = 0; from < from_source.size(); from += batch) {
      std::vector<kvstrata::client::FetchItem> fetch;
      std::vector<kvstrata::client::PublishItem> publish;
      for (size_t k = from; k < std::min(from_source.size(), from + batch); ++k) {
        const size_t i = from_source[k];
        fetch.push_back({s.keys[i], views[source].get(), (k - from) * block});
        publish.push_back({s.keys[i], i ? std::optional(s.keys[i - 1]) : std::nullopt,
                           views[1].get(), (k - from) * block});
      }
      auto fetched = handles[source].Fetch(fetch);
      if (!fetched.ok() || fetched->count(BlockOutcome::kOk) != fetch.size()) {
        return absl::InternalError("the hand copy missed a block");
      }
      auto published = handles[1].Publish(publish);
      if (!published.ok() || published->count(BlockOutcome::kOk) != publish.size()) {
        return absl::InternalError("the hand copy failed to publish");
      }
    }
  }
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  return static_cast<double>(share.size() * block) / seconds;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const bool quick = absl::GetFlag(FLAGS_quick);
  const uint64_t block = quick ? 256 * 1024 : absl::GetFlag(FLAGS_block_bytes);
  const int blocks = quick ? 48 : absl::GetFlag(FLAGS_blocks);
  const uint64_t bound = absl::GetFlag(FLAGS_bound);
  setenv("UCX_TLS", absl::GetFlag(FLAGS_transports).c_str(), 1);  // nodes inherit it
  std::printf("# repair_bench: UCX_TLS=%s, 3 nodes, R=2, %d blocks of %lu bytes\n",
              absl::GetFlag(FLAGS_transports).c_str(), blocks, block);
  auto hand = HandCopyRate(block, blocks);
  if (!hand.ok()) {
    std::fprintf(stderr, "hand copy: %s\n", hand.status().ToString().c_str());
    return 1;
  }
  std::printf("hand copy (Fetch + Publish, 16 MiB batches): %.1f MB/s into the node (baseline)\n",
              *hand / 1e6);
  // "Unbounded": a rate no loopback reaches, so the pacing never waits.
  auto unbounded = RepairRate(1ull << 40, block, blocks);
  if (!unbounded.ok()) {
    std::fprintf(stderr, "unbounded repair: %s\n", unbounded.status().ToString().c_str());
    return 1;
  }
  std::printf("repair, unbounded: %.1f MB/s into the node = %.2fx the hand copy\n",
              *unbounded / 1e6, *unbounded / *hand);
  auto bounded = RepairRate(bound, block, blocks);
  if (!bounded.ok()) {
    std::fprintf(stderr, "bounded repair: %s\n", bounded.status().ToString().c_str());
    return 1;
  }
  // The bound counts both directions: half of it lands in the node.
  std::printf("repair, bound %.1f MB/s: %.1f MB/s into the node = %.2fx half the bound, %.2fx the hand copy\n",
              bound / 1e6, *bounded / 1e6, *bounded / (bound / 2.0), *bounded / *hand);
  return 0;
}
