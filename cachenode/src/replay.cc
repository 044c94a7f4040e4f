#include "kvstrata/cachenode/replay.h"

#include <algorithm>
#include <cmath>
#include <ctime>
#include <cstring>
#include <fstream>
#include <functional>
#include <queue>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"

namespace kvstrata::cachenode {
namespace {

// The value after `"key":` in a flat JSON object, up to the next ',' or '}'
// (or the whole [...] array).
absl::string_view JsonField(absl::string_view line, absl::string_view key) {
  const std::string quoted = absl::StrCat("\"", key, "\"");
  size_t at = line.find(quoted);
  if (at == absl::string_view::npos) return {};
  at = line.find(':', at + quoted.size());
  if (at == absl::string_view::npos) return {};
  ++at;
  while (at < line.size() && line[at] == ' ') ++at;
  if (at == line.size()) return {};  // `"key":` ends the line (found by tests/fuzz)
  size_t end = line[at] == '[' ? line.find(']', at) + 1 : line.find_first_of(",}", at);
  if (end == absl::string_view::npos || end == 0) return {};
  return line.substr(at, end - at);
}

BlockId IdOf(uint64_t hash) { return NumberedBlockId(hash); }

// CPU time of the calling thread: a replay's cost on a shared machine, where
// wall time also counts the other processes' turns on the cores.
double ThreadCpuSeconds() {
  timespec now{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
  return now.tv_sec + now.tv_nsec * 1e-9;
}

}  // namespace

absl::StatusOr<TraceRequest> ParseMooncakeRequest(std::string_view text) {
  const absl::string_view line(text.data(), text.size());
  TraceRequest request;
  absl::string_view ids = JsonField(line, "hash_ids");
  if (!absl::SimpleAtod(JsonField(line, "timestamp"), &request.timestamp) ||
      !absl::SimpleAtoi(JsonField(line, "input_length"), &request.input_length) ||
      ids.size() < 2 || ids.front() != '[') {
    return absl::InvalidArgumentError("not a Mooncake request");
  }
  if (!absl::SimpleAtoi(JsonField(line, "output_length"), &request.output_length)) {
    request.output_length = 0;  // optional for replay
  }
  ids = ids.substr(1, ids.size() - 2);
  while (!ids.empty()) {
    const size_t comma = ids.find(',');
    absl::string_view item = ids.substr(0, comma);
    while (!item.empty() && item.front() == ' ') item.remove_prefix(1);
    uint64_t id;
    if (!item.empty()) {
      if (!absl::SimpleAtoi(item, &id)) return absl::InvalidArgumentError("bad hash id");
      request.hash_ids.push_back(id);
    }
    if (comma == absl::string_view::npos) break;
    ids.remove_prefix(comma + 1);
  }
  return request;
}

absl::StatusOr<std::vector<TraceRequest>> LoadMooncakeTrace(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read trace ", path));
  std::vector<TraceRequest> trace;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    absl::StatusOr<TraceRequest> request = ParseMooncakeRequest(line);
    if (!request.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", number, ": ", request.status().message()));
    }
    trace.push_back(*std::move(request));
  }
  return trace;
}

size_t DistinctBlocks(const std::vector<TraceRequest>& trace) {
  absl::flat_hash_set<uint64_t> seen;
  for (const TraceRequest& request : trace) seen.insert(request.hash_ids.begin(), request.hash_ids.end());
  return seen.size();
}

namespace {

// Prefix hits of one request, given what is cached now.
template <typename Cached>
void CountPrefix(const TraceRequest& request, const Cached& cached, ReplayResult& result) {
  size_t prefix = 0;
  while (prefix < request.hash_ids.size() && cached(request.hash_ids[prefix])) ++prefix;
  result.prefix_hit_blocks += prefix;
  result.total_blocks += request.hash_ids.size();
  result.hit_tokens += std::min<uint64_t>(prefix * kTraceTokensPerBlock, request.input_length);
  result.total_tokens += request.input_length;
}

// Finished-hints in flight: each request's hint is due at its timestamp +
// output_length x decode_ms_per_token (ReplayOptions), and hints due by a
// request's arrival reach the policy before it, earliest first.
class HintQueue {
 public:
  HintQueue(const std::vector<TraceRequest>& trace, const ReplayOptions& options)
      : trace_(trace), ms_per_token_(options.decode_ms_per_token) {}
  // Request r arrives: `deliver(finished)` for each hint due by then, then
  // r's own hint is queued.
  template <typename Deliver>
  void Arrive(size_t r, Deliver deliver) {
    const TraceRequest& request = trace_[r];
    while (!due_.empty() && due_.top().first <= request.timestamp) {
      const TraceRequest& finished = trace_[due_.top().second];
      due_.pop();
      deliver(finished);
    }
    if (ms_per_token_ >= 0 && !request.hash_ids.empty()) {
      due_.push({request.timestamp + request.output_length * ms_per_token_, r});
    }
  }

 private:
  using Hint = std::pair<double, size_t>;  // (due time, request index)
  const std::vector<TraceRequest>& trace_;
  const double ms_per_token_;
  std::priority_queue<Hint, std::vector<Hint>, std::greater<>> due_;
};

}  // namespace

ReplayResult Replay(const std::vector<TraceRequest>& trace, size_t capacity_blocks,
                    EvictionPolicy& policy, const ReplayOptions& options) {
  ReplayResult result;
  absl::flat_hash_set<uint64_t> cached;
  HintQueue hints(trace, options);
  const double start = ThreadCpuSeconds();
  for (size_t r = 0; r < trace.size(); ++r) {
    const TraceRequest& request = trace[r];
    hints.Arrive(r, [&](const TraceRequest& finished) {
      ++result.operations;
      policy.OnRequestFinished(IdOf(finished.hash_ids.back()), finished.output_tokens());
    });
    CountPrefix(request, [&](uint64_t id) { return cached.contains(id); }, result);
    for (size_t i = 0; i < request.hash_ids.size(); ++i) {
      const uint64_t id = request.hash_ids[i];
      ++result.operations;
      if (cached.contains(id)) {
        ++result.access_hits;
        policy.OnHit(IdOf(id));
        continue;
      }
      if (capacity_blocks == 0) continue;
      while (cached.size() >= capacity_blocks) {
        std::optional<BlockId> victim = policy.Victim();
        if (!victim.has_value()) break;
        uint64_t evicted;
        std::memcpy(&evicted, victim->key.bytes.data(), sizeof(evicted));
        cached.erase(evicted);
        policy.OnErase(*victim);
        ++result.operations;
      }
      cached.insert(id);
      policy.OnInsert(IdOf(id), i > 0 ? std::optional<BlockId>(IdOf(request.hash_ids[i - 1]))
                                      : std::nullopt);
    }
    if (options.after_request) options.after_request(r);
  }
  result.seconds = ThreadCpuSeconds() - start;
  return result;
}

ReplayResult ReplayBelady(const std::vector<TraceRequest>& trace, size_t capacity_blocks) {
  // Next access (position in the flattened access sequence) of every access.
  std::vector<uint64_t> sequence;
  for (const TraceRequest& request : trace) {
    sequence.insert(sequence.end(), request.hash_ids.begin(), request.hash_ids.end());
  }
  constexpr size_t kNever = ~size_t{0};
  std::vector<size_t> next(sequence.size());
  absl::flat_hash_map<uint64_t, size_t> last;
  for (size_t k = sequence.size(); k-- > 0;) {
    auto it = last.find(sequence[k]);
    next[k] = it == last.end() ? kNever : it->second;
    last[sequence[k]] = k;
  }
  ReplayResult result;
  absl::flat_hash_map<uint64_t, size_t> cached;  // id -> its next access
  std::priority_queue<std::pair<size_t, uint64_t>> farthest;  // lazy max-heap
  size_t k = 0;
  const double start = ThreadCpuSeconds();
  for (const TraceRequest& request : trace) {
    CountPrefix(request, [&](uint64_t id) { return cached.contains(id); }, result);
    for (uint64_t id : request.hash_ids) {
      const size_t next_use = next[k++];
      ++result.operations;
      auto it = cached.find(id);
      if (it != cached.end()) {
        ++result.access_hits;
        it->second = next_use;
        farthest.push({next_use, id});
        continue;
      }
      if (capacity_blocks == 0) continue;
      if (cached.size() >= capacity_blocks) {
        while (true) {  // drop stale heap entries
          auto [use, candidate] = farthest.top();
          auto c = cached.find(candidate);
          if (c != cached.end() && c->second == use) break;
          farthest.pop();
        }
        if (farthest.top().first <= next_use) continue;  // the new block is the worst: bypass
        cached.erase(farthest.top().second);
        farthest.pop();
      }
      cached[id] = next_use;
      farthest.push({next_use, id});
    }
  }
  result.seconds = ThreadCpuSeconds() - start;
  return result;
}

namespace {

// Rendezvous weight of (placement key, node): a splitmix64 mix, stable.
uint64_t Weight(uint64_t key, uint64_t node) {
  uint64_t x = key * 0x9e3779b97f4a7c15ULL + (node + 1) * 0xc2b2ae3d27d4eb4fULL;
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace

double ClusterReplayResult::load_spread() const {
  if (accesses.empty()) return 0;
  uint64_t sum = 0, most = 0;
  for (uint64_t a : accesses) {
    sum += a;
    most = std::max(most, a);
  }
  return sum ? static_cast<double>(most) * accesses.size() / sum : 0;
}

absl::StatusOr<ClusterReplayResult> ReplayCluster(const std::vector<TraceRequest>& trace,
                                                  size_t nodes, size_t capacity_per_node,
                                                  std::string_view policy_name, size_t group,
                                                  const ReplayOptions& options) {
  if (nodes == 0 || group == 0) return absl::InvalidArgumentError("nodes and group must be > 0");
  struct Node {
    std::unique_ptr<EvictionPolicy> policy;
    absl::flat_hash_set<uint64_t> cached;
  };
  std::vector<Node> cluster(nodes);
  for (Node& node : cluster) {
    absl::StatusOr<std::unique_ptr<EvictionPolicy>> made = MakeEvictionPolicy(policy_name);
    if (!made.ok()) return made.status();
    node.policy = *std::move(made);
  }
  ClusterReplayResult result;
  result.accesses.assign(nodes, 0);
  auto owner = [&](const TraceRequest& request, size_t i) {
    size_t anchor = i - i % group;
    const uint64_t key = request.hash_ids[anchor];
    size_t best = 0;
    for (size_t n = 1; n < nodes; ++n) {
      if (Weight(key, n) > Weight(key, best)) best = n;
    }
    return best;
  };
  HintQueue hints(trace, options);
  std::vector<size_t> owners;
  const double start = ThreadCpuSeconds();
  for (size_t r = 0; r < trace.size(); ++r) {
    const TraceRequest& request = trace[r];
    if (request.hash_ids.empty()) continue;
    hints.Arrive(r, [&](const TraceRequest& finished) {
      cluster[owner(finished, finished.hash_ids.size() - 1)].policy->OnRequestFinished(
          IdOf(finished.hash_ids.back()), finished.output_tokens());
    });
    owners.clear();
    for (size_t i = 0; i < request.hash_ids.size(); ++i) owners.push_back(owner(request, i));
    size_t k = 0;  // CountPrefix asks for the request's blocks in order
    CountPrefix(request, [&](uint64_t id) { return cluster[owners[k++]].cached.contains(id); },
                result.total);
    for (size_t i = 0; i < request.hash_ids.size(); ++i) {
      const uint64_t id = request.hash_ids[i];
      Node& node = cluster[owners[i]];
      ++result.accesses[owners[i]];
      ++result.total.operations;
      if (node.cached.contains(id)) {
        ++result.total.access_hits;
        node.policy->OnHit(IdOf(id));
        continue;
      }
      while (node.cached.size() >= capacity_per_node) {
        std::optional<BlockId> victim = node.policy->Victim();
        if (!victim.has_value()) break;
        uint64_t evicted;
        std::memcpy(&evicted, victim->key.bytes.data(), sizeof(evicted));
        node.cached.erase(evicted);
        node.policy->OnErase(*victim);
      }
      if (capacity_per_node == 0) continue;
      node.cached.insert(id);
      node.policy->OnInsert(IdOf(id), i > 0 ? std::optional<BlockId>(IdOf(request.hash_ids[i - 1]))
                                            : std::nullopt);
    }
  }
  result.total.seconds = ThreadCpuSeconds() - start;
  return result;
}

PrecisionLadder KernelFormatsLadder() {
  return {{"raw", "fp8_e4m3", "int4_kivi", "int2_kivi"},
          {1.0, 1.0 / 2.0, 1.0 / 3.2, 1.0 / 5.33},
          {0.0, 0.0259, 0.0766, 0.4078}};
}

double PrecisionReplayResult::mean_error(const PrecisionLadder& ladder) const {
  double weighted = 0;
  uint64_t blocks = 0;
  for (size_t level = 0; level < hit_blocks.size() && level < ladder.attention_error.size();
       ++level) {
    weighted += hit_blocks[level] * ladder.attention_error[level];
    blocks += hit_blocks[level];
  }
  return blocks ? weighted / blocks : 0;
}

absl::StatusOr<PrecisionReplayResult> ReplayPrecision(const std::vector<TraceRequest>& trace,
                                                      double capacity_raw_blocks,
                                                      std::string_view policy_name,
                                                      const PrecisionLadder& ladder,
                                                      size_t coarsest,
                                                      const ReplayOptions& options,
                                                      PrecisionLease lease) {
  if (ladder.bytes.empty() || ladder.bytes.size() != ladder.formats.size() ||
      coarsest >= ladder.bytes.size()) {
    return absl::InvalidArgumentError("the ladder needs a byte ratio per format, up to coarsest");
  }
  absl::StatusOr<std::unique_ptr<EvictionPolicy>> made = MakeEvictionPolicy(policy_name);
  if (!made.ok()) return made.status();
  EvictionPolicy& policy = **made;
  PrecisionReplayResult result;
  result.hit_blocks.assign(ladder.bytes.size(), 0);
  // Leases a block gets at each rung.
  std::vector<uint8_t> grant(ladder.bytes.size(), 1);
  if (lease == PrecisionLease::kByBytes) {
    for (size_t l = 0; l < grant.size(); ++l) {
      if (ladder.bytes[l] <= 0) return absl::InvalidArgumentError("a format of no bytes");
      grant[l] = static_cast<uint8_t>(std::clamp(std::round(ladder.bytes[0] / ladder.bytes[l]), 1.0, 255.0));
    }
  }
  struct Held {
    uint8_t level = 0;   // its format in the ladder
    uint8_t leases = 1;  // leases left at that format, this one included
  };
  absl::flat_hash_map<uint64_t, Held> level;  // cached block -> its format
  double used = 0;
  HintQueue hints(trace, options);
  const double start = ThreadCpuSeconds();
  for (size_t r = 0; r < trace.size(); ++r) {
    const TraceRequest& request = trace[r];
    hints.Arrive(r, [&](const TraceRequest& finished) {
      policy.OnRequestFinished(IdOf(finished.hash_ids.back()), finished.output_tokens());
    });
    CountPrefix(request, [&](uint64_t id) { return level.contains(id); }, result.total);
    for (size_t i = 0; i < request.hash_ids.size(); ++i) {
      auto it = level.find(request.hash_ids[i]);
      if (it == level.end()) break;
      ++result.hit_blocks[it->second.level];
    }
    for (size_t i = 0; i < request.hash_ids.size(); ++i) {
      const uint64_t id = request.hash_ids[i];
      ++result.total.operations;
      if (auto hit = level.find(id); hit != level.end()) {
        hit->second.leases = grant[hit->second.level];  // a hit renews them all
        ++result.total.access_hits;
        policy.OnHit(IdOf(id));
        continue;
      }
      if (capacity_raw_blocks < ladder.bytes[0]) continue;
      while (used + ladder.bytes[0] > capacity_raw_blocks + 1e-9) {
        std::optional<BlockId> victim = policy.Victim();
        if (!victim.has_value()) break;
        uint64_t v;
        std::memcpy(&v, victim->key.bytes.data(), sizeof(v));
        Held& held = level[v];
        if (held.leases > 1) {  // another lease at the same format
          --held.leases;
          policy.OnKept(*victim);
          continue;
        }
        uint8_t& l = held.level;
        if (l < coarsest) {
          used -= ladder.bytes[l] - ladder.bytes[l + 1];
          ++l;
          held.leases = grant[l];
          ++result.transcodes;
          policy.OnKept(*victim);  // a fresh lease at the coarser format
          continue;
        }
        used -= ladder.bytes[l];
        level.erase(v);
        policy.OnErase(*victim);
      }
      level[id] = Held{0, grant[0]};
      used += ladder.bytes[0];
      policy.OnInsert(IdOf(id), i > 0 ? std::optional<BlockId>(IdOf(request.hash_ids[i - 1]))
                                      : std::nullopt);
    }
  }
  result.total.seconds = ThreadCpuSeconds() - start;
  return result;
}

namespace {
double NsPerOp(const ReplayResult& r) {
  return 1e9 * r.seconds / std::max<uint64_t>(r.operations, 1);
}
}  // namespace

double PolicyComparison::gap_closed() const {
  const double gap = belady.token_hit_rate() - lru.token_hit_rate();
  return gap > 0 ? (result.token_hit_rate() - lru.token_hit_rate()) / gap : 0;
}

double PolicyComparison::cost_vs_lru() const {
  const double base = NsPerOp(lru);
  return base > 0 ? NsPerOp(result) / base : 0;
}

absl::StatusOr<std::vector<PolicyComparison>> ComparePolicies(
    const std::vector<TraceRequest>& trace, const std::vector<size_t>& capacities_blocks,
    const std::vector<std::string>& policies, int repeats, const ReplayOptions& options) {
  std::vector<PolicyComparison> rows;
  for (size_t capacity : capacities_blocks) {
    const ReplayResult belady = ReplayBelady(trace, capacity);
    // LRU is replayed beside each policy so both timings share the moment's
    // machine load.
    for (const std::string& name : policies) {
      PolicyComparison row;
      row.policy = name;
      row.capacity_blocks = capacity;
      row.belady = belady;
      for (int round = 0; round < std::max(1, repeats); ++round) {
        absl::StatusOr<std::unique_ptr<EvictionPolicy>> policy = MakeEvictionPolicy(name);
        if (!policy.ok()) return policy.status();
        std::unique_ptr<EvictionPolicy> lru = MakeLruPolicy();
        ReplayResult lru_run = Replay(trace, capacity, *lru, options);
        ReplayResult run = Replay(trace, capacity, **policy, options);
        if (round == 0 || lru_run.seconds < row.lru.seconds) row.lru = lru_run;
        if (round == 0 || run.seconds < row.result.seconds) row.result = run;
      }
      rows.push_back(std::move(row));
    }
  }
  return rows;
}

std::string FormatComparisons(const std::vector<PolicyComparison>& rows, size_t distinct_blocks) {
  std::string out =
      absl::StrFormat("%-14s %9s %6s | %-21s | %-21s | %6s | %13s\n", "policy", "capacity", "%",
                      "token hit: pol lru bel", "block hit: pol lru bel", "gap", "ns/op (xLRU)");
  for (const PolicyComparison& row : rows) {
    absl::StrAppend(
        &out,
        absl::StrFormat(
            "%-14s %9zu %5.1f%% | %.3f %.3f %.3f   | %.3f %.3f %.3f   | %6.2f | %5.0f (%.2fx)\n",
            row.policy, row.capacity_blocks,
            distinct_blocks ? 100.0 * row.capacity_blocks / distinct_blocks : 0.0,
            row.result.token_hit_rate(), row.lru.token_hit_rate(), row.belady.token_hit_rate(),
            row.result.block_hit_rate(), row.lru.block_hit_rate(), row.belady.block_hit_rate(),
            row.gap_closed(), NsPerOp(row.result), row.cost_vs_lru()));
  }
  return out;
}

}  // namespace kvstrata::cachenode
