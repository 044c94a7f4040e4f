#include "metrics.h"

#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "absl/strings/str_cat.h"
#include "kvstrata/cachenode/dram_tier.h"
#include "kvstrata/cachenode/namespace_registry.h"
#include "kvstrata/transfer/engine.h"
#include "node_service.h"

namespace kvstrata::cachenode {
namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

ClientMetric Sample(double value, MetricType type,
                    std::vector<ClientMetric::Label> labels = {}) {
  ClientMetric metric;
  metric.label = std::move(labels);
  if (type == MetricType::Counter) {
    metric.counter.value = value;
  } else {
    metric.gauge.value = value;
  }
  return metric;
}

MetricFamily Family(std::string name, std::string help, MetricType type,
                    std::vector<ClientMetric> samples) {
  return MetricFamily{std::move(name), std::move(help), type, std::move(samples)};
}

double Load(const std::atomic<uint64_t>& v) {
  return static_cast<double>(v.load(std::memory_order_relaxed));
}

}  // namespace

// Reads the node's own counters at scrape time.
class NodeMetrics::Collector : public prometheus::Collectable {
 public:
  Collector(const NodeCounters& counters, const DramTier& dram,
            const NamespaceRegistry& namespaces, transfer::Engine& engine)
      : counters_(counters), dram_(dram), namespaces_(namespaces), engine_(engine) {}

  std::vector<MetricFamily> Collect() const override {
    const auto& c = counters_;
    const TierCounters tier = dram_.counters();
    const std::vector<ClientMetric::Label> dram = {{"tier", "dram"}};
    std::vector<MetricFamily> out;
    out.push_back(Family("kvstrata_lookup_blocks_total", "Blocks asked for by Lookup, by result.",
                         MetricType::Counter,
                         {Sample(Load(c.lookup_hit_blocks), MetricType::Counter, {{"result", "hit"}}),
                          Sample(Load(c.lookup_miss_blocks), MetricType::Counter, {{"result", "miss"}})}));
    out.push_back(Family("kvstrata_lookup_tokens_total",
                         "Prompt tokens covered by Lookup keys, by result (hit tokens are tokens "
                         "an engine need not recompute).",
                         MetricType::Counter,
                         {Sample(Load(c.lookup_hit_tokens), MetricType::Counter, {{"result", "hit"}}),
                          Sample(Load(c.lookup_miss_tokens), MetricType::Counter, {{"result", "miss"}})}));
    out.push_back(Family("kvstrata_fetch_blocks_total", "Blocks asked for by Fetch, by result.",
                         MetricType::Counter,
                         {Sample(Load(c.fetch_hit_blocks), MetricType::Counter, {{"result", "hit"}}),
                          Sample(Load(c.fetch_miss_blocks), MetricType::Counter, {{"result", "miss"}})}));
    out.push_back(Family(
        "kvstrata_publish_blocks_total", "Blocks offered by Publish, by result.", MetricType::Counter,
        {Sample(Load(c.published_blocks), MetricType::Counter, {{"result", "stored"}}),
         Sample(Load(c.duplicate_blocks), MetricType::Counter, {{"result", "duplicate"}}),
         Sample(Load(c.checksum_failures), MetricType::Counter, {{"result", "checksum_mismatch"}})}));
    out.push_back(Family("kvstrata_checksum_failures_total",
                         "Blocks whose bytes did not match their checksum (never stored).",
                         MetricType::Counter, {Sample(Load(c.checksum_failures), MetricType::Counter)}));
    out.push_back(Family("kvstrata_transfer_failures_total",
                         "UCX transfer batches that failed or missed their deadline.",
                         MetricType::Counter, {Sample(Load(c.transfer_failures), MetricType::Counter)}));
    std::vector<ClientMetric> bytes;
    for (const auto& [key, value] : c.TransferBytes()) {
      bytes.push_back(Sample(static_cast<double>(value), MetricType::Counter,
                             {{"direction", key.first}, {"transport", key.second}}));
    }
    out.push_back(Family("kvstrata_transfer_bytes_total",
                         "Block bytes moved over UCX, by direction (in: publish, out: fetch) and "
                         "transport.",
                         MetricType::Counter, std::move(bytes)));
    out.push_back(Family("kvstrata_tier_capacity_bytes", "Capacity of each tier.", MetricType::Gauge,
                         {Sample(tier.capacity_bytes, MetricType::Gauge, dram)}));
    out.push_back(Family("kvstrata_tier_used_bytes", "Bytes of allocated chunks in each tier.",
                         MetricType::Gauge, {Sample(tier.used_bytes, MetricType::Gauge, dram)}));
    out.push_back(Family("kvstrata_tier_stored_bytes", "Bytes of stored blocks in each tier.",
                         MetricType::Gauge, {Sample(tier.stored_bytes, MetricType::Gauge, dram)}));
    out.push_back(Family("kvstrata_tier_blocks", "Blocks stored in each tier.", MetricType::Gauge,
                         {Sample(tier.blocks, MetricType::Gauge, dram)}));
    out.push_back(Family("kvstrata_evictions_total", "Blocks evicted from each tier.",
                         MetricType::Counter, {Sample(tier.evictions, MetricType::Counter, dram)}));
    out.push_back(Family("kvstrata_stored_format_bytes",
                         "Stored bytes by stored format (compression shows against raw).",
                         MetricType::Gauge,
                         {Sample(tier.stored_bytes, MetricType::Gauge, {{"format", "raw"}})}));
    out.push_back(Family("kvstrata_namespaces", "Namespaces opened on this node.", MetricType::Gauge,
                         {Sample(namespaces_.size(), MetricType::Gauge)}));
    std::vector<ClientMetric> transports;
    for (const std::string& t : engine_.ActiveTransports()) {
      transports.push_back(Sample(1, MetricType::Gauge, {{"transport", t}}));
    }
    out.push_back(Family("kvstrata_ucx_transport_in_use",
                         "1 for each UCX transport the node's live endpoints use.", MetricType::Gauge,
                         std::move(transports)));
    out.push_back(Family("kvstrata_build_info", "Always 1; the labels say which build runs.",
                         MetricType::Gauge,
                         {Sample(1, MetricType::Gauge, {{"version", KVSTRATA_VERSION}})}));
    return out;
  }

 private:
  const NodeCounters& counters_;
  const DramTier& dram_;
  const NamespaceRegistry& namespaces_;
  transfer::Engine& engine_;
};

NodeMetrics::NodeMetrics(const NodeCounters& counters, const DramTier& dram,
                         const NamespaceRegistry& namespaces, transfer::Engine& engine)
    : registry_(std::make_shared<prometheus::Registry>()),
      requests_(&prometheus::BuildCounter()
                     .Name("kvstrata_rpc_requests_total")
                     .Help("gRPC requests served, by method and status code.")
                     .Register(*registry_)),
      durations_(&prometheus::BuildHistogram()
                      .Name("kvstrata_rpc_duration_seconds")
                      .Help("gRPC request latency at the node, by method and status code.")
                      .Register(*registry_)),
      collector_(std::make_shared<Collector>(counters, dram, namespaces, engine)) {}

NodeMetrics::~NodeMetrics() = default;

absl::Status NodeMetrics::Serve(const std::string& listen) {
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(listen);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", listen, ": ", e.what()));
  }
  exposer_->RegisterCollectable(registry_);
  exposer_->RegisterCollectable(collector_);
  const std::vector<int> ports = exposer_->GetListeningPorts();
  port_ = ports.empty() ? 0 : ports.front();
  return absl::OkStatus();
}

void NodeMetrics::ObserveRpc(const char* method, int code, absl::Duration elapsed) {
  // 25 µs (a lookup on loopback) to 10 s (a large transfer at its deadline).
  static const prometheus::Histogram::BucketBoundaries kBuckets = {
      25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3,
      25e-3, 50e-3, 0.1,    0.25,   0.5,    1,    2.5,    5,    10};
  requests_->Add({{"method", method}, {"code", std::to_string(code)}}).Increment();
  durations_->Add({{"method", method}, {"code", std::to_string(code)}}, kBuckets)
      .Observe(absl::ToDoubleSeconds(elapsed));
}

}  // namespace kvstrata::cachenode
