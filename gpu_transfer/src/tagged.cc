// Tagged messages: the fetch path that UCX runs fastest on TCP and shared memory.
#include <algorithm>

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

// Tagged sends counted to completion. Shared with UCX callbacks: a group given
// up at its deadline completes later and only then releases `keep_alive`.
struct SendGroup {
  absl::Mutex mu;
  size_t outstanding ABSL_GUARDED_BY(mu) = 0;
  ucs_status_t first_error ABSL_GUARDED_BY(mu) = UCS_OK;
  std::shared_ptr<void> keep_alive ABSL_GUARDED_BY(mu);
  // IOV descriptors of gathered sends: UCX reads them until the send
  // completes, so they live as long as the group (never let go early, unlike
  // keep_alive).
  std::vector<std::unique_ptr<std::vector<ucp_dt_iov_t>>> iovs ABSL_GUARDED_BY(mu);

  void Finish(ucs_status_t status) ABSL_LOCKS_EXCLUDED(mu) {
    absl::MutexLock lock(&mu);
    if (status != UCS_OK && first_error == UCS_OK) first_error = status;
    if (--outstanding == 0) keep_alive.reset();
  }
  // Lets go of the memory before the sends complete (see Peer::Send).
  void Abandon() ABSL_LOCKS_EXCLUDED(mu) {
    absl::MutexLock lock(&mu);
    keep_alive.reset();
  }
  // OK once every send completed; the first error otherwise.
  absl::Status Wait(absl::Time deadline) ABSL_LOCKS_EXCLUDED(mu) {
    absl::MutexLock lock(&mu);
    auto all_done = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) { return outstanding == 0; };
    if (!mu.AwaitWithDeadline(absl::Condition(&all_done), deadline)) {
      return absl::DeadlineExceededError("tagged sends missed their deadline");
    }
    return first_error == UCS_OK ? absl::OkStatus() : UcsError("tagged send", first_error);
  }
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

ucp_request_param_t ContiguousParam(void* user_data) {
  ucp_request_param_t param{};
  param.op_attr_mask =
      UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_DATATYPE;
  param.datatype = ucp_dt_make_contig(1);
  param.user_data = user_data;
  return param;
}

// A receive whose message is already waiting (eager, unexpected) would
// otherwise complete inside ucp_tag_recv_nbx, return NULL and never call its
// callback, leaving its batch waiting for a completion that never comes. With
// this flag UCX always returns a request and always calls back.
ucp_request_param_t ReceiveParam(void* user_data) {
  ucp_request_param_t param = ContiguousParam(user_data);
  param.op_attr_mask |= UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
  return param;
}

void OnSendDone(void* request, ucs_status_t status, void* user_data) {
  auto* group = static_cast<std::shared_ptr<SendGroup>*>(user_data);
  (*group)->Finish(status);
  delete group;
  ucp_request_free(request);
}

// Posts one tagged send counted in `group`.
void PostTaggedSend(ucp_ep_h ep, const SendOp& op, const std::shared_ptr<SendGroup>& group) {
  {
    absl::MutexLock lock(&group->mu);
    ++group->outstanding;
  }
  auto* ref = new std::shared_ptr<SendGroup>(group);
  ucp_request_param_t param = ContiguousParam(ref);
  param.cb.send = OnSendDone;
  ucs_status_ptr_t request = ucp_tag_send_nbx(ep, op.data, op.length, op.tag, &param);
  if (request == nullptr || UCS_PTR_IS_ERR(request)) {  // done at once: no callback comes
    delete ref;
    group->Finish(request == nullptr ? UCS_OK : UCS_PTR_STATUS(request));
  }
}

// Posts one tagged message made of every part's bytes, counted in `group`.
void PostGatheredSend(ucp_ep_h ep, absl::Span<const SendOp> parts, uint64_t tag,
                      const std::shared_ptr<SendGroup>& group) {
  auto iov = std::make_unique<std::vector<ucp_dt_iov_t>>();
  iov->reserve(parts.size());
  for (const SendOp& part : parts) {
    iov->push_back({const_cast<uint8_t*>(part.data), part.length});
  }
  ucp_dt_iov_t* entries = iov->data();
  const size_t count = iov->size();
  {
    absl::MutexLock lock(&group->mu);
    ++group->outstanding;
    group->iovs.push_back(std::move(iov));
  }
  auto* ref = new std::shared_ptr<SendGroup>(group);
  ucp_request_param_t param = ContiguousParam(ref);
  param.datatype = ucp_dt_make_iov();
  param.cb.send = OnSendDone;
  ucs_status_ptr_t request = ucp_tag_send_nbx(ep, entries, count, tag, &param);
  if (request == nullptr || UCS_PTR_IS_ERR(request)) {  // done at once: no callback comes
    delete ref;
    group->Finish(request == nullptr ? UCS_OK : UCS_PTR_STATUS(request));
  }
}

// Posts `blocks` as coalesced messages of `per_message` blocks each.
void PostCoalescedSends(ucp_ep_h ep, absl::Span<const SendOp> blocks, uint64_t tag_base,
                        size_t per_message, const std::shared_ptr<SendGroup>& group) {
  per_message = std::max<size_t>(per_message, 1);
  for (size_t start = 0, message = 0; start < blocks.size(); start += per_message, ++message) {
    PostGatheredSend(ep, blocks.subspan(start, per_message), CoalescedTag(tag_base, message),
                     group);
  }
}

}  // namespace

uint64_t Engine::NextTagBase() {
  // Unique per engine; the low 16 bits are left for the op index.
  return impl_->next_tag_.fetch_add(1, std::memory_order_relaxed) << 16;
}

absl::StatusOr<std::unique_ptr<ReceiveBatch>> Engine::PostReceives(
    absl::Span<const ReceiveOp> ops, std::shared_ptr<void> keep_alive, bool buffers_in_keep_alive) {
  std::unique_ptr<ReceiveBatch> batch(new ReceiveBatch());
  batch->engine_ = this;
  batch->wait_on_destroy_ = !buffers_in_keep_alive;
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
    ucp_request_param_t param = ReceiveParam(slot);
    param.cb.recv = OnReceiveDone;
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
  auto all_done = [&state]()
                      ABSL_EXCLUSIVE_LOCKS_REQUIRED(state.mu) { return state.outstanding == 0; };
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
  if (wait_on_destroy_) {
    // A receive already matched cannot be cancelled: wait for it to finish
    // writing into the caller's buffer. (Otherwise keep_alive holds the
    // buffers until it does, and UCX frees the requests once complete.)
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
  return SendAndWait(
      [&](const std::shared_ptr<SendGroup>& group) {
        for (const SendOp& op : ops) PostTaggedSend(static_cast<ucp_ep_h>(ep_), op, group);
      },
      deadline, std::move(keep_alive));
}

absl::Status Peer::SendCoalesced(absl::Span<const SendOp> blocks, uint64_t tag_base,
                                 size_t blocks_per_message, absl::Time deadline,
                                 std::shared_ptr<void> keep_alive) {
  return SendAndWait(
      [&](const std::shared_ptr<SendGroup>& group) {
        PostCoalescedSends(static_cast<ucp_ep_h>(ep_), blocks, tag_base, blocks_per_message, group);
      },
      deadline, std::move(keep_alive));
}

absl::Status Peer::SendAndWait(const std::function<void(const std::shared_ptr<SendGroup>&)>& post,
                               absl::Time deadline, std::shared_ptr<void> keep_alive) {
  if (failed()) return absl::UnavailableError("peer has failed");
  Touch();
  auto group = std::make_shared<SendGroup>();
  {
    absl::MutexLock lock(&group->mu);
    group->keep_alive = std::move(keep_alive);
    group->outstanding = 1;  // this call's own hold, until every op is posted
  }
  post(group);
  group->Finish(UCS_OK);
  engine_->impl_->Wake();
  absl::Status status = group->Wait(deadline);
  // A send that failed or hung leaves the endpoint unusable: it is
  // force-closed when its last user lets go, which also ends hung sends.
  if (!status.ok()) MarkFailed();
  if (absl::IsDeadlineExceeded(status) && !detects_failure_) {
    // Shared memory: UCX 1.13 tracks no requests on MODE_NONE endpoints, so
    // neither the force-close nor ucp_request_cancel (receives only) ever
    // ends a rendezvous send to a peer that died; its buffers (pinned tier
    // blocks) would be held for good. They are let go now instead; only
    // UCX's request objects stay. A dead peer never reads them. A live one
    // that resumes may read whatever the memory holds then, which gives it
    // nothing it could not read anyway: CMA, the shared-memory rendezvous,
    // works only for processes allowed to ptrace the node, i.e. to read all
    // of its memory (docs/ARCHITECTURE.md: shared memory is a trust
    // boundary).
    group->Abandon();
  }
  return status;
}

// ---- pull: the sender's side of a node-driven transfer --------------------

struct PullServer::State {
  absl::Mutex mu;
  bool request_done ABSL_GUARDED_BY(mu) = false;  // the pull receive finished (or was cancelled)
  bool pulled ABSL_GUARDED_BY(mu) = false;        // a pull request arrived
  ucs_status_t request_error ABSL_GUARDED_BY(mu) = UCS_OK;
  std::shared_ptr<SendGroup> sends = std::make_shared<SendGroup>();
  std::shared_ptr<Peer> to;
  // `to`'s engine: this one, or another whose endpoint the answer goes on.
  Engine::Impl* to_engine = nullptr;
  uint64_t tag_base = 0;
  std::vector<SendOp> blocks;
  std::vector<uint8_t> request_buffer;  // u16 indices
};

namespace {

// Runs on the progress thread when the node's pull request arrives: send what it asked for.
void OnPullRequest(void* request, ucs_status_t status, const ucp_tag_recv_info_t* info,
                   void* user_data) {
  auto* ref = static_cast<std::shared_ptr<PullServer::State>*>(user_data);
  std::shared_ptr<PullServer::State> state = *ref;
  delete ref;
  absl::MutexLock lock(&state->mu);
  state->request_done = true;
  if (status != UCS_OK) {
    if (status != UCS_ERR_CANCELED) state->request_error = status;
    return;
  }
  state->pulled = true;
  const size_t count = info->length / 2;
  auto ep = static_cast<ucp_ep_h>(state->to->endpoint());
  auto u16_at = [&state](size_t i) {
    return static_cast<uint16_t>(state->request_buffer[2 * i] |
                                 (state->request_buffer[2 * i + 1] << 8));
  };
  const bool coalesced = count > 0 && u16_at(0) == kCoalescedPullMarker;
  std::vector<SendOp> parts;
  for (size_t i = coalesced ? 1 : 0; i < count; ++i) {
    const uint16_t index = u16_at(i);
    if (index >= state->blocks.size()) {
      state->request_error = UCS_ERR_INVALID_PARAM;  // a pull for a block we never offered
      continue;
    }
    if (coalesced) {
      parts.push_back(state->blocks[index]);
    } else {
      PostTaggedSend(ep, state->blocks[index], state->sends);
    }
  }
  if (coalesced && !parts.empty()) {
    PostCoalescedSends(ep, parts, state->tag_base, CoalescedBlocksPerMessage(parts[0].length),
                       state->sends);
  }
  // `to` may be another engine's endpoint (the client sends from a worker
  // the node never connects to): its progress thread may be asleep.
  state->to_engine->Wake();
}

}  // namespace

absl::StatusOr<std::unique_ptr<PullServer>> Engine::ServePull(std::shared_ptr<Peer> to,
                                                              uint64_t tag_base,
                                                              std::vector<SendOp> blocks) {
  if (to == nullptr || to->failed()) return absl::UnavailableError("peer has failed");
  // Tags from tag_base + 0x8000 are the coalesced messages' and the pull's.
  if (blocks.size() >= 0x8000) return absl::InvalidArgumentError("too many blocks in one pull");
  std::unique_ptr<PullServer> server(new PullServer());
  server->engine_ = this;
  server->state_ = std::make_shared<PullServer::State>();
  PullServer::State& state = *server->state_;
  state.to_engine = to->engine().impl_.get();
  state.to = std::move(to);
  state.tag_base = tag_base;
  for (size_t i = 0; i < blocks.size(); ++i) blocks[i].tag = tag_base + i;
  state.blocks = std::move(blocks);
  state.request_buffer.resize(2 * state.blocks.size() + 2);  // + the coalesced marker
  auto* ref = new std::shared_ptr<PullServer::State>(server->state_);
  ucp_request_param_t param = ReceiveParam(ref);
  param.cb.recv = OnPullRequest;
  ucs_status_ptr_t request =
      ucp_tag_recv_nbx(impl_->worker_, state.request_buffer.data(), state.request_buffer.size(),
                       PullTag(tag_base), ~uint64_t{0}, &param);
  if (UCS_PTR_IS_ERR(request)) {
    delete ref;
    return UcsError("ucp_tag_recv_nbx", UCS_PTR_STATUS(request));
  }
  server->request_ = request;
  impl_->Wake();
  return server;
}

// The pull request, then the sends it triggered.
absl::Status PullServer::Wait(absl::Time deadline) {
  State& state = *state_;
  {
    absl::MutexLock lock(&state.mu);
    auto arrived = [&state]()
                       ABSL_EXCLUSIVE_LOCKS_REQUIRED(state.mu) { return state.request_done; };
    if (!state.mu.AwaitWithDeadline(absl::Condition(&arrived), deadline)) {
      return absl::DeadlineExceededError("the node did not pull before the deadline");
    }
    if (state.request_error != UCS_OK) return UcsError("pull request", state.request_error);
    if (!state.pulled) return absl::AbortedError("the node never pulled");
  }
  return state.sends->Wait(deadline);
}

PullServer::~PullServer() {
  Engine::Impl& impl = *engine_->impl_;
  ucp_request_cancel(impl.worker_, request_);
  // Blocks the node is still reading must stay valid: wait (bounded) for them.
  if (absl::Status s = Wait(absl::Now() + absl::Seconds(30));
      !s.ok() && !absl::IsAborted(s) && !absl::IsUnavailable(s)) {
    KVS_LOG(Warning) << "pull ended badly: " << s;
  }
  ucp_request_free(request_);
}

}  // namespace kvstrata::transfer
