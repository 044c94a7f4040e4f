#include "fast_path.h"

#include <cstring>

#include "absl/container/flat_hash_set.h"

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kvstrata/common/log.h"
#include "node_service.h"

namespace kvstrata::cachenode {
namespace {

void ReplyError(transfer::AmRequest& am, const absl::Status& status) {
  am.Reply(fastpath::ErrorReply(status), nullptr, 0, nullptr);
}

}  // namespace

FastPath::FastPath(NamespaceRegistry& namespaces, TieredStore& store, TenantLedger& ledger,
                   NodeCounters& counters, FastPathOptions options)
    : namespaces_(namespaces),
      store_(store),
      ledger_(ledger),
      counters_(counters),
      options_(std::move(options)) {}

FastPath::~FastPath() { Stop(); }

void FastPath::Stop() {
  // Sequentially consistent with Running: a callback either sees `stopped`
  // or is counted in `running` here. (Never called from a UCX callback.)
  shared_->stopped.store(true);
  while (shared_->running.load() > 0) absl::SleepFor(absl::Microseconds(100));
}

std::optional<fastpath::Capability> FastPath::Grant(const NamespaceInfo& ns) {
  // Encoding (quantized formats) is CPU work the progress thread must not do.
  if (ns.spec.format() != v1::FORMAT_RAW) return std::nullopt;
  // A namespace with a precision budget holds blocks at coarser formats, and
  // a fast-path reply names none: its clients fetch over gRPC, whose reply
  // says each block's format.
  if (ns.spec.coarsest_format() != v1::FORMAT_RAW) return std::nullopt;
  fastpath::Capability capability;
  {
    // absl::BitGen is seeded from the OS entropy source: 128 unguessable bits.
    absl::BitGen random;
    for (auto& byte : capability) byte = absl::Uniform<uint8_t>(random);
  }
  absl::MutexLock lock(&mu_);
  if (grants_.size() >= options_.max_capabilities) return std::nullopt;
  grants_[capability] = Grantee{.namespace_id = ns.id,
                                .block_bytes = ns.block_bytes,
                                .tokens_per_block = ns.spec.tokens_per_block(),
                                .tenant = ns.spec.tenant(),
                                .inflight = std::make_shared<std::atomic<size_t>>(0)};
  return capability;
}

void FastPath::Revoke(uint64_t namespace_id) {
  absl::MutexLock lock(&mu_);
  absl::erase_if(grants_, [namespace_id](const auto& kv) {
    return kv.second.namespace_id == namespace_id;
  });
}

void FastPath::Revoke(uint64_t namespace_id, std::string_view capability) {
  fastpath::Capability key;
  if (capability.size() != key.size()) return;
  std::memcpy(key.data(), capability.data(), key.size());
  absl::MutexLock lock(&mu_);
  auto it = grants_.find(key);
  if (it != grants_.end() && it->second.namespace_id == namespace_id) grants_.erase(it);
}

absl::StatusOr<FastPath::Grantee> FastPath::Authorize(const fastpath::Request& request) {
  Grantee who;
  {
    absl::MutexLock lock(&mu_);
    auto it = grants_.find(request.capability);
    if (it == grants_.end()) {
      return absl::PermissionDeniedError(
          "unknown fast-path capability (open the namespace again over gRPC)");
    }
    who = it->second;
  }
  if (who.namespace_id != request.namespace_id) {
    return absl::PermissionDeniedError("this capability was granted for another namespace");
  }
  if (who.block_bytes != request.block_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("this namespace's blocks have ",
                                                   who.block_bytes, " bytes, not ",
                                                   request.block_bytes));
  }
  // Closed since (or the node forgot it): the capability dies with it.
  if (!namespaces_.Get(who.namespace_id).ok()) {
    return absl::NotFoundError("the namespace is not open on this node");
  }
  return who;
}

bool FastPath::TakeBuffer(uint64_t bytes) {
  std::atomic<uint64_t>& in_use = shared_->buffer_used;
  uint64_t used = in_use.load(std::memory_order_relaxed);
  do {
    if (used + bytes > options_.buffer_bytes) return false;
  } while (!in_use.compare_exchange_weak(used, used + bytes, std::memory_order_relaxed));
  return true;
}

void FastPath::GiveBuffer(uint64_t bytes) {
  shared_->buffer_used.fetch_sub(bytes, std::memory_order_relaxed);
}

void FastPath::Handle(std::shared_ptr<transfer::AmRequest> am) {
  const Running running(*shared_);
  if (!running.ok()) return;  // dropped: the client's deadline ends its wait
  counters_.fast_path_requests.fetch_add(1, std::memory_order_relaxed);
  const absl::Time start = absl::Now();
  const char* method = "Unknown";
  auto observe = [&](int code) {
    if (options_.observe) options_.observe(method, code, absl::Now() - start);
  };
  auto refuse = [&](const absl::Status& status) {
    observe(static_cast<int>(status.code()));
    counters_.fast_path_refused.fetch_add(1, std::memory_order_relaxed);
    if (absl::IsPermissionDenied(status)) {
      counters_.permission_denied_calls.fetch_add(1, std::memory_order_relaxed);
    }
    ReplyError(*am, status);
  };
  absl::StatusOr<fastpath::Request> request = fastpath::DecodeRequest(am->header());
  if (!request.ok()) return refuse(request.status());
  method = request->op == fastpath::Op::kLookup  ? "Lookup"
           : request->op == fastpath::Op::kFetch ? "Fetch"
                                                 : "Publish";
  absl::StatusOr<Grantee> who = Authorize(*request);
  if (!who.ok()) return refuse(who.status());
  const uint64_t data_bytes = request->op == fastpath::Op::kPublish
                                  ? uint64_t{request->block_bytes} * request->blocks.size()
                                  : 0;
  if (am->data_length() != data_bytes) {
    return refuse(absl::InvalidArgumentError(absl::StrCat(
        "a fast-path request of ", request->blocks.size(), " blocks carries ", data_bytes,
        " bytes of data, not ", am->data_length())));
  }
  if (who->inflight->fetch_add(1) >= options_.max_inflight_per_capability) {
    who->inflight->fetch_sub(1);
    return refuse(absl::ResourceExhaustedError("too many fast-path requests in flight"));
  }
  // Given back when the request is done (for a rendezvous publish: when its
  // data has landed and been stored).
  std::shared_ptr<void> slot(nullptr, [inflight = who->inflight](void*) { inflight->fetch_sub(1); });
  if (request->op == fastpath::Op::kLookup) {
    Lookup(*request, *who, *am);
  } else if (request->op == fastpath::Op::kFetch) {
    Fetch(*request, *who, *am);
  } else {
    Publish(*request, *who, std::move(am), std::move(slot));  // the slot travels with its data
  }
  observe(0);  // admitted: per-block outcomes are in the reply, as over gRPC
}

void FastPath::Lookup(const fastpath::Request& request, const Grantee& who,
                      transfer::AmRequest& am) {
  std::vector<BlockKey> keys;
  keys.reserve(request.blocks.size());
  for (const fastpath::Block& block : request.blocks) keys.push_back(block.key);
  // Index lookups only (NVMe's index is in memory); NVMe blocks it finds are
  // queued for promotion, never read here.
  const std::vector<v1::Tier> tiers = store_.PrefixTiers(who.namespace_id, keys);
  fastpath::Reply reply;
  reply.blocks.resize(keys.size(), {.status = v1::BLOCK_NOT_FOUND});
  for (size_t i = 0; i < tiers.size(); ++i) {
    reply.blocks[i] = {.status = v1::BLOCK_OK, .size = static_cast<uint32_t>(tiers[i])};
  }
  const size_t prefix = tiers.size();
  counters_.lookup_hit_blocks.fetch_add(prefix, std::memory_order_relaxed);
  counters_.lookup_miss_blocks.fetch_add(keys.size() - prefix, std::memory_order_relaxed);
  counters_.lookup_hit_tokens.fetch_add(prefix * who.tokens_per_block, std::memory_order_relaxed);
  counters_.lookup_miss_tokens.fetch_add((keys.size() - prefix) * who.tokens_per_block,
                                         std::memory_order_relaxed);
  am.Reply(fastpath::EncodeReply(reply), nullptr, 0, nullptr);
}

void FastPath::Fetch(const fastpath::Request& request, const Grantee& who,
                     transfer::AmRequest& am) {
  fastpath::Reply reply;
  reply.blocks.resize(request.blocks.size());
  std::vector<std::shared_ptr<StoredBlock>> hits(request.blocks.size());
  uint64_t bytes = 0;
  size_t found = 0, missed = 0;
  for (size_t i = 0; i < request.blocks.size(); ++i) {
    const BlockId id{who.namespace_id, request.blocks[i].key};
    hits[i] = store_.dram().Find(id, /*hit=*/true);
    if (hits[i] != nullptr) {
      bytes += hits[i]->size();
      ++found;
    } else if (store_.Contains(id)) {
      // In HBM (device memory, which gRPC stages) or on NVMe only (which
      // gRPC reads on a thread of its own): the client fetches it over gRPC,
      // which counts the hit.
      reply.blocks[i].status = fastpath::kNotInMemory;
    } else {
      reply.blocks[i].status = v1::BLOCK_NOT_FOUND;
      ++missed;
    }
  }
  counters_.fetch_hit_blocks.fetch_add(found, std::memory_order_relaxed);
  counters_.fetch_miss_blocks.fetch_add(missed, std::memory_order_relaxed);
  if (bytes > 0 && !TakeBuffer(bytes)) {
    counters_.fast_path_refused.fetch_add(1, std::memory_order_relaxed);
    return ReplyError(am, absl::ResourceExhaustedError("fast-path reply memory is all in use"));
  }
  // The hits are copied out, so no tier memory waits on the client: a
  // client that dies before its reply completes holds this buffer, never a
  // pinned block.
  std::shared_ptr<uint8_t[]> data(bytes > 0 ? new uint8_t[bytes] : nullptr);
  uint64_t offset = 0;
  for (size_t i = 0; i < hits.size(); ++i) {
    if (hits[i] == nullptr) continue;
    std::memcpy(data.get() + offset, hits[i]->data(), hits[i]->size());
    offset += hits[i]->size();
    reply.blocks[i] = {.status = v1::BLOCK_OK,
                       .size = static_cast<uint32_t>(hits[i]->size()),
                       .checksum = hits[i]->checksum};
  }
  hits.clear();  // unpinned
  reply.bytes_transferred = bytes;
  const std::string transport = am.transport();
  NoteTransport(transport);
  counters_.transfer_bytes.Add("out", transport, bytes);
  std::shared_ptr<void> keep_alive;
  if (bytes > 0) {
    keep_alive = std::shared_ptr<void>(nullptr, [shared = shared_, data, bytes](void*) {
      shared->buffer_used.fetch_sub(bytes, std::memory_order_relaxed);
    });
  }
  am.Reply(fastpath::EncodeReply(reply), data.get(), bytes, std::move(keep_alive));
}

void FastPath::Publish(const fastpath::Request& request, const Grantee& who,
                       std::shared_ptr<transfer::AmRequest> am, std::shared_ptr<void> slot) {
  if (options_.draining != nullptr && options_.draining->load(std::memory_order_relaxed)) {
    counters_.fast_path_refused.fetch_add(1, std::memory_order_relaxed);
    return ReplyError(*am, absl::FailedPreconditionError(
                               "this node is draining: it takes no new blocks"));
  }
  fastpath::Reply reply;
  reply.blocks.resize(request.blocks.size());
  absl::flat_hash_set<BlockKey> seen;
  size_t missing = 0;
  for (size_t i = 0; i < request.blocks.size(); ++i) {
    if (!seen.insert(request.blocks[i].key).second) {
      counters_.fast_path_refused.fetch_add(1, std::memory_order_relaxed);
      return ReplyError(*am, absl::InvalidArgumentError(absl::StrCat(
                                 "key ", request.blocks[i].key.Hex(), " appears twice")));
    }
    if (store_.Contains(BlockId{who.namespace_id, request.blocks[i].key})) {
      reply.blocks[i].status = v1::BLOCK_ALREADY_PRESENT;
    } else {
      reply.blocks[i].status = v1::BLOCK_OK;  // to be stored
      ++missing;
    }
  }
  counters_.duplicate_blocks.fetch_add(request.blocks.size() - missing, std::memory_order_relaxed);
  if (missing == 0) {
    // Dedup: a rendezvous message's data is dropped unmoved (UCX completes
    // the client's send without reading its buffers).
    return am->Reply(fastpath::EncodeReply(reply), nullptr, 0, nullptr);
  }
  if (const uint8_t* eager = am->eager_data(); eager != nullptr) {
    Store(request, who, eager, am->transport(), &reply);
    return am->Reply(fastpath::EncodeReply(reply), nullptr, 0, nullptr);
  }
  // Rendezvous: receive into staging, owned memory (never a reserved chunk:
  // a client that dies mid-message costs the node this buffer, not tier
  // memory), and store once it has landed.
  const uint64_t bytes = am->data_length();
  if (!TakeBuffer(bytes)) {
    counters_.fast_path_refused.fetch_add(1, std::memory_order_relaxed);
    return ReplyError(*am, absl::ResourceExhaustedError("fast-path staging memory is all in use"));
  }
  std::shared_ptr<uint8_t[]> staging(new uint8_t[bytes]);
  auto state = std::make_shared<std::pair<fastpath::Request, fastpath::Reply>>(request, reply);
  // Runs inside a Running scope (Handle's, or the callback's below).
  auto landed = [this, am, staging, state, who](const absl::Status& received) {
    if (!received.ok()) {
      counters_.transfer_failures.fetch_add(1, std::memory_order_relaxed);
      KVS_LOG(Warning) << "fast-path publish data failed: " << received;
      return ReplyError(*am, received);
    }
    Store(state->first, who, staging.get(), am->transport(), &state->second);
    am->Reply(fastpath::EncodeReply(state->second), nullptr, 0, nullptr);
  };
  std::optional<absl::Status> at_once =
      am->ReceiveData(staging.get(), [shared = shared_, bytes, landed, slot](absl::Status received) {
        shared->buffer_used.fetch_sub(bytes, std::memory_order_relaxed);
        const Running running(*shared);
        if (!running.ok()) return;  // `this` may be gone: touch nothing else
        landed(received);
      });
  if (at_once.has_value()) {
    // Over before ReceiveData returned (shared memory copies at once; a
    // client already gone fails at once), inside Handle's Running scope.
    GiveBuffer(bytes);
    landed(*at_once);
  }
}

void FastPath::NoteTransport(const std::string& transport) {
  absl::MutexLock lock(&mu_);
  if (transports_.size() < 16) transports_.insert(transport);
}

std::vector<std::string> FastPath::Transports() {
  absl::MutexLock lock(&mu_);
  return std::vector<std::string>(transports_.begin(), transports_.end());
}

void FastPath::Store(const fastpath::Request& request, const Grantee& who, const uint8_t* data,
                     const std::string& transport, fastpath::Reply* reply) {
  NoteTransport(transport);
  const uint64_t block_bytes = request.block_bytes;
  size_t missing = 0;
  for (const auto& block : reply->blocks) missing += block.status == v1::BLOCK_OK ? 1 : 0;
  const uint64_t share =
      options_.max_request_bytes == 0 ? missing : options_.max_request_bytes / block_bytes;
  const uint64_t quota = options_.quota_bytes ? options_.quota_bytes(who.tenant) : 0;
  const size_t room = ledger_.MakeRoom(who.tenant, quota,
                                       std::min<uint64_t>(missing, std::max<uint64_t>(share, 1)),
                                       block_bytes);
  size_t reserved = 0;
  uint64_t stored_bytes = 0;
  for (size_t i = 0; i < request.blocks.size(); ++i) {
    fastpath::BlockResult& result = reply->blocks[i];
    if (result.status != v1::BLOCK_OK) continue;
    absl::StatusOr<std::shared_ptr<StoredBlock>> block =
        reserved < room ? store_.dram().Reserve(block_bytes)
                        : absl::ResourceExhaustedError("over the request's share");
    if (!block.ok()) {
      result.status = v1::BLOCK_NO_SPACE;
      continue;
    }
    ++reserved;
    // Copy, then checksum the copy while it is still in cache.
    std::memcpy((*block)->data(), data + i * block_bytes, block_bytes);
    stored_bytes += block_bytes;
    const uint64_t checksum = BlockChecksum((*block)->data(), block_bytes);
    if (checksum != request.blocks[i].checksum) {
      result.status = v1::BLOCK_CHECKSUM_MISMATCH;
      counters_.checksum_failures.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    (*block)->checksum = checksum;
    if (request.blocks[i].has_parent) {
      (*block)->parent = request.blocks[i].parent;
      (*block)->has_parent = true;
    }
    // Through the tiered store, so a node with HBM places it there as a
    // gRPC publish would and a block is never in HBM and DRAM at once.
    absl::StatusOr<bool> committed =
        store_.Commit(BlockId{who.namespace_id, request.blocks[i].key}, *block);
    if (!committed.ok()) {
      result.status = v1::BLOCK_NO_SPACE;
    } else if (*committed) {
      counters_.published_blocks.fetch_add(1, std::memory_order_relaxed);
      counters_.ingest_bytes.Add("raw", "received", block_bytes);
      counters_.ingest_bytes.Add("raw", "stored", block_bytes);
    } else {
      result.status = v1::BLOCK_ALREADY_PRESENT;
      counters_.duplicate_blocks.fetch_add(1, std::memory_order_relaxed);
    }
  }
  reply->bytes_transferred = stored_bytes;
  counters_.transfer_bytes.Add("in", transport, stored_bytes);
}

}  // namespace kvstrata::cachenode
