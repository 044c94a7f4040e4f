// Soak: many concurrent clients (child processes, killed with SIGKILL at
// random and replaced) against one real kvstrata-node with a small DRAM tier
// and an NVMe tier, so blocks are evicted, demoted and promoted all the time.
// Passes when no fetched block ever held wrong bytes, no call failed other
// than with a miss or NO_SPACE, the node stayed up, and its memory, file
// descriptors and threads stayed bounded and came back near where they
// started once the clients were gone.
//
// KVSTRATA_SOAK_CLIENTS and KVSTRATA_SOAK_SECONDS size it (ctest: soak_smoke
// 8 x 60 s in the default suite; soak, label soak, 64 x 600 s).
#include <gtest/gtest.h>
#include <signal.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "kvstrata.pb.h"
#include "kvstrata/client/client.h"
#include "kvstrata/testing/process.h"
#include "proc_usage.h"
#include "soak_worker.h"

namespace kvstrata::soak {
namespace {

using testing::ChildProcess;

uint64_t EnvOr(const char* name, uint64_t fallback) {
  uint64_t value = 0;
  const char* text = std::getenv(name);
  return text != nullptr && absl::SimpleAtoi(text, &value) ? value : fallback;
}

constexpr uint64_t kDramBytes = 64 << 20;   // 1024 blocks: eviction within seconds
constexpr uint64_t kNvmeBytes = 256 << 20;  // 4096 blocks: the NVMe tier evicts too
// The 2,000 chains of up to 12 blocks (~12,000 blocks) overflow both tiers.

// What the workers' logs add up to.
struct Totals {
  uint64_t ops = 0, published = 0, fetched_ok = 0, misses = 0, no_space = 0;
  uint64_t wrong = 0, errors = 0;
  std::vector<std::string> samples;  // the first few WRONG/ERROR lines
};

void AddLog(const std::string& path, Totals& totals) {
  std::ifstream in(path);
  std::string line, last_stats;
  while (std::getline(in, line)) {
    if (line.rfind("STATS ", 0) == 0) {
      last_stats = line;
    } else if (line.rfind("WRONG ", 0) == 0 || line.rfind("ERROR ", 0) == 0) {
      (line[0] == 'W' ? totals.wrong : totals.errors)++;
      if (totals.samples.size() < 10) totals.samples.push_back(line);
    }
  }
  for (absl::string_view field : absl::StrSplit(last_stats, ' ')) {
    std::pair<std::string, std::string> kv = absl::StrSplit(field, '=');
    uint64_t v = 0;
    if (!absl::SimpleAtoi(kv.second, &v)) continue;
    if (kv.first == "ops") totals.ops += v;
    if (kv.first == "published") totals.published += v;
    if (kv.first == "fetched_ok") totals.fetched_ok += v;
    if (kv.first == "misses") totals.misses += v;
    if (kv.first == "no_space") totals.no_space += v;
  }
}

class Soak : public ::testing::Test {
 protected:
  void SetUp() override {
    auto dir = testing::TempDir::Create("kvstrata-soak");
    ASSERT_TRUE(dir.ok()) << dir.status();
    dir_ = *std::move(dir);
    auto node = testing::NodeProcess::Start(
        KVSTRATA_NODE_BINARY,
        {absl::StrCat("--dram_bytes=", kDramBytes), "--slab_bytes=4194304", "--prefault",
         "--nvme_dirs=" + dir_->File("nvme"), absl::StrCat("--nvme_capacity_bytes=", kNvmeBytes)},
        dir_->File("node.log"));
    ASSERT_TRUE(node.ok()) << node.status();
    node_ = *std::move(node);
  }

  absl::StatusOr<std::unique_ptr<ChildProcess>> SpawnWorker(uint64_t seed, absl::Time deadline) {
    const std::string log = dir_->File(absl::StrCat("worker-", seed, ".log"));
    logs_.push_back(log);
    return ChildProcess::Spawn(
        {std::filesystem::read_symlink("/proc/self/exe").string(), "--soak_worker",
         "--node=" + node_->address(), absl::StrCat("--seed=", seed),
         absl::StrCat("--deadline_ms=", absl::ToUnixMillis(deadline))},
        log);
  }

  // One short worker run to its end: the node's lazily built state (RocksDB,
  // UCX, gRPC threads) exists afterwards, so it counts as baseline.
  void RunProbe(uint64_t seed) {
    auto probe = SpawnWorker(seed, absl::Now() + absl::Seconds(2));
    ASSERT_TRUE(probe.ok()) << probe.status();
    EXPECT_EQ((*probe)->Wait(), 0) << (*probe)->LogTail();
  }

  v1::StatsResponse NodeStats() {
    v1::StatsResponse stats;
    auto client = client::Client::Connect({.node_address = node_->address()});
    EXPECT_TRUE(client.ok()) << client.status();
    if (client.ok()) {
      EXPECT_TRUE((*client)->Stats(&stats).ok());
    }
    return stats;
  }

  std::unique_ptr<testing::TempDir> dir_;
  std::unique_ptr<testing::NodeProcess> node_;
  std::vector<std::string> logs_;
};

TEST_F(Soak, ClientsKilledAtRandomNeverSeeWrongBytes) {
  const uint64_t clients = EnvOr("KVSTRATA_SOAK_CLIENTS", 8);
  const absl::Duration duration = absl::Seconds(EnvOr("KVSTRATA_SOAK_SECONDS", 60));
  // About one kill per client every 40 s, at least one every 5 s.
  const absl::Duration kill_every = std::min(absl::Seconds(5), absl::Seconds(40) / clients);
  const pid_t node_pid = node_->process().pid();

  RunProbe(1000000);
  const ProcUsage baseline = ReadProcUsage(node_pid);
  const std::string baseline_fds = DescribeFds(node_pid, node_->port());
  const absl::Time deadline = absl::Now() + duration;
  std::vector<std::unique_ptr<ChildProcess>> workers;
  uint64_t next_seed = 1;
  for (uint64_t i = 0; i < clients; ++i) {
    auto worker = SpawnWorker(next_seed++, deadline);
    ASSERT_TRUE(worker.ok()) << worker.status();
    workers.push_back(*std::move(worker));
  }

  std::mt19937_64 rng(42);
  ProcUsage peak = baseline;
  uint64_t kills = 0;
  while (absl::Now() + kill_every < deadline) {
    absl::SleepFor(kill_every);
    ASSERT_FALSE(node_->process().Exited()) << "the node died:\n" << node_->process().LogTail();
    const ProcUsage now = ReadProcUsage(node_pid);
    peak = {std::max(peak.rss_bytes, now.rss_bytes), std::max(peak.fds, now.fds),
            std::max(peak.threads, now.threads)};
    // Killed mid-call at some random point of its publish/lookup/fetch loop.
    std::unique_ptr<ChildProcess>& victim = workers[rng() % workers.size()];
    victim->Signal(SIGKILL);
    victim->Wait();
    ++kills;
    auto replacement = SpawnWorker(next_seed++, deadline);
    ASSERT_TRUE(replacement.ok()) << replacement.status();
    victim = *std::move(replacement);
  }
  for (auto& worker : workers) EXPECT_EQ(worker->Wait(), 0) << worker->LogTail();
  ASSERT_FALSE(node_->process().Exited()) << "the node died:\n" << node_->process().LogTail();

  Totals totals;
  for (const std::string& log : logs_) AddLog(log, totals);
  const v1::StatsResponse stats = NodeStats();
  uint64_t dram_evictions = 0;
  for (const v1::TierStats& tier : stats.tiers()) {
    if (tier.tier() == v1::TIER_DRAM) dram_evictions = tier.evictions();
  }
  printf("soak: %lu clients, %.0f s, %lu kills: %lu ops, %lu blocks published, %lu fetched and "
         "verified, %lu misses, %lu no-space, %lu wrong, %lu errors; node: %lu DRAM evictions, "
         "%lu demoted, %lu promoted\n",
         clients, absl::ToDoubleSeconds(duration), kills, totals.ops, totals.published,
         totals.fetched_ok, totals.misses, totals.no_space, totals.wrong, totals.errors,
         dram_evictions, stats.demoted_blocks(), stats.promoted_blocks());
  printf("soak: node baseline RSS %.1f MiB, %lu fds, %lu threads; peak %.1f MiB, %lu fds, %lu threads\n",
         baseline.rss_bytes / 1048576.0, baseline.fds, baseline.threads,
         peak.rss_bytes / 1048576.0, peak.fds, peak.threads);
  for (const std::string& sample : totals.samples) printf("  %s\n", sample.c_str());

  EXPECT_EQ(totals.wrong, 0u);
  EXPECT_EQ(totals.errors, 0u);
  // It did real work, across both tiers.
  EXPECT_GT(totals.fetched_ok, 100 * clients);
  EXPECT_GT(totals.misses, 0u);
  EXPECT_GT(dram_evictions, 0u);
  EXPECT_GT(stats.demoted_blocks(), 0u);
  EXPECT_GT(stats.promoted_blocks(), 0u);
  EXPECT_GE(kills, 1u);
  // Bounded while the clients ran: per client a gRPC connection, a UCX
  // endpoint (about 2 fds) and a call thread, with room for those of killed
  // clients the node has not dropped yet.
  EXPECT_LE(peak.rss_bytes, baseline.rss_bytes + (512ull << 20));
  EXPECT_LE(peak.fds, baseline.fds + 8 * clients + 64);
  EXPECT_LE(peak.threads, baseline.threads + 4 * clients + 64);

  // Back near the baseline once every client is gone and one more has come
  // and gone (a new client's connect is when the node drops failed peers).
  // DRAM bytes in use are then those of stored blocks: no reservation or
  // pin of a killed client's transfer outlives its deadline.
  ProcUsage after;
  v1::TierStats dram_after;
  auto settled = [&] {
    return after.fds <= baseline.fds + 16 && after.threads <= baseline.threads + 16 &&
           dram_after.used_bytes() == dram_after.stored_bytes();
  };
  const absl::Time give_up = absl::Now() + absl::Seconds(60);
  do {
    RunProbe(next_seed++);
    after = ReadProcUsage(node_pid);
    const v1::StatsResponse stats_after = NodeStats();
    for (const v1::TierStats& tier : stats_after.tiers()) {
      if (tier.tier() == v1::TIER_DRAM) dram_after = tier;
    }
  } while (!settled() && absl::Now() < give_up);
  EXPECT_EQ(dram_after.used_bytes(), dram_after.stored_bytes())
      << "DRAM bytes held by no stored block";
  printf("soak: node after the clients left: RSS %.1f MiB, %lu fds, %lu threads\n"
         "soak: fds at baseline: %s\nsoak: fds after: %s\n",
         after.rss_bytes / 1048576.0, after.fds, after.threads, baseline_fds.c_str(),
         DescribeFds(node_pid, node_->port()).c_str());
  EXPECT_LE(after.fds, baseline.fds + 16) << "the node holds " << DescribeFds(node_pid, node_->port());
  EXPECT_LE(after.threads, baseline.threads + 16);
  EXPECT_LE(after.rss_bytes, baseline.rss_bytes + (256ull << 20));
}

}  // namespace
}  // namespace kvstrata::soak

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) != "--soak_worker") continue;
    kvstrata::soak::WorkerOptions options{.node_address = kvstrata::testing::ChildArg(argc, argv, "node")};
    int64_t deadline_ms = 0;
    if (!absl::SimpleAtoi(kvstrata::testing::ChildArg(argc, argv, "seed"), &options.rng_seed) ||
        !absl::SimpleAtoi(kvstrata::testing::ChildArg(argc, argv, "deadline_ms"), &deadline_ms)) {
      fprintf(stderr, "--soak_worker needs --node, --seed and --deadline_ms\n");
      return 2;
    }
    options.deadline = absl::FromUnixMillis(deadline_ms);
    return kvstrata::soak::RunWorker(options);
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
