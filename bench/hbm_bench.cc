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
#include <chrono>
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

ABSL_FLAG(uint64_t, block_bytes, 1 << 20, "Block size in bytes.");
ABSL_FLAG(size_t, batch, 32, "Blocks per call.");
ABSL_FLAG(int, rounds, 50, "Rounds; each times one publish and one fetch on each node.");
ABSL_FLAG(bool, quick, false, "Smoke test: 3 rounds.");

namespace {

using kvstrata::BlockKey;
using kvstrata::client::BlockOutcome;
using kvstrata::client::Buffer;
using kvstrata::client::Client;
using kvstrata::client::FetchItem;
using kvstrata::client::Namespace;
using kvstrata::client::PublishItem;

struct Side {
  std::unique_ptr<kvstrata::testing::NodeProcess> node;
  std::unique_ptr<Client> client;
  std::optional<Namespace> ns;
  std::unique_ptr<Buffer> src, dst;
  std::vector<BlockKey> fetch_keys;
  std::vector<double> publish_us, fetch_us;
};

double Percentile(std::vector<double> v, double fraction) {
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(fraction * static_cast<double>(v.size() - 1))];
}

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
  uint64_t counter = random();
  auto next_key = [&] {
    BlockKey key;
    const uint64_t n = ++counter;
    std::memcpy(key.bytes.data(), &n, 8);
    std::memcpy(key.bytes.data() + 8, &counter, 8);
    return key;
  };
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
    side.node = *std::move(node);
    auto client = Client::Connect({.node_address = side.node->address()});
    if (!client.ok()) return client.status();
    side.client = *std::move(client);
    kvstrata::v1::NamespaceSpec spec;
    spec.set_tenant("bench");
    spec.set_model("hbm_bench");
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
    std::vector<PublishItem> items;
    for (size_t i = 0; i < batch; ++i) {
      side.fetch_keys.push_back(next_key());
      items.push_back({side.fetch_keys.back(), std::nullopt, side.src.get(), i * size});
    }
    auto published = side.ns->Publish(items);
    if (!published.ok()) return published.status();
    if (published->count(BlockOutcome::kOk) != batch) return absl::InternalError("setup publish");
  }
  const char* tls = std::getenv("UCX_TLS");
  std::printf("# hbm_bench: UCX_TLS=%s, %llu-byte blocks x %zu, %d rounds\n", tls ? tls : "(unset)",
              static_cast<unsigned long long>(size), batch, rounds);
  for (int round = 0; round <= rounds; ++round) {  // round 0 warms up
    for (int turn = 0; turn < 2; ++turn) {
      Side& side = sides[(round & 1) ? 1 - turn : turn];
      std::vector<PublishItem> items;
      std::vector<BlockKey> keys;
      for (size_t i = 0; i < batch; ++i) {
        keys.push_back(next_key());
        items.push_back({keys.back(), std::nullopt, side.src.get(), i * size});
      }
      std::vector<FetchItem> fetch;
      for (size_t i = 0; i < batch; ++i)
        fetch.push_back({side.fetch_keys[i], side.dst.get(), i * size});
      std::memset(side.dst->data(), 0, size * batch);
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
