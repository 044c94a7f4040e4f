#include "live_replay.h"

#include <algorithm>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace kvstrata::tools {
namespace {

LatencySummary Summarize(std::vector<double>& micros) {
  LatencySummary s;
  s.count = micros.size();
  if (micros.empty()) return s;
  std::sort(micros.begin(), micros.end());
  s.p50_us = micros[micros.size() / 2];
  s.p99_us = micros[std::min(micros.size() - 1, micros.size() * 99 / 100)];
  return s;
}

double Micros(absl::Time since) { return absl::ToDoubleMicroseconds(absl::Now() - since); }

// Cheap deterministic bytes per key: the node stores a checksum and the
// client verifies fetches against it, so any content exercises the path.
void Fill(uint64_t hash, uint8_t* data, size_t size) {
  uint64_t state = hash * 0x9E3779B97F4A7C15ULL + 1;
  for (size_t i = 0; i + 8 <= size; i += 8) {
    std::memcpy(data + i, &state, 8);
    state += 0xD1B54A32D192ED03ULL;
  }
}

// The replay over one node (Client, Namespace) or a cluster (Cluster,
// ClusterNamespace): both allocate registered memory and offer the same
// namespace calls.
template <typename Memory, typename Space>
absl::StatusOr<LiveReplayResult> Run(Memory& memory, Space& ns,
                                     const std::vector<cachenode::TraceRequest>& trace,
                                     const LiveReplayOptions& options) {
  size_t longest = 1;
  for (const auto& request : trace) longest = std::max(longest, request.hash_ids.size());
  const uint64_t block_bytes = ns.block_bytes();
  absl::StatusOr<std::unique_ptr<client::Buffer>> buffer = memory.Allocate(longest * block_bytes);
  if (!buffer.ok()) return buffer.status();

  LiveReplayResult result;
  std::vector<double> lookups, fetches, publishes, hints;
  const absl::Time start = absl::Now();
  const double first_timestamp = trace.empty() ? 0 : trace.front().timestamp;
  for (const cachenode::TraceRequest& request : trace) {
    if (options.time_scale > 0) {
      const absl::Time due =
          start + absl::Milliseconds((request.timestamp - first_timestamp) * options.time_scale);
      const absl::Duration wait = due - absl::Now();
      if (wait > absl::ZeroDuration()) absl::SleepFor(wait);
    }
    std::vector<BlockKey> keys;
    keys.reserve(request.hash_ids.size());
    for (uint64_t hash : request.hash_ids) keys.push_back(TraceKey(hash));

    absl::Time t = absl::Now();
    absl::StatusOr<client::LookupResult> found = ns.Lookup(keys);
    lookups.push_back(Micros(t));
    if (!found.ok()) return found.status();

    size_t prefix = 0;  // blocks actually fetched, in order from the first
    if (found->prefix_length > 0) {
      std::vector<client::FetchItem> items;
      for (size_t b = 0; b < found->prefix_length; ++b)
        items.push_back({keys[b], buffer->get(), b * block_bytes});
      t = absl::Now();
      absl::StatusOr<client::TransferResult> fetched = ns.Fetch(items);
      fetches.push_back(Micros(t));
      if (!fetched.ok()) return fetched.status();
      while (prefix < items.size() && fetched->outcomes[prefix] == client::BlockOutcome::kOk)
        ++prefix;
      if (prefix < items.size()) ++result.lookup_fetch_mismatches;
    }

    // The engine computed the rest of the prompt: publish it.
    if (prefix < keys.size()) {
      std::vector<client::PublishItem> items;
      for (size_t b = prefix; b < keys.size(); ++b) {
        Fill(request.hash_ids[b], (*buffer)->data() + b * block_bytes, block_bytes);
        items.push_back({keys[b], b > 0 ? std::optional<BlockKey>(keys[b - 1]) : std::nullopt,
                         buffer->get(), b * block_bytes});
      }
      t = absl::Now();
      absl::StatusOr<client::TransferResult> published = ns.Publish(items);
      publishes.push_back(Micros(t));
      if (!published.ok()) return published.status();
      result.published_blocks += published->count(client::BlockOutcome::kOk);
    }

    // The engine generated the output and the request ended.
    if (options.hints && !keys.empty()) {
      t = absl::Now();
      absl::StatusOr<bool> known = ns.RequestFinished(keys.back(), request.output_tokens());
      hints.push_back(Micros(t));
      if (known.ok()) {
        ++result.hints;
        result.hints_known += *known ? 1 : 0;
      } else {
        ++result.hint_failures;
      }
    }

    ++result.requests;
    result.hit_blocks += prefix;
    result.total_blocks += keys.size();
    result.hit_tokens +=
        std::min<uint64_t>(prefix * cachenode::kTraceTokensPerBlock, request.input_length);
    result.total_tokens += request.input_length;
  }
  result.seconds = absl::ToDoubleSeconds(absl::Now() - start);
  result.lookup = Summarize(lookups);
  result.fetch = Summarize(fetches);
  result.publish = Summarize(publishes);
  result.hint = Summarize(hints);
  return result;
}

}  // namespace

BlockKey TraceKey(uint64_t hash) {
  BlockKey key;
  std::memcpy(key.bytes.data(), &hash, sizeof(hash));
  return key;
}

absl::StatusOr<LiveReplayResult> LiveReplay(client::Client& client, client::Namespace& ns,
                                            const std::vector<cachenode::TraceRequest>& trace,
                                            const LiveReplayOptions& options) {
  return Run(client, ns, trace, options);
}

absl::StatusOr<LiveReplayResult> LiveReplay(client::Cluster& cluster, client::ClusterNamespace& ns,
                                            const std::vector<cachenode::TraceRequest>& trace,
                                            const LiveReplayOptions& options) {
  return Run(cluster, ns, trace, options);
}

}  // namespace kvstrata::tools
