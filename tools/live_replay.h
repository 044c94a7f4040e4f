// `kvstrata replay --live`: a Mooncake trace replayed against a running node
// through the client, as an inference engine would use the cache.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kvstrata/cachenode/replay.h"
#include "kvstrata/client/client.h"
#include "kvstrata/client/cluster.h"

namespace kvstrata::tools {

struct LiveReplayOptions {
  // Arrival i is issued at start + timestamp_i * time_scale (trace timestamps
  // are milliseconds); 0 issues requests back to back. A late request goes
  // at once: requests are sequential, one client, one at a time.
  double time_scale = 0;
  // After each request, send RequestFinished for its last block with the
  // trace's output_length, as an engine's connector does when the request
  // ends. False leaves the node's policies without the hint (to compare).
  bool hints = true;
};

struct LatencySummary {
  size_t count = 0;
  double p50_us = 0;
  double p99_us = 0;
};

struct LiveReplayResult {
  uint64_t requests = 0;
  uint64_t hit_tokens = 0;  // tokens of the prefix fetched intact
  uint64_t total_tokens = 0;
  uint64_t hit_blocks = 0;
  uint64_t total_blocks = 0;
  uint64_t published_blocks = 0;
  uint64_t lookup_fetch_mismatches = 0;  // looked-up blocks gone by the fetch
  uint64_t hints = 0;          // RequestFinished hints sent and answered
  uint64_t hints_known = 0;    // ... for a block the node held
  uint64_t hint_failures = 0;  // hints that failed (counted, never fatal: a hint is optional)
  LatencySummary lookup, fetch, publish, hint;
  double seconds = 0;
  double token_hit_rate() const {
    return total_tokens ? static_cast<double>(hit_tokens) / total_tokens : 0;
  }
  double block_hit_rate() const {
    return total_blocks ? static_cast<double>(hit_blocks) / total_blocks : 0;
  }
};

// Per request: Lookup of its blocks' keys (one key per trace hash, chained by
// parent), Fetch of the found prefix, Publish of the blocks after the prefix
// that was fetched, then (with options.hints) RequestFinished for its last
// block. Block bytes are derived from the key so fetches verify.
absl::StatusOr<LiveReplayResult> LiveReplay(client::Client& client, client::Namespace& ns,
                                            const std::vector<cachenode::TraceRequest>& trace,
                                            const LiveReplayOptions& options);
// The same through a cluster: each call fans out to the blocks' owners.
absl::StatusOr<LiveReplayResult> LiveReplay(client::Cluster& cluster, client::ClusterNamespace& ns,
                                            const std::vector<cachenode::TraceRequest>& trace,
                                            const LiveReplayOptions& options);

// The trace hash as a block key (the hashes already name whole prefixes).
BlockKey TraceKey(uint64_t hash);

}  // namespace kvstrata::tools
