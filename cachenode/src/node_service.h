// The kvstrata.v1.CacheNode gRPC service: request validation, node-driven
// UCX transfers and per-block results.
#pragma once

#include <atomic>
#include <map>
#include <string>
#include <utility>

#include "absl/random/random.h"
#include "absl/time/time.h"
#include "kvstrata.grpc.pb.h"
#include "kvstrata/cachenode/namespace_registry.h"
#include "kvstrata/transfer/engine.h"
#include "fast_path.h"
#include "inflight_budget.h"
#include "tenant_ledger.h"
#include "device_ipc.h"
#include "tiered_store.h"

namespace kvstrata::cachenode {

// Byte counters labelled by two strings, e.g. (direction, transport).
class PairCounters {
 public:
  using Key = std::pair<std::string, std::string>;
  void Add(const std::string& first, const std::string& second, uint64_t value) {
    absl::MutexLock lock(&mu_);
    values_[{first, second}] += value;
  }
  std::map<Key, uint64_t> Snapshot() const {
    absl::MutexLock lock(&mu_);
    return values_;
  }
  // Summed over every second label.
  uint64_t Total(const std::string& first) const {
    absl::MutexLock lock(&mu_);
    uint64_t total = 0;
    for (const auto& [key, value] : values_) total += key.first == first ? value : 0;
    return total;
  }

 private:
  mutable absl::Mutex mu_;
  std::map<Key, uint64_t> values_ ABSL_GUARDED_BY(mu_);
};

// What the node counts; Stats and the /metrics collector both read it.
struct NodeCounters {
  std::atomic<uint64_t> lookup_hit_blocks{0};
  std::atomic<uint64_t> lookup_miss_blocks{0};
  std::atomic<uint64_t> lookup_hit_tokens{0};
  std::atomic<uint64_t> lookup_miss_tokens{0};
  std::atomic<uint64_t> fetch_hit_blocks{0};
  std::atomic<uint64_t> fetch_miss_blocks{0};
  std::atomic<uint64_t> published_blocks{0};
  std::atomic<uint64_t> duplicate_blocks{0};
  std::atomic<uint64_t> checksum_failures{0};
  std::atomic<uint64_t> transfer_failures{0};
  // RequestFinished hints, and those for a block some tier held.
  std::atomic<uint64_t> request_hints{0};
  std::atomic<uint64_t> request_hints_known{0};
  // Calls refused by authentication (no or unknown credential) and by
  // authorization (another tenant's namespace, an admin RPC).
  std::atomic<uint64_t> unauthenticated_calls{0};
  std::atomic<uint64_t> permission_denied_calls{0};
  // Publishes whose client stopped sending mid-transfer (or never started)
  // and were given up before their deadline, releasing what they reserved.
  std::atomic<uint64_t> stalled_transfers{0};
  // Same-host GPU clients (node_service_ipc.cc): clients given each device
  // path, HBM blocks served by CUDA IPC, blocks pinned by IPC leases now.
  std::atomic<uint64_t> device_ipc_clients{0};
  std::atomic<uint64_t> device_staged_clients{0};
  std::atomic<uint64_t> device_ipc_blocks{0};
  std::atomic<uint64_t> device_ipc_pinned_blocks{0};
  // Fast-path (UCX active-message) requests, and those answered with an
  // error (malformed, unknown capability, over a limit).
  std::atomic<uint64_t> fast_path_requests{0};
  std::atomic<uint64_t> fast_path_refused{0};

  // Bytes moved by direction ("in": publish, "out": fetch) and UCX transport.
  PairCounters transfer_bytes;
  // Published bytes by stored format ("raw", "int4_kivi", ...) and kind
  // ("received": as published, "stored": after encoding): their ratio is
  // what quantization saves.
  PairCounters ingest_bytes;
};

class NodeMetrics;
class Authenticator;
struct Principal;
struct TenantQuota;

struct NodeServiceOptions {
  // Longest a transfer batch may take.
  absl::Duration transfer_timeout = absl::Seconds(30);
  // Longest a publish waits for its client's next block (its first one
  // included) before it gives up and releases its reservations: a client
  // that stops sending holds memory this long, not for the whole deadline.
  absl::Duration transfer_stall_timeout = absl::Seconds(5);
  // Most of the DRAM tier one Publish may reserve (its blocks beyond it get
  // BLOCK_NO_SPACE; OpenNamespace tells clients how many blocks fit, so they
  // split larger batches). At least one block always fits.
  double max_request_share = 0.125;
  // Most of the DRAM tier one client's publishes may hold reserved at once
  // (a client: its credential, or its connection without authentication).
  double max_client_inflight_share = 0.25;
  bool allow_client_rkeys = false;
  // Null: no authentication (a node listening on loopback only, or one run
  // with --allow_unauthenticated).
  Authenticator* authenticator = nullptr;
  // Serve small Fetch/Publish requests over UCX active messages (fast_path.h).
  bool fast_path = true;
  uint64_t fast_path_buffer_bytes = 64 << 20;
};

class NodeService final : public v1::CacheNode::Service {
 public:
  // `metrics` may be null (no /metrics endpoint).
  NodeService(NamespaceRegistry& namespaces, TieredStore& store, TenantLedger& ledger,
              transfer::Engine& engine, NodeCounters& counters, NodeMetrics* metrics,
              const NodeServiceOptions& options);
  ~NodeService() override;

  grpc::Status OpenNamespace(grpc::ServerContext*, const v1::OpenNamespaceRequest*,
                             v1::OpenNamespaceResponse*) override;
  grpc::Status Lookup(grpc::ServerContext*, const v1::LookupRequest*, v1::LookupResponse*) override;
  grpc::Status Publish(grpc::ServerContext*, const v1::PublishRequest*,
                       v1::PublishResponse*) override;
  grpc::Status Fetch(grpc::ServerContext*, const v1::FetchRequest*, v1::FetchResponse*) override;
  grpc::Status Delete(grpc::ServerContext*, const v1::DeleteRequest*, v1::DeleteResponse*) override;
  grpc::Status Stats(grpc::ServerContext*, const v1::StatsRequest*, v1::StatsResponse*) override;
  grpc::Status Health(grpc::ServerContext*, const v1::HealthRequest*, v1::HealthResponse*) override;
  grpc::Status Drain(grpc::ServerContext*, const v1::DrainRequest*, v1::DrainResponse*) override;
  grpc::Status RequestFinished(grpc::ServerContext*, const v1::RequestFinishedRequest*,
                               v1::RequestFinishedResponse*) override;
  grpc::Status CloseNamespace(grpc::ServerContext*, const v1::CloseNamespaceRequest*,
                              v1::CloseNamespaceResponse*) override;
  grpc::Status ListBlocks(grpc::ServerContext*, const v1::ListBlocksRequest*,
                          v1::ListBlocksResponse*) override;
  // node_service_ipc.cc
  grpc::Status OpenDeviceIpc(grpc::ServerContext*, const v1::OpenDeviceIpcRequest*,
                             v1::OpenDeviceIpcResponse*) override;
  grpc::Status FetchDeviceIpc(grpc::ServerContext*, const v1::FetchDeviceIpcRequest*,
                              v1::FetchDeviceIpcResponse*) override;
  grpc::Status ReleaseDeviceIpc(grpc::ServerContext*, const v1::ReleaseDeviceIpcRequest*,
                                v1::ReleaseDeviceIpcResponse*) override;

 private:
  absl::Time TransferDeadline(const grpc::ServerContext* context) const;
  // The caller (null with authentication off), or UNAUTHENTICATED (counted).
  absl::StatusOr<std::shared_ptr<const Principal>> Caller(const grpc::ServerContext* context);
  // OK when the caller may use `tenant`'s namespaces; PERMISSION_DENIED (counted).
  absl::Status MayUseTenant(const grpc::ServerContext* context, const std::string& tenant);
  absl::Status MayAdminister(const grpc::ServerContext* context);
  // The namespace `id`, when it exists and belongs to a tenant the caller
  // may use; `who` (optional) receives the caller.
  absl::StatusOr<NamespaceInfo> AuthorizedNamespace(const grpc::ServerContext* context,
                                                    uint64_t id,
                                                    std::shared_ptr<const Principal>* who = nullptr);
  // Who the in-flight budget counts a call against.
  std::string ClientKey(const grpc::ServerContext* context,
                        const std::shared_ptr<const Principal>& caller);
  // A tag prefix no other caller can predict (OpenNamespaceResponse.tag_prefix).
  uint32_t RandomTagPrefix();
  // Blocks of `block_bytes` one Publish may reserve (max_request_share).
  uint64_t MaxPublishBlocks(uint64_t block_bytes) const;
  template <typename Handler>
  grpc::Status Observed(const char* method, Handler handler);
  grpc::Status DoOpenNamespace(grpc::ServerContext*, const v1::OpenNamespaceRequest*,
                             v1::OpenNamespaceResponse*);
  grpc::Status DoLookup(grpc::ServerContext*, const v1::LookupRequest*, v1::LookupResponse*);
  grpc::Status DoPublish(grpc::ServerContext*, const v1::PublishRequest*,
                       v1::PublishResponse*);
  grpc::Status DoFetch(grpc::ServerContext*, const v1::FetchRequest*, v1::FetchResponse*);
  grpc::Status DoDelete(grpc::ServerContext*, const v1::DeleteRequest*, v1::DeleteResponse*);
  grpc::Status DoStats(grpc::ServerContext*, const v1::StatsRequest*, v1::StatsResponse*);
  grpc::Status DoHealth(grpc::ServerContext*, const v1::HealthRequest*, v1::HealthResponse*);
  grpc::Status DoDrain(grpc::ServerContext*, const v1::DrainRequest*, v1::DrainResponse*);
  grpc::Status DoRequestFinished(grpc::ServerContext*, const v1::RequestFinishedRequest*,
                                 v1::RequestFinishedResponse*);
  grpc::Status DoCloseNamespace(grpc::ServerContext*, const v1::CloseNamespaceRequest*,
                                v1::CloseNamespaceResponse*);
  grpc::Status DoListBlocks(grpc::ServerContext*, const v1::ListBlocksRequest*,
                            v1::ListBlocksResponse*);
  // The tenant's limits from the auth file (none without one).
  TenantQuota QuotaFor(const std::string& tenant) const;


  NamespaceRegistry& namespaces_;
  TieredStore& store_;
  TenantLedger& ledger_;
  transfer::Engine& engine_;
  const NodeServiceOptions options_;
  const absl::Time started_ = absl::Now();
  InflightBudget inflight_;
  absl::Mutex random_mu_;
  absl::BitGen random_ ABSL_GUARDED_BY(random_mu_);
  std::atomic<bool> draining_{false};
  const uint64_t incarnation_;
  NodeCounters& counters_;
  NodeMetrics* const metrics_;
  // HBM blocks pinned for same-host clients' IPC copies (node_service_ipc.cc).
  DeviceIpcLeases ipc_leases_{counters_.device_ipc_pinned_blocks, options_.transfer_timeout};
  std::unique_ptr<FastPath> fast_path_;  // null when off
};

}  // namespace kvstrata::cachenode
