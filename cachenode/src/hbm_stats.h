// The HBM tier in Stats and in Prometheus metrics: kept apart from
// node_service.cc and metrics.cc, which each call one function here.
#pragma once

#include <prometheus/metric_family.h>

#include <vector>

#include "kvstrata.pb.h"
#include "tiered_store.h"

namespace kvstrata::cachenode {

// Adds the HBM tier's TierStats and hbm_* fields; nothing without HBM.
void AddHbmStats(TieredStore& store, v1::StatsResponse* response);
// Adds a tier="hbm" sample to the per-tier families already in `families`
// (kvstrata_tier_*, kvstrata_evictions_total) and the HBM families; nothing
// without HBM.
void AddHbmMetrics(TieredStore& store, std::vector<prometheus::MetricFamily>& families);

}  // namespace kvstrata::cachenode
