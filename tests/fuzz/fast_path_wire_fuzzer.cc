// The fast path's wire format (common/src/fast_path_wire.cc), as the node
// decodes requests and the client decodes replies off UCX active messages.
//
// Input: byte 0 picks the decoder (even: DecodeRequest, odd: DecodeReply),
// the rest is the message header.
//
// Checked: decoding never reads outside the header (ASan); an accepted
// request is within the limits the node relies on (1..kMaxBlocks blocks,
// 1..kMaxBytes of data for a fetch or publish), and an accepted message is
// canonical: encoding what was decoded gives back exactly the input bytes,
// so no two encodings mean the same request and nothing in a message goes
// unchecked.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "kvstrata/common/fast_path_wire.h"

namespace fastpath = kvstrata::fastpath;

namespace {

void Check(bool condition, const char* what) {
  if (!condition) {
    fprintf(stderr, "fast_path_wire invariant broken: %s\n", what);
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  // A copy of exactly the header's bytes, so ASan sees any read past it.
  const std::string header(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (data[0] % 2 == 0) {
    absl::StatusOr<fastpath::Request> request = fastpath::DecodeRequest(header);
    if (!request.ok()) {
      Check(absl::IsInvalidArgument(request.status()), "a bad request is INVALID_ARGUMENT");
      return 0;
    }
    Check(!request->blocks.empty() && request->blocks.size() <= fastpath::kMaxBlocks,
          "1..kMaxBlocks blocks");
    Check(request->block_bytes > 0, "blocks have a size");
    if (request->op != fastpath::Op::kLookup) {
      Check(uint64_t{request->block_bytes} * request->blocks.size() <= fastpath::kMaxBytes,
            "data within kMaxBytes");
    }
    for (const fastpath::Block& block : request->blocks) {
      if (request->op != fastpath::Op::kPublish) {
        Check(!block.has_parent && block.checksum == 0, "only publishes carry parents, checksums");
      }
    }
    Check(fastpath::EncodeRequest(*request) == header, "an accepted request is canonical");
  } else {
    absl::StatusOr<fastpath::Reply> reply = fastpath::DecodeReply(header);
    if (!reply.ok()) return 0;
    Check(reply->blocks.size() <= fastpath::kMaxBlocks, "at most kMaxBlocks results");
    Check(reply->message.size() <= fastpath::kMaxMessageBytes, "message within its limit");
    Check(fastpath::EncodeReply(*reply) == header, "an accepted reply is canonical");
  }
  return 0;
}
