#include "kvstrata/cachenode/nvme_tier.h"

#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>

#include <algorithm>
#include <array>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <mutex>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "kvstrata/cachenode/eviction_policy.h"
#include "kvstrata/common/log.h"
#include "nvme/data_file.h"
#include "nvme/index_record.h"
#include "nvme/index_salvage.h"
#include "nvme/io_ring.h"

namespace kvstrata::cachenode {

using nvme::AlignUp;
using nvme::IndexRecord;
using nvme::IoOp;

namespace {

uint64_t NowMs() { return static_cast<uint64_t>(absl::ToUnixMillis(absl::Now())); }

// Meta keys record which directory each file index stood for, so records are
// never read from another directory's file after the flags change.
std::string FileMetaKey(size_t file) { return absl::StrCat("mfile/", file); }

}  // namespace

class NvmeTier::Impl {
 public:
  // An NVMe-resident block. Shared ownership pins its extent: a reader holds
  // a reference while its I/O is in flight, so an evicted block's extent is
  // reused only after the last read of it has finished.
  struct Entry {
    Entry(Impl* tier, IndexRecord record) : tier(tier), record(std::move(record)) {}
    ~Entry() { tier->FreeExtent(record.file, record.offset, record.size); }
    Impl* const tier;
    const IndexRecord record;
  };

  explicit Impl(const NvmeTierOptions& options) : options_(options), rings_(options.queue_depth) {}

  ~Impl() {
    {
      std::lock_guard lock(queue_mu_);
      stopping_ = true;
    }
    queue_cv_.notify_all();
    space_cv_.notify_all();
    if (writer_.joinable()) writer_.join();
    absl::MutexLock lock(&mu_);
    entries_.clear();  // frees extents while the files still exist
  }

  absl::Status Open() {
    // Data files from an earlier run beside no index at all: the index was
    // deleted (or the disk moved), and the files' blocks cannot be found.
    bool data_existed = false;
    for (const std::string& dir : options_.directories) {
      std::error_code ec;
      data_existed = data_existed || std::filesystem::exists(absl::StrCat(dir, "/kvstrata-data"), ec);
    }
    for (const std::string& dir : options_.directories) {
      absl::StatusOr<std::unique_ptr<nvme::DataFile>> file =
          nvme::DataFile::Open(dir, options_.capacity_per_directory);
      if (!file.ok()) {
        ReportError(file.status());
        files_.push_back(nullptr);  // keeps file indices stable
        continue;
      }
      files_.push_back(*std::move(file));
    }
    index_dir_ = options_.index_directory;
    if (index_dir_.empty()) index_dir_ = absl::StrCat(options_.directories[0], "/kvstrata-index");
    db_options_.create_if_missing = true;
    db_options_.paranoid_checks = true;
    // A damaged WAL record costs that write batch, not every batch after it
    // (point-in-time recovery stops at the first bad record): each index
    // record checks itself, overlapping ones are dropped at recovery and
    // every read is verified, so a batch replayed past a lost one can cost
    // misses, never wrong bytes.
    db_options_.wal_recovery_mode = rocksdb::WALRecoveryMode::kSkipAnyCorruptedRecords;
    std::error_code ec;
    const bool index_existed = std::filesystem::exists(index_dir_, ec);
    absl::StatusOr<nvme::IndexOpening> opened = nvme::OpenIndex(index_dir_, db_options_);
    if (!opened.ok()) {
      ReportError(absl::FailedPreconditionError(
          absl::StrCat("cannot open the NVMe index at ", index_dir_, ": ", opened.status().message())));
      files_.clear();  // without an index nothing may be written
    } else {
      if (opened->repaired || opened->restarted) {
        ReportError(absl::DataLossError(absl::StrCat(
            "NVMe index ", index_dir_, " was damaged (", opened->problem, ") and ",
            opened->restarted ? "could not be repaired: started empty" : "was repaired")));
        absl::MutexLock lock(&mu_);
        ++index_repairs_;
      } else if (!index_existed && data_existed) {
        ReportError(absl::DataLossError(absl::StrCat(
            "NVMe index ", index_dir_,
            " is missing beside data files of an earlier run: started empty, their blocks are lost")));
        absl::MutexLock lock(&mu_);
        ++index_repairs_;
      }
      db_ = std::move(opened->db);
    }
    absl::StatusOr<std::unique_ptr<EvictionPolicy>> policy =
        MakeEvictionPolicy(options_.eviction_policy);
    if (!policy.ok()) return policy.status();
    policy_ = *std::move(policy);
    writer_ = std::thread([this] { WriterLoop(); });
    return absl::OkStatus();
  }

  void Recover() {
    const absl::Time start = absl::Now();
    std::vector<IndexRecord> records;
    uint64_t dropped = 0;
    size_t damaged = 0;
    if (db_ != nullptr) {
      absl::ReaderMutexLock db_lock(&db_mu_);
      std::vector<bool> file_valid = CheckFileMeta();
      rocksdb::WriteBatch garbage;
      const std::string prefix(1, nvme::kRecordKeyTag);
      damaged = nvme::SalvageScan(*db_, [&](const rocksdb::Slice& key, const rocksdb::Slice& value) {
        if (!key.starts_with(prefix)) return;
        absl::StatusOr<IndexRecord> record =
            nvme::DecodeRecord(std::string_view(key.data(), key.size()),
                               std::string_view(value.data(), value.size()));
        if (record.ok() && (record->file >= files_.size() || files_[record->file] == nullptr)) {
          return;  // its directory is unusable now: keep the record, serve nothing
        }
        bool keep = record.ok() && file_valid[record->file];
        if (keep) {
          absl::MutexLock lock(&alloc_mu_);
          keep = files_[record->file]->extents().Claim(record->offset, record->size);
        }
        if (!keep) {
          // Damaged, from another directory layout, or overlapping a record
          // already recovered: never trust its bytes.
          garbage.Delete(key);
          ++dropped;
          return;
        }
        records.push_back(*std::move(record));
      });
      if (garbage.Count() > 0) db_->Write(rocksdb::WriteOptions(), &garbage);
    }
    if (damaged > 0) RewriteDamagedIndex(damaged, records.size());
    // Oldest first, so the policy's recency order survives the restart.
    std::sort(records.begin(), records.end(),
              [](const IndexRecord& a, const IndexRecord& b) { return a.last_use_ms < b.last_use_ms; });
    {
      absl::MutexLock lock(&mu_);
      for (IndexRecord& record : records) Insert(std::move(record));
      corrupt_records_ += dropped;
      ready_ = true;
    }
    {
      absl::MutexLock lock(&mu_);
      recovered_records_ = records.size();
    }
    KVS_LOG(Info) << "NVMe tier recovered " << records.size() << " blocks, dropped " << dropped
                  << " bad index records, stepped over " << damaged
                  << " unreadable index blocks, in "
                  << absl::ToDoubleMilliseconds(absl::Now() - start) << " ms";
  }

  // The index had unreadable blocks: they would cost their records' followers
  // at every start again. Rewrite it from what reads (writers wait meanwhile;
  // what they wrote since the scan is read again here).
  void RewriteDamagedIndex(size_t damaged, size_t kept_records) {
    absl::WriterMutexLock db_lock(&db_mu_);
    const std::string prefix(1, nvme::kRecordKeyTag);
    size_t kept = 0;
    absl::StatusOr<std::unique_ptr<rocksdb::DB>> rebuilt = nvme::RewriteIndex(
        std::move(db_), index_dir_, db_options_,
        [&](const rocksdb::Slice& key, const rocksdb::Slice& value) {
          return !key.starts_with(prefix) ||
                 nvme::DecodeRecord(std::string_view(key.data(), key.size()),
                                    std::string_view(value.data(), value.size()))
                     .ok();
        },
        &kept);
    if (!rebuilt.ok()) {
      ReportError(rebuilt.status());
      absl::StatusOr<nvme::IndexOpening> reopened = nvme::OpenIndex(index_dir_, db_options_);
      if (reopened.ok()) db_ = std::move(reopened->db);
      return;
    }
    db_ = *std::move(rebuilt);
    ReportError(absl::DataLossError(absl::StrCat(
        "NVMe index had ", damaged, " unreadable blocks; rewrote it with the ", kept,
        " entries that read (", kept_records, " block records recovered)")));
    absl::MutexLock lock(&mu_);
    ++index_repairs_;
  }

  bool ready() const {
    absl::MutexLock lock(&mu_);
    return ready_;
  }

  bool Demote(const BlockId& id, std::shared_ptr<StoredBlock> block) {
    {
      absl::MutexLock lock(&mu_);
      if (!ready_ || usable_files() == 0) {
        ++demotion_drops_;
        return false;
      }
      if (entries_.contains(id)) return true;  // promoted earlier: still on NVMe
    }
    std::unique_lock lock(queue_mu_);
    if (queued_.contains(id)) return true;
    const bool room = space_cv_.wait_for(
        lock, absl::ToChronoNanoseconds(options_.max_demotion_wait), [&] {
          return stopping_ || queued_bytes_ + block->size() <= options_.write_queue_bytes;
        });
    if (!room || stopping_) {
      absl::MutexLock stats(&mu_);
      ++demotion_drops_;
      return false;
    }
    queued_bytes_ += block->size();
    queued_.emplace(id, block);
    queue_.emplace_back(id, std::move(block));
    queue_cv_.notify_one();
    return true;
  }

  std::shared_ptr<StoredBlock> FindQueued(const BlockId& id) {
    std::lock_guard lock(queue_mu_);
    auto it = queued_.find(id);
    return it == queued_.end() ? nullptr : it->second;
  }

  std::optional<NvmeBlockInfo> Find(const BlockId& id, bool hit) {
    absl::MutexLock lock(&mu_);
    auto it = entries_.find(id);
    if (it == entries_.end()) return std::nullopt;
    if (hit) policy_->OnHit(id);
    const IndexRecord& r = it->second->record;
    return NvmeBlockInfo{
        .size = r.size, .checksum = r.checksum, .parent = r.parent, .format = static_cast<uint8_t>(r.format)};
  }

  bool RequestFinished(const BlockId& last_block, uint32_t output_tokens) {
    absl::MutexLock lock(&mu_);
    policy_->OnRequestFinished(last_block, output_tokens);
    return entries_.contains(last_block);
  }

  void List(uint64_t namespace_id, BlockPage& page) {
    {
      std::lock_guard lock(queue_mu_);
      for (const auto& [id, block] : queued_) {
        if (id.namespace_id != namespace_id || !page.Wants(id.key)) continue;
        page.Offer({.key = id.key,
                    .parent = block->has_parent ? std::optional(block->parent) : std::nullopt,
                    .size = block->size(),
                    .tier = v1::TIER_NVME});
      }
    }
    absl::MutexLock lock(&mu_);
    for (const auto& [id, entry] : entries_) {
      if (id.namespace_id != namespace_id || !page.Wants(id.key)) continue;
      const IndexRecord& r = entry->record;
      page.Offer({.key = id.key, .parent = r.parent, .size = r.size, .tier = v1::TIER_NVME});
    }
  }

  bool Contains(const BlockId& id) {
    {
      absl::MutexLock lock(&mu_);
      if (entries_.contains(id)) return true;
    }
    std::lock_guard lock(queue_mu_);
    return queued_.contains(id);
  }

  std::vector<absl::Status> Read(absl::Span<const BlockId> ids,
                                 absl::Span<StoredBlock* const> destinations) {
    std::vector<absl::Status> results(ids.size());
    std::vector<std::shared_ptr<Entry>> entries(ids.size());
    {
      absl::MutexLock lock(&mu_);
      for (size_t i = 0; i < ids.size(); ++i) {
        auto it = entries_.find(ids[i]);
        if (it == entries_.end()) {
          results[i] = absl::NotFoundError("not on NVMe");
          continue;
        }
        entries[i] = it->second;
        policy_->OnHit(ids[i]);
      }
    }
    std::vector<IoOp> ops;
    std::vector<size_t> block_of;
    std::vector<nvme::AlignedBuffer> bounce(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      if (entries[i] == nullptr) continue;
      const IndexRecord& r = entries[i]->record;
      StoredBlock* dest = destinations[i];
      if (dest->size() != r.size) {
        results[i] = absl::InvalidArgumentError(
            absl::StrCat("destination of ", dest->size(), " bytes for a block of ", r.size));
        continue;
      }
      void* buffer = dest->data();
      if (!nvme::DirectIoCapable(dest->data(), r.size)) {
        bounce[i] = nvme::AllocateAligned(r.size);
        buffer = bounce[i].get();
      }
      ops.push_back(IoOp{.fd = files_[r.file]->fd(), .write = false, .buffer = buffer,
                         .length = AlignUp(r.size), .offset = r.offset});
      block_of.push_back(i);
    }
    std::vector<bool> verified(ids.size(), false);
    // Each op's result says how it went (a failed ring fails every op).
    rings_.Run(absl::MakeSpan(ops), [&](size_t op) {
      // Verify as each read lands, while the rest are still in flight.
      const size_t i = block_of[op];
      const IndexRecord& r = entries[i]->record;
      if (bounce[i] != nullptr) std::memcpy(destinations[i]->data(), bounce[i].get(), r.size);
      verified[i] = BlockChecksum(destinations[i]->data(), r.size) == r.checksum;
    }).IgnoreError();
    uint64_t read = 0, corrupt = 0, io_errors = 0;
    for (size_t op = 0; op < ops.size(); ++op) {
      const size_t i = block_of[op];
      if (!ops[op].result.ok()) {
        results[i] = ops[op].result;
        ++io_errors;
        ReportError(ops[op].result);
        EraseStored(ids[i]);
      } else if (!verified[i]) {
        results[i] = absl::DataLossError(absl::StrCat(
            "block ", ids[i].key.Hex(), " failed its checksum on NVMe; dropped"));
        // Counted once, by whichever concurrent reader drops it.
        if (EraseStored(ids[i])) ++corrupt;
      } else {
        ++read;
      }
    }
    absl::MutexLock lock(&mu_);
    read_blocks_ += read;
    corrupt_blocks_ += corrupt;
    io_errors_ += io_errors;
    return results;
  }

  std::vector<absl::Status> Write(
      absl::Span<const std::pair<BlockId, std::shared_ptr<StoredBlock>>> blocks) {
    std::vector<absl::Status> results(blocks.size());
    std::vector<IndexRecord> records(blocks.size());
    std::vector<bool> writing(blocks.size(), false);
    // Find space; evicting (and committing the evictions to the index) before
    // any extent is overwritten.
    for (size_t i = 0; i < blocks.size(); ++i) {
      const auto& [id, block] = blocks[i];
      {
        absl::MutexLock lock(&mu_);
        if (entries_.contains(id)) continue;  // stored already
      }
      std::optional<std::pair<uint16_t, uint64_t>> extent = AllocateExtent(block->size());
      if (!extent.has_value()) {
        results[i] = absl::ResourceExhaustedError(
            usable_files() == 0 ? "no usable NVMe data file" : "NVMe tier full");
        continue;
      }
      records[i] = IndexRecord{.id = id,
                               .file = extent->first,
                               .format = block->format,  // kept per block: precision tiers
                               .offset = extent->second,
                               .size = block->size(),
                               .checksum = block->checksum,
                               .parent = block->has_parent ? std::optional(block->parent)
                                                           : std::nullopt,
                               .last_use_ms = NowMs()};
      writing[i] = true;
    }
    std::vector<IoOp> ops;
    std::vector<size_t> block_of;
    std::vector<nvme::AlignedBuffer> bounce(blocks.size());
    for (size_t i = 0; i < blocks.size(); ++i) {
      if (!writing[i]) continue;
      const StoredBlock& block = *blocks[i].second;
      void* buffer = block.data();
      if (!nvme::DirectIoCapable(block.data(), block.size())) {
        bounce[i] = nvme::AllocateAligned(block.size());
        std::memcpy(bounce[i].get(), block.data(), block.size());
        std::memset(bounce[i].get() + block.size(), 0, AlignUp(block.size()) - block.size());
        buffer = bounce[i].get();
      }
      ops.push_back(IoOp{.fd = files_[records[i].file]->fd(), .write = true, .buffer = buffer,
                         .length = AlignUp(block.size()), .offset = records[i].offset});
      block_of.push_back(i);
    }
    rings_.Run(absl::MakeSpan(ops)).IgnoreError();  // per-op results below
    rocksdb::WriteBatch batch;
    for (size_t op = 0; op < ops.size(); ++op) {
      const size_t i = block_of[op];
      if (!ops[op].result.ok()) {
        results[i] = ops[op].result;
        ReportError(ops[op].result);
        writing[i] = false;
        FreeExtent(records[i].file, records[i].offset, records[i].size);
        continue;
      }
      batch.Put(nvme::EncodeRecordKey(records[i].id), nvme::EncodeRecordValue(records[i]));
    }
    // The bytes are in place: only now may the index point at them.
    if (batch.Count() > 0) {
      absl::ReaderMutexLock db_lock(&db_mu_);
      rocksdb::Status s = db_ != nullptr ? db_->Write(rocksdb::WriteOptions(), &batch)
                                         : rocksdb::Status::IOError("no NVMe index");
      if (!s.ok()) {
        absl::Status error = absl::InternalError(absl::StrCat("NVMe index write: ", s.ToString()));
        ReportError(error);
        for (size_t i = 0; i < blocks.size(); ++i) {
          if (!writing[i]) continue;
          results[i] = error;
          writing[i] = false;
          FreeExtent(records[i].file, records[i].offset, records[i].size);
        }
      }
    }
    uint64_t written = 0, failed = 0;
    {
      absl::MutexLock lock(&mu_);
      for (size_t i = 0; i < blocks.size(); ++i) {
        if (!results[i].ok() && !absl::IsResourceExhausted(results[i])) ++failed;
        if (!writing[i]) continue;
        Insert(std::move(records[i]));
        ++written;
      }
      demoted_blocks_ += written;
      io_errors_ += failed;
    }
    EvictToWatermark();
    return results;
  }

  bool Erase(const BlockId& id) {
    bool was_queued = false;
    space_cv_.notify_all();
    {
      std::lock_guard lock(queue_mu_);
      if (auto q = queued_.find(id); q != queued_.end()) {
        queued_bytes_ -= q->second->size();
        queued_.erase(q);
        auto pos = std::find_if(queue_.begin(), queue_.end(),
                                [&](const auto& e) { return e.first == id; });
        if (pos != queue_.end()) {
          queue_.erase(pos);
        } else {
          cancelled_.push_back(id);  // being written now: erased right after
        }
        was_queued = true;
      }
    }
    return EraseStored(id) || was_queued;
  }

  bool EraseStored(const BlockId& id) {
    std::shared_ptr<Entry> entry;
    {
      absl::MutexLock lock(&mu_);
      auto it = entries_.find(id);
      if (it == entries_.end()) return false;
      entry = std::move(it->second);
      entries_.erase(it);
      policy_->OnErase(id);
      stored_bytes_ -= entry->record.size;
      CountFormat(entry->record, false);
    }
    DeleteRecords({id});
    return true;  // the extent frees when the last reader lets go of `entry`
  }

  void Flush() {
    std::unique_lock lock(queue_mu_);
    flushed_cv_.wait(lock, [&] { return queue_.empty() && !writing_; });
  }

  NvmeCounters counters() const {
    NvmeCounters c;
    {
      absl::MutexLock lock(&mu_);
      c.ready = ready_;
      c.stored_bytes = stored_bytes_;
      c.blocks = entries_.size();
      c.format_blocks = format_blocks_;
      c.format_bytes = format_bytes_;
      c.evictions = evictions_;
      c.demoted_blocks = demoted_blocks_;
      c.demotion_drops = demotion_drops_;
      c.read_blocks = read_blocks_;
      c.corrupt_blocks = corrupt_blocks_;
      c.corrupt_records = corrupt_records_;
      c.recovered_blocks = recovered_records_;
      c.index_repairs = index_repairs_;
      c.io_errors = io_errors_;
      c.last_error = last_error_;
    }
    const Space space = UsedSpace();
    c.capacity_bytes = space.capacity;
    c.used_bytes = space.used;
    std::lock_guard lock(queue_mu_);
    c.queued_blocks = queue_.size();
    return c;
  }

 private:
  size_t usable_files() const {
    return std::count_if(files_.begin(), files_.end(), [](const auto& f) { return f != nullptr; });
  }

  void ReportError(const absl::Status& error) {
    KVS_LOG(Warning) << "NVMe tier: " << error;
    absl::MutexLock lock(&mu_);
    last_error_ = std::string(error.message());
  }

  // Which recorded file indices still name the same directory; records of
  // the others are dropped. Records the current layout for the next start.
  std::vector<bool> CheckFileMeta() {
    std::vector<bool> valid(files_.size(), false);
    rocksdb::WriteBatch batch;
    for (size_t i = 0; i < files_.size(); ++i) {
      if (files_[i] == nullptr) continue;
      std::string recorded;
      rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), FileMetaKey(i), &recorded);
      valid[i] = s.ok() && recorded == files_[i]->path();
      if (!valid[i]) {
        if (s.ok()) {
          KVS_LOG(Warning) << "NVMe file " << i << " was " << recorded << ", now "
                           << files_[i]->path() << ": its old records are dropped";
        }
        batch.Put(FileMetaKey(i), files_[i]->path());
      }
    }
    if (batch.Count() > 0) db_->Write(rocksdb::WriteOptions(), &batch);
    // A file index new to the index has no records yet; one that changed
    // directory must not use the old ones.
    return valid;
  }

  // Blocks and bytes per stored format (precision tiers keep it per block).
  void CountFormat(const IndexRecord& r, bool add) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const size_t f = r.format < format_blocks_.size() ? r.format : 0;
    format_blocks_[f] += add ? 1 : -1;
    format_bytes_[f] += add ? r.size : -r.size;
  }

  void Insert(IndexRecord record) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const BlockId id = record.id;
    std::optional<BlockId> parent;
    if (record.parent.has_value()) parent = BlockId{id.namespace_id, *record.parent};
    stored_bytes_ += record.size;
    CountFormat(record, true);
    entries_[id] = std::make_shared<Entry>(this, std::move(record));
    policy_->OnInsert(id, parent);
  }

  void FreeExtent(uint16_t file, uint64_t offset, uint64_t size) {
    absl::MutexLock lock(&alloc_mu_);
    files_[file]->extents().Free(offset, size);
  }

  // An extent for `size` bytes in the file with the most free space, evicting
  // when every file is full.
  std::optional<std::pair<uint16_t, uint64_t>> AllocateExtent(uint64_t size) {
    while (true) {
      {
        absl::MutexLock lock(&alloc_mu_);
        std::vector<uint16_t> order;
        for (size_t f = 0; f < files_.size(); ++f) {
          if (files_[f] != nullptr) order.push_back(static_cast<uint16_t>(f));
        }
        if (order.empty()) return std::nullopt;
        std::sort(order.begin(), order.end(), [&](uint16_t a, uint16_t b) {
          return files_[a]->extents().used_bytes() < files_[b]->extents().used_bytes();
        });
        for (uint16_t f : order) {
          if (std::optional<uint64_t> at = files_[f]->extents().Allocate(size)) {
            return std::pair(f, *at);
          }
        }
      }
      if (EvictSome(1) == 0) return std::nullopt;
    }
  }

  // Evicts up to `count` blocks by policy, committing their deletion to the
  // index before returning. Returns how many were evicted.
  size_t EvictSome(size_t count) {
    std::vector<BlockId> victims;
    std::vector<std::shared_ptr<Entry>> released;
    {
      absl::MutexLock lock(&mu_);
      while (victims.size() < count) {
        std::optional<BlockId> victim = policy_->Victim();
        if (!victim.has_value()) break;
        policy_->OnErase(*victim);
        auto it = entries_.find(*victim);
        if (it == entries_.end()) continue;
        stored_bytes_ -= it->second->record.size;
        CountFormat(it->second->record, false);
        released.push_back(std::move(it->second));
        entries_.erase(it);
        victims.push_back(*victim);
        ++evictions_;
      }
    }
    DeleteRecords(victims);
    return victims.size();  // `released` frees the extents (unless read now)
  }

  struct Space {
    uint64_t used = 0;
    uint64_t capacity = 0;
  };
  // Over the usable data files.
  Space UsedSpace() const {
    absl::MutexLock lock(&alloc_mu_);
    Space space;
    for (const auto& file : files_) {
      if (file == nullptr) continue;
      space.used += file->extents().used_bytes();
      space.capacity += file->extents().capacity();
    }
    return space;
  }

  void EvictToWatermark() {
    Space space = UsedSpace();
    if (space.capacity == 0 || space.used <= options_.high_watermark * space.capacity) return;
    while (space.used > options_.low_watermark * space.capacity && EvictSome(16) > 0) {
      space = UsedSpace();
    }
  }

  void DeleteRecords(const std::vector<BlockId>& ids) {
    absl::ReaderMutexLock db_lock(&db_mu_);
    if (ids.empty() || db_ == nullptr) return;
    rocksdb::WriteBatch batch;
    for (const BlockId& id : ids) batch.Delete(nvme::EncodeRecordKey(id));
    rocksdb::Status s = db_->Write(rocksdb::WriteOptions(), &batch);
    if (!s.ok()) ReportError(absl::InternalError(absl::StrCat("NVMe index delete: ", s.ToString())));
  }

  void WriterLoop() {
    std::vector<std::pair<BlockId, std::shared_ptr<StoredBlock>>> batch;
    while (true) {
      {
        std::unique_lock lock(queue_mu_);
        writing_ = false;
        if (queue_.empty()) flushed_cv_.notify_all();
        queue_cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping, and everything queued is written
        while (!queue_.empty() && batch.size() < options_.write_batch_blocks) {
          batch.push_back(std::move(queue_.front()));
          queue_.pop_front();
        }
        writing_ = true;
      }
      std::vector<absl::Status> results = Write(batch);
      uint64_t dropped = 0;
      for (const absl::Status& s : results) dropped += s.ok() ? 0 : 1;
      std::vector<BlockId> cancelled;
      {
        std::lock_guard lock(queue_mu_);
        for (const auto& [id, block] : batch) {
          if (queued_.erase(id) > 0) queued_bytes_ -= block->size();
        }
        cancelled.swap(cancelled_);
      }
      space_cv_.notify_all();
      for (const BlockId& id : cancelled) EraseStored(id);  // deleted while being written
      if (dropped > 0) {
        absl::MutexLock lock(&mu_);
        demotion_drops_ += dropped;
      }
      batch.clear();  // DRAM chunks return to the DRAM tier here
    }
  }

  const NvmeTierOptions options_;
  nvme::IoRingPool rings_;
  // Set in Open, fixed after: a failed directory keeps its slot as null.
  std::vector<std::unique_ptr<nvme::DataFile>> files_;
  // Held shared by every index read and write, exclusively while a damaged
  // index is swapped for its rewrite.
  mutable absl::Mutex db_mu_;
  std::unique_ptr<rocksdb::DB> db_;
  std::string index_dir_;
  rocksdb::Options db_options_;

  mutable absl::Mutex alloc_mu_;  // the files' extent allocators

  mutable absl::Mutex mu_;
  bool ready_ ABSL_GUARDED_BY(mu_) = false;
  absl::flat_hash_map<BlockId, std::shared_ptr<Entry>> entries_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<EvictionPolicy> policy_ ABSL_GUARDED_BY(mu_);
  uint64_t stored_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  std::array<uint64_t, 5> format_blocks_ ABSL_GUARDED_BY(mu_){};
  std::array<uint64_t, 5> format_bytes_ ABSL_GUARDED_BY(mu_){};
  uint64_t evictions_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t demoted_blocks_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t demotion_drops_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t read_blocks_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t corrupt_blocks_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t corrupt_records_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t recovered_records_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t index_repairs_ ABSL_GUARDED_BY(mu_) = 0;  // repaired, restarted or rewritten
  uint64_t io_errors_ ABSL_GUARDED_BY(mu_) = 0;
  std::string last_error_ ABSL_GUARDED_BY(mu_);

  // The write-behind queue (std primitives: the flush waiter needs a condvar).
  mutable std::mutex queue_mu_;
  std::condition_variable queue_cv_;
  std::condition_variable flushed_cv_;
  std::condition_variable space_cv_;
  std::deque<std::pair<BlockId, std::shared_ptr<StoredBlock>>> queue_;
  absl::flat_hash_map<BlockId, std::shared_ptr<StoredBlock>> queued_;
  uint64_t queued_bytes_ = 0;
  std::vector<BlockId> cancelled_;
  bool writing_ = false;
  bool stopping_ = false;
  std::thread writer_;
};

absl::StatusOr<std::unique_ptr<NvmeTier>> NvmeTier::Open(const NvmeTierOptions& options) {
  if (options.directories.empty()) return absl::InvalidArgumentError("no NVMe directories");
  if (options.directories.size() > 1024) {
    return absl::InvalidArgumentError("at most 1024 NVMe directories");
  }
  {
    // Two entries naming one directory would share one data file with two
    // allocators: refuse rather than overwrite blocks.
    absl::flat_hash_set<std::string> seen;
    for (const std::string& dir : options.directories) {
      std::error_code ec;
      const std::string canonical = std::filesystem::weakly_canonical(dir, ec).string();
      if (!seen.insert(ec ? dir : canonical).second) {
        return absl::InvalidArgumentError(absl::StrCat("NVMe directory ", dir, " is listed twice"));
      }
    }
  }
  if (options.capacity_per_directory < nvme::kExtentAlignment) {
    return absl::InvalidArgumentError("NVMe capacity per directory must be at least 4 KiB");
  }
  if (!(options.low_watermark > 0 && options.low_watermark <= options.high_watermark &&
        options.high_watermark <= 1)) {
    return absl::InvalidArgumentError("NVMe watermarks need 0 < low <= high <= 1");
  }
  if (options.queue_depth == 0 || options.queue_depth > 4096) {
    return absl::InvalidArgumentError("NVMe queue depth must be 1..4096");
  }
  if (options.write_batch_blocks == 0) {
    return absl::InvalidArgumentError("NVMe write batches need at least one block");
  }
  auto impl = std::make_unique<Impl>(options);
  if (absl::Status s = impl->Open(); !s.ok()) return s;
  return std::unique_ptr<NvmeTier>(new NvmeTier(std::move(impl)));
}

NvmeTier::NvmeTier(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
NvmeTier::~NvmeTier() = default;
void NvmeTier::Recover() { impl_->Recover(); }
bool NvmeTier::ready() const { return impl_->ready(); }
bool NvmeTier::Demote(const BlockId& id, std::shared_ptr<StoredBlock> block) {
  return impl_->Demote(id, std::move(block));
}
std::shared_ptr<StoredBlock> NvmeTier::FindQueued(const BlockId& id) {
  return impl_->FindQueued(id);
}
std::optional<NvmeBlockInfo> NvmeTier::Find(const BlockId& id, bool hit) {
  return impl_->Find(id, hit);
}
bool NvmeTier::Contains(const BlockId& id) { return impl_->Contains(id); }
std::vector<absl::Status> NvmeTier::Read(absl::Span<const BlockId> ids,
                                         absl::Span<StoredBlock* const> destinations) {
  return impl_->Read(ids, destinations);
}
std::vector<absl::Status> NvmeTier::Write(
    absl::Span<const std::pair<BlockId, std::shared_ptr<StoredBlock>>> blocks) {
  return impl_->Write(blocks);
}
bool NvmeTier::Erase(const BlockId& id) { return impl_->Erase(id); }
void NvmeTier::List(uint64_t namespace_id, BlockPage& page) { impl_->List(namespace_id, page); }
bool NvmeTier::RequestFinished(const BlockId& last_block, uint32_t output_tokens) {
  return impl_->RequestFinished(last_block, output_tokens);
}
void NvmeTier::Flush() { impl_->Flush(); }
NvmeCounters NvmeTier::counters() const { return impl_->counters(); }

}  // namespace kvstrata::cachenode
