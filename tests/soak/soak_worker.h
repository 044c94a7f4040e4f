// One soak client: a child process that publishes, looks up, fetches and
// now and then deletes chains of blocks against a node until its deadline, checking every fetched
// byte against what the block's key says it must hold (testing::FillBlock of
// the chain's seed and position), independently of the library's checksums.
//
// It reports on stdout, one line per event, flushed at once so a SIGKILL
// loses at most the last second of counts:
//   STATS ops=N published=N fetched_ok=N misses=N no_space=N
//   WRONG seed=S block=I          (a fetched block held other bytes)
//   ERROR <what>: <status>        (anything but a hit, a miss or NO_SPACE)
#pragma once

#include <cstdint>
#include <string>

#include "absl/time/time.h"

namespace kvstrata::soak {

struct WorkerOptions {
  std::string node_address;
  uint64_t rng_seed = 1;
  absl::Time deadline;
  // Chains are drawn from [0, universe): shared by every worker, so one
  // worker fetches what others published.
  uint64_t universe = 2000;
};

// Runs until the deadline; returns the process exit code.
int RunWorker(const WorkerOptions& options);

// The namespace every worker uses: opaque, 64 KiB blocks of 16 tokens.
inline constexpr uint64_t kBlockBytes = 64 << 10;
inline constexpr uint32_t kTokensPerBlock = 16;
inline constexpr size_t kMaxChainBlocks = 12;

}  // namespace kvstrata::soak
