// Offline replay of request traces against eviction policies (no server).
//
// A Mooncake trace lists, per request, the hashes of its 512-token prefix
// blocks. Replaying a request: its leading blocks that are cached are hits
// (the engine skips their tokens); then every block of the request is
// accessed in order — hits refresh the policy, misses are inserted (the
// engine computed and published them), evicting the policy's victims while
// the cache is full.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "kvstrata/cachenode/eviction_policy.h"

namespace kvstrata::cachenode {

struct TraceRequest {
  double timestamp = 0;
  uint64_t input_length = 0;  // prompt tokens
  uint64_t output_length = 0;
  std::vector<uint64_t> hash_ids;  // one per 512-token block, in prefix order
  // output_length as a request-finished hint carries it (32 bits, saturated).
  uint32_t output_tokens() const {
    return static_cast<uint32_t>(std::min<uint64_t>(output_length, UINT32_MAX));
  }
};

// Reads a Mooncake-format trace: JSON lines with timestamp, input_length,
// output_length and hash_ids.
absl::StatusOr<std::vector<TraceRequest>> LoadMooncakeTrace(const std::string& path);
// One line of such a trace; INVALID_ARGUMENT when it is not a request.
absl::StatusOr<TraceRequest> ParseMooncakeRequest(std::string_view line);
size_t DistinctBlocks(const std::vector<TraceRequest>& trace);

struct ReplayResult {
  uint64_t hit_tokens = 0;      // prompt tokens covered by the cached prefix
  uint64_t total_tokens = 0;
  uint64_t prefix_hit_blocks = 0;
  uint64_t total_blocks = 0;
  uint64_t access_hits = 0;     // every access that found its block (not only prefixes)
  uint64_t operations = 0;      // policy calls
  double seconds = 0;           // CPU time the replaying thread spent
  double token_hit_rate() const {
    return total_tokens ? static_cast<double>(hit_tokens) / total_tokens : 0;
  }
  double block_hit_rate() const {
    return total_blocks ? static_cast<double>(prefix_hit_blocks) / total_blocks : 0;
  }
};

inline constexpr uint64_t kTraceTokensPerBlock = 512;

struct ReplayOptions {
  // Each request's EvictionPolicy::OnRequestFinished hint reaches the policy
  // when the trace's clock (its timestamps, in ms) passes the request's
  // timestamp + output_length x this: an engine learns the output length
  // when decoding ends, not when the prompt's blocks are stored. Hints due
  // at one moment arrive in that order, before the next request. Negative:
  // no hints.
  double decode_ms_per_token = 50;
  // Called after each request is replayed, with its index (tests look at a
  // policy's state part-way through a trace).
  std::function<void(size_t request)> after_request;
};

ReplayResult Replay(const std::vector<TraceRequest>& trace, size_t capacity_blocks,
                    EvictionPolicy& policy, const ReplayOptions& options = {});

// Belady's offline optimum for the same replay: on a miss with a full cache,
// evict the cached block whose next access is farthest (or skip caching the
// new block when its own next access is farther still). Optimal for
// access_hits; for prefix hits it is the classic yardstick, not a proven
// bound, since keeping a block only pays while its whole prefix is kept too.
ReplayResult ReplayBelady(const std::vector<TraceRequest>& trace, size_t capacity_blocks);

// The same replay over `nodes` caches of `capacity_per_node` blocks each, as
// the cluster client places blocks: block i of a request goes to the node
// chosen by rendezvous hashing of a placement key, the key of block
// i - i % `group` of the same request (group 1: each block by its own key,
// as Cluster does today; larger groups keep runs of a conversation on one
// node). A request's hits are its leading blocks cached on their nodes; its
// finished-hint goes to the node of its last block.
struct ClusterReplayResult {
  ReplayResult total;
  std::vector<uint64_t> accesses;  // per node
  // Most accesses on one node over the mean: 1 is perfectly even.
  double load_spread() const;
};
absl::StatusOr<ClusterReplayResult> ReplayCluster(const std::vector<TraceRequest>& trace,
                                                  size_t nodes, size_t capacity_per_node,
                                                  std::string_view policy, size_t group,
                                                  const ReplayOptions& options = {});

// Precision tiers: a tier of `capacity_raw_blocks` raw blocks' worth of
// bytes where a block the policy gives up is first transcoded one step down
// `ladder` (each step a coarser stored format, smaller by its byte ratio) and
// kept, with a fresh lease on its place (as a compressed tier takes what the
// raw one lets go); only a block at `coarsest` is evicted. A hit is served at
// the block's current format; transcoding is lossy, so a hit does not bring
// precision back (a republish would). coarsest = 0 is the plain replay.
//
// How many leases a block gets at each rung (a lease: the policy gives it a
// fresh place, OnKept, and it stays until the policy names it again):
enum class PrecisionLease {
  // One per rung: with LRU a block spends as long raw as at each coarser
  // format, so raw blocks hold most of the bytes (1 of the 1.81 byte-leases
  // a block costs on raw > fp8 > int4).
  kFresh,
  // round(raw bytes / stored bytes) at each rung (raw 1, fp8 2, int4 3,
  // int2 5), all of them again after a hit: every rung holds a block for
  // about the byte x time of one raw lease, so a coarser copy stays as much
  // longer as it is smaller. Follows from the formats' byte ratios alone.
  kByBytes,
};
struct PrecisionLadder {
  std::vector<std::string> formats;      // raw first, coarser after
  std::vector<double> bytes;             // stored bytes per block, raw = 1
  std::vector<double> attention_error;   // relative error of attention outputs when served
};
// The formats of kernels/ with kernels/README.md's captured-KV figures
// (quant_eval): raw, fp8_e4m3 (2x, 0.026), int4_kivi (3.2x, 0.077),
// int2_kivi (5.33x, 0.408).
PrecisionLadder KernelFormatsLadder();
struct PrecisionReplayResult {
  ReplayResult total;
  std::vector<uint64_t> hit_blocks;  // prefix-hit blocks served per format
  uint64_t transcodes = 0;
  // Mean attention-output error over the prefix-hit blocks, by their formats.
  double mean_error(const PrecisionLadder& ladder) const;
};
absl::StatusOr<PrecisionReplayResult> ReplayPrecision(const std::vector<TraceRequest>& trace,
                                                      double capacity_raw_blocks,
                                                      std::string_view policy,
                                                      const PrecisionLadder& ladder,
                                                      size_t coarsest,
                                                      const ReplayOptions& options = {},
                                                      PrecisionLease lease = PrecisionLease::kFresh);

// One policy at one capacity, beside LRU and Belady replayed in the same run.
struct PolicyComparison {
  std::string policy;
  size_t capacity_blocks = 0;
  ReplayResult result, lru, belady;
  // (policy - LRU) / (Belady - LRU) in token hit rate; 0 when Belady = LRU.
  double gap_closed() const;
  // Policy time per policy call over LRU's, both measured here.
  double cost_vs_lru() const;
};

// Replays every named policy at every capacity (in blocks). Each policy and
// its LRU baseline are replayed `repeats` times, alternating, and keep their
// fastest time: hit counts are deterministic, timings on a shared machine not.
absl::StatusOr<std::vector<PolicyComparison>> ComparePolicies(
    const std::vector<TraceRequest>& trace, const std::vector<size_t>& capacities_blocks,
    const std::vector<std::string>& policies, int repeats = 3, const ReplayOptions& options = {});

// The comparisons as a table, one line per policy and capacity.
std::string FormatComparisons(const std::vector<PolicyComparison>& rows, size_t distinct_blocks);

}  // namespace kvstrata::cachenode
