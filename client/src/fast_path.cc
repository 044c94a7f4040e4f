#include "fast_path.h"

#include <cstring>

#include "kvstrata/common/block_key.h"
#include "kvstrata/common/fast_path_wire.h"
#include "kvstrata/common/log.h"
#include "kvstrata/transfer/active_message.h"

namespace kvstrata::client {
namespace {

BlockOutcome Outcome(v1::BlockStatus status) {
  switch (status) {
    case v1::BLOCK_OK:
      return BlockOutcome::kOk;
    case v1::BLOCK_ALREADY_PRESENT:
      return BlockOutcome::kAlreadyPresent;
    case v1::BLOCK_NOT_FOUND:
      return BlockOutcome::kNotFound;
    case v1::BLOCK_CHECKSUM_MISMATCH:
      return BlockOutcome::kChecksumMismatch;
    case v1::BLOCK_NO_SPACE:
      return BlockOutcome::kNoSpace;
    case v1::BLOCK_REJECTED:
      return BlockOutcome::kRejected;
    default:
      return BlockOutcome::kTransferFailed;
  }
}

// The grant for this call, when the fast path applies to `blocks` x
// `block_bytes` with a header of `header_bytes`.
std::optional<Client::Impl::FastGrant> Applicable(Client::Impl& impl, uint64_t namespace_id,
                                                  size_t blocks, uint64_t block_bytes) {
  if (!impl.options.fast_path ||
      impl.options.transfer_method != ClientOptions::TransferMethod::kTagged || blocks == 0) {
    return std::nullopt;
  }
  std::optional<Client::Impl::FastGrant> grant = impl.GetFastGrant(namespace_id);
  if (!grant.has_value() || grant->capability.size() != sizeof(fastpath::Capability) ||
      blocks > std::min<uint64_t>(grant->max_blocks, fastpath::kMaxBlocks) ||
      block_bytes * blocks > std::min<uint64_t>(grant->max_bytes, fastpath::kMaxBytes) ||
      block_bytes > UINT32_MAX) {
    return std::nullopt;
  }
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

// Sends the request; the decoded reply, or empty (use gRPC), or a final
// error once the deadline has passed.
std::optional<absl::StatusOr<std::pair<fastpath::Reply, transfer::AmReply>>> Call(
    Client::Impl& impl, uint64_t namespace_id, const fastpath::Request& request,
    absl::Span<const transfer::SendOp> data, absl::Time deadline) {
  const std::string header = fastpath::EncodeRequest(request);
  if (header.size() + sizeof(uint64_t) > impl.FastMaxHeaderBytes()) return std::nullopt;
  absl::StatusOr<std::shared_ptr<transfer::Peer>> node = impl.FastNodePeer(deadline);
  if (!node.ok()) return std::nullopt;  // gRPC reports why, or reconnects
  absl::StatusOr<transfer::AmReply> am = (*node)->Call(header, data, deadline);
  if (!am.ok()) {
    if (absl::Now() >= deadline) return am.status();
    KVS_LOG(Debug) << "fast path failed, using gRPC: " << am.status();
    return std::nullopt;
  }
  absl::StatusOr<fastpath::Reply> reply = fastpath::DecodeReply(am->header);
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
  if (reply->blocks.size() != request.blocks.size()) return std::nullopt;
  return std::make_pair(*std::move(reply), *std::move(am));
}

}  // namespace

std::optional<absl::StatusOr<LookupResult>> FastLookup(Client::Impl& impl, uint64_t namespace_id,
                                                       uint64_t block_bytes,
                                                       absl::Span<const BlockKey> keys,
                                                       absl::Time deadline) {
  // A lookup moves no data: only the key count bounds it.
  std::optional<Client::Impl::FastGrant> grant = Applicable(impl, namespace_id, keys.size(), 0);
  if (!grant.has_value()) return std::nullopt;
  fastpath::Request request = BaseRequest(*grant, fastpath::Op::kLookup, namespace_id, block_bytes);
  request.blocks.resize(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) request.blocks[i].key = keys[i];
  auto called = Call(impl, namespace_id, request, {}, deadline);
  if (!called.has_value()) return std::nullopt;
  if (!called->ok()) return called->status();
  LookupResult result;
  for (const fastpath::BlockResult& block : (*called)->first.blocks) {
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
  }
  fastpath::Request request = BaseRequest(*grant, fastpath::Op::kFetch, namespace_id, block_bytes);
  request.blocks.resize(items.size());
  for (size_t i = 0; i < items.size(); ++i) request.blocks[i].key = items[i].key;
  auto called = Call(impl, namespace_id, request, {}, deadline);
  if (!called.has_value()) return out;
  if (!called->ok()) {
    out.result = called->status();
    return out;
  }
  const fastpath::Reply& reply = (*called)->first;
  const transfer::AmReply& am = (*called)->second;
  uint64_t expected = 0;
  for (const fastpath::BlockResult& block : reply.blocks) {
    if (block.status != v1::BLOCK_OK) continue;
    if (block.size > block_bytes) return out;  // a reply we cannot place: ask gRPC
    expected += block.size;
  }
  if (expected != am.data_length) return out;
  TransferResult result;
  uint64_t offset = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const fastpath::BlockResult& block = reply.blocks[i];
    if (block.status == fastpath::kNotInMemory) {
      out.grpc_items.push_back(i);
      result.outcomes.push_back(BlockOutcome::kTransferFailed);
      result.sizes.push_back(0);
      continue;
    }
    BlockOutcome outcome = Outcome(block.status);
    if (outcome == BlockOutcome::kOk) {
      uint8_t* destination = items[i].buffer->data() + items[i].offset;
      std::memcpy(destination, am.data.get() + offset, block.size);
      offset += block.size;
      // Checked right after the copy, while the block is in cache.
      if (impl.options.verify_checksums && BlockChecksum(destination, block.size) != block.checksum) {
        outcome = BlockOutcome::kChecksumMismatch;
      }
    }
    result.outcomes.push_back(outcome);
    result.sizes.push_back(outcome == BlockOutcome::kOk ? block.size : 0);
  }
  result.bytes = reply.bytes_transferred;
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
  fastpath::Request request =
      BaseRequest(*grant, fastpath::Op::kPublish, namespace_id, block_bytes);
  request.blocks.resize(items.size());
  std::vector<transfer::SendOp> data;
  data.reserve(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    const PublishItem& item = items[i];
    if (item.buffer == nullptr || item.offset > item.buffer->size() ||
        block_bytes > item.buffer->size() - item.offset) {
      return out;  // the gRPC path reports it
    }
    const uint8_t* bytes = item.buffer->data() + item.offset;
    fastpath::Block& block = request.blocks[i];
    block.key = item.key;
    block.has_parent = item.parent.has_value();
    if (item.parent.has_value()) block.parent = *item.parent;
    block.checksum = BlockChecksum(bytes, block_bytes);
    data.push_back({bytes, block_bytes, 0});
  }
  auto called = Call(impl, namespace_id, request, data, deadline);
  if (!called.has_value()) return out;
  if (!called->ok()) {
    out.result = called->status();
    return out;
  }
  const fastpath::Reply& reply = (*called)->first;
  TransferResult result;
  for (const fastpath::BlockResult& block : reply.blocks) {
    result.outcomes.push_back(Outcome(block.status));
    result.sizes.push_back(0);
  }
  result.bytes = reply.bytes_transferred;
  out.result = std::move(result);
  return out;
}

}  // namespace kvstrata::client
