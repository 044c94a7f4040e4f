#include "hbm_stats.h"

#include <map>
#include <string>

namespace kvstrata::cachenode {
namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

ClientMetric Sample(double value, MetricType type, std::vector<ClientMetric::Label> labels = {}) {
  ClientMetric metric;
  metric.label = std::move(labels);
  if (type == MetricType::Counter) {
    metric.counter.value = value;
  } else {
    metric.gauge.value = value;
  }
  return metric;
}

}  // namespace

void AddHbmStats(TieredStore& store, v1::StatsResponse* response) {
  HbmTier* hbm = store.hbm();
  if (hbm == nullptr) return;
  const HbmCounters c = hbm->counters();
  v1::TierStats* tier = response->add_tiers();
  tier->set_tier(v1::TIER_HBM);
  tier->set_capacity_bytes(c.tier.capacity_bytes);
  tier->set_used_bytes(c.tier.used_bytes);
  tier->set_stored_bytes(c.tier.stored_bytes);
  tier->set_blocks(c.tier.blocks);
  tier->set_evictions(c.tier.evictions);
  tier->set_errors(c.copy_errors);
  const TieredStore::HbmMoves moves = store.hbm_moves();
  response->set_hbm_promoted_blocks(moves.promoted);
  response->set_hbm_demoted_blocks(moves.demoted);
  response->set_hbm_demotion_drops(moves.demotion_drops);
  response->set_hbm_staged_blocks(c.staged_blocks);
  response->set_hbm_staging_fallbacks(c.staging_fallbacks);
  response->set_hbm_staging_bytes(c.staging.capacity_bytes);
  response->set_hbm_staging_leased_bytes(c.staging.leased_bytes);
  response->set_gpu_device(hbm->device().description());
  response->set_hbm_ucx_cuda_memory(hbm->ucx_cuda_memory());
}

void AddHbmMetrics(TieredStore& store, std::vector<MetricFamily>& families) {
  HbmTier* hbm = store.hbm();
  if (hbm == nullptr) return;
  const HbmCounters c = hbm->counters();
  const std::vector<ClientMetric::Label> label = {{"tier", "hbm"}};
  const std::map<std::string, double> per_tier = {
      {"kvstrata_tier_capacity_bytes", c.tier.capacity_bytes},
      {"kvstrata_tier_used_bytes", c.tier.used_bytes},
      {"kvstrata_tier_stored_bytes", c.tier.stored_bytes},
      {"kvstrata_tier_blocks", c.tier.blocks},
      {"kvstrata_evictions_total", c.tier.evictions}};
  for (MetricFamily& family : families) {
    auto it = per_tier.find(family.name);
    if (it != per_tier.end()) family.metric.push_back(Sample(it->second, family.type, label));
  }
  const TieredStore::HbmMoves moves = store.hbm_moves();
  families.push_back({"kvstrata_hbm_moves_total",
                      "Blocks moved between HBM and DRAM: promoted (a hit moved up), demoted (an "
                      "HBM eviction kept below), dropped (an HBM eviction with no room below).",
                      MetricType::Counter,
                      {Sample(moves.promoted, MetricType::Counter, {{"move", "promoted"}}),
                       Sample(moves.demoted, MetricType::Counter, {{"move", "demoted"}}),
                       Sample(moves.demotion_drops, MetricType::Counter, {{"move", "dropped"}})}});
  families.push_back(
      {"kvstrata_hbm_staged_blocks_total",
       "Host copies of HBM blocks made for transfers, by where: the pinned staging "
       "pool, or memory of their own when the pool was full.",
       MetricType::Counter,
       {Sample(c.staged_blocks - c.staging_fallbacks, MetricType::Counter, {{"buffer", "staging"}}),
        Sample(c.staging_fallbacks, MetricType::Counter, {{"buffer", "fallback"}})}});
  families.push_back({"kvstrata_hbm_staging_bytes",
                      "The staging pool: capacity and bytes lent now.",
                      MetricType::Gauge,
                      {Sample(c.staging.capacity_bytes, MetricType::Gauge, {{"what", "capacity"}}),
                       Sample(c.staging.leased_bytes, MetricType::Gauge, {{"what", "leased"}})}});
  families.push_back({"kvstrata_hbm_copy_errors_total",
                      "Device copies that failed.",
                      MetricType::Counter,
                      {Sample(c.copy_errors, MetricType::Counter)}});
}

}  // namespace kvstrata::cachenode
