// micro_bench: the node's and client's per-block CPU costs, each next to a
// baseline measured in the same run (Google Benchmark), with the ratio printed
// at the end:
//   block keys (SHA-256 chain over 256 tokens)  vs  XXH3-64 of the same bytes
//   block checksum (XXH3-64 of 1 MiB)           vs  memcpy of 1 MiB
//   DRAM tier publish cycle (reserve+commit+evict, LRU) vs a bare flat_hash_map insert+erase
//   index hit (Find)                            vs  flat_hash_map find
//
//   micro_bench                        # all, with the ratio summary
//   micro_bench --benchmark_filter=Key # one family
#include <benchmark/benchmark.h>
#include <xxhash.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "kvstrata/cachenode/dram_tier.h"
#include "kvstrata/common/block_key.h"

namespace {

using kvstrata::BlockKey;
using kvstrata::cachenode::BlockId;
using kvstrata::cachenode::DramTier;

constexpr uint32_t kTokensPerBlock = 256;
constexpr size_t kChecksumBytes = 1 << 20;

std::vector<uint32_t> Tokens(size_t blocks) {
  std::vector<uint32_t> tokens(blocks * kTokensPerBlock);
  std::iota(tokens.begin(), tokens.end(), 1);
  return tokens;
}

void BM_BlockKeys(benchmark::State& state) {
  const std::vector<uint32_t> tokens = Tokens(64);
  for (auto _ : state) {
    benchmark::DoNotOptimize(kvstrata::ComputeBlockKeys(42, tokens, kTokensPerBlock));
  }
  state.SetItemsProcessed(state.iterations() * 64);
}
BENCHMARK(BM_BlockKeys);

void BM_BlockKeys_Baseline_Xxh3(benchmark::State& state) {
  const std::vector<uint32_t> tokens = Tokens(64);
  for (auto _ : state) {
    uint64_t h = 0;
    for (size_t b = 0; b < 64; ++b) {
      h ^= XXH3_64bits(tokens.data() + b * kTokensPerBlock, kTokensPerBlock * 4);
    }
    benchmark::DoNotOptimize(h);
  }
  state.SetItemsProcessed(state.iterations() * 64);
}
BENCHMARK(BM_BlockKeys_Baseline_Xxh3);

void BM_Checksum(benchmark::State& state) {
  std::vector<uint8_t> data(kChecksumBytes, 7);
  for (auto _ : state) benchmark::DoNotOptimize(kvstrata::BlockChecksum(data.data(), data.size()));
  state.SetBytesProcessed(state.iterations() * kChecksumBytes);
}
BENCHMARK(BM_Checksum);

void BM_Checksum_Baseline_Memcpy(benchmark::State& state) {
  std::vector<uint8_t> src(kChecksumBytes, 7), dst(kChecksumBytes, 0);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), src.size());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * kChecksumBytes);
}
BENCHMARK(BM_Checksum_Baseline_Memcpy);

BlockId IdOf(uint64_t n) {
  BlockId id{1, {}};
  std::memcpy(id.key.bytes.data(), &n, sizeof(n));
  std::memcpy(id.key.bytes.data() + 8, &n, sizeof(n));
  return id;
}

// A full tier: every publish reserves (evicting the LRU block) and commits.
void BM_TierPublishCycle(benchmark::State& state) {
  constexpr uint64_t kBlock = 4096, kSlab = 1 << 20, kCapacity = 64 << 20;
  std::vector<uint8_t> arena(kCapacity);
  DramTier tier(arena.data(), kCapacity, kSlab, kvstrata::cachenode::MakeLruPolicy());
  uint64_t n = 0;
  for (auto _ : state) {
    auto block = tier.Reserve(kBlock);
    tier.Commit(IdOf(n++), *std::move(block));
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_TierPublishCycle);

void BM_TierPublishCycle_Baseline_HashMap(benchmark::State& state) {
  constexpr uint64_t kResident = (64 << 20) / 4096;
  absl::flat_hash_map<BlockId, uint64_t> map;
  uint64_t n = 0;
  for (auto _ : state) {
    map.emplace(IdOf(n), n);
    if (n >= kResident) map.erase(IdOf(n - kResident));
    ++n;
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_TierPublishCycle_Baseline_HashMap);

void BM_IndexHit(benchmark::State& state) {
  constexpr uint64_t kBlocks = 16384;
  std::vector<uint8_t> arena(kBlocks * 4096);
  DramTier tier(arena.data(), arena.size(), 1 << 20, kvstrata::cachenode::MakeLruPolicy());
  for (uint64_t i = 0; i < kBlocks; ++i) tier.Commit(IdOf(i), *tier.Reserve(4096));
  uint64_t n = 0;
  for (auto _ : state) benchmark::DoNotOptimize(tier.Find(IdOf(n++ % kBlocks), /*hit=*/true));
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_IndexHit);

void BM_IndexHit_Baseline_HashMap(benchmark::State& state) {
  constexpr uint64_t kBlocks = 16384;
  absl::flat_hash_map<BlockId, uint64_t> map;
  for (uint64_t i = 0; i < kBlocks; ++i) map.emplace(IdOf(i), i);
  uint64_t n = 0;
  for (auto _ : state) benchmark::DoNotOptimize(map.find(IdOf(n++ % kBlocks)));
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_IndexHit_Baseline_HashMap);

// Collects real time per iteration so main() can print each ratio.
class RatioReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) nanos_[run.benchmark_name()] = run.GetAdjustedRealTime();
    ConsoleReporter::ReportRuns(runs);
  }
  void PrintRatios() const {
    std::printf("\nratios (time per item, lower is cheaper; baseline measured in this run):\n");
    for (const auto& [name, nanos] : nanos_) {
      const size_t cut = name.find("_Baseline_");
      if (cut == std::string::npos) continue;
      const auto subject = nanos_.find(name.substr(0, cut));
      if (subject == nanos_.end()) continue;
      std::printf("  %-22s %8.1f ns  vs %-28s %8.1f ns  = %.2fx\n", subject->first.c_str(),
                  subject->second, name.substr(cut + 1).c_str(), nanos, subject->second / nanos);
    }
  }

 private:
  std::map<std::string, double> nanos_;
};

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  reporter.PrintRatios();
  benchmark::Shutdown();
  return 0;
}
