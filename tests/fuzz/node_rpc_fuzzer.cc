// Every kvstrata.v1.CacheNode RPC, driven in-process through the node's real
// NodeService over a real NamespaceRegistry, DRAM tier and UCX engine. The
// engine's check_address refuses every worker address, so a request that
// passes validation stops at the first network step (PERMISSION_DENIED from
// the refusal) and nothing touches the network.
//
// Input: byte 0 picks the RPC, byte 1 holds flags (bit 0: the node allows
// client rkeys; bit 1: the node has an HBM tier, on the GPU test double,
// holding the preloaded blocks), the rest is the request's protobuf
// encoding. For OpenDeviceIpc, host_id "self" stands for this host's id. Namespace ids 1
// and 2 stand for the two namespaces the harness opens (an opaque one holding
// a chain of four blocks, and an int8-quantized layout), so the fuzzer gets
// past the namespace check without guessing 64-bit hashes.
//
// Checked after every call: only the status codes validation and the refused
// network step give; responses sized to their requests; no block memory held
// once a call has returned; a call that fails stores nothing and evicts
// nothing (admission before resources: a publish connects to its peer before
// it reserves memory). The CUDA IPC RPCs: pinned blocks lie inside the
// arena with their stored size and checksum, a lease is returned exactly
// when something was pinned, and releasing it (once) lets the pins go.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "kvstrata.grpc.pb.h"
#include "host_device_memory.h"
#include "kvstrata/cachenode/dram_tier.h"
#include "kvstrata/cachenode/hbm_tier.h"
#include "kvstrata/cachenode/namespace_registry.h"
#include "kvstrata/common/block_key.h"
#include "kvstrata/transfer/engine.h"
#include "node_service.h"
#include "tiered_store.h"

namespace v1 = kvstrata::v1;
namespace cachenode = kvstrata::cachenode;
using kvstrata::BlockKey;

namespace {

// Small enough that a publish of a few dozen blocks must evict.
constexpr uint64_t kSlabBytes = 16 << 10;
constexpr uint64_t kArenaBytes = 4 * kSlabBytes;
constexpr uint64_t kOpaqueBlockBytes = 4096;

void Check(bool condition, const char* what) {
  if (!condition) {
    fprintf(stderr, "node_rpc invariant broken: %s\n", what);
    std::abort();
  }
}

kvstrata::transfer::Engine& RefusingEngine() {
  static kvstrata::transfer::Engine* engine = [] {
    kvstrata::transfer::EngineOptions options{.transports = "tcp"};
    options.check_address = [](const std::string&, bool, bool) {
      return absl::PermissionDeniedError("the fuzz harness refuses every peer address");
    };
    auto created = kvstrata::transfer::Engine::Create(options);
    Check(created.ok(), "UCX engine starts");
    return created->release();
  }();
  return *engine;
}

v1::NamespaceSpec OpaqueSpec() {
  v1::NamespaceSpec spec;
  spec.set_tenant("fuzz");
  spec.set_model("opaque");
  spec.set_tokens_per_block(16);
  spec.set_block_bytes(kOpaqueBlockBytes);
  return spec;
}

v1::NamespaceSpec QuantizedSpec() {
  v1::NamespaceSpec spec;
  spec.set_tenant("fuzz");
  spec.set_model("int8");
  spec.set_dtype(v1::DTYPE_FP16);
  spec.set_num_layers(1);
  spec.set_num_kv_heads(1);
  spec.set_head_dim(8);
  spec.set_tokens_per_block(16);
  spec.set_format(v1::FORMAT_INT8);
  return spec;
}

// The node's state for one input: fresh each time, so every input replays alone.
struct Node {
  std::vector<uint8_t> arena = std::vector<uint8_t>(kArenaBytes);
  cachenode::NamespaceRegistry namespaces{kSlabBytes};
  cachenode::DramTier dram{arena.data(), kArenaBytes, kSlabBytes,
                           *cachenode::MakeEvictionPolicy("lru")};
  std::unique_ptr<cachenode::HbmTier> hbm;
  std::unique_ptr<cachenode::TieredStore> store_holder;
  cachenode::TieredStore& store;
  cachenode::TenantLedger ledger{store};
  cachenode::NodeCounters counters;
  uint64_t opaque_id = 0;
  uint64_t quantized_id = 0;
  std::vector<BlockKey> stored_keys;

  static std::unique_ptr<cachenode::HbmTier> MakeHbm(bool with_hbm) {
    if (!with_hbm) return nullptr;
    cachenode::HbmTierOptions options{.capacity_bytes = kArenaBytes, .slab_bytes = kSlabBytes};
    options.staging = {.bytes = kArenaBytes, .chunk_bytes = kOpaqueBlockBytes};
    auto hbm = cachenode::HbmTier::Create(std::make_unique<kvstrata::testing::HostDeviceMemory>(),
                                          options, *cachenode::MakeEvictionPolicy("lru"), nullptr);
    Check(hbm.ok(), "the HBM tier starts on the double");
    return *std::move(hbm);
  }

  Node(bool allow_client_rkeys, bool with_hbm)
      : hbm(MakeHbm(with_hbm)),
        store_holder(std::make_unique<cachenode::TieredStore>(dram, nullptr, false, hbm.get())),
        store(*store_holder),
        service(namespaces, store, ledger, RefusingEngine(), counters, nullptr,
                cachenode::NodeServiceOptions{.transfer_timeout = absl::Seconds(1),
                                              .allow_client_rkeys = allow_client_rkeys}) {
    opaque_id = namespaces.Open(OpaqueSpec())->id;
    quantized_id = namespaces.Open(QuantizedSpec())->id;
    // A chain of four blocks, as a publish would leave it (make_seeds.cc
    // writes the same keys into the corpus).
    std::vector<uint32_t> tokens(4 * 16);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint32_t>(i);
    stored_keys = kvstrata::ComputeBlockKeys(opaque_id, tokens, 16);
    for (size_t i = 0; i < stored_keys.size(); ++i) {
      auto block = dram.Reserve(kOpaqueBlockBytes);
      Check(block.ok(), "room for the preloaded blocks");
      std::memset((*block)->data(), static_cast<int>(i), kOpaqueBlockBytes);
      (*block)->checksum = kvstrata::BlockChecksum((*block)->data(), kOpaqueBlockBytes);
      if (i > 0) {
        (*block)->parent = stored_keys[i - 1];
        (*block)->has_parent = true;
      }
      // With HBM, copied up there (the DRAM chunk was only the landing).
      auto committed = store.Commit({opaque_id, stored_keys[i]}, *block);
      Check(committed.ok() && *committed, "preloaded block commits");
    }
  }

  uint64_t MapNamespace(uint64_t id) const {
    return id == 1 ? opaque_id : id == 2 ? quantized_id : id;
  }

  cachenode::NodeService service;
};

// OpenNamespace .. CloseNamespace, ListBlocks, then the three CUDA IPC RPCs:
// an input's first byte picks one.
constexpr uint8_t kRpcs = 14;

bool AllowedCode(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::OUT_OF_RANGE:
    case grpc::StatusCode::NOT_FOUND:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
    case grpc::StatusCode::PERMISSION_DENIED:  // the harness's refusal of the peer
      return true;
    default:
      return false;
  }
}

template <typename Request>
bool Parse(Request& request, const uint8_t* data, size_t size) {
  return request.ParseFromArray(data, static_cast<int>(size));
}

grpc::Status Call(Node& node, uint8_t rpc, const uint8_t* data, size_t size) {
  grpc::ServerContext context;
  cachenode::NodeService& s = node.service;
  switch (rpc % kRpcs) {
    case 0: {
      v1::OpenNamespaceRequest request;
      v1::OpenNamespaceResponse response;
      if (!Parse(request, data, size)) return grpc::Status::CANCELLED;
      grpc::Status status = s.OpenNamespace(&context, &request, &response);
      if (status.ok()) Check(node.namespaces.Get(response.namespace_id()).ok(), "opened is known");
      return status;
    }
    case 1: {
      v1::LookupRequest request;
      v1::LookupResponse response;
      if (!Parse(request, data, size)) return grpc::Status::CANCELLED;
      request.set_namespace_id(node.MapNamespace(request.namespace_id()));
      grpc::Status status = s.Lookup(&context, &request, &response);
      if (status.ok()) {
        Check(response.prefix_length() <= static_cast<uint32_t>(request.keys_size()),
              "prefix within the keys");
        Check(response.tiers_size() == static_cast<int>(response.prefix_length()),
              "one tier per prefix key");
      }
      return status;
    }
    case 2: {
      v1::PublishRequest request;
      v1::PublishResponse response;
      if (!Parse(request, data, size)) return grpc::Status::CANCELLED;
      request.set_namespace_id(node.MapNamespace(request.namespace_id()));
      grpc::Status status = s.Publish(&context, &request, &response);
      if (status.ok()) Check(response.status_size() == request.blocks_size(), "publish statuses");
      return status;
    }
    case 3: {
      v1::FetchRequest request;
      v1::FetchResponse response;
      if (!Parse(request, data, size)) return grpc::Status::CANCELLED;
      request.set_namespace_id(node.MapNamespace(request.namespace_id()));
      grpc::Status status = s.Fetch(&context, &request, &response);
      if (status.ok()) {
        Check(response.status_size() == request.blocks_size() &&
                  response.size_size() == request.blocks_size() &&
                  response.checksum_size() == request.blocks_size(),
              "fetch results per block");
        // Without a reachable peer nothing can have been sent.
        for (int st : response.status()) Check(st == v1::BLOCK_NOT_FOUND, "no block sent");
      }
      return status;
    }
    case 4: {
      v1::DeleteRequest request;
      v1::DeleteResponse response;
      if (!Parse(request, data, size)) return grpc::Status::CANCELLED;
      request.set_namespace_id(node.MapNamespace(request.namespace_id()));
      grpc::Status status = s.Delete(&context, &request, &response);
      if (status.ok()) {
        Check(response.deleted() <= static_cast<uint32_t>(request.keys_size()), "deleted count");
      }
      return status;
    }
    case 5: {
      v1::StatsRequest request;
      v1::StatsResponse response;
      if (!Parse(request, data, size)) return grpc::Status::CANCELLED;
      grpc::Status status = s.Stats(&context, &request, &response);
      Check(status.ok(), "stats answers");
      return status;
    }
    case 6: {
      v1::HealthRequest request;
      v1::HealthResponse response;
      if (!Parse(request, data, size)) return grpc::Status::CANCELLED;
      grpc::Status status = s.Health(&context, &request, &response);
      Check(status.ok() && response.serving(), "health answers");
      return status;
    }
    case 7: {
      v1::DrainRequest request;
      v1::DrainResponse response;
      if (!Parse(request, data, size)) return grpc::Status::CANCELLED;
      return s.Drain(&context, &request, &response);
    }
    case 8: {
      v1::RequestFinishedRequest request;
      v1::RequestFinishedResponse response;
      if (!Parse(request, data, size)) return grpc::Status::CANCELLED;
      request.set_namespace_id(node.MapNamespace(request.namespace_id()));
      return s.RequestFinished(&context, &request, &response);
    }
    case 9: {
      v1::CloseNamespaceRequest request;
      v1::CloseNamespaceResponse response;
      if (!Parse(request, data, size)) return grpc::Status::CANCELLED;
      request.set_namespace_id(node.MapNamespace(request.namespace_id()));
      grpc::Status status = s.CloseNamespace(&context, &request, &response);
      if (status.ok()) Check(!node.namespaces.Get(request.namespace_id()).ok(), "closed is gone");
      return status;
    }
    case 11: {
      v1::OpenDeviceIpcRequest request;
      v1::OpenDeviceIpcResponse response;
      if (!Parse(request, data, size)) return grpc::Status::CANCELLED;
      if (request.host_id() == "self") request.set_host_id(kvstrata::transfer::Engine::HostId());
      grpc::Status status = s.OpenDeviceIpc(&context, &request, &response);
      Check(status.ok(), "OpenDeviceIpc answers a path");
      if (response.path() == v1::DEVICE_PATH_CUDA_IPC) {
        Check(node.hbm != nullptr && request.host_id() == kvstrata::transfer::Engine::HostId(),
              "CUDA IPC only with HBM, on this host");
        Check(!response.handle().empty() && response.arena_bytes() == node.hbm->arena_bytes(),
              "the arena's handle and size");
      } else {
        Check(response.path() == v1::DEVICE_PATH_STAGED && !response.reason().empty(),
              "staged, with a reason");
      }
      return status;
    }
    case 12: {
      v1::FetchDeviceIpcRequest request;
      v1::FetchDeviceIpcResponse response;
      if (!Parse(request, data, size)) return grpc::Status::CANCELLED;
      request.set_namespace_id(node.MapNamespace(request.namespace_id()));
      grpc::Status status = s.FetchDeviceIpc(&context, &request, &response);
      if (!status.ok()) return status;
      Check(node.hbm != nullptr, "IPC fetches need HBM");
      const int n = request.keys_size();
      Check(response.status_size() == n && response.arena_offset_size() == n &&
                response.size_size() == n && response.checksum_size() == n &&
                response.format_size() == n,
            "IPC fetch results per key");
      int pinned = 0;
      for (int i = 0; i < n; ++i) {
        if (response.status(i) != v1::BLOCK_OK) {
          Check(response.status(i) == v1::BLOCK_NOT_FOUND, "pinned or not found");
          continue;
        }
        ++pinned;
        Check(response.size(i) == kOpaqueBlockBytes &&
                  response.arena_offset(i) + response.size(i) <= node.hbm->arena_bytes(),
              "a pinned block lies inside the arena");
        bool preloaded = false;
        for (size_t k = 0; k < node.stored_keys.size(); ++k) {
          if (request.keys(i) != node.stored_keys[k].view()) continue;
          preloaded = true;
          std::vector<uint8_t> expected(kOpaqueBlockBytes, static_cast<uint8_t>(k));
          Check(response.checksum(i) ==
                    kvstrata::BlockChecksum(expected.data(), expected.size()),
                "the pinned block's checksum is the stored one");
        }
        Check(preloaded, "only stored blocks are pinned");
      }
      Check((response.lease() != 0) == (pinned > 0), "a lease exactly when something is pinned");
      if (pinned > 0) {
        // The client's release: once, then unknown.
        v1::ReleaseDeviceIpcRequest release;
        v1::ReleaseDeviceIpcResponse released;
        release.set_lease(response.lease());
        grpc::ServerContext release_context;
        Check(s.ReleaseDeviceIpc(&release_context, &release, &released).ok() && released.released(),
              "the lease releases");
        grpc::ServerContext again_context;
        Check(s.ReleaseDeviceIpc(&again_context, &release, &released).ok() && !released.released(),
              "a lease releases once");
      }
      return status;
    }
    case 13: {
      v1::ReleaseDeviceIpcRequest request;
      v1::ReleaseDeviceIpcResponse response;
      if (!Parse(request, data, size)) return grpc::Status::CANCELLED;
      grpc::Status status = s.ReleaseDeviceIpc(&context, &request, &response);
      Check(status.ok() && !response.released(), "no lease of this input's is known");
      return status;
    }
    default: {
      v1::ListBlocksRequest request;
      v1::ListBlocksResponse response;
      if (!Parse(request, data, size)) return grpc::Status::CANCELLED;
      request.set_namespace_id(node.MapNamespace(request.namespace_id()));
      grpc::Status status = s.ListBlocks(&context, &request, &response);
      if (!status.ok()) return status;
      Check(response.blocks_size() <= static_cast<int>(request.keys().empty()
                                                          ? request.limit()
                                                          : request.keys_size()),
            "a page within its limit");
      std::string previous;
      for (const v1::ListedBlock& block : response.blocks()) {
        Check(block.key().size() == 16 && block.key() > previous, "keys in order, each once");
        if (request.keys().empty()) Check(block.key() > request.after(), "keys after the cursor");
        previous = block.key();
        // The preloaded chain lists each block with the one before it.
        for (size_t i = 0; i < node.stored_keys.size(); ++i) {
          if (block.key() != node.stored_keys[i].view()) continue;
          Check(block.parent() == (i == 0 ? std::string() : std::string(node.stored_keys[i - 1].view())),
                "parents as stored");
          Check(block.size() == kOpaqueBlockBytes &&
                    block.tier() == (node.hbm != nullptr ? v1::TIER_HBM : v1::TIER_DRAM),
                "size and tier");
        }
      }
      Check(response.next_after().empty() ||
                (!response.blocks().empty() && response.next_after() == previous),
            "the cursor is the page's last key");
      return status;
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);  // invalid UTF-8 in strings is logged per input
  RefusingEngine();  // UCX start-up is not part of any input
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const uint8_t rpc = data[0] % kRpcs;
  Node node(/*allow_client_rkeys=*/data[1] & 1, /*with_hbm=*/data[1] & 2);
  const cachenode::TierCounters before = node.dram.counters();
  const cachenode::TierCounters hbm_before =
      node.hbm != nullptr ? node.hbm->slabs().counters() : cachenode::TierCounters{};

  grpc::Status status = Call(node, rpc, data + 2, size - 2);
  if (status.error_code() == grpc::StatusCode::CANCELLED) return 0;  // not a request
  Check(AllowedCode(status.error_code()), status.error_message().c_str());

  const cachenode::TierCounters after = node.dram.counters();
  // Every reservation and pin is dropped by the time the call returns (the
  // network step is refused, so no transfer can still hold one).
  Check(after.used_bytes <= before.used_bytes, "no block memory held after the call");
  Check(after.blocks <= before.blocks, "nothing new stored without a transfer");
  if (node.hbm != nullptr) {
    const cachenode::TierCounters hbm_after = node.hbm->slabs().counters();
    Check(hbm_after.used_bytes <= hbm_before.used_bytes && hbm_after.blocks <= hbm_before.blocks,
          "no HBM memory held or stored after the call (IPC pins released)");
    Check(node.hbm->counters().staging.leased_bytes == 0, "no staging memory held");
  }
  if (!status.ok() && rpc != 4) {
    // Evictions aside, a failed call leaves the stored blocks as they were.
    Check(before.blocks - after.blocks == after.evictions - before.evictions,
          "a failed call removes blocks only by evicting them");
    Check(after.evictions == before.evictions, "a failed call evicts nothing");
  }
  return 0;
}
