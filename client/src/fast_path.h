// The client's side of the fast path (docs/ARCHITECTURE.md §3): a small
// Fetch or Publish as one UCX active message to the node and one back.
#pragma once

#include <optional>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client_impl.h"
#include "kvstrata/client/client.h"

namespace kvstrata::client {

// What a fast-path call came to. `result` is empty when the fast path did
// not apply or failed with time to spare: the caller then uses gRPC.
// `grpc_items` lists the fetch items the node holds on NVMe only (their
// outcomes in `result` are placeholders): the caller fetches those over gRPC.
struct FastOutcome {
  std::optional<absl::StatusOr<TransferResult>> result;
  std::vector<size_t> grpc_items;
};

FastOutcome FastFetch(Client::Impl& impl, uint64_t namespace_id, uint64_t block_bytes,
                      absl::Span<const FetchItem> items, absl::Time deadline);
// A Lookup of up to kMaxBlocks keys: the result, or empty (use gRPC).
std::optional<absl::StatusOr<LookupResult>> FastLookup(Client::Impl& impl, uint64_t namespace_id,
                                                       uint64_t block_bytes,
                                                       absl::Span<const BlockKey> keys,
                                                       absl::Time deadline);
// `max_blocks`: the node's per-request reservation limit (OpenNamespace's
// max_publish_blocks); larger publishes go over gRPC, which splits them.
FastOutcome FastPublish(Client::Impl& impl, uint64_t namespace_id, uint64_t block_bytes,
                        absl::Span<const PublishItem> items, size_t max_blocks,
                        absl::Time deadline);

}  // namespace kvstrata::client
