// The fast path's message codec (common/fast_path_wire.h): what it encodes
// decodes back, and what a hostile sender can hand the node's decoder (every
// truncation, random bytes, counts and sizes over the limits) is an error,
// never an over-read or a request that passes.
#include "kvstrata/common/fast_path_wire.h"

#include <gtest/gtest.h>

#include <random>

namespace kvstrata::fastpath {
namespace {

Request Publish(size_t blocks) {
  Request request;
  request.op = Op::kPublish;
  for (size_t i = 0; i < request.capability.size(); ++i) request.capability[i] = uint8_t(i * 7);
  request.namespace_id = 0x1122334455667788ull;
  request.block_bytes = 16384;
  for (size_t i = 0; i < blocks; ++i) {
    Block block;
    block.key.bytes.fill(uint8_t(i));
    block.has_parent = i > 0;
    block.parent.bytes.fill(uint8_t(i + 100));
    block.checksum = 0xabcdef00 + i;
    request.blocks.push_back(block);
  }
  return request;
}

// Found by the fast_path_wire fuzzer (tests/fuzz/regressions/fast_path_wire):
// a publish block without the parent flag but with parent bytes decoded, so
// two encodings meant one request and the node ignored bytes it was sent.
TEST(FastPathWireTest, ParentBytesWithoutTheParentFlagAreRefused) {
  std::string header = EncodeRequest(Publish(1));  // block 0 has no parent
  // Header (40 bytes), then the block: key (16), flags (1), parent (16).
  ASSERT_EQ(header[40 + 16], 0);
  header[40 + 16 + 1] = 0x5a;
  absl::StatusOr<Request> decoded = DecodeRequest(header);
  EXPECT_TRUE(absl::IsInvalidArgument(decoded.status())) << decoded.status();
  header[40 + 16 + 1] = 0;
  EXPECT_TRUE(DecodeRequest(header).ok());
}

TEST(FastPathWireTest, RequestsAndRepliesRoundTrip) {
  const Request request = Publish(5);
  absl::StatusOr<Request> decoded = DecodeRequest(EncodeRequest(request));
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->op, Op::kPublish);
  EXPECT_EQ(decoded->capability, request.capability);
  EXPECT_EQ(decoded->namespace_id, request.namespace_id);
  EXPECT_EQ(decoded->block_bytes, request.block_bytes);
  ASSERT_EQ(decoded->blocks.size(), 5u);
  for (size_t i = 0; i < 5; ++i) {
    EXPECT_EQ(decoded->blocks[i].key, request.blocks[i].key);
    EXPECT_EQ(decoded->blocks[i].has_parent, i > 0);
    if (i > 0) {
      EXPECT_EQ(decoded->blocks[i].parent, request.blocks[i].parent);
    }
    EXPECT_EQ(decoded->blocks[i].checksum, request.blocks[i].checksum);
  }
  Reply reply;
  reply.bytes_transferred = 12345;
  reply.blocks = {{v1::BLOCK_OK, 16384, 99}, {kNotInMemory, 0, 0}, {v1::BLOCK_NOT_FOUND, 0, 0}};
  absl::StatusOr<Reply> back = DecodeReply(EncodeReply(reply));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->code, 0u);
  EXPECT_EQ(back->bytes_transferred, 12345u);
  ASSERT_EQ(back->blocks.size(), 3u);
  EXPECT_EQ(back->blocks[0].checksum, 99u);
  EXPECT_EQ(back->blocks[1].status, kNotInMemory);
  absl::StatusOr<Reply> error = DecodeReply(ErrorReply(absl::PermissionDeniedError("no")));
  ASSERT_TRUE(error.ok());
  EXPECT_EQ(error->code, uint32_t(absl::StatusCode::kPermissionDenied));
  EXPECT_EQ(error->message, "no");
}

TEST(FastPathWireTest, EveryTruncationAndExtensionIsRefused) {
  for (Op op : {Op::kFetch, Op::kPublish, Op::kLookup}) {
    Request request = Publish(3);
    request.op = op;
    const std::string wire = EncodeRequest(request);
    ASSERT_TRUE(DecodeRequest(wire).ok());
    for (size_t cut = 0; cut < wire.size(); ++cut) {
      EXPECT_FALSE(DecodeRequest(wire.substr(0, cut)).ok()) << "cut at " << cut;
    }
    EXPECT_FALSE(DecodeRequest(wire + "x").ok());
  }
  const std::string reply = EncodeReply(Reply{.blocks = {{v1::BLOCK_OK, 1, 2}}});
  for (size_t cut = 0; cut < reply.size(); ++cut) {
    EXPECT_FALSE(DecodeReply(reply.substr(0, cut)).ok()) << "cut at " << cut;
  }
}

TEST(FastPathWireTest, LimitsAreCheckedBeforeAnythingIsRead) {
  EXPECT_FALSE(DecodeRequest(EncodeRequest(Publish(0))).ok()) << "no blocks";
  EXPECT_FALSE(DecodeRequest(EncodeRequest(Publish(kMaxBlocks + 1))).ok()) << "too many blocks";
  Request big = Publish(2);
  big.block_bytes = kMaxBytes;  // 2 x 4 MiB of data
  EXPECT_FALSE(DecodeRequest(EncodeRequest(big)).ok());
  big.op = Op::kLookup;  // a lookup moves no data: only the key count bounds it
  EXPECT_TRUE(DecodeRequest(EncodeRequest(big)).ok());
  std::string wire = EncodeRequest(Publish(2));
  wire[5] = 1;  // reserved byte
  EXPECT_FALSE(DecodeRequest(wire).ok());
  wire = EncodeRequest(Publish(2));
  wire[4] = 9;  // unknown op
  EXPECT_FALSE(DecodeRequest(wire).ok());
  // A count field claiming 2^32-1 blocks in a short message.
  wire = EncodeRequest(Publish(2));
  for (int i = 0; i < 4; ++i) wire[32 + i] = char(0xff);  // after magic, op, pad, capability, id
  EXPECT_FALSE(DecodeRequest(wire).ok());
}

TEST(FastPathWireTest, RandomBytesNeverDecode) {
  std::mt19937_64 random(11);
  for (int round = 0; round < 20000; ++round) {
    std::string bytes(random() % 200, '\0');
    for (char& c : bytes) c = char(random());
    // Mostly with the right magic, so the checks past it run too.
    if (round % 2 == 0 && bytes.size() >= 4) bytes.replace(0, 4, "KVF1");
    EXPECT_FALSE(DecodeRequest(bytes).ok()) << "round " << round;
    DecodeReply(bytes).IgnoreError();
  }
}

}  // namespace
}  // namespace kvstrata::fastpath
