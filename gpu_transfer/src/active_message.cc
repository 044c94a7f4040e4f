// Requests and replies over UCX active messages (active_message.h).
//
// Framing: every message's active-message header is a u64 call id (little
// endian) followed by the caller's header. Requests go with
// UCP_AM_SEND_FLAG_REPLY so the server answers on the endpoint the request
// came in on; it needs no address of the client and creates no endpoint.
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <cstring>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "engine_impl.h"
#include "kvstrata/common/log.h"
#include "kvstrata/transfer/active_message.h"

namespace kvstrata::transfer {

constexpr unsigned kRequestAmId = 0x4b56;  // "KV"
constexpr unsigned kReplyAmId = 0x4b57;
constexpr size_t kCallIdBytes = sizeof(uint64_t);
// Empty progress rounds a caller spins before sleeping on the worker's event
// fd (as the progress thread does: on 2 cores a spinner takes the CPU the
// node needs).
constexpr int kCallSpinRounds = 100;

// A Peer::Call in flight. Shared with UCX callbacks: a call given up at its
// deadline is completed (or dropped) later, and only then freed.
struct AmCallState {
  AmCallState() : wake_fd(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {}
  ~AmCallState() {
    if (wake_fd >= 0) close(wake_fd);
  }
  // Set once the call is over (sent, and replied or failed); the caller
  // polls it between rounds of progress.
  std::atomic<bool> finished{false};
  // Written when `finished` is set, so a caller asleep in poll wakes even
  // when another thread's progress ran the callback.
  const int wake_fd;
  absl::Mutex mu;
  bool sent ABSL_GUARDED_BY(mu) = false;
  bool replied ABSL_GUARDED_BY(mu) = false;
  ucs_status_t send_status ABSL_GUARDED_BY(mu) = UCS_OK;
  ucs_status_t reply_status ABSL_GUARDED_BY(mu) = UCS_OK;
  AmReply reply;  // written before `replied` is set
  // What UCX reads until the send completes.
  std::string frame;
  std::vector<ucp_dt_iov_t> iov;
  std::unique_ptr<uint8_t[]> gathered;  // the data in one piece, when gathered
  // The caller's memory for the reply's data (AmCallSpec::reply_into).
  uint8_t* sink = nullptr;
  size_t sink_capacity = 0;
  bool abandoned ABSL_GUARDED_BY(mu) = false;     // the caller gave up: never write to sink
  bool sink_writing ABSL_GUARDED_BY(mu) = false;  // the reply's data goes to sink
};

namespace {

// Marks the call over once it was sent and replied to (or its send failed).
void MaybeFinish(AmCallState& state) ABSL_EXCLUSIVE_LOCKS_REQUIRED(state.mu) {
  if (!state.sent || (!state.replied && state.send_status == UCS_OK)) return;
  if (state.finished.exchange(true)) return;
  if (state.wake_fd >= 0) {
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t n = write(state.wake_fd, &one, sizeof(one));
  }
}

void FinishSend(AmCallState& state, ucs_status_t status) {
  absl::MutexLock lock(&state.mu);
  state.sent = true;
  state.send_status = status;
  MaybeFinish(state);
}

void OnCallSent(void* request, ucs_status_t status, void* user_data) {
  auto* state = static_cast<std::shared_ptr<AmCallState>*>(user_data);
  FinishSend(**state, status);
  delete state;
  ucp_request_free(request);
}

void FinishReply(const std::shared_ptr<AmCallState>& state, ucs_status_t status) {
  absl::MutexLock lock(&state->mu);
  state->reply_status = status;
  state->replied = true;
  MaybeFinish(*state);
}

void OnReplyData(void* request, ucs_status_t status, size_t, void* user_data) {
  auto* state = static_cast<std::shared_ptr<AmCallState>*>(user_data);
  FinishReply(*state, status);
  delete state;
  ucp_request_free(request);
}

// A reply on the client: find its call, copy (eager) or receive (rendezvous)
// its data into memory the call owns.
ucs_status_t OnReply(void* arg, const void* header, size_t header_length, void* data, size_t length,
                     const ucp_am_recv_param_t* param) {
  auto* impl = static_cast<Engine::Impl*>(arg);
  if (header_length < kCallIdBytes) return UCS_OK;  // not ours: dropped
  uint64_t id;
  std::memcpy(&id, header, sizeof(id));
  std::shared_ptr<AmCallState> state;
  {
    absl::MutexLock lock(&impl->calls_mu_);
    auto it = impl->calls_.find(id);
    if (it == impl->calls_.end()) return UCS_OK;  // late (given up) or stray
    state = std::move(it->second);
    impl->calls_.erase(it);
  }
  state->reply.header.assign(static_cast<const char*>(header) + kCallIdBytes,
                             header_length - kCallIdBytes);
  state->reply.data_length = length;
  uint8_t* into = nullptr;
  if (length > 0 && state->sink != nullptr && length == state->sink_capacity) {
    // Decided under the call's lock, against a caller giving up at once.
    absl::MutexLock lock(&state->mu);
    if (!state->abandoned) {
      state->sink_writing = true;
      state->reply.data_in_place = true;
      into = state->sink;
    }
  }
  if (length > 0 && into == nullptr) {
    state->reply.data.reset(new uint8_t[length]);
    into = state->reply.data.get();
  }
  if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) == 0) {
    if (length > 0) std::memcpy(into, data, length);
    FinishReply(state, UCS_OK);
    return UCS_OK;
  }
  auto* ref = new std::shared_ptr<AmCallState>(state);
  ucp_request_param_t recv{};
  recv.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                      UCP_OP_ATTR_FIELD_DATATYPE;
  recv.datatype = ucp_dt_make_contig(1);
  recv.cb.recv_am = OnReplyData;
  recv.user_data = ref;
  ucs_status_ptr_t request =
      ucp_am_recv_data_nbx(impl->worker_, data, into, length, &recv);
  if (request == nullptr || UCS_PTR_IS_ERR(request)) {  // done at once: no callback comes
    delete ref;
    FinishReply(state, request == nullptr ? UCS_OK : UCS_PTR_STATUS(request));
  }
  return UCS_OK;  // the receive owns the descriptor now
}

// One request on the server.
class IncomingRequest final : public AmRequest {
 public:
  IncomingRequest(Engine::Impl* impl, uint64_t id, const void* header, size_t header_length,
                  void* data, size_t length, ucp_ep_h reply_ep, bool rendezvous)
      : impl_(impl),
        id_(id),
        header_(static_cast<const char*>(header), header_length),
        data_(data),
        length_(length),
        reply_ep_(reply_ep),
        rendezvous_(rendezvous) {}

  std::string_view header() const override { return header_; }
  size_t data_length() const override { return length_; }
  const uint8_t* eager_data() const override {
    return rendezvous_ || in_handler_ == false ? nullptr : static_cast<const uint8_t*>(data_);
  }

  std::optional<absl::Status> ReceiveData(uint8_t* into,
                                          std::function<void(absl::Status)> done) override {
    if (!rendezvous_ || data_ == nullptr || !in_handler_) {
      return absl::FailedPreconditionError("no rendezvous data to receive");
    }
    void* descriptor = data_;
    data_ = nullptr;
    auto* callback = new std::function<void(absl::Status)>(std::move(done));
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                         UCP_OP_ATTR_FIELD_DATATYPE;
    param.datatype = ucp_dt_make_contig(1);
    param.cb.recv_am = [](void* request, ucs_status_t status, size_t, void* user_data) {
      auto* cb = static_cast<std::function<void(absl::Status)>*>(user_data);
      (*cb)(status == UCS_OK ? absl::OkStatus() : UcsError("active-message data", status));
      delete cb;
      ucp_request_free(request);
    };
    param.user_data = callback;
    ucs_status_ptr_t request =
        ucp_am_recv_data_nbx(impl_->worker_, descriptor, into, length_, &param);
    if (request != nullptr && !UCS_PTR_IS_ERR(request)) return std::nullopt;  // `done` runs later
    delete callback;  // over at once: UCX calls no callback
    return request == nullptr ? absl::OkStatus()
                              : UcsError("active-message data", UCS_PTR_STATUS(request));
  }

  void Reply(std::string header, const uint8_t* data, size_t length,
             std::shared_ptr<void> keep_alive) override {
    if (replied_ || reply_ep_ == nullptr) return;
    replied_ = true;
    struct Pending {
      std::string frame;
      std::shared_ptr<void> keep_alive;
    };
    auto* pending = new Pending{std::string(kCallIdBytes, '\0'), std::move(keep_alive)};
    std::memcpy(pending->frame.data(), &id_, sizeof(id_));
    pending->frame.append(header);
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                         UCP_OP_ATTR_FIELD_DATATYPE;
    param.datatype = ucp_dt_make_contig(1);
    param.cb.send = [](void* request, ucs_status_t status, void* user_data) {
      delete static_cast<Pending*>(user_data);
      ucp_request_free(request);
    };
    param.user_data = pending;
    ucs_status_ptr_t request = ucp_am_send_nbx(reply_ep_, kReplyAmId, pending->frame.data(),
                                               pending->frame.size(), data, length, &param);
    if (request == nullptr || UCS_PTR_IS_ERR(request)) {
    if (UCS_PTR_IS_ERR(request)) {
        KVS_LOG(Warning) << "active-message reply failed: "
                         << ucs_status_string(UCS_PTR_STATUS(request));
      }
      delete pending;
    }
  }

  std::string transport() const override {
    absl::MutexLock lock(&impl_->reply_transports_mu_);
    auto it = impl_->reply_transports_.find(reply_ep_);
    if (it != impl_->reply_transports_.end()) return it->second;
    // An endpoint's address may be reused once UCX frees it: the cache is
    // only a label, and bounded.
    if (impl_->reply_transports_.size() >= 4096) impl_->reply_transports_.clear();
    return impl_->reply_transports_[reply_ep_] = EndpointTransports(reply_ep_);
  }

  void EndHandler() { in_handler_ = false; }

 private:
  Engine::Impl* const impl_;
  const uint64_t id_;
  const std::string header_;
  void* data_;  // eager bytes, or the rendezvous descriptor until received
  const size_t length_;
  // Valid while UCX keeps the endpoint the request came in on: a reply sent
  // from a later callback (a rendezvous receive that completed) goes to a
  // client whose endpoint was live a moment before.
  ucp_ep_h const reply_ep_;
  const bool rendezvous_;
  bool in_handler_ = true;
  bool replied_ = false;
};

ucs_status_t OnRequest(void* arg, const void* header, size_t header_length, void* data,
                       size_t length, const ucp_am_recv_param_t* param) {
  auto* impl = static_cast<Engine::Impl*>(arg);
  const bool rendezvous = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
  ucp_ep_h reply_ep =
      (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) != 0 ? param->reply_ep : nullptr;
  // Without a call id or an endpoint to answer on, nobody waits for an
  // answer: drop it (a rendezvous's data then never moves).
  absl::ReaderMutexLock lock(&impl->am_mu_);
  if (header_length < kCallIdBytes || reply_ep == nullptr || !impl->am_handler_) return UCS_OK;
  uint64_t id;
  std::memcpy(&id, header, sizeof(id));
  auto request = std::make_shared<IncomingRequest>(
      impl, id, static_cast<const char*>(header) + kCallIdBytes, header_length - kCallIdBytes,
      data, length, reply_ep, rendezvous);
  impl->am_handler_(request);
  request->EndHandler();
  return UCS_OK;  // eager data is not kept; rendezvous data not asked for is dropped unmoved
}

ucs_status_t SetHandler(ucp_worker_h worker, unsigned id, ucp_am_recv_callback_t cb, void* arg) {
  ucp_am_handler_param_t param{};
  param.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                     UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
  param.id = id;
  param.cb = cb;
  param.arg = arg;
  param.flags = UCP_AM_FLAG_WHOLE_MSG;
  return ucp_worker_set_am_recv_handler(worker, &param);
}

}  // namespace

bool Engine::Impl::ProgressUntil(const std::atomic<bool>& finished, int wake_fd,
                                 absl::Time deadline) {
  callers_progressing_.fetch_add(1, std::memory_order_acq_rel);
  absl::Cleanup leave = [this] { callers_progressing_.fetch_sub(1, std::memory_order_acq_rel); };
  int idle_rounds = 0;
  while (!finished.load(std::memory_order_acquire)) {
    const absl::Time now = absl::Now();
    if (now >= deadline) return false;
    if (ucp_worker_progress(worker_) != 0) {
      idle_rounds = 0;
      continue;
    }
    if (++idle_rounds < kCallSpinRounds) continue;
    idle_rounds = 0;
    if (ucp_worker_arm(worker_) == UCS_ERR_BUSY) continue;
    if (finished.load(std::memory_order_acquire)) break;
    pollfd fds[2] = {{.fd = event_fd_, .events = POLLIN, .revents = 0},
                     {.fd = wake_fd, .events = POLLIN, .revents = 0}};
    const int64_t left_ms = absl::ToInt64Milliseconds(deadline - now) + 1;
    poll(fds, wake_fd >= 0 ? 2 : 1, static_cast<int>(std::min<int64_t>(left_ms, 100)));
  }
  return true;
}

absl::Status Engine::Impl::StartActiveMessages() {
  ucs_status_t status = SetHandler(worker_, kReplyAmId, OnReply, this);
  if (status != UCS_OK) return UcsError("ucp_worker_set_am_recv_handler", status);
  return absl::OkStatus();
}

void ServeActiveMessages(Engine& engine, AmHandler handler) {
  Engine::Impl& impl = *engine.impl_;
  {
    absl::MutexLock lock(&impl.am_mu_);  // waits for a handler running now
    impl.am_handler_ = std::move(handler);
  }
  ucs_status_t status = SetHandler(impl.worker_, kRequestAmId, OnRequest, &impl);
  if (status != UCS_OK) {
    KVS_LOG(Error) << "cannot serve active messages: " << ucs_status_string(status);
  }
}

absl::StatusOr<AmReply> Peer::Call(std::string_view header, absl::Span<const SendOp> data,
                                   absl::Time deadline) {
  AmCallSpec spec{std::string(header), std::vector<SendOp>(data.begin(), data.end())};
  return std::move(CallMany({&spec, 1}, deadline).front());
}

std::vector<absl::StatusOr<AmReply>> Peer::CallMany(absl::Span<const AmCallSpec> calls,
                                                    absl::Time deadline) {
  std::vector<absl::StatusOr<AmReply>> out;
  if (failed()) {
    out.assign(calls.size(), absl::UnavailableError("peer has failed"));
    return out;
  }
  Engine::Impl& impl = *engine_->impl_;
  Touch();
  std::vector<std::shared_ptr<AmCallState>> states(calls.size());
  std::vector<uint64_t> ids(calls.size(), 0);
  for (size_t c = 0; c < calls.size(); ++c) {
    const std::string& header = calls[c].header;
    if (header.size() + kCallIdBytes > engine_->max_am_header_bytes()) continue;
    auto state = std::make_shared<AmCallState>();
    state->sink = calls[c].reply_into;
    state->sink_capacity = calls[c].reply_capacity;
    states[c] = state;
    const uint64_t id = impl.next_call_.fetch_add(1, std::memory_order_relaxed);
    ids[c] = id;
    state->frame.resize(kCallIdBytes);
    std::memcpy(state->frame.data(), &id, sizeof(id));
    state->frame.append(header);
    size_t length = 0;
    for (const SendOp& op : calls[c].data) {
      length += op.length;
      // Adjacent parts (blocks back to back in one buffer) go as one.
      if (!state->iov.empty() &&
          static_cast<uint8_t*>(state->iov.back().buffer) + state->iov.back().length == op.data) {
        state->iov.back().length += op.length;
      } else {
        state->iov.push_back({const_cast<uint8_t*>(op.data), op.length});
      }
    }
    if (state->iov.size() > 1 && !detects_failure_) {
      // Shared memory: an IOV message over 8 KiB goes by rendezvous, and such
      // messages stalled ~4 ms in most calls in UCX 1.13 (coalesce_bench),
      // where one contiguous message is one CMA copy. Gathering costs one
      // memcpy of a few hundred KiB at most.
      state->gathered.reset(new uint8_t[length]);
      size_t offset = 0;
      for (const ucp_dt_iov_t& part : state->iov) {
        std::memcpy(state->gathered.get() + offset, part.buffer, part.length);
        offset += part.length;
      }
      state->iov.assign(1, ucp_dt_iov_t{state->gathered.get(), length});
    }
    {
      absl::MutexLock lock(&impl.calls_mu_);
      impl.calls_[id] = state;
    }
    auto* ref = new std::shared_ptr<AmCallState>(state);
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                         UCP_OP_ATTR_FIELD_DATATYPE | UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_AM_SEND_FLAG_REPLY;
    param.cb.send = OnCallSent;
    param.user_data = ref;
    const void* buffer = nullptr;
    size_t count = 0;
    if (state->iov.size() == 1) {
      param.datatype = ucp_dt_make_contig(1);
      buffer = state->iov[0].buffer;
      count = length;
    } else if (!state->iov.empty()) {
      param.datatype = ucp_dt_make_iov();
      buffer = state->iov.data();
      count = state->iov.size();
    } else {
      param.datatype = ucp_dt_make_contig(1);
    }
    ucs_status_ptr_t request = ucp_am_send_nbx(static_cast<ucp_ep_h>(ep_), kRequestAmId,
                                               state->frame.data(), state->frame.size(), buffer,
                                               count, &param);
    if (request == nullptr || UCS_PTR_IS_ERR(request)) {  // done at once: no callback comes
      delete ref;
      FinishSend(*state, request == nullptr ? UCS_OK : UCS_PTR_STATUS(request));
    }
  }
  bool failed_any = false;
  for (size_t c = 0; c < calls.size(); ++c) {
    const std::shared_ptr<AmCallState>& state = states[c];
    if (state == nullptr) {
      out.push_back(absl::InvalidArgumentError(absl::StrCat(
          "an active-message header of ", calls[c].header.size(),
          " bytes is over this worker's limit of ", engine_->max_am_header_bytes())));
      continue;
    }
    // The calls progress together; waiting for each in turn waits for all.
    const bool done = impl.ProgressUntil(state->finished, state->wake_fd, deadline);
    ucs_status_t send_status, reply_status;
    {
      absl::MutexLock lock(&state->mu);
      send_status = state->send_status;
      reply_status = state->reply_status;
    }
    if (!done || send_status != UCS_OK) {
      {
        absl::MutexLock lock(&impl.calls_mu_);
        impl.calls_.erase(ids[c]);
      }
      bool writing;
      {
        absl::MutexLock lock(&state->mu);
        state->abandoned = true;
        writing = state->sink_writing && !state->replied;
      }
      if (writing && !impl.ProgressUntil(state->finished, state->wake_fd,
                                         absl::Now() + absl::Seconds(30))) {
        KVS_LOG(Error) << "an active-message reply still writing into the caller's memory after 30 s";
      }
      failed_any = true;
      if (!done) {
        out.push_back(absl::DeadlineExceededError("active-message request missed its deadline"));
      } else {
        out.push_back(UcsError("active-message request", send_status));
      }
      continue;
    }
    if (reply_status != UCS_OK) {
      out.push_back(UcsError("active-message reply", reply_status));
      continue;
    }
    out.push_back(std::move(state->reply));
  }
  // As for every transfer: an endpoint that failed or missed a deadline is
  // not trusted again; it is force-closed once its last user lets go.
  if (failed_any) MarkFailed();
  return out;
}

}  // namespace kvstrata::transfer
