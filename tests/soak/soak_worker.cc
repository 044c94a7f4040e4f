#include "soak_worker.h"

#include <cstdio>
#include <cstring>
#include <optional>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kvstrata.pb.h"
#include "kvstrata/client/client.h"
#include "kvstrata/testing/blocks.h"

namespace kvstrata::soak {
namespace {

struct Counts {
  uint64_t ops = 0, published = 0, fetched_ok = 0, misses = 0, no_space = 0;
};

void Report(const Counts& c) {
  printf("STATS ops=%lu published=%lu fetched_ok=%lu misses=%lu no_space=%lu\n", c.ops,
         c.published, c.fetched_ok, c.misses, c.no_space);
  fflush(stdout);
}

void Error(const std::string& what, const absl::Status& status) {
  printf("ERROR %s: %s\n", what.c_str(), status.ToString().c_str());
  fflush(stdout);
}

// A node that cannot make room answers with per-block NO_SPACE, or (once
// admission control bounds a request's share of a tier) RESOURCE_EXHAUSTED.
bool IsNoSpace(const absl::Status& status) { return absl::IsResourceExhausted(status); }

}  // namespace

int RunWorker(const WorkerOptions& options) {
  client::ClientOptions client_options{.node_address = options.node_address,
                                       .timeout = absl::Seconds(60)};
  // The soak checks bytes itself: with the library's checksum check on, a
  // wrong block would be turned into a transfer failure and hidden.
  client_options.verify_checksums = false;
  auto client = client::Client::Connect(client_options);
  if (!client.ok()) {
    Error("connect", client.status());
    return 1;
  }
  auto ns = (*client)->OpenNamespace(testing::OpaqueSpec("soak", kBlockBytes, kTokensPerBlock));
  if (!ns.ok()) {
    Error("open namespace", ns.status());
    return 1;
  }
  auto buffer = (*client)->Allocate(kMaxChainBlocks * kBlockBytes);
  if (!buffer.ok()) {
    Error("allocate", buffer.status());
    return 1;
  }
  uint8_t* const data = (*buffer)->data();
  std::vector<uint8_t> expected(kBlockBytes);
  std::mt19937_64 rng(options.rng_seed);
  Counts counts;
  absl::Time next_report = absl::Now() + absl::Seconds(1);

  while (absl::Now() < options.deadline) {
    const uint64_t seed = rng() % options.universe;
    const size_t length = 1 + seed % kMaxChainBlocks;
    const std::vector<BlockKey> keys = ns->Keys(testing::Tokens(seed, length, kTokensPerBlock));
    ++counts.ops;

    auto lookup = ns->Lookup(keys);
    if (!lookup.ok()) {
      Error("lookup", lookup.status());
      continue;
    }
    // Publish what is missing about half of the time; otherwise fetch
    // whatever is there, so misses stay common.
    if (lookup->prefix_length < length && rng() % 2 == 0) {
      std::vector<client::PublishItem> items;
      for (size_t i = 0; i < length; ++i) {
        testing::FillBlock(seed, i, data + i * kBlockBytes, kBlockBytes);
        items.push_back({keys[i], i ? std::optional(keys[i - 1]) : std::nullopt, buffer->get(),
                         i * kBlockBytes});
      }
      auto published = ns->Publish(items);
      if (!published.ok()) {
        if (IsNoSpace(published.status())) {
          counts.no_space += length;
        } else {
          Error("publish", published.status());
        }
      } else {
        for (client::BlockOutcome outcome : published->outcomes) {
          if (outcome == client::BlockOutcome::kOk) {
            ++counts.published;
          } else if (outcome == client::BlockOutcome::kNoSpace) {
            ++counts.no_space;
          } else if (outcome != client::BlockOutcome::kAlreadyPresent) {
            Error("publish", absl::InternalError(client::BlockOutcomeName(outcome)));
          }
        }
      }
    }

    std::memset(data, 0, length * kBlockBytes);
    std::vector<client::FetchItem> items;
    for (size_t i = 0; i < length; ++i) items.push_back({keys[i], buffer->get(), i * kBlockBytes});
    auto fetched = ns->Fetch(items);
    if (!fetched.ok()) {
      Error("fetch", fetched.status());
      continue;
    }
    for (size_t i = 0; i < length; ++i) {
      const client::BlockOutcome outcome = fetched->outcomes[i];
      if (outcome == client::BlockOutcome::kNotFound) {
        ++counts.misses;
        continue;
      }
      if (outcome != client::BlockOutcome::kOk) {
        Error("fetch", absl::InternalError(client::BlockOutcomeName(outcome)));
        continue;
      }
      testing::FillBlock(seed, i, expected.data(), kBlockBytes);
      if (std::memcmp(expected.data(), data + i * kBlockBytes, kBlockBytes) != 0) {
        printf("WRONG seed=%lu block=%zu\n", seed, i);
        fflush(stdout);
      } else {
        ++counts.fetched_ok;
      }
    }
    // Now and then drop a chain's last block: erasing races with other
    // workers' fetches, demotions and promotions of it.
    if (rng() % 16 == 0) {
      auto deleted = ns->Delete({keys.back()});
      if (!deleted.ok()) Error("delete", deleted.status());
    }
    if (absl::Now() >= next_report) {
      Report(counts);
      next_report += absl::Seconds(1);
    }
  }
  Report(counts);
  return 0;
}

}  // namespace kvstrata::soak
