// Keeping what can be kept of a damaged NVMe index (RocksDB).
//
// RocksDB stops an iteration at the first block that fails its checksum, so
// one flipped bit in an SST used to cost every record after it, at every
// start (the damage stays). Here a scan steps over each unreadable block (a
// binary search for the first key past it that reads) and the index is then
// rewritten from what was read, so the damage costs the records of that
// block, once. An index RocksDB cannot open at all (a damaged CURRENT or
// MANIFEST: an I/O error, not corruption) is repaired, or set aside and
// started afresh: the tier keeps working either way.
#pragma once

#include <rocksdb/db.h>

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace kvstrata::cachenode::nvme {

// Visits every entry of `db` that can be read, in key order, stepping over
// unreadable blocks; returns how many damaged stretches it stepped over.
size_t SalvageScan(rocksdb::DB& db,
                   const std::function<void(const rocksdb::Slice& key,
                                            const rocksdb::Slice& value)>& visit);

struct IndexOpening {
  std::unique_ptr<rocksdb::DB> db;
  bool repaired = false;   // RepairDB ran (corruption or unreadable metadata)
  bool restarted = false;  // unrepairable: set aside, a new empty index made
  std::string problem;     // what was wrong, empty when nothing
};

// Opens (creating if missing) the index in `dir`, repairing or replacing it
// when it cannot be opened as it is. An error only when even a new, empty
// index cannot be made there (an unwritable directory).
absl::StatusOr<IndexOpening> OpenIndex(const std::string& dir, const rocksdb::Options& options);

// Writes the entries `keep` accepts out of `old` (read with SalvageScan)
// into a new index, which replaces the one in `dir`; the damaged one is set
// aside as `<dir>.damaged`. Returns the new index, opened.
absl::StatusOr<std::unique_ptr<rocksdb::DB>> RewriteIndex(
    std::unique_ptr<rocksdb::DB> old, const std::string& dir, const rocksdb::Options& options,
    const std::function<bool(const rocksdb::Slice& key, const rocksdb::Slice& value)>& keep,
    size_t* kept);

}  // namespace kvstrata::cachenode::nvme
