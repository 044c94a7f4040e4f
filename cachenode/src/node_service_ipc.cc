// The same-host CUDA IPC path of NodeService (issue 19, item 5): a client
// whose GPU shares this node's host maps the HBM arena once (its IPC handle
// from OpenDeviceIpc) and copies HBM blocks device-to-device; the node only
// pins them (FetchDeviceIpc, a lease) until the client says it is done
// (ReleaseDeviceIpc) or the lease expires. Bytes never leave the GPU, and
// blocks outside HBM take the ordinary Fetch.
#include "absl/strings/str_cat.h"
#include "kvstrata/common/limits.h"
#include "kvstrata/common/log.h"
#include "auth.h"
#include "node_service.h"

namespace kvstrata::cachenode {
namespace {

grpc::Status Grpc(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

}  // namespace

grpc::Status NodeService::OpenDeviceIpc(grpc::ServerContext* context,
                                        const v1::OpenDeviceIpcRequest* request,
                                        v1::OpenDeviceIpcResponse* response) {
  absl::StatusOr<std::shared_ptr<const Principal>> caller = Caller(context);
  if (!caller.ok()) return Grpc(caller.status());
  // The node's choice, per client: CUDA IPC only where the arena can be
  // mapped (an HBM tier, the same host); staged UCX otherwise.
  auto staged = [&](std::string reason) {
    counters_.device_staged_clients.fetch_add(1, std::memory_order_relaxed);
    response->set_path(v1::DEVICE_PATH_STAGED);
    response->set_reason(std::move(reason));
    return grpc::Status::OK;
  };
  HbmTier* hbm = store_.hbm();
  if (hbm == nullptr) return staged("this node has no HBM tier");
  // The mapping is the whole arena, every tenant's blocks, read-write: with
  // authentication on, only an admin credential (one trusted with all of
  // them) gets it; tenants' clients stage, which shows them their own only.
  if (*caller != nullptr && !(*caller)->admin) {
    return staged("with authentication on, CUDA IPC needs an admin credential (the arena holds "
                  "every tenant's blocks)");
  }
  if (request->host_id().empty() || request->host_id() != transfer::Engine::HostId()) {
    return staged("the client is on another host");
  }
  absl::StatusOr<std::string> handle = hbm->ArenaIpcHandle();
  if (!handle.ok()) {
    KVS_LOG(Warning) << "cannot export the HBM arena for CUDA IPC: " << handle.status();
    return staged(absl::StrCat("the arena cannot be exported: ", handle.status().message()));
  }
  counters_.device_ipc_clients.fetch_add(1, std::memory_order_relaxed);
  response->set_path(v1::DEVICE_PATH_CUDA_IPC);
  response->set_handle(*handle);
  response->set_arena_bytes(hbm->arena_bytes());
  return grpc::Status::OK;
}

grpc::Status NodeService::FetchDeviceIpc(grpc::ServerContext* context,
                                         const v1::FetchDeviceIpcRequest* request,
                                         v1::FetchDeviceIpcResponse* response) {
  std::shared_ptr<const Principal> who;
  absl::StatusOr<NamespaceInfo> ns = AuthorizedNamespace(context, request->namespace_id(), &who);
  if (!ns.ok()) return Grpc(ns.status());
  if (who != nullptr && !who->admin) {  // as OpenDeviceIpc: only a caller who may map the arena pins
    counters_.permission_denied_calls.fetch_add(1, std::memory_order_relaxed);
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        "with authentication on, CUDA IPC needs an admin credential");
  }
  HbmTier* hbm = store_.hbm();
  if (hbm == nullptr) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "this node has no HBM tier");
  }
  const auto& keys = request->keys();
  if (keys.empty() || static_cast<size_t>(keys.size()) > limits::kMaxTransferBlocks) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("an IPC fetch carries 1..", limits::kMaxTransferBlocks,
                                     " keys, got ", keys.size()));
  }
  std::vector<BlockId> ids(keys.size());
  for (int i = 0; i < keys.size(); ++i) {
    absl::StatusOr<BlockKey> key = BlockKey::FromWire(keys[i]);
    if (!key.ok()) return Grpc(key.status());
    ids[i] = BlockId{ns->id, *key};
  }
  std::vector<std::shared_ptr<StoredBlock>> pinned = store_.PinHbm(ids);
  response->mutable_status()->Resize(keys.size(), v1::BLOCK_NOT_FOUND);
  response->mutable_arena_offset()->Resize(keys.size(), 0);
  response->mutable_size()->Resize(keys.size(), 0);
  response->mutable_checksum()->Resize(keys.size(), 0);
  response->mutable_format()->Resize(keys.size(), v1::FORMAT_RAW);
  std::vector<std::shared_ptr<StoredBlock>> held;
  for (int i = 0; i < keys.size(); ++i) {
    if (pinned[i] == nullptr) continue;
    response->set_status(i, v1::BLOCK_OK);
    response->set_arena_offset(i, hbm->ArenaOffset(*pinned[i]));
    response->set_size(i, pinned[i]->size());
    response->set_checksum(i, pinned[i]->checksum);
    response->set_format(i, static_cast<v1::StoredFormat>(pinned[i]->format));
    held.push_back(std::move(pinned[i]));
  }
  if (held.empty()) return grpc::Status::OK;
  const size_t hits = held.size();
  absl::StatusOr<uint64_t> lease = ipc_leases_.Add(std::move(held));
  if (!lease.ok()) return Grpc(lease.status());
  response->set_lease(*lease);
  counters_.fetch_hit_blocks.fetch_add(hits, std::memory_order_relaxed);
  counters_.device_ipc_blocks.fetch_add(hits, std::memory_order_relaxed);
  return grpc::Status::OK;
}

grpc::Status NodeService::ReleaseDeviceIpc(grpc::ServerContext* context,
                                           const v1::ReleaseDeviceIpcRequest* request,
                                           v1::ReleaseDeviceIpcResponse* response) {
  absl::StatusOr<std::shared_ptr<const Principal>> caller = Caller(context);
  if (!caller.ok()) return Grpc(caller.status());
  response->set_released(ipc_leases_.Release(request->lease()));
  return grpc::Status::OK;
}

}  // namespace kvstrata::cachenode
