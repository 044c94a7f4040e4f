#include <poll.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "engine_impl.h"
#include "kvstrata/common/log.h"

namespace kvstrata::transfer {
namespace {

// Empty progress rounds before sleeping on the event fd. Kept tiny on
// purpose: on 2 cores any CPU a spinner takes is taken from the kernel copy or
// the peer; at 1 MiB x 32 fetches, 100 rounds gave 2.1x (TCP) and 1.6x (CMA)
// the throughput of 20000 (bench/transfer_bench; the sweep is in
// docs/ARCHITECTURE.md).
constexpr int kSpinRoundsBeforeSleep = 100;
constexpr int kSleepTimeoutMs = 100;
// How often a progress thread standing aside for a caller looks again. A
// caller that leaves with operations in flight leaves them at most this long
// (plus a timer slack) before the progress thread takes them up.
constexpr absl::Duration kStandAside = absl::Microseconds(100);
// An endpoint nobody holds and unused this long is closed (peers reconnect
// transparently, paying one wire-up of a few ms). A client that died without
// UCX noticing (no traffic reaches its closed socket) is only ever found
// this way: 5 minutes left the soak's node with 65 dead clients' sockets.
constexpr absl::Duration kPeerIdleTimeout = absl::Seconds(30);
// How often the progress thread closes endpoints UCX reported failed, or
// idle ones.
constexpr absl::Duration kReapInterval = absl::Seconds(1);
// Addresses remembered as failed (EngineOptions::check_address): a few
// hundred bytes each; more than any node sees die between two reconnects.
constexpr size_t kMaxFailedKeys = 4096;
// Stray messages land here and are dropped. Larger ones are received
// truncated (UCX then ends the sender's request with an error); the size
// only bounds the copy, not what a sender can send.
constexpr size_t kDiscardScratchBytes = 64 << 10;
// Busy progress rounds between two looks for stray messages, so a flood of
// them is drained even while the worker never goes idle.
constexpr int kBusyRoundsPerDiscard = 64;

// TCP settings: UCX's defaults target RDMA fabrics. 1 MiB segments and 4 MiB
// socket buffers measured best for tagged 1 MiB blocks on loopback (256K:
// 2.0 GB/s, 1M: 2.3, 4M: 2.2; bench/transfer_bench).
constexpr std::pair<const char*, const char*> kTcpTuning[] = {
    {"TCP_TX_SEG_SIZE", "1M"},
    {"TCP_RX_SEG_SIZE", "1M"},
    {"TCP_SNDBUF", "4M"},
    {"TCP_RCVBUF", "4M"},
};

}  // namespace

absl::Status UcsError(std::string_view what, ucs_status_t status) {
  std::string message =
      absl::StrCat(absl::string_view(what.data(), what.size()), ": ", ucs_status_string(status));
  switch (status) {
    case UCS_ERR_TIMED_OUT:
      return absl::DeadlineExceededError(message);
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_ENDPOINT_TIMEOUT:
    case UCS_ERR_CANCELED:
    case UCS_ERR_REJECTED:
    case UCS_ERR_NOT_CONNECTED:
      return absl::UnavailableError(message);
    case UCS_ERR_INVALID_PARAM:
    case UCS_ERR_INVALID_ADDR:
      return absl::InvalidArgumentError(message);
    case UCS_ERR_NO_MEMORY:
    case UCS_ERR_EXCEEDS_LIMIT:
      return absl::ResourceExhaustedError(message);
    default:
      return absl::InternalError(message);
  }
}

Engine::Impl::~Impl() {
  stop_.store(true);
  if (worker_ != nullptr) ucp_worker_signal(worker_);
  if (progress_thread_.joinable()) progress_thread_.join();
  if (worker_ != nullptr) {
    // Let endpoint closes finish; bounded so a wedged peer cannot hang shutdown.
    for (int i = 0; i < 1000000 && closing_.load() > 0; ++i) ucp_worker_progress(worker_);
    ucp_worker_destroy(worker_);
  }
  if (context_ != nullptr) ucp_cleanup(context_);
}

void Engine::Impl::StartProgressThread() {
  progress_thread_ = std::thread([this] { ProgressLoop(); });
}

static void OnDiscarded(void* request, ucs_status_t, const ucp_tag_recv_info_t*, void*) {
  ucp_request_free(request);
}

void Engine::Impl::DiscardUnexpected() {
  for (int i = 0; i < 64; ++i) {
    ucp_tag_recv_info_t info{};
    ucp_tag_message_h message = ucp_tag_probe_nb(worker_, 0, 0, /*remove=*/1, &info);
    if (message == nullptr) return;
    ucp_request_param_t param{};
    param.op_attr_mask =
        UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_DATATYPE | UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
    param.datatype = ucp_dt_make_contig(1);
    param.cb.recv = OnDiscarded;
    // Every stray message shares the scratch buffer: its bytes are never read.
    ucs_status_ptr_t request =
        ucp_tag_msg_recv_nbx(worker_, scratch_.data(), scratch_.size(), message, &param);
    if (UCS_PTR_IS_ERR(request)) {
      KVS_LOG(Warning) << "cannot drop a stray UCX message: "
                       << ucs_status_string(UCS_PTR_STATUS(request));
    }
    discarded_messages_.fetch_add(1, std::memory_order_relaxed);
  }
}

void Engine::Impl::RememberFailed(const std::string& key) {
  if (failed_keys_.size() >= kMaxFailedKeys) failed_keys_.clear();
  failed_keys_.insert(key);
}

void Engine::Impl::ReapFailedPeers() {
  std::vector<std::shared_ptr<Peer>> dead;
  {
    absl::MutexLock lock(&peers_mu_);
    for (auto it = peers_.begin(); it != peers_.end();) {
      if (it->second.use_count() == 1 &&
          (it->second->failed() || it->second->IdleLongerThan(kPeerIdleTimeout))) {
        if (it->second->failed()) RememberFailed(it->first);
        dead.push_back(std::move(it->second));
        peers_.erase(it++);
      } else {
        ++it;
      }
    }
  }
  // Destroyed here, outside the lock: each force-closes its endpoint.
}

void Engine::Impl::Forget(const Peer* peer) {
  std::shared_ptr<Peer> held;
  absl::MutexLock lock(&peers_mu_);
  for (auto it = peers_.begin(); it != peers_.end(); ++it) {
    if (it->second.get() == peer) {
      RememberFailed(it->first);
      held = std::move(it->second);
      peers_.erase(it);
      break;
    }
  }
}

void Engine::Impl::ProgressLoop() {
  int idle_rounds = 0;
  int busy_rounds = 0;
  const bool discard = options_.discard_unexpected_messages;
  if (discard) scratch_.resize(kDiscardScratchBytes);
  absl::Time next_reap = absl::Now() + kReapInterval;
  while (!stop_.load(std::memory_order_acquire)) {
    if (callers_progressing_.load(std::memory_order_acquire) > 0) {
      // A caller progresses the worker now (ProgressUntil): stand aside
      // rather than contend for the worker's lock. Polled, not woken: a
      // wake-up from every leaving caller cost more than the spinning did.
      absl::SleepFor(kStandAside);
      idle_rounds = 0;
      if (absl::Now() >= next_reap) {
        ReapFailedPeers();
        next_reap = absl::Now() + kReapInterval;
      }
      continue;
    }
    if (ucp_worker_progress(worker_) != 0) {
      idle_rounds = 0;
      if (discard && ++busy_rounds >= kBusyRoundsPerDiscard) {
        busy_rounds = 0;
        DiscardUnexpected();
      }
      continue;
    }
    if (++idle_rounds < kSpinRoundsBeforeSleep) {
      continue;
    }
    if (discard) DiscardUnexpected();
    if (absl::Now() >= next_reap) {
      ReapFailedPeers();
      next_reap = absl::Now() + kReapInterval;
    }
    ucs_status_t status = ucp_worker_arm(worker_);
    if (status == UCS_ERR_BUSY) {
      idle_rounds = 0;
      continue;
    }
    pollfd fd{.fd = event_fd_, .events = POLLIN, .revents = 0};
    poll(&fd, 1, kSleepTimeoutMs);
    idle_rounds = 0;
  }
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const EngineOptions& options) {
  std::unique_ptr<Engine> engine(new Engine());
  engine->impl_ = std::make_unique<Impl>();
  Impl& impl = *engine->impl_;
  impl.options_ = options;

  ucp_config_t* config = nullptr;
  ucs_status_t status = ucp_config_read(nullptr, nullptr, &config);
  if (status != UCS_OK) return UcsError("ucp_config_read", status);
  if (!options.transports.empty()) {
    status = ucp_config_modify(config, "TLS", options.transports.c_str());
    if (status != UCS_OK) {
      ucp_config_release(config);
      return UcsError(absl::StrCat("UCX transports '", options.transports, "'"), status);
    }
  }
  if (!options.net_devices.empty()) {
    status = ucp_config_modify(config, "NET_DEVICES", options.net_devices.c_str());
    if (status != UCS_OK) {
      ucp_config_release(config);
      return UcsError(absl::StrCat("UCX network devices '", options.net_devices, "'"), status);
    }
  }
  const char* tls_env = std::getenv("UCX_TLS");
  const std::string tls =
      !options.transports.empty() ? options.transports : (tls_env ? tls_env : "all");
  auto names = [&tls](std::initializer_list<const char*> any) {
    for (const char* name : any) {
      if (tls.find(name) != std::string::npos) return true;
    }
    return false;
  };
  const bool may_use_tcp = names({"tcp", "all", "^"});
  engine->shared_memory_enabled_ = names({"sm", "shm", "posix", "sysv", "cma", "all", "^"});
  if (options.tune_tcp && may_use_tcp) {
    // UCX 1.13 applies ucp_config_modify() only to UCP's own table, not to
    // transport settings, which it reads from the environment when the worker
    // opens its interfaces. So the tuning goes there, never overriding a value
    // the operator set.
    for (const auto& [name, value] : kTcpTuning) {
      setenv(absl::StrCat("UCX_", name).c_str(), value, /*overwrite=*/0);
    }
  }

  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
  params.features = UCP_FEATURE_RMA | UCP_FEATURE_TAG | UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  params.mt_workers_shared = 0;
  status = ucp_init(&params, config, &impl.context_);
  ucp_config_release(config);
  if (status != UCS_OK) return UcsError("ucp_init", status);

  ucp_worker_params_t worker_params{};
  worker_params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  worker_params.thread_mode = UCS_THREAD_MODE_MULTI;
  status = ucp_worker_create(impl.context_, &worker_params, &impl.worker_);
  if (status != UCS_OK) return UcsError("ucp_worker_create", status);

  ucp_worker_attr_t attr{};
  attr.field_mask = UCP_WORKER_ATTR_FIELD_THREAD_MODE | UCP_WORKER_ATTR_FIELD_ADDRESS |
                    UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER;
  status = ucp_worker_query(impl.worker_, &attr);
  if (status != UCS_OK) return UcsError("ucp_worker_query", status);
  if (attr.thread_mode != UCS_THREAD_MODE_MULTI) {
    ucp_worker_release_address(impl.worker_, attr.address);
    return absl::FailedPreconditionError("this UCX build has no multi-thread support");
  }
  engine->worker_address_.assign(reinterpret_cast<const char*>(attr.address), attr.address_length);
  ucp_worker_release_address(impl.worker_, attr.address);
  engine->max_am_header_bytes_ = attr.max_am_header;
  if (absl::Status am = impl.StartActiveMessages(); !am.ok()) return am;

  status = ucp_worker_get_efd(impl.worker_, &impl.event_fd_);
  if (status != UCS_OK) return UcsError("ucp_worker_get_efd", status);
  impl.StartProgressThread();
  return engine;
}

Engine::~Engine() {
  if (impl_ == nullptr) return;
  ClosePeers();
  impl_.reset();
}

void Engine::ClosePeers() {
  {
    absl::MutexLock lock(&impl_->peers_mu_);
    impl_->peers_.clear();  // closes endpoints not held elsewhere
  }
  // Force-closing fails what was still in flight, which releases its memory.
  const absl::Time give_up = absl::Now() + absl::Seconds(5);
  while (impl_->closing_.load() > 0 && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(1));
}

absl::StatusOr<std::unique_ptr<MemoryRegion>> Engine::Register(void* addr, size_t length) {
  if (addr == nullptr || length == 0) {
    return absl::InvalidArgumentError("cannot register an empty or null range");
  }
  ucp_mem_map_params_t params{};
  params.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                      UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
  params.address = addr;
  params.length = length;
  params.memory_type = UCS_MEMORY_TYPE_HOST;
  ucp_mem_h memh = nullptr;
  ucs_status_t status = ucp_mem_map(impl_->context_, &params, &memh);
  if (status != UCS_OK) return UcsError("ucp_mem_map", status);

  std::unique_ptr<MemoryRegion> region(new MemoryRegion());
  region->context_ = impl_->context_;
  region->memh_ = memh;
  region->base_ = addr;
  region->length_ = length;
  void* rkey_buffer = nullptr;
  size_t rkey_size = 0;
  status = ucp_rkey_pack(impl_->context_, memh, &rkey_buffer, &rkey_size);
  if (status != UCS_OK) return UcsError("ucp_rkey_pack", status);
  region->packed_rkey_.assign(static_cast<const char*>(rkey_buffer), rkey_size);
  ucp_rkey_buffer_release(rkey_buffer);
  return region;
}

absl::StatusOr<std::unique_ptr<MemoryRegion>> Engine::Allocate(size_t length) {
  if (length == 0) return absl::InvalidArgumentError("cannot allocate 0 bytes");
  void* addr = mmap(nullptr, length, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (addr == MAP_FAILED) {
    return absl::ResourceExhaustedError(
        absl::StrCat("mmap of ", length, " bytes: ", strerror(errno)));
  }
  madvise(addr, length, MADV_HUGEPAGE);
  auto region = Register(addr, length);
  if (!region.ok()) {
    munmap(addr, length);
    return region.status();
  }
  (*region)->owns_mapping_ = true;
  return region;
}

MemoryRegion::~MemoryRegion() {
  if (memh_ != nullptr)
    ucp_mem_unmap(static_cast<ucp_context_h>(context_), static_cast<ucp_mem_h>(memh_));
  if (owns_mapping_) munmap(base_, length_);
}

namespace {

void OnPeerError(void* arg, ucp_ep_h /*ep*/, ucs_status_t status) {
  auto* peer_failed = static_cast<std::atomic<bool>*>(arg);
  peer_failed->store(true, std::memory_order_release);
  KVS_LOG(Warning) << "UCX endpoint failed: " << ucs_status_string(status);
}

// Reads the transports of an endpoint's RMA lanes from ucp_ep_print_info, the
// only place UCX 1.13 reports them ("lane[1]:  3:tcp/lo.0 ... rma_bw#0").
std::string RmaTransports(ucp_ep_h ep) {
  char* text = nullptr;
  size_t size = 0;
  FILE* stream = open_memstream(&text, &size);
  if (stream == nullptr) return "unknown";
  ucp_ep_print_info(ep, stream);
  fclose(stream);
  std::vector<std::string> found;
  std::vector<std::string> any_lane;
  for (absl::string_view line : absl::StrSplit(absl::string_view(text, size), '\n')) {
    if (line.find("lane[") == absl::string_view::npos) continue;
    size_t colon = line.find(':', line.find(']'));
    if (colon == absl::string_view::npos) continue;
    size_t start = line.find(':', colon + 1);
    size_t slash = line.find('/', start);
    if (start == absl::string_view::npos || slash == absl::string_view::npos) continue;
    std::string tl(line.substr(start + 1, slash - start - 1));
    auto& into = line.find("rma") != absl::string_view::npos ? found : any_lane;
    if (std::find(into.begin(), into.end(), tl) == into.end()) into.push_back(tl);
  }
  free(text);
  if (found.empty()) found = any_lane;
  return found.empty() ? "unknown" : absl::StrJoin(found, ",");
}

}  // namespace

std::string EndpointTransports(ucp_ep_h ep) { return RmaTransports(ep); }

absl::StatusOr<std::shared_ptr<Peer>> Engine::Connect(std::string_view worker_address,
                                                      bool same_host, absl::Time deadline) {
  if (worker_address.empty()) return absl::InvalidArgumentError("empty UCX worker address");
  // Sending to our own worker would park every message in our own unexpected
  // queue (or satisfy receives meant for someone else's data).
  if (worker_address == worker_address_) {
    return absl::InvalidArgumentError("a UCX worker address names this process itself");
  }
  std::string key(worker_address);
  key.push_back(same_host ? 'L' : 'R');
  bool failed_before = false;
  {
    absl::MutexLock lock(&impl_->peers_mu_);
    if (auto it = impl_->peers_.find(key); it != impl_->peers_.end() && !it->second->failed()) {
      it->second->Touch();
      return it->second;
    }
    // Drop failed peers, and idle ones nobody holds (a dead peer on shared
    // memory is never reported failed), so endpoints do not accumulate; each
    // closes once its last user is done.
    absl::erase_if(impl_->peers_, [&](const auto& kv) {
      if (kv.second->failed()) {
        impl_->RememberFailed(kv.first);
        return true;
      }
      return kv.second.use_count() == 1 && kv.second->IdleLongerThan(kPeerIdleTimeout);
    });
    failed_before = impl_->failed_keys_.contains(key);
    if (const size_t max = impl_->options_.max_peers; max > 0 && impl_->peers_.size() >= max) {
      // Full: close the longest-idle endpoint nobody is using, if any.
      auto oldest = impl_->peers_.end();
      for (auto it = impl_->peers_.begin(); it != impl_->peers_.end(); ++it) {
        if (it->second.use_count() != 1) continue;
        if (oldest == impl_->peers_.end() ||
            it->second->last_used_ns_.load(std::memory_order_relaxed) <
                oldest->second->last_used_ns_.load(std::memory_order_relaxed)) {
          oldest = it;
        }
      }
      if (oldest == impl_->peers_.end()) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "all ", max, " UCX endpoints are in use; try again when a transfer has ended"));
      }
      impl_->peers_.erase(oldest);
    }
  }

  if (impl_->options_.check_address) {
    if (absl::Status vetted =
            impl_->options_.check_address(std::string(worker_address), same_host, failed_before);
        !vetted.ok()) {
      return vetted;
    }
  }
  // Connect outside the lock: wire-up with a slow or bogus peer must not
  // stall everyone else.
  std::shared_ptr<Peer> peer(new Peer());
  peer->engine_ = this;
  peer->Touch();
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                      UCP_EP_PARAM_FIELD_ERR_HANDLER;
  // ucp_ep_create takes no address length: a truncated address from a peer
  // would be read past its end. Zero padding keeps any over-read in our buffer.
  std::string padded(worker_address);
  padded.resize(worker_address.size() + 4096, '\0');
  params.address = reinterpret_cast<const ucp_address_t*>(padded.data());
  // Shared memory cannot detect a dead peer (UCX 1.13), so it needs
  // UCP_ERR_HANDLING_MODE_NONE; that mode is unsafe on TCP (UCX crashes in the
  // TCP progress path), so it is used only when both sides allow shared memory.
  const bool engine_shm = shared_memory_enabled_;
  params.err_mode =
      (same_host && engine_shm) ? UCP_ERR_HANDLING_MODE_NONE : UCP_ERR_HANDLING_MODE_PEER;
  peer->detects_failure_ = params.err_mode == UCP_ERR_HANDLING_MODE_PEER;
  params.err_handler.cb = OnPeerError;
  params.err_handler.arg = &peer->failed_;
  ucp_ep_h ep = nullptr;
  ucs_status_t status = ucp_ep_create(impl_->worker_, &params, &ep);
  if (status != UCS_OK) return UcsError("ucp_ep_create", status);
  peer->ep_ = ep;
  // Wire-up finishes asynchronously; until it has, UCX emulates RMA over active
  // messages. A flush waits for it, proves the peer answers, and lets us read
  // the lanes UCX really chose.
  if (absl::Status flushed = peer->Flush(deadline); !flushed.ok()) {
    return absl::UnavailableError(absl::StrCat("UCX peer does not answer: ", flushed.message()));
  }
  peer->transport_ = RmaTransports(ep);
  KVS_LOG(Debug) << "UCX endpoint to a new " << (same_host ? "local" : "remote") << " peer uses "
                 << peer->transport_;
  absl::MutexLock lock(&impl_->peers_mu_);
  impl_->failed_keys_.erase(key);
  auto [it, inserted] = impl_->peers_.try_emplace(std::move(key), peer);
  if (!inserted) {
    if (!it->second->failed()) return it->second;  // another request connected first
    it->second = peer;
  }
  return peer;
}

const std::string& Engine::HostId() {
  static const std::string kHostId = [] {
    char host[256] = {};
    gethostname(host, sizeof(host) - 1);
    std::string boot_id;
    std::ifstream("/proc/sys/kernel/random/boot_id") >> boot_id;
    return absl::StrCat(host, "/", boot_id);
  }();
  return kHostId;
}

uint64_t Engine::discarded_messages() const {
  return impl_->discarded_messages_.load(std::memory_order_relaxed);
}

std::vector<std::string> Engine::ActiveTransports() {
  std::vector<std::string> out;
  absl::MutexLock lock(&impl_->peers_mu_);
  for (const auto& [address, peer] : impl_->peers_) {
    if (peer->failed()) continue;
    if (std::find(out.begin(), out.end(), peer->transport()) == out.end()) {
      out.push_back(peer->transport());
    }
  }
  return out;
}

}  // namespace kvstrata::transfer
