// NVMe index records as recovery reads them back from RocksDB after a crash
// or from a damaged disk: DecodeRecord on (key, value) pairs, then the extent
// claim recovery makes for each record it keeps. Decoding never reads past
// the value, accepts only records that re-encode to the same fields, and the
// claims of accepted records never overlap or leave the data file, whatever
// the records say (a record that passes its checksum can still be stale).
//
// Input: records, each a mode byte then a 96-byte value (and a 25-byte key
// unless the mode says to derive it). Mode bits let the fuzzer get past the
// magic, the key check and the checksum, so the fields behind them are
// explored too: bit 0 writes magic and version, bit 1 derives the key from
// the value, bit 2 recomputes the checksum.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <string_view>

#include "kvstrata/common/block_key.h"
#include "nvme/extent_allocator.h"
#include "nvme/index_record.h"

namespace nvme = kvstrata::cachenode::nvme;

namespace {

constexpr uint64_t kFileBytes = 1ull << 30;

void Check(bool condition) {
  if (!condition) std::abort();
}

bool SameRecord(const nvme::IndexRecord& a, const nvme::IndexRecord& b) {
  return a.id == b.id && a.file == b.file && a.format == b.format && a.offset == b.offset &&
         a.size == b.size && a.checksum == b.checksum && a.parent == b.parent &&
         a.last_use_ms == b.last_use_ms;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view input(reinterpret_cast<const char*>(data), size);
  auto take = [&input](size_t n) {
    std::string bytes(input.substr(0, n));
    input.remove_prefix(bytes.size());
    return bytes;
  };
  nvme::ExtentAllocator extents(kFileBytes);
  std::map<uint64_t, uint64_t> claimed;  // offset -> aligned length
  uint64_t claimed_bytes = 0;
  while (!input.empty()) {
    const uint8_t mode = static_cast<uint8_t>(take(1)[0]);
    std::string value = take(nvme::kRecordValueBytes);
    if (value.size() == nvme::kRecordValueBytes) {
      if (mode & 1) {
        std::memcpy(value.data(), "KVSN\x01\x00", 6);
      }
      if (mode & 4) {
        const uint64_t sum = kvstrata::BlockChecksum(value.data(), nvme::kRecordValueBytes - 8);
        std::memcpy(value.data() + nvme::kRecordValueBytes - 8, &sum, 8);  // little-endian host
      }
    }
    std::string key;
    if ((mode & 2) && value.size() >= 36) {
      nvme::IndexRecord embedded;
      std::memcpy(&embedded.id.namespace_id, value.data() + 12, 8);
      std::memcpy(embedded.id.key.bytes.data(), value.data() + 20, 16);
      key = nvme::EncodeRecordKey(embedded.id);
    } else {
      key = take(nvme::kRecordKeyBytes);
    }

    absl::StatusOr<nvme::IndexRecord> record = nvme::DecodeRecord(key, value);
    if (!record.ok()) {
      Check(absl::IsDataLoss(record.status()));
      continue;
    }
    Check(value.size() == nvme::kRecordValueBytes && key == nvme::EncodeRecordKey(record->id));
    absl::StatusOr<nvme::IndexRecord> again =
        nvme::DecodeRecord(key, nvme::EncodeRecordValue(*record));
    Check(again.ok() && SameRecord(*again, *record));

    if (!extents.Claim(record->offset, record->size)) continue;
    const uint64_t length = nvme::AlignUp(record->size);
    Check(length >= record->size && record->offset % nvme::kExtentAlignment == 0);
    Check(record->offset < kFileBytes && length <= kFileBytes - record->offset);
    auto next = claimed.lower_bound(record->offset);
    Check(next == claimed.end() || record->offset + length <= next->first);
    if (next != claimed.begin()) {
      auto prev = std::prev(next);
      Check(prev->first + prev->second <= record->offset);
    }
    claimed.emplace(record->offset, length);
    claimed_bytes += length;
    Check(extents.used_bytes() == claimed_bytes);
  }
  return 0;
}
