#include "round_trip.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kvstrata.pb.h"

namespace kvstrata::bench {
namespace {

absl::Status Failed(const Side& side, const char* what) {
  return absl::DataLossError(*side.name == '\0' ? what : absl::StrCat(side.name, ": ", what));
}

std::vector<client::PublishItem> FreshItems(const Side& side, FreshKeys& keys,
                                            std::vector<BlockKey>& published) {
  const uint64_t size = side.ns->block_bytes();
  std::vector<client::PublishItem> items;
  for (size_t i = 0; i < side.batch; ++i) {
    published.push_back(keys.Next());
    items.push_back({published.back(), std::nullopt, side.src.get(), i * size});
  }
  return items;
}

}  // namespace

BlockKey FreshKeys::Next() {
  BlockKey key;
  const uint64_t n = ++counter_;
  std::memcpy(key.bytes.data(), &n, 8);
  std::memcpy(key.bytes.data() + 8, &counter_, 8);
  return key;
}

double Percentile(std::vector<double> samples, double fraction) {
  std::sort(samples.begin(), samples.end());
  return samples[static_cast<size_t>(fraction * static_cast<double>(samples.size() - 1))];
}

absl::Status OpenSide(Side& side, const std::string& model, uint64_t block_bytes, size_t batch,
                      client::MemoryKind kind) {
  v1::NamespaceSpec spec;
  spec.set_tenant("bench");
  spec.set_model(model);
  spec.set_block_bytes(block_bytes);
  auto ns = side.client->OpenNamespace(spec);
  if (!ns.ok()) return ns.status();
  side.ns = *ns;
  auto src = side.client->Allocate(block_bytes * batch, kind);
  auto dst = side.client->Allocate(block_bytes * batch, kind);
  if (!src.ok()) return src.status();
  if (!dst.ok()) return dst.status();
  side.src = *std::move(src);
  side.dst = *std::move(dst);
  side.batch = batch;
  return absl::OkStatus();
}

absl::Status PublishFetchSet(Side& side, FreshKeys& keys) {
  const std::vector<client::PublishItem> items = FreshItems(side, keys, side.fetch_keys);
  auto published = side.ns->Publish(items);
  if (!published.ok()) return published.status();
  if (published->count(client::BlockOutcome::kOk) != items.size()) {
    return absl::InternalError("setup publish");
  }
  return absl::OkStatus();
}

absl::Status TimedRoundTrip(Side& side, FreshKeys& keys, bool record,
                            const std::function<absl::Status()>& verify) {
  const uint64_t size = side.ns->block_bytes();
  std::vector<BlockKey> published_keys;
  const std::vector<client::PublishItem> items = FreshItems(side, keys, published_keys);
  std::vector<client::FetchItem> fetch;
  for (size_t i = 0; i < side.fetch_keys.size(); ++i) {
    fetch.push_back({side.fetch_keys[i], side.dst.get(), i * size});
  }
  const auto t0 = std::chrono::steady_clock::now();
  auto published = side.ns->Publish(items);
  const auto t1 = std::chrono::steady_clock::now();
  auto fetched = side.ns->Fetch(fetch);
  const auto t2 = std::chrono::steady_clock::now();
  if (!published.ok()) return published.status();
  if (!fetched.ok()) return fetched.status();
  if (published->count(client::BlockOutcome::kOk) != items.size() ||
      fetched->count(client::BlockOutcome::kOk) != fetch.size()) {
    return Failed(side, "a block did not round-trip");
  }
  if (verify) {
    if (absl::Status s = verify(); !s.ok()) return s;
  }
  if (auto deleted = side.ns->Delete(published_keys); !deleted.ok()) return deleted.status();
  if (!record) return absl::OkStatus();
  side.publish_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  side.fetch_us.push_back(std::chrono::duration<double, std::micro>(t2 - t1).count());
  return absl::OkStatus();
}

absl::Status SameHostBytes(const Side& side) {
  if (std::memcmp(side.src->data(), side.dst->data(), side.batch * side.ns->block_bytes()) != 0) {
    return Failed(side, "a block did not round-trip");
  }
  return absl::OkStatus();
}

absl::Status TakeTurns(absl::Span<Side> sides, int rounds,
                       absl::FunctionRef<absl::Status(Side&, int round)> turn) {
  for (int round = 0; round <= rounds; ++round) {
    for (size_t k = 0; k < sides.size(); ++k) {
      if (absl::Status s = turn(sides[(k + round) % sides.size()], round); !s.ok()) return s;
    }
  }
  return absl::OkStatus();
}

}  // namespace kvstrata::bench
