#include "kvstrata/cachenode/hbm_tier.h"

#include "absl/strings/str_cat.h"
#include "kvstrata/common/log.h"

namespace kvstrata::cachenode {

absl::StatusOr<std::unique_ptr<HbmTier>> HbmTier::Create(
    std::unique_ptr<transfer::DeviceMemory> device, const HbmTierOptions& options,
    std::unique_ptr<EvictionPolicy> policy, transfer::Engine* engine) {
  if (device == nullptr) return absl::InvalidArgumentError("HBM tier without a device");
  if (options.slab_bytes == 0 || options.capacity_bytes < options.slab_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("HBM tier of ", options.capacity_bytes,
                                                   " bytes is smaller than one slab (",
                                                   options.slab_bytes, ")"));
  }
  std::unique_ptr<HbmTier> tier(new HbmTier());
  tier->device_ = std::move(device);
  const uint64_t capacity = options.capacity_bytes / options.slab_bytes * options.slab_bytes;
  absl::StatusOr<transfer::DeviceAllocation> arena = tier->device_->Allocate(capacity);
  if (!arena.ok()) return arena.status();
  tier->arena_ = *std::move(arena);
  absl::StatusOr<std::unique_ptr<transfer::StagingPool>> staging =
      transfer::StagingPool::Create(*tier->device_, engine, options.staging);
  if (!staging.ok()) return staging.status();
  tier->staging_ = *std::move(staging);
  tier->slabs_ = std::make_unique<DramTier>(tier->arena_.data(), capacity, options.slab_bytes,
                                            std::move(policy));
  return tier;
}

HbmTier::~HbmTier() {
  slabs_.reset();  // drops the index's references before the arena goes
}

absl::StatusOr<bool> HbmTier::Admit(const BlockId& id, const StoredBlock& host) {
  if (slabs_->Find(id, /*hit=*/false) != nullptr) return false;
  absl::StatusOr<std::shared_ptr<StoredBlock>> chunk = slabs_->Reserve(host.size());
  if (!chunk.ok()) return chunk.status();
  if (absl::Status s = staging_->CopyToDevice((*chunk)->data(), host.data(), host.size());
      !s.ok()) {
    copy_errors_.fetch_add(1, std::memory_order_relaxed);
    KVS_LOG(Warning) << "HBM: copy to device failed: " << s;
    return s;
  }
  (*chunk)->checksum = host.checksum;
  (*chunk)->parent = host.parent;
  (*chunk)->has_parent = host.has_parent;
  (*chunk)->format = host.format;  // a transcoded or quantized block stays what it is
  return slabs_->Commit(id, *std::move(chunk));
}

std::vector<std::shared_ptr<StoredBlock>> HbmTier::StageAll(
    std::vector<std::shared_ptr<StoredBlock>> blocks) {
  std::vector<std::shared_ptr<StoredBlock>> staged(blocks.size());
  std::vector<transfer::StagingPool::Copy> copies;
  for (size_t i = 0; i < blocks.size(); ++i) {
    std::shared_ptr<StoredBlock>& block = blocks[i];
    const uint64_t size = block->size();
    uint8_t* host = nullptr;
    std::function<void()> release;
    absl::StatusOr<std::unique_ptr<transfer::StagingPool::Lease>> lease = staging_->Take(size);
    if (lease.ok()) {
      host = (*lease)->data();
      // std::function needs a copyable callable: share the lease and the pin.
      release = [lease = std::shared_ptr<transfer::StagingPool::Lease>(*std::move(lease)),
                 pin = block] {};
    } else {
      // Every staging chunk is held by transfers in flight: memory of our
      // own (UCX registers it per transfer, slower), never a miss for want
      // of it.
      host = new (std::nothrow) uint8_t[size];
      if (host == nullptr) continue;
      fallbacks_.fetch_add(1, std::memory_order_relaxed);
      release = [host, pin = block] { delete[] host; };
    }
    staged[i] = std::make_shared<StoredBlock>(host, size, std::move(release));
    staged[i]->checksum = block->checksum;
    staged[i]->parent = block->parent;
    staged[i]->has_parent = block->has_parent;
    staged[i]->format = block->format;
    copies.push_back({host, block->data(), size});
  }
  if (absl::Status s = staging_->CopyAll(copies, transfer::CopyKind::kDeviceToHost); !s.ok()) {
    copy_errors_.fetch_add(1, std::memory_order_relaxed);
    KVS_LOG(Warning) << "HBM: staging copies failed: " << s;
    return std::vector<std::shared_ptr<StoredBlock>>(blocks.size());
  }
  for (const auto& block : staged) staged_.fetch_add(block != nullptr, std::memory_order_relaxed);
  return staged;
}

absl::StatusOr<std::shared_ptr<StoredBlock>> HbmTier::Landing(uint64_t size) {
  absl::StatusOr<std::unique_ptr<transfer::StagingPool::Lease>> lease = staging_->Take(size);
  if (!lease.ok()) return lease.status();
  uint8_t* host = (*lease)->data();
  return std::make_shared<StoredBlock>(
      host, size, [lease = std::shared_ptr<transfer::StagingPool::Lease>(*std::move(lease))] {});
}

absl::Status HbmTier::CopyToHost(const StoredBlock& block, uint8_t* host) {
  absl::Status s = staging_->CopyToHost(host, block.data(), block.size());
  if (!s.ok()) copy_errors_.fetch_add(1, std::memory_order_relaxed);
  return s;
}

HbmCounters HbmTier::counters() const {
  return {.tier = slabs_->counters(),
          .staging = staging_->counters(),
          .staged_blocks = staged_.load(std::memory_order_relaxed),
          .staging_fallbacks = fallbacks_.load(std::memory_order_relaxed),
          .copy_errors = copy_errors_.load(std::memory_order_relaxed)};
}

absl::StatusOr<std::string> HbmTier::ArenaIpcHandle() {
  absl::MutexLock lock(&ipc_mu_);
  if (ipc_handle_.empty()) {
    absl::StatusOr<std::string> handle = device_->ExportIpc(arena_);
    if (!handle.ok()) return handle.status();
    ipc_handle_ = *std::move(handle);
  }
  return ipc_handle_;
}

}  // namespace kvstrata::cachenode
