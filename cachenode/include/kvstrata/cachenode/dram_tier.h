// The DRAM tier: one arena (registered with UCX once by the caller), slab
// allocation by size class, a sharded index and an eviction policy.
//
// Blocks enter in two steps so a half-written block is never visible:
// Reserve() finds memory (evicting if needed), the caller fills it and checks
// its checksum, Commit() publishes it. Thread-safe.
#pragma once

#include <array>
#include <atomic>
#include <functional>
#include <memory>
#include <optional>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "kvstrata/cachenode/block_index.h"
#include "kvstrata/cachenode/block_moves.h"
#include "kvstrata/cachenode/eviction_policy.h"
#include "kvstrata/cachenode/slab_allocator.h"

namespace kvstrata::cachenode {

// Stored formats are v1::StoredFormat values, 0 (raw) ..= 4 (int2_kivi).
inline constexpr size_t kStoredFormats = 5;

struct TierCounters {
  uint64_t capacity_bytes = 0;
  uint64_t used_bytes = 0;
  uint64_t stored_bytes = 0;
  uint64_t blocks = 0;
  uint64_t evictions = 0;
  // Per stored format (index: v1::StoredFormat value): blocks and bytes.
  std::array<uint64_t, kStoredFormats> format_blocks{};
  std::array<uint64_t, kStoredFormats> format_bytes{};
  uint64_t transcodes = 0;  // blocks transcoded to a coarser format
  // Victims kept at their coarser format for one more lease (leases by bytes).
  uint64_t precision_leases = 0;
};

// Precision tiers (NamespaceSpec.coarsest_format): when Reserve must make
// room, each block the policy names is first offered here; one whose
// namespace allows a coarser format is transcoded to it in place of being
// evicted, and stays with a fresh lease (as ReplayPrecision models). The
// policy decides which blocks, the namespace's budget how far. Leases by
// bytes (PrecisionLease::kByBytes): a block stored at 1/k of its raw bytes
// gets round(k) leases at that format (the policy names it, the tier gives
// it a fresh place instead of transcoding or evicting it, until they are
// spent; a hit renews them), so each rung keeps a block for about the
// byte x time of one raw lease.
class BlockTranscoder {
 public:
  virtual ~BlockTranscoder() = default;
  // The bytes `block` takes one format coarser, when its namespace allows
  // one; nullopt otherwise. Cheap: called under the tier's lock.
  virtual std::optional<uint64_t> CoarserSize(const BlockId& id, const StoredBlock& block) const = 0;
  // Encodes `from` one format coarser into `to` (CoarserSize bytes) and sets
  // `to.format`; the tier sets the checksum, parent and swaps it in. Called
  // without the tier's lock; `from` stays pinned and unchanged meanwhile.
  virtual absl::Status Transcode(const BlockId& id, const StoredBlock& from, StoredBlock& to) const = 0;
  // The raw bytes of the namespace's blocks (what a coarser copy's leases
  // are counted against); 0 when unknown (one lease per format). Cheap:
  // called under the tier's lock.
  virtual uint64_t RawSize(const BlockId& id) const {
    (void)id;
    return 0;
  }
};

class DramTier {
 public:
  // `arena` must stay valid for the tier's lifetime and for as long as any
  // StoredBlock handed out lives.
  DramTier(uint8_t* arena, uint64_t capacity, uint64_t slab_bytes,
           std::unique_ptr<EvictionPolicy> policy);
  ~DramTier();

  // Memory for a block of `size` bytes that is not in the index yet.
  // RESOURCE_EXHAUSTED when nothing can be evicted to make room.
  absl::StatusOr<std::shared_ptr<StoredBlock>> Reserve(uint64_t size);
  // Makes a reserved, filled block visible. False when `id` is stored already
  // (the reservation is then simply dropped by the caller).
  bool Commit(const BlockId& id, std::shared_ptr<StoredBlock> block);

  // The stored block or null. `hit` tells the policy it was used.
  std::shared_ptr<StoredBlock> Find(const BlockId& id, bool hit);
  // Number of leading keys stored (the longest cached prefix); hits them.
  size_t PrefixLength(uint64_t namespace_id, absl::Span<const BlockKey> keys);
  bool Erase(const BlockId& id);
  // Offers `page` every block of the namespace stored here.
  void List(uint64_t namespace_id, BlockPage& page) const { index_.List(namespace_id, page); }
  // Passes the engine's request-finished hint to the policy (which ignores
  // blocks it does not track). True when the block is stored here.
  bool RequestFinished(const BlockId& last_block, uint32_t output_tokens);

  TierCounters counters() const;
  uint64_t capacity_bytes() const { return allocator_->capacity(); }

  // Receives each block evicted to make room (not those erased), outside the
  // tier's lock; the NVMe tier demotes them. Keeping the block keeps its
  // memory allocated, so Reserve evicts further until room is really free.
  // Set once, before the tier is used.
  using EvictionHook = std::function<void(const BlockId&, std::shared_ptr<StoredBlock>)>;
  void set_eviction_hook(EvictionHook hook) { eviction_hook_ = std::move(hook); }

  // Told of every block that enters the index (`resident` true) and leaves
  // it (evicted, erased, drained), with its stored size, outside the tier's
  // lock; per-tenant accounting listens here. Set once, before use.
  using ResidencyHook = std::function<void(const BlockId&, uint64_t size, bool resident)>;
  void set_residency_hook(ResidencyHook hook) { residency_hook_ = std::move(hook); }

  // Registers each eviction handed to the eviction hook (or a Drain's sink)
  // in `moves` from its removal until the hook returns, so that a Delete
  // waits for the copy the hook makes (BlockMoves). Set once, before use.
  void set_moves(BlockMoves* moves) { moves_ = moves; }

  // Enables precision tiers: `transcoder` (which must outlive the tier) is
  // asked about every victim before it is evicted. Set once, before use.
  void set_transcoder(const BlockTranscoder* transcoder) { transcoder_ = transcoder; }

  // Evicts `id` as if the policy had chosen it: handed to `sink` when
  // given, else to the eviction hook (which demotes it). False when it is
  // not stored. A tenant over its quota makes room this way among its own
  // blocks.
  bool Evict(const BlockId& id, const EvictionHook* sink = nullptr);

  // Removes every block, in the policy's eviction order (least valuable
  // first), handing each to `sink`. For shutdown: the node writes them to NVMe.
  void Drain(const EvictionHook& sink);

  uint64_t max_block_bytes() const { return allocator_->max_allocation(); }
  // Whether `block`'s bytes lie in this tier's arena (one Reserve made it).
  bool Owns(const StoredBlock& block) const {
    return block.data() >= arena_ && block.data() < arena_ + allocator_->capacity();
  }

 private:
  // Takes the policy's victim out of the index and hands it to `sink`:
  // nullopt when the policy holds none, false when the victim was already
  // gone from the index (nothing handed over).
  std::optional<bool> RemoveVictim(const EvictionHook& sink);
  // Removes `id` from the index and the policy; null when it is not stored.
  // With `move`, begins its move in moves_ (if set) under the same lock.
  std::shared_ptr<StoredBlock> TakeOut(const BlockId& id, uint64_t* move = nullptr);
  // One step of making room: transcodes the policy's victim when its
  // namespace allows, else evicts it. nullopt when the policy holds none.
  // `follow_up`: may take one more step (see the .cc).
  // `transcode_only`: never evicts (false when the victim cannot be transcoded).
  std::optional<bool> MakeRoom(bool follow_up = true, bool transcode_only = false);
  // Memory for `old`'s encoding one format coarser (`size` bytes): a chunk
  // of its size class, else a piece of a raw-sized chunk
  // (SlabAllocator::AllocatePiece); nullopt when neither is free.
  std::optional<uint64_t> RoomFor(const StoredBlock& old, uint64_t size);
  // Encodes `old` (stored as `id`) into `at` (from RoomFor, owned from here)
  // and swaps it in. False when the encoding failed (`at` is freed).
  bool TranscodeInto(const BlockId& id, std::shared_ptr<StoredBlock> old, uint64_t at, uint64_t size);
  // Encodes `old` over its own memory (SlabAllocator::ShrinkInPlace), for a
  // tier with no room for the copy. False, and nothing changed, when a
  // reader holds the block (its bytes must stay) or the encoding failed.
  bool TranscodeInPlace(const BlockId& id, std::shared_ptr<StoredBlock> old, uint64_t size);
  // Counts a swap of `coarser` in for a block of `old_size` bytes and
  // `old_format`. REQUIRES: mu_ held, with the swap (see TranscodeInto).
  void CountTranscode(uint64_t old_size, uint8_t old_format, const StoredBlock& coarser)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Reports a transcode's new size to the residency hook; after mu_.
  void ReportTranscode(const BlockId& id, uint64_t old_size, uint64_t size);
  std::shared_ptr<StoredBlock> MakeBlock(uint64_t offset, uint64_t size);
  // Sets `block`'s leases for its size: round(raw / size), 1..255, all left
  // but the one it starts with. REQUIRES: transcoder_ set.
  void GrantLeases(const BlockId& id, StoredBlock& block) const;
  void CountFormat(uint8_t format, uint64_t size, bool add);

  uint8_t* const arena_;
  std::shared_ptr<SlabAllocator> allocator_;  // shared with blocks' release hooks
  BlockIndex index_;
  std::atomic<uint64_t> stored_bytes_{0};
  std::atomic<uint64_t> evictions_{0};
  std::atomic<uint64_t> transcodes_{0};
  std::atomic<uint64_t> precision_leases_{0};
  // The largest raw block a transcode came from: the size of the chunks
  // encoded blocks are packed into (SlabAllocator::AllocatePiece).
  std::atomic<uint64_t> host_bytes_{0};
  std::array<std::atomic<uint64_t>, kStoredFormats> format_blocks_{};
  std::array<std::atomic<uint64_t>, kStoredFormats> format_bytes_{};
  const BlockTranscoder* transcoder_ = nullptr;
  BlockMoves* moves_ = nullptr;
  EvictionHook eviction_hook_;
  ResidencyHook residency_hook_;
  // Serializes the policy, and eviction with commit so a victim chosen is
  // really in the index.
  mutable absl::Mutex mu_;
  std::unique_ptr<EvictionPolicy> policy_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvstrata::cachenode
