#include "metrics.h"

#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <map>

#include "absl/strings/str_cat.h"
#include "auth.h"
#include "hbm_stats.h"
#include "tenant_ledger.h"
#include "tiered_store.h"
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
  Collector(const NodeCounters& counters, TieredStore& store,
            const NamespaceRegistry& namespaces, const TenantLedger& ledger,
            transfer::Engine& engine, const Authenticator* auth)
      : counters_(counters),
        store_(store),
        namespaces_(namespaces),
        ledger_(ledger),
        engine_(engine),
        auth_(auth) {}

  std::vector<MetricFamily> Collect() const override {
    const auto& c = counters_;
    const TierCounters tier = store_.dram().counters();
    const std::vector<ClientMetric::Label> dram = {{"tier", "dram"}};
    const std::vector<ClientMetric::Label> nvme_label = {{"tier", "nvme"}};
    std::optional<NvmeCounters> nvme;
    if (store_.nvme() != nullptr) nvme = store_.nvme()->counters();
    // One sample per tier: DRAM's, and NVMe's when the node has one.
    auto per_tier = [&](double dram_value, auto nvme_value, MetricType type) {
      std::vector<ClientMetric> samples = {Sample(dram_value, type, dram)};
      if (nvme.has_value()) samples.push_back(Sample(nvme_value(*nvme), type, nvme_label));
      return samples;
    };
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
    // Known first: a hint is counted before it is counted as known, so this
    // order never reads more known hints than hints.
    const uint64_t known_hints = c.request_hints_known.load(std::memory_order_acquire);
    const uint64_t hints = c.request_hints.load(std::memory_order_acquire);
    out.push_back(Family(
        "kvstrata_request_hints_total",
        "RequestFinished hints passed to the eviction policies, by whether a tier held the "
        "request's last block (unknown: evicted already, or never published).",
        MetricType::Counter,
        {Sample(known_hints, MetricType::Counter, {{"result", "known"}}),
         Sample(hints - known_hints, MetricType::Counter, {{"result", "unknown"}})}));
    out.push_back(Family(
        "kvstrata_auth_denied_total",
        "Calls refused: no or unknown credential (unauthenticated), or another tenant's "
        "namespace or an admin RPC (permission_denied).",
        MetricType::Counter,
        {Sample(Load(c.unauthenticated_calls), MetricType::Counter, {{"reason", "unauthenticated"}}),
         Sample(Load(c.permission_denied_calls), MetricType::Counter,
                {{"reason", "permission_denied"}})}));
    out.push_back(Family("kvstrata_stalled_transfers_total",
                         "Publishes given up because their client stopped sending "
                         "(--transfer_stall_timeout); their reservations were released.",
                         MetricType::Counter, {Sample(Load(c.stalled_transfers), MetricType::Counter)}));
    out.push_back(Family(
        "kvstrata_device_clients_total",
        "Clients with GPU buffers, by the path the node chose for them: cuda_ipc (same "
        "host, HBM arena mapped) or staged (pinned host memory and UCX).",
        MetricType::Counter,
        {Sample(Load(c.device_ipc_clients), MetricType::Counter, {{"path", "cuda_ipc"}}),
         Sample(Load(c.device_staged_clients), MetricType::Counter, {{"path", "staged"}})}));
    out.push_back(Family("kvstrata_device_ipc_blocks_total",
                         "HBM blocks served to same-host clients by CUDA IPC.",
                         MetricType::Counter, {Sample(Load(c.device_ipc_blocks), MetricType::Counter)}));
    out.push_back(Family("kvstrata_device_ipc_pinned_blocks",
                         "HBM blocks pinned by CUDA IPC leases now.",
                         MetricType::Gauge, {Sample(Load(c.device_ipc_pinned_blocks), MetricType::Gauge)}));
    out.push_back(Family("kvstrata_ucx_discarded_messages_total",
                         "Stray UCX messages no transfer expected, received and dropped.",
                         MetricType::Counter,
                         {Sample(engine_.discarded_messages(), MetricType::Counter)}));
    {
      std::shared_ptr<const AuthTable> table = auth_ != nullptr ? auth_->table() : nullptr;
      std::map<std::string, TenantLedger::Usage> by_label;
      for (const TenantLedger::Usage& usage : ledger_.Snapshot()) {
        const std::string label = table != nullptr && table->Names(usage.tenant) ? usage.tenant : "other";
        TenantLedger::Usage& sum = by_label[label];
        sum.dram_bytes += usage.dram_bytes;
        sum.dram_blocks += usage.dram_blocks;
        sum.quota_evictions += usage.quota_evictions;
      }
      std::vector<ClientMetric> bytes, blocks, evicted;
      for (const auto& [label, usage] : by_label) {
        bytes.push_back(Sample(usage.dram_bytes, MetricType::Gauge, {{"tenant", label}}));
        blocks.push_back(Sample(usage.dram_blocks, MetricType::Gauge, {{"tenant", label}}));
        evicted.push_back(Sample(usage.quota_evictions, MetricType::Counter, {{"tenant", label}}));
      }
      out.push_back(Family("kvstrata_tenant_dram_bytes",
                           "Stored bytes in DRAM per tenant (tenants the auth file names; the "
                           "rest as \"other\").",
                           MetricType::Gauge, std::move(bytes)));
      out.push_back(Family("kvstrata_tenant_dram_blocks", "Blocks in DRAM per tenant.",
                           MetricType::Gauge, std::move(blocks)));
      out.push_back(Family("kvstrata_tenant_quota_evictions_total",
                           "A tenant's own blocks evicted to keep it within its DRAM quota.",
                           MetricType::Counter, std::move(evicted)));
    }
    std::vector<ClientMetric> bytes;
    for (const auto& [key, value] : c.transfer_bytes.Snapshot()) {
      bytes.push_back(Sample(static_cast<double>(value), MetricType::Counter,
                             {{"direction", key.first}, {"transport", key.second}}));
    }
    out.push_back(Family("kvstrata_transfer_bytes_total",
                         "Block bytes moved over UCX, by direction (in: publish, out: fetch) and "
                         "transport.",
                         MetricType::Counter, std::move(bytes)));
    out.push_back(Family("kvstrata_tier_capacity_bytes", "Capacity of each tier.", MetricType::Gauge,
                         per_tier(tier.capacity_bytes, [](const NvmeCounters& n) { return n.capacity_bytes; },
                                  MetricType::Gauge)));
    out.push_back(Family("kvstrata_tier_used_bytes", "Bytes of allocated chunks in each tier.",
                         MetricType::Gauge,
                         per_tier(tier.used_bytes, [](const NvmeCounters& n) { return n.used_bytes; },
                                  MetricType::Gauge)));
    out.push_back(Family("kvstrata_tier_stored_bytes", "Bytes of stored blocks in each tier.",
                         MetricType::Gauge,
                         per_tier(tier.stored_bytes, [](const NvmeCounters& n) { return n.stored_bytes; },
                                  MetricType::Gauge)));
    out.push_back(Family("kvstrata_tier_blocks", "Blocks stored in each tier.", MetricType::Gauge,
                         per_tier(tier.blocks, [](const NvmeCounters& n) { return n.blocks; },
                                  MetricType::Gauge)));
    out.push_back(Family("kvstrata_evictions_total", "Blocks evicted from each tier.",
                         MetricType::Counter,
                         per_tier(tier.evictions, [](const NvmeCounters& n) { return n.evictions; },
                                  MetricType::Counter)));
    {
      // Precision tiers: what DRAM holds at each stored format, and how many
      // blocks were transcoded coarser (rate() gives transcodes per second).
      static constexpr const char* kFormatNames[kStoredFormats] = {"raw", "fp8_e4m3", "int8",
                                                                   "int4_kivi", "int2_kivi"};
      std::vector<ClientMetric> blocks, bytes;
      for (size_t f = 0; f < kStoredFormats; ++f) {
        const std::vector<ClientMetric::Label> labels = {{"tier", "dram"}, {"format", kFormatNames[f]}};
        blocks.push_back(Sample(tier.format_blocks[f], MetricType::Gauge, labels));
        bytes.push_back(Sample(tier.format_bytes[f], MetricType::Gauge, labels));
        if (nvme.has_value()) {
          const std::vector<ClientMetric::Label> on_nvme = {{"tier", "nvme"}, {"format", kFormatNames[f]}};
          blocks.push_back(Sample(nvme->format_blocks[f], MetricType::Gauge, on_nvme));
          bytes.push_back(Sample(nvme->format_bytes[f], MetricType::Gauge, on_nvme));
        }
      }
      out.push_back(Family("kvstrata_stored_format_blocks", "Blocks stored per tier and stored format.",
                           MetricType::Gauge, std::move(blocks)));
      out.push_back(Family("kvstrata_stored_format_bytes",
                           "Stored bytes per tier and stored format.", MetricType::Gauge,
                           std::move(bytes)));
      out.push_back(Family("kvstrata_transcodes_total",
                           "Blocks transcoded to a coarser stored format to make room (precision tiers).",
                           MetricType::Counter, {Sample(tier.transcodes, MetricType::Counter)}));
      out.push_back(Family("kvstrata_precision_leases_total",
                           "Victims kept at their coarser format for another lease instead of "
                           "being transcoded or evicted (precision tiers' leases by bytes).",
                           MetricType::Counter,
                           {Sample(tier.precision_leases, MetricType::Counter)}));
    }
    out.push_back(Family("kvstrata_promoted_blocks_total",
                         "NVMe hits read back into DRAM.", MetricType::Counter,
                         {Sample(store_.promoted_blocks(), MetricType::Counter)}));
    if (nvme.has_value()) {
      out.push_back(Family(
          "kvstrata_demotions_total", "DRAM evictions offered to NVMe, by result.",
          MetricType::Counter,
          {Sample(nvme->demoted_blocks, MetricType::Counter, {{"result", "written"}}),
           Sample(nvme->demotion_drops, MetricType::Counter, {{"result", "dropped"}})}));
      out.push_back(Family("kvstrata_nvme_corrupt_total",
                           "NVMe blocks (failed checksum on read) and index records (damaged at "
                           "recovery) dropped as corrupt.",
                           MetricType::Counter,
                           {Sample(nvme->corrupt_blocks, MetricType::Counter, {{"what", "block"}}),
                            Sample(nvme->corrupt_records, MetricType::Counter, {{"what", "record"}})}));
      out.push_back(Family("kvstrata_nvme_recovered_blocks",
                           "Blocks the NVMe tier's last recovery found in its index.",
                           MetricType::Gauge, {Sample(nvme->recovered_blocks, MetricType::Gauge)}));
      out.push_back(Family("kvstrata_nvme_index_repairs_total",
                           "Times the NVMe index could not be read whole and was repaired, "
                           "rewritten from what read, or restarted empty.",
                           MetricType::Counter, {Sample(nvme->index_repairs, MetricType::Counter)}));
      out.push_back(Family("kvstrata_nvme_io_errors_total", "NVMe I/O and index errors.",
                           MetricType::Counter, {Sample(nvme->io_errors, MetricType::Counter)}));
      out.push_back(Family("kvstrata_nvme_ready", "1 once the NVMe index is recovered.",
                           MetricType::Gauge, {Sample(nvme->ready ? 1 : 0, MetricType::Gauge)}));
    }
    std::vector<ClientMetric> ingest;
    for (const auto& [key, value] : c.ingest_bytes.Snapshot()) {
      ingest.push_back(Sample(static_cast<double>(value), MetricType::Counter,
                              {{"format", key.first}, {"kind", key.second}}));
    }
    out.push_back(Family("kvstrata_ingest_bytes_total",
                         "Published block bytes by stored format, as received and as stored "
                         "(stored / received is what quantization saves).",
                         MetricType::Counter, std::move(ingest)));
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
    AddHbmMetrics(store_, out);
    return out;
  }

 private:
  const NodeCounters& counters_;
  TieredStore& store_;
  const NamespaceRegistry& namespaces_;
  const TenantLedger& ledger_;
  transfer::Engine& engine_;
  const Authenticator* auth_;
};

NodeMetrics::NodeMetrics(const NodeCounters& counters, TieredStore& store,
                         const NamespaceRegistry& namespaces, const TenantLedger& ledger,
                         transfer::Engine& engine, const Authenticator* auth)
    : registry_(std::make_shared<prometheus::Registry>()),
      requests_(&prometheus::BuildCounter()
                     .Name("kvstrata_rpc_requests_total")
                     .Help("Requests served, by method, status code and path (grpc or fast_path).")
                     .Register(*registry_)),
      durations_(&prometheus::BuildHistogram()
                      .Name("kvstrata_rpc_duration_seconds")
                      .Help("Request latency at the node, by method, status code and path.")
                      .Register(*registry_)),
      collector_(std::make_shared<Collector>(counters, store, namespaces, ledger, engine, auth)) {}

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

void NodeMetrics::ObserveRpc(const char* method, int code, absl::Duration elapsed,
                             const char* path) {
  // 25 µs (a lookup on loopback) to 10 s (a large transfer at its deadline).
  static const prometheus::Histogram::BucketBoundaries kBuckets = {
      25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3,
      25e-3, 50e-3, 0.1,    0.25,   0.5,    1,    2.5,    5,    10};
  const std::map<std::string, std::string> labels = {
      {"method", method}, {"code", std::to_string(code)}, {"path", path}};
  requests_->Add(labels).Increment();
  durations_->Add(labels, kBuckets).Observe(absl::ToDoubleSeconds(elapsed));
}

}  // namespace kvstrata::cachenode
