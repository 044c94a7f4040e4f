// What the RocksDB index stores per NVMe-resident block, and its encoding.
//
// Key:   'b' | namespace id (8 bytes, big-endian) | block key (16 bytes).
// Value: fixed 96-byte little-endian record (version 1):
//   magic "KVSN" | u16 version | u16 file | u32 format | u64 namespace id |
//   16-byte block key | u64 offset | u64 size | u64 checksum (XXH3-64 of the
//   block's bytes) | u8 has_parent | 3 pad | 16-byte parent | u64 last use
//   (Unix ms) | u64 XXH3-64 of the 88 bytes before it.
// The record carries its own key and checksum, so a flipped byte or a value
// moved under another key is detected at recovery and the block dropped.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "kvstrata/cachenode/block.h"

namespace kvstrata::cachenode::nvme {

struct IndexRecord {
  BlockId id;
  uint16_t file = 0;  // index into the tier's data files
  uint32_t format = 0;  // v1::StoredFormat of the block's bytes (per block: precision tiers)
  uint64_t offset = 0;
  uint64_t size = 0;
  uint64_t checksum = 0;
  std::optional<BlockKey> parent;
  uint64_t last_use_ms = 0;
};

inline constexpr char kRecordKeyTag = 'b';
inline constexpr size_t kRecordKeyBytes = 1 + 8 + 16;
inline constexpr size_t kRecordValueBytes = 96;

std::string EncodeRecordKey(const BlockId& id);
std::string EncodeRecordValue(const IndexRecord& record);
// DATA_LOSS when the value is damaged or does not belong to `key`.
absl::StatusOr<IndexRecord> DecodeRecord(std::string_view key, std::string_view value);

}  // namespace kvstrata::cachenode::nvme
