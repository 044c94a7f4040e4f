// hbm_bench: what the HBM tier's transfer path costs against the DRAM tier's,
// in the same run: two nodes, one with an HBM tier (kvstrata-test-node, the
// node with the host-memory GPU double) and one without, calls alternating
// between them round by round. Every HBM transfer goes through the staging
// pool (publish: land in staging, verify, copy up; fetch: copy down, send),
// so on the double this is the price of the staging path's extra copy and
// bookkeeping on the host; on a GPU the copies are DMA (scripts/gpu-check.sh).
//
//   hbm_bench                           # UCX_TLS decides the transport
//   UCX_TLS=sm hbm_bench --rounds=100
//   hbm_bench --quick                   # the ctest smoke version
//
// Per operation: p10/p50 microseconds per call on each node and
// dram/hbm (over 1: the HBM path is faster).
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "kvstrata.pb.h"
#include "kvstrata/client/client.h"
#include "kvstrata/testing/process.h"
#include "support/round_trip.h"

ABSL_FLAG(uint64_t, block_bytes, 1 << 20, "Block size in bytes.");
ABSL_FLAG(size_t, batch, 32, "Blocks per call.");
ABSL_FLAG(int, rounds, 50, "Rounds; each times one publish and one fetch on each node.");
ABSL_FLAG(bool, quick, false, "Smoke test: 3 rounds.");

namespace {

// OpenSide, PublishFetchSet, TimedRoundTrip and SameHostBytes take a Side
// and are found by argument-dependent lookup.
using kvstrata::bench::FreshKeys;
using kvstrata::bench::Percentile;
using kvstrata::bench::Side;
using kvstrata::client::Client;

absl::Status Run() {
  const int rounds = absl::GetFlag(FLAGS_quick) ? 3 : absl::GetFlag(FLAGS_rounds);
  const uint64_t size = absl::GetFlag(FLAGS_block_bytes);
  const size_t batch = absl::GetFlag(FLAGS_batch);
  // Room for the fetched set and one publish in flight; published blocks are
  // deleted after each round.
  const uint64_t tier = std::max<uint64_t>(4 * batch * size, 64ull << 20);
  auto dir = kvstrata::testing::TempDir::Create("hbm_bench");
  if (!dir.ok()) return dir.status();
  std::mt19937_64 random(std::random_device{}());
  FreshKeys keys(random());
  // The nodes outlive their clients (declared first, destroyed last).
  std::unique_ptr<kvstrata::testing::NodeProcess> nodes[2];
  Side sides[2];  // [0] DRAM only, [1] HBM
  for (int k = 0; k < 2; ++k) {
    std::vector<std::string> flags = {absl::StrCat("--dram_bytes=", tier), "--prefault",
                                      "--slab_bytes=67108864", "--eviction_policy=lru"};
    if (k == 1) flags.push_back(absl::StrCat("--hbm_bytes=", tier));
    auto node = kvstrata::testing::NodeProcess::Start(
        k == 0 ? KVSTRATA_NODE_BINARY : KVSTRATA_TEST_NODE_BINARY, flags,
        (*dir)->File(absl::StrCat("node", k, ".log")));
    if (!node.ok()) return node.status();
    Side& side = sides[k];
    nodes[k] = *std::move(node);
    auto client = Client::Connect({.node_address = nodes[k]->address()});
    if (!client.ok()) return client.status();
    side.client = *std::move(client);
    if (absl::Status s = OpenSide(side, "hbm_bench", size, batch); !s.ok()) return s;
    for (size_t i = 0; i < size * batch; ++i) side.src->data()[i] = static_cast<uint8_t>(random());
    if (absl::Status s = PublishFetchSet(side, keys); !s.ok()) return s;
  }
  const char* tls = std::getenv("UCX_TLS");
  std::printf("# hbm_bench: UCX_TLS=%s, %llu-byte blocks x %zu, %d rounds\n", tls ? tls : "(unset)",
              static_cast<unsigned long long>(size), batch, rounds);
  absl::Status timed = kvstrata::bench::TakeTurns(sides, rounds, [&](Side& side, int round) {
    std::memset(side.dst->data(), 0, size * batch);
    return TimedRoundTrip(side, keys, /*record=*/round > 0, [&] { return SameHostBytes(side); });
  });
  if (!timed.ok()) return timed;
  kvstrata::v1::StatsResponse stats;
  if (absl::Status s = sides[1].client->Stats(&stats); !s.ok()) return s;
  for (const auto& t : stats.tiers()) {
    if (t.tier() == kvstrata::v1::TIER_HBM && t.blocks() < batch) {
      return absl::InternalError("the HBM node's fetched blocks are not in HBM");
    }
  }
  auto line = [&](const char* what, std::vector<double> Side::*samples) {
    const auto& d = sides[0].*samples;
    const auto& h = sides[1].*samples;
    std::printf(
        "%-7s dram p10/p50=%.0f/%.0f us  hbm(staged) p10/p50=%.0f/%.0f us  dram/hbm p10=%.2f "
        "p50=%.2f\n",
        what, Percentile(d, 0.1), Percentile(d, 0.5), Percentile(h, 0.1), Percentile(h, 0.5),
        Percentile(d, 0.1) / Percentile(h, 0.1), Percentile(d, 0.5) / Percentile(h, 0.5));
  };
  line("publish", &Side::publish_us);
  line("fetch", &Side::fetch_us);
  std::printf("# hbm node: %llu staged, %llu staging fallbacks, gpu=%s\n",
              static_cast<unsigned long long>(stats.hbm_staged_blocks()),
              static_cast<unsigned long long>(stats.hbm_staging_fallbacks()),
              stats.gpu_device().c_str());
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  if (absl::Status s = Run(); !s.ok()) {
    std::fprintf(stderr, "hbm_bench: FAILED: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
