#include "kvstrata/transfer/staging.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kvstrata/transfer/engine.h"

namespace kvstrata::transfer {

// The pinned region and which chunks are lent. Shared by the pool and its
// leases, so memory UCX may still be sending from is freed only after the
// last lease.
struct StagingPool::Lease::State {
  DeviceAllocation region;
  std::unique_ptr<MemoryRegion> registration;  // before `region` is freed
  uint64_t chunk_bytes = 0;
  mutable absl::Mutex mu;
  std::vector<bool> used ABSL_GUARDED_BY(mu);
  uint64_t leased_bytes ABSL_GUARDED_BY(mu) = 0;
  uint64_t leases ABSL_GUARDED_BY(mu) = 0;
  uint64_t exhausted ABSL_GUARDED_BY(mu) = 0;

  ~State() { registration.reset(); }
};

StagingPool::Lease::~Lease() {
  absl::MutexLock lock(&state_->mu);
  std::fill(state_->used.begin() + first_, state_->used.begin() + first_ + count_, false);
  state_->leased_bytes -= count_ * state_->chunk_bytes;
}

absl::StatusOr<std::unique_ptr<StagingPool>> StagingPool::Create(DeviceMemory& device,
                                                                 Engine* engine,
                                                                 const StagingOptions& options) {
  if (options.chunk_bytes == 0 || options.bytes == 0) {
    return absl::InvalidArgumentError("staging needs a positive size and chunk size");
  }
  const uint64_t chunks = (options.bytes + options.chunk_bytes - 1) / options.chunk_bytes;
  auto state = std::make_shared<Lease::State>();
  absl::StatusOr<DeviceAllocation> region = device.AllocatePinnedHost(chunks * options.chunk_bytes);
  if (!region.ok()) return region.status();
  state->region = *std::move(region);
  if (engine != nullptr) {
    absl::StatusOr<std::unique_ptr<MemoryRegion>> registered =
        engine->Register(state->region.data(), state->region.size());
    if (!registered.ok()) return registered.status();
    state->registration = *std::move(registered);
  }
  state->chunk_bytes = options.chunk_bytes;
  {
    absl::MutexLock lock(&state->mu);
    state->used.assign(chunks, false);
  }
  return std::unique_ptr<StagingPool>(
      new StagingPool(device, options.chunk_bytes, std::move(state)));
}

StagingPool::~StagingPool() = default;

absl::StatusOr<std::unique_ptr<StagingPool::Lease>> StagingPool::Take(uint64_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("a staging lease of 0 bytes");
  const size_t want = (bytes + chunk_bytes_ - 1) / chunk_bytes_;
  absl::MutexLock lock(&state_->mu);
  std::vector<bool>& used = state_->used;
  // First fit over the chunks: leases are a block each and short-lived, so
  // the region rarely fragments far.
  size_t run = 0;
  for (size_t i = 0; i < used.size(); ++i) {
    run = used[i] ? 0 : run + 1;
    if (run == want) {
      const size_t first = i + 1 - want;
      std::fill(used.begin() + first, used.begin() + i + 1, true);
      state_->leased_bytes += want * chunk_bytes_;
      ++state_->leases;
      return std::unique_ptr<Lease>(
          new Lease(state_, first, want, state_->region.data() + first * chunk_bytes_, bytes));
    }
  }
  ++state_->exhausted;
  return absl::ResourceExhaustedError(absl::StrCat("staging: no ", want, " free chunks of ",
                                                   chunk_bytes_, " bytes in ", used.size()));
}

absl::Status StagingPool::CopyAll(absl::Span<const Copy> copies, CopyKind kind) {
  std::unique_ptr<DeviceStream> stream;
  {
    absl::MutexLock lock(&streams_mu_);
    if (!idle_streams_.empty()) {
      stream = std::move(idle_streams_.back());
      idle_streams_.pop_back();
    }
  }
  if (stream == nullptr) {
    absl::StatusOr<std::unique_ptr<DeviceStream>> created = device_.CreateStream();
    if (!created.ok()) return created.status();
    stream = *std::move(created);
  }
  absl::Status status;
  for (const Copy& copy : copies) {
    for (uint64_t at = 0; at < copy.bytes && status.ok(); at += chunk_bytes_) {
      status =
          stream->Copy(copy.dst + at, copy.src + at, std::min(chunk_bytes_, copy.bytes - at), kind);
    }
    if (!status.ok()) break;
  }
  // Always wait: a failed queue may still have earlier copies in flight that
  // read or write the caller's memory.
  absl::Status synced = stream->Synchronize();
  if (status.ok()) status = synced;
  if (synced.ok()) {
    absl::MutexLock lock(&streams_mu_);
    idle_streams_.push_back(std::move(stream));
  }
  return status;
}

absl::Status StagingPool::CopyToHost(uint8_t* host, const uint8_t* device, uint64_t bytes) {
  const Copy copy{host, device, bytes};
  return CopyAll({&copy, 1}, CopyKind::kDeviceToHost);
}

absl::Status StagingPool::CopyToDevice(uint8_t* device, const uint8_t* host, uint64_t bytes) {
  const Copy copy{device, host, bytes};
  return CopyAll({&copy, 1}, CopyKind::kHostToDevice);
}

StagingCounters StagingPool::counters() const {
  absl::MutexLock lock(&state_->mu);
  return {.capacity_bytes = state_->region.size(),
          .leased_bytes = state_->leased_bytes,
          .leases = state_->leases,
          .exhausted = state_->exhausted};
}

}  // namespace kvstrata::transfer
