#include "replica_repairer.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/time/clock.h"
#include "kvstrata/common/limits.h"

namespace kvstrata::client {
namespace {

// A key as the node lists it (always 16 bytes).
std::optional<BlockKey> KeyOf(const std::string& wire) {
  if (wire.size() != sizeof(BlockKey::bytes)) return std::nullopt;
  BlockKey key;
  std::memcpy(key.bytes.data(), wire.data(), key.bytes.size());
  return key;
}

}  // namespace

absl::StatusOr<v1::ListBlocksResponse> ListNodeBlocks(Cluster::Impl& cluster, Node& node,
                                                      const RepairNamespace& ns,
                                                      const std::string& after,
                                                      absl::Span<const BlockKey> keys) {
  return cluster.WithNamespace<v1::ListBlocksResponse>(
      node, ns.id, *ns.spec, [&](Namespace& handle) -> absl::StatusOr<v1::ListBlocksResponse> {
        grpc::ClientContext context;
        context.set_deadline(absl::ToChronoTime(absl::Now() + cluster.options.client.timeout));
        v1::ListBlocksRequest request;
        request.set_namespace_id(handle.id());
        request.set_after(after);
        request.set_limit(limits::kMaxListBlocks);
        for (const BlockKey& key : keys) request.add_keys(std::string(key.view()));
        v1::ListBlocksResponse response;
        absl::Status status = FromGrpc(node.client->impl().stub->ListBlocks(&context, request, &response));
        if (!status.ok()) return status;
        return response;
      });
}

ReplicaRepairer::ReplicaRepairer(Cluster::Impl& cluster)
    : cluster_(cluster), thread_([this] { Loop(); }) {}

ReplicaRepairer::~ReplicaRepairer() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  thread_.join();
}

void ReplicaRepairer::AddNamespace(const RepairNamespace& ns) {
  if (ns.spec->format() != v1::FORMAT_RAW) return;
  absl::MutexLock lock(&mu_);
  if (namespaces_.insert({ns.id, ns}).second) pass_wanted_ = true;  // blocks may predate us
}

void ReplicaRepairer::NodeJoined() {
  absl::MutexLock lock(&mu_);
  pass_wanted_ = true;
  ++stats_.passes_requested;
}

void ReplicaRepairer::RepairOnRead(const RepairNamespace& ns, const BlockKey& key, NodePtr source,
                                   std::vector<NodePtr> targets) {
  if (ns.spec->format() != v1::FORMAT_RAW || targets.empty()) return;
  absl::MutexLock lock(&mu_);
  if (stop_ || queued_.contains({ns.id, key})) return;
  if (queue_.size() >= cluster_.options.repair_queue_blocks) {
    ++stats_.dropped_blocks;
    return;
  }
  queued_.insert({ns.id, key});
  ++stats_.queued_on_read;
  queue_.push_back({ns, key, std::move(source), std::move(targets)});
}

RepairStats ReplicaRepairer::stats() {
  absl::MutexLock lock(&mu_);
  RepairStats out = stats_;
  out.pending_blocks = queue_.size() + in_progress_;
  return out;
}

bool ReplicaRepairer::HasWork() const { return stop_ || pass_wanted_ || !queue_.empty(); }

bool ReplicaRepairer::stopping() {
  absl::MutexLock lock(&mu_);
  return stop_;
}

void ReplicaRepairer::Loop() {
  for (;;) {
    bool pass;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(this, &ReplicaRepairer::HasWork));
      if (stop_) return;
      pass = std::exchange(pass_wanted_, false);
    }
    DrainReadRepairs();
    if (pass) Pass();
  }
}

void ReplicaRepairer::Pass() {
  const absl::Time start = absl::Now();
  std::vector<RepairNamespace> namespaces;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [id, ns] : namespaces_) namespaces.push_back(ns);
  }
  for (const RepairNamespace& ns : namespaces) {
    if (stopping()) return;
    PassNamespace(ns);
  }
  absl::MutexLock lock(&mu_);
  ++stats_.passes;
  stats_.last_pass_end = absl::Now();
  stats_.last_pass_duration = stats_.last_pass_end - start;
}

void ReplicaRepairer::PassNamespace(const RepairNamespace& ns) {
  const size_t replication = static_cast<size_t>(cluster_.options.replication);
  for (const NodePtr& source : cluster_.Live(/*for_publish=*/false)) {
    std::string after;
    do {
      if (stopping()) return;
      absl::StatusOr<v1::ListBlocksResponse> page = ListNodeBlocks(cluster_, *source, ns, after, {});
      if (!page.ok()) break;  // down or refusing: its blocks wait for the next pass
      after = page->next_after();
      std::vector<Copy> copies;
      for (const v1::ListedBlock& block : page->blocks()) {
        std::optional<BlockKey> key = KeyOf(block.key());
        if (!key.has_value()) continue;
        copies.push_back({*key, KeyOf(block.parent()), {}});
      }
      // Ask each other owner which of the page's blocks it holds: one call
      // per owner, and a copy only to those that lack one.
      const std::vector<NodePtr> live = cluster_.Live(/*for_publish=*/true);
      std::vector<std::pair<NodePtr, std::vector<size_t>>> asks;
      for (size_t i = 0; i < copies.size(); ++i) {
        for (const NodePtr& owner : OwnerNodes(copies[i].key, live, replication)) {
          if (owner == source) continue;
          auto it = std::find_if(asks.begin(), asks.end(), [&](const auto& a) { return a.first == owner; });
          if (it == asks.end()) it = asks.insert(asks.end(), {owner, {}});
          it->second.push_back(i);
        }
      }
      for (const auto& [owner, indices] : asks) {
        std::vector<BlockKey> keys;
        for (size_t i : indices) keys.push_back(copies[i].key);
        absl::StatusOr<v1::ListBlocksResponse> held = ListNodeBlocks(cluster_, *owner, ns, "", keys);
        if (!held.ok()) continue;  // it gets its copies in a pass after it is back
        absl::flat_hash_set<BlockKey> present;
        for (const v1::ListedBlock& block : held->blocks()) {
          if (std::optional<BlockKey> key = KeyOf(block.key())) present.insert(*key);
        }
        for (size_t i : indices) {
          if (!present.contains(copies[i].key)) copies[i].targets.push_back(owner);
        }
      }
      copies.erase(std::remove_if(copies.begin(), copies.end(),
                                  [](const Copy& c) { return c.targets.empty(); }),
                   copies.end());
      CopyFrom(ns, source, std::move(copies));
      DrainReadRepairs();  // a long pass does not hold read repairs back
    } while (!after.empty());
  }
}

void ReplicaRepairer::DrainReadRepairs() {
  for (;;) {
    // One source and namespace at a time, as many as one page describes.
    std::vector<ReadRepair> batch;
    {
      absl::MutexLock lock(&mu_);
      if (stop_ || queue_.empty()) return;
      const ReadRepair first = queue_.front();
      for (auto it = queue_.begin(); it != queue_.end() && batch.size() < limits::kMaxListBlocks;) {
        if (it->ns.id == first.ns.id && it->source == first.source) {
          batch.push_back(std::move(*it));
          it = queue_.erase(it);
        } else {
          ++it;
        }
      }
      in_progress_ = batch.size();
    }
    const RepairNamespace& ns = batch.front().ns;
    const NodePtr source = batch.front().source;
    // The source tells each block's parent (a fetch does not), and which
    // blocks it still holds.
    std::vector<BlockKey> keys;
    for (const ReadRepair& r : batch) keys.push_back(r.key);
    absl::StatusOr<v1::ListBlocksResponse> held = ListNodeBlocks(cluster_, *source, ns, "", keys);
    std::vector<Copy> copies;
    uint64_t gone = 0;
    if (held.ok()) {
      absl::flat_hash_map<BlockKey, std::optional<BlockKey>> parents;
      for (const v1::ListedBlock& block : held->blocks()) {
        if (std::optional<BlockKey> key = KeyOf(block.key())) parents[*key] = KeyOf(block.parent());
      }
      for (ReadRepair& r : batch) {
        auto it = parents.find(r.key);
        if (it == parents.end()) {
          gone += r.targets.size();
          continue;
        }
        copies.push_back({r.key, it->second, std::move(r.targets)});
      }
    } else {
      for (const ReadRepair& r : batch) gone += r.targets.size();
    }
    CopyFrom(ns, source, std::move(copies));
    absl::MutexLock lock(&mu_);
    stats_.failed_blocks += gone;
    for (const ReadRepair& r : batch) queued_.erase({r.ns.id, r.key});
    in_progress_ = 0;
  }
}

void ReplicaRepairer::CopyFrom(const RepairNamespace& ns, const NodePtr& source,
                               std::vector<Copy> copies) {
  if (copies.empty()) return;
  const uint64_t block_bytes = ns.block_bytes;
  uint64_t failed = 0, repaired = 0;
  auto count = [&] {
    absl::MutexLock lock(&mu_);
    stats_.failed_blocks += std::exchange(failed, 0);
    stats_.repaired_blocks += repaired;
    stats_.repaired_bytes += std::exchange(repaired, 0) * block_bytes;
  };
  if (buffer_ == nullptr || buffer_->size() < block_bytes) {
    buffer_.reset();
    absl::StatusOr<std::unique_ptr<transfer::MemoryRegion>> region =
        cluster_.engine->Allocate(std::max(cluster_.options.repair_buffer_bytes, block_bytes));
    if (!region.ok()) {
      for (const Copy& c : copies) failed += c.targets.size();
      return count();
    }
    buffer_ = WrapRegion(*std::move(region));
  }
  const size_t per_batch = std::min<size_t>(buffer_->size() / block_bytes, limits::kMaxTransferBlocks);
  for (size_t start = 0; start < copies.size(); start += per_batch) {
    if (stopping()) return count();
    const size_t end = std::min(copies.size(), start + per_batch);
    std::vector<FetchItem> items;
    for (size_t i = start; i < end; ++i) {
      items.push_back({copies[i].key, buffer_.get(), (i - start) * block_bytes});
    }
    const absl::Time fetch_start = absl::Now();
    absl::StatusOr<TransferResult> fetched = cluster_.WithNamespace<TransferResult>(
        *source, ns.id, *ns.spec, [&](Namespace& handle) { return handle.Fetch(items); });
    if (!fetched.ok()) {
      for (size_t i = start; i < copies.size(); ++i) failed += copies[i].targets.size();
      return count();  // the source is gone: the next pass finds another
    }
    if (!Throttle(fetched->bytes, fetch_start)) return count();
    // Each target gets, in one publish, the fetched blocks it lacks.
    std::vector<std::pair<NodePtr, std::vector<PublishItem>>> publishes;
    for (size_t i = start; i < end; ++i) {
      const size_t k = i - start;
      // A block a precision tier transcoded is decoded, lossy: never copy it
      // to another node as if it were the raw block.
      if (fetched->outcomes[k] != BlockOutcome::kOk || fetched->sizes[k] != block_bytes ||
          (k < fetched->formats.size() && fetched->formats[k] != StoredFormat::kRaw)) {
        failed += copies[i].targets.size();  // evicted since listed, or damaged
        continue;
      }
      for (const NodePtr& target : copies[i].targets) {
        auto it = std::find_if(publishes.begin(), publishes.end(),
                               [&](const auto& p) { return p.first == target; });
        if (it == publishes.end()) it = publishes.insert(publishes.end(), {target, {}});
        it->second.push_back({copies[i].key, copies[i].parent, buffer_.get(), k * block_bytes});
      }
    }
    for (const auto& [target, publish] : publishes) {
      const absl::Time publish_start = absl::Now();
      absl::StatusOr<TransferResult> done = cluster_.WithNamespace<TransferResult>(
          *target, ns.id, *ns.spec, [&](Namespace& handle) { return handle.Publish(publish); });
      if (!done.ok()) {
        failed += publish.size();
        continue;
      }
      for (BlockOutcome outcome : done->outcomes) {
        if (outcome == BlockOutcome::kOk) {
          ++repaired;
        } else if (outcome != BlockOutcome::kAlreadyPresent) {  // present: someone else copied it
          ++failed;
        }
      }
      count();  // before the pause: what is copied shows at once
      if (!Throttle(done->bytes, publish_start)) return;
    }
    count();
  }
}

bool ReplicaRepairer::Throttle(uint64_t bytes, absl::Time started) {
  const absl::Time now = absl::Now();
  // The transfer's own time counts toward its share, idle time before it
  // does not: a burst after a quiet hour is still paced.
  next_free_ = std::max(next_free_, started) +
               absl::Seconds(static_cast<double>(bytes) /
                             static_cast<double>(cluster_.options.repair_bytes_per_second));
  absl::MutexLock lock(&mu_);
  if (next_free_ > now) mu_.AwaitWithTimeout(absl::Condition(&stop_), next_free_ - now);
  return !stop_;
}

}  // namespace kvstrata::client
