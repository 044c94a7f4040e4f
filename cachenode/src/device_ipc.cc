#include "device_ipc.h"

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace kvstrata::cachenode {

DeviceIpcLeases::~DeviceIpcLeases() {
  absl::MutexLock lock(&mu_);
  for (auto& [id, lease] : leases_) Drop(lease);
}

void DeviceIpcLeases::Drop(Lease& lease) {
  pinned_.fetch_sub(lease.blocks.size(), std::memory_order_relaxed);
  lease.blocks.clear();
}

void DeviceIpcLeases::SweepLocked(absl::Time now) {
  for (auto it = leases_.begin(); it != leases_.end();) {
    if (it->second.expires <= now) {
      Drop(it->second);
      leases_.erase(it++);
    } else {
      ++it;
    }
  }
}

absl::StatusOr<uint64_t> DeviceIpcLeases::Add(std::vector<std::shared_ptr<StoredBlock>> blocks) {
  absl::MutexLock lock(&mu_);
  const absl::Time now = absl::Now();
  SweepLocked(now);
  if (leases_.size() >= kMaxLeases) {
    return absl::ResourceExhaustedError(
        absl::StrCat(kMaxLeases, " IPC leases are live; release some (ReleaseDeviceIpc)"));
  }
  uint64_t id = 0;
  while (id == 0 || leases_.contains(id)) id = absl::Uniform<uint64_t>(random_);
  pinned_.fetch_add(blocks.size(), std::memory_order_relaxed);
  leases_.emplace(id, Lease{std::move(blocks), now + ttl_});
  return id;
}

bool DeviceIpcLeases::Release(uint64_t lease) {
  absl::MutexLock lock(&mu_);
  SweepLocked(absl::Now());
  auto it = leases_.find(lease);
  if (it == leases_.end()) return false;
  Drop(it->second);
  leases_.erase(it);
  return true;
}

void DeviceIpcLeases::Sweep() {
  absl::MutexLock lock(&mu_);
  SweepLocked(absl::Now());
}

}  // namespace kvstrata::cachenode
