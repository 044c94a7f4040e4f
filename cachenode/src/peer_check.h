// Sandboxed check of a client's UCX worker address.
//
// A client names the UCX worker the node should transfer with, and UCX 1.13
// trusts that address: ucp_ep_create dereferences whatever a malformed one
// says (random or bit-flipped addresses crashed the node in tests). So before
// the node connects to an address it has not seen, a child process — this
// same binary, run as `kvstrata-node --check_ucx_peer=<hex>` — connects to it
// first. If the child crashes or hangs, the address is refused; the node never
// touches it. A good address costs one child process, once per client.
#pragma once

#include <cstdint>
#include <string>

#include "absl/base/thread_annotations.h"
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

  // OK when UCX can take the address without crashing; INVALID_ARGUMENT when not.
  absl::Status Check(const std::string& worker_address, bool same_host);

 private:
  const std::string transports_;
  const absl::Duration timeout_;
  absl::Mutex mu_;
  absl::CondVar slot_freed_;
  int running_ ABSL_GUARDED_BY(mu_) = 0;  // children at work, bounded
  absl::flat_hash_set<uint64_t> good_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<uint64_t> bad_ ABSL_GUARDED_BY(mu_);
};

// The child's side: `argv` holds --check_ucx_peer=<hex>, --check_same_host=0|1
// and --ucx_transports=...; returns the exit code (0: UCX took the address).
int RunPeerCheck(int argc, char** argv);
bool IsPeerCheckInvocation(int argc, char** argv);

}  // namespace kvstrata::cachenode
