// coalesce_bench: coalesced tagged transfers (a call's small blocks in a few
// UCX messages) against one message per block, on one node, calls of the two
// kinds alternating round by round, so both see the same machine. On a
// shared 2-core machine whose load swings by 2-5x within a minute, this
// interleaving is what makes the ratio mean something; transfer_bench's
// tagged and tagged_per_block lines run minutes apart.
//
//   coalesce_bench                          # UCX_TLS decides the transport
//   UCX_TLS=sm coalesce_bench --rounds=300
//   coalesce_bench --quick                  # the ctest smoke version
//
// Per (block size, batch): p10 and p50 microseconds per publish and per fetch
// call, both ways, and per-block / coalesced (over 1: coalescing is faster).
// The client coalesces blocks up to 16 KiB (client.cc); larger sizes are
// measured to show why (both ways are then the same path unless the node
// allows more).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "kvstrata.pb.h"
#include "kvstrata/client/client.h"
#include "kvstrata/testing/process.h"

#ifndef KVSTRATA_NODE_BINARY
#define KVSTRATA_NODE_BINARY "kvstrata-node"
#endif

ABSL_FLAG(std::vector<std::string>, block_sizes, std::vector<std::string>({"4096", "16384"}),
          "Block sizes in bytes.");
ABSL_FLAG(std::vector<std::string>, batches, std::vector<std::string>({"1", "32"}),
          "Blocks per call.");
ABSL_FLAG(int, rounds, 200, "Rounds per point; each times one call of each kind.");
ABSL_FLAG(bool, quick, false, "Smoke test: 5 rounds.");

namespace {

using kvstrata::BlockKey;
using kvstrata::client::BlockOutcome;
using kvstrata::client::Buffer;
using kvstrata::client::Client;
using kvstrata::client::ClientOptions;
using kvstrata::client::FetchItem;
using kvstrata::client::Namespace;
using kvstrata::client::PublishItem;

struct Side {
  std::unique_ptr<Client> client;
  std::optional<Namespace> ns;
  std::unique_ptr<Buffer> src, dst;
  std::vector<BlockKey> fetch_keys;  // published once, fetched every round
  std::vector<double> publish_us, fetch_us;
};

double Percentile(std::vector<double> v, double fraction) {
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(fraction * static_cast<double>(v.size() - 1))];
}

absl::Status Run() {
  const int rounds = absl::GetFlag(FLAGS_quick) ? 5 : absl::GetFlag(FLAGS_rounds);
  std::vector<uint64_t> sizes;
  std::vector<size_t> batches;
  for (const std::string& s : absl::GetFlag(FLAGS_block_sizes)) {
    uint64_t v = 0;
    if (!absl::SimpleAtoi(s, &v) || v == 0) return absl::InvalidArgumentError("--block_sizes");
    sizes.push_back(v);
  }
  for (const std::string& s : absl::GetFlag(FLAGS_batches)) {
    size_t v = 0;
    if (!absl::SimpleAtoi(s, &v) || v == 0) return absl::InvalidArgumentError("--batches");
    batches.push_back(v);
  }
  auto dir = kvstrata::testing::TempDir::Create("coalesce_bench");
  if (!dir.ok()) return dir.status();
  auto node = kvstrata::testing::NodeProcess::Start(
      KVSTRATA_NODE_BINARY, {"--dram_bytes=1073741824", "--prefault"}, (*dir)->File("node.log"));
  if (!node.ok()) return node.status();
  const char* tls = std::getenv("UCX_TLS");
  std::printf("# coalesce_bench: UCX_TLS=%s, %d rounds per point\n", tls ? tls : "(unset)", rounds);
  std::mt19937_64 random(std::random_device{}());
  uint64_t counter = random();
  auto next_key = [&] {
    BlockKey key;
    const uint64_t n = ++counter;
    std::memcpy(key.bytes.data(), &n, 8);
    std::memcpy(key.bytes.data() + 8, &counter, 8);
    return key;
  };
  for (uint64_t size : sizes) {
    for (size_t batch : batches) {
      Side sides[2];  // [0] coalesced, [1] one message per block
      for (int k = 0; k < 2; ++k) {
        ClientOptions options;
        options.node_address = (*node)->address();
        options.coalesce_small_blocks = k == 0;
        options.fast_path = false;  // both sides on the gRPC path this compares
        auto client = Client::Connect(options);
        if (!client.ok()) return client.status();
        Side& side = sides[k];
        side.client = *std::move(client);
        kvstrata::v1::NamespaceSpec spec;
        spec.set_tenant("bench");
        spec.set_model("coalesce_bench");
        spec.set_block_bytes(size);
        auto ns = side.client->OpenNamespace(spec);
        if (!ns.ok()) return ns.status();
        side.ns = *ns;
        auto src = side.client->Allocate(size * batch);
        auto dst = side.client->Allocate(size * batch);
        if (!src.ok()) return src.status();
        if (!dst.ok()) return dst.status();
        side.src = *std::move(src);
        side.dst = *std::move(dst);
        for (size_t i = 0; i < size * batch; ++i) side.src->data()[i] = static_cast<uint8_t>(random());
        std::memset(side.dst->data(), 0, size * batch);
        std::vector<PublishItem> items;
        for (size_t i = 0; i < batch; ++i) {
          side.fetch_keys.push_back(next_key());
          items.push_back({side.fetch_keys.back(), std::nullopt, side.src.get(), i * size});
        }
        auto published = side.ns->Publish(items);
        if (!published.ok()) return published.status();
      }
      for (int round = 0; round <= rounds; ++round) {  // round 0 warms up
        for (int turn = 0; turn < 2; ++turn) {
          Side& side = sides[(round & 1) ? 1 - turn : turn];  // alternate who goes first
          std::vector<PublishItem> items;
          std::vector<BlockKey> keys;
          for (size_t i = 0; i < batch; ++i) {
            keys.push_back(next_key());
            items.push_back({keys.back(), std::nullopt, side.src.get(), i * size});
          }
          std::vector<FetchItem> fetch;
          for (size_t i = 0; i < batch; ++i) {
            fetch.push_back({side.fetch_keys[i], side.dst.get(), i * size});
          }
          const auto t0 = std::chrono::steady_clock::now();
          auto published = side.ns->Publish(items);
          const auto t1 = std::chrono::steady_clock::now();
          auto fetched = side.ns->Fetch(fetch);
          const auto t2 = std::chrono::steady_clock::now();
          if (!published.ok()) return published.status();
          if (!fetched.ok()) return fetched.status();
          if (published->count(BlockOutcome::kOk) != batch ||
              fetched->count(BlockOutcome::kOk) != batch ||
              std::memcmp(side.src->data(), side.dst->data(), size * batch) != 0) {
            return absl::DataLossError("a block did not round-trip");
          }
          if (auto deleted = side.ns->Delete(keys); !deleted.ok()) return deleted.status();
          if (round == 0) continue;
          side.publish_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
          side.fetch_us.push_back(std::chrono::duration<double, std::micro>(t2 - t1).count());
        }
      }
      auto line = [&](const char* what, std::vector<double> Side::*samples) {
        const auto& c = sides[0].*samples;
        const auto& p = sides[1].*samples;
        std::printf(
            "block=%llu batch=%zu %-7s coalesced p10/p50=%.0f/%.0f us  per_block p10/p50=%.0f/%.0f "
            "us  per_block/coalesced p10=%.2f p50=%.2f\n",
            static_cast<unsigned long long>(size), batch, what, Percentile(c, 0.1),
            Percentile(c, 0.5), Percentile(p, 0.1), Percentile(p, 0.5),
            Percentile(p, 0.1) / Percentile(c, 0.1), Percentile(p, 0.5) / Percentile(c, 0.5));
      };
      line("publish", &Side::publish_us);
      line("fetch", &Side::fetch_us);
      std::fflush(stdout);
    }
  }
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  if (absl::Status s = Run(); !s.ok()) {
    std::fprintf(stderr, "coalesce_bench: FAILED: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
