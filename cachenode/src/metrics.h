// Prometheus metrics of a node, served on /metrics (prometheus-cpp).
//
// Counts live where the node keeps them anyway (NodeCounters, the tier, the
// namespace registry); a collector reads them at scrape time, so nothing is
// counted twice. Only what exists nowhere else — RPC counts and latency
// histograms — is kept here.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace prometheus {
class Counter;
class Exposer;
class Histogram;
class Registry;
template <typename T>
class Family;
}  // namespace prometheus

namespace kvstrata::transfer {
class Engine;
}

namespace kvstrata::cachenode {

struct NodeCounters;
class TieredStore;
class NamespaceRegistry;
class TenantLedger;
class Authenticator;

class NodeMetrics {
 public:
  // `auth` may be null; with one, per-tenant series are labelled by the
  // tenants its file names (others add up under "other"), so callers cannot
  // grow the label set.
  NodeMetrics(const NodeCounters& counters, TieredStore& store,
              const NamespaceRegistry& namespaces, const TenantLedger& ledger,
              transfer::Engine& engine, const Authenticator* auth);
  ~NodeMetrics();

  // Serves /metrics on `listen` ("host:port"; port 0 picks a free one).
  absl::Status Serve(const std::string& listen);
  int port() const { return port_; }

  // One finished request: counted and timed by method, status code and path
  // ("grpc", or "fast_path" for a UCX active-message request, timed to its
  // reply or, for a publish whose data comes by rendezvous, to its hand-off).
  void ObserveRpc(const char* method, int code, absl::Duration elapsed,
                  const char* path = "grpc");

  class Collector;

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Family<prometheus::Histogram>* durations_;
  std::shared_ptr<Collector> collector_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
};

}  // namespace kvstrata::cachenode
