// device_bench: what fetching into and publishing from device (GPU) buffers
// costs against host buffers, in the same run, on one node with an HBM tier
// (kvstrata-test-node, the host-memory GPU double) and the client given the
// double too (ClientOptions::device). Three clients take turns round by
// round: host buffers (the baseline), device buffers staged through the
// client's pinned pool (device_ipc off), and device buffers with the
// same-host CUDA IPC path (HBM blocks copied device-to-device). On the double
// every "device" copy is a host memcpy on a stream thread, so this prices
// the client-side staging and the IPC round trips on the host, not a GPU
// (scripts/gpu-check.sh is the place for GPU figures).
//
//   UCX_TLS=sm device_bench --rounds=40
//   device_bench --quick                  # the ctest smoke version
//
// Per operation: p10/p50 microseconds per call and host/device (over 1: the
// device path is faster).
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "host_device_memory.h"
#include "kvstrata.pb.h"
#include "kvstrata/client/client.h"
#include "kvstrata/testing/process.h"
#include "support/round_trip.h"

ABSL_FLAG(uint64_t, block_bytes, 1 << 20, "Block size in bytes.");
ABSL_FLAG(size_t, batch, 32, "Blocks per call.");
ABSL_FLAG(int, rounds, 30, "Rounds; each times one publish and one fetch per client.");
ABSL_FLAG(bool, quick, false, "Smoke test: 3 rounds.");

namespace {

// OpenSide, PublishFetchSet, TimedRoundTrip and SameHostBytes take a Side
// and are found by argument-dependent lookup.
using kvstrata::bench::FreshKeys;
using kvstrata::bench::Percentile;
using kvstrata::bench::Side;
using kvstrata::client::Client;
using kvstrata::client::MemoryKind;

absl::Status Run() {
  const int rounds = absl::GetFlag(FLAGS_quick) ? 3 : absl::GetFlag(FLAGS_rounds);
  const uint64_t size = absl::GetFlag(FLAGS_block_bytes);
  const size_t batch = absl::GetFlag(FLAGS_batch);
  const uint64_t tier = std::max<uint64_t>(4 * batch * size, 64ull << 20);
  auto dir = kvstrata::testing::TempDir::Create("device_bench");
  if (!dir.ok()) return dir.status();
  auto node = kvstrata::testing::NodeProcess::Start(
      KVSTRATA_TEST_NODE_BINARY,
      {absl::StrCat("--dram_bytes=", tier), absl::StrCat("--hbm_bytes=", tier), "--prefault",
       "--slab_bytes=67108864", "--eviction_policy=lru"},
      (*dir)->File("node.log"));
  if (!node.ok()) return node.status();
  auto device = std::make_shared<kvstrata::testing::HostDeviceMemory>();
  std::mt19937_64 random(std::random_device{}());
  FreshKeys keys(random());
  std::vector<uint8_t> pattern(size * batch);
  for (auto& b : pattern) b = static_cast<uint8_t>(random());
  Side sides[3] = {{"host"}, {"staged"}, {"ipc"}};
  for (int k = 0; k < 3; ++k) {
    kvstrata::client::ClientOptions options{.node_address = (*node)->address()};
    options.device = device;
    options.device_ipc = k == 2;
    options.device_staging_bytes = std::max<uint64_t>(2 * size * batch, 64ull << 20);
    auto client = Client::Connect(options);
    if (!client.ok()) return client.status();
    Side& side = sides[k];
    side.client = *std::move(client);
    const MemoryKind kind = k == 0 ? MemoryKind::kHost : MemoryKind::kDevice;
    if (absl::Status s = OpenSide(side, "device_bench", size, batch, kind); !s.ok()) return s;
    if (k == 0) {
      std::memcpy(side.src->data(), pattern.data(), pattern.size());
    } else {
      auto stream = device->CreateStream();
      if (!stream.ok()) return stream.status();
      if (absl::Status s = (*stream)->Copy(side.src->data(), pattern.data(), pattern.size(),
                                           kvstrata::transfer::CopyKind::kHostToDevice);
          !s.ok()) {
        return s;
      }
      if (absl::Status s = (*stream)->Synchronize(); !s.ok()) return s;
    }
  }
  // One fetch set, published from the host side, that every side fetches.
  if (absl::Status s = PublishFetchSet(sides[0], keys); !s.ok()) return s;
  for (int k = 1; k < 3; ++k) sides[k].fetch_keys = sides[0].fetch_keys;
  std::vector<uint8_t> check(size * batch);
  const char* tls = std::getenv("UCX_TLS");
  std::printf("# device_bench: UCX_TLS=%s, %llu-byte blocks x %zu, %d rounds, node: HBM tier\n",
              tls ? tls : "(unset)", static_cast<unsigned long long>(size), batch, rounds);
  // Bytes are checked once per client, in round 1 (outside the timed calls).
  auto check_bytes = [&](const Side& side) -> absl::Status {
    const uint8_t* got = side.dst->data();
    if (side.dst->kind() == MemoryKind::kDevice) {
      auto stream = device->CreateStream();
      if (!stream.ok()) return stream.status();
      if (absl::Status s = (*stream)->Copy(check.data(), got, check.size(),
                                           kvstrata::transfer::CopyKind::kDeviceToHost);
          !s.ok()) {
        return s;
      }
      if (absl::Status s = (*stream)->Synchronize(); !s.ok()) return s;
      got = check.data();
    }
    if (std::memcmp(got, pattern.data(), pattern.size()) != 0) {
      return absl::DataLossError(absl::StrCat(side.name, ": fetched bytes differ"));
    }
    return absl::OkStatus();
  };
  absl::Status timed = kvstrata::bench::TakeTurns(sides, rounds, [&](Side& side, int round) {
    if (round != 1) return TimedRoundTrip(side, keys, /*record=*/round > 0);
    return TimedRoundTrip(side, keys, /*record=*/true, [&] { return check_bytes(side); });
  });
  if (!timed.ok()) return timed;
  auto line = [&](const char* what, std::vector<double> Side::*samples) {
    const auto& h = sides[0].*samples;
    std::printf("%-7s host p10/p50=%.0f/%.0f us", what, Percentile(h, 0.1), Percentile(h, 0.5));
    for (int k = 1; k < 3; ++k) {
      const auto& d = sides[k].*samples;
      std::printf("  %s p10/p50=%.0f/%.0f us (host/%s %.2f/%.2f)", sides[k].name,
                  Percentile(d, 0.1), Percentile(d, 0.5), sides[k].name,
                  Percentile(h, 0.1) / Percentile(d, 0.1), Percentile(h, 0.5) / Percentile(d, 0.5));
    }
    std::printf("\n");
  };
  line("publish", &Side::publish_us);
  line("fetch", &Side::fetch_us);
  const kvstrata::client::DeviceStagingCounters ipc = sides[2].client->DeviceStaging();
  if (!ipc.cuda_ipc || ipc.ipc_blocks == 0) {
    return absl::InternalError("the ipc client never fetched by CUDA IPC");
  }
  std::printf("# ipc client: %llu blocks by IPC; staged client: %llu staged, %llu fallbacks\n",
              static_cast<unsigned long long>(ipc.ipc_blocks),
              static_cast<unsigned long long>(sides[1].client->DeviceStaging().staged_blocks),
              static_cast<unsigned long long>(sides[1].client->DeviceStaging().fallback_blocks));
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  if (absl::Status s = Run(); !s.ok()) {
    std::fprintf(stderr, "device_bench: FAILED: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
