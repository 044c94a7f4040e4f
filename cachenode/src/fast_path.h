// The node's fast path (docs/ARCHITECTURE.md §3, "Fast path"): small Lookup,
// Fetch and Publish requests that arrive as UCX active messages and are served on
// the UCX progress thread, with no gRPC call and no thread hand-off.
//
// Authentication rides on gRPC: OpenNamespace (authenticated and authorized
// there) grants a random 128-bit capability bound to that namespace and its
// tenant; every fast-path request names it, and anything else (an unknown or
// revoked capability, another namespace, a closed one, a malformed message)
// gets an error reply. Limits: kMaxBlocks / kMaxBytes per request
// (fast_path_wire.h), `max_inflight_per_capability` requests in flight per
// capability, and `buffer_bytes` of staging and reply memory in flight on
// the whole node; beyond them a request gets RESOURCE_EXHAUSTED and the
// client falls back to gRPC. Fetch serves only blocks in DRAM (a block on
// NVMe is answered kNotInMemory: the progress thread never waits for a
// disk); Publish copies each block from the message into a reserved chunk,
// checksums the copy and commits it, as the gRPC path does.
#pragma once

#include <atomic>
#include <cstring>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kvstrata/cachenode/namespace_registry.h"
#include "kvstrata/common/fast_path_wire.h"
#include "kvstrata/transfer/active_message.h"
#include "tenant_ledger.h"
#include "tiered_store.h"

namespace kvstrata::cachenode {

struct NodeCounters;

struct FastPathOptions {
  // Staging (rendezvous publishes) and reply copies (fetches) in flight, for
  // the whole node. A client that dies on shared memory mid-transfer never
  // completes its message (UCX 1.13), so what it held stays counted here,
  // never in the tiers.
  uint64_t buffer_bytes = 64 << 20;
  size_t max_inflight_per_capability = 16;
  // Capabilities held at once; beyond, OpenNamespace grants none (the client
  // uses gRPC).
  size_t max_capabilities = 1 << 16;
  // Most bytes of the DRAM tier one request may reserve.
  uint64_t max_request_bytes = 0;
  // The tenant's DRAM quota in bytes (0: none).
  std::function<uint64_t(const std::string& tenant)> quota_bytes;
  const std::atomic<bool>* draining = nullptr;
  // Called once per request: its method ("Lookup", "Fetch", "Publish",
  // "Unknown"), the status code of its admission (0 once authorized and in
  // its limits; a later failure, such as reply memory running out, is in the
  // reply and in Stats' fast_path_refused) and its time on the progress thread.
  std::function<void(const char* method, int code, absl::Duration elapsed)> observe;
};

class FastPath {
 public:
  FastPath(NamespaceRegistry& namespaces, TieredStore& store, TenantLedger& ledger,
           NodeCounters& counters, FastPathOptions options);
  ~FastPath();

  // A capability for `ns`, or nullopt (format other than raw, table full).
  std::optional<fastpath::Capability> Grant(const NamespaceInfo& ns);
  // Forgets every capability of the namespace (its last CloseNamespace).
  void Revoke(uint64_t namespace_id);
  // Forgets one capability, if it was granted for the namespace (the
  // CloseNamespace of the opener it was granted to).
  void Revoke(uint64_t namespace_id, std::string_view capability);
  // Serves one request; runs on the UCX progress thread.
  void Handle(std::shared_ptr<transfer::AmRequest> request);
  // UCX transports fast-path requests came in on ("tcp", "cma", ...).
  std::vector<std::string> Transports();
  // Ends serving: waits for callbacks running now; later ones do nothing.
  void Stop();

 private:
  struct Grantee {
    uint64_t namespace_id = 0;
    uint64_t block_bytes = 0;
    uint64_t tokens_per_block = 0;
    std::string tenant;
    std::shared_ptr<std::atomic<size_t>> inflight;
  };
  struct CapabilityHash {
    size_t operator()(const fastpath::Capability& c) const {
      uint64_t w;
      std::memcpy(&w, c.data(), sizeof(w));
      return w;  // random bytes: the first word is as good a hash as any
    }
  };
  // The caller's grant, checked against the request; an error says why not.
  absl::StatusOr<Grantee> Authorize(const fastpath::Request& request);
  // Reserves `bytes` of buffer_bytes; false when over.
  bool TakeBuffer(uint64_t bytes);
  void GiveBuffer(uint64_t bytes);
  void Lookup(const fastpath::Request& request, const Grantee& who, transfer::AmRequest& am);
  void Fetch(const fastpath::Request& request, const Grantee& who, transfer::AmRequest& am);
  void Publish(const fastpath::Request& request, const Grantee& who,
               std::shared_ptr<transfer::AmRequest> am, std::shared_ptr<void> slot);
  // Stores the blocks of `data` (blocks x block_bytes, in request order)
  // that `reply` still marks missing (BLOCK_OK); fills the per-block status.
  void Store(const fastpath::Request& request, const Grantee& who, const uint8_t* data,
             const std::string& transport, fastpath::Reply* reply);
  void NoteTransport(const std::string& transport);

  NamespaceRegistry& namespaces_;
  TieredStore& store_;
  TenantLedger& ledger_;
  NodeCounters& counters_;
  const FastPathOptions options_;
  // What callbacks that may outlive this object (a reply or a rendezvous
  // receive that completes after Stop, during shutdown) touch.
  struct Shared {
    std::atomic<uint64_t> buffer_used{0};
    // Callbacks that touch the store run inside a Running scope; Stop turns
    // later ones away and waits for those under way. A count, not a reader
    // lock: UCX runs one callback inside another on the same thread (a send
    // that finds its endpoint failed completes the endpoint's other requests,
    // a rendezvous receive of an earlier publish among them, before it
    // returns), and one thread taking a reader lock twice aborted the node
    // (absl's deadlock detection) or could deadlock against Stop.
    std::atomic<bool> stopped{false};
    std::atomic<int> running{0};
  };
  // Entered by every callback before it touches `this`; ok() is false once
  // Stop has begun (then touch nothing but `Shared`).
  class Running {
   public:
    explicit Running(Shared& shared) : shared_(shared) {
      shared_.running.fetch_add(1);
      ok_ = !shared_.stopped.load();
    }
    ~Running() { shared_.running.fetch_sub(1); }
    Running(const Running&) = delete;
    Running& operator=(const Running&) = delete;
    bool ok() const { return ok_; }

   private:
    Shared& shared_;
    bool ok_;
  };
  const std::shared_ptr<Shared> shared_ = std::make_shared<Shared>();

  absl::Mutex mu_;
  absl::flat_hash_map<fastpath::Capability, Grantee, CapabilityHash> grants_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<std::string> transports_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvstrata::cachenode
