// The fast path's messages (docs/ARCHITECTURE.md §3, "Fast path"): small
// Fetch and Publish requests and their replies as UCX active messages,
// encoded here for both the client and the node. Little endian, fixed
// layout; Decode* checks every length and count against the bytes present
// and the limits below before anything is read, so a truncated, oversized or
// garbage message is an error, never an over-read.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "kvstrata.pb.h"
#include "kvstrata/common/block_key.h"

namespace kvstrata::fastpath {

// A per-open secret the node hands out in OpenNamespace (on the
// authenticated gRPC call) and every fast-path request carries.
using Capability = std::array<uint8_t, 16>;

// Most blocks in one fast-path request: keeps the header (41 bytes a block
// for a publish) within a few KiB, inside one UCX fragment on TCP and
// shared memory.
inline constexpr size_t kMaxBlocks = 64;
// Most data bytes one fast-path request or reply carries.
inline constexpr uint64_t kMaxBytes = 4 << 20;
// Longest error message a reply carries (longer ones are cut).
inline constexpr size_t kMaxMessageBytes = 256;

// kLookup: the longest stored prefix of the keys; its reply gives
// BLOCK_OK with `size` = the v1::Tier for each key of the prefix, then
// BLOCK_NOT_FOUND. block_bytes is the namespace's, as for the others.
enum class Op : uint8_t { kFetch = 1, kPublish = 2, kLookup = 3 };

struct Block {
  BlockKey key;
  bool has_parent = false;  // publish only
  BlockKey parent;          // publish only
  uint64_t checksum = 0;    // publish only: XXH3-64 of the block's bytes
};

struct Request {
  Op op = Op::kFetch;
  Capability capability{};
  uint64_t namespace_id = 0;
  uint32_t block_bytes = 0;  // every block's size; data = blocks x block_bytes (publish)
  std::vector<Block> blocks;
};

// Per block of a reply. kInMemoryOnly: a fetch's block that is stored but
// not in DRAM (on NVMe): the fast path never waits for a disk; the client
// fetches it over gRPC.
struct BlockResult {
  v1::BlockStatus status = v1::BLOCK_TRANSFER_FAILED;
  uint32_t size = 0;      // fetch: bytes of the block in the reply's data
  uint64_t checksum = 0;  // fetch: the stored checksum
};
inline constexpr v1::BlockStatus kNotInMemory = v1::BlockStatus(255);

struct Reply {
  // Request-level outcome (absl::StatusCode); per-block results only when OK.
  uint32_t code = 0;
  std::string message;
  std::vector<BlockResult> blocks;
  uint64_t bytes_transferred = 0;
};

std::string EncodeRequest(const Request& request);
absl::StatusOr<Request> DecodeRequest(std::string_view header);
std::string EncodeReply(const Reply& reply);
absl::StatusOr<Reply> DecodeReply(std::string_view header);

// A reply that says only `status` (not OK).
std::string ErrorReply(const absl::Status& status);

}  // namespace kvstrata::fastpath
