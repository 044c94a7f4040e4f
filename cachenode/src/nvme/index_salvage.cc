#include "nvme/index_salvage.h"

#include <rocksdb/write_batch.h>

#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "kvstrata/common/log.h"

namespace kvstrata::cachenode::nvme {
namespace {

// Keys are compared as big-endian numbers of this many bytes (index keys are
// shorter: a tag, a namespace id and a 16-byte key).
constexpr size_t kKeyWidth = 40;

std::string Widen(const std::string& key) {
  std::string wide = key.substr(0, kKeyWidth);
  wide.resize(kKeyWidth, '\0');
  return wide;
}

// a + 1 (saturating at all ones).
std::string Increment(std::string a) {
  for (size_t i = a.size(); i-- > 0;) {
    if (static_cast<uint8_t>(a[i]) != 0xff) {
      a[i] = static_cast<char>(static_cast<uint8_t>(a[i]) + 1);
      return a;
    }
    a[i] = '\0';
  }
  return std::string(kKeyWidth, '\xff');
}

// floor((a + b) / 2) of two equal-width big-endian numbers.
std::string Midpoint(const std::string& a, const std::string& b) {
  std::string sum(a.size() + 1, '\0');
  unsigned carry = 0;
  for (size_t i = a.size(); i-- > 0;) {
    const unsigned s = static_cast<uint8_t>(a[i]) + static_cast<uint8_t>(b[i]) + carry;
    sum[i + 1] = static_cast<char>(s & 0xff);
    carry = s >> 8;
  }
  sum[0] = static_cast<char>(carry);
  std::string half(a.size(), '\0');
  unsigned rest = 0;
  for (size_t i = 0; i < sum.size(); ++i) {
    const unsigned v = (rest << 8) | static_cast<uint8_t>(sum[i]);
    if (i > 0) half[i - 1] = static_cast<char>(v >> 1);
    rest = v & 1;
  }
  return half;
}

// Whether a seek to `target` reads without an error. A fresh iterator each
// time: an iterator that met a damaged block may keep reporting it.
bool Readable(rocksdb::DB& db, const std::string& target) {
  std::unique_ptr<rocksdb::Iterator> it(db.NewIterator(rocksdb::ReadOptions()));
  it->Seek(target);
  return it->status().ok();
}

// Most damaged stretches one scan steps over before it gives up on the rest.
constexpr size_t kMaxDamagedStretches = 4096;

}  // namespace

size_t SalvageScan(rocksdb::DB& db,
                   const std::function<void(const rocksdb::Slice&, const rocksdb::Slice&)>& visit) {
  std::unique_ptr<rocksdb::Iterator> it(db.NewIterator(rocksdb::ReadOptions()));
  size_t damaged = 0;
  std::string last;  // the last key read
  bool any = false;
  it->SeekToFirst();
  while (true) {
    for (; it->Valid(); it->Next()) {
      visit(it->key(), it->value());
      last = it->key().ToString();
      any = true;
    }
    if (it->status().ok()) return damaged;  // the end
    if (++damaged > kMaxDamagedStretches) return damaged;
    KVS_LOG(Warning) << "NVMe index: unreadable block after "
                     << (any ? absl::StrCat(last.size(), "-byte key") : "the start") << " ("
                     << it->status().ToString() << "); stepping over it";
    // The smallest key past the damage that reads: seeks in the damaged
    // block fail, seeks past it succeed, so the predicate is monotone.
    std::string low = any ? Increment(Widen(last)) : std::string(kKeyWidth, '\0');
    std::string high(kKeyWidth, '\xff');
    if (!Readable(db, high)) return damaged;  // damaged to the very end
    while (low < high) {
      const std::string mid = Midpoint(low, high);
      if (Readable(db, mid)) {
        high = mid;
      } else {
        low = Increment(mid);
      }
    }
    it.reset(db.NewIterator(rocksdb::ReadOptions()));
    it->Seek(high);
    // A key at or before `last` (the widened target can sort before a
    // longer key) was read already.
    while (any && it->Valid() && it->key().compare(rocksdb::Slice(last)) <= 0) it->Next();
  }
}

absl::StatusOr<IndexOpening> OpenIndex(const std::string& dir, const rocksdb::Options& options) {
  IndexOpening opening;
  rocksdb::DB* db = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(options, dir, &db);
  // A damaged CURRENT or MANIFEST reads as an I/O error, not as corruption.
  if ((s.IsCorruption() || s.IsIOError()) && std::filesystem::exists(dir)) {
    opening.problem = s.ToString();
    KVS_LOG(Warning) << "NVMe index " << dir << " cannot be opened (" << s.ToString()
                     << "); repairing";
    opening.repaired = true;
    rocksdb::RepairDB(dir, options).PermitUncheckedError();
    s = rocksdb::DB::Open(options, dir, &db);
    if (!s.ok()) {
      // Unrepairable: keep it for a post-mortem and start an empty index, so
      // the tier works (its data files' old extents are simply free again).
      const std::string aside = dir + ".damaged";
      std::error_code ignored;
      std::filesystem::remove_all(aside, ignored);
      std::filesystem::rename(dir, aside, ignored);
      KVS_LOG(Error) << "NVMe index " << dir << " is beyond repair (" << s.ToString()
                     << "); set aside as " << aside << ", starting an empty one";
      opening.restarted = true;
      s = rocksdb::DB::Open(options, dir, &db);
    }
  }
  if (!s.ok()) return absl::FailedPreconditionError(s.ToString());
  opening.db.reset(db);
  return opening;
}

absl::StatusOr<std::unique_ptr<rocksdb::DB>> RewriteIndex(
    std::unique_ptr<rocksdb::DB> old, const std::string& dir, const rocksdb::Options& options,
    const std::function<bool(const rocksdb::Slice&, const rocksdb::Slice&)>& keep, size_t* kept) {
  const std::string fresh_dir = dir + ".rebuilding";
  std::error_code ignored;
  std::filesystem::remove_all(fresh_dir, ignored);
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(options, fresh_dir, &raw);
  if (!s.ok()) return absl::InternalError(absl::StrCat("new NVMe index: ", s.ToString()));
  std::unique_ptr<rocksdb::DB> fresh(raw);
  rocksdb::WriteBatch batch;
  rocksdb::Status written;
  *kept = 0;
  SalvageScan(*old, [&](const rocksdb::Slice& key, const rocksdb::Slice& value) {
    if (!keep(key, value)) return;
    batch.Put(key, value);
    ++*kept;
    if (batch.Count() >= 1024) {
      if (written.ok()) written = fresh->Write(rocksdb::WriteOptions(), &batch);
      batch.Clear();
    }
  });
  if (written.ok() && batch.Count() > 0) written = fresh->Write(rocksdb::WriteOptions(), &batch);
  if (written.ok()) written = fresh->Flush(rocksdb::FlushOptions());
  if (!written.ok()) return absl::InternalError(absl::StrCat("new NVMe index: ", written.ToString()));
  fresh.reset();
  old.reset();
  const std::string aside = dir + ".damaged";
  std::filesystem::remove_all(aside, ignored);
  std::error_code moved;
  std::filesystem::rename(dir, aside, moved);
  if (!moved) std::filesystem::rename(fresh_dir, dir, moved);
  if (moved) {
    return absl::InternalError(absl::StrCat("cannot swap in the rebuilt NVMe index: ", moved.message()));
  }
  s = rocksdb::DB::Open(options, dir, &raw);
  if (!s.ok()) return absl::InternalError(absl::StrCat("rebuilt NVMe index: ", s.ToString()));
  return std::unique_ptr<rocksdb::DB>(raw);
}

}  // namespace kvstrata::cachenode::nvme
