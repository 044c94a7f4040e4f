// Client internals shared by client.cc and c_api.cc.
#pragma once

#include <grpcpp/grpcpp.h>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "device_ipc.h"
#include "device_staging.h"
#include "kvstrata.grpc.pb.h"
#include "kvstrata/client/client.h"
#include "kvstrata/transfer/engine.h"

namespace kvstrata::client {

class Client::Impl {
 public:
  ClientOptions options;
  std::shared_ptr<transfer::Engine> engine;  // shared by a Cluster's node clients
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::CacheNode::Stub> stub;
  // Device buffers and their staging (declared after `engine`, so its pool
  // is unregistered before the engine goes).
  std::unique_ptr<DeviceStager> device;
  // The same-host CUDA IPC path; after `device`, so its mapping goes first.
  std::unique_ptr<DeviceIpcPath> ipc;

  // The node's UCX worker (from OpenNamespace), for answering its pulls.
  void SetNodeWorker(std::string address, std::string host_id, uint32_t prefix,
                     uint64_t coalesced_bytes) {
    absl::MutexLock lock(&mu);
    node_worker_address = std::move(address);
    node_host_id = std::move(host_id);
    tag_prefix = prefix;
    max_coalesced_bytes = coalesced_bytes;
  }
  // Most blocks of `block_bytes` one coalesced tagged transfer may carry; 0
  // when blocks of this size go one message each (CoalescedBlocks in client.cc).
  size_t CoalescedBlocks(uint64_t block_bytes);
  // A publish tag base no other client of this node uses: the node's prefix
  // for this client, then a counter (the low 16 bits index the blocks).
  uint64_t PublishTagBase() {
    uint64_t prefix;
    {
      absl::MutexLock lock(&mu);
      prefix = tag_prefix;
    }
    return (prefix << 32) | (engine->NextTagBase() & 0xffff0000ULL);
  }
  // Fast path grants, by namespace id (OpenNamespace).
  struct FastGrant {
    std::string capability;  // 16 bytes
    uint32_t max_blocks = 0;
    uint64_t max_bytes = 0;
  };
  void SetFastGrant(uint64_t namespace_id, std::optional<FastGrant> grant) {
    absl::MutexLock lock(&mu);
    if (grant.has_value()) {
      fast_grants[namespace_id] = *std::move(grant);
    } else {
      fast_grants.erase(namespace_id);
    }
  }
  std::optional<FastGrant> GetFastGrant(uint64_t namespace_id) {
    absl::MutexLock lock(&mu);
    auto it = fast_grants.find(namespace_id);
    if (it == fast_grants.end()) return std::nullopt;
    return it->second;
  }

  // The endpoint to the node that fast-path requests go on, and over TCP a
  // publish's blocks (answering the node's pull): from a UCX worker of its
  // own (created on first use), never `engine`'s, the one the node connects
  // to for fetches and pull requests. Why: UCX 1.13 matches an endpoint the
  // node creates to a worker with that worker's own endpoint to the node
  // (same connection sequence number) and rewires them; active messages were
  // lost on it (fast_path_test, MixedSizesAndBoth...) and a publish's tagged
  // receive on the node was cancelled mid-pull, the call then hanging to its
  // deadline (SmallBlocksTest.MixedBlockSizes..., 1 run in 16 over TCP under
  // load). The node never connects to this worker, so nothing rewires it.
  absl::StatusOr<std::shared_ptr<transfer::Peer>> NodePeer(absl::Time deadline) {
    std::shared_ptr<transfer::Engine> outbound;
    {
      absl::MutexLock lock(&mu);
      if (outbound_engine == nullptr) {
        absl::StatusOr<std::unique_ptr<transfer::Engine>> created =
            transfer::Engine::Create({.transports = options.ucx_transports});
        if (!created.ok()) return created.status();
        outbound_engine = *std::move(created);
      }
      outbound = outbound_engine;
    }
    return ConnectToNode(*outbound, deadline);
  }
  // The endpoint a publish's blocks go on. Over shared memory from the worker
  // the node pulls from (tagged rendezvous from a second worker of a client
  // killed mid-publish crashed the node in UCX 1.13: an assertion in
  // ucp_rndv_receive on an endpoint freed under it, device_client_test's
  // kill test, 2 runs in 4), elsewhere NodePeer's.
  absl::StatusOr<std::shared_ptr<transfer::Peer>> PublishPeer(absl::Time deadline) {
    if (NodeOnSharedMemory()) return ConnectToNode(*engine, deadline);
    return NodePeer(deadline);
  }
  bool NodeOnSharedMemory() {
    absl::MutexLock lock(&mu);
    return engine->shared_memory_enabled() && !node_host_id.empty() &&
           node_host_id == transfer::Engine::HostId();
  }
  size_t FastMaxHeaderBytes() {
    absl::MutexLock lock(&mu);
    return outbound_engine == nullptr ? engine->max_am_header_bytes()
                                      : outbound_engine->max_am_header_bytes();
  }

  absl::StatusOr<std::shared_ptr<transfer::Peer>> ConnectToNode(transfer::Engine& from,
                                                                absl::Time deadline) {
    std::string address, host_id;
    {
      absl::MutexLock lock(&mu);
      address = node_worker_address;
      host_id = node_host_id;
    }
    if (address.empty()) return absl::FailedPreconditionError("open a namespace first");
    const bool same_host = from.shared_memory_enabled() && host_id == transfer::Engine::HostId();
    return from.Connect(address, same_host, deadline);  // cached by the engine
  }

  absl::Duration Timeout(std::optional<absl::Duration> timeout) const {
    return timeout.value_or(options.timeout);
  }

 private:
  absl::Mutex mu;
  std::string node_worker_address ABSL_GUARDED_BY(mu);
  std::string node_host_id ABSL_GUARDED_BY(mu);
  uint32_t tag_prefix ABSL_GUARDED_BY(mu) = 0;
  uint64_t max_coalesced_bytes ABSL_GUARDED_BY(mu) = 0;  // the node's; 0: it does not coalesce
  absl::flat_hash_map<uint64_t, FastGrant> fast_grants ABSL_GUARDED_BY(mu);
  std::shared_ptr<transfer::Engine> outbound_engine ABSL_GUARDED_BY(mu);
};

absl::Status FromGrpc(const grpc::Status& status);

// Memory registered with an engine, as a Buffer any client of that engine takes.
std::unique_ptr<Buffer> WrapRegion(std::unique_ptr<transfer::MemoryRegion> region);

// A Client that uses `engine` instead of creating its own (a Cluster's node
// clients share one, so buffers work with every node).
absl::StatusOr<std::unique_ptr<Client>> ConnectSharingEngine(
    const ClientOptions& options, std::shared_ptr<transfer::Engine> engine);

// A block status from the wire as the outcome the client reports.
BlockOutcome FromWire(v1::BlockStatus status);

}  // namespace kvstrata::client
