// cluster_bench: aggregate fetch throughput of 1, 2 and 3 cache nodes used as
// one cluster (rendezvous placement, parallel fan-out), and the latency of a
// 64-block prefix lookup, each against the 1-node run of the same benchmark
// (the baseline, measured in the same run).
//
//   cluster_bench                 # UCX over TCP (as across hosts), about 30 s
//   cluster_bench --quick         # the ctest smoke version
//
// On one 2-core machine every node, the client and the kernel's loopback copy
// share the same two cores, so more nodes cannot add throughput; the run shows
// what the fan-out costs or gains, not what more hosts would give.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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
ABSL_FLAG(int, max_nodes, 3, "Measure clusters of 1..max_nodes nodes.");
ABSL_FLAG(uint64_t, block_bytes, 1 << 20, "Block size.");
ABSL_FLAG(int, blocks, 192, "Blocks in the working set.");
ABSL_FLAG(int, batch, 64, "Blocks per fetch call.");
ABSL_FLAG(double, seconds, 2.0, "Seconds per measurement.");
ABSL_FLAG(bool, quick, false, "Smoke test: 2 nodes, 32 blocks of 256 KiB, 0.2 s.");

namespace {

using kvstrata::client::BlockOutcome;
using kvstrata::client::Cluster;
using kvstrata::testing::NodeProcess;

struct Result {
  double fetch_gbps = 0;
  double lookup_p50_us = 0;
  double lookup_p99_us = 0;
};

absl::StatusOr<Result> Measure(int node_count, uint64_t block, int blocks, int batch,
                               double seconds) {
  std::vector<std::unique_ptr<NodeProcess>> nodes;
  kvstrata::client::ClusterOptions options;
  for (int i = 0; i < node_count; ++i) {
    auto node = NodeProcess::Start(absl::GetFlag(FLAGS_node_binary),
                                   {"--dram_bytes=1073741824", "--prefault"}, "/dev/null");
    if (!node.ok()) return node.status();
    options.nodes.push_back((*node)->address());
    nodes.push_back(*std::move(node));
  }
  auto cluster = Cluster::Connect(options);
  if (!cluster.ok()) return cluster.status();
  kvstrata::v1::NamespaceSpec spec;
  spec.set_tenant("bench");
  spec.set_model("cluster");
  spec.set_tokens_per_block(16);
  spec.set_block_bytes(block);
  auto ns = (*cluster)->OpenNamespace(spec);
  if (!ns.ok()) return ns.status();
  const auto keys = ns->Keys(kvstrata::testing::Tokens(1, blocks, 16));
  auto buffer = (*cluster)->Allocate(static_cast<size_t>(batch) * block);
  if (!buffer.ok()) return buffer.status();
  for (int start = 0; start < blocks; start += batch) {
    std::vector<kvstrata::client::PublishItem> items;
    for (int i = start; i < std::min(blocks, start + batch); ++i) {
      kvstrata::testing::FillBlock(1, i, (*buffer)->data() + (i - start) * block, block);
      items.push_back({keys[i], i ? std::optional(keys[i - 1]) : std::nullopt, buffer->get(),
                       (i - start) * block});
    }
    auto published = ns->Publish(items);
    if (!published.ok()) return published.status();
    if (published->count(BlockOutcome::kOk) != items.size()) {
      return absl::InternalError("publish did not store every block");
    }
  }

  Result result;
  // Fetch: batches of `batch` blocks, round robin over the working set.
  uint64_t bytes = 0;
  int round = 0;
  const absl::Time start = absl::Now();
  while (absl::Now() - start < absl::Seconds(seconds) || round < 3) {
    std::vector<kvstrata::client::FetchItem> items;
    for (int i = 0; i < batch; ++i) {
      const int b = (round * batch + i) % blocks;
      items.push_back({keys[b], buffer->get(), static_cast<size_t>(i) * block});
    }
    auto fetched = ns->Fetch(items);
    if (!fetched.ok()) return fetched.status();
    if (fetched->count(BlockOutcome::kOk) != items.size()) {
      return absl::InternalError("fetch missed a stored block");
    }
    bytes += fetched->bytes;
    ++round;
  }
  result.fetch_gbps = bytes / absl::ToDoubleSeconds(absl::Now() - start) / 1e9;

  // Lookup of a 64-block prefix (fans out to every owning node).
  const std::vector<kvstrata::BlockKey> prefix(keys.begin(), keys.begin() + std::min(64, blocks));
  std::vector<double> micros;
  const absl::Time lookups_start = absl::Now();
  while (absl::Now() - lookups_start < absl::Seconds(seconds / 2) || micros.size() < 20) {
    const absl::Time t0 = absl::Now();
    auto found = ns->Lookup(prefix);
    micros.push_back(absl::ToDoubleMicroseconds(absl::Now() - t0));
    if (!found.ok() || found->prefix_length != prefix.size()) {
      return absl::InternalError("lookup lost the prefix");
    }
  }
  std::sort(micros.begin(), micros.end());
  result.lookup_p50_us = micros[micros.size() / 2];
  result.lookup_p99_us = micros[std::min(micros.size() - 1, micros.size() * 99 / 100)];
  return result;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const bool quick = absl::GetFlag(FLAGS_quick);
  const int max_nodes = quick ? 2 : absl::GetFlag(FLAGS_max_nodes);
  const uint64_t block = quick ? 256 * 1024 : absl::GetFlag(FLAGS_block_bytes);
  const int blocks = quick ? 32 : absl::GetFlag(FLAGS_blocks);
  const int batch = quick ? 16 : absl::GetFlag(FLAGS_batch);
  const double seconds = quick ? 0.2 : absl::GetFlag(FLAGS_seconds);
  setenv("UCX_TLS", absl::GetFlag(FLAGS_transports).c_str(), 1);  // nodes inherit it
  std::printf("# cluster_bench: UCX_TLS=%s, %d blocks of %lu bytes, fetch batches of %d\n",
              absl::GetFlag(FLAGS_transports).c_str(), blocks, block, batch);
  Result baseline;
  for (int n = 1; n <= max_nodes; ++n) {
    absl::StatusOr<Result> r = Measure(n, block, blocks, batch, seconds);
    if (!r.ok()) {
      std::fprintf(stderr, "cluster_bench: %d nodes: %s\n", n, r.status().ToString().c_str());
      return 1;
    }
    if (n == 1) baseline = *r;
    std::printf(
        "nodes=%d fetch_GBps=%.3f scaling_vs_1_node=%.2f lookup64_p50_us=%.0f lookup64_p99_us=%.0f "
        "p50_vs_1_node=%.2f\n",
        n, r->fetch_gbps, r->fetch_gbps / baseline.fetch_gbps, r->lookup_p50_us, r->lookup_p99_us,
        r->lookup_p50_us / baseline.lookup_p50_us);
    std::fflush(stdout);
  }
  return 0;
}
