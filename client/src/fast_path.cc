#include "fast_path.h"

#include <algorithm>
#include <cstring>

#include "kvstrata/common/block_key.h"
#include "kvstrata/common/fast_path_wire.h"
#include "kvstrata/common/log.h"
#include "kvstrata/transfer/active_message.h"

namespace kvstrata::client {
namespace {

// Blocks per fast-path request: about kChunkBytes, so a larger call goes as
// several requests in flight at once and the node copies one while the
// previous one crosses the wire and this side copies out the one before
// (measured, transfer_bench: see bench/README.md).
constexpr uint64_t kChunkBytes = 512 << 10;
// Most requests one call sends (the node allows 16 in flight per capability).
constexpr size_t kMaxChunks = 16;

size_t ChunkBlocks(const Client::Impl::FastGrant& grant, uint64_t block_bytes) {
  const uint64_t by_bytes = block_bytes == 0 ? fastpath::kMaxBlocks : kChunkBytes / block_bytes;
  return static_cast<size_t>(std::clamp<uint64_t>(
      by_bytes, 1, std::min<uint64_t>(grant.max_blocks, fastpath::kMaxBlocks)));
}

// The grant for this call, when the fast path applies to `blocks` x
// `block_bytes` (in requests of ChunkBlocks blocks).
std::optional<Client::Impl::FastGrant> Applicable(Client::Impl& impl, uint64_t namespace_id,
                                                  size_t blocks, uint64_t block_bytes) {
  if (!impl.options.fast_path ||
      impl.options.transfer_method != ClientOptions::TransferMethod::kTagged || blocks == 0) {
    return std::nullopt;
  }
  std::optional<Client::Impl::FastGrant> grant = impl.GetFastGrant(namespace_id);
  if (!grant.has_value() || grant->capability.size() != sizeof(fastpath::Capability) ||
      block_bytes > UINT32_MAX ||
      block_bytes > std::min<uint64_t>(grant->max_bytes, fastpath::kMaxBytes)) {
    return std::nullopt;
  }
  // Larger calls go over gRPC, whose tagged transfers move each block
  // zero-copy: at 256 KiB x 32 it fetched 1.2x (TCP) and 4.9x (shared
  // memory) what 16 fast-path requests did, in the same transfer_bench run.
  if (block_bytes * blocks > std::min<uint64_t>(grant->max_bytes, fastpath::kMaxBytes)) {
    return std::nullopt;
  }
  const size_t per_request = ChunkBlocks(*grant, block_bytes);
  if ((blocks + per_request - 1) / per_request > kMaxChunks) return std::nullopt;
  return grant;
}

fastpath::Request BaseRequest(const Client::Impl::FastGrant& grant, fastpath::Op op,
                              uint64_t namespace_id, uint64_t block_bytes) {
  fastpath::Request request;
  request.op = op;
  std::memcpy(request.capability.data(), grant.capability.data(), request.capability.size());
  request.namespace_id = namespace_id;
  request.block_bytes = static_cast<uint32_t>(block_bytes);
  return request;
}

// One request of a call: its blocks [first, first + blocks.size()).
struct Chunk {
  fastpath::Request request;
  std::vector<transfer::SendOp> data;
  // A fetch whose destinations lie back to back: a reply of every block,
  // whole, lands there directly (transfer::AmCallSpec::reply_into).
  uint8_t* reply_into = nullptr;
  size_t reply_capacity = 0;
  fastpath::Reply reply;
  transfer::AmReply am;
};

// Sends every chunk's request at once and decodes the replies; false means
// use gRPC, an error status means the deadline has passed.
std::optional<absl::Status> Exchange(Client::Impl& impl, uint64_t namespace_id,
                                     std::vector<Chunk>& chunks, absl::Time deadline) {
  std::vector<transfer::AmCallSpec> specs;
  specs.reserve(chunks.size());
  for (const Chunk& chunk : chunks) {
    specs.push_back({fastpath::EncodeRequest(chunk.request), chunk.data, chunk.reply_into,
                     chunk.reply_capacity});
    if (specs.back().header.size() + sizeof(uint64_t) > impl.FastMaxHeaderBytes()) {
      return std::nullopt;
    }
  }
  absl::StatusOr<std::shared_ptr<transfer::Peer>> node = impl.NodePeer(deadline);
  if (!node.ok()) return std::nullopt;  // gRPC reports why, or reconnects
  std::vector<absl::StatusOr<transfer::AmReply>> replies = (*node)->CallMany(specs, deadline);
  for (size_t c = 0; c < chunks.size(); ++c) {
    if (!replies[c].ok()) {
      if (absl::Now() >= deadline) return replies[c].status();
      KVS_LOG(Debug) << "fast path failed, using gRPC: " << replies[c].status();
      return std::nullopt;
    }
    absl::StatusOr<fastpath::Reply> reply = fastpath::DecodeReply(replies[c]->header);
    if (!reply.ok()) return std::nullopt;
    if (reply->code != 0) {
      const absl::StatusCode code = static_cast<absl::StatusCode>(reply->code);
      // The node no longer knows the grant (restarted, namespace closed):
      // stop using it; gRPC answers authoritatively (and a reopen grants anew).
      if (code == absl::StatusCode::kPermissionDenied || code == absl::StatusCode::kNotFound) {
        impl.SetFastGrant(namespace_id, std::nullopt);
      }
      KVS_LOG(Debug) << "fast path refused (" << reply->message << "), using gRPC";
      return std::nullopt;
    }
    if (reply->blocks.size() != chunks[c].request.blocks.size()) return std::nullopt;
    chunks[c].reply = *std::move(reply);
    chunks[c].am = *std::move(replies[c]);
  }
  return absl::OkStatus();
}

}  // namespace

std::optional<absl::StatusOr<LookupResult>> FastLookup(Client::Impl& impl, uint64_t namespace_id,
                                                       uint64_t block_bytes,
                                                       absl::Span<const BlockKey> keys,
                                                       absl::Time deadline) {
  // A lookup moves no data: only the key count bounds it, in one request.
  if (keys.size() > fastpath::kMaxBlocks) return std::nullopt;
  std::optional<Client::Impl::FastGrant> grant = Applicable(impl, namespace_id, keys.size(), 0);
  if (!grant.has_value() || keys.size() > grant->max_blocks) return std::nullopt;
  std::vector<Chunk> chunks(1);
  chunks[0].request = BaseRequest(*grant, fastpath::Op::kLookup, namespace_id, block_bytes);
  chunks[0].request.blocks.resize(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) chunks[0].request.blocks[i].key = keys[i];
  std::optional<absl::Status> exchanged = Exchange(impl, namespace_id, chunks, deadline);
  if (!exchanged.has_value()) return std::nullopt;
  if (!exchanged->ok()) return *exchanged;
  LookupResult result;
  for (const fastpath::BlockResult& block : chunks[0].reply.blocks) {
    if (block.status != v1::BLOCK_OK) break;
    ++result.prefix_length;
    result.tiers.push_back(block.size == v1::TIER_NVME  ? Tier::kNvme
                           : block.size == v1::TIER_HBM ? Tier::kHbm
                                                        : Tier::kDram);
  }
  return result;
}

FastOutcome FastFetch(Client::Impl& impl, uint64_t namespace_id, uint64_t block_bytes,
                      absl::Span<const FetchItem> items, absl::Time deadline) {
  FastOutcome out;
  std::optional<Client::Impl::FastGrant> grant =
      Applicable(impl, namespace_id, items.size(), block_bytes);
  if (!grant.has_value()) return out;
  for (const FetchItem& item : items) {
    if (item.buffer == nullptr || item.offset > item.buffer->size() ||
        block_bytes > item.buffer->size() - item.offset) {
      return out;  // the gRPC path reports it
    }
    // Device buffers: host code must not touch them; the gRPC path stages
    // them (or copies over CUDA IPC).
    if (item.buffer->kind() == MemoryKind::kDevice) return out;
  }
  const size_t per_request = ChunkBlocks(*grant, block_bytes);
  std::vector<Chunk> chunks((items.size() + per_request - 1) / per_request);
  for (size_t c = 0; c < chunks.size(); ++c) {
    chunks[c].request = BaseRequest(*grant, fastpath::Op::kFetch, namespace_id, block_bytes);
    const size_t first = c * per_request, end = std::min(items.size(), (c + 1) * per_request);
    bool back_to_back = true;
    uint8_t* const base = items[first].buffer->data() + items[first].offset;
    for (size_t i = first; i < end; ++i) {
      chunks[c].request.blocks.push_back({.key = items[i].key});
      back_to_back = back_to_back &&
                     items[i].buffer->data() + items[i].offset == base + (i - first) * block_bytes;
    }
    if (back_to_back) {
      chunks[c].reply_into = base;
      chunks[c].reply_capacity = (end - first) * block_bytes;
    }
  }
  std::optional<absl::Status> exchanged = Exchange(impl, namespace_id, chunks, deadline);
  if (!exchanged.has_value()) return out;
  if (!exchanged->ok()) {
    out.result = *exchanged;
    return out;
  }
  for (const Chunk& chunk : chunks) {
    uint64_t expected = 0;
    for (const fastpath::BlockResult& block : chunk.reply.blocks) {
      if (block.status != v1::BLOCK_OK) continue;
      if (block.size > block_bytes) return out;  // a reply we cannot place: ask gRPC
      expected += block.size;
    }
    if (expected != chunk.am.data_length) return out;
  }
  TransferResult result;
  for (size_t c = 0; c < chunks.size(); ++c) {
    const Chunk& chunk = chunks[c];
    uint64_t offset = 0;
    for (size_t k = 0; k < chunk.reply.blocks.size(); ++k) {
      const size_t i = c * per_request + k;
      const fastpath::BlockResult& block = chunk.reply.blocks[k];
      if (block.status == fastpath::kNotInMemory) {
        out.grpc_items.push_back(i);
        result.outcomes.push_back(BlockOutcome::kTransferFailed);
        result.sizes.push_back(0);
        continue;
      }
      BlockOutcome outcome = FromWire(block.status);
      if (outcome == BlockOutcome::kOk) {
        uint8_t* destination = items[i].buffer->data() + items[i].offset;
        // In place: every block came whole, each already at its destination.
        if (!chunk.am.data_in_place) {
          std::memcpy(destination, chunk.am.data.get() + offset, block.size);
        }
        offset += block.size;
        // Checked right after the copy, while the block is in cache.
        if (impl.options.verify_checksums &&
            BlockChecksum(destination, block.size) != block.checksum) {
          outcome = BlockOutcome::kChecksumMismatch;
        }
      }
      result.outcomes.push_back(outcome);
      result.sizes.push_back(outcome == BlockOutcome::kOk ? block.size : 0);
    }
    result.bytes += chunk.reply.bytes_transferred;
  }
  out.result = std::move(result);
  return out;
}

FastOutcome FastPublish(Client::Impl& impl, uint64_t namespace_id, uint64_t block_bytes,
                        absl::Span<const PublishItem> items, size_t max_blocks,
                        absl::Time deadline) {
  FastOutcome out;
  if (items.size() > max_blocks) return out;
  std::optional<Client::Impl::FastGrant> grant =
      Applicable(impl, namespace_id, items.size(), block_bytes);
  if (!grant.has_value()) return out;
  const size_t per_request = ChunkBlocks(*grant, block_bytes);
  std::vector<Chunk> chunks((items.size() + per_request - 1) / per_request);
  for (size_t i = 0; i < items.size(); ++i) {
    const PublishItem& item = items[i];
    if (item.buffer == nullptr || item.offset > item.buffer->size() ||
        block_bytes > item.buffer->size() - item.offset) {
      return out;  // the gRPC path reports it
    }
    // Device buffers: host code must not touch them; the gRPC path stages
    // them (or copies over CUDA IPC).
    if (item.buffer->kind() == MemoryKind::kDevice) return out;
    Chunk& chunk = chunks[i / per_request];
    if (chunk.request.blocks.empty()) {
      chunk.request = BaseRequest(*grant, fastpath::Op::kPublish, namespace_id, block_bytes);
    }
    const uint8_t* bytes = item.buffer->data() + item.offset;
    fastpath::Block block;
    block.key = item.key;
    block.has_parent = item.parent.has_value();
    if (item.parent.has_value()) block.parent = *item.parent;
    block.checksum = BlockChecksum(bytes, block_bytes);
    chunk.request.blocks.push_back(block);
    chunk.data.push_back({bytes, block_bytes, 0});
  }
  std::optional<absl::Status> exchanged = Exchange(impl, namespace_id, chunks, deadline);
  if (!exchanged.has_value()) return out;
  if (!exchanged->ok()) {
    out.result = *exchanged;
    return out;
  }
  TransferResult result;
  for (const Chunk& chunk : chunks) {
    for (const fastpath::BlockResult& block : chunk.reply.blocks) {
      result.outcomes.push_back(FromWire(block.status));
      result.sizes.push_back(0);
    }
    result.bytes += chunk.reply.bytes_transferred;
  }
  out.result = std::move(result);
  return out;
}

}  // namespace kvstrata::client
