// The NVMe tier: blocks the DRAM tier evicts are written behind to
// preallocated data files (O_DIRECT through io_uring, 4 KiB-aligned extents)
// and indexed in RocksDB, so they survive a restart.
//
// Crash safety comes from ordering and checksums, not from fsync: a block's
// bytes are written before its index record, an extent is reused only after
// the deletion of its old record is in the index, and every read is checked
// against the record's XXH3. A record that is damaged, overlaps another or
// points past its file is dropped at recovery; a block whose bytes no longer
// match is dropped when read. Either way it is a miss, never a wrong block.
//
// Thread-safe. Writes happen on one background thread fed by a bounded queue:
// Demote() waits at most max_demotion_wait for room, then drops the block.
#pragma once

#include <array>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "kvstrata/cachenode/block.h"
#include "kvstrata/cachenode/block_page.h"

namespace kvstrata::cachenode {

struct NvmeTierOptions {
  // One preallocated data file per directory (one per device, typically).
  std::vector<std::string> directories;
  uint64_t capacity_per_directory = 0;
  // Where RocksDB keeps the index; empty: <directories[0]>/kvstrata-index.
  std::string index_directory;
  // Above high * capacity the writer evicts down to low * capacity, so
  // demotions find free extents without evicting on the write path.
  double high_watermark = 0.95;
  double low_watermark = 0.85;
  unsigned queue_depth = 32;  // I/O operations in flight per batch
  // Blocks the write-behind thread writes per batch (one index write each);
  // larger batches keep the queue full across more of the stream.
  unsigned write_batch_blocks = 128;
  // Bytes of evicted DRAM blocks waiting to be written; beyond it blocks are
  // dropped. Their DRAM stays allocated until written, so this also bounds
  // how much of the DRAM tier demotion may hold.
  uint64_t write_queue_bytes = 64ull << 20;
  // How long a demotion may wait for room in a full write queue before the
  // block is dropped: short bursts slow the publisher down to the disk's
  // pace instead of losing blocks; a disk that cannot keep up never stalls
  // it for longer than this.
  absl::Duration max_demotion_wait = absl::Milliseconds(100);
  std::string eviction_policy = "adaptive";
};

struct NvmeCounters {
  bool ready = false;  // recovery finished
  uint64_t capacity_bytes = 0;  // of the usable data files
  uint64_t used_bytes = 0;      // allocated extents
  uint64_t stored_bytes = 0;    // sum of block sizes
  uint64_t blocks = 0;
  // Per stored format (index: v1::StoredFormat value), as the DRAM tier's.
  std::array<uint64_t, 5> format_blocks{};
  std::array<uint64_t, 5> format_bytes{};
  uint64_t evictions = 0;
  uint64_t demoted_blocks = 0;      // written and indexed
  uint64_t demotion_drops = 0;      // not written: queue full, tier unusable, or I/O error
  uint64_t queued_blocks = 0;       // waiting to be written
  uint64_t read_blocks = 0;         // read back and verified
  uint64_t corrupt_blocks = 0;      // bytes failed their checksum on read
  uint64_t corrupt_records = 0;     // index records dropped at recovery
  uint64_t recovered_blocks = 0;    // blocks the last recovery found in the index
  // The index could not be read whole (an unreadable block, CURRENT or
  // MANIFEST) and was repaired, rewritten from what read, or restarted empty.
  uint64_t index_repairs = 0;
  uint64_t io_errors = 0;
  std::string last_error;           // empty when none
};

// What the index knows of an NVMe-resident block.
struct NvmeBlockInfo {
  uint64_t size = 0;
  uint64_t checksum = 0;
  std::optional<BlockKey> parent;
  uint8_t format = 0;  // v1::StoredFormat of the stored bytes (StoredBlock::format)
};

class NvmeTier {
 public:
  // Opens the index and the data files. A directory that cannot be used
  // (unwritable, not a directory, disk full while preallocating) is left out
  // and reported in counters().last_error; with none usable the tier stays
  // empty and every demotion is dropped. Errors only for invalid options.
  static absl::StatusOr<std::unique_ptr<NvmeTier>> Open(const NvmeTierOptions& options);
  // Writes what is queued, then stops.
  ~NvmeTier();

  // Rebuilds the in-memory view from the index. Until it returns the tier
  // finds nothing and accepts nothing (ready() is false).
  void Recover();
  bool ready() const;

  // Queues a block evicted from DRAM for writing. False when it is dropped.
  // Never blocks longer than max_demotion_wait.
  bool Demote(const BlockId& id, std::shared_ptr<StoredBlock> block);
  // A block still waiting to be written: its bytes are still in memory.
  std::shared_ptr<StoredBlock> FindQueued(const BlockId& id);
  // A block on NVMe (not one still queued). `hit` tells the policy.
  std::optional<NvmeBlockInfo> Find(const BlockId& id, bool hit);
  bool Contains(const BlockId& id);  // on NVMe or queued

  // Reads each block into its destination, whose size must be the block's
  // size, and verifies its checksum. Per block: OK, NOT_FOUND (gone since
  // Find), DATA_LOSS (bytes damaged: the block is dropped) or an I/O error.
  std::vector<absl::Status> Read(absl::Span<const BlockId> ids,
                                 absl::Span<StoredBlock* const> destinations);
  // Writes blocks now, on the caller's thread (the write-behind thread uses
  // it; so do benchmarks). Blocks already stored are OK without a write.
  std::vector<absl::Status> Write(
      absl::Span<const std::pair<BlockId, std::shared_ptr<StoredBlock>>> blocks);
  bool Erase(const BlockId& id);
  // Offers `page` every block of the namespace on NVMe or queued for it.
  void List(uint64_t namespace_id, BlockPage& page);
  // Passes the engine's request-finished hint to the policy (which ignores
  // blocks it does not track: one still queued is not tracked yet). True
  // when the block is on NVMe.
  bool RequestFinished(const BlockId& last_block, uint32_t output_tokens);
  // Waits until every queued block has been written or dropped.
  void Flush();

  NvmeCounters counters() const;

  class Impl;

 private:
  explicit NvmeTier(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvstrata::cachenode
