// Eviction policies on a Mooncake trace: token hit rate, gap closed towards
// Belady and cost per policy call, each against LRU and Belady replayed in the
// same run (cachenode/README.md, "Eviction policies on the Mooncake trace").
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "kvstrata/cachenode/replay.h"

ABSL_FLAG(std::string, trace, KVSTRATA_DEFAULT_TRACE, "A Mooncake-format trace.");
ABSL_FLAG(std::string, policies, "lru,prefix-lru,chain-protect,chain-slru,return-aware",
          "Policies to compare.");
ABSL_FLAG(std::string, fractions, "0.05,0.1,0.2", "Capacities as fractions of distinct blocks.");
ABSL_FLAG(int, requests, 0, "Replay only the first N requests (0: all).");
ABSL_FLAG(double, decode_ms_per_token, 50,
          "A request's finished-hint reaches the policy at its timestamp + output_length x this "
          "(ms); negative: no hints.");
ABSL_FLAG(int, repeats, 3,
          "Replays per point, alternating with LRU; the fastest timing of each is kept.");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  auto trace = kvstrata::cachenode::LoadMooncakeTrace(absl::GetFlag(FLAGS_trace));
  if (!trace.ok()) {
    std::fprintf(stderr, "%s\n", trace.status().ToString().c_str());
    // 77: ctest's "skipped" for the smoke run on a checkout without the trace.
    return absl::IsNotFound(trace.status()) ? 77 : 1;
  }
  if (int n = absl::GetFlag(FLAGS_requests); n > 0 && static_cast<size_t>(n) < trace->size()) {
    trace->resize(n);
  }
  const size_t distinct = kvstrata::cachenode::DistinctBlocks(*trace);
  std::vector<size_t> capacities;
  for (absl::string_view text :
       absl::StrSplit(absl::GetFlag(FLAGS_fractions), ',', absl::SkipEmpty())) {
    double fraction = 0;
    if (!absl::SimpleAtod(text, &fraction) || fraction <= 0 || fraction > 1) {
      std::fprintf(stderr, "bad fraction '%s'\n", std::string(text).c_str());
      return 1;
    }
    capacities.push_back(static_cast<size_t>(fraction * distinct));
  }
  const std::vector<std::string> policies =
      absl::StrSplit(absl::GetFlag(FLAGS_policies), ',', absl::SkipEmpty());
  kvstrata::cachenode::ReplayOptions options;
  options.decode_ms_per_token = absl::GetFlag(FLAGS_decode_ms_per_token);
  auto best = kvstrata::cachenode::ComparePolicies(*trace, capacities, policies,
                                                   absl::GetFlag(FLAGS_repeats), options);
  if (!best.ok()) {
    std::fprintf(stderr, "%s\n", best.status().ToString().c_str());
    return 1;
  }
  std::printf("%s: %zu requests, %zu distinct blocks; gap = (policy - lru) / (belady - lru)\n",
              absl::GetFlag(FLAGS_trace).c_str(), trace->size(), distinct);
  std::fputs(kvstrata::cachenode::FormatComparisons(*best, distinct).c_str(), stdout);
  return 0;
}
