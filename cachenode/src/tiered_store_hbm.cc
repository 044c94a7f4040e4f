// TieredStore's HBM half: hot-first placement, promotion on hit, HBM -> DRAM
// demotion, staged copies for transfers. A block lives in HBM or in DRAM,
// not both (NVMe stays inclusive below them), so the tiers' capacities add.
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kvstrata/common/log.h"
#include "nvme/data_file.h"
#include "tiered_store.h"

namespace kvstrata::cachenode {

void TieredStore::WireHbm() {
  hbm_->slabs().set_moves(&moves_);  // an HBM eviction is a move until DRAM (or NVMe) has it
  hbm_->slabs().set_eviction_hook([this](const BlockId& id, std::shared_ptr<StoredBlock> block) {
    DemoteFromHbm(id, std::move(block));
  });
}

// An HBM eviction: its bytes copied down into a DRAM chunk (which may in turn
// evict DRAM -> NVMe), or, DRAM all pinned (or `into_dram` false), into
// memory of our own queued for NVMe. The HBM chunk stays allocated until
// `block` drops, so the copy reads bytes no one can overwrite.
void TieredStore::DemoteFromHbm(const BlockId& id, std::shared_ptr<StoredBlock> block,
                                bool into_dram) {
  absl::StatusOr<std::shared_ptr<StoredBlock>> host =
      into_dram ? dram_.Reserve(block->size())
                : absl::ResourceExhaustedError("a quota eviction leaves memory");
  const bool to_nvme = !host.ok();
  if (to_nvme && nvme_ != nullptr) {
    // Straight to NVMe's write-behind queue, from memory of our own (freed
    // once written).
    if (uint8_t* heap = nvme::AllocateAligned(block->size()).release(); heap != nullptr) {
      host =
          std::make_shared<StoredBlock>(heap, block->size(), [heap] { nvme::AlignedFree()(heap); });
    }
  }
  if (!host.ok() || !hbm_->CopyToHost(*block, (*host)->data()).ok()) {
    // A cache may drop a block; it is a miss from now on.
    if (into_dram) hbm_demotion_drops_.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  (*host)->checksum = block->checksum;
  (*host)->parent = block->parent;
  (*host)->has_parent = block->has_parent;
  (*host)->format = block->format;
  if (to_nvme) {
    nvme_->Demote(id, *std::move(host));
  } else {
    dram_.Commit(id, *std::move(host));  // false: a concurrent publish stored it: same bytes
  }
  hbm_demoted_.fetch_add(1, std::memory_order_relaxed);
}

bool TieredStore::InMemory(const BlockId& id) {
  return (hbm_ != nullptr && hbm_->slabs().Find(id, /*hit=*/false) != nullptr) ||
         dram_.Find(id, /*hit=*/false) != nullptr;
}

bool TieredStore::EvictFromMemory(const BlockId& id) {
  if (hbm_ != nullptr) {
    const DramTier::EvictionHook out_of_memory = [this](const BlockId& id,
                                                        std::shared_ptr<StoredBlock> block) {
      DemoteFromHbm(id, std::move(block), /*into_dram=*/false);
    };
    if (hbm_->slabs().Evict(id, &out_of_memory)) return true;
  }
  return dram_.Evict(id);
}

void TieredStore::set_memory_residency_hook(const DramTier::ResidencyHook& hook) {
  dram_.set_residency_hook(hook);
  if (hbm_ != nullptr) hbm_->slabs().set_residency_hook(hook);
}

// A DRAM block that was hit moves up. The caller keeps `block` (it may be
// serving it), so only the index entry leaves DRAM.
void TieredStore::PromoteToHbm(const BlockId& id, const std::shared_ptr<StoredBlock>& block) {
  // Begun before the source is checked: a Delete from here on waits for the
  // copy to land in HBM and erases it there (BlockMoves). A block no longer
  // (or never: read from NVMe into memory of our own) in DRAM stays put.
  ScopedMove move(&moves_, id);
  if (dram_.Find(id, /*hit=*/false) != block) return;
  absl::StatusOr<bool> admitted = hbm_->Admit(id, *block);
  if (!admitted.ok()) return;  // HBM all pinned or a copy failed: it stays in DRAM
  dram_.Erase(id);
  if (*admitted) hbm_promoted_.fetch_add(1, std::memory_order_relaxed);
}

absl::StatusOr<std::shared_ptr<StoredBlock>> TieredStore::Reserve(uint64_t size) {
  if (hbm_ != nullptr && size <= dram_.max_block_bytes()) {
    absl::StatusOr<std::shared_ptr<StoredBlock>> landing = hbm_->Landing(size);
    if (landing.ok()) return landing;
  }
  return dram_.Reserve(size);
}

absl::StatusOr<bool> TieredStore::Commit(const BlockId& id, std::shared_ptr<StoredBlock> block) {
  if (hbm_ == nullptr) return dram_.Commit(id, std::move(block));
  if (dram_.Find(id, /*hit=*/false) != nullptr) return false;
  absl::StatusOr<bool> admitted = hbm_->Admit(id, *block);
  if (admitted.ok()) return *admitted;
  // No room in HBM (every chunk pinned) or a copy failed: DRAM holds it
  // (a block that landed in staging is first copied into a DRAM chunk).
  if (!dram_.Owns(*block)) {
    absl::StatusOr<std::shared_ptr<StoredBlock>> chunk = dram_.Reserve(block->size());
    if (!chunk.ok()) return chunk.status();
    std::memcpy((*chunk)->data(), block->data(), block->size());
    (*chunk)->checksum = block->checksum;
    (*chunk)->parent = block->parent;
    (*chunk)->has_parent = block->has_parent;
    (*chunk)->format = block->format;
    block = *std::move(chunk);
  }
  return dram_.Commit(id, std::move(block));
}

std::vector<std::shared_ptr<StoredBlock>> TieredStore::Pin(absl::Span<const BlockId> ids) {
  if (hbm_ == nullptr) return PinDramOrNvme(ids);
  std::vector<std::shared_ptr<StoredBlock>> pinned(ids.size());
  std::vector<BlockId> below;
  std::vector<size_t> below_index;
  std::vector<std::shared_ptr<StoredBlock>> in_hbm;
  std::vector<size_t> hbm_index;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (std::shared_ptr<StoredBlock> block = hbm_->slabs().Find(ids[i], /*hit=*/true)) {
      in_hbm.push_back(std::move(block));
      hbm_index.push_back(i);
    } else {
      below.push_back(ids[i]);
      below_index.push_back(i);
    }
  }
  if (!in_hbm.empty()) {
    std::vector<std::shared_ptr<StoredBlock>> staged = hbm_->StageAll(std::move(in_hbm));
    for (size_t j = 0; j < staged.size(); ++j) {
      // Not staged (no host memory, or a failed device copy): a miss here.
      pinned[hbm_index[j]] = std::move(staged[j]);
    }
  }
  if (below.empty()) return pinned;
  std::vector<std::shared_ptr<StoredBlock>> found = PinDramOrNvme(below);
  for (size_t j = 0; j < below.size(); ++j) {
    if (found[j] == nullptr) continue;
    PromoteToHbm(below[j], found[j]);  // this fetch serves the DRAM copy it pinned
    pinned[below_index[j]] = std::move(found[j]);
  }
  return pinned;
}

std::vector<std::shared_ptr<StoredBlock>> TieredStore::PinHbm(absl::Span<const BlockId> ids) {
  std::vector<std::shared_ptr<StoredBlock>> pinned(ids.size());
  if (hbm_ == nullptr) return pinned;
  for (size_t i = 0; i < ids.size(); ++i) pinned[i] = hbm_->slabs().Find(ids[i], /*hit=*/true);
  return pinned;
}

TieredStore::HbmMoves TieredStore::hbm_moves() const {
  return {.promoted = hbm_promoted_.load(std::memory_order_relaxed),
          .demoted = hbm_demoted_.load(std::memory_order_relaxed),
          .demotion_drops = hbm_demotion_drops_.load(std::memory_order_relaxed)};
}

}  // namespace kvstrata::cachenode
