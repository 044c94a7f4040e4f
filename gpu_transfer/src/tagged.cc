// Tagged messages: the fetch path that UCX runs fastest on TCP and shared memory.
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "engine_impl.h"
#include "kvstrata/common/log.h"

namespace kvstrata::transfer {

// Completion counts shared with UCX callbacks; outlives the batch if UCX is late.
struct ReceiveBatch::State {
  absl::Mutex mu;
  size_t outstanding ABSL_GUARDED_BY(mu) = 0;
  std::shared_ptr<void> keep_alive ABSL_GUARDED_BY(mu);
  bool interrupted ABSL_GUARDED_BY(mu) = false;
  std::vector<ucs_status_t> status ABSL_GUARDED_BY(mu);
  std::vector<size_t> received ABSL_GUARDED_BY(mu);
};

namespace {

struct ReceiveSlot {
  std::shared_ptr<ReceiveBatch::State> state;
  size_t index;
};

void OnReceiveDone(void* request, ucs_status_t status, const ucp_tag_recv_info_t* info,
                   void* user_data) {
  auto* slot = static_cast<ReceiveSlot*>(user_data);
  {
    absl::MutexLock lock(&slot->state->mu);
    slot->state->status[slot->index] = status;
    slot->state->received[slot->index] = status == UCS_OK ? info->length : 0;
    if (--slot->state->outstanding == 0) slot->state->keep_alive.reset();
  }
  delete slot;
}

struct SendState {
  absl::Mutex mu;
  size_t outstanding ABSL_GUARDED_BY(mu) = 0;
  ucs_status_t first_error ABSL_GUARDED_BY(mu) = UCS_OK;
  std::shared_ptr<void> keep_alive;
};

void OnSendDone(void* request, ucs_status_t status, void* user_data) {
  auto* ref = static_cast<std::shared_ptr<SendState>*>(user_data);
  {
    absl::MutexLock lock(&(*ref)->mu);
    if (status != UCS_OK && (*ref)->first_error == UCS_OK) (*ref)->first_error = status;
    if (--(*ref)->outstanding == 0) (*ref)->keep_alive.reset();
  }
  delete ref;
  ucp_request_free(request);
}

}  // namespace

uint64_t Engine::NextTagBase() {
  // Unique per engine; the low 16 bits are left for the op index.
  return impl_->next_tag_.fetch_add(1, std::memory_order_relaxed) << 16;
}

absl::StatusOr<std::unique_ptr<ReceiveBatch>> Engine::PostReceives(
    absl::Span<const ReceiveOp> ops, std::shared_ptr<void> keep_alive) {
  std::unique_ptr<ReceiveBatch> batch(new ReceiveBatch());
  batch->engine_ = this;
  batch->state_ = std::make_shared<ReceiveBatch::State>();
  {
    absl::MutexLock lock(&batch->state_->mu);
    batch->state_->keep_alive = std::move(keep_alive);
    batch->state_->status.assign(ops.size(), UCS_INPROGRESS);
    batch->state_->received.assign(ops.size(), 0);
  }
  batch->requests_.assign(ops.size(), nullptr);
  for (size_t i = 0; i < ops.size(); ++i) {
    auto* slot = new ReceiveSlot{batch->state_, i};
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                         UCP_OP_ATTR_FIELD_DATATYPE;
    param.datatype = ucp_dt_make_contig(1);
    param.cb.recv = OnReceiveDone;
    param.user_data = slot;
    {
      absl::MutexLock lock(&batch->state_->mu);
      ++batch->state_->outstanding;
    }
    ucs_status_ptr_t request = ucp_tag_recv_nbx(impl_->worker_, ops[i].buffer, ops[i].length,
                                                ops[i].tag, ~uint64_t{0}, &param);
    if (UCS_PTR_IS_ERR(request)) {
      delete slot;
      absl::MutexLock lock(&batch->state_->mu);
      --batch->state_->outstanding;
      batch->state_->status[i] = UCS_PTR_STATUS(request);
      continue;
    }
    batch->requests_[i] = request;  // freed by the batch
  }
  {
    absl::MutexLock lock(&batch->state_->mu);
    if (batch->state_->outstanding == 0) batch->state_->keep_alive.reset();
  }
  impl_->Wake();
  return batch;
}

absl::StatusOr<std::vector<size_t>> ReceiveBatch::Wait(const std::vector<bool>& expected,
                                                       absl::Time deadline) {
  // Cancel what will not come, so the wait below only counts real messages.
  for (size_t i = 0; i < requests_.size(); ++i) {
    if (!expected[i] && requests_[i] != nullptr) {
      ucp_request_cancel(engine_->impl_->worker_, requests_[i]);
    }
  }
  State& state = *state_;
  absl::MutexLock lock(&state.mu);
  auto all_done = [&state]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(state.mu) { return state.outstanding == 0; };
  if (!state.mu.AwaitWithDeadline(absl::Condition(&all_done), deadline)) {
    return absl::DeadlineExceededError("fetched blocks did not all arrive before the deadline");
  }
  std::vector<size_t> received(requests_.size(), 0);
  for (size_t i = 0; i < requests_.size(); ++i) {
    if (!expected[i]) continue;
    if (state.status[i] != UCS_OK) {
      return UcsError("tagged receive", state.status[i]);
    }
    received[i] = state.received[i];
  }
  return received;
}

std::optional<size_t> ReceiveBatch::WaitOne(size_t index, absl::Time deadline) {
  State& state = *state_;
  absl::MutexLock lock(&state.mu);
  auto settled = [&state, index]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(state.mu) {
    return state.interrupted || state.status[index] != UCS_INPROGRESS;
  };
  state.mu.AwaitWithDeadline(absl::Condition(&settled), deadline);
  if (state.status[index] != UCS_OK) return std::nullopt;
  return state.received[index];
}

void ReceiveBatch::Interrupt() {
  absl::MutexLock lock(&state_->mu);
  state_->interrupted = true;
}

ReceiveBatch::~ReceiveBatch() {
  Engine::Impl& impl = *engine_->impl_;
  for (void* request : requests_) {
    if (request != nullptr) ucp_request_cancel(impl.worker_, request);
  }
  {
    // A receive already matched cannot be cancelled: wait for it to finish
    // writing into the caller's buffer.
    absl::MutexLock lock(&state_->mu);
    auto all_done = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(state_->mu) {
      return state_->outstanding == 0;
    };
    if (!state_->mu.AwaitWithTimeout(absl::Condition(&all_done), absl::Seconds(30))) {
      KVS_LOG(Error) << "tagged receives still pending after 30 s";
    }
  }
  for (void* request : requests_) {
    if (request != nullptr) ucp_request_free(request);
  }
}

absl::Status Peer::Send(absl::Span<const SendOp> ops, absl::Time deadline,
                        std::shared_ptr<void> keep_alive) {
  if (failed()) return absl::UnavailableError("peer has failed");
  Engine::Impl& impl = *engine_->impl_;
  auto ep = static_cast<ucp_ep_h>(ep_);
  Touch();
  auto state = std::make_shared<SendState>();
  state->keep_alive = std::move(keep_alive);
  {
    absl::MutexLock lock(&state->mu);
    state->outstanding = 1;  // held by this call until every op is posted
  }
  impl.Wake();
  absl::Status post_error;
  for (const SendOp& op : ops) {
    auto* ref = new std::shared_ptr<SendState>(state);
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                         UCP_OP_ATTR_FIELD_DATATYPE;
    param.datatype = ucp_dt_make_contig(1);
    param.cb.send = OnSendDone;
    param.user_data = ref;
    {
      absl::MutexLock lock(&state->mu);
      ++state->outstanding;
    }
    ucs_status_ptr_t request = ucp_tag_send_nbx(ep, op.data, op.length, op.tag, &param);
    if (request == nullptr || UCS_PTR_IS_ERR(request)) {
      delete ref;
      absl::MutexLock lock(&state->mu);
      --state->outstanding;
      if (UCS_PTR_IS_ERR(request)) {
        post_error = UcsError("ucp_tag_send_nbx", UCS_PTR_STATUS(request));
        break;
      }
    }
  }
  bool completed;
  ucs_status_t status;
  {
    absl::MutexLock lock(&state->mu);
    if (--state->outstanding == 0) state->keep_alive.reset();
    auto all_done = [&state]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(state->mu) {
      return state->outstanding == 0;
    };
    completed = state->mu.AwaitWithDeadline(absl::Condition(&all_done), deadline);
    status = state->first_error;
  }
  if (!completed) {
    MarkFailed();  // force-closed when the last user lets go; that ends the sends
    return absl::DeadlineExceededError(
        absl::StrCat("send of ", ops.size(), " blocks missed its deadline"));
  }
  if (!post_error.ok()) {
    MarkFailed();
    return post_error;
  }
  if (status != UCS_OK) {
    MarkFailed();
    return UcsError("tagged send", status);
  }
  return absl::OkStatus();
}

// ---- pull: the sender's side of a node-driven transfer --------------------

struct PullServer::State {
  absl::Mutex mu;
  bool request_done ABSL_GUARDED_BY(mu) = false;  // the pull receive finished (or was cancelled)
  bool pulled ABSL_GUARDED_BY(mu) = false;        // a pull request arrived
  size_t sends_outstanding ABSL_GUARDED_BY(mu) = 0;
  ucs_status_t first_error ABSL_GUARDED_BY(mu) = UCS_OK;
  std::shared_ptr<Peer> to;
  uint64_t tag_base = 0;
  std::vector<SendOp> blocks;
  std::vector<uint8_t> request_buffer;  // u16 indices
};

namespace {

void OnPullSendDone(void* request, ucs_status_t status, void* user_data) {
  auto* ref = static_cast<std::shared_ptr<PullServer::State>*>(user_data);
  {
    absl::MutexLock lock(&(*ref)->mu);
    if (status != UCS_OK && (*ref)->first_error == UCS_OK) (*ref)->first_error = status;
    --(*ref)->sends_outstanding;
  }
  delete ref;
  ucp_request_free(request);
}

// Runs on the progress thread when the node's pull request arrives: send what it asked for.
void OnPullRequest(void* request, ucs_status_t status, const ucp_tag_recv_info_t* info,
                   void* user_data) {
  auto* ref = static_cast<std::shared_ptr<PullServer::State>*>(user_data);
  std::shared_ptr<PullServer::State> state = *ref;
  delete ref;
  absl::MutexLock lock(&state->mu);
  state->request_done = true;
  if (status != UCS_OK) {
    if (status != UCS_ERR_CANCELED) state->first_error = status;
    return;
  }
  state->pulled = true;
  const size_t count = info->length / 2;
  auto ep = static_cast<ucp_ep_h>(state->to->endpoint());
  for (size_t i = 0; i < count; ++i) {
    const uint16_t index = static_cast<uint16_t>(state->request_buffer[2 * i] |
                                                 (state->request_buffer[2 * i + 1] << 8));
    if (index >= state->blocks.size()) {
      state->first_error = UCS_ERR_INVALID_PARAM;
      continue;
    }
    const SendOp& op = state->blocks[index];
    auto* send_ref = new std::shared_ptr<PullServer::State>(state);
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                         UCP_OP_ATTR_FIELD_DATATYPE;
    param.datatype = ucp_dt_make_contig(1);
    param.cb.send = OnPullSendDone;
    param.user_data = send_ref;
    ucs_status_ptr_t sent = ucp_tag_send_nbx(ep, op.data, op.length, op.tag, &param);
    if (sent == nullptr || UCS_PTR_IS_ERR(sent)) {
      delete send_ref;
      if (UCS_PTR_IS_ERR(sent) && state->first_error == UCS_OK) state->first_error = UCS_PTR_STATUS(sent);
      continue;
    }
    ++state->sends_outstanding;
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<PullServer>> Engine::ServePull(std::shared_ptr<Peer> to,
                                                              uint64_t tag_base,
                                                              std::vector<SendOp> blocks) {
  if (to == nullptr || to->failed()) return absl::UnavailableError("peer has failed");
  if (blocks.size() >= 0xffff) return absl::InvalidArgumentError("too many blocks in one pull");
  std::unique_ptr<PullServer> server(new PullServer());
  server->engine_ = this;
  server->state_ = std::make_shared<PullServer::State>();
  PullServer::State& state = *server->state_;
  state.to = std::move(to);
  state.tag_base = tag_base;
  for (size_t i = 0; i < blocks.size(); ++i) blocks[i].tag = tag_base + i;
  state.blocks = std::move(blocks);
  state.request_buffer.resize(2 * state.blocks.size() + 2);
  auto* ref = new std::shared_ptr<PullServer::State>(server->state_);
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                       UCP_OP_ATTR_FIELD_DATATYPE;
  param.datatype = ucp_dt_make_contig(1);
  param.cb.recv = OnPullRequest;
  param.user_data = ref;
  ucs_status_ptr_t request = ucp_tag_recv_nbx(impl_->worker_, state.request_buffer.data(),
                                              state.request_buffer.size(), PullTag(tag_base),
                                              ~uint64_t{0}, &param);
  if (UCS_PTR_IS_ERR(request)) {
    delete ref;
    return UcsError("ucp_tag_recv_nbx", UCS_PTR_STATUS(request));
  }
  server->request_ = request;
  impl_->Wake();
  return server;
}

absl::Status PullServer::Wait(absl::Time deadline) {
  State& state = *state_;
  absl::MutexLock lock(&state.mu);
  auto done = [&state]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(state.mu) {
    return state.request_done && state.sends_outstanding == 0;
  };
  if (!state.mu.AwaitWithDeadline(absl::Condition(&done), deadline)) {
    return absl::DeadlineExceededError("the node did not finish pulling before the deadline");
  }
  if (state.first_error != UCS_OK) return UcsError("pulled send", state.first_error);
  if (!state.pulled) return absl::AbortedError("the node never pulled");
  return absl::OkStatus();
}

PullServer::~PullServer() {
  Engine::Impl& impl = *engine_->impl_;
  ucp_request_cancel(impl.worker_, request_);
  {
    absl::MutexLock lock(&state_->mu);
    auto done = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(state_->mu) {
      return state_->request_done && state_->sends_outstanding == 0;
    };
    if (!state_->mu.AwaitWithTimeout(absl::Condition(&done), absl::Seconds(30))) {
      KVS_LOG(Error) << "pulled sends still pending after 30 s";
    }
  }
  ucp_request_free(request_);
}

}  // namespace kvstrata::transfer
