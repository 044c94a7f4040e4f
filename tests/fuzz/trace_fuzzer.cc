// Trace lines (kvstrata replay --trace, policy_bench): each input line goes
// through ParseMooncakeRequest; the requests it accepts are replayed against
// every eviction policy and Belady at a small capacity. Parsing never reads outside the line;
// replay counts stay consistent (hits never exceed accesses).
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "kvstrata/cachenode/eviction_policy.h"
#include "kvstrata/cachenode/replay.h"

namespace cachenode = kvstrata::cachenode;

namespace {

void Check(bool condition) {
  if (!condition) std::abort();
}

void CheckCounts(const cachenode::ReplayResult& r) {
  Check(r.hit_tokens <= r.total_tokens);
  Check(r.prefix_hit_blocks <= r.total_blocks);
  Check(r.access_hits <= r.total_blocks);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  std::vector<cachenode::TraceRequest> trace;
  while (!text.empty()) {
    const size_t end = text.find('\n');
    // A copy of exactly the line's bytes: ASan reports any read past it.
    const std::vector<char> line(text.begin(), text.begin() + std::min(end, text.size()));
    text.remove_prefix(end == std::string_view::npos ? text.size() : end + 1);
    absl::StatusOr<cachenode::TraceRequest> request =
        cachenode::ParseMooncakeRequest(std::string_view(line.data(), line.size()));
    if (!request.ok()) {
      Check(absl::IsInvalidArgument(request.status()));
      continue;
    }
    trace.push_back(*std::move(request));
  }
  if (trace.empty()) return 0;
  for (size_t capacity : {size_t{0}, size_t{3}}) {
    CheckCounts(cachenode::ReplayBelady(trace, capacity));
    // Every policy the node offers: a trace drives their hints too.
    for (const char* name : {"lru", "prefix-lru", "prefix-freq", "chain-protect", "chain-slru", "return-aware",
                             "adaptive"}) {
      auto policy = cachenode::MakeEvictionPolicy(name);
      Check(policy.ok());
      cachenode::ReplayResult result = cachenode::Replay(trace, capacity, **policy);
      CheckCounts(result);
      if (capacity == 0) Check(result.prefix_hit_blocks == 0);
    }
  }
  return 0;
}
