// The harness hbm_bench, device_bench and coalesce_bench share: two or more
// "sides" (a client, its namespace and buffers) take turns, round by round,
// timing one publish of fresh blocks and one fetch of a fixed set each, so
// that every side sees the same machine (on a shared machine whose load
// swings within a minute, interleaving is what makes their ratio mean
// something).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kvstrata/client/client.h"

namespace kvstrata::bench {

// Block keys no run has used (a random start, then counting up).
class FreshKeys {
 public:
  explicit FreshKeys(uint64_t start) : counter_(start) {}
  BlockKey Next();

 private:
  uint64_t counter_;
};

// One client under measurement.
struct Side {
  const char* name = "";  // prefixes its errors when not empty
  std::unique_ptr<client::Client> client;
  std::optional<client::Namespace> ns;
  size_t batch = 0;                          // blocks per call
  std::unique_ptr<client::Buffer> src, dst;  // a batch of blocks each
  std::vector<BlockKey> fetch_keys;          // published once, fetched every round
  std::vector<double> publish_us, fetch_us;  // one sample per timed round
};

// The `fraction` quantile of `samples` (nearest rank below).
double Percentile(std::vector<double> samples, double fraction);

// Opens a namespace of `block_bytes` blocks (tenant "bench", model `model`)
// on side.client and allocates side.src and side.dst, `batch` blocks each,
// as `kind` memory (side.batch).
absl::Status OpenSide(Side& side, const std::string& model, uint64_t block_bytes, size_t batch,
                      client::MemoryKind kind = client::MemoryKind::kHost);

// Publishes side.src's batch under fresh keys, which become side.fetch_keys;
// every block must be stored.
absl::Status PublishFetchSet(Side& side, FreshKeys& keys);

// One round trip on `side`: publishes side.src's batch under fresh keys,
// then fetches side.fetch_keys into side.dst, each call timed; every block
// must come back kOk and `verify` (when given) pass; then the published
// blocks are deleted, so the node holds only the fetch sets. The two times
// are appended to side.publish_us and side.fetch_us when `record`.
absl::Status TimedRoundTrip(Side& side, FreshKeys& keys, bool record,
                            const std::function<absl::Status()>& verify = nullptr);

// DataLoss unless side.dst holds side.src's bytes (host buffers only).
absl::Status SameHostBytes(const Side& side);

// Rounds 0 to `rounds` (round 0 is the warm-up, for `turn` not to record),
// each side's `turn` once per round, round r starting with side r % n so
// that no side always goes first.
absl::Status TakeTurns(absl::Span<Side> sides, int rounds,
                       absl::FunctionRef<absl::Status(Side&, int round)> turn);

}  // namespace kvstrata::bench
