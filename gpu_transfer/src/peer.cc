#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "engine_impl.h"
#include "kvstrata/common/log.h"

namespace kvstrata::transfer {
namespace {

// Completion of one flushed batch. Heap-allocated and shared with UCX's
// callback, because a batch abandoned at its deadline completes later.
struct FlushState {
  absl::Notification done;
  ucs_status_t status = UCS_OK;
  std::shared_ptr<void> keep_alive;  // local memory UCX may still touch
};

void OnFlushDone(void* request, ucs_status_t status, void* user_data) {
  auto* state = static_cast<std::shared_ptr<FlushState>*>(user_data);
  (*state)->status = status;
  (*state)->keep_alive.reset();
  (*state)->done.Notify();
  delete state;
  ucp_request_free(request);
}

void OnCloseDone(void* request, ucs_status_t /*status*/, void* user_data) {
  static_cast<std::atomic<int>*>(user_data)->fetch_sub(1);
  ucp_request_free(request);
}

}  // namespace

void Peer::MarkFailed() {
  failed_.store(true, std::memory_order_release);
  engine_->impl_->Forget(this);
}

void Peer::Touch() { last_used_ns_.store(absl::GetCurrentTimeNanos(), std::memory_order_relaxed); }

bool Peer::IdleLongerThan(absl::Duration idle) const {
  return absl::GetCurrentTimeNanos() - last_used_ns_.load(std::memory_order_relaxed) >
         absl::ToInt64Nanoseconds(idle);
}

RemoteKey::~RemoteKey() {
  if (rkey_ != nullptr) ucp_rkey_destroy(static_cast<ucp_rkey_h>(rkey_));
}

Peer::~Peer() {
  if (ep_ == nullptr) return;
  // Force: a dead or slow peer must not hold anything up; outstanding
  // operations complete with an error, which releases their keep-alives.
  Engine::Impl& impl = *engine_->impl_;
  impl.closing_.fetch_add(1);
  ucp_request_param_t param{};
  param.op_attr_mask =
      UCP_OP_ATTR_FIELD_FLAGS | UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  param.flags = UCP_EP_CLOSE_FLAG_FORCE;
  param.cb.send = OnCloseDone;
  param.user_data = &impl.closing_;
  ucs_status_ptr_t request = ucp_ep_close_nbx(static_cast<ucp_ep_h>(ep_), &param);
  if (request == nullptr || UCS_PTR_IS_ERR(request)) impl.closing_.fetch_sub(1);
  ucp_worker_signal(impl.worker_);
}

absl::StatusOr<std::unique_ptr<RemoteKey>> Peer::UnpackRkey(std::string_view packed) {
  if (packed.empty()) return absl::InvalidArgumentError("empty remote key");
  std::unique_ptr<RemoteKey> key(new RemoteKey());
  ucp_rkey_h rkey = nullptr;
  // ucp_ep_rkey_unpack takes no length: a truncated key from a peer would be
  // read past its end. Zero padding keeps any over-read inside our buffer.
  std::string padded(packed);
  padded.resize(packed.size() + 4096, '\0');
  ucs_status_t status = ucp_ep_rkey_unpack(static_cast<ucp_ep_h>(ep_), padded.data(), &rkey);
  if (status != UCS_OK) {
    return absl::InvalidArgumentError(absl::StrCat("bad remote key: ", ucs_status_string(status)));
  }
  key->rkey_ = rkey;
  return key;
}

absl::Status Peer::Get(absl::Span<const RmaOp> ops, absl::Time deadline,
                       std::shared_ptr<void> keep_alive) {
  return Transfer(/*write=*/false, ops, deadline, std::move(keep_alive));
}

absl::Status Peer::Put(absl::Span<const RmaOp> ops, absl::Time deadline,
                       std::shared_ptr<void> keep_alive) {
  return Transfer(/*write=*/true, ops, deadline, std::move(keep_alive));
}

absl::Status Peer::Transfer(bool write, absl::Span<const RmaOp> ops, absl::Time deadline,
                            std::shared_ptr<void> keep_alive) {
  if (failed()) return absl::UnavailableError("peer has failed");
  Engine::Impl& impl = *engine_->impl_;
  auto ep = static_cast<ucp_ep_h>(ep_);
  Touch();

  impl.Wake();
  absl::Status post_error;
  for (const RmaOp& op : ops) {
    if (op.rkey == nullptr || op.local == nullptr) {
      post_error = absl::InvalidArgumentError("transfer op without buffer or key");
      break;
    }
    ucp_request_param_t param{};  // no callback: completion is the flush's
    auto rkey = static_cast<ucp_rkey_h>(op.rkey->rkey_);
    ucs_status_ptr_t request =
        write ? ucp_put_nbx(ep, op.local, op.length, op.remote_address, rkey, &param)
              : ucp_get_nbx(ep, op.local, op.length, op.remote_address, rkey, &param);
    if (UCS_PTR_IS_ERR(request)) {
      post_error = UcsError(write ? "ucp_put_nbx" : "ucp_get_nbx", UCS_PTR_STATUS(request));
      break;
    }
    if (request != nullptr) ucp_request_free(request);
  }

  // Always flush what was posted, so nothing outlives the call unobserved.
  auto state = std::make_shared<FlushState>();
  state->keep_alive = std::move(keep_alive);
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  param.cb.send = OnFlushDone;
  auto* callback_ref = new std::shared_ptr<FlushState>(state);
  param.user_data = callback_ref;
  ucs_status_ptr_t flush = ucp_ep_flush_nbx(ep, &param);
  if (flush == nullptr || UCS_PTR_IS_ERR(flush)) {
    delete callback_ref;
    state->status = flush == nullptr ? UCS_OK : UCS_PTR_STATUS(flush);
    state->keep_alive.reset();
    state->done.Notify();
  }
  const bool completed = state->done.WaitForNotificationWithDeadline(deadline);

  if (!completed) {
    // The batch is abandoned; the peer is failed so no one reuses it and its
    // endpoint is force-closed when the last user lets go.
    MarkFailed();
    return absl::DeadlineExceededError(
        absl::StrCat(write ? "put" : "get", " of ", ops.size(), " blocks missed its deadline"));
  }
  if (!post_error.ok()) {
    MarkFailed();
    return post_error;
  }
  if (state->status != UCS_OK) {
    MarkFailed();
    return UcsError(write ? "put flush" : "get flush", state->status);
  }
  return absl::OkStatus();
}

}  // namespace kvstrata::transfer
