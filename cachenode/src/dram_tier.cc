#include "kvstrata/cachenode/dram_tier.h"

#include "absl/strings/str_cat.h"

namespace kvstrata::cachenode {

DramTier::DramTier(uint8_t* arena, uint64_t capacity, uint64_t slab_bytes,
                   std::unique_ptr<EvictionPolicy> policy)
    : arena_(arena),
      allocator_(std::make_shared<SlabAllocator>(capacity, slab_bytes)),
      policy_(std::move(policy)) {}

DramTier::~DramTier() = default;

absl::StatusOr<std::shared_ptr<StoredBlock>> DramTier::Reserve(uint64_t size) {
  if (size == 0 || size > allocator_->max_allocation()) {
    return absl::InvalidArgumentError(absl::StrCat("block of ", size, " bytes; this tier holds 1..",
                                                   allocator_->max_allocation()));
  }
  std::optional<uint64_t> offset = allocator_->Allocate(size);
  // Evict until the allocation fits. A victim's memory returns when its last
  // reader (or the NVMe write-behind queue) lets go, so a pinned victim only
  // makes room later and the loop evicts further.
  while (!offset.has_value()) {
    std::optional<bool> evicted =
        RemoveVictim([&](const BlockId& id, std::shared_ptr<StoredBlock> block) {
          evictions_.fetch_add(1, std::memory_order_relaxed);
          if (eviction_hook_) eviction_hook_(id, std::move(block));
        });
    if (!evicted.has_value()) {
      return absl::ResourceExhaustedError(
          absl::StrCat("DRAM tier full: no evictable block frees room for ", size, " bytes"));
    }
    offset = allocator_->Allocate(size);
  }
  std::weak_ptr<SlabAllocator> allocator = allocator_;
  const uint64_t at = *offset;
  return std::make_shared<StoredBlock>(arena_ + at, size, [allocator, at] {
    if (auto alive = allocator.lock()) alive->Free(at);
  });
}

bool DramTier::Commit(const BlockId& id, std::shared_ptr<StoredBlock> block) {
  const uint64_t size = block->size();
  const bool has_parent = block->has_parent;
  const BlockKey parent = block->parent;
  {
    absl::MutexLock lock(&mu_);
    if (!index_.Insert(id, std::move(block))) return false;
    policy_->OnInsert(id, has_parent ? std::optional<BlockId>(BlockId{id.namespace_id, parent})
                                     : std::nullopt);
    stored_bytes_.fetch_add(size, std::memory_order_relaxed);
  }
  if (residency_hook_) residency_hook_(id, size, true);
  return true;
}

std::shared_ptr<StoredBlock> DramTier::Find(const BlockId& id, bool hit) {
  std::shared_ptr<StoredBlock> block = index_.Find(id);
  if (block != nullptr && hit) {
    absl::MutexLock lock(&mu_);
    policy_->OnHit(id);
  }
  return block;
}

size_t DramTier::PrefixLength(uint64_t namespace_id, absl::Span<const BlockKey> keys) {
  size_t length = 0;
  while (length < keys.size() && index_.Find(BlockId{namespace_id, keys[length]}) != nullptr) {
    ++length;
  }
  if (length > 0) {
    absl::MutexLock lock(&mu_);
    for (size_t i = 0; i < length; ++i) policy_->OnHit(BlockId{namespace_id, keys[i]});
  }
  return length;
}

std::shared_ptr<StoredBlock> DramTier::TakeOut(const BlockId& id) {
  std::shared_ptr<StoredBlock> block;
  {
    absl::MutexLock lock(&mu_);
    block = index_.Erase(id);
    if (block == nullptr) return nullptr;
    policy_->OnErase(id);
  }
  stored_bytes_.fetch_sub(block->size(), std::memory_order_relaxed);
  if (residency_hook_) residency_hook_(id, block->size(), false);
  return block;
}

bool DramTier::Erase(const BlockId& id) { return TakeOut(id) != nullptr; }

bool DramTier::Evict(const BlockId& id) {
  std::shared_ptr<StoredBlock> block = TakeOut(id);
  if (block == nullptr) return false;
  evictions_.fetch_add(1, std::memory_order_relaxed);
  if (eviction_hook_) eviction_hook_(id, std::move(block));
  return true;
}

bool DramTier::RequestFinished(const BlockId& last_block, uint32_t output_tokens) {
  const bool stored = index_.Find(last_block) != nullptr;
  absl::MutexLock lock(&mu_);
  policy_->OnRequestFinished(last_block, output_tokens);
  return stored;
}

std::optional<bool> DramTier::RemoveVictim(const EvictionHook& sink) {
  std::shared_ptr<StoredBlock> block;
  BlockId id;
  {
    absl::MutexLock lock(&mu_);
    std::optional<BlockId> victim = policy_->Victim();
    if (!victim.has_value()) return std::nullopt;
    block = index_.Erase(*victim);
    policy_->OnErase(*victim);
    id = *victim;
  }
  if (block == nullptr) return false;
  stored_bytes_.fetch_sub(block->size(), std::memory_order_relaxed);
  if (residency_hook_) residency_hook_(id, block->size(), false);
  sink(id, std::move(block));
  return true;
}

void DramTier::Drain(const EvictionHook& sink) {
  while (RemoveVictim(sink).has_value()) {
  }
}

TierCounters DramTier::counters() const {
  TierCounters c;
  c.capacity_bytes = allocator_->capacity();
  c.used_bytes = allocator_->used_bytes();
  c.stored_bytes = stored_bytes_.load(std::memory_order_relaxed);
  c.blocks = index_.size();
  c.evictions = evictions_.load(std::memory_order_relaxed);
  return c;
}

}  // namespace kvstrata::cachenode
