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
#include "support/round_trip.h"

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

// OpenSide, PublishFetchSet, TimedRoundTrip and SameHostBytes take a Side
// and are found by argument-dependent lookup.
using kvstrata::bench::FreshKeys;
using kvstrata::bench::Percentile;
using kvstrata::bench::Side;
using kvstrata::client::Client;
using kvstrata::client::ClientOptions;

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
  FreshKeys keys(random());
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
        if (absl::Status s = OpenSide(side, "coalesce_bench", size, batch); !s.ok()) return s;
        for (size_t i = 0; i < size * batch; ++i) side.src->data()[i] = static_cast<uint8_t>(random());
        std::memset(side.dst->data(), 0, size * batch);
        if (absl::Status s = PublishFetchSet(side, keys); !s.ok()) return s;
      }
      absl::Status timed = kvstrata::bench::TakeTurns(sides, rounds, [&](Side& side, int round) {
        return TimedRoundTrip(side, keys, /*record=*/round > 0,
                              [&] { return SameHostBytes(side); });
      });
      if (!timed.ok()) return timed;
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
