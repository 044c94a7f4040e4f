#include "tenant_ledger.h"

namespace kvstrata::cachenode {
namespace {

// Most evictions one MakeRoom tries: stale entries (blocks gone already) are
// skipped, so a few rounds may be needed, but never an unbounded loop.
constexpr int kMaxRounds = 8;

}  // namespace

void TenantLedger::NamespaceOpened(uint64_t namespace_id, const std::string& tenant) {
  absl::MutexLock lock(&mu_);
  Namespace& ns = namespaces_[namespace_id];
  ns.tenant = tenant;
  ns.open = true;
}

void TenantLedger::NamespaceClosed(uint64_t namespace_id) {
  absl::MutexLock lock(&mu_);
  auto it = namespaces_.find(namespace_id);
  if (it == namespaces_.end()) return;
  it->second.open = false;
  if (it->second.blocks == 0) namespaces_.erase(it);
}

void TenantLedger::OnResidency(const BlockId& id, uint64_t size, bool resident) {
  absl::MutexLock lock(&mu_);
  auto ns = namespaces_.find(id.namespace_id);
  if (ns == namespaces_.end()) return;  // blocks of namespaces never opened since start
  Account& account = accounts_[ns->second.tenant];
  if (resident) {
    ++ns->second.blocks;
    ++account.blocks;
    account.bytes += size;
    account.order.emplace_back(id, size);
    return;
  }
  const std::string tenant = ns->second.tenant;
  if (ns->second.blocks > 0) --ns->second.blocks;
  if (ns->second.blocks == 0 && !ns->second.open) namespaces_.erase(ns);
  account.blocks -= std::min(account.blocks, uint64_t{1});
  account.bytes -= std::min(account.bytes, size);
  if (account.blocks == 0 && account.quota_evictions == 0) {
    accounts_.erase(tenant);  // nothing left to report: the table stays bounded
    return;
  }
  if (account.order.size() > 2 * account.blocks + 1024) {
    // Mostly departed blocks: keep the live ones, in order.
    std::deque<std::pair<BlockId, uint64_t>> live;
    for (auto& entry : account.order) {
      if (store_.InMemory(entry.first)) live.push_back(entry);
    }
    account.order = std::move(live);
  }
}

size_t TenantLedger::MakeRoom(const std::string& tenant, uint64_t quota_bytes, size_t count,
                              uint64_t block_bytes) {
  if (quota_bytes == 0 || count == 0) return count;
  const uint64_t wanted = count * block_bytes;
  for (int round = 0; round < kMaxRounds; ++round) {
    std::vector<BlockId> victims;
    {
      absl::MutexLock lock(&mu_);
      Account& account = accounts_[tenant];
      if (account.bytes + wanted <= quota_bytes) return count;
      uint64_t over = account.bytes + wanted - quota_bytes;
      while (over > 0 && !account.order.empty()) {
        victims.push_back(account.order.front().first);
        over -= std::min(over, account.order.front().second);
        account.order.pop_front();
      }
    }
    if (victims.empty()) break;
    // Outside the lock: each eviction reports back through OnResidency.
    uint64_t evicted = 0;
    for (const BlockId& id : victims) evicted += store_.EvictFromMemory(id) ? 1 : 0;
    absl::MutexLock lock(&mu_);
    accounts_[tenant].quota_evictions += evicted;
  }
  absl::MutexLock lock(&mu_);
  const uint64_t held = accounts_[tenant].bytes;
  const uint64_t room = held >= quota_bytes ? 0 : quota_bytes - held;
  return std::min<uint64_t>(count, room / std::max<uint64_t>(block_bytes, 1));
}

std::vector<TenantLedger::Usage> TenantLedger::Snapshot() const {
  absl::MutexLock lock(&mu_);
  std::vector<Usage> out;
  for (const auto& [tenant, account] : accounts_) {
    out.push_back({tenant, account.bytes, account.blocks, account.quota_evictions});
  }
  return out;
}

}  // namespace kvstrata::cachenode
