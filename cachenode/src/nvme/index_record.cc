#include "nvme/index_record.h"

#include <cstring>

#include "absl/base/internal/endian.h"
#include "absl/strings/str_cat.h"

namespace kvstrata::cachenode::nvme {
namespace {

constexpr char kMagic[4] = {'K', 'V', 'S', 'N'};
constexpr uint16_t kVersion = 1;
constexpr size_t kCheckedBytes = kRecordValueBytes - 8;

class Writer {
 public:
  explicit Writer(std::string& out) : out_(out) {}
  void Bytes(const void* p, size_t n) { out_.append(static_cast<const char*>(p), n); }
  void U8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void U16(uint16_t v) { v = absl::little_endian::FromHost16(v); Bytes(&v, 2); }
  void U32(uint32_t v) { v = absl::little_endian::FromHost32(v); Bytes(&v, 4); }
  void U64(uint64_t v) { v = absl::little_endian::FromHost64(v); Bytes(&v, 8); }

 private:
  std::string& out_;
};

class Reader {
 public:
  explicit Reader(std::string_view in) : in_(in) {}
  void Bytes(void* p, size_t n) { std::memcpy(p, in_.data() + at_, n); at_ += n; }
  uint8_t U8() { return static_cast<uint8_t>(in_[at_++]); }
  uint16_t U16() { uint16_t v; Bytes(&v, 2); return absl::little_endian::ToHost16(v); }
  uint32_t U32() { uint32_t v; Bytes(&v, 4); return absl::little_endian::ToHost32(v); }
  uint64_t U64() { uint64_t v; Bytes(&v, 8); return absl::little_endian::ToHost64(v); }

 private:
  std::string_view in_;
  size_t at_ = 0;
};

}  // namespace

std::string EncodeRecordKey(const BlockId& id) {
  std::string key;
  key.reserve(kRecordKeyBytes);
  key.push_back(kRecordKeyTag);
  uint64_t ns = absl::big_endian::FromHost64(id.namespace_id);
  key.append(reinterpret_cast<const char*>(&ns), 8);
  key.append(id.key.view());
  return key;
}

std::string EncodeRecordValue(const IndexRecord& r) {
  std::string out;
  out.reserve(kRecordValueBytes);
  Writer w(out);
  w.Bytes(kMagic, 4);
  w.U16(kVersion);
  w.U16(r.file);
  w.U32(r.format);
  w.U64(r.id.namespace_id);
  w.Bytes(r.id.key.bytes.data(), 16);
  w.U64(r.offset);
  w.U64(r.size);
  w.U64(r.checksum);
  w.U8(r.parent.has_value() ? 1 : 0);
  for (int i = 0; i < 3; ++i) w.U8(0);
  const BlockKey parent = r.parent.value_or(BlockKey{});
  w.Bytes(parent.bytes.data(), 16);
  w.U64(r.last_use_ms);
  w.U64(BlockChecksum(out.data(), kCheckedBytes));
  return out;
}

absl::StatusOr<IndexRecord> DecodeRecord(std::string_view key, std::string_view value) {
  if (value.size() != kRecordValueBytes) {
    return absl::DataLossError(absl::StrCat("index record of ", value.size(), " bytes, not ",
                                            kRecordValueBytes));
  }
  Reader r(value);
  char magic[4];
  r.Bytes(magic, 4);
  if (std::memcmp(magic, kMagic, 4) != 0) return absl::DataLossError("index record: bad magic");
  if (uint16_t version = r.U16(); version != kVersion) {
    return absl::DataLossError(absl::StrCat("index record version ", version, " unknown"));
  }
  Reader tail(value.substr(kCheckedBytes));
  if (tail.U64() != BlockChecksum(value.data(), kCheckedBytes)) {
    return absl::DataLossError("index record checksum mismatch");
  }
  IndexRecord record;
  record.file = r.U16();
  record.format = r.U32();
  if (record.format > 4) {  // v1::StoredFormat: a block must never be decoded as something else
    return absl::DataLossError(absl::StrCat("index record of unknown stored format ", record.format));
  }
  record.id.namespace_id = r.U64();
  r.Bytes(record.id.key.bytes.data(), 16);
  record.offset = r.U64();
  record.size = r.U64();
  record.checksum = r.U64();
  const bool has_parent = r.U8() != 0;
  for (int i = 0; i < 3; ++i) r.U8();
  BlockKey parent;
  r.Bytes(parent.bytes.data(), 16);
  if (has_parent) record.parent = parent;
  record.last_use_ms = r.U64();
  if (key != EncodeRecordKey(record.id)) {
    return absl::DataLossError("index record stored under another block's key");
  }
  return record;
}

}  // namespace kvstrata::cachenode::nvme
