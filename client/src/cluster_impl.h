// Cluster internals shared by cluster.cc and the replica repairer: members,
// their health, and running a call against a node's handle of a namespace.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "client_impl.h"
#include "kvstrata/client/cluster.h"

namespace kvstrata::client {

class ReplicaRepairer;

// One member of the cluster: its client, health, and the namespaces opened on it.
struct Node {
  std::string address;
  std::unique_ptr<Client> client;
  std::atomic<bool> healthy{false};
  std::atomic<bool> draining{false};
  std::atomic<uint64_t> incarnation{0};  // changes when the node process restarts
  absl::Mutex mu;
  absl::flat_hash_map<uint64_t, Namespace> namespaces ABSL_GUARDED_BY(mu);
};
using NodePtr = std::shared_ptr<Node>;

inline bool NodeIsDown(const absl::Status& status) {
  return absl::IsUnavailable(status) || absl::IsDeadlineExceeded(status);
}

class Cluster::Impl {
 public:
  ClusterOptions options;
  std::shared_ptr<transfer::Engine> engine;

  Impl();
  ~Impl();

  void StartRefresher();
  // Membership from the static list and DNS, then one health check per node
  // (concurrently, each bounded by health_timeout).
  void Refresh();

  std::vector<NodePtr> Nodes() {
    absl::MutexLock lock(&mu_);
    return nodes_;
  }

  // Healthy nodes (for a publish: not draining either), by address.
  std::vector<NodePtr> Live(bool for_publish) {
    std::vector<NodePtr> live;
    for (const NodePtr& node : Nodes()) {
      if (node->healthy.load() && !(for_publish && node->draining.load())) live.push_back(node);
    }
    return live;
  }

  NodePtr Find(const std::string& address) {
    for (const NodePtr& node : Nodes()) {
      if (node->address == address) return node;
    }
    return nullptr;
  }

  // The node's handle of the namespace, opened there on first use.
  absl::StatusOr<Namespace> NodeNamespace(Node& node, uint64_t id, const v1::NamespaceSpec& spec) {
    {
      absl::MutexLock lock(&node.mu);
      if (auto it = node.namespaces.find(id); it != node.namespaces.end()) return it->second;
    }
    absl::StatusOr<Namespace> ns = node.client->OpenNamespace(spec, options.client.timeout);
    if (!ns.ok()) return ns.status();
    absl::MutexLock lock(&node.mu);
    node.namespaces.insert_or_assign(id, *ns);
    return *ns;
  }

  // Runs `op` with the node's handle of the namespace. A node that restarted
  // has forgotten its namespaces (NOT_FOUND): reopen there and retry once.
  template <typename T, typename Op>
  absl::StatusOr<T> WithNamespace(Node& node, uint64_t id, const v1::NamespaceSpec& spec, Op op) {
    for (int attempt = 0;; ++attempt) {
      absl::StatusOr<Namespace> ns = NodeNamespace(node, id, spec);
      absl::StatusOr<T> result = ns.ok() ? op(*ns) : absl::StatusOr<T>(ns.status());
      if (result.ok() || !absl::IsNotFound(result.status()) || attempt > 0) {
        if (!result.ok()) Failed(node, result.status());
        return result;
      }
      absl::MutexLock lock(&node.mu);
      node.namespaces.erase(id);
    }
  }

  // A failed call takes the node out until a health check sees it again.
  void Failed(Node& node, const absl::Status& status) {
    if (NodeIsDown(status)) node.healthy.store(false);
  }

  // Null when repair is off (repair_bytes_per_second 0).
  ReplicaRepairer* repairer() { return repairer_.get(); }
  void StartRepairer();

 private:
  absl::Mutex mu_;
  std::vector<NodePtr> nodes_ ABSL_GUARDED_BY(mu_);
  absl::Notification stop_;
  std::thread refresher_;
  std::unique_ptr<ReplicaRepairer> repairer_;
};

// The `count` best of `live` for `key` (rendezvous), best first.
std::vector<NodePtr> OwnerNodes(const BlockKey& key, const std::vector<NodePtr>& live,
                                size_t count);

}  // namespace kvstrata::client
