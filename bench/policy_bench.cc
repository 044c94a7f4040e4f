// Eviction policies on Mooncake-format traces: token hit rate, gap closed
// towards Belady and cost per policy call, each against LRU and Belady
// replayed in the same run (cachenode/README.md, "Eviction policies").
//
//   policy_bench                      the shared trace, every policy
//   policy_bench --suite              every trace of the suite (bench/traces/), 2-20%,
//                                     then one summary line per trace and capacity
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "kvstrata/cachenode/replay.h"
#include "tier_replay.h"

ABSL_FLAG(std::string, trace, KVSTRATA_TRACE_SUITE_SHARED, "A Mooncake-format trace.");
ABSL_FLAG(bool, suite, false,
          "Replay every *.jsonl of --suite_dir and the shared trace instead of --trace, and "
          "print a summary of adaptive against LRU and the best other policy.");
ABSL_FLAG(std::string, suite_dir, KVSTRATA_TRACE_SUITE_DIR,
          "The generated suite (bench/traces/README.md).");
ABSL_FLAG(std::string, policies,
          "lru,prefix-lru,prefix-freq,chain-protect,chain-slru,return-aware,adaptive",
          "Policies to compare.");
ABSL_FLAG(std::string, fractions, "", "Capacities as fractions of distinct blocks "
          "(default 0.05,0.1,0.2; with --suite 0.02,0.05,0.1,0.2).");
ABSL_FLAG(std::string, bounds, KVSTRATA_POLICY_BOUNDS,
          "JSON files written by tools/policy_bounds.py --json (comma-separated): prints the gap "
          "closed toward each trace's fitted online bound.");
ABSL_FLAG(int, requests, 0, "Replay only the first N requests of each trace (0: all).");
ABSL_FLAG(double, decode_ms_per_token, 50,
          "A request's finished-hint reaches the policy at its timestamp + output_length x this "
          "(ms); negative: no hints.");
ABSL_FLAG(int, cluster_nodes, 0,
          "Also replay each trace over this many nodes sharing the capacity, placing blocks "
          "by --placement_groups, against one node of the whole capacity (0: off).");
ABSL_FLAG(std::string, placement_groups, "1,4,16,64",
          "Cluster placement: block i goes by the key of block i - i % G of its request.");
ABSL_FLAG(std::string, cluster_policy, "adaptive", "Eviction policy of every node in the cluster replay.");
ABSL_FLAG(bool, precision, false,
          "Also replay each trace with precision tiers: a block given up is transcoded one step "
          "down raw > fp8_e4m3 > int4_kivi > int2_kivi before it is evicted, at the same bytes "
          "(capacity in raw blocks), for each coarsest format allowed; once with one fresh "
          "lease per rung, once with leases by bytes (raw/stored bytes per rung).");
ABSL_FLAG(std::string, precision_policy, "lru", "Eviction policy of the precision-tier replay.");
ABSL_FLAG(std::string, precision_rungs, "",
          "With --precision: the formats a block steps down through, finest first, from "
          "raw,fp8_e4m3,int4_kivi,int2_kivi (default: all of them).");
ABSL_FLAG(bool, precision_tier, false,
          "With --precision: also replay through the node's real DRAM tier (DramTier, the "
          "PrecisionTranscoder, --precision_policy, 128 KiB fp16 blocks) without a budget and with an int4_kivi "
          "budget, one lease per format and leases by bytes, at the same bytes.");
ABSL_FLAG(int, repeats, 3,
          "Replays per point, alternating with LRU; the fastest timing of each is kept.");

namespace {

using kvstrata::cachenode::PolicyComparison;

// {fraction -> fitted bound} of one trace, from policy_bounds.py's JSON:
// {"trace": "name.jsonl", "fitted": {"0.05": 0.174, ...}}.
struct Bounds {
  std::string trace;
  std::map<std::string, double> fitted;
};

absl::StatusOr<Bounds> ReadBounds(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError("cannot read " + path);
  std::stringstream text;
  text << in.rdbuf();
  const std::string json = text.str();
  Bounds bounds;
  const size_t name = json.find("\"trace\"");
  const size_t fitted = json.find("\"fitted\"");
  if (name == std::string::npos || fitted == std::string::npos) {
    return absl::InvalidArgumentError(path + ": no \"trace\" or \"fitted\"");
  }
  const size_t open = json.find('"', json.find(':', name) + 1);
  bounds.trace = json.substr(open + 1, json.find('"', open + 1) - open - 1);
  const size_t begin = json.find('{', fitted), end = json.find('}', fitted);
  for (absl::string_view pair : absl::StrSplit(
           absl::string_view(json).substr(begin + 1, end - begin - 1), ',', absl::SkipEmpty())) {
    std::vector<absl::string_view> kv = absl::StrSplit(pair, ':');
    if (kv.size() != 2) continue;
    std::string key(absl::StripAsciiWhitespace(kv[0]));
    key.erase(std::remove(key.begin(), key.end(), '"'), key.end());
    double value;
    if (absl::SimpleAtod(absl::StripAsciiWhitespace(kv[1]), &value)) bounds.fitted[key] = value;
  }
  return bounds;
}

struct SuiteTotals {
  int points = 0, at_or_above_lru = 0, near_best = 0, cheap = 0;
};

// One line per capacity: adaptive against LRU, Belady and the best other
// policy of the same replay, and the targets each point meets.
std::string Summarise(const std::string& name, const std::vector<PolicyComparison>& rows,
                      size_t distinct, const Bounds* bounds, SuiteTotals& totals) {
  std::string out;
  std::map<size_t, std::vector<const PolicyComparison*>> by_capacity;
  for (const PolicyComparison& row : rows) by_capacity[row.capacity_blocks].push_back(&row);
  for (const auto& [capacity, points] : by_capacity) {
    const PolicyComparison* adaptive = nullptr;
    const PolicyComparison* best = nullptr;
    for (const PolicyComparison* p : points) {
      if (p->policy == "adaptive") {
        adaptive = p;
      } else if (best == nullptr || p->result.token_hit_rate() > best->result.token_hit_rate()) {
        best = p;
      }
    }
    if (adaptive == nullptr || best == nullptr) continue;
    const double a = adaptive->result.token_hit_rate(), lru = adaptive->lru.token_hit_rate();
    const double b = best->result.token_hit_rate();
    std::string bound = "";
    if (bounds != nullptr) {
      const std::string key = absl::StrFormat("%g", static_cast<double>(capacity) / distinct);
      for (const auto& [fraction, value] : bounds->fitted) {
        double f;
        if (absl::SimpleAtod(fraction, &f) &&
            static_cast<size_t>(f * distinct) == capacity && value > lru) {
          bound = absl::StrFormat(" bound %.3f (gap %.2f)", value, (a - lru) / (value - lru));
        }
      }
    }
    ++totals.points;
    totals.at_or_above_lru += a >= lru - 0.005;
    totals.near_best += a >= b - 0.01;
    totals.cheap += adaptive->cost_vs_lru() <= 2.0;
    absl::StrAppendFormat(
        &out, "%-26s %5.1f%% | lru %.3f belady %.3f | adaptive %.3f (%+.3f vs lru, gap %5.2f) | "
        "best %-13s %.3f (adaptive %+.3f) | cost %.2fx lru%s\n",
        name.c_str(), 100.0 * capacity / distinct, lru, adaptive->belady.token_hit_rate(), a,
        a - lru, adaptive->gap_closed(), best->policy.c_str(), b, a - b, adaptive->cost_vs_lru(),
        bound.c_str());
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  std::vector<std::string> traces;
  const bool suite = absl::GetFlag(FLAGS_suite);
  if (suite) {
    std::error_code error;
    for (const auto& entry :
         std::filesystem::directory_iterator(absl::GetFlag(FLAGS_suite_dir), error)) {
      if (entry.path().extension() == ".jsonl") traces.push_back(entry.path().string());
    }
    if (error) {
      std::fprintf(stderr, "cannot list %s: %s\n", absl::GetFlag(FLAGS_suite_dir).c_str(),
                   error.message().c_str());
      return 1;
    }
    std::sort(traces.begin(), traces.end());
    if (std::filesystem::exists(absl::GetFlag(FLAGS_trace))) {
      traces.push_back(absl::GetFlag(FLAGS_trace));
    }
  } else {
    traces.push_back(absl::GetFlag(FLAGS_trace));
  }
  std::string fraction_list = absl::GetFlag(FLAGS_fractions);
  if (fraction_list.empty()) fraction_list = suite ? "0.02,0.05,0.1,0.2" : "0.05,0.1,0.2";
  std::vector<double> fractions;
  for (absl::string_view text : absl::StrSplit(fraction_list, ',', absl::SkipEmpty())) {
    double fraction = 0;
    if (!absl::SimpleAtod(text, &fraction) || fraction <= 0 || fraction > 1) {
      std::fprintf(stderr, "bad fraction '%s'\n", std::string(text).c_str());
      return 1;
    }
    fractions.push_back(fraction);
  }
  std::vector<Bounds> bounds;
  for (absl::string_view path : absl::StrSplit(absl::GetFlag(FLAGS_bounds), ',', absl::SkipEmpty())) {
    absl::StatusOr<Bounds> read = ReadBounds(std::string(path));
    if (!read.ok()) {
      std::fprintf(stderr, "%s\n", read.status().ToString().c_str());
      return 1;
    }
    bounds.push_back(*std::move(read));
  }
  const std::vector<std::string> policies =
      absl::StrSplit(absl::GetFlag(FLAGS_policies), ',', absl::SkipEmpty());
  kvstrata::cachenode::ReplayOptions options;
  options.decode_ms_per_token = absl::GetFlag(FLAGS_decode_ms_per_token);

  std::string summary;
  SuiteTotals totals;
  for (const std::string& path : traces) {
    auto trace = kvstrata::cachenode::LoadMooncakeTrace(path);
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
    for (double fraction : fractions) {
      capacities.push_back(std::max<size_t>(1, static_cast<size_t>(fraction * distinct)));
    }
    auto rows = kvstrata::cachenode::ComparePolicies(*trace, capacities, policies,
                                                     absl::GetFlag(FLAGS_repeats), options);
    if (!rows.ok()) {
      std::fprintf(stderr, "%s\n", rows.status().ToString().c_str());
      return 1;
    }
    std::printf("%s: %zu requests, %zu distinct blocks; gap = (policy - lru) / (belady - lru)\n",
                path.c_str(), trace->size(), distinct);
    std::fputs(kvstrata::cachenode::FormatComparisons(*rows, distinct).c_str(), stdout);
    std::fflush(stdout);
    const std::string name = std::filesystem::path(path).stem().string();
    const Bounds* bound = nullptr;
    for (const Bounds& b : bounds) {
      if (std::filesystem::path(b.trace).stem().string() == name) bound = &b;
    }
    summary += Summarise(name, *rows, distinct, bound, totals);  // printed after every table
    if (absl::GetFlag(FLAGS_precision)) {
      kvstrata::cachenode::PrecisionLadder ladder = kvstrata::cachenode::KernelFormatsLadder();
      if (const std::string rungs = absl::GetFlag(FLAGS_precision_rungs); !rungs.empty()) {
        kvstrata::cachenode::PrecisionLadder picked;
        for (absl::string_view rung : absl::StrSplit(rungs, ',')) {
          auto it = std::find(ladder.formats.begin(), ladder.formats.end(), std::string(rung));
          if (it == ladder.formats.end()) {
            std::fprintf(stderr, "--precision_rungs: unknown format %s\n", std::string(rung).c_str());
            return 1;
          }
          const size_t k = it - ladder.formats.begin();
          picked.formats.push_back(ladder.formats[k]);
          picked.bytes.push_back(ladder.bytes[k]);
          picked.attention_error.push_back(ladder.attention_error[k]);
        }
        ladder = std::move(picked);
      }
      std::printf("precision tiers, %s: token hit rate at the same bytes by the coarsest format "
                  "allowed (x raw), mean attention-output error of the hit blocks as served\n",
                  absl::GetFlag(FLAGS_precision_policy).c_str());
      // Each capacity: one fresh lease per rung (what the node first did),
      // then leases by bytes (PrecisionLease::kByBytes), both against the
      // same raw replay.
      using kvstrata::cachenode::PrecisionLease;
      for (size_t capacity : capacities) {
        double raw = 0;
        for (PrecisionLease lease : {PrecisionLease::kFresh, PrecisionLease::kByBytes}) {
          std::string line =
              lease == PrecisionLease::kFresh
                  ? absl::StrFormat("  %5.1f%% fresh lease:", 100.0 * capacity / distinct)
                  : absl::StrFormat("  %5.1f%% by bytes:   ", 100.0 * capacity / distinct);
          for (size_t coarsest = lease == PrecisionLease::kFresh ? 0 : 1;
               coarsest < ladder.formats.size(); ++coarsest) {
            auto run = kvstrata::cachenode::ReplayPrecision(
                *trace, static_cast<double>(capacity), absl::GetFlag(FLAGS_precision_policy),
                ladder, coarsest, options, lease);
            if (!run.ok()) {
              std::fprintf(stderr, "%s\n", run.status().ToString().c_str());
              return 1;
            }
            const double rate = run->total.token_hit_rate();
            if (coarsest == 0) raw = rate;
            absl::StrAppendFormat(&line, " %s %.3f (%.2fx, error %.3f) |",
                                  ladder.formats[coarsest], rate, raw > 0 ? rate / raw : 0.0,
                                  run->mean_error(ladder));
          }
          std::printf("%s\n", line.c_str());
        }
        if (absl::GetFlag(FLAGS_precision_tier)) {
          // The real tier without a budget, then with an int4 budget and
          // one lease per format, then by bytes; then the byte model at the
          // tier's own copy sizes (4 KiB pieces), to tell packing from sizes.
          using kvstrata::cachenode::PrecisionLadder;
          const PrecisionLadder kernels = kvstrata::cachenode::KernelFormatsLadder();
          std::string line = absl::StrFormat("  %5.1f%% node tier:  ", 100.0 * capacity / distinct);
          double tier_raw = 0;
          PrecisionLadder sized;
          for (int run_kind = 0; run_kind < 3; ++run_kind) {
            auto run = kvstrata::bench::ReplayThroughDramTier(
                *trace, capacity,
                run_kind == 0 ? kvstrata::v1::FORMAT_RAW : kvstrata::v1::FORMAT_INT4_KIVI,
                /*leases_by_bytes=*/run_kind == 2, absl::GetFlag(FLAGS_precision_policy));
            if (!run.ok()) {
              std::fprintf(stderr, "%s\n", run.status().ToString().c_str());
              return 1;
            }
            const double rate = run->total.token_hit_rate();
            if (run_kind == 0) tier_raw = rate;
            absl::StrAppendFormat(
                &line, " %s %.3f (%.2fx, error %.3f; %llu blocks, %.0f%% of memory in holes) |",
                run_kind == 0 ? "raw" : run_kind == 1 ? "int4 one lease" : "int4 by bytes", rate,
                tier_raw > 0 ? rate / tier_raw : 0.0, run->mean_error(kernels),
                static_cast<unsigned long long>(run->blocks),
                run->used_bytes ? 100.0 * (run->used_bytes - run->stored_bytes) / run->used_bytes : 0.0);
            // raw, fp8_e4m3, int4_kivi (v1 values 0, 1, 3) at the tier's sizes.
            sized = PrecisionLadder{{"raw", "fp8_e4m3", "int4_kivi"},
                                    {1.0, run->piece_ratio[1], run->piece_ratio[3]},
                                    {0.0, kernels.attention_error[1], kernels.attention_error[2]}};
          }
          std::printf("%s\n", line.c_str());
          line = absl::StrFormat("  %5.1f%% model at the tier's sizes (fp8 %.3f, int4 %.3f of raw):",
                                 100.0 * capacity / distinct, sized.bytes[1], sized.bytes[2]);
          for (PrecisionLease lease : {PrecisionLease::kFresh, PrecisionLease::kByBytes}) {
            auto run = kvstrata::cachenode::ReplayPrecision(*trace, static_cast<double>(capacity),
                                                            absl::GetFlag(FLAGS_precision_policy),
                                                            sized, 2, options, lease);
            if (!run.ok()) return 1;
            absl::StrAppendFormat(&line, " int4 %s %.3f (%.2fx, error %.3f) |",
                                  lease == PrecisionLease::kFresh ? "one lease" : "by bytes",
                                  run->total.token_hit_rate(),
                                  tier_raw > 0 ? run->total.token_hit_rate() / tier_raw : 0.0,
                                  run->mean_error(sized));
          }
          std::printf("%s\n", line.c_str());
          std::fflush(stdout);
        }
      }
    }
    if (const int nodes = absl::GetFlag(FLAGS_cluster_nodes); nodes > 0) {
      std::printf("%d nodes, %s on each: token hit rate vs one node of the whole capacity, and "
                  "load spread (most accesses on a node / mean)\n",
                  nodes, absl::GetFlag(FLAGS_cluster_policy).c_str());
      for (size_t capacity : capacities) {
        auto one = kvstrata::cachenode::ReplayCluster(*trace, 1, capacity,
                                                      absl::GetFlag(FLAGS_cluster_policy), 1,
                                                      options);
        if (!one.ok()) {
          std::fprintf(stderr, "%s\n", one.status().ToString().c_str());
          return 1;
        }
        std::string line = absl::StrFormat("  %5.1f%%: one node %.3f |", 100.0 * capacity / distinct,
                                           one->total.token_hit_rate());
        for (absl::string_view text :
             absl::StrSplit(absl::GetFlag(FLAGS_placement_groups), ',', absl::SkipEmpty())) {
          size_t group = 0;
          if (!absl::SimpleAtoi(text, &group) || group == 0) {
            std::fprintf(stderr, "bad placement group '%s'\n", std::string(text).c_str());
            return 1;
          }
          auto split = kvstrata::cachenode::ReplayCluster(*trace, nodes, capacity / nodes,
                                                          absl::GetFlag(FLAGS_cluster_policy),
                                                          group, options);
          if (!split.ok()) return 1;
          absl::StrAppendFormat(&line, " G=%zu %.3f (%.2fx, spread %.2f) |", group,
                                split->total.token_hit_rate(),
                                split->total.token_hit_rate() /
                                    std::max(one->total.token_hit_rate(), 1e-9),
                                split->load_spread());
        }
        std::printf("%s\n", line.c_str());
      }
    }
  }
  if (totals.points > 0) {
    std::printf("\nadaptive against LRU and the best other policy of each replay:\n%s",
                summary.c_str());
    std::printf(
        "adaptive >= lru - 0.005 at %d of %d points; within 0.01 of the best other policy at "
        "%d of %d; cost <= 2x lru at %d of %d\n",
        totals.at_or_above_lru, totals.points, totals.near_best, totals.points, totals.cheap,
        totals.points);
  }
  return 0;
}
