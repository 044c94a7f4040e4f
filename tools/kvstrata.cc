// kvstrata: command-line tool for a cache node.
//
//   kvstrata put    --key=HEX [--parent=HEX] --in=FILE      store one block
//   kvstrata get    --key=HEX --out=FILE                    fetch one block
//   kvstrata lookup --keys=HEX,HEX,... | --tokens=1,2,3,... longest stored prefix
//   kvstrata stat [--nodes=a,b,c | --dns=name:port]         node or cluster counters
//     [--replication=R --model=... --block_bytes=N]         + a namespace's copies per node
//   kvstrata drain --node=ADDR [--undrain]                  stop (or resume) new publishes
//   kvstrata replay --trace=FILE [--capacity=0.1]           offline policy replay vs Belady
//   kvstrata replay --live --trace=FILE                     the trace against a running node
//   kvstrata demo                                           prefill -> decode handoff
//
// Blocks belong to a namespace given by --tenant/--model and either
// --block_bytes (an opaque namespace) or a KV layout (--layers, --kv_heads,
// --head_dim, --tokens_per_block, --dtype).
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "kvstrata.pb.h"
#include "kvstrata/client/client.h"
#include "kvstrata/cachenode/replay.h"
#include "kvstrata/client/cluster.h"
#include "live_replay.h"

ABSL_FLAG(std::string, node, "127.0.0.1:50151", "Cache node address, host:port.");
ABSL_FLAG(std::string, nodes, "",
          "stat/drain: comma-separated node addresses of a cluster (instead of --node).");
ABSL_FLAG(std::string, dns, "",
          "stat/drain: name:port whose addresses are the cluster's nodes (a headless Service).");
ABSL_FLAG(bool, undrain, false, "drain: take the node back into service instead.");
ABSL_FLAG(int, replication, 0,
          "stat --nodes: also list the namespace of --tenant/--model/... on every node and count "
          "its blocks with fewer than this many live copies (0: skip).");
ABSL_FLAG(std::string, trace, "", "replay: a Mooncake-format trace (JSON lines with hash_ids).");
ABSL_FLAG(std::string, capacity, "0.05,0.1,0.2",
          "replay: cache capacities, as fractions of the trace's distinct blocks (<= 1) or in "
          "blocks (> 1), comma-separated.");
ABSL_FLAG(std::string, policy, "adaptive",
          "replay: the eviction policies to measure, comma-separated, each beside LRU and "
          "Belady (adaptive is the node's default; all: adaptive,lru,prefix-lru,prefix-freq,"
          "chain-protect,chain-slru,return-aware).");
ABSL_FLAG(bool, live, false,
          "replay: replay against the node at --node through the client (Lookup, Fetch of the "
          "cached prefix, Publish of the rest) instead of offline; --block_bytes sets the block "
          "size (default 65536).");
ABSL_FLAG(
    double, time_scale, 0,
    "replay --live: issue request i at its trace timestamp (ms) times this; 0: back to back.");
ABSL_FLAG(bool, hints, true,
          "replay --live: after each request, send RequestFinished for its last block with the "
          "trace's output_length (a hint for the node's eviction policy); false to compare "
          "without.");
ABSL_FLAG(double, decode_ms_per_token, 50,
          "replay: a request's finished-hint (its output length) reaches the policy at its "
          "timestamp + output_length x this (ms); negative: no hints.");
ABSL_FLAG(int64_t, requests, 0, "replay: only the first N requests of the trace (0: all).");
ABSL_FLAG(absl::Duration, timeout, absl::Seconds(30), "Timeout of each call.");
ABSL_FLAG(std::string, tenant, "cli", "Namespace tenant.");
ABSL_FLAG(std::string, model, "cli", "Namespace model id.");
ABSL_FLAG(uint64_t, block_bytes, 0,
          "Block size of an opaque namespace (put: defaults to the file size).");
ABSL_FLAG(uint32_t, layers, 0, "KV layout: layers (0: opaque namespace).");
ABSL_FLAG(uint32_t, kv_heads, 8, "KV layout: KV heads.");
ABSL_FLAG(uint32_t, head_dim, 128, "KV layout: head dimension.");
ABSL_FLAG(uint32_t, tokens_per_block, 256, "Tokens per block (layout namespaces and --tokens).");
ABSL_FLAG(std::string, dtype, "fp16", "KV layout: fp16, bf16 or fp32.");
ABSL_FLAG(std::string, key, "", "Block key, 32 or 64 hex digits.");
ABSL_FLAG(std::string, parent, "", "Parent block key (put).");
ABSL_FLAG(std::string, keys, "", "Comma-separated block keys (lookup).");
ABSL_FLAG(std::string, tokens, "", "Comma-separated token ids (lookup computes their block keys).");
ABSL_FLAG(std::string, in, "", "File to publish (put).");
ABSL_FLAG(std::string, out, "", "File to write (get).");
ABSL_FLAG(uint32_t, prompts, 8, "demo: number of prompts.");
ABSL_FLAG(uint32_t, prompt_tokens, 4096, "demo: tokens per prompt.");
ABSL_FLAG(uint32_t, shared_prefix_tokens, 1024,
          "demo: system-prompt tokens shared by all prompts.");
ABSL_FLAG(uint32_t, demo_layers, 8, "demo: model layers (KV block = layers*2*256*8*64*2 bytes).");

namespace {

using kvstrata::BlockKey;
using kvstrata::client::Client;
using kvstrata::client::Namespace;

int Die(const absl::Status& status) {
  std::cerr << "kvstrata: " << status << "\n";
  return status.code() == absl::StatusCode::kUnavailable ? 3 : 1;
}

kvstrata::v1::NamespaceSpec SpecFromFlags(uint64_t default_block_bytes) {
  kvstrata::v1::NamespaceSpec spec;
  spec.set_tenant(absl::GetFlag(FLAGS_tenant));
  spec.set_model(absl::GetFlag(FLAGS_model));
  spec.set_tokens_per_block(absl::GetFlag(FLAGS_tokens_per_block));
  if (absl::GetFlag(FLAGS_layers) == 0) {
    const uint64_t bytes = absl::GetFlag(FLAGS_block_bytes);
    spec.set_block_bytes(bytes != 0 ? bytes : default_block_bytes);
    return spec;
  }
  const std::string dtype = absl::GetFlag(FLAGS_dtype);
  spec.set_dtype(dtype == "bf16"   ? kvstrata::v1::DTYPE_BF16
                 : dtype == "fp32" ? kvstrata::v1::DTYPE_FP32
                                   : kvstrata::v1::DTYPE_FP16);
  spec.set_num_layers(absl::GetFlag(FLAGS_layers));
  spec.set_num_kv_heads(absl::GetFlag(FLAGS_kv_heads));
  spec.set_head_dim(absl::GetFlag(FLAGS_head_dim));
  return spec;
}

absl::StatusOr<std::unique_ptr<Client>> ConnectFromFlags() {
  kvstrata::client::ClientOptions options;
  options.node_address = absl::GetFlag(FLAGS_node);
  options.timeout = absl::GetFlag(FLAGS_timeout);
  return Client::Connect(options);
}

absl::StatusOr<std::vector<uint32_t>> ParseTokens(const std::string& text) {
  std::vector<uint32_t> tokens;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    uint32_t t;
    if (!absl::SimpleAtoi(part, &t))
      return absl::InvalidArgumentError(absl::StrCat("bad token id '", part, "'"));
    tokens.push_back(t);
  }
  return tokens;
}

int Put() {
  std::ifstream in(absl::GetFlag(FLAGS_in), std::ios::binary);
  if (!in)
    return Die(absl::NotFoundError(absl::StrCat("cannot read --in=", absl::GetFlag(FLAGS_in))));
  std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto key = BlockKey::FromHex(absl::GetFlag(FLAGS_key));
  if (!key.ok()) return Die(key.status());
  std::optional<BlockKey> parent;
  if (!absl::GetFlag(FLAGS_parent).empty()) {
    auto p = BlockKey::FromHex(absl::GetFlag(FLAGS_parent));
    if (!p.ok()) return Die(p.status());
    parent = *p;
  }
  auto client = ConnectFromFlags();
  if (!client.ok()) return Die(client.status());
  auto ns = (*client)->OpenNamespace(SpecFromFlags(data.size()));
  if (!ns.ok()) return Die(ns.status());
  if (data.size() != ns->block_bytes()) {
    return Die(absl::InvalidArgumentError(absl::StrCat(
        "file has ", data.size(), " bytes; the namespace's blocks have ", ns->block_bytes())));
  }
  auto buffer = (*client)->Allocate(data.size());
  if (!buffer.ok()) return Die(buffer.status());
  std::copy(data.begin(), data.end(), (*buffer)->data());
  auto result = ns->Publish({{*key, parent, buffer->get(), 0}});
  if (!result.ok()) return Die(result.status());
  std::cout << key->Hex() << " " << BlockOutcomeName(result->outcomes[0]) << "\n";
  return result->outcomes[0] == kvstrata::client::BlockOutcome::kOk ||
                 result->outcomes[0] == kvstrata::client::BlockOutcome::kAlreadyPresent
             ? 0
             : 1;
}

int Get() {
  auto key = BlockKey::FromHex(absl::GetFlag(FLAGS_key));
  if (!key.ok()) return Die(key.status());
  auto client = ConnectFromFlags();
  if (!client.ok()) return Die(client.status());
  auto ns = (*client)->OpenNamespace(SpecFromFlags(0));
  if (!ns.ok()) return Die(ns.status());
  auto buffer = (*client)->Allocate(ns->block_bytes());
  if (!buffer.ok()) return Die(buffer.status());
  auto result = ns->Fetch({{*key, buffer->get(), 0}});
  if (!result.ok()) return Die(result.status());
  if (result->outcomes[0] != kvstrata::client::BlockOutcome::kOk) {
    std::cerr << key->Hex() << " " << BlockOutcomeName(result->outcomes[0]) << "\n";
    return 2;
  }
  const std::string out = absl::GetFlag(FLAGS_out);
  if (out.empty() || out == "-") {
    std::cout.write(reinterpret_cast<const char*>((*buffer)->data()), ns->block_bytes());
  } else {
    std::ofstream file(out, std::ios::binary);
    file.write(reinterpret_cast<const char*>((*buffer)->data()), ns->block_bytes());
    if (!file) return Die(absl::InternalError(absl::StrCat("cannot write ", out)));
  }
  return 0;
}

int Lookup() {
  auto client = ConnectFromFlags();
  if (!client.ok()) return Die(client.status());
  auto ns = (*client)->OpenNamespace(SpecFromFlags(1));
  if (!ns.ok()) return Die(ns.status());
  std::vector<BlockKey> keys;
  if (!absl::GetFlag(FLAGS_tokens).empty()) {
    auto tokens = ParseTokens(absl::GetFlag(FLAGS_tokens));
    if (!tokens.ok()) return Die(tokens.status());
    keys = ns->Keys(*tokens);
  } else {
    for (absl::string_view hex :
         absl::StrSplit(absl::GetFlag(FLAGS_keys), ',', absl::SkipEmpty())) {
      auto key = BlockKey::FromHex(std::string(hex));
      if (!key.ok()) return Die(key.status());
      keys.push_back(*key);
    }
  }
  auto result = ns->Lookup(keys);
  if (!result.ok()) return Die(result.status());
  std::cout << "prefix_length " << result->prefix_length << " of " << keys.size() << "\n";
  return 0;
}

bool ClusterFlagsGiven() {
  return !absl::GetFlag(FLAGS_nodes).empty() || !absl::GetFlag(FLAGS_dns).empty();
}

absl::StatusOr<std::unique_ptr<kvstrata::client::Cluster>> ClusterFromFlags() {
  kvstrata::client::ClusterOptions options;
  for (absl::string_view node : absl::StrSplit(absl::GetFlag(FLAGS_nodes), ',', absl::SkipEmpty())) {
    options.nodes.emplace_back(node);
  }
  options.dns = absl::GetFlag(FLAGS_dns);
  if (options.nodes.empty() && options.dns.empty()) options.nodes.push_back(absl::GetFlag(FLAGS_node));
  options.client.timeout = absl::GetFlag(FLAGS_timeout);
  options.replication = std::max(1, absl::GetFlag(FLAGS_replication));
  options.repair_bytes_per_second = 0;  // a tool looks; it copies nothing
  return kvstrata::client::Cluster::Connect(options);
}

double Ratio(uint64_t part, uint64_t whole) {
  return whole == 0 ? 0.0 : static_cast<double>(part) / static_cast<double>(whole);
}

// One line per node: health, tier use and hit rates, then the totals.
int ClusterStat() {
  auto cluster = ClusterFromFlags();
  if (!cluster.ok()) return Die(cluster.status());
  uint64_t blocks = 0, stored = 0, capacity = 0, hits = 0, lookups = 0, fetch_hits = 0, fetches = 0;
  int healthy = 0;
  const auto nodes = (*cluster)->Nodes();
  for (const auto& node : nodes) {
    std::cout << node.address << (node.healthy ? " up" : " DOWN") << (node.draining ? " draining" : "");
    kvstrata::v1::StatsResponse stats;
    if (!node.healthy || !(*cluster)->Stats(node.address, &stats).ok()) {
      std::cout << "\n";
      continue;
    }
    ++healthy;
    uint64_t node_blocks = 0, node_stored = 0, node_capacity = 0;
    for (const auto& tier : stats.tiers()) {
      node_blocks += tier.blocks();
      node_stored += tier.stored_bytes();
      node_capacity += tier.capacity_bytes();
    }
    const uint64_t node_lookups = stats.lookup_hit_blocks() + stats.lookup_miss_blocks();
    const uint64_t node_fetches = stats.fetch_hit_blocks() + stats.fetch_miss_blocks();
    std::printf(" blocks=%lu used=%.1f%% lookup_hit_rate=%.3f fetch_hit_rate=%.3f transports=%s\n",
                node_blocks, 100 * Ratio(node_stored, node_capacity),
                Ratio(stats.lookup_hit_blocks(), node_lookups),
                Ratio(stats.fetch_hit_blocks(), node_fetches),
                absl::StrJoin(stats.transports(), ",").c_str());
    blocks += node_blocks;
    stored += node_stored;
    capacity += node_capacity;
    hits += stats.lookup_hit_blocks();
    lookups += node_lookups;
    fetch_hits += stats.fetch_hit_blocks();
    fetches += node_fetches;
  }
  std::printf("cluster: %d of %zu nodes up, blocks=%lu used=%.1f%% lookup_hit_rate=%.3f fetch_hit_rate=%.3f\n",
              healthy, nodes.size(), blocks, 100 * Ratio(stored, capacity), Ratio(hits, lookups),
              Ratio(fetch_hits, fetches));
  if (const int replication = absl::GetFlag(FLAGS_replication); replication > 0) {
    const kvstrata::v1::NamespaceSpec spec = SpecFromFlags(0);
    auto ns = (*cluster)->OpenNamespace(spec);
    if (!ns.ok()) return Die(ns.status());
    auto census = ns->Census();
    if (!census.ok()) return Die(census.status());
    for (const auto& [address, held] : census->node_blocks) {
      std::printf("%s namespace_blocks=%lu\n", address.c_str(), held);
    }
    std::printf("namespace %s/%s: blocks=%lu under_replicated=%lu (fewer than %d live copies)\n",
                spec.tenant().c_str(), spec.model().c_str(), census->blocks,
                census->under_replicated, replication);
  }
  return healthy == static_cast<int>(nodes.size()) ? 0 : 3;
}

int Drain() {
  auto cluster = ClusterFromFlags();
  if (!cluster.ok()) return Die(cluster.status());
  const bool draining = !absl::GetFlag(FLAGS_undrain);
  absl::Status status = (*cluster)->Drain(absl::GetFlag(FLAGS_node), draining);
  if (!status.ok()) return Die(status);
  std::cout << absl::GetFlag(FLAGS_node) << (draining ? " draining" : " in service") << "\n";
  return 0;
}

// Offline replay of a trace: each policy against LRU and Belady's optimum.
int LiveReplay(const std::vector<kvstrata::cachenode::TraceRequest>& trace);

int Replay() {
  auto trace = kvstrata::cachenode::LoadMooncakeTrace(absl::GetFlag(FLAGS_trace));
  if (!trace.ok()) return Die(trace.status());
  if (const int64_t n = absl::GetFlag(FLAGS_requests);
      n > 0 && static_cast<size_t>(n) < trace->size()) {
    trace->resize(n);
  }
  if (absl::GetFlag(FLAGS_live)) return LiveReplay(*trace);
  const size_t distinct = kvstrata::cachenode::DistinctBlocks(*trace);
  std::vector<size_t> capacities;
  for (absl::string_view text :
       absl::StrSplit(absl::GetFlag(FLAGS_capacity), ',', absl::SkipEmpty())) {
    double value = 0;
    if (!absl::SimpleAtod(text, &value) || value <= 0) {
      return Die(absl::InvalidArgumentError(absl::StrCat("bad capacity '", text, "'")));
    }
    capacities.push_back(value <= 1 ? static_cast<size_t>(value * distinct)
                                    : static_cast<size_t>(value));
  }
  std::vector<std::string> policies =
      absl::StrSplit(absl::GetFlag(FLAGS_policy), ',', absl::SkipEmpty());
  std::printf("trace: %zu requests, %zu distinct blocks\n", trace->size(), distinct);
  kvstrata::cachenode::ReplayOptions replay_options;
  replay_options.decode_ms_per_token = absl::GetFlag(FLAGS_decode_ms_per_token);
  auto rows = kvstrata::cachenode::ComparePolicies(*trace, capacities, policies, /*repeats=*/3,
                                                   replay_options);
  if (!rows.ok()) return Die(rows.status());
  std::fputs(kvstrata::cachenode::FormatComparisons(*rows, distinct).c_str(), stdout);
  return 0;
}

// The namespace a live replay publishes into: --model etc., 64 KiB blocks
// unless --block_bytes says otherwise, one trace block (512 tokens) each.
kvstrata::v1::NamespaceSpec TraceSpecFromFlags() {
  kvstrata::v1::NamespaceSpec spec = SpecFromFlags(65536);
  spec.set_tokens_per_block(kvstrata::cachenode::kTraceTokensPerBlock);
  return spec;
}

kvstrata::tools::LiveReplayOptions LiveOptionsFromFlags() {
  kvstrata::tools::LiveReplayOptions options;
  options.time_scale = absl::GetFlag(FLAGS_time_scale);
  options.hints = absl::GetFlag(FLAGS_hints);
  return options;
}

void PrintLive(const kvstrata::tools::LiveReplayResult& result, uint64_t block_bytes,
               uint64_t evictions, bool hints) {
  std::printf(
      "live: %llu requests in %.1f s, block %llu bytes; token hit rate %.4f, block hit rate "
      "%.4f; published %llu blocks; node evictions %llu; prefixes shortened between lookup and "
      "fetch %llu\n",
      static_cast<unsigned long long>(result.requests), result.seconds,
      static_cast<unsigned long long>(block_bytes), result.token_hit_rate(),
      result.block_hit_rate(), static_cast<unsigned long long>(result.published_blocks),
      static_cast<unsigned long long>(evictions),
      static_cast<unsigned long long>(result.lookup_fetch_mismatches));
  if (hints) {
    std::printf("live: request-finished hints %llu, for a block the node held %llu, failed %llu\n",
                static_cast<unsigned long long>(result.hints),
                static_cast<unsigned long long>(result.hints_known),
                static_cast<unsigned long long>(result.hint_failures));
  }
  for (const auto& [name, latency] :
       {std::pair{"lookup", result.lookup}, std::pair{"fetch", result.fetch},
        std::pair{"publish", result.publish}, std::pair{"hint", result.hint}}) {
    std::printf("live: %-7s %6zu calls, p50 %8.1f us, p99 %8.1f us\n", name, latency.count,
                latency.p50_us, latency.p99_us);
  }
}

// The trace against the cluster of --nodes (or --dns): blocks placed as the
// cluster client places them; then, offline, the same slice over as many
// simulated nodes of the smallest node's capacity, and on one node of the
// whole capacity.
int ClusterLiveReplay(const std::vector<kvstrata::cachenode::TraceRequest>& trace) {
  auto cluster = ClusterFromFlags();
  if (!cluster.ok()) return Die(cluster.status());
  auto ns = (*cluster)->OpenNamespace(TraceSpecFromFlags());
  if (!ns.ok()) return Die(ns.status());
  const kvstrata::tools::LiveReplayOptions options = LiveOptionsFromFlags();
  auto result = kvstrata::tools::LiveReplay(**cluster, *ns, trace, options);
  if (!result.ok()) return Die(result.status());
  uint64_t evictions = 0, smallest = UINT64_MAX, total = 0, busiest = 0, accesses = 0;
  size_t nodes = 0;
  for (const kvstrata::client::NodeStatus& node : (*cluster)->Nodes()) {
    kvstrata::v1::StatsResponse stats;
    if (absl::Status s = (*cluster)->Stats(node.address, &stats); !s.ok()) return Die(s);
    uint64_t capacity = 0;
    for (const auto& tier : stats.tiers()) {
      capacity += tier.capacity_bytes();
      evictions += tier.evictions();
    }
    // Blocks each node was asked about or sent: its share of the load.
    const uint64_t load =
        stats.lookup_hit_blocks() + stats.lookup_miss_blocks() + stats.published_blocks();
    std::printf("live: node %s capacity %llu bytes, lookups+publishes %llu blocks\n",
                node.address.c_str(), static_cast<unsigned long long>(capacity),
                static_cast<unsigned long long>(load));
    smallest = std::min(smallest, capacity);
    total += capacity;
    busiest = std::max(busiest, load);
    accesses += load;
    ++nodes;
  }
  PrintLive(*result, ns->block_bytes(), evictions, options.hints);
  std::printf("live: %zu nodes, load spread %.2f (busiest node / mean)\n", nodes,
              accesses ? static_cast<double>(busiest) * nodes / accesses : 0.0);
  kvstrata::cachenode::ReplayOptions replay_options;
  replay_options.decode_ms_per_token = options.hints ? 0 : -1;
  const size_t per_node = smallest / ns->block_bytes();
  const size_t whole = total / ns->block_bytes();
  for (const std::string& policy : std::vector<std::string>(
           absl::StrSplit(absl::GetFlag(FLAGS_policy), ',', absl::SkipEmpty()))) {
    auto split = kvstrata::cachenode::ReplayCluster(trace, nodes, per_node, policy, 1,
                                                    replay_options);
    auto one = kvstrata::cachenode::ReplayCluster(trace, 1, whole, policy, 1, replay_options);
    if (!split.ok()) return Die(split.status());
    if (!one.ok()) return Die(one.status());
    std::printf("offline %s, %zu nodes of %zu blocks: token hit rate %.4f, load spread %.2f\n",
                policy.c_str(), nodes, per_node, split->total.token_hit_rate(),
                split->load_spread());
    std::printf("offline %s, one node of %zu blocks: token hit rate %.4f\n", policy.c_str(), whole,
                one->total.token_hit_rate());
  }
  return 0;
}

// The trace against a running node; then the offline replay of the same slice
// at the node's DRAM capacity in blocks, for comparison.
int LiveReplay(const std::vector<kvstrata::cachenode::TraceRequest>& trace) {
  if (ClusterFlagsGiven()) return ClusterLiveReplay(trace);
  auto client = ConnectFromFlags();
  if (!client.ok()) return Die(client.status());
  auto ns = (*client)->OpenNamespace(TraceSpecFromFlags());
  if (!ns.ok()) return Die(ns.status());
  const kvstrata::tools::LiveReplayOptions options = LiveOptionsFromFlags();
  auto result = kvstrata::tools::LiveReplay(**client, *ns, trace, options);
  if (!result.ok()) return Die(result.status());
  kvstrata::v1::StatsResponse stats;
  if (absl::Status s = (*client)->Stats(&stats); !s.ok()) return Die(s);
  uint64_t capacity_bytes = 0, evictions = 0;
  for (const auto& tier : stats.tiers()) {
    capacity_bytes += tier.capacity_bytes();
    evictions += tier.evictions();
  }
  PrintLive(*result, ns->block_bytes(), evictions, options.hints);
  const size_t capacity_blocks = capacity_bytes / ns->block_bytes();
  std::printf("offline, same slice, capacity %zu blocks (node DRAM / block bytes):\n",
              capacity_blocks);
  std::vector<std::string> policies =
      absl::StrSplit(absl::GetFlag(FLAGS_policy), ',', absl::SkipEmpty());
  // Offline hints as the live run sent them: right after each request, or none.
  kvstrata::cachenode::ReplayOptions replay_options;
  replay_options.decode_ms_per_token = options.hints ? 0 : -1;
  auto rows =
      kvstrata::cachenode::ComparePolicies(trace, {capacity_blocks}, policies, 1, replay_options);
  if (!rows.ok()) return Die(rows.status());
  std::fputs(
      kvstrata::cachenode::FormatComparisons(*rows, kvstrata::cachenode::DistinctBlocks(trace))
          .c_str(),
      stdout);
  return 0;
}

int Stat() {
  if (ClusterFlagsGiven()) return ClusterStat();
  auto client = ConnectFromFlags();
  if (!client.ok()) return Die(client.status());
  kvstrata::v1::StatsResponse stats;
  if (absl::Status s = (*client)->Stats(&stats); !s.ok()) return Die(s);
  for (const auto& tier : stats.tiers()) {
    std::cout << "tier " << kvstrata::v1::Tier_Name(tier.tier()) << " blocks=" << tier.blocks()
              << " stored_bytes=" << tier.stored_bytes() << " used_bytes=" << tier.used_bytes()
              << " capacity_bytes=" << tier.capacity_bytes() << " evictions=" << tier.evictions();
    if (tier.tier() == kvstrata::v1::TIER_NVME || tier.tier() == kvstrata::v1::TIER_HBM) {
      std::cout << " errors=" << tier.errors();
      if (!tier.last_error().empty()) std::cout << " last_error=\"" << tier.last_error() << "\"";
    }
    std::cout << "\n";
  }
  if (stats.demoted_blocks() + stats.demotion_drops() + stats.promoted_blocks() > 0) {
    std::cout << "nvme demoted=" << stats.demoted_blocks() << " dropped=" << stats.demotion_drops()
              << " promoted=" << stats.promoted_blocks()
              << " corrupt_blocks=" << stats.nvme_corrupt_blocks()
              << " corrupt_records=" << stats.nvme_corrupt_records() << "\n";
  }
  if (!stats.gpu_device().empty()) {
    std::cout << "hbm gpu=\"" << stats.gpu_device() << "\" promoted=" << stats.hbm_promoted_blocks()
              << " demoted=" << stats.hbm_demoted_blocks() << " dropped=" << stats.hbm_demotion_drops()
              << " staged=" << stats.hbm_staged_blocks()
              << " staging_fallbacks=" << stats.hbm_staging_fallbacks()
              << " staging_bytes=" << stats.hbm_staging_bytes()
              << " staging_leased_bytes=" << stats.hbm_staging_leased_bytes() << "\n";
  }
  const uint64_t lookups = stats.lookup_hit_blocks() + stats.lookup_miss_blocks();
  std::cout << "namespaces " << stats.namespaces() << "\n"
            << "lookup_hit_blocks " << stats.lookup_hit_blocks() << "\n"
            << "lookup_miss_blocks " << stats.lookup_miss_blocks() << "\n"
            << "lookup_hit_rate "
            << (lookups ? static_cast<double>(stats.lookup_hit_blocks()) / lookups : 0.0) << "\n"
            << "fetch_hit_blocks " << stats.fetch_hit_blocks() << "\n"
            << "fetch_miss_blocks " << stats.fetch_miss_blocks() << "\n"
            << "published_blocks " << stats.published_blocks() << "\n"
            << "duplicate_blocks " << stats.duplicate_blocks() << "\n"
            << "checksum_failures " << stats.checksum_failures() << "\n"
            << "transfer_failures " << stats.transfer_failures() << "\n"
            << "request_hints " << stats.request_hints() << "\n"
            << "bytes_in " << stats.bytes_in() << "\n"
            << "bytes_out " << stats.bytes_out() << "\n"
            << "transports " << absl::StrJoin(stats.transports(), ",") << "\n"
            << "uptime_seconds " << stats.uptime_seconds() << "\n";
  return 0;
}

// ---- demo: a prefill worker and a decode worker in separate processes -------

kvstrata::v1::NamespaceSpec DemoSpec() {
  kvstrata::v1::NamespaceSpec spec;
  spec.set_tenant("demo");
  spec.set_model(absl::GetFlag(FLAGS_model) == "cli" ? "demo-model" : absl::GetFlag(FLAGS_model));
  spec.set_dtype(kvstrata::v1::DTYPE_FP16);
  spec.set_num_layers(absl::GetFlag(FLAGS_demo_layers));
  spec.set_num_kv_heads(8);
  spec.set_head_dim(64);
  spec.set_tokens_per_block(256);
  return spec;
}

// Prompt p: a system prompt shared by all, then tokens of its own.
std::vector<uint32_t> DemoPrompt(uint32_t p) {
  const uint32_t total = absl::GetFlag(FLAGS_prompt_tokens);
  const uint32_t shared = std::min(absl::GetFlag(FLAGS_shared_prefix_tokens), total);
  std::vector<uint32_t> tokens(total);
  std::mt19937 system_rng(7), own_rng(1000 + p);
  for (uint32_t i = 0; i < total; ++i) tokens[i] = (i < shared ? system_rng() : own_rng()) % 128000;
  return tokens;
}

// Stand-in for attention KV: bytes that depend only on the block's key, so the
// decode worker can check every byte it fetched.
void FillDemoKv(const BlockKey& key, uint8_t* data, size_t size) {
  uint64_t state;
  std::memcpy(&state, key.bytes.data(), 8);
  state |= 1;
  for (size_t i = 0; i + 8 <= size; i += 8) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    std::memcpy(data + i, &state, 8);
  }
}

int DemoWorker(bool prefill) {
  auto client = ConnectFromFlags();
  if (!client.ok()) return Die(client.status());
  auto ns = (*client)->OpenNamespace(DemoSpec());
  if (!ns.ok()) return Die(ns.status());
  const uint32_t prompts = absl::GetFlag(FLAGS_prompts);
  const size_t max_blocks = absl::GetFlag(FLAGS_prompt_tokens) / ns->tokens_per_block();
  auto buffer = (*client)->Allocate(std::max<size_t>(1, max_blocks) * ns->block_bytes());
  if (!buffer.ok()) return Die(buffer.status());
  uint64_t total_tokens = 0, cached_tokens = 0, bytes = 0, bad_blocks = 0, stored = 0;
  absl::Duration transfer_time;
  for (uint32_t p = 0; p < prompts; ++p) {
    const std::vector<uint32_t> tokens = DemoPrompt(p);
    const std::vector<BlockKey> keys = ns->Keys(tokens);
    total_tokens += tokens.size();
    if (prefill) {
      std::vector<kvstrata::client::PublishItem> items;
      for (size_t b = 0; b < keys.size(); ++b) {
        uint8_t* at = (*buffer)->data() + b * ns->block_bytes();
        FillDemoKv(keys[b], at, ns->block_bytes());  // "computing" the KV
        items.push_back({keys[b], b ? std::optional(keys[b - 1]) : std::nullopt, buffer->get(),
                         b * ns->block_bytes()});
      }
      const absl::Time start = absl::Now();
      auto result = ns->Publish(items);
      transfer_time += absl::Now() - start;
      if (!result.ok()) return Die(result.status());
      stored += result->count(kvstrata::client::BlockOutcome::kOk);
      bytes += result->bytes;
    } else {
      auto found = ns->Lookup(keys);
      if (!found.ok()) return Die(found.status());
      std::vector<kvstrata::client::FetchItem> items;
      for (size_t b = 0; b < found->prefix_length; ++b) {
        items.push_back({keys[b], buffer->get(), b * ns->block_bytes()});
      }
      const absl::Time start = absl::Now();
      auto result = ns->Fetch(items);
      transfer_time += absl::Now() - start;
      if (!result.ok()) return Die(result.status());
      std::vector<uint8_t> expected(ns->block_bytes());
      for (size_t b = 0; b < items.size(); ++b) {
        if (result->outcomes[b] != kvstrata::client::BlockOutcome::kOk) break;
        FillDemoKv(keys[b], expected.data(), expected.size());
        if (std::memcmp(expected.data(), (*buffer)->data() + b * ns->block_bytes(),
                        expected.size()) != 0) {
          ++bad_blocks;
          break;
        }
        cached_tokens += ns->tokens_per_block();
      }
      bytes += result->bytes;
    }
  }
  const double seconds = std::max(absl::ToDoubleSeconds(transfer_time), 1e-9);
  if (prefill) {
    std::printf(
        "prefill: %u prompts, %lu blocks stored (shared prefix deduplicated), %.1f MiB in %.3f s = "
        "%.2f GB/s\n",
        prompts, stored, bytes / 1048576.0, seconds, bytes / seconds / 1e9);
  } else {
    std::printf(
        "decode:  %u prompts, token hit rate %.3f (%lu of %lu tokens cached), %.1f MiB fetched in "
        "%.3f s = %.2f GB/s, %lu blocks wrong\n",
        prompts, static_cast<double>(cached_tokens) / total_tokens, cached_tokens, total_tokens,
        bytes / 1048576.0, seconds, bytes / seconds / 1e9, bad_blocks);
  }
  return bad_blocks == 0 ? 0 : 4;
}

int RunChild(const char* self, const std::string& role, int argc, char** argv) {
  std::vector<std::string> args = {self, role};
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) != "demo") args.push_back(argv[i]);
  }
  std::vector<char*> cargs;
  for (auto& a : args) cargs.push_back(a.data());
  cargs.push_back(nullptr);
  pid_t pid;
  if (posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, cargs.data(), environ) != 0) {
    return Die(absl::InternalError("cannot start a demo worker process"));
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::FlagsUsageConfig usage;
  usage.contains_help_flags = [](absl::string_view path) {
    return path == "kvstrata";
  };
  usage.contains_helpshort_flags = usage.contains_help_flags;
  // Shown as the binary's name, not the build machine's source path.
  usage.normalize_filename = [](absl::string_view path) {
    return path.find("tools/kvstrata.cc") != absl::string_view::npos ? std::string("kvstrata") : std::string(path);
  };
  absl::SetFlagsUsageConfig(usage);
  absl::SetProgramUsageMessage(
      "kvstrata <put|get|lookup|stat|demo> [flags]\n"
      "  put    --key=HEX [--parent=HEX] --in=FILE   store one block\n"
      "  get    --key=HEX --out=FILE --block_bytes=N  fetch one block\n"
      "  lookup --keys=HEX,... | --tokens=1,2,...     longest stored prefix\n"
      "  stat   [--nodes=a,b,c | --dns=name:port]     node counters, or the whole cluster\n"
      "  drain  --node=ADDR [--undrain] [--nodes=...] a node refuses (or accepts again) new blocks\n"
      "  replay --trace=FILE [--capacity=0.1] [--policy=adaptive,chain-slru]\n"
      "                                               offline: policies vs LRU vs Belady\n"
      "  replay --live --trace=FILE [--block_bytes=N] [--time_scale=X] [--requests=N]\n"
      "         [--hints=false] [--nodes=a,b,c]       the trace against the node at --node\n"
      "                                               (or the cluster of --nodes / --dns)\n"
      "  demo                                         prefill worker -> decode worker handoff");
  std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() < 2) {
    std::cerr << absl::ProgramUsageMessage() << "\n";
    return 2;
  }
  const std::string command = positional[1];
  if (command == "put") return Put();
  if (command == "get") return Get();
  if (command == "lookup") return Lookup();
  if (command == "stat") return Stat();
  if (command == "drain") return Drain();
  if (command == "replay") return Replay();
  if (command == "demo-prefill") return DemoWorker(/*prefill=*/true);
  if (command == "demo-decode") return DemoWorker(/*prefill=*/false);
  if (command == "demo") {
    if (int rc = RunChild(argv[0], "demo-prefill", argc, argv); rc != 0) return rc;
    return RunChild(argv[0], "demo-decode", argc, argv);
  }
  std::cerr << "unknown command '" << command << "'\n" << absl::ProgramUsageMessage() << "\n";
  return 2;
}
