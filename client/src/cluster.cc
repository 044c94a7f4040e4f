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
#include "cluster_impl.h"
#include "replica_repairer.h"

namespace kvstrata::client {
namespace {

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

Cluster::Impl::Impl() = default;

Cluster::Impl::~Impl() {
  stop_.Notify();
  if (refresher_.joinable()) refresher_.join();
  repairer_.reset();  // before the nodes it copies between go
}

void Cluster::Impl::StartRefresher() {
  refresher_ = std::thread([this] {
    while (!stop_.WaitForNotificationWithTimeout(options.refresh_interval)) Refresh();
  });
}

void Cluster::Impl::StartRepairer() {
  if (options.repair_bytes_per_second > 0) repairer_ = std::make_unique<ReplicaRepairer>(*this);
}

void Cluster::Impl::Refresh() {
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
  std::atomic<bool> joined{false};
  std::vector<std::future<void>> checks;
  for (const NodePtr& node : current) {
    checks.push_back(std::async(std::launch::async, [&joined, node, timeout = options.health_timeout] {
      grpc::ClientContext context;
      context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
      v1::HealthResponse health;
      const bool ok = node->client->impl().stub->Health(&context, v1::HealthRequest(), &health).ok() &&
                      health.serving();
      node->draining.store(ok && health.draining());
      const bool restarted =
          ok && node->incarnation.exchange(health.incarnation()) != health.incarnation();
      if (restarted) {
        // A restarted node forgot its namespaces and has a new UCX address.
        absl::MutexLock lock(&node->mu);
        node->namespaces.clear();
      }
      // New, back after being down, or restarted (maybe empty): blocks it
      // owns may need copying back to it.
      const bool was_healthy = node->healthy.exchange(ok);
      if (ok && (restarted || !was_healthy)) joined.store(true);
    }));
  }
  for (auto& check : checks) check.get();
  if (joined.load() && repairer_ != nullptr) repairer_->NodeJoined();
}

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


}  // namespace

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
  impl->StartRepairer();  // before the first health checks, which it hears of
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
      auto shared_spec = std::make_shared<const v1::NamespaceSpec>(spec);
      if (ReplicaRepairer* repairer = impl_->repairer()) {
        repairer->AddNamespace({ns->id(), ns->block_bytes(), shared_spec});
      }
      return ClusterNamespace(this, shared_spec, ns->id(), ns->block_bytes(),
                              ns->tokens_per_block());
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

RepairStats Cluster::Repairs() {
  ReplicaRepairer* repairer = impl_->repairer();
  return repairer == nullptr ? RepairStats{} : repairer->stats();
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
  result.formats.assign(items.size(), StoredFormat::kRaw);
  const size_t candidates = CandidateCount(cluster, live);
  std::vector<std::vector<NodePtr>> owners(items.size());
  for (size_t i = 0; i < items.size(); ++i) owners[i] = OwnerNodes(items[i].key, live, candidates);
  // Who said it lacks a block, and who had it: a repair on read.
  std::vector<std::vector<NodePtr>> missed(items.size());
  std::vector<NodePtr> found_on(items.size());
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
    for (size_t c = 0; c < calls.size(); ++c) {
      auto& [indices, done] = calls[c];
      if (!done.ok()) continue;  // that node's blocks stay misses
      for (size_t k = 0; k < indices.size(); ++k) {
        if (done->outcomes[k] == BlockOutcome::kOk) {
          result.outcomes[indices[k]] = BlockOutcome::kOk;
          result.sizes[indices[k]] = done->sizes[k];
          if (k < done->formats.size()) result.formats[indices[k]] = done->formats[k];
          found_on[indices[k]] = plan[c].first;
        } else if (done->outcomes[k] == BlockOutcome::kNotFound) {
          missed[indices[k]].push_back(plan[c].first);
        } else if (done->outcomes[k] == BlockOutcome::kChecksumMismatch) {
          result.outcomes[indices[k]] = BlockOutcome::kChecksumMismatch;
        }
      }
      result.bytes += done->bytes;
    }
  }
  if (ReplicaRepairer* repairer = cluster.repairer()) {
    const RepairNamespace ns{id_, block_bytes_, std::static_pointer_cast<const v1::NamespaceSpec>(spec_)};
    std::vector<NodePtr> publish_live;  // computed for the first late find only
    for (size_t i = 0; i < items.size(); ++i) {
      if (found_on[i] == nullptr || missed[i].empty()) continue;
      if (publish_live.empty()) publish_live = cluster.Live(/*for_publish=*/true);
      // Only the block's owners get a copy, not a node that took over from
      // a draining one.
      std::vector<NodePtr> targets;
      for (const NodePtr& owner :
           OwnerNodes(items[i].key, publish_live, cluster.options.replication)) {
        if (std::find(missed[i].begin(), missed[i].end(), owner) != missed[i].end()) {
          targets.push_back(owner);
        }
      }
      repairer->RepairOnRead(ns, items[i].key, found_on[i], std::move(targets));
    }
  }
  return result;
}

}  // namespace kvstrata::client
