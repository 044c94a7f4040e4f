// The Cluster's background repairer (cluster.h, "Re-replication"): one
// thread, one copy at a time, a fixed buffer, a byte rate.
#pragma once

#include <deque>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "cluster_impl.h"
#include "kvstrata.pb.h"

namespace kvstrata::client {

// A namespace the Cluster opened, as the repairer needs it.
struct RepairNamespace {
  uint64_t id = 0;
  uint64_t block_bytes = 0;
  std::shared_ptr<const v1::NamespaceSpec> spec;
};

// One page of a node's blocks (ListBlocks); `keys` non-empty asks for just
// those (the ones stored). Opens the namespace there first if needed.
absl::StatusOr<v1::ListBlocksResponse> ListNodeBlocks(Cluster::Impl& cluster, Node& node,
                                                      const RepairNamespace& ns,
                                                      const std::string& after,
                                                      absl::Span<const BlockKey> keys);

class ReplicaRepairer {
 public:
  explicit ReplicaRepairer(Cluster::Impl& cluster);
  ~ReplicaRepairer();  // stops after the copy in progress

  // Namespaces whose blocks rejoin passes walk (raw ones only).
  void AddNamespace(const RepairNamespace& ns);
  // A node is new, back or restarted: walk every namespace again.
  void NodeJoined();
  // A fetch found `key` on `source` but not on `targets` (its owners):
  // queue the copy unless the queue is full. Never blocks on a copy.
  void RepairOnRead(const RepairNamespace& ns, const BlockKey& key, NodePtr source,
                    std::vector<NodePtr> targets);

  RepairStats stats();

 private:
  struct Copy {
    BlockKey key;
    std::optional<BlockKey> parent;
    std::vector<NodePtr> targets;
  };
  struct ReadRepair {
    RepairNamespace ns;
    BlockKey key;
    NodePtr source;
    std::vector<NodePtr> targets;
  };

  void Loop();
  // The rejoin pass: every namespace, every live node, page by page.
  void Pass();
  void PassNamespace(const RepairNamespace& ns);
  // Makes the queued read repairs, up to a buffer's worth per source.
  void DrainReadRepairs();
  // Fetches `copies` from `source` and publishes each to its targets, a
  // buffer's worth at a time, at the byte rate.
  void CopyFrom(const RepairNamespace& ns, const NodePtr& source, std::vector<Copy> copies);
  // Sleeps until `bytes`, moved by a transfer begun at `started`, fit the
  // rate; false when stopping.
  bool Throttle(uint64_t bytes, absl::Time started);
  bool stopping();
  bool HasWork() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  Cluster::Impl& cluster_;
  std::unique_ptr<Buffer> buffer_;  // only the repair thread touches it

  absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool pass_wanted_ ABSL_GUARDED_BY(mu_) = false;
  std::deque<ReadRepair> queue_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<std::pair<uint64_t, BlockKey>> queued_ ABSL_GUARDED_BY(mu_);  // in queue_
  size_t in_progress_ ABSL_GUARDED_BY(mu_) = 0;  // read repairs taken from queue_, not done
  absl::flat_hash_map<uint64_t, RepairNamespace> namespaces_ ABSL_GUARDED_BY(mu_);
  RepairStats stats_ ABSL_GUARDED_BY(mu_);
  absl::Time next_free_ = absl::InfinitePast();  // the rate's clock (repair thread only)
  std::thread thread_;
};

}  // namespace kvstrata::client
