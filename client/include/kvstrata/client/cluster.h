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
