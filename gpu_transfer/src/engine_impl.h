// Internals shared by engine.cc and peer.cc.
#pragma once

#include <ucp/api/ucp.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "absl/synchronization/mutex.h"
#include "kvstrata/transfer/engine.h"

namespace kvstrata::transfer {

absl::Status UcsError(std::string_view what, ucs_status_t status);
// The transports of an endpoint's lanes, from ucp_ep_print_info (engine.cc).
std::string EndpointTransports(ucp_ep_h ep);

struct AmCallState;  // a Peer::Call waiting for its reply (active_message.cc)
class AmRequest;

class Engine::Impl {
 public:
  ~Impl();
  void StartProgressThread();
  // Wakes the progress thread so it drives operations just posted. It does
  // not spin while they are in flight: measured on 2 cores, a spinning thread
  // halves loopback TCP and CMA throughput by stealing the CPU that the kernel
  // copy needs; completions wake it through the worker's event fd.
  void Wake() { ucp_worker_signal(worker_); }

  EngineOptions options_;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  int event_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::atomic<int> closing_{0};
  std::atomic<uint64_t> next_tag_{1};
  std::thread progress_thread_;

  absl::Mutex peers_mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<Peer>> peers_ ABSL_GUARDED_BY(peers_mu_);
  // Keys of peers whose endpoint failed, until one to the same address works
  // again (EngineOptions::check_address). Bounded: cleared when full.
  absl::flat_hash_set<std::string> failed_keys_ ABSL_GUARDED_BY(peers_mu_);
  void RememberFailed(const std::string& key) ABSL_EXCLUSIVE_LOCKS_REQUIRED(peers_mu_);
  std::atomic<uint64_t> discarded_messages_{0};

  // Active messages (active_message.cc): calls waiting for their reply, by
  // call id, and the request handler (unset: requests are dropped).
  absl::Mutex calls_mu_;
  absl::flat_hash_map<uint64_t, std::shared_ptr<AmCallState>> calls_ ABSL_GUARDED_BY(calls_mu_);
  std::atomic<uint64_t> next_call_{1};
  absl::Mutex am_mu_;  // held (shared) while a handler runs; set under it
  std::function<void(std::shared_ptr<AmRequest>)> am_handler_ ABSL_GUARDED_BY(am_mu_);
  // Progresses the worker on the calling thread until `finished` is set
  // (then true) or the deadline (false), sleeping on the worker's event fd
  // and `wake_fd` when idle. A caller that progresses itself receives its
  // reply on its own thread: one thread hand-off less per call than waking
  // from the progress thread (on a loaded 2-core machine each hand-off may
  // wait a scheduler slice).
  bool ProgressUntil(const std::atomic<bool>& finished, int wake_fd, absl::Time deadline);
  // Callers inside ProgressUntil now. While there are any the progress
  // thread stands aside: two threads progressing one worker contend for its
  // lock (a UCX spinlock in THREAD_MODE_MULTI), and on 2 cores the one that
  // waits spins away the CPU the other's copy (CMA, loopback TCP) and the
  // node need (profiled: 23% of all samples in a batch-1 fetch over
  // shared memory were the client's progress thread on that lock).
  std::atomic<int> callers_progressing_{0};
  // Registers the reply handler on the worker (Create calls it).
  absl::Status StartActiveMessages();

  // Transports of endpoints requests came in on, by endpoint (bounded).
  absl::Mutex reply_transports_mu_;
  absl::flat_hash_map<const void*, std::string> reply_transports_
      ABSL_GUARDED_BY(reply_transports_mu_);

  // Removes `peer` from the cache; the caller still holds it.
  void Forget(const Peer* peer);

 private:
  void ProgressLoop();
  // Receives (into scratch memory) and drops the unexpected messages waiting.
  void DiscardUnexpected();
  // Closes the cached endpoints UCX reported failed (its error callback
  // cannot do it: it runs inside progress, with the endpoint in use), and
  // idle ones nobody holds.
  void ReapFailedPeers();
  std::vector<uint8_t> scratch_;
};

}  // namespace kvstrata::transfer
