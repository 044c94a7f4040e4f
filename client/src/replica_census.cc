// ClusterNamespace::Census: copies of a namespace's blocks on the live nodes.
#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "cluster_impl.h"
#include "replica_repairer.h"

namespace kvstrata::client {

absl::StatusOr<ReplicaCensus> ClusterNamespace::Census() {
  Cluster::Impl& cluster = *cluster_->impl_;
  const RepairNamespace ns{id_, block_bytes_, std::static_pointer_cast<const v1::NamespaceSpec>(spec_)};
  ReplicaCensus census;
  absl::flat_hash_map<BlockKey, uint32_t> copies;
  for (const NodePtr& node : cluster.Live(/*for_publish=*/false)) {
    uint64_t held = 0;
    std::string after;
    do {
      absl::StatusOr<v1::ListBlocksResponse> page = ListNodeBlocks(cluster, *node, ns, after, {});
      if (!page.ok()) {
        return absl::Status(page.status().code(),
                            absl::StrCat(node->address, ": ", page.status().message()));
      }
      for (const v1::ListedBlock& block : page->blocks()) {
        absl::StatusOr<BlockKey> key = BlockKey::FromWire(block.key());
        if (!key.ok()) continue;
        ++copies[*key];
        ++held;
      }
      after = page->next_after();
    } while (!after.empty());
    census.node_blocks.push_back({node->address, held});
  }
  census.blocks = copies.size();
  for (const auto& [key, count] : copies) {
    census.under_replicated += count < static_cast<uint32_t>(cluster.options.replication);
  }
  return census;
}

}  // namespace kvstrata::client
