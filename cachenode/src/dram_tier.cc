#include "kvstrata/cachenode/dram_tier.h"

#include <algorithm>
#include <cstring>

#include "absl/container/inlined_vector.h"
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
  // Compress before taking memory when the tier is nearly full: a chunk
  // that just came free (an NVMe write-behind released it) then hosts the
  // victim's coarser copy and the caller takes the victim's raw chunk,
  // rather than the caller taking it and the victim being evicted raw next.
  if (transcoder_ != nullptr) {
    const uint64_t host = host_bytes_.load(std::memory_order_relaxed);
    if (host > 0 && size >= host &&
        allocator_->capacity() - allocator_->used_bytes() <= 2 * allocator_->ChunkSize(host)) {
      MakeRoom(/*follow_up=*/false, /*transcode_only=*/true);
    }
  }
  std::optional<uint64_t> offset = allocator_->Allocate(size);
  // Transcode or evict until the allocation fits. A victim's memory returns
  // when its last reader (or the NVMe write-behind queue) lets go, so a
  // pinned victim only makes room later and the loop goes on. It ends: each
  // step evicts a block or moves one a rung down a finite ladder.
  while (!offset.has_value()) {
    // A block smaller than a raw chunk (an encoded one promoted from NVMe,
    // a quantized namespace's) fits a piece when its class has no slab.
    if (const uint64_t host = host_bytes_.load(std::memory_order_relaxed); host > size) {
      offset = allocator_->AllocatePiece(size, host);
      if (offset.has_value()) break;
    }
    if (!MakeRoom().has_value()) {
      return absl::ResourceExhaustedError(
          absl::StrCat("DRAM tier full: no evictable block frees room for ", size, " bytes"));
    }
    offset = allocator_->Allocate(size);
  }
  return MakeBlock(*offset, size);
}

std::shared_ptr<StoredBlock> DramTier::MakeBlock(uint64_t offset, uint64_t size) {
  std::weak_ptr<SlabAllocator> allocator = allocator_;
  return std::make_shared<StoredBlock>(arena_ + offset, size, [allocator, offset] {
    if (auto alive = allocator.lock()) alive->Free(offset);
  });
}

void DramTier::GrantLeases(const BlockId& id, StoredBlock& block) const {
  const uint64_t raw = transcoder_->RawSize(id);
  const uint64_t size = std::max<uint64_t>(block.size(), 1);
  const uint64_t grant = std::clamp<uint64_t>((raw + size / 2) / size, 1, 255);
  block.lease_grant = static_cast<uint8_t>(grant);
  block.leases_left = static_cast<uint8_t>(grant - 1);
}

void DramTier::CountFormat(uint8_t format, uint64_t size, bool add) {
  const size_t f = format < kStoredFormats ? format : 0;
  if (add) {
    format_blocks_[f].fetch_add(1, std::memory_order_relaxed);
    format_bytes_[f].fetch_add(size, std::memory_order_relaxed);
  } else {
    format_blocks_[f].fetch_sub(1, std::memory_order_relaxed);
    format_bytes_[f].fetch_sub(size, std::memory_order_relaxed);
  }
}

std::optional<bool> DramTier::MakeRoom(bool follow_up, bool transcode_only) {
  if (transcoder_ != nullptr) {
    BlockId id;
    std::shared_ptr<StoredBlock> block;
    std::optional<uint64_t> coarser, at;
    {
      absl::MutexLock lock(&mu_);
      // Leases by bytes: a victim with leases left at its format gets a
      // fresh place and the policy is asked again. Ends: each turn spends
      // one of a finite number of leases (only hits grant more).
      for (;;) {
        std::optional<BlockId> victim = policy_->Victim();
        if (!victim.has_value()) return std::nullopt;
        id = *victim;
        block = index_.Find(id);
        if (block == nullptr || block->leases_left == 0) break;
        --block->leases_left;
        policy_->OnKept(id);
        precision_leases_.fetch_add(1, std::memory_order_relaxed);
      }
      if (block != nullptr) coarser = transcoder_->CoarserSize(id, *block);
      // Memory for the copy first (the allocator's lock is a leaf), then a
      // fresh lease at the coarser format, taken now so that concurrent
      // Reserves pick other victims while this one is encoded (into that
      // memory or over itself).
      if (coarser.has_value()) {
        at = RoomFor(*block, *coarser);
        policy_->OnKept(id);
      }
    }
    if (coarser.has_value()) {
      if (at.has_value() && TranscodeInto(id, std::move(block), *at, *coarser)) return true;
      // No free memory for the copy in a follow-up (the eviction before it
      // freed nothing yet: the NVMe write-behind queue or a reader holds the
      // evicted block) or before a Reserve: encode the victim over itself.
      // Before this, beside NVMe, most victims were evicted raw. Not on the
      // first step: evicting a raw block frees a whole chunk, which packs
      // encoded copies better than shrinking every victim where it is
      // (cachenode/README.md, "Precision tiers").
      if (!at.has_value() && transcode_only && TranscodeInPlace(id, std::move(block), *coarser)) {
        return true;
      }
      if (transcode_only) return false;
      // No room (or a reader holds it, or no encoding): give the block up
      // (our pin first, so that its memory can return).
      block.reset();
      if (!Evict(id)) return false;
      // That freed a raw chunk: transcode the next victim into it now (cut
      // into pieces), before the caller's allocation takes it for its own
      // block. A held victim frees nothing yet: the follow-up then encodes
      // the next one over itself.
      if (follow_up) MakeRoom(/*follow_up=*/false, /*transcode_only=*/true);
      return true;
    }
    if (transcode_only) return false;
  }
  return RemoveVictim([&](const BlockId& victim, std::shared_ptr<StoredBlock> evicted) {
    evictions_.fetch_add(1, std::memory_order_relaxed);
    if (eviction_hook_) eviction_hook_(victim, std::move(evicted));
  });
}

std::optional<uint64_t> DramTier::RoomFor(const StoredBlock& old, uint64_t size) {
  if (size == 0 || size >= old.size()) return std::nullopt;
  std::optional<uint64_t> at = allocator_->Allocate(size);
  if (!at.has_value()) {
    // Share a raw-sized chunk with other encoded blocks: a hole one holds,
    // or a free chunk of the raw class cut into pieces. Raw chunks are what
    // a full tier has; a slab of the coarser class is not.
    if (old.format == 0) {
      uint64_t seen = host_bytes_.load(std::memory_order_relaxed);
      while (old.size() > seen &&
             !host_bytes_.compare_exchange_weak(seen, old.size(), std::memory_order_relaxed)) {
      }
    }
    at = allocator_->AllocatePiece(size, host_bytes_.load(std::memory_order_relaxed));
  }
  // Neither: the caller encodes the victim over itself (TranscodeInPlace),
  // or, when a reader holds it, evicts it and transcodes the next victim
  // into the raw chunk that frees (MakeRoom's follow-up). Draining a
  // slab for the coarser class instead (what this did before pieces) held
  // 167 blocks in precision_test's pressure test where pieces hold 192.
  return at;
}

bool DramTier::TranscodeInto(const BlockId& id, std::shared_ptr<StoredBlock> old, uint64_t at,
                             uint64_t size) {
  // Owns `at` from here: dropped on any failure, which frees it.
  std::shared_ptr<StoredBlock> coarser = MakeBlock(at, size);
  if (absl::Status s = transcoder_->Transcode(id, *old, *coarser); !s.ok()) return false;
  // The checksum covers the stored bytes at every format.
  coarser->checksum = BlockChecksum(coarser->data(), coarser->size());
  coarser->parent = old->parent;
  coarser->has_parent = old->has_parent;
  GrantLeases(id, *coarser);  // not visible yet: no lock needed
  const uint64_t old_size = old->size();
  const uint8_t old_format = old->format;
  {
    absl::MutexLock lock(&mu_);
    // Readers that pinned `old` keep sending it whole; later ones get the
    // new block. Erased or republished meanwhile: nothing to swap, and the
    // coarser copy goes back.
    if (!index_.Replace(id, old.get(), coarser)) return true;
    CountTranscode(old_size, old_format, *coarser);
  }
  ReportTranscode(id, old_size, size);
  return true;  // `old` drops here: its memory returns once no reader holds it
}

bool DramTier::TranscodeInPlace(const BlockId& id, std::shared_ptr<StoredBlock> old,
                                uint64_t size) {
  // Encoded aside first: the block's own bytes are overwritten only once no
  // reader can see them (ReplaceIfSole).
  auto scratch = std::make_unique<uint8_t[]>(size);
  StoredBlock encoded(scratch.get(), size, nullptr);
  if (absl::Status s = transcoder_->Transcode(id, *old, encoded); !s.ok()) return false;
  const uint64_t checksum = BlockChecksum(scratch.get(), size);
  const uint64_t old_size = old->size();
  const uint8_t old_format = old->format;
  {
    absl::MutexLock lock(&mu_);
    std::shared_ptr<StoredBlock> coarser;
    const bool swapped = index_.ReplaceIfSole(id, old.get(), [&]() -> std::shared_ptr<StoredBlock> {
      const uint64_t offset = static_cast<uint64_t>(old->data() - arena_);
      allocator_->ShrinkInPlace(offset, size);
      old->Disown();  // its memory is the coarser block's now
      std::memcpy(old->data(), scratch.get(), size);
      coarser = MakeBlock(offset, size);
      coarser->checksum = checksum;
      coarser->parent = old->parent;
      coarser->has_parent = old->has_parent;
      coarser->format = encoded.format;
      GrantLeases(id, *coarser);
      return coarser;
    });
    if (!swapped) return false;
    CountTranscode(old_size, old_format, *coarser);
  }
  ReportTranscode(id, old_size, size);
  return true;
}

void DramTier::CountTranscode(uint64_t old_size, uint8_t old_format, const StoredBlock& coarser) {
  // Counted under the lock: an erase of the new block (which takes it) then
  // always subtracts after these adds.
  stored_bytes_.fetch_add(coarser.size(), std::memory_order_relaxed);
  stored_bytes_.fetch_sub(old_size, std::memory_order_relaxed);
  CountFormat(coarser.format, coarser.size(), true);
  CountFormat(old_format, old_size, false);
}

void DramTier::ReportTranscode(const BlockId& id, uint64_t old_size, uint64_t size) {
  transcodes_.fetch_add(1, std::memory_order_relaxed);
  if (residency_hook_) {
    // The new size first: a concurrent erase of the block then never takes
    // its tenant's count through zero.
    residency_hook_(id, size, true);
    residency_hook_(id, old_size, false);
  }
}

bool DramTier::Commit(const BlockId& id, std::shared_ptr<StoredBlock> block) {
  const uint64_t size = block->size();
  const bool has_parent = block->has_parent;
  const BlockKey parent = block->parent;
  const uint8_t format = block->format;
  // A block stored coarser already (promoted from NVMe, say) keeps the
  // leases its size earns. Not visible yet: no lock needed.
  if (transcoder_ != nullptr && format != 0) GrantLeases(id, *block);
  {
    absl::MutexLock lock(&mu_);
    if (!index_.Insert(id, std::move(block))) return false;
    policy_->OnInsert(id, has_parent ? std::optional<BlockId>(BlockId{id.namespace_id, parent})
                                     : std::nullopt);
    stored_bytes_.fetch_add(size, std::memory_order_relaxed);
  }
  CountFormat(format, size, true);
  if (residency_hook_) residency_hook_(id, size, true);
  return true;
}

std::shared_ptr<StoredBlock> DramTier::Find(const BlockId& id, bool hit) {
  std::shared_ptr<StoredBlock> block = index_.Find(id);
  if (block != nullptr && hit) {
    absl::MutexLock lock(&mu_);
    policy_->OnHit(id);
    block->leases_left = block->lease_grant - 1;  // a hit renews its leases
  }
  return block;
}

size_t DramTier::PrefixLength(uint64_t namespace_id, absl::Span<const BlockKey> keys) {
  size_t length = 0;
  // The blocks found, to renew their leases (precision tiers only).
  absl::InlinedVector<std::shared_ptr<StoredBlock>, 16> found;
  while (length < keys.size()) {
    std::shared_ptr<StoredBlock> block = index_.Find(BlockId{namespace_id, keys[length]});
    if (block == nullptr) break;
    if (transcoder_ != nullptr) found.push_back(std::move(block));
    ++length;
  }
  if (length > 0) {
    absl::MutexLock lock(&mu_);
    for (size_t i = 0; i < length; ++i) policy_->OnHit(BlockId{namespace_id, keys[i]});
    for (const std::shared_ptr<StoredBlock>& block : found) {
      block->leases_left = block->lease_grant - 1;
    }
  }
  return length;
}

std::shared_ptr<StoredBlock> DramTier::TakeOut(const BlockId& id, uint64_t* move) {
  std::shared_ptr<StoredBlock> block;
  {
    absl::MutexLock lock(&mu_);
    block = index_.Erase(id);
    if (block == nullptr) return nullptr;
    policy_->OnErase(id);
    // With the removal, so that a Delete that finds the block in no index
    // knows to wait for it (BlockMoves).
    if (move != nullptr && moves_ != nullptr) *move = moves_->Begin(id);
  }
  stored_bytes_.fetch_sub(block->size(), std::memory_order_relaxed);
  CountFormat(block->format, block->size(), false);
  if (residency_hook_) residency_hook_(id, block->size(), false);
  return block;
}

bool DramTier::Erase(const BlockId& id) { return TakeOut(id) != nullptr; }

bool DramTier::Evict(const BlockId& id, const EvictionHook* sink) {
  const EvictionHook* to = sink != nullptr ? sink : &eviction_hook_;
  uint64_t move = 0;
  std::shared_ptr<StoredBlock> block = TakeOut(id, *to ? &move : nullptr);
  if (block == nullptr) return false;
  evictions_.fetch_add(1, std::memory_order_relaxed);
  if (*to) (*to)(id, std::move(block));
  if (move != 0) moves_->End(move);
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
  uint64_t move = 0;
  {
    absl::MutexLock lock(&mu_);
    std::optional<BlockId> victim = policy_->Victim();
    if (!victim.has_value()) return std::nullopt;
    block = index_.Erase(*victim);
    policy_->OnErase(*victim);
    id = *victim;
    if (block != nullptr && moves_ != nullptr) move = moves_->Begin(id);  // see TakeOut
  }
  if (block == nullptr) return false;
  stored_bytes_.fetch_sub(block->size(), std::memory_order_relaxed);
  CountFormat(block->format, block->size(), false);
  if (residency_hook_) residency_hook_(id, block->size(), false);
  sink(id, std::move(block));
  if (move != 0) moves_->End(move);
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
  c.transcodes = transcodes_.load(std::memory_order_relaxed);
  c.precision_leases = precision_leases_.load(std::memory_order_relaxed);
  for (size_t f = 0; f < kStoredFormats; ++f) {
    c.format_blocks[f] = format_blocks_[f].load(std::memory_order_relaxed);
    c.format_bytes[f] = format_bytes_[f].load(std::memory_order_relaxed);
  }
  return c;
}

}  // namespace kvstrata::cachenode
