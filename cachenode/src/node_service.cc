#include "node_service.h"

#include "auth.h"
#include "hbm_stats.h"
#include "metrics.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/random/random.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kvstrata/cachenode/stored_format.h"
#include "kvstrata/common/block_key.h"
#include "kvstrata/common/fast_path_wire.h"
#include "kvstrata/common/limits.h"
#include "kvstrata/common/log.h"

namespace kvstrata::cachenode {
namespace {

// "raw", "int4_kivi", ...: the metric label of a stored format.
std::string StoredFormatLabel(v1::StoredFormat format) {
  std::string name = v1::StoredFormat_Name(format);
  if (absl::StartsWith(name, "FORMAT_")) name = name.substr(7);
  return absl::AsciiStrToLower(name);
}

grpc::Status ToGrpc(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

grpc::Status InvalidArgument(std::string message) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, std::move(message));
}

absl::StatusOr<std::vector<BlockKey>> ParseKeys(
    const google::protobuf::RepeatedPtrField<std::string>& wire, size_t max) {
  if (static_cast<size_t>(wire.size()) > max) {
    return absl::InvalidArgumentError(
        absl::StrCat(wire.size(), " keys in one request; the limit is ", max));
  }
  std::vector<BlockKey> keys;
  keys.reserve(wire.size());
  for (const std::string& k : wire) {
    absl::StatusOr<BlockKey> key = BlockKey::FromWire(k);
    if (!key.ok()) return key.status();
    keys.push_back(*key);
  }
  return keys;
}

// A request's UCX side, checked and connected: the peer and one remote key per
// region.
struct ResolvedEndpoint {
  std::shared_ptr<transfer::Peer> peer;
  std::vector<std::unique_ptr<transfer::RemoteKey>> rkeys;
  std::vector<const v1::MemoryRegion*> regions;
};

absl::Status ValidateEndpoint(const v1::TransferEndpoint& endpoint, bool rma) {
  if (endpoint.worker_address().empty() ||
      endpoint.worker_address().size() > limits::kMaxWorkerAddressBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("worker_address must be 1..", limits::kMaxWorkerAddressBytes, " bytes"));
  }
  if (endpoint.host_id().size() > 512) return absl::InvalidArgumentError("host_id over 512 bytes");
  if (endpoint.regions().empty() ||
      static_cast<size_t>(endpoint.regions_size()) > limits::kMaxRegions) {
    return absl::InvalidArgumentError(absl::StrCat("a request names 1..", limits::kMaxRegions,
                                                   " memory regions, got ",
                                                   endpoint.regions_size()));
  }
  for (const v1::MemoryRegion& region : endpoint.regions()) {
    if (region.length() == 0 || region.base_address() == 0 ||
        region.base_address() + region.length() < region.base_address()) {
      return absl::InvalidArgumentError("memory region is empty, null or wraps around");
    }
    if ((rma && region.packed_rkey().empty()) ||
        region.packed_rkey().size() > limits::kMaxPackedRkeyBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("packed_rkey must be 1..", limits::kMaxPackedRkeyBytes, " bytes"));
    }
  }
  return absl::OkStatus();
}

// Checks that [offset, offset + size) lies inside region `index`.
absl::Status ValidateRange(const v1::TransferEndpoint& endpoint, uint32_t index, uint64_t offset,
                           uint64_t size) {
  if (index >= static_cast<uint32_t>(endpoint.regions_size())) {
    return absl::InvalidArgumentError(absl::StrCat("region index ", index, " out of range"));
  }
  const uint64_t length = endpoint.regions(index).length();
  if (offset > length || size > length - offset) {
    return absl::OutOfRangeError(absl::StrCat("buffer [", offset, ", +", size,
                                              ") lies outside its region of ", length, " bytes"));
  }
  return absl::OkStatus();
}

absl::StatusOr<ResolvedEndpoint> Resolve(transfer::Engine& engine,
                                         const v1::TransferEndpoint& endpoint, absl::Time deadline,
                                         bool rma) {
  ResolvedEndpoint resolved;
  const bool same_host = endpoint.host_id() == transfer::Engine::HostId();
  absl::StatusOr<std::shared_ptr<transfer::Peer>> peer =
      engine.Connect(endpoint.worker_address(), same_host, deadline);
  if (!peer.ok()) return peer.status();
  resolved.peer = *std::move(peer);
  if (!rma) return resolved;
  for (const v1::MemoryRegion& region : endpoint.regions()) {
    absl::StatusOr<std::unique_ptr<transfer::RemoteKey>> rkey =
        resolved.peer->UnpackRkey(region.packed_rkey());
    if (!rkey.ok()) return rkey.status();
    resolved.rkeys.push_back(*std::move(rkey));
    resolved.regions.push_back(&region);
  }
  return resolved;
}

// One RMA op per block that has local memory: block i of the request <->
// local[i], at the client address its region and offset name.
template <typename Block>
std::vector<transfer::RmaOp> RmaOps(const google::protobuf::RepeatedPtrField<Block>& blocks,
                                    const std::vector<std::shared_ptr<StoredBlock>>& local,
                                    const ResolvedEndpoint& endpoint) {
  std::vector<transfer::RmaOp> ops;
  for (int i = 0; i < blocks.size(); ++i) {
    if (local[i] == nullptr) continue;
    const Block& block = blocks[i];
    ops.push_back(transfer::RmaOp{
        .local = local[i]->data(),
        .remote_address = endpoint.regions[block.region()]->base_address() + block.offset(),
        .length = local[i]->size(),
        .rkey = endpoint.rkeys[block.region()].get()});
  }
  return ops;
}

// Which data path a request asks for, and whether this node allows it.
absl::StatusOr<bool> UsesRma(uint64_t tag_base, bool allow_client_rkeys) {
  if (tag_base == 0) {
    if (!allow_client_rkeys) {
      return absl::FailedPreconditionError(
          "RMA transfers with client memory keys are disabled on this node "
          "(--allow_client_rkeys); use tagged transfers (a nonzero tag_base)");
    }
    return true;
  }
  if ((tag_base & 0xffff) != 0)
    return absl::InvalidArgumentError("tag_base must have its low 16 bits clear");
  return false;
}

// Tagged publish: receive every reserved block straight into its chunk, after
// telling the client which blocks to send. Each block's checksum is computed
// as soon as it has landed, while the progress thread receives the next, and
// stored in `checksums`. A client that lets `stall` pass without a block
// landing is given up on (DEADLINE_EXCEEDED, `*stalled` set) long before
// `deadline`, so it cannot hold what this request reserved.
absl::Status Pull(transfer::Peer& peer, uint64_t tag_base,
                  const std::vector<std::shared_ptr<StoredBlock>>& reserved, absl::Time deadline,
                  absl::Duration stall, std::shared_ptr<void> keep_alive,
                  std::vector<uint64_t>* checksums, bool* stalled) {
  std::vector<transfer::ReceiveOp> receives;
  std::vector<size_t> block_of;  // receive -> request block index
  std::vector<uint8_t> wanted;   // u16 little-endian indices
  for (size_t i = 0; i < reserved.size(); ++i) {
    if (reserved[i] == nullptr) continue;
    receives.push_back({reserved[i]->data(), reserved[i]->size(), tag_base + i});
    block_of.push_back(i);
    wanted.push_back(static_cast<uint8_t>(i));
    wanted.push_back(static_cast<uint8_t>(i >> 8));
  }
  absl::StatusOr<std::unique_ptr<transfer::ReceiveBatch>> batch =
      peer.engine().PostReceives(receives, std::move(keep_alive));
  if (!batch.ok()) return batch.status();
  const transfer::SendOp pull{wanted.data(), wanted.size(), transfer::PullTag(tag_base)};
  if (absl::Status sent = peer.Send({&pull, 1}, deadline); !sent.ok()) return sent;
  checksums->assign(reserved.size(), 0);
  absl::Time limit = std::min(deadline, absl::Now() + stall);
  for (size_t r = 0; r < receives.size(); ++r) {
    std::optional<size_t> landed = (*batch)->WaitOne(r, limit);
    if (!landed.has_value()) break;  // the Wait below reports why
    if (*landed != receives[r].length) {
      return absl::DataLossError("a pulled block arrived with the wrong size");
    }
    limit = std::min(deadline, absl::Now() + stall);
    (*checksums)[block_of[r]] = BlockChecksum(receives[r].buffer, receives[r].length);
  }
  absl::Status status =
      (*batch)->Wait(std::vector<bool>(receives.size(), true), limit).status();
  if (absl::IsDeadlineExceeded(status) && absl::Now() < deadline) {
    *stalled = true;
    return absl::DeadlineExceededError(absl::StrCat(
        "the client sent no block for ", absl::FormatDuration(stall),
        " (--transfer_stall_timeout); the publish was given up and its memory released"));
  }
  return status;
}

// Coalesced tagged publish: the reserved blocks arrive back to back in a few
// eager messages (transfer::CoalescedBlocksPerMessage each), received into
// staging memory and copied to their chunks; each block's checksum is taken
// of the copy right after it, while the block is still in cache. Fewer
// messages than blocks save the per-message cost that dominates small blocks
// (bench/README.md). A client that lets `stall` pass without a message
// landing is given up on as in Pull.
absl::Status PullCoalesced(transfer::Peer& peer, uint64_t tag_base,
                           const std::vector<std::shared_ptr<StoredBlock>>& reserved,
                           absl::Time deadline, absl::Duration stall,
                           std::shared_ptr<void> keep_alive, std::vector<uint64_t>* checksums,
                           bool* stalled) {
  std::vector<uint8_t> wanted = {static_cast<uint8_t>(transfer::kCoalescedPullMarker),
                                 static_cast<uint8_t>(transfer::kCoalescedPullMarker >> 8)};
  std::vector<size_t> sizes;  // of the wanted blocks, in order
  size_t total = 0;
  for (size_t i = 0; i < reserved.size(); ++i) {
    if (reserved[i] == nullptr) continue;
    sizes.push_back(reserved[i]->size());
    total += reserved[i]->size();
    wanted.push_back(static_cast<uint8_t>(i));
    wanted.push_back(static_cast<uint8_t>(i >> 8));
  }
  // UCX writes only into staging, never into the reserved chunks, so only
  // staging is held until UCX lets go of the receives: a same-host client
  // that dies mid-message (whose half-received message UCX 1.13 never ends)
  // keeps a staging buffer, not tier memory, and the request returns at the
  // stall timeout instead of waiting on UCX.
  keep_alive.reset();
  std::shared_ptr<uint8_t[]> staging(new uint8_t[total]);
  const size_t per_message = transfer::CoalescedBlocksPerMessage(sizes.front());
  std::vector<transfer::ReceiveOp> receives;
  for (size_t start = 0, offset = 0; start < sizes.size(); start += per_message) {
    size_t length = 0;
    for (size_t j = start; j < std::min(sizes.size(), start + per_message); ++j) length += sizes[j];
    receives.push_back(
        {staging.get() + offset, length, transfer::CoalescedTag(tag_base, receives.size())});
    offset += length;
  }
  absl::StatusOr<std::unique_ptr<transfer::ReceiveBatch>> batch =
      peer.engine().PostReceives(receives, staging, /*buffers_in_keep_alive=*/true);
  if (!batch.ok()) return batch.status();
  const transfer::SendOp pull{wanted.data(), wanted.size(), transfer::PullTag(tag_base)};
  if (absl::Status sent = peer.Send({&pull, 1}, deadline); !sent.ok()) return sent;
  absl::Time limit = std::min(deadline, absl::Now() + stall);
  for (size_t r = 0; r < receives.size(); ++r) {
    std::optional<size_t> landed = (*batch)->WaitOne(r, limit);
    if (!landed.has_value()) break;  // the Wait below reports why
    if (*landed != receives[r].length) {
      return absl::DataLossError("coalesced blocks arrived with the wrong size");
    }
    limit = std::min(deadline, absl::Now() + stall);
  }
  absl::Status status = (*batch)->Wait(std::vector<bool>(receives.size(), true), limit).status();
  if (absl::IsDeadlineExceeded(status) && absl::Now() < deadline) {
    *stalled = true;
    return absl::DeadlineExceededError(absl::StrCat(
        "the client sent no blocks for ", absl::FormatDuration(stall),
        " (--transfer_stall_timeout); the publish was given up and its memory released"));
  }
  if (!status.ok()) return status;
  checksums->assign(reserved.size(), 0);
  size_t offset = 0;
  for (size_t i = 0; i < reserved.size(); ++i) {
    if (reserved[i] == nullptr) continue;
    std::memcpy(reserved[i]->data(), staging.get() + offset, reserved[i]->size());
    (*checksums)[i] = BlockChecksum(reserved[i]->data(), reserved[i]->size());
    offset += reserved[i]->size();
  }
  return absl::OkStatus();
}

// Whether a coalesced transfer of `blocks` x `block_bytes` is allowed.
absl::Status CheckCoalesced(bool rma, size_t blocks, uint64_t block_bytes) {
  if (rma) return absl::InvalidArgumentError("coalesced transfers are tagged only");
  if (block_bytes > limits::kMaxCoalescedBytes / blocks) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a coalesced transfer carries at most ", limits::kMaxCoalescedBytes, " bytes, got ",
        blocks, " blocks of ", block_bytes));
  }
  return absl::OkStatus();
}

}  // namespace

NodeService::NodeService(NamespaceRegistry& namespaces, TieredStore& store, TenantLedger& ledger,
                         transfer::Engine& engine, NodeCounters& counters, NodeMetrics* metrics,
                         const NodeServiceOptions& options)
    : namespaces_(namespaces),
      store_(store),
      ledger_(ledger),
      engine_(engine),
      options_(options),
      // Never below one request's share: a client may always have one
      // full-size request in flight.
      inflight_(static_cast<uint64_t>(
          static_cast<double>(store.dram().capacity_bytes()) *
          std::max(options.max_client_inflight_share, options.max_request_share))),
      incarnation_(absl::Uniform<uint64_t>(absl::BitGen())),
      counters_(counters),
      metrics_(metrics) {
  // The fast path reads and writes the DRAM tier directly (fast_path.cc):
  // with an HBM tier it would store blocks beside HBM (two tiers holding
  // one block) and miss HBM hits, so a node with HBM offers none until it
  // learns the tiers; clients then use gRPC, as with an older node.
  if (!options.fast_path || store.hbm() != nullptr) return;
  fast_path_ = std::make_unique<FastPath>(
      namespaces, store, ledger, counters,
      FastPathOptions{
          .buffer_bytes = options.fast_path_buffer_bytes,
          .max_request_bytes = static_cast<uint64_t>(
              static_cast<double>(store.dram().capacity_bytes()) * options.max_request_share),
          .quota_bytes = [this](const std::string& tenant) { return QuotaFor(tenant).dram_bytes; },
          .draining = &draining_,
          .observe =
              [this](const char* method, int code, absl::Duration elapsed) {
                if (metrics_ != nullptr) metrics_->ObserveRpc(method, code, elapsed, "fast_path");
              }});
  transfer::ServeActiveMessages(
      engine_, [fast = fast_path_.get()](std::shared_ptr<transfer::AmRequest> request) {
        fast->Handle(std::move(request));
      });
}

NodeService::~NodeService() {
  if (fast_path_ == nullptr) return;
  transfer::ServeActiveMessages(engine_, nullptr);  // returns once no handler runs
  fast_path_->Stop();
}

absl::StatusOr<std::shared_ptr<const Principal>> NodeService::Caller(
    const grpc::ServerContext* context) {
  if (options_.authenticator == nullptr) return nullptr;
  absl::StatusOr<std::shared_ptr<const Principal>> caller =
      options_.authenticator->Authenticate(*context);
  if (!caller.ok()) counters_.unauthenticated_calls.fetch_add(1, std::memory_order_relaxed);
  return caller;
}

absl::Status NodeService::MayUseTenant(const grpc::ServerContext* context,
                                       const std::string& tenant) {
  absl::StatusOr<std::shared_ptr<const Principal>> caller = Caller(context);
  if (!caller.ok()) return caller.status();
  if (*caller == nullptr || (*caller)->MayUse(tenant)) return absl::OkStatus();
  counters_.permission_denied_calls.fetch_add(1, std::memory_order_relaxed);
  KVS_LOG(Warning) << (*caller)->name << " denied tenant '" << tenant << "'";
  return absl::PermissionDeniedError(
      absl::StrCat("this credential may not use tenant '", tenant, "'"));
}

absl::Status NodeService::MayAdminister(const grpc::ServerContext* context) {
  absl::StatusOr<std::shared_ptr<const Principal>> caller = Caller(context);
  if (!caller.ok()) return caller.status();
  if (*caller == nullptr || (*caller)->admin) return absl::OkStatus();
  counters_.permission_denied_calls.fetch_add(1, std::memory_order_relaxed);
  return absl::PermissionDeniedError("this RPC needs an admin credential");
}

absl::StatusOr<NamespaceInfo> NodeService::AuthorizedNamespace(
    const grpc::ServerContext* context, uint64_t id, std::shared_ptr<const Principal>* who) {
  // Authenticate before looking: a stranger learns nothing about which ids exist.
  absl::StatusOr<std::shared_ptr<const Principal>> caller = Caller(context);
  if (!caller.ok()) return caller.status();
  if (who != nullptr) *who = *caller;
  absl::StatusOr<NamespaceInfo> ns = namespaces_.Get(id);
  if (!ns.ok()) return ns.status();
  if (*caller != nullptr && !(*caller)->MayUse(ns->spec.tenant())) {
    counters_.permission_denied_calls.fetch_add(1, std::memory_order_relaxed);
    return absl::PermissionDeniedError("this namespace belongs to a tenant this credential may not use");
  }
  return ns;
}

TenantQuota NodeService::QuotaFor(const std::string& tenant) const {
  if (options_.authenticator == nullptr) return {};
  return options_.authenticator->table()->QuotaFor(tenant);
}

std::string NodeService::ClientKey(const grpc::ServerContext* context,
                                   const std::shared_ptr<const Principal>& caller) {
  if (caller != nullptr) return caller->name;
  return context->peer();  // the connection: all a caller without credentials is
}

uint32_t NodeService::RandomTagPrefix() {
  absl::MutexLock lock(&random_mu_);
  // Never 0, so a tag base is never 0 (which would mean RMA).
  return absl::Uniform<uint32_t>(absl::IntervalClosed, random_, 1, UINT32_MAX);
}

uint64_t NodeService::MaxPublishBlocks(uint64_t block_bytes) const {
  const double share = static_cast<double>(store_.dram().capacity_bytes()) * options_.max_request_share;
  const uint64_t blocks = block_bytes == 0 ? 0 : static_cast<uint64_t>(share) / block_bytes;
  return std::clamp<uint64_t>(blocks, 1, limits::kMaxTransferBlocks);
}

template <typename Handler>
grpc::Status NodeService::Observed(const char* method, Handler handler) {
  const absl::Time start = absl::Now();
  grpc::Status status = handler();
  if (metrics_ != nullptr) metrics_->ObserveRpc(method, status.error_code(), absl::Now() - start);
  return status;
}

grpc::Status NodeService::OpenNamespace(grpc::ServerContext* context, const v1::OpenNamespaceRequest* request,
                                v1::OpenNamespaceResponse* response) {
  return Observed("OpenNamespace", [&] { return DoOpenNamespace(context, request, response); });
}

grpc::Status NodeService::Lookup(grpc::ServerContext* context, const v1::LookupRequest* request,
                                v1::LookupResponse* response) {
  return Observed("Lookup", [&] { return DoLookup(context, request, response); });
}

grpc::Status NodeService::Publish(grpc::ServerContext* context, const v1::PublishRequest* request,
                                v1::PublishResponse* response) {
  return Observed("Publish", [&] { return DoPublish(context, request, response); });
}

grpc::Status NodeService::Fetch(grpc::ServerContext* context, const v1::FetchRequest* request,
                                v1::FetchResponse* response) {
  return Observed("Fetch", [&] { return DoFetch(context, request, response); });
}

grpc::Status NodeService::Delete(grpc::ServerContext* context, const v1::DeleteRequest* request,
                                v1::DeleteResponse* response) {
  return Observed("Delete", [&] { return DoDelete(context, request, response); });
}

grpc::Status NodeService::Stats(grpc::ServerContext* context, const v1::StatsRequest* request,
                                v1::StatsResponse* response) {
  return Observed("Stats", [&] { return DoStats(context, request, response); });
}

grpc::Status NodeService::Health(grpc::ServerContext* context, const v1::HealthRequest* request,
                                v1::HealthResponse* response) {
  return Observed("Health", [&] { return DoHealth(context, request, response); });
}

grpc::Status NodeService::Drain(grpc::ServerContext* context, const v1::DrainRequest* request,
                                v1::DrainResponse* response) {
  return Observed("Drain", [&] { return DoDrain(context, request, response); });
}

grpc::Status NodeService::RequestFinished(grpc::ServerContext* context,
                                          const v1::RequestFinishedRequest* request,
                                          v1::RequestFinishedResponse* response) {
  return Observed("RequestFinished", [&] { return DoRequestFinished(context, request, response); });
}

absl::Time NodeService::TransferDeadline(const grpc::ServerContext* context) const {
  const absl::Time own = absl::Now() + options_.transfer_timeout;
  const absl::Time client = absl::FromChrono(context->deadline());
  return std::min(own, client);
}

grpc::Status NodeService::DoOpenNamespace(grpc::ServerContext* context,
                                        const v1::OpenNamespaceRequest* request,
                                        v1::OpenNamespaceResponse* response) {
  if (absl::Status s = MayUseTenant(context, request->spec().tenant()); !s.ok()) return ToGrpc(s);
  absl::StatusOr<NamespaceInfo> info =
      namespaces_.Open(request->spec(), QuotaFor(request->spec().tenant()).namespaces);
  if (!info.ok()) return ToGrpc(info.status());
  ledger_.NamespaceOpened(info->id, info->spec.tenant());
  response->set_namespace_id(info->id);
  response->set_block_bytes(info->block_bytes);
  response->set_worker_address(engine_.worker_address());
  response->set_host_id(transfer::Engine::HostId());
  response->set_tag_prefix(RandomTagPrefix());
  response->set_max_publish_blocks(MaxPublishBlocks(info->block_bytes));
  response->set_max_coalesced_bytes(limits::kMaxCoalescedBytes);
  if (fast_path_ != nullptr) {
    if (std::optional<fastpath::Capability> capability = fast_path_->Grant(*info)) {
      response->set_fast_path_capability(capability->data(), capability->size());
      response->set_fast_path_max_blocks(fastpath::kMaxBlocks);
      response->set_fast_path_max_bytes(fastpath::kMaxBytes);
    }
  }
  return grpc::Status::OK;
}

grpc::Status NodeService::DoLookup(grpc::ServerContext* context, const v1::LookupRequest* request,
                                 v1::LookupResponse* response) {
  absl::StatusOr<NamespaceInfo> ns = AuthorizedNamespace(context, request->namespace_id());
  if (!ns.ok()) return ToGrpc(ns.status());
  absl::StatusOr<std::vector<BlockKey>> keys = ParseKeys(request->keys(), limits::kMaxLookupKeys);
  if (!keys.ok()) return ToGrpc(keys.status());
  const std::vector<v1::Tier> tiers = store_.PrefixTiers(ns->id, *keys);
  const size_t prefix = tiers.size();
  response->set_prefix_length(static_cast<uint32_t>(prefix));
  for (v1::Tier tier : tiers) response->add_tiers(tier);
  counters_.lookup_hit_blocks.fetch_add(prefix, std::memory_order_relaxed);
  counters_.lookup_miss_blocks.fetch_add(keys->size() - prefix, std::memory_order_relaxed);
  const uint64_t tokens_per_block = ns->spec.tokens_per_block();
  counters_.lookup_hit_tokens.fetch_add(prefix * tokens_per_block, std::memory_order_relaxed);
  counters_.lookup_miss_tokens.fetch_add((keys->size() - prefix) * tokens_per_block,
                                         std::memory_order_relaxed);
  return grpc::Status::OK;
}

grpc::Status NodeService::DoPublish(grpc::ServerContext* context, const v1::PublishRequest* request,
                                  v1::PublishResponse* response) {
  if (draining_.load(std::memory_order_relaxed)) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "this node is draining: it takes no new blocks");
  }
  std::shared_ptr<const Principal> caller;
  absl::StatusOr<NamespaceInfo> ns = AuthorizedNamespace(context, request->namespace_id(), &caller);
  if (!ns.ok()) return ToGrpc(ns.status());
  const auto& blocks = request->blocks();
  if (blocks.empty() || static_cast<size_t>(blocks.size()) > limits::kMaxTransferBlocks) {
    return InvalidArgument(absl::StrCat("a publish carries 1..", limits::kMaxTransferBlocks,
                                        " blocks, got ", blocks.size()));
  }
  absl::StatusOr<bool> rma = UsesRma(request->tag_base(), options_.allow_client_rkeys);
  if (!rma.ok()) return ToGrpc(rma.status());
  if (absl::Status s = ValidateEndpoint(request->source(), *rma); !s.ok()) return ToGrpc(s);
  if (request->coalesced()) {
    if (absl::Status s = CheckCoalesced(*rma, blocks.size(), ns->block_bytes); !s.ok())
      return ToGrpc(s);
  }

  // Validate everything before touching memory or the network.
  std::vector<BlockId> ids(blocks.size());
  std::vector<std::optional<BlockKey>> parents(blocks.size());
  absl::flat_hash_set<BlockKey> seen;
  for (int i = 0; i < blocks.size(); ++i) {
    const v1::PublishBlock& block = blocks[i];
    absl::StatusOr<BlockKey> key = BlockKey::FromWire(block.key());
    if (!key.ok()) return ToGrpc(key.status());
    if (!seen.insert(*key).second) {
      return InvalidArgument(absl::StrCat("key ", key->Hex(), " appears twice in one publish"));
    }
    if (!block.parent().empty()) {
      absl::StatusOr<BlockKey> parent = BlockKey::FromWire(block.parent());
      if (!parent.ok()) return ToGrpc(parent.status());
      parents[i] = *parent;
    }
    if (block.size() != ns->block_bytes) {
      return InvalidArgument(absl::StrCat("block ", i, " has ", block.size(),
                                          " bytes; this namespace's blocks have ",
                                          ns->block_bytes));
    }
    if (absl::Status s =
            ValidateRange(request->source(), block.region(), block.offset(), block.size());
        !s.ok()) {
      return ToGrpc(s);
    }
    ids[i] = BlockId{ns->id, *key};
  }

  // Blocks stored already need no transfer.
  response->mutable_status()->Resize(blocks.size(), v1::BLOCK_OK);
  size_t missing = 0;
  // A block a precision tier transcoded coarser is taken again: the raw
  // republish replaces it (a hit never promotes it back, quantization being
  // lossy).
  std::vector<bool> replaces(blocks.size(), false);
  for (int i = 0; i < blocks.size(); ++i) {
    const std::optional<uint8_t> stored = store_.StoredFormatOf(ids[i]);
    if (stored.has_value() && *stored == static_cast<uint8_t>(ns->spec.format())) {
      response->set_status(i, v1::BLOCK_ALREADY_PRESENT);
    } else {
      replaces[i] = stored.has_value();
      ++missing;
    }
  }
  counters_.duplicate_blocks.fetch_add(blocks.size() - missing, std::memory_order_relaxed);
  if (missing == 0) return grpc::Status::OK;

  // Connect before reserving: a bad or silent address must fail without
  // having evicted anything. A peer that answers nothing within the stall
  // timeout is given up on just as a silent sender is.
  const absl::Time deadline = TransferDeadline(context);
  absl::StatusOr<ResolvedEndpoint> endpoint =
      Resolve(engine_, request->source(),
              std::min(deadline, absl::Now() + options_.transfer_stall_timeout), *rma);
  if (!endpoint.ok()) return ToGrpc(endpoint.status());

  // Reserve memory for the missing blocks: at most this request's share of
  // the tier, and within the tenant's quota once its own oldest blocks made
  // room.
  // A client with too much in flight waits for its own earlier publishes.
  std::vector<std::shared_ptr<StoredBlock>> reserved(blocks.size());
  InflightBudget::Grant grant =
      inflight_.Take(ClientKey(context, caller), std::min<uint64_t>(missing, MaxPublishBlocks(ns->block_bytes)),
                     ns->block_bytes, std::min(deadline, absl::Now() + options_.transfer_stall_timeout));
  const uint64_t max_blocks =
      ledger_.MakeRoom(ns->spec.tenant(), QuotaFor(ns->spec.tenant()).dram_bytes, grant.blocks(),
                       ns->block_bytes);
  size_t to_transfer = 0;
  for (int i = 0; i < blocks.size(); ++i) {
    if (response->status(i) == v1::BLOCK_ALREADY_PRESENT) continue;
    absl::StatusOr<std::shared_ptr<StoredBlock>> block =
        to_transfer < max_blocks ? store_.Reserve(ns->block_bytes)
                                 : absl::ResourceExhaustedError("over the request's share");
    if (!block.ok()) {
      response->set_status(i, v1::BLOCK_NO_SPACE);
      continue;
    }
    reserved[i] = *std::move(block);
    ++to_transfer;
  }
  if (to_transfer == 0) return grpc::Status::OK;
  // The reservations stay alive until UCX is done with them, even if we give up.
  auto keep_alive = std::make_shared<std::vector<std::shared_ptr<StoredBlock>>>(reserved);
  absl::Status transferred;
  std::vector<uint64_t> checksums;  // of the bytes received, per block
  if (*rma) {
    transferred = endpoint->peer->Get(RmaOps(blocks, reserved, *endpoint), deadline, keep_alive);
    if (transferred.ok()) {
      checksums.assign(blocks.size(), 0);
      for (int i = 0; i < blocks.size(); ++i) {
        if (reserved[i] != nullptr)
          checksums[i] = BlockChecksum(reserved[i]->data(), reserved[i]->size());
      }
    }
  } else {
    bool stalled = false;
    transferred = request->coalesced()
                      ? PullCoalesced(*endpoint->peer, request->tag_base(), reserved, deadline,
                                      options_.transfer_stall_timeout, keep_alive, &checksums,
                                      &stalled)
                      : Pull(*endpoint->peer, request->tag_base(), reserved, deadline,
                             options_.transfer_stall_timeout, keep_alive, &checksums, &stalled);
    if (stalled) counters_.stalled_transfers.fetch_add(1, std::memory_order_relaxed);
  }
  if (!transferred.ok()) {
    counters_.transfer_failures.fetch_add(1, std::memory_order_relaxed);
    KVS_LOG(Warning) << "publish transfer failed: " << transferred;
    return ToGrpc(transferred);
  }

  uint64_t bytes = 0;
  for (int i = 0; i < blocks.size(); ++i) {
    if (reserved[i] == nullptr) continue;
    bytes += reserved[i]->size();
    const uint64_t checksum = checksums[i];
    if (checksum != blocks[i].checksum()) {
      response->set_status(i, v1::BLOCK_CHECKSUM_MISMATCH);
      counters_.checksum_failures.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    reserved[i]->checksum = checksum;
    // Quantized namespaces store the encoded block instead (stored_format.h).
    absl::StatusOr<std::shared_ptr<StoredBlock>> stored =
        ApplyStoredFormat(store_.dram(), ns->spec, reserved[i]);
    if (!stored.ok()) {
      response->set_status(i, absl::IsResourceExhausted(stored.status()) ? v1::BLOCK_NO_SPACE
                                                                         : v1::BLOCK_REJECTED);
      continue;
    }
    reserved[i] = *std::move(stored);
    if (parents[i].has_value()) {
      reserved[i]->parent = *parents[i];
      reserved[i]->has_parent = true;
    }
    if (replaces[i]) store_.Erase(ids[i]);  // the coarser copy, in whichever tier
    absl::StatusOr<bool> committed = store_.Commit(ids[i], reserved[i]);
    if (!committed.ok()) {
      response->set_status(i, v1::BLOCK_NO_SPACE);
    } else if (*committed) {
      counters_.published_blocks.fetch_add(1, std::memory_order_relaxed);
      const std::string format = StoredFormatLabel(ns->spec.format());
      counters_.ingest_bytes.Add(format, "received", ns->block_bytes);
      counters_.ingest_bytes.Add(format, "stored", reserved[i]->size());
    } else {
      response->set_status(i, v1::BLOCK_ALREADY_PRESENT);
      counters_.duplicate_blocks.fetch_add(1, std::memory_order_relaxed);
    }
  }
  response->set_bytes_transferred(bytes);
  counters_.transfer_bytes.Add("in", endpoint->peer->transport(), bytes);
  return grpc::Status::OK;
}

grpc::Status NodeService::DoFetch(grpc::ServerContext* context, const v1::FetchRequest* request,
                                v1::FetchResponse* response) {
  absl::StatusOr<NamespaceInfo> ns = AuthorizedNamespace(context, request->namespace_id());
  if (!ns.ok()) return ToGrpc(ns.status());
  const auto& blocks = request->blocks();
  if (blocks.empty() || static_cast<size_t>(blocks.size()) > limits::kMaxTransferBlocks) {
    return InvalidArgument(absl::StrCat("a fetch carries 1..", limits::kMaxTransferBlocks,
                                        " blocks, got ", blocks.size()));
  }
  absl::StatusOr<bool> rma = UsesRma(request->tag_base(), options_.allow_client_rkeys);
  if (!rma.ok()) return ToGrpc(rma.status());
  if (absl::Status s = ValidateEndpoint(request->destination(), *rma); !s.ok()) return ToGrpc(s);
  if (request->coalesced()) {
    if (absl::Status s = CheckCoalesced(*rma, blocks.size(), ns->block_bytes); !s.ok())
      return ToGrpc(s);
  }
  std::vector<BlockId> ids(blocks.size());
  for (int i = 0; i < blocks.size(); ++i) {
    const v1::FetchBlock& block = blocks[i];
    absl::StatusOr<BlockKey> key = BlockKey::FromWire(block.key());
    if (!key.ok()) return ToGrpc(key.status());
    if (block.capacity() < ns->block_bytes) {
      return InvalidArgument(absl::StrCat("destination ", i, " holds ", block.capacity(),
                                          " bytes; this namespace's blocks have ",
                                          ns->block_bytes));
    }
    if (absl::Status s =
            ValidateRange(request->destination(), block.region(), block.offset(), block.capacity());
        !s.ok()) {
      return ToGrpc(s);
    }
    ids[i] = BlockId{ns->id, *key};
  }

  // Pin what is stored; a miss is a per-block result, never an error.
  std::vector<std::shared_ptr<StoredBlock>> pinned = store_.Pin(ids);
  const size_t hits = std::count_if(pinned.begin(), pinned.end(),
                                    [](const auto& block) { return block != nullptr; });
  response->mutable_status()->Resize(blocks.size(), v1::BLOCK_NOT_FOUND);
  response->mutable_size()->Resize(blocks.size(), 0);
  response->mutable_checksum()->Resize(blocks.size(), 0);
  response->mutable_format()->Resize(blocks.size(), v1::FORMAT_RAW);
  counters_.fetch_hit_blocks.fetch_add(hits, std::memory_order_relaxed);
  counters_.fetch_miss_blocks.fetch_add(blocks.size() - hits, std::memory_order_relaxed);
  if (hits == 0) return grpc::Status::OK;

  const absl::Time deadline = TransferDeadline(context);
  absl::StatusOr<ResolvedEndpoint> endpoint =
      Resolve(engine_, request->destination(), deadline, *rma);
  if (!endpoint.ok()) return ToGrpc(endpoint.status());
  uint64_t bytes = 0;
  for (const auto& block : pinned) bytes += block != nullptr ? block->size() : 0;
  auto keep_alive = std::make_shared<std::vector<std::shared_ptr<StoredBlock>>>(pinned);
  absl::Status transferred;
  if (!*rma) {
    std::vector<transfer::SendOp> sends;
    sends.reserve(hits);
    for (int i = 0; i < blocks.size(); ++i) {
      if (pinned[i] == nullptr) continue;
      sends.push_back({pinned[i]->data(), pinned[i]->size(), request->tag_base() + i});
    }
    // Coalesced: the hits back to back in one message, straight from their
    // chunks (no copy here; the client unpacks by the sizes in the reply).
    transferred = request->coalesced()
                      ? endpoint->peer->SendCoalesced(
                            sends, request->tag_base(),
                            transfer::CoalescedBlocksPerMessage(ns->block_bytes), deadline,
                            keep_alive)
                      : endpoint->peer->Send(sends, deadline, keep_alive);
  } else {
    transferred = endpoint->peer->Put(RmaOps(blocks, pinned, *endpoint), deadline, keep_alive);
  }
  if (!transferred.ok()) {
    counters_.transfer_failures.fetch_add(1, std::memory_order_relaxed);
    KVS_LOG(Warning) << "fetch transfer failed: " << transferred;
    return ToGrpc(transferred);
  }
  for (int i = 0; i < blocks.size(); ++i) {
    if (pinned[i] == nullptr) continue;
    response->set_status(i, v1::BLOCK_OK);
    response->set_size(i, pinned[i]->size());
    response->set_checksum(i, pinned[i]->checksum);
    // Per block: a precision tier may have transcoded it coarser.
    response->set_format(i, static_cast<v1::StoredFormat>(pinned[i]->format));
  }
  response->set_bytes_transferred(bytes);
  counters_.transfer_bytes.Add("out", endpoint->peer->transport(), bytes);
  return grpc::Status::OK;
}

grpc::Status NodeService::DoDelete(grpc::ServerContext* context, const v1::DeleteRequest* request,
                                 v1::DeleteResponse* response) {
  absl::StatusOr<NamespaceInfo> ns = AuthorizedNamespace(context, request->namespace_id());
  if (!ns.ok()) return ToGrpc(ns.status());
  absl::StatusOr<std::vector<BlockKey>> keys = ParseKeys(request->keys(), limits::kMaxDeleteKeys);
  if (!keys.ok()) return ToGrpc(keys.status());
  uint32_t deleted = 0;
  for (const BlockKey& key : *keys) deleted += store_.Erase(BlockId{ns->id, key}) ? 1 : 0;
  response->set_deleted(deleted);
  return grpc::Status::OK;
}

grpc::Status NodeService::DoStats(grpc::ServerContext* context, const v1::StatsRequest*,
                                v1::StatsResponse* response) {
  if (absl::Status s = MayAdminister(context); !s.ok()) return ToGrpc(s);
  const TierCounters dram = store_.dram().counters();
  v1::TierStats* tier = response->add_tiers();
  tier->set_tier(v1::TIER_DRAM);
  tier->set_capacity_bytes(dram.capacity_bytes);
  tier->set_used_bytes(dram.used_bytes);
  tier->set_stored_bytes(dram.stored_bytes);
  tier->set_blocks(dram.blocks);
  tier->set_evictions(dram.evictions);
  for (size_t f = 0; f < kStoredFormats; ++f) {
    if (dram.format_blocks[f] == 0) continue;
    v1::FormatStats* format = response->add_formats();
    format->set_tier(v1::TIER_DRAM);
    format->set_format(static_cast<v1::StoredFormat>(f));
    format->set_blocks(dram.format_blocks[f]);
    format->set_stored_bytes(dram.format_bytes[f]);
  }
  response->set_transcoded_blocks(dram.transcodes);
  response->set_precision_leases(dram.precision_leases);
  if (store_.nvme() != nullptr) {
    const NvmeCounters nvme = store_.nvme()->counters();
    v1::TierStats* nvme_tier = response->add_tiers();
    nvme_tier->set_tier(v1::TIER_NVME);
    nvme_tier->set_capacity_bytes(nvme.capacity_bytes);
    nvme_tier->set_used_bytes(nvme.used_bytes);
    nvme_tier->set_stored_bytes(nvme.stored_bytes);
    nvme_tier->set_blocks(nvme.blocks);
    nvme_tier->set_evictions(nvme.evictions);
    for (size_t f = 0; f < kStoredFormats; ++f) {
      if (nvme.format_blocks[f] == 0) continue;
      v1::FormatStats* format = response->add_formats();
      format->set_tier(v1::TIER_NVME);
      format->set_format(static_cast<v1::StoredFormat>(f));
      format->set_blocks(nvme.format_blocks[f]);
      format->set_stored_bytes(nvme.format_bytes[f]);
    }
    nvme_tier->set_errors(nvme.io_errors);
    nvme_tier->set_last_error(nvme.last_error);
    response->set_demoted_blocks(nvme.demoted_blocks);
    response->set_demotion_drops(nvme.demotion_drops);
    response->set_nvme_corrupt_blocks(nvme.corrupt_blocks);
    response->set_nvme_corrupt_records(nvme.corrupt_records);
    response->set_nvme_recovered_blocks(nvme.recovered_blocks);
    response->set_nvme_index_repairs(nvme.index_repairs);
  }
  response->set_promoted_blocks(store_.promoted_blocks());
  AddHbmStats(store_, response);
  ipc_leases_.Sweep();  // an expired lease is not reported as pinned
  response->set_device_ipc_clients(counters_.device_ipc_clients.load(std::memory_order_relaxed));
  response->set_device_staged_clients(
      counters_.device_staged_clients.load(std::memory_order_relaxed));
  response->set_device_ipc_blocks(counters_.device_ipc_blocks.load(std::memory_order_relaxed));
  response->set_device_ipc_pinned_blocks(
      counters_.device_ipc_pinned_blocks.load(std::memory_order_relaxed));
  response->set_namespaces(namespaces_.size());
  auto load = [](const std::atomic<uint64_t>& v) { return v.load(std::memory_order_relaxed); };
  response->set_lookup_hit_blocks(load(counters_.lookup_hit_blocks));
  response->set_lookup_miss_blocks(load(counters_.lookup_miss_blocks));
  response->set_fetch_hit_blocks(load(counters_.fetch_hit_blocks));
  response->set_fetch_miss_blocks(load(counters_.fetch_miss_blocks));
  response->set_published_blocks(load(counters_.published_blocks));
  response->set_duplicate_blocks(load(counters_.duplicate_blocks));
  response->set_checksum_failures(load(counters_.checksum_failures));
  response->set_transfer_failures(load(counters_.transfer_failures));
  response->set_request_hints(load(counters_.request_hints));
  response->set_unauthenticated_calls(load(counters_.unauthenticated_calls));
  response->set_permission_denied_calls(load(counters_.permission_denied_calls));
  response->set_stalled_transfers(load(counters_.stalled_transfers));
  response->set_discarded_messages(engine_.discarded_messages());
  response->set_fast_path_requests(load(counters_.fast_path_requests));
  response->set_fast_path_refused(load(counters_.fast_path_refused));
  for (const TenantLedger::Usage& usage : ledger_.Snapshot()) {
    v1::TenantStats* tenant = response->add_tenants();
    tenant->set_tenant(usage.tenant);
    tenant->set_dram_bytes(usage.dram_bytes);
    tenant->set_dram_blocks(usage.dram_blocks);
    tenant->set_dram_quota_bytes(QuotaFor(usage.tenant).dram_bytes);
    tenant->set_quota_evictions(usage.quota_evictions);
    tenant->set_namespaces(namespaces_.TenantNamespaces(usage.tenant));
  }
  response->set_bytes_in(counters_.transfer_bytes.Total("in"));
  response->set_bytes_out(counters_.transfer_bytes.Total("out"));
  std::vector<std::string> transports = engine_.ActiveTransports();
  if (fast_path_ != nullptr) {
    for (const std::string& t : fast_path_->Transports()) {
      if (std::find(transports.begin(), transports.end(), t) == transports.end()) {
        transports.push_back(t);
      }
    }
  }
  for (const std::string& t : transports) response->add_transports(t);
  response->set_uptime_seconds(absl::ToInt64Seconds(absl::Now() - started_));
  return grpc::Status::OK;
}

grpc::Status NodeService::DoHealth(grpc::ServerContext*, const v1::HealthRequest*,
                                 v1::HealthResponse* response) {
  const bool recovering = store_.nvme() != nullptr && !store_.nvme()->ready();
  response->set_serving(!recovering);
  response->set_recovering(recovering);
  response->set_version(KVSTRATA_VERSION);
  response->set_draining(draining_.load(std::memory_order_relaxed));
  response->set_incarnation(incarnation_);
  return grpc::Status::OK;
}

grpc::Status NodeService::DoDrain(grpc::ServerContext* context, const v1::DrainRequest* request,
                                v1::DrainResponse* response) {
  if (absl::Status s = MayAdminister(context); !s.ok()) return ToGrpc(s);
  draining_.store(request->draining(), std::memory_order_relaxed);
  KVS_LOG(Info) << (request->draining() ? "draining: refusing new publishes" : "back in service");
  response->set_draining(request->draining());
  return grpc::Status::OK;
}

grpc::Status NodeService::CloseNamespace(grpc::ServerContext* context,
                                         const v1::CloseNamespaceRequest* request,
                                         v1::CloseNamespaceResponse* response) {
  return Observed("CloseNamespace", [&] { return DoCloseNamespace(context, request, response); });
}

grpc::Status NodeService::DoCloseNamespace(grpc::ServerContext* context,
                                           const v1::CloseNamespaceRequest* request,
                                           v1::CloseNamespaceResponse*) {
  absl::StatusOr<NamespaceInfo> ns = AuthorizedNamespace(context, request->namespace_id());
  if (!ns.ok()) return ToGrpc(ns.status());
  if (fast_path_ != nullptr && !request->fast_path_capability().empty()) {
    fast_path_->Revoke(ns->id, request->fast_path_capability());
  }
  absl::StatusOr<bool> closed = namespaces_.Close(ns->id);
  if (!closed.ok()) return ToGrpc(closed.status());  // closed meanwhile by another call
  if (*closed) {
    ledger_.NamespaceClosed(ns->id);
    if (fast_path_ != nullptr) fast_path_->Revoke(ns->id);
  }
  return grpc::Status::OK;
}

grpc::Status NodeService::DoRequestFinished(grpc::ServerContext* context,
                                            const v1::RequestFinishedRequest* request,
                                            v1::RequestFinishedResponse* response) {
  absl::StatusOr<NamespaceInfo> ns = AuthorizedNamespace(context, request->namespace_id());
  if (!ns.ok()) return ToGrpc(ns.status());
  absl::StatusOr<BlockKey> key = BlockKey::FromWire(request->last_key());
  if (!key.ok()) return ToGrpc(key.status());
  const bool known = store_.RequestFinished(BlockId{ns->id, *key}, request->output_tokens());
  response->set_known(known);
  // Release order: a reader that sees the known count also sees the total.
  counters_.request_hints.fetch_add(1, std::memory_order_release);
  if (known) counters_.request_hints_known.fetch_add(1, std::memory_order_release);
  return grpc::Status::OK;
}

namespace {

void AddListed(const std::vector<ListedBlock>& blocks, v1::ListBlocksResponse* response) {
  for (const ListedBlock& block : blocks) {
    v1::ListedBlock* out = response->add_blocks();
    out->set_key(std::string(block.key.view()));
    if (block.parent.has_value()) out->set_parent(std::string(block.parent->view()));
    out->set_size(block.size);
    out->set_tier(block.tier);
  }
}

}  // namespace

grpc::Status NodeService::ListBlocks(grpc::ServerContext* context,
                                     const v1::ListBlocksRequest* request,
                                     v1::ListBlocksResponse* response) {
  return Observed("ListBlocks", [&] { return DoListBlocks(context, request, response); });
}

grpc::Status NodeService::DoListBlocks(grpc::ServerContext* context,
                                       const v1::ListBlocksRequest* request,
                                       v1::ListBlocksResponse* response) {
  absl::StatusOr<NamespaceInfo> ns = AuthorizedNamespace(context, request->namespace_id());
  if (!ns.ok()) return ToGrpc(ns.status());
  if (request->limit() == 0 || request->limit() > limits::kMaxListBlocks) {
    return InvalidArgument(absl::StrCat("a page lists 1..", limits::kMaxListBlocks,
                                        " blocks, got ", request->limit()));
  }
  if (!request->keys().empty()) {
    absl::StatusOr<std::vector<BlockKey>> keys = ParseKeys(request->keys(), limits::kMaxListBlocks);
    if (!keys.ok()) return ToGrpc(keys.status());
    std::vector<BlockId> ids;
    ids.reserve(keys->size());
    for (const BlockKey& key : *keys) ids.push_back(BlockId{ns->id, key});
    AddListed(store_.Describe(ids), response);
    return grpc::Status::OK;
  }
  std::optional<BlockKey> after;
  if (!request->after().empty()) {
    // Cursors are keys this node listed: always 16 bytes, never folded.
    if (request->after().size() != sizeof(BlockKey::bytes)) {
      return InvalidArgument(absl::StrCat("after must be empty or a 16-byte key, got ",
                                          request->after().size(), " bytes"));
    }
    after.emplace();
    std::memcpy(after->bytes.data(), request->after().data(), after->bytes.size());
  }
  bool more = false;
  const std::vector<ListedBlock> page = store_.List(ns->id, after, request->limit(), &more);
  AddListed(page, response);
  if (more && !page.empty()) response->set_next_after(std::string(page.back().key.view()));
  return grpc::Status::OK;
}

}  // namespace kvstrata::cachenode
