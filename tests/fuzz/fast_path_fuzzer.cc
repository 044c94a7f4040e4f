// The node's fast path (cachenode/src/fast_path.cc): one UCX active message,
// header and data, handed to the real FastPath over a real NamespaceRegistry,
// DRAM tier, TieredStore and TenantLedger. The message arrives through an
// in-harness AmRequest (what the UCX engine hands FastPath::Handle), so
// nothing touches the network; its rendezvous data "lands" after Handle
// returns, as it would on the progress thread.
//
// Input: byte 0 holds flags (bit 0: the data comes eagerly with the header,
// else by rendezvous; bit 1: a rendezvous receive fails; bit 2: a second
// namespace is open and its grant used; bit 3: a rendezvous receive is over
// before ReceiveData returns, as it often is over shared memory), bytes 1-2 the header's length
// (little endian), then the header, then the data. In the header, a
// capability of sixteen zero bytes stands for the one OpenNamespace granted
// and namespace id 1 for the namespace's id, so the fuzzer gets past
// authorization without guessing 128 random bits.
//
// Checked after every message: exactly one reply, and it decodes; an OK
// reply has one result per block, and a fetch's reply data is exactly the
// OK blocks' bytes, each matching its checksum (never a wrong block); every
// block a publish reports stored is stored with the bytes it was sent; no
// block memory held once the reply is released.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "fast_path.h"
#include "kvstrata/cachenode/dram_tier.h"
#include "kvstrata/cachenode/namespace_registry.h"
#include "kvstrata/common/block_key.h"
#include "kvstrata/common/fast_path_wire.h"
#include "kvstrata/transfer/active_message.h"
#include "node_service.h"
#include "tenant_ledger.h"
#include "tiered_store.h"

namespace v1 = kvstrata::v1;
namespace cachenode = kvstrata::cachenode;
namespace fastpath = kvstrata::fastpath;
using kvstrata::BlockKey;

namespace {

constexpr uint64_t kSlabBytes = 16 << 10;
constexpr uint64_t kArenaBytes = 8 * kSlabBytes;
constexpr uint64_t kBlockBytes = 4096;

void Check(bool condition, const char* what) {
  if (!condition) {
    fprintf(stderr, "fast_path invariant broken: %s\n", what);
    std::abort();
  }
}

v1::NamespaceSpec Spec(const std::string& model) {
  v1::NamespaceSpec spec;
  spec.set_tenant("fuzz");
  spec.set_model(model);
  spec.set_tokens_per_block(16);
  spec.set_block_bytes(kBlockBytes);
  return spec;
}

// What the UCX engine hands FastPath::Handle, minus the network.
class Message : public kvstrata::transfer::AmRequest {
 public:
  Message(std::string header, std::string data, bool eager, bool fail_receive, bool at_once)
      : header_(std::move(header)), data_(std::move(data)), eager_(eager),
        fail_receive_(fail_receive), at_once_(at_once) {}
  std::string_view header() const override { return header_; }
  size_t data_length() const override { return data_.size(); }
  const uint8_t* eager_data() const override {
    return eager_ && !data_.empty() ? reinterpret_cast<const uint8_t*>(data_.data()) : nullptr;
  }
  // Over at once (as shared memory often is, and a gone client always), or
  // later from Land(), as the progress thread would.
  std::optional<absl::Status> ReceiveData(uint8_t* into,
                                          std::function<void(absl::Status)> done) override {
    Check(!eager_ || data_.empty(), "ReceiveData only for rendezvous data");
    Check(!received_, "ReceiveData at most once");
    received_ = true;
    auto land = [this, into]() -> absl::Status {
      if (fail_receive_) return absl::UnavailableError("the harness drops the data");
      std::memcpy(into, data_.data(), data_.size());
      return absl::OkStatus();
    };
    if (at_once_) return land();
    pending_ = [land, done = std::move(done)] { done(land()); };
    return std::nullopt;
  }
  void Reply(std::string header, const uint8_t* data, size_t length,
             std::shared_ptr<void> keep_alive) override {
    ++replies_;
    reply_header_ = std::move(header);
    reply_data_.assign(reinterpret_cast<const char*>(data), data == nullptr ? 0 : length);
    keep_alive_ = std::move(keep_alive);
  }
  std::string transport() const override { return "fuzz"; }

  // Lands rendezvous data (after Handle returned, as on the progress thread).
  void Land() {
    if (pending_) std::exchange(pending_, nullptr)();
  }
  void ReleaseReply() { keep_alive_.reset(); }

  const std::string& data() const { return data_; }
  int replies() const { return replies_; }
  const std::string& reply_header() const { return reply_header_; }
  const std::string& reply_data() const { return reply_data_; }

 private:
  std::string header_, data_;
  bool eager_, fail_receive_, at_once_;
  bool received_ = false;
  std::function<void()> pending_;
  int replies_ = 0;
  std::string reply_header_, reply_data_;
  std::shared_ptr<void> keep_alive_;
};

// The node's state for one input: fresh each time, so every input replays alone.
struct Node {
  std::vector<uint8_t> arena = std::vector<uint8_t>(kArenaBytes);
  cachenode::NamespaceRegistry namespaces{kSlabBytes};
  cachenode::DramTier dram{arena.data(), kArenaBytes, kSlabBytes,
                           *cachenode::MakeEvictionPolicy("lru")};
  cachenode::TieredStore store{dram, nullptr};
  cachenode::TenantLedger ledger{store};
  cachenode::NodeCounters counters;
  cachenode::FastPath fast_path{namespaces, store, ledger, counters,
                                cachenode::FastPathOptions{.buffer_bytes = 64 * kBlockBytes,
                                                           .max_inflight_per_capability = 2,
                                                           .max_request_bytes = kArenaBytes / 4}};
  uint64_t ns_id = 0;
  fastpath::Capability capability{};
  std::vector<BlockKey> stored_keys;

  explicit Node(bool second_namespace) {
    cachenode::NamespaceInfo ns = *namespaces.Open(Spec("opaque"));
    ledger.NamespaceOpened(ns.id, "fuzz");
    ns_id = ns.id;
    capability = *fast_path.Grant(ns);
    if (second_namespace) {  // its grant is the one the zero capability names
      cachenode::NamespaceInfo other = *namespaces.Open(Spec("other"));
      capability = *fast_path.Grant(other);
    }
    // A chain of four blocks (make_seeds.cc writes the same keys).
    std::vector<uint32_t> tokens(4 * 16);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint32_t>(i);
    stored_keys = kvstrata::ComputeBlockKeys(ns.id, tokens, 16);
    for (size_t i = 0; i < stored_keys.size(); ++i) {
      auto block = dram.Reserve(kBlockBytes);
      Check(block.ok(), "room for the preloaded blocks");
      std::memset((*block)->data(), static_cast<int>(i + 1), kBlockBytes);
      (*block)->checksum = kvstrata::BlockChecksum((*block)->data(), kBlockBytes);
      Check(dram.Commit({ns.id, stored_keys[i]}, *block), "preloaded block commits");
    }
  }
};

// Header offsets (fast_path_wire.cc): magic 4, op 1, reserved 3, capability 16, namespace 8.
constexpr size_t kCapabilityAt = 8;
constexpr size_t kNamespaceAt = 24;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 3) return 0;
  const uint8_t flags = data[0];
  const size_t header_length = std::min<size_t>(data[1] | size_t{data[2]} << 8, size - 3);
  std::string header(reinterpret_cast<const char*>(data) + 3, header_length);
  std::string body(reinterpret_cast<const char*>(data) + 3 + header_length,
                   size - 3 - header_length);
  Node node(/*second_namespace=*/flags & 4);
  if (header.size() >= kNamespaceAt + 8) {
    if (std::all_of(header.begin() + kCapabilityAt, header.begin() + kNamespaceAt,
                    [](char c) { return c == 0; })) {
      std::memcpy(header.data() + kCapabilityAt, node.capability.data(), node.capability.size());
    }
    uint64_t ns = 0;
    std::memcpy(&ns, header.data() + kNamespaceAt, sizeof(ns));
    if (ns == 1) std::memcpy(header.data() + kNamespaceAt, &node.ns_id, sizeof(node.ns_id));
  }
  const cachenode::TierCounters before = node.dram.counters();

  auto message = std::make_shared<Message>(header, body, /*eager=*/flags & 1, flags & 2,
                                           /*at_once=*/flags & 8);
  node.fast_path.Handle(message);
  message->Land();
  Check(message->replies() == 1, "exactly one reply");
  absl::StatusOr<fastpath::Reply> reply = fastpath::DecodeReply(message->reply_header());
  Check(reply.ok(), "the reply decodes");
  absl::StatusOr<fastpath::Request> request = fastpath::DecodeRequest(header);
  if (!request.ok()) {
    Check(reply->code == static_cast<uint32_t>(absl::StatusCode::kInvalidArgument),
          "bad header: INVALID_ARGUMENT");
  }
  if (reply->code == 0) {
    Check(request.ok(), "only a valid request is answered OK");
    Check(reply->blocks.size() == request->blocks.size(), "one result per block");
    uint64_t offset = 0;
    for (size_t i = 0; i < reply->blocks.size(); ++i) {
      const fastpath::BlockResult& result = reply->blocks[i];
      const cachenode::BlockId id{node.ns_id, request->blocks[i].key};
      if (request->op == fastpath::Op::kFetch && result.status == v1::BLOCK_OK) {
        Check(result.size == kBlockBytes && offset + result.size <= message->reply_data().size(),
              "a fetched block lies in the reply data");
        Check(kvstrata::BlockChecksum(message->reply_data().data() + offset, result.size) ==
                  result.checksum,
              "a fetched block matches its checksum");
        offset += result.size;
      }
      if (request->op == fastpath::Op::kPublish && result.status == v1::BLOCK_OK) {
        std::shared_ptr<cachenode::StoredBlock> stored = node.dram.Find(id, false);
        Check(stored != nullptr && stored->size() == kBlockBytes &&
                  std::memcmp(stored->data(), message->data().data() + i * kBlockBytes,
                              kBlockBytes) == 0 &&
                  stored->checksum == request->blocks[i].checksum,
              "a block reported stored holds the bytes sent");
      }
    }
    if (request->op == fastpath::Op::kFetch) {
      Check(offset == message->reply_data().size(), "reply data is exactly the OK blocks");
    }
  } else {
    Check(message->reply_data().empty(), "an error reply carries no data");
    Check(node.dram.counters().blocks == before.blocks, "a refused request stores nothing");
  }
  message->ReleaseReply();
  message.reset();
  const cachenode::TierCounters after = node.dram.counters();
  Check(after.used_bytes == after.blocks * kBlockBytes, "no block memory held after the reply");
  return 0;
}
