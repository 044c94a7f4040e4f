// Many cache nodes as one cache (DESIGN.md §7).
//
//   auto cluster = Cluster::Connect({.nodes = {"10.0.0.1:50151", "10.0.0.2:50151"}});
//   // or {.dns = "kvstrata-headless.default.svc:50151"} for a Kubernetes headless Service
//   auto ns = (*cluster)->OpenNamespace(spec);
//   ns->Publish(items);  ns->Lookup(keys);  ns->Fetch(items);
//
// Placement is rendezvous (highest-random-weight) hashing of each block key
// over the live nodes: adding or removing one of N nodes moves about 1/N of
// the keys. Lookups, publishes and fetches fan out one batched call per owning
// node, in parallel. A node that stops answering is skipped (its blocks become
// misses, never errors) and taken back once health checks see it again. With
// `replication` R, publishes go to the top-R nodes and a fetch falls back to
// the next replica, so losing a node loses no block. A draining node takes no
// new publishes but still serves what it has.
//
// Re-replication: a node that comes back empty (or a replica that missed a
// publish) would leave blocks with fewer than R copies, so a later loss
// would lose them. A background repairer in each Cluster copies them back,
// one copy at a time and within `repair_bytes_per_second`, with the ordinary
// Fetch and Publish (checksums end to end, parents kept):
//  - on read: a Fetch that finds a block only on a later replica queues a
//    copy to the owners that said they lack it (a bounded queue; beyond it
//    the copy is dropped and counted, the fetch never waits);
//  - on rejoin: when a health check sees a node new, back or restarted, the
//    repairer walks every live node's blocks of the namespaces this Cluster
//    opened (ListBlocks) and copies to each block's owners what they lack.
// Only namespaces stored raw are repaired (a quantized block fetched is the
// encoded form, which Publish does not take).
//
// Thread safety: Cluster and ClusterNamespace are safe for concurrent use.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "kvstrata/client/client.h"

namespace kvstrata::client {

struct ClusterOptions {
  std::vector<std::string> nodes;  // static "host:port" addresses
  std::string dns;                 // "name:port": every address the name resolves to
  absl::Duration refresh_interval = absl::Seconds(2);  // DNS and health checks
  absl::Duration health_timeout = absl::Milliseconds(500);
  int replication = 1;  // copies of each published block
  ClientOptions client;  // for every node (node_address is ignored)
  // Bytes per second the repairer moves (fetched plus published, so half
  // lands in the owner); 0 turns repair off. 64 MiB/s is about 0.5% of a
  // 100 Gb/s link and refills a node's 8 GiB share in about 4 minutes with
  // one client repairing: every client of a cluster repairs, so their sum,
  // not one, meets the serving traffic (bench/repair_bench: the bound holds
  // at 1.00x; unbounded, a repair copies as fast as a hand-written copy).
  uint64_t repair_bytes_per_second = 64ull << 20;
  // Memory the repairer copies through (at least one block): 16 MiB is 1 to
  // 16 blocks of the usual 1-16 MiB, enough for batched calls.
  uint64_t repair_buffer_bytes = 16ull << 20;
  // Copies found wanting by fetches and not yet made; beyond it they are
  // dropped (the next rejoin pass still finds them). 4096 entries are
  // about 0.5 MiB.
  size_t repair_queue_blocks = 4096;
};

// What the repairer has done (Cluster::Repairs).
struct RepairStats {
  uint64_t repaired_blocks = 0;  // copies made (a block copied to two owners counts twice)
  uint64_t repaired_bytes = 0;
  uint64_t queued_on_read = 0;   // copies fetches found wanting and queued
  uint64_t pending_blocks = 0;   // of them, not yet made
  uint64_t dropped_blocks = 0;   // copies not queued: the queue was full
  uint64_t failed_blocks = 0;    // copies tried that failed (node down, no space, gone)
  uint64_t passes = 0;           // rejoin passes completed
  uint64_t passes_requested = 0; // rejoins seen (a pass runs for one or more)
  absl::Time last_pass_end = absl::InfinitePast();
  absl::Duration last_pass_duration;
};

// Who holds a namespace's blocks (ClusterNamespace::Census).
struct ReplicaCensus {
  std::vector<std::pair<std::string, uint64_t>> node_blocks;  // live node -> its blocks
  uint64_t blocks = 0;            // distinct blocks held anywhere
  uint64_t under_replicated = 0;  // of them, with fewer than R copies on live nodes
};

struct NodeStatus {
  std::string address;
  bool healthy = false;
  bool draining = false;
};

class Cluster;

class ClusterNamespace {
 public:
  uint64_t block_bytes() const { return block_bytes_; }
  std::vector<BlockKey> Keys(absl::Span<const uint32_t> tokens,
                             const BlockKey& parent = BlockKey{}) const;
  // Longest prefix of `keys` stored anywhere in the cluster.
  absl::StatusOr<LookupResult> Lookup(absl::Span<const BlockKey> keys);
  absl::StatusOr<TransferResult> Publish(absl::Span<const PublishItem> items);
  absl::StatusOr<TransferResult> Fetch(absl::Span<const FetchItem> items);
  // Namespace::RequestFinished, sent to every node that may hold `last_key`
  // (its replicas, in parallel). True when one of them holds it; nodes that
  // do not answer are skipped, as elsewhere. Each node's policy sees the
  // blocks placed on it: a chain's blocks are spread over the nodes, so a
  // chain-aware policy there ranks fragments of chains.
  absl::StatusOr<bool> RequestFinished(const BlockKey& last_key, uint32_t output_tokens);
  // Lists every live node's blocks of this namespace (ListBlocks, a page at
  // a time) and counts copies. Holds one entry per distinct block (about 40
  // bytes): a tool's call, not a serving path's.
  absl::StatusOr<ReplicaCensus> Census();

 private:
  friend class Cluster;
  ClusterNamespace(Cluster* cluster, std::shared_ptr<const void> spec, uint64_t id,
                   uint64_t block_bytes, uint32_t tokens_per_block)
      : cluster_(cluster),
        spec_(std::move(spec)),
        id_(id),
        block_bytes_(block_bytes),
        tokens_per_block_(tokens_per_block) {}
  Cluster* cluster_;
  std::shared_ptr<const void> spec_;  // v1::NamespaceSpec
  uint64_t id_;
  uint64_t block_bytes_;
  uint32_t tokens_per_block_;
};

class Cluster {
 public:
  // Resolves the membership and checks every node once; fails only when no
  // node is configured (nodes that are down are skipped until they answer).
  static absl::StatusOr<std::unique_ptr<Cluster>> Connect(const ClusterOptions& options);
  ~Cluster();

  absl::StatusOr<ClusterNamespace> OpenNamespace(const v1::NamespaceSpec& spec);
  // Memory usable with every node.
  absl::StatusOr<std::unique_ptr<Buffer>> Allocate(size_t size);
  absl::StatusOr<std::unique_ptr<Buffer>> Register(void* data, size_t size);

  std::vector<NodeStatus> Nodes();
  // Re-resolves DNS and health-checks every node now.
  void Refresh();
  // Makes `address` refuse (or accept again) new publishes.
  absl::Status Drain(const std::string& address, bool draining);
  // Stats of one node (include kvstrata.pb.h to read them).
  absl::Status Stats(const std::string& address, v1::StatsResponse* out);
  // The repairer's counters (all zero with repair off).
  RepairStats Repairs();

  class Impl;

 private:
  friend class ClusterNamespace;
  explicit Cluster(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Rendezvous placement: the `count` best of `nodes` for `key`, best first.
// Deterministic: every client computes the same owners.
std::vector<std::string> RendezvousOwners(const BlockKey& key,
                                          absl::Span<const std::string> nodes, size_t count);

}  // namespace kvstrata::client
