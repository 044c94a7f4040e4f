#include "tiered_store.h"

namespace kvstrata::cachenode {

TieredStore::TieredStore(DramTier& dram, NvmeTier* nvme) : dram_(dram), nvme_(nvme) {
  if (nvme_ != nullptr) {
    dram_.set_eviction_hook([nvme](const BlockId& id, std::shared_ptr<StoredBlock> block) {
      nvme->Demote(id, std::move(block));
    });
  }
}

std::vector<v1::Tier> TieredStore::PrefixTiers(uint64_t namespace_id,
                                               absl::Span<const BlockKey> keys) {
  std::vector<v1::Tier> tiers;
  for (const BlockKey& key : keys) {
    const BlockId id{namespace_id, key};
    if (dram_.Find(id, /*hit=*/true) != nullptr) {
      tiers.push_back(v1::TIER_DRAM);
    } else if (nvme_ != nullptr && nvme_->FindQueued(id) != nullptr) {
      tiers.push_back(v1::TIER_DRAM);  // evicted, still in memory until written
    } else if (nvme_ != nullptr && nvme_->Find(id, /*hit=*/true).has_value()) {
      tiers.push_back(v1::TIER_NVME);
    } else {
      break;
    }
  }
  return tiers;
}

bool TieredStore::Contains(const BlockId& id) {
  return dram_.Find(id, /*hit=*/false) != nullptr || (nvme_ != nullptr && nvme_->Contains(id));
}

std::vector<std::shared_ptr<StoredBlock>> TieredStore::Pin(absl::Span<const BlockId> ids) {
  std::vector<std::shared_ptr<StoredBlock>> pinned(ids.size());
  std::vector<BlockId> to_read;
  std::vector<size_t> read_index;
  std::vector<std::shared_ptr<StoredBlock>> staged;
  for (size_t i = 0; i < ids.size(); ++i) {
    pinned[i] = dram_.Find(ids[i], /*hit=*/true);
    if (pinned[i] != nullptr || nvme_ == nullptr) continue;
    if (std::shared_ptr<StoredBlock> queued = nvme_->FindQueued(ids[i])) {
      // Evicted but not written yet: its memory is still valid; keep it.
      dram_.Commit(ids[i], queued);
      pinned[i] = std::move(queued);
      continue;
    }
    std::optional<NvmeBlockInfo> info = nvme_->Find(ids[i], /*hit=*/false);
    if (!info.has_value()) continue;
    absl::StatusOr<std::shared_ptr<StoredBlock>> block = dram_.Reserve(info->size);
    if (!block.ok()) continue;  // DRAM is all pinned: a miss, not an error
    (*block)->checksum = info->checksum;
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
    dram_.Commit(to_read[r], staged[r]);  // a concurrent promotion may have won: same bytes
    pinned[read_index[r]] = std::move(staged[r]);
    promoted_.fetch_add(1, std::memory_order_relaxed);
  }
  return pinned;
}

bool TieredStore::Erase(const BlockId& id) {
  const bool in_dram = dram_.Erase(id);
  const bool in_nvme = nvme_ != nullptr && nvme_->Erase(id);
  return in_dram || in_nvme;
}

}  // namespace kvstrata::cachenode
