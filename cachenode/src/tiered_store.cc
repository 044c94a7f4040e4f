#include "tiered_store.h"

#include <algorithm>

#include "absl/container/flat_hash_set.h"
#include "nvme/data_file.h"

namespace kvstrata::cachenode {

TieredStore::TieredStore(DramTier& dram, NvmeTier* nvme, bool prefetch, HbmTier* hbm)
    : dram_(dram), nvme_(nvme), hbm_(hbm) {
  dram_.set_moves(&moves_);
  if (hbm_ != nullptr) WireHbm();
  if (nvme_ != nullptr) {
    dram_.set_eviction_hook([nvme](const BlockId& id, std::shared_ptr<StoredBlock> block) {
      nvme->Demote(id, std::move(block));
    });
    if (prefetch) prefetcher_ = std::thread([this] { PrefetchLoop(); });
  }
}

TieredStore::~TieredStore() {
  StopPrefetch();
  // The tiers outlive the store (a shutdown drains DRAM after it): they stop
  // registering moves here.
  dram_.set_moves(nullptr);
  if (hbm_ != nullptr) hbm_->slabs().set_moves(nullptr);
}

void TieredStore::StopPrefetch() {
  {
    std::lock_guard lock(prefetch_mu_);
    prefetch_stopping_ = true;
    prefetch_queue_.clear();
  }
  prefetch_cv_.notify_all();
  if (prefetcher_.joinable()) prefetcher_.join();
}

std::vector<ListedBlock> TieredStore::List(uint64_t namespace_id,
                                           const std::optional<BlockKey>& after, size_t limit,
                                           bool* more) {
  BlockPage page(after, limit);
  if (hbm_ != nullptr) hbm_->slabs().List(namespace_id, page);
  dram_.List(namespace_id, page);  // before NVMe: its offer wins for a block in both
  if (nvme_ != nullptr && nvme_->ready()) nvme_->List(namespace_id, page);
  *more = page.more();
  std::vector<ListedBlock> listed = page.Take();
  if (hbm_ != nullptr) {  // the HBM tier's index offers its blocks as DRAM's
    for (ListedBlock& block : listed) {
      if (block.tier == v1::TIER_DRAM && hbm_->slabs().Find({namespace_id, block.key}, false)) {
        block.tier = v1::TIER_HBM;
      }
    }
  }
  return listed;
}

std::vector<ListedBlock> TieredStore::Describe(absl::Span<const BlockId> ids) {
  std::vector<ListedBlock> out;
  for (const BlockId& id : ids) {
    if (std::shared_ptr<StoredBlock> block =
            hbm_ != nullptr ? hbm_->slabs().Find(id, /*hit=*/false) : nullptr) {
      out.push_back({.key = id.key,
                     .parent = block->has_parent ? std::optional(block->parent) : std::nullopt,
                     .size = block->size(),
                     .tier = v1::TIER_HBM});
      continue;
    }
    if (std::shared_ptr<StoredBlock> block = dram_.Find(id, /*hit=*/false)) {
      out.push_back({.key = id.key,
                     .parent = block->has_parent ? std::optional(block->parent) : std::nullopt,
                     .size = block->size(),
                     .tier = v1::TIER_DRAM});
      continue;
    }
    if (nvme_ == nullptr || !nvme_->ready()) continue;
    if (std::optional<NvmeBlockInfo> info = nvme_->Find(id, /*hit=*/false)) {
      out.push_back({.key = id.key, .parent = info->parent, .size = info->size, .tier = v1::TIER_NVME});
    } else if (std::shared_ptr<StoredBlock> queued = nvme_->FindQueued(id)) {
      out.push_back({.key = id.key,
                     .parent = queued->has_parent ? std::optional(queued->parent) : std::nullopt,
                     .size = queued->size(),
                     .tier = v1::TIER_NVME});
    }
  }
  std::sort(out.begin(), out.end(),
            [](const ListedBlock& a, const ListedBlock& b) { return a.key.bytes < b.key.bytes; });
  out.erase(std::unique(out.begin(), out.end(),
                        [](const ListedBlock& a, const ListedBlock& b) { return a.key == b.key; }),
            out.end());
  return out;
}

void TieredStore::Prefetch(std::vector<BlockId> ids) {
  if (ids.empty() || !prefetcher_.joinable()) return;
  {
    std::lock_guard lock(prefetch_mu_);
    for (const BlockId& id : ids) {
      if (prefetch_queue_.size() >= kMaxPrefetchQueue) break;
      prefetch_queue_.push_back(id);
    }
  }
  prefetch_cv_.notify_one();
}

void TieredStore::PrefetchLoop() {
  while (true) {
    std::vector<BlockId> batch;
    {
      std::unique_lock lock(prefetch_mu_);
      prefetch_cv_.wait(lock, [&] { return prefetch_stopping_ || !prefetch_queue_.empty(); });
      if (prefetch_stopping_) return;
      // Small batches: a prefetch never holds much DRAM while its reads run.
      while (!prefetch_queue_.empty() && batch.size() < 8) {
        batch.push_back(prefetch_queue_.front());
        prefetch_queue_.pop_front();
      }
    }
    Pin(batch);  // promotes what is still on NVMe only; the pins drop at once
  }
}

std::vector<v1::Tier> TieredStore::PrefixTiers(uint64_t namespace_id,
                                               absl::Span<const BlockKey> keys) {
  // The common case, a prefix wholly in DRAM, in one pass under one lock.
  const size_t in_dram = hbm_ != nullptr ? 0 : dram_.PrefixLength(namespace_id, keys);
  std::vector<v1::Tier> tiers(in_dram, v1::TIER_DRAM);
  if (nvme_ == nullptr && hbm_ == nullptr) return tiers;
  // Past it, blocks may be on NVMe (or in DRAM again, promoted).
  std::vector<BlockId> on_nvme;
  uint64_t prefetch_bytes = 0;
  // Prefetch at most a quarter of DRAM per Lookup: more would evict what it
  // just brought in.
  const uint64_t prefetch_limit = dram_.capacity_bytes() / 4;
  for (const BlockKey& key : keys.subspan(in_dram)) {
    const BlockId id{namespace_id, key};
    if (hbm_ != nullptr && hbm_->slabs().Find(id, /*hit=*/true) != nullptr) {
      tiers.push_back(v1::TIER_HBM);
    } else if (dram_.Find(id, /*hit=*/true) != nullptr ||
               (nvme_ != nullptr && nvme_->FindQueued(id) != nullptr)) {
      tiers.push_back(v1::TIER_DRAM);  // a queued block is still in memory until written
    } else if (nvme_ == nullptr) {
      break;
    } else if (std::optional<NvmeBlockInfo> info = nvme_->Find(id, /*hit=*/true)) {
      tiers.push_back(v1::TIER_NVME);
      if (prefetch_bytes + info->size <= prefetch_limit) {
        prefetch_bytes += info->size;
        on_nvme.push_back(id);
      }
    } else {
      break;
    }
  }
  Prefetch(std::move(on_nvme));
  return tiers;
}

bool TieredStore::Contains(const BlockId& id) {
  if (hbm_ != nullptr && hbm_->slabs().Find(id, /*hit=*/false) != nullptr) return true;
  return dram_.Find(id, /*hit=*/false) != nullptr || (nvme_ != nullptr && nvme_->Contains(id));
}

std::optional<uint8_t> TieredStore::StoredFormatOf(const BlockId& id) {
  if (std::shared_ptr<StoredBlock> block = dram_.Find(id, /*hit=*/false)) return block->format;
  if (hbm_ != nullptr) {
    if (std::shared_ptr<StoredBlock> block = hbm_->slabs().Find(id, /*hit=*/false)) {
      return block->format;
    }
  }
  if (nvme_ == nullptr) return std::nullopt;
  if (std::shared_ptr<StoredBlock> queued = nvme_->FindQueued(id)) return queued->format;
  if (std::optional<NvmeBlockInfo> info = nvme_->Find(id, /*hit=*/false)) return info->format;
  return std::nullopt;
}

std::vector<std::shared_ptr<StoredBlock>> TieredStore::PinDramOrNvme(absl::Span<const BlockId> ids) {
  std::vector<std::shared_ptr<StoredBlock>> pinned(ids.size());
  std::vector<BlockId> to_read;
  std::vector<size_t> read_index;
  std::vector<std::shared_ptr<StoredBlock>> staged;
  absl::flat_hash_set<size_t> unpromotable;  // indices into staged
  // Promotions into DRAM, begun before their NVMe copy is looked at, so a
  // Delete meanwhile waits for the commit and erases it (BlockMoves).
  std::vector<std::unique_ptr<ScopedMove>> moves;
  for (size_t i = 0; i < ids.size(); ++i) {
    pinned[i] = dram_.Find(ids[i], /*hit=*/true);
    if (pinned[i] != nullptr || nvme_ == nullptr) continue;
    moves.push_back(std::make_unique<ScopedMove>(&moves_, ids[i]));
    if (std::shared_ptr<StoredBlock> queued = nvme_->FindQueued(ids[i])) {
      // Evicted but not written yet: its memory is still valid; keep it.
      dram_.Commit(ids[i], queued);
      pinned[i] = std::move(queued);
      continue;
    }
    std::optional<NvmeBlockInfo> info = nvme_->Find(ids[i], /*hit=*/false);
    if (!info.has_value()) continue;
    absl::StatusOr<std::shared_ptr<StoredBlock>> block = dram_.Reserve(info->size);
    if (!block.ok()) {
      // DRAM is all pinned (transfers, promotions, demotions in flight): read
      // into memory of our own and serve from it, without promoting.
      uint8_t* heap = nvme::AllocateAligned(info->size).release();
      if (heap == nullptr) continue;
      block = std::make_shared<StoredBlock>(heap, info->size, [heap] { nvme::AlignedFree()(heap); });
      unpromotable.insert(read_index.size());
    }
    (*block)->checksum = info->checksum;
    (*block)->format = info->format;
    if (info->parent.has_value()) {
      (*block)->parent = *info->parent;
      (*block)->has_parent = true;
    }
    to_read.push_back(ids[i]);
    read_index.push_back(i);
    staged.push_back(*std::move(block));
  }
  if (to_read.empty()) return pinned;
  std::vector<StoredBlock*> destinations;
  for (const auto& block : staged) destinations.push_back(block.get());
  std::vector<absl::Status> results = nvme_->Read(to_read, destinations);
  for (size_t r = 0; r < to_read.size(); ++r) {
    if (!results[r].ok()) continue;  // the NVMe tier counted and dropped it
    if (!unpromotable.contains(r)) {
      dram_.Commit(to_read[r], staged[r]);  // a concurrent promotion may have won: same bytes
      promoted_.fetch_add(1, std::memory_order_relaxed);
    }
    pinned[read_index[r]] = std::move(staged[r]);
  }
  return pinned;
}

bool TieredStore::Erase(const BlockId& id) {
  // A move of the block in flight (an eviction being copied down, a hit being
  // copied up) may commit its copy after a pass, into a tier already erased:
  // BlockMoves waits for it and erases again, so that nothing of the block
  // is served once Delete returns.
  return moves_.Erase(id, [&] { return EraseEverywhere(id); });
}

bool TieredStore::EraseEverywhere(const BlockId& id) {
  const bool in_hbm = hbm_ != nullptr && hbm_->slabs().Erase(id);
  const bool in_dram = dram_.Erase(id);
  const bool in_nvme = nvme_ != nullptr && nvme_->Erase(id);
  return in_hbm || in_dram || in_nvme;
}

bool TieredStore::RequestFinished(const BlockId& last_block, uint32_t output_tokens) {
  bool known = dram_.RequestFinished(last_block, output_tokens);
  if (hbm_ != nullptr) known = hbm_->slabs().RequestFinished(last_block, output_tokens) || known;
  if (nvme_ != nullptr) {
    known = nvme_->RequestFinished(last_block, output_tokens) || known;
    known = known || nvme_->FindQueued(last_block) != nullptr;
  }
  return known;
}

}  // namespace kvstrata::cachenode
