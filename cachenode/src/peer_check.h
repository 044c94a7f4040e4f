// Sandboxed check of a client's UCX worker address.
//
// A client names the UCX worker the node should transfer with, and UCX 1.13
// trusts that address: ucp_ep_create dereferences whatever a malformed one
// says (random or bit-flipped addresses crashed the node in tests). So before
// the node connects to an address it has not seen, a child process — this
// same binary, run as `kvstrata-node --check_ucx_peer=<hex>` — connects to it
// first. If the child crashes or hangs, the address is refused; the node never
// touches it. A good address costs one child process, once per client, and
// once more each time the node reconnects after an endpoint to it failed: the
// child also finds out whether the client still answers, because UCX 1.13
// leaks one socket for every endpoint it fails to create to a dead peer, and
// a node that connected to every client killed mid-request ran out of fds.
#pragma once

#include <cstdint>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace kvstrata::cachenode {

class PeerAddressChecker {
 public:
  // `transports`: the node's UCX transports, so the child parses the address
  // exactly as the node would.
  PeerAddressChecker(std::string transports, absl::Duration timeout);

  // OK when UCX can take the address without crashing and its worker
  // answers; UNAVAILABLE when it does not answer (or the check timed out
  // once); INVALID_ARGUMENT when the address crashes, hangs or is refused by
  // UCX. Verdicts are cached unless `failed_before` (the last endpoint to the
  // address failed, so the peer may be gone).
  absl::Status Check(const std::string& worker_address, bool same_host, bool failed_before);

 private:
  const std::string transports_;
  const absl::Duration timeout_;
  absl::Mutex mu_;
  absl::CondVar slot_freed_;
  int running_ ABSL_GUARDED_BY(mu_) = 0;  // children at work, bounded
  absl::flat_hash_set<uint64_t> good_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<uint64_t> bad_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, int> hung_ ABSL_GUARDED_BY(mu_);  // checks timed out, per address
};

// The child's side: `argv` holds --check_ucx_peer=<hex>, --check_same_host=0|1
// and --ucx_transports=...; returns the exit code (0: UCX took the address
// and its worker answered, 3: it did not answer, 4: UCX refused it).
int RunPeerCheck(int argc, char** argv);
bool IsPeerCheckInvocation(int argc, char** argv);

}  // namespace kvstrata::cachenode
