#include "device_staging.h"

#include "absl/strings/str_cat.h"
#include "kvstrata/transfer/engine.h"

namespace kvstrata::client {

absl::StatusOr<transfer::StagingPool*> DeviceStager::Pool() {
  absl::MutexLock lock(&mu_);
  if (pool_ != nullptr) return pool_.get();
  if (device_ == nullptr) {
    if (options_.device != nullptr) {
      device_ = options_.device;
    } else {
      absl::StatusOr<std::unique_ptr<transfer::DeviceMemory>> opened =
          transfer::OpenCudaDevice(options_.cuda_device);
      if (!opened.ok()) {
        return absl::Status(opened.status().code(),
                            absl::StrCat("device buffers need a GPU: ", opened.status().message()));
      }
      device_ = *std::move(opened);
    }
  }
  absl::StatusOr<std::unique_ptr<transfer::StagingPool>> pool = transfer::StagingPool::Create(
      *device_, engine_,
      {.bytes = options_.device_staging_bytes, .chunk_bytes = options_.device_staging_chunk_bytes});
  if (!pool.ok()) return pool.status();
  pool_ = *std::move(pool);
  return pool_.get();
}

absl::StatusOr<std::unique_ptr<Buffer>> DeviceStager::Register(void* data, size_t size) {
  if (data == nullptr || size == 0) return absl::InvalidArgumentError("an empty device buffer");
  absl::StatusOr<transfer::StagingPool*> pool = Pool();
  if (!pool.ok()) return pool.status();
  {
    absl::MutexLock lock(&mu_);
    if (absl::Status checked = device_->CheckDeviceRange(data, size); !checked.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "Register(kDevice): [0x", absl::Hex(reinterpret_cast<uintptr_t>(data)), ", +", size,
          ") is not device memory of ", device_->description(), ": ", checked.message()));
    }
  }
  return std::unique_ptr<Buffer>(
      new DeviceBuffer(static_cast<uint8_t*>(data), size, transfer::DeviceAllocation()));
}

absl::StatusOr<std::unique_ptr<Buffer>> DeviceStager::Allocate(size_t size) {
  if (size == 0) return absl::InvalidArgumentError("an empty device buffer");
  absl::StatusOr<transfer::StagingPool*> pool = Pool();
  if (!pool.ok()) return pool.status();
  absl::StatusOr<transfer::DeviceAllocation> allocation;
  {
    absl::MutexLock lock(&mu_);
    allocation = device_->Allocate(size);
  }
  if (!allocation.ok()) return allocation.status();
  uint8_t* data = allocation->data();
  return std::unique_ptr<Buffer>(new DeviceBuffer(data, size, *std::move(allocation)));
}

absl::StatusOr<std::shared_ptr<StagedBlocks>> DeviceStager::Stage(std::vector<uint8_t*> device,
                                                                   uint64_t block_bytes) {
  size_t count = 0;
  for (uint8_t* d : device) count += d != nullptr;
  if (count == 0) return nullptr;
  absl::StatusOr<transfer::StagingPool*> pool = Pool();
  if (!pool.ok()) return pool.status();
  auto staged = std::make_shared<StagedBlocks>();
  staged->host.assign(device.size(), nullptr);
  staged->device = std::move(device);
  // One lease for the batch when the pool has the room (small blocks then
  // share chunks); else a lease per block, so a batch larger than the pool
  // still stages most of its blocks there and only the rest in memory of
  // its own.
  if (absl::StatusOr<std::unique_ptr<transfer::StagingPool::Lease>> all =
          (*pool)->Take(count * block_bytes);
      all.ok()) {
    uint8_t* at = (*all)->data();
    for (size_t i = 0; i < staged->device.size(); ++i) {
      if (staged->device[i] == nullptr) continue;
      staged->host[i] = at;
      at += block_bytes;
    }
    staged->leases.push_back(*std::move(all));
    staged_blocks_.fetch_add(count, std::memory_order_relaxed);
    return staged;
  }
  for (size_t i = 0; i < staged->device.size(); ++i) {
    if (staged->device[i] == nullptr) continue;
    absl::StatusOr<std::unique_ptr<transfer::StagingPool::Lease>> lease =
        (*pool)->Take(block_bytes);
    if (lease.ok()) {
      staged->host[i] = (*lease)->data();
      staged->leases.push_back(*std::move(lease));
    } else {
      staged->own.push_back(std::unique_ptr<uint8_t[]>(new uint8_t[block_bytes]));
      staged->host[i] = staged->own.back().get();
      fallback_blocks_.fetch_add(1, std::memory_order_relaxed);
    }
  }
  staged_blocks_.fetch_add(count, std::memory_order_relaxed);
  return staged;
}

absl::Status DeviceStager::CopyDown(const StagedBlocks& staged, uint64_t block_bytes) {
  absl::StatusOr<transfer::StagingPool*> pool = Pool();
  if (!pool.ok()) return pool.status();
  std::vector<transfer::StagingPool::Copy> copies;
  for (size_t i = 0; i < staged.device.size(); ++i) {
    if (staged.device[i] != nullptr) copies.push_back({staged.host[i], staged.device[i], block_bytes});
  }
  absl::Status copied = (*pool)->CopyAll(copies, transfer::CopyKind::kDeviceToHost);
  if (!copied.ok()) {
    return absl::Status(copied.code(),
                        absl::StrCat("copying device blocks to staging: ", copied.message()));
  }
  return absl::OkStatus();
}

absl::Status DeviceStager::CopyUp(const StagedBlocks& staged, const std::vector<uint64_t>& sizes) {
  absl::StatusOr<transfer::StagingPool*> pool = Pool();
  if (!pool.ok()) return pool.status();
  std::vector<transfer::StagingPool::Copy> copies;
  for (size_t i = 0; i < staged.device.size() && i < sizes.size(); ++i) {
    if (staged.device[i] != nullptr && sizes[i] > 0) {
      copies.push_back({staged.device[i], staged.host[i], sizes[i]});
    }
  }
  if (copies.empty()) return absl::OkStatus();
  absl::Status copied = (*pool)->CopyAll(copies, transfer::CopyKind::kHostToDevice);
  if (!copied.ok()) {
    return absl::Status(copied.code(),
                        absl::StrCat("copying fetched blocks up to the device: ", copied.message()));
  }
  return absl::OkStatus();
}

absl::Status DeviceStager::CopyOnDevice(absl::Span<const transfer::StagingPool::Copy> copies) {
  absl::StatusOr<transfer::StagingPool*> pool = Pool();
  if (!pool.ok()) return pool.status();
  return (*pool)->CopyAll(copies, transfer::CopyKind::kDeviceToDevice);
}

absl::StatusOr<transfer::DeviceMemory*> DeviceStager::Device() {
  absl::StatusOr<transfer::StagingPool*> pool = Pool();
  if (!pool.ok()) return pool.status();
  absl::MutexLock lock(&mu_);
  return device_.get();
}

DeviceStagingCounters DeviceStager::counters() const {
  DeviceStagingCounters out;
  {
    absl::MutexLock lock(&mu_);
    if (pool_ != nullptr) {
      const transfer::StagingCounters c = pool_->counters();
      out.capacity_bytes = c.capacity_bytes;
      out.leased_bytes = c.leased_bytes;
    }
  }
  out.staged_blocks = staged_blocks_.load(std::memory_order_relaxed);
  out.fallback_blocks = fallback_blocks_.load(std::memory_order_relaxed);
  return out;
}

}  // namespace kvstrata::client
