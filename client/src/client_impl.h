// Client internals shared by client.cc and c_api.cc.
#pragma once

#include <grpcpp/grpcpp.h>

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
  absl::StatusOr<std::shared_ptr<transfer::Peer>> NodePeer(absl::Time deadline) {
    std::string address, host_id;
    {
      absl::MutexLock lock(&mu);
      address = node_worker_address;
      host_id = node_host_id;
    }
    if (address.empty()) return absl::FailedPreconditionError("open a namespace first");
    const bool same_host = engine->shared_memory_enabled() && host_id == transfer::Engine::HostId();
    return engine->Connect(address, same_host, deadline);  // cached by the engine
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
};

absl::Status FromGrpc(const grpc::Status& status);

// Memory registered with an engine, as a Buffer any client of that engine takes.
std::unique_ptr<Buffer> WrapRegion(std::unique_ptr<transfer::MemoryRegion> region);

// A Client that uses `engine` instead of creating its own (a Cluster's node
// clients share one, so buffers work with every node).
absl::StatusOr<std::unique_ptr<Client>> ConnectSharingEngine(
    const ClientOptions& options, std::shared_ptr<transfer::Engine> engine);

}  // namespace kvstrata::client
