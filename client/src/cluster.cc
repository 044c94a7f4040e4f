#include "kvstrata/client/cluster.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <future>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "client_impl.h"

namespace kvstrata::client {
namespace {

// One member of the cluster: its client, health, and the namespaces opened on it.
struct Node {
  std::string address;
  std::unique_ptr<Client> client;
  std::atomic<bool> healthy{false};
  std::atomic<bool> draining{false};
  std::atomic<uint64_t> incarnation{0};  // changes when the node process restarts
  absl::Mutex mu;
  absl::flat_hash_map<uint64_t, Namespace> namespaces ABSL_GUARDED_BY(mu);
};
using NodePtr = std::shared_ptr<Node>;

bool NodeIsDown(const absl::Status& status) {
  return absl::IsUnavailable(status) || absl::IsDeadlineExceeded(status);
}

uint64_t Score(const BlockKey& key, uint64_t node_seed) {
  return XXH3_64bits_withSeed(key.bytes.data(), key.bytes.size(), node_seed);
}

uint64_t NodeSeed(const std::string& address) {
  return XXH3_64bits(address.data(), address.size());
}

// "name:port" (or "[v6]:port") -> every address the name resolves to.
std::vector<std::string> ResolveDns(const std::string& name_and_port) {
  std::vector<std::string> out;
  const size_t colon = name_and_port.rfind(':');
  if (colon == std::string::npos) return out;
  std::string host = name_and_port.substr(0, colon);
  const std::string port = name_and_port.substr(colon + 1);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* results = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &results) != 0) return out;
  for (addrinfo* ai = results; ai != nullptr; ai = ai->ai_next) {
    char text[INET6_ADDRSTRLEN] = {};
    if (ai->ai_family == AF_INET) {
      inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(ai->ai_addr)->sin_addr, text, sizeof(text));
      out.push_back(absl::StrCat(text, ":", port));
    } else if (ai->ai_family == AF_INET6) {
      inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(ai->ai_addr)->sin6_addr, text,
                sizeof(text));
      out.push_back(absl::StrCat("[", text, "]:", port));
    }
  }
  freeaddrinfo(results);
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

// Best of `outcomes` for one block that went to several replicas.
BlockOutcome Better(BlockOutcome a, BlockOutcome b) {
  auto rank = [](BlockOutcome o) {
    switch (o) {
      case BlockOutcome::kOk: return 0;
      case BlockOutcome::kAlreadyPresent: return 1;
      case BlockOutcome::kNotFound: return 3;
      default: return 2;
    }
  };
  return rank(a) <= rank(b) ? a : b;
}

}  // namespace

std::vector<std::string> RendezvousOwners(const BlockKey& key,
                                          absl::Span<const std::string> nodes, size_t count) {
  std::vector<std::pair<uint64_t, const std::string*>> scored;
  scored.reserve(nodes.size());
  for (const std::string& node : nodes) scored.push_back({Score(key, NodeSeed(node)), &node});
  count = std::min(count, scored.size());
  std::partial_sort(scored.begin(), scored.begin() + count, scored.end(),
                    [](const auto& a, const auto& b) {
                      return a.first != b.first ? a.first > b.first : *a.second < *b.second;
                    });
  std::vector<std::string> owners;
  for (size_t i = 0; i < count; ++i) owners.push_back(*scored[i].second);
  return owners;
}

class Cluster::Impl {
 public:
  ClusterOptions options;
  std::shared_ptr<transfer::Engine> engine;

  ~Impl() {
    stop_.Notify();
    if (refresher_.joinable()) refresher_.join();
  }

  void StartRefresher() {
    refresher_ = std::thread([this] {
      while (!stop_.WaitForNotificationWithTimeout(options.refresh_interval)) Refresh();
    });
  }

  // Membership from the static list and DNS, then one health check per node
  // (concurrently, each bounded by health_timeout).
  void Refresh() {
    std::vector<std::string> members = options.nodes;
    if (!options.dns.empty()) {
      std::vector<std::string> resolved = ResolveDns(options.dns);
      members.insert(members.end(), resolved.begin(), resolved.end());
    }
    std::sort(members.begin(), members.end());
    members.erase(std::unique(members.begin(), members.end()), members.end());
    std::vector<NodePtr> current;
    {
      absl::MutexLock lock(&mu_);
      std::vector<NodePtr> next;
      for (const std::string& address : members) {
        auto it = std::find_if(nodes_.begin(), nodes_.end(),
                               [&](const NodePtr& n) { return n->address == address; });
        if (it != nodes_.end()) {
          next.push_back(*it);
          continue;
        }
        ClientOptions client_options = options.client;
        client_options.node_address = address;
        absl::StatusOr<std::unique_ptr<Client>> client = ConnectSharingEngine(client_options, engine);
        if (!client.ok()) continue;
        auto node = std::make_shared<Node>();
        node->address = address;
        node->client = *std::move(client);
        next.push_back(std::move(node));
      }
      nodes_ = std::move(next);
      current = nodes_;
    }
    std::vector<std::future<void>> checks;
    for (const NodePtr& node : current) {
      checks.push_back(std::async(std::launch::async, [node, timeout = options.health_timeout] {
        grpc::ClientContext context;
        context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
        v1::HealthResponse health;
        const bool ok = node->client->impl().stub->Health(&context, v1::HealthRequest(), &health).ok() &&
                        health.serving();
        node->draining.store(ok && health.draining());
        if (ok && node->incarnation.exchange(health.incarnation()) != health.incarnation()) {
          // A restarted node forgot its namespaces and has a new UCX address.
          absl::MutexLock lock(&node->mu);
          node->namespaces.clear();
        }
        node->healthy.store(ok);
      }));
    }
    for (auto& check : checks) check.get();
  }

  std::vector<NodePtr> Nodes() {
    absl::MutexLock lock(&mu_);
    return nodes_;
  }

  // Healthy nodes (for a publish: not draining either), by address.
  std::vector<NodePtr> Live(bool for_publish) {
    std::vector<NodePtr> live;
    for (const NodePtr& node : Nodes()) {
      if (node->healthy.load() && !(for_publish && node->draining.load())) live.push_back(node);
    }
    return live;
  }

  NodePtr Find(const std::string& address) {
    for (const NodePtr& node : Nodes()) {
      if (node->address == address) return node;
    }
    return nullptr;
  }

  // The node's handle of the namespace, opened there on first use.
  absl::StatusOr<Namespace> NodeNamespace(Node& node, uint64_t id, const v1::NamespaceSpec& spec) {
    {
      absl::MutexLock lock(&node.mu);
      if (auto it = node.namespaces.find(id); it != node.namespaces.end()) return it->second;
    }
    absl::StatusOr<Namespace> ns = node.client->OpenNamespace(spec, options.client.timeout);
    if (!ns.ok()) return ns.status();
    absl::MutexLock lock(&node.mu);
    node.namespaces.insert_or_assign(id, *ns);
    return *ns;
  }

  // Runs `op` with the node's handle of the namespace. A node that restarted
  // has forgotten its namespaces (NOT_FOUND): reopen there and retry once.
  template <typename T, typename Op>
  absl::StatusOr<T> WithNamespace(Node& node, uint64_t id, const v1::NamespaceSpec& spec, Op op) {
    for (int attempt = 0;; ++attempt) {
      absl::StatusOr<Namespace> ns = NodeNamespace(node, id, spec);
      absl::StatusOr<T> result = ns.ok() ? op(*ns) : absl::StatusOr<T>(ns.status());
      if (result.ok() || !absl::IsNotFound(result.status()) || attempt > 0) {
        if (!result.ok()) Failed(node, result.status());
        return result;
      }
      absl::MutexLock lock(&node.mu);
      node.namespaces.erase(id);
    }
  }

  // A failed call takes the node out until a health check sees it again.
  void Failed(Node& node, const absl::Status& status) {
    if (NodeIsDown(status)) node.healthy.store(false);
  }

 private:
  absl::Mutex mu_;
  std::vector<NodePtr> nodes_ ABSL_GUARDED_BY(mu_);
  absl::Notification stop_;
  std::thread refresher_;
};

namespace {

// Items grouped by the node they go to: node -> indices into the caller's items.
using Plan = std::vector<std::pair<NodePtr, std::vector<size_t>>>;

void AddToPlan(Plan& plan, const NodePtr& node, size_t index) {
  for (auto& [n, indices] : plan) {
    if (n == node) {
      indices.push_back(index);
      return;
    }
  }
  plan.push_back({node, {index}});
}

// Runs `call(node, indices)` for every node of the plan concurrently: all but
// the first on their own threads, the first on the caller's (a one-node plan,
// the common case, starts no thread). Returns the results in plan order.
template <typename Call>
auto FanOut(const Plan& plan, Call call) {
  using R = decltype(call(plan.front().first, plan.front().second));
  std::vector<std::future<R>> others;
  for (size_t i = 1; i < plan.size(); ++i) {
    others.push_back(std::async(std::launch::async, [&call, &entry = plan[i]] {
      return call(entry.first, entry.second);
    }));
  }
  std::vector<R> results;
  if (!plan.empty()) results.push_back(call(plan.front().first, plan.front().second));
  for (auto& other : others) results.push_back(other.get());
  return results;
}

// Sends each node its items of the plan (one Publish or Fetch per node, in
// parallel) and returns, per node, the item indices and what the node said.
template <typename Item, typename Transfer>
auto TransferFanOut(Cluster::Impl& cluster, uint64_t id, const v1::NamespaceSpec& spec,
                    const Plan& plan, absl::Span<const Item> items, Transfer transfer) {
  return FanOut(plan, [&](const NodePtr& node, const std::vector<size_t>& indices) {
    std::vector<Item> batch;
    for (size_t i : indices) batch.push_back(items[i]);
    absl::StatusOr<TransferResult> done = cluster.template WithNamespace<TransferResult>(
        *node, id, spec, [&](Namespace& ns) { return transfer(ns, batch); });
    return std::make_pair(indices, std::move(done));
  });
}

std::vector<NodePtr> OwnerNodes(const BlockKey& key, const std::vector<NodePtr>& live,
                                size_t count) {
  std::vector<std::string> addresses;
  for (const NodePtr& node : live) addresses.push_back(node->address);
  std::vector<NodePtr> owners;
  for (const std::string& address : RendezvousOwners(key, addresses, count)) {
    for (const NodePtr& node : live) {
      if (node->address == address) owners.push_back(node);
    }
  }
  return owners;
}

}  // namespace

// How many owners, best first, may hold a key: its R replicas, and past each
// draining node the node that took its publishes instead.
static size_t CandidateCount(Cluster::Impl& cluster, const std::vector<NodePtr>& live) {
  size_t draining = 0;
  for (const NodePtr& node : live) draining += node->draining.load();
  return static_cast<size_t>(cluster.options.replication) + draining;
}

absl::StatusOr<std::unique_ptr<Cluster>> Cluster::Connect(const ClusterOptions& options) {
  if (options.nodes.empty() && options.dns.empty()) {
    return absl::InvalidArgumentError("a cluster needs static nodes or a DNS name");
  }
  if (options.replication < 1) return absl::InvalidArgumentError("replication must be >= 1");
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  absl::StatusOr<std::unique_ptr<transfer::Engine>> engine =
      transfer::Engine::Create({.transports = options.client.ucx_transports});
  if (!engine.ok()) return engine.status();
  impl->engine = *std::move(engine);
  impl->Refresh();
  impl->StartRefresher();
  return std::unique_ptr<Cluster>(new Cluster(std::move(impl)));
}

Cluster::Cluster(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Cluster::~Cluster() = default;

absl::StatusOr<ClusterNamespace> Cluster::OpenNamespace(const v1::NamespaceSpec& spec) {
  std::vector<NodePtr> live = impl_->Live(/*for_publish=*/false);
  if (live.empty()) return absl::UnavailableError("no cache node answers");
  absl::Status last;
  for (const NodePtr& node : live) {  // any node validates the spec and tells the block size
    absl::StatusOr<Namespace> ns = node->client->OpenNamespace(spec, impl_->options.client.timeout);
    if (ns.ok()) {
      return ClusterNamespace(this, std::make_shared<v1::NamespaceSpec>(spec), ns->id(),
                              ns->block_bytes(), ns->tokens_per_block());
    }
    impl_->Failed(*node, ns.status());
    if (!NodeIsDown(ns.status())) return ns.status();  // a bad spec is bad everywhere
    last = ns.status();
  }
  return last;
}

absl::StatusOr<std::unique_ptr<Buffer>> Cluster::Allocate(size_t size) {
  absl::StatusOr<std::unique_ptr<transfer::MemoryRegion>> region = impl_->engine->Allocate(size);
  if (!region.ok()) return region.status();
  return WrapRegion(*std::move(region));
}

absl::StatusOr<std::unique_ptr<Buffer>> Cluster::Register(void* data, size_t size) {
  absl::StatusOr<std::unique_ptr<transfer::MemoryRegion>> region =
      impl_->engine->Register(data, size);
  if (!region.ok()) return region.status();
  return WrapRegion(*std::move(region));
}

std::vector<NodeStatus> Cluster::Nodes() {
  std::vector<NodeStatus> out;
  for (const NodePtr& node : impl_->Nodes()) {
    out.push_back({node->address, node->healthy.load(), node->draining.load()});
  }
  return out;
}

void Cluster::Refresh() { impl_->Refresh(); }

absl::Status Cluster::Drain(const std::string& address, bool draining) {
  NodePtr node = impl_->Find(address);
  if (node == nullptr) return absl::NotFoundError(absl::StrCat("no member ", address));
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + impl_->options.client.timeout));
  v1::DrainRequest request;
  request.set_draining(draining);
  v1::DrainResponse response;
  absl::Status status = FromGrpc(node->client->impl().stub->Drain(&context, request, &response));
  if (status.ok()) node->draining.store(response.draining());
  return status;
}

absl::Status Cluster::Stats(const std::string& address, v1::StatsResponse* out) {
  NodePtr node = impl_->Find(address);
  if (node == nullptr) return absl::NotFoundError(absl::StrCat("no member ", address));
  return node->client->Stats(out, impl_->options.health_timeout * 4);
}

std::vector<BlockKey> ClusterNamespace::Keys(absl::Span<const uint32_t> tokens,
                                             const BlockKey& parent) const {
  return ComputeBlockKeys(id_, tokens, tokens_per_block_, parent);
}

absl::StatusOr<LookupResult> ClusterNamespace::Lookup(absl::Span<const BlockKey> keys) {
  Cluster::Impl& cluster = *cluster_->impl_;
  const auto& spec = *static_cast<const v1::NamespaceSpec*>(spec_.get());
  const std::vector<NodePtr> live = cluster.Live(false);
  const size_t candidates = CandidateCount(cluster, live);

  // Asks each key's rank-`rank` owner about keys[from, end) (one call per
  // node, in parallel) and returns where the cluster's prefix ends: each node
  // reports how many of its keys lead its list, and the prefix ends at the
  // earliest key some owner lacks.
  auto prefix_from = [&](size_t from, size_t end, size_t rank) {
    Plan plan;
    size_t prefix = end;
    for (size_t i = from; i < end; ++i) {
      std::vector<NodePtr> owners = OwnerNodes(keys[i], live, rank + 1);
      if (owners.size() <= rank) {
        prefix = i;
        break;
      }
      AddToPlan(plan, owners[rank], i);
    }
    auto first_missing = FanOut(plan, [&](const NodePtr& node, const std::vector<size_t>& indices) {
      std::vector<BlockKey> node_keys;
      for (size_t i : indices) node_keys.push_back(keys[i]);
      absl::StatusOr<LookupResult> found = cluster.WithNamespace<LookupResult>(
          *node, id_, spec, [&](Namespace& ns) { return ns.Lookup(node_keys); });
      if (!found.ok()) return indices.front();
      return found->prefix_length < indices.size() ? indices[found->prefix_length] : end;
    });
    for (size_t f : first_missing) prefix = std::min(prefix, f);
    return prefix;
  };

  // The primary owners answer for the whole list. Where the prefix breaks, a
  // replica or the node that took over from a draining one may hold the key:
  // ask them for that key, and carry on past it with the primaries.
  size_t prefix = 0;
  for (int round = 0; prefix < keys.size() && round < 16; ++round) {
    prefix = prefix_from(prefix, keys.size(), 0);
    if (prefix >= keys.size()) break;
    size_t found_at = prefix;
    for (size_t rank = 1; rank < candidates && found_at == prefix; ++rank) {
      found_at = prefix_from(prefix, prefix + 1, rank);
    }
    if (found_at == prefix) break;  // nobody has it: the prefix ends here
    prefix = found_at;
  }
  return LookupResult{prefix};
}

absl::StatusOr<bool> ClusterNamespace::RequestFinished(const BlockKey& last_key,
                                                      uint32_t output_tokens) {
  Cluster::Impl& cluster = *cluster_->impl_;
  const auto& spec = *static_cast<const v1::NamespaceSpec*>(spec_.get());
  const std::vector<NodePtr> live = cluster.Live(false);
  Plan plan;
  for (const NodePtr& owner : OwnerNodes(last_key, live, CandidateCount(cluster, live))) {
    AddToPlan(plan, owner, 0);
  }
  bool known = false;
  for (bool node_knows : FanOut(plan, [&](const NodePtr& node, const std::vector<size_t>&) {
         absl::StatusOr<bool> done = cluster.WithNamespace<bool>(
             *node, id_, spec,
             [&](Namespace& ns) { return ns.RequestFinished(last_key, output_tokens); });
         return done.ok() && *done;
       })) {
    known = known || node_knows;
  }
  return known;
}

absl::StatusOr<TransferResult> ClusterNamespace::Publish(absl::Span<const PublishItem> items) {
  Cluster::Impl& cluster = *cluster_->impl_;
  const auto& spec = *static_cast<const v1::NamespaceSpec*>(spec_.get());
  std::vector<NodePtr> live = cluster.Live(/*for_publish=*/true);
  Plan plan;
  for (size_t i = 0; i < items.size(); ++i) {
    for (const NodePtr& owner : OwnerNodes(items[i].key, live, cluster.options.replication)) {
      AddToPlan(plan, owner, i);
    }
  }
  TransferResult result;
  result.outcomes.assign(items.size(), BlockOutcome::kTransferFailed);
  result.sizes.assign(items.size(), 0);
  std::vector<bool> tried(items.size(), false);
  auto calls = TransferFanOut(cluster, id_, spec, plan, items,
                              [](Namespace& ns, const std::vector<PublishItem>& batch) {
                                return ns.Publish(batch);
                              });
  for (auto& [indices, done] : calls) {
    for (size_t k = 0; k < indices.size(); ++k) {
      const size_t i = indices[k];
      const BlockOutcome outcome = done.ok() ? done->outcomes[k] : BlockOutcome::kTransferFailed;
      result.outcomes[i] = tried[i] ? Better(result.outcomes[i], outcome) : outcome;
      tried[i] = true;
    }
    if (done.ok()) result.bytes += done->bytes;
  }
  return result;
}

absl::StatusOr<TransferResult> ClusterNamespace::Fetch(absl::Span<const FetchItem> items) {
  Cluster::Impl& cluster = *cluster_->impl_;
  const auto& spec = *static_cast<const v1::NamespaceSpec*>(spec_.get());
  std::vector<NodePtr> live = cluster.Live(false);
  TransferResult result;
  result.outcomes.assign(items.size(), BlockOutcome::kNotFound);
  result.sizes.assign(items.size(), 0);
  const size_t candidates = CandidateCount(cluster, live);
  std::vector<std::vector<NodePtr>> owners(items.size());
  for (size_t i = 0; i < items.size(); ++i) owners[i] = OwnerNodes(items[i].key, live, candidates);
  // Rank by rank: what the best owner lacks is asked of the next one.
  for (size_t rank = 0; rank < candidates; ++rank) {
    Plan plan;
    for (size_t i = 0; i < items.size(); ++i) {
      if (result.outcomes[i] != BlockOutcome::kOk && rank < owners[i].size()) {
        AddToPlan(plan, owners[i][rank], i);
      }
    }
    if (plan.empty()) break;
    auto calls = TransferFanOut(cluster, id_, spec, plan, items,
                                [](Namespace& ns, const std::vector<FetchItem>& batch) {
                                  return ns.Fetch(batch);
                                });
    for (auto& [indices, done] : calls) {
      if (!done.ok()) continue;  // that node's blocks stay misses
      for (size_t k = 0; k < indices.size(); ++k) {
        if (done->outcomes[k] == BlockOutcome::kOk) {
          result.outcomes[indices[k]] = BlockOutcome::kOk;
          result.sizes[indices[k]] = done->sizes[k];
        } else if (done->outcomes[k] == BlockOutcome::kChecksumMismatch) {
          result.outcomes[indices[k]] = BlockOutcome::kChecksumMismatch;
        }
      }
      result.bytes += done->bytes;
    }
  }
  return result;
}

}  // namespace kvstrata::client
