#include "kvstrata/common/fast_path_wire.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace kvstrata::fastpath {
namespace {

constexpr uint32_t kRequestMagic = 0x3146564b;  // "KVF1"
constexpr uint32_t kReplyMagic = 0x3152564b;    // "KVR1"
constexpr size_t kRequestFixedBytes = 4 + 1 + 3 + 16 + 8 + 4 + 4;
constexpr size_t kFetchBlockBytes = 16;
constexpr size_t kPublishBlockBytes = 16 + 1 + 16 + 8;
constexpr size_t kReplyFixedBytes = 4 + 4 + 4 + 8 + 2;
constexpr size_t kReplyBlockBytes = 1 + 4 + 8;

template <typename T>
void Put(std::string& out, T value) {
  char bytes[sizeof(T)];
  std::memcpy(bytes, &value, sizeof(T));  // the hosts this runs on are little endian
  out.append(bytes, sizeof(T));
}

// Reads fixed-size values off the front of a message; every read is
// bounds-checked (Read fails once past the end and stays failed).
class Reader {
 public:
  explicit Reader(std::string_view bytes) : rest_(bytes) {}
  template <typename T>
  bool Read(T* value) {
    if (rest_.size() < sizeof(T)) return ok_ = false;
    std::memcpy(value, rest_.data(), sizeof(T));
    rest_.remove_prefix(sizeof(T));
    return ok_;
  }
  bool ReadBytes(void* into, size_t n) {
    if (rest_.size() < n) return ok_ = false;
    std::memcpy(into, rest_.data(), n);
    rest_.remove_prefix(n);
    return ok_;
  }
  size_t left() const { return rest_.size(); }
  bool ok() const { return ok_; }

 private:
  std::string_view rest_;
  bool ok_ = true;
};

bool ValidStatus(uint8_t s) { return s <= v1::BLOCK_REJECTED || s == kNotInMemory; }

}  // namespace

std::string EncodeRequest(const Request& request) {
  const bool publish = request.op == Op::kPublish;
  std::string out;
  out.reserve(kRequestFixedBytes +
              request.blocks.size() * (publish ? kPublishBlockBytes : kFetchBlockBytes));
  Put(out, kRequestMagic);
  Put(out, static_cast<uint8_t>(request.op));
  out.append(3, '\0');
  out.append(reinterpret_cast<const char*>(request.capability.data()), request.capability.size());
  Put(out, request.namespace_id);
  Put(out, static_cast<uint32_t>(request.blocks.size()));
  Put(out, request.block_bytes);
  for (const Block& block : request.blocks) {
    out.append(block.key.view());
    if (!publish) continue;
    Put(out, static_cast<uint8_t>(block.has_parent ? 1 : 0));
    out.append(block.has_parent ? block.parent.view() : std::string_view("\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0", 16));
    Put(out, block.checksum);
  }
  return out;
}

absl::StatusOr<Request> DecodeRequest(std::string_view header) {
  Reader in(header);
  uint32_t magic = 0, count = 0;
  uint8_t op = 0, pad[3];
  Request request;
  if (!in.Read(&magic) || magic != kRequestMagic) {
    return absl::InvalidArgumentError("not a fast-path request (bad magic or truncated)");
  }
  in.Read(&op);
  in.ReadBytes(pad, sizeof(pad));
  in.ReadBytes(request.capability.data(), request.capability.size());
  in.Read(&request.namespace_id);
  in.Read(&count);
  in.Read(&request.block_bytes);
  if (!in.ok()) return absl::InvalidArgumentError("fast-path request truncated in its header");
  if (pad[0] != 0 || pad[1] != 0 || pad[2] != 0) {
    return absl::InvalidArgumentError("fast-path request with nonzero reserved bytes");
  }
  if (op != static_cast<uint8_t>(Op::kFetch) && op != static_cast<uint8_t>(Op::kPublish) &&
      op != static_cast<uint8_t>(Op::kLookup)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown fast-path operation ", op));
  }
  request.op = static_cast<Op>(op);
  if (count == 0 || count > kMaxBlocks) {
    return absl::InvalidArgumentError(
        absl::StrCat("a fast-path request carries 1..", kMaxBlocks, " blocks, got ", count));
  }
  if (request.block_bytes == 0 ||
      (request.op != Op::kLookup && static_cast<uint64_t>(request.block_bytes) * count > kMaxBytes)) {
    return absl::InvalidArgumentError(absl::StrCat("a fast-path request moves 1..", kMaxBytes,
                                                   " bytes, got ", count, " blocks of ",
                                                   request.block_bytes));
  }
  const bool publish = request.op == Op::kPublish;
  const size_t per_block = publish ? kPublishBlockBytes : kFetchBlockBytes;
  if (in.left() != count * per_block) {
    return absl::InvalidArgumentError(absl::StrCat("fast-path request has ", in.left(),
                                                   " bytes of blocks, expected ",
                                                   count * per_block));
  }
  request.blocks.resize(count);
  for (Block& block : request.blocks) {
    in.ReadBytes(block.key.bytes.data(), block.key.bytes.size());
    if (!publish) continue;
    uint8_t flags = 0;
    in.Read(&flags);
    in.ReadBytes(block.parent.bytes.data(), block.parent.bytes.size());
    in.Read(&block.checksum);
    if (flags > 1) return absl::InvalidArgumentError("fast-path block flags unknown");
    block.has_parent = flags == 1;
    // A parent the flag says is absent must be zeros, as the encoder writes
    // it: one encoding per request, nothing in it unchecked (the
    // fast_path_wire fuzzer found bytes the node ignored).
    if (!block.has_parent && block.parent != BlockKey{}) {
      return absl::InvalidArgumentError("fast-path block without a parent carries parent bytes");
    }
  }
  if (!in.ok()) return absl::InvalidArgumentError("fast-path request truncated");
  return request;
}

std::string EncodeReply(const Reply& reply) {
  std::string out;
  const std::string_view message =
      std::string_view(reply.message).substr(0, kMaxMessageBytes);
  out.reserve(kReplyFixedBytes + message.size() + reply.blocks.size() * kReplyBlockBytes);
  Put(out, kReplyMagic);
  Put(out, reply.code);
  Put(out, static_cast<uint32_t>(reply.blocks.size()));
  Put(out, reply.bytes_transferred);
  Put(out, static_cast<uint16_t>(message.size()));
  out.append(message);
  for (const BlockResult& block : reply.blocks) {
    Put(out, static_cast<uint8_t>(block.status));
    Put(out, block.size);
    Put(out, block.checksum);
  }
  return out;
}

absl::StatusOr<Reply> DecodeReply(std::string_view header) {
  Reader in(header);
  uint32_t magic = 0, count = 0;
  uint16_t message_length = 0;
  Reply reply;
  if (!in.Read(&magic) || magic != kReplyMagic) {
    return absl::InternalError("not a fast-path reply (bad magic or truncated)");
  }
  in.Read(&reply.code);
  in.Read(&count);
  in.Read(&reply.bytes_transferred);
  in.Read(&message_length);
  if (!in.ok() || message_length > kMaxMessageBytes || in.left() < message_length ||
      count > kMaxBlocks || in.left() - message_length != count * kReplyBlockBytes) {
    return absl::InternalError("malformed fast-path reply");
  }
  reply.message.resize(message_length);
  in.ReadBytes(reply.message.data(), message_length);
  reply.blocks.resize(count);
  for (BlockResult& block : reply.blocks) {
    uint8_t status = 0;
    in.Read(&status);
    in.Read(&block.size);
    in.Read(&block.checksum);
    if (!ValidStatus(status)) return absl::InternalError("fast-path reply with an unknown status");
    block.status = static_cast<v1::BlockStatus>(status);
  }
  if (!in.ok()) return absl::InternalError("malformed fast-path reply");
  return reply;
}

std::string ErrorReply(const absl::Status& status) {
  Reply reply;
  reply.code = static_cast<uint32_t>(status.code());
  reply.message = std::string(status.message());
  return EncodeReply(reply);
}

}  // namespace kvstrata::fastpath
