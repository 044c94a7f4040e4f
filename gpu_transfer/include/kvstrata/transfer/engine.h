// A small wrapper over UCX for node-driven bulk transfers (DESIGN.md §4).
//
// One Engine = one UCX context and one worker, progressed by a background
// thread, plus a cache of endpoints per peer. Memory that a peer may read or
// write is registered once (Register) and described to the peer by its packed
// remote key. The node side reads (Get) and writes (Put) peers' memory in
// batches completed by one endpoint flush, each with a deadline.
//
// Thread safety: every method may be called from any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"

namespace kvstrata::transfer {

struct EngineOptions {
  // UCX transports in UCX_TLS syntax ("tcp", "sm", "posix,cma"). Empty keeps
  // UCX_TLS from the environment, or UCX's own choice.
  std::string transports;
  // Raise TCP segment sizes and socket buffers above UCX's RDMA-oriented
  // defaults (MEASUREMENTS.md: about 2x put bandwidth on loopback). A UCX_TCP_*
  // variable in the environment always wins.
  bool tune_tcp = true;
  // Called before the engine connects to a worker address it holds no
  // endpoint for; an error refuses the address. Lets a server vet untrusted
  // addresses (UCX does not validate them). `failed_before` is true when the
  // last endpoint to the address failed: its process may be gone, and UCX
  // 1.13 leaks the socket of every endpoint it fails to create to a dead
  // peer (connection refused), so a cached verdict must not be reused.
  std::function<absl::Status(const std::string& worker_address, bool same_host,
                             bool failed_before)>
      check_address;
  // UCX network devices (UCX_NET_DEVICES syntax, e.g. "lo"); empty keeps
  // UCX_NET_DEVICES from the environment, or every device. A node serving
  // loopback only passes "lo" so its UCX interfaces listen on no other one.
  std::string net_devices;
  // Most endpoints cached at once (0: no limit). Beyond it, idle endpoints
  // nobody holds are closed, oldest first; if none is idle, Connect fails
  // with RESOURCE_EXHAUSTED instead of running the process out of fds.
  size_t max_peers = 0;
  // Receive and drop every tagged message no posted receive matches. Only for
  // a side that posts each receive before its peer may send (the node: it
  // posts a publish's receives before sending the pull request): there every
  // unexpected message is stray or hostile, and UCX would otherwise keep it
  // in memory for ever.
  bool discard_unexpected_messages = false;
};

class Engine;
class Peer;
class PullServer;
struct SendGroup;  // tagged sends counted to completion (tagged.cc)
struct AmReply;    // active_message.h
struct AmCallSpec; // active_message.h
class AmRequest;   // active_message.h

// A registered range of local memory. Unregistered on destruction; the memory
// itself stays the caller's (or the engine's, for Allocate).
class MemoryRegion {
 public:
  ~MemoryRegion();
  MemoryRegion(const MemoryRegion&) = delete;
  MemoryRegion& operator=(const MemoryRegion&) = delete;

  uint8_t* data() const { return static_cast<uint8_t*>(base_); }
  size_t size() const { return length_; }
  // The remote key a peer unpacks to reach this memory.
  const std::string& packed_rkey() const { return packed_rkey_; }

 private:
  friend class Engine;
  MemoryRegion() = default;
  void* context_ = nullptr;  // ucp_context_h
  void* memh_ = nullptr;     // ucp_mem_h
  void* base_ = nullptr;
  size_t length_ = 0;
  bool owns_mapping_ = false;
  std::string packed_rkey_;
};

// A peer's memory key, unpacked for one endpoint.
class RemoteKey {
 public:
  ~RemoteKey();
  RemoteKey(const RemoteKey&) = delete;
  RemoteKey& operator=(const RemoteKey&) = delete;

 private:
  friend class Peer;
  RemoteKey() = default;
  void* rkey_ = nullptr;  // ucp_rkey_h
};

// One local buffer <-> one range of a peer's memory.
struct RmaOp {
  uint8_t* local = nullptr;
  uint64_t remote_address = 0;
  size_t length = 0;
  const RemoteKey* rkey = nullptr;
};

// One local buffer -> one tagged message to a peer (Peer::Send).
struct SendOp {
  const uint8_t* data = nullptr;
  size_t length = 0;
  uint64_t tag = 0;
};

// One tagged message from any peer -> one local buffer (Engine::PostReceives).
struct ReceiveOp {
  uint8_t* buffer = nullptr;
  size_t length = 0;
  uint64_t tag = 0;
};

// Tag of the pull request for a transfer with base tag `tag_base` (its block i
// travels with tag tag_base + i, i < 0x8000).
inline uint64_t PullTag(uint64_t tag_base) { return tag_base | 0xffff; }
// Tag of message `message` of a coalesced transfer: its blocks travel back to
// back, CoalescedBlocksPerMessage at a time, in request order.
inline uint64_t CoalescedTag(uint64_t tag_base, size_t message) {
  return tag_base + 0x8000 + message;
}
// Largest coalesced message: half of UCX 1.13's eager limit on TCP with the
// engine's 1 MiB segments (ucx_info: eager zcopy up to 1 MiB, rendezvous
// from there), so over TCP a coalesced message never needs the rendezvous
// handshake that the small blocks it carries did not need either. On shared
// memory every message over 8 KiB goes by rendezvous (one CMA copy) anyway.
inline constexpr size_t kMaxCoalescedMessageBytes = 512 << 10;
// Blocks of `block_bytes` per coalesced message (at least one).
inline size_t CoalescedBlocksPerMessage(size_t block_bytes) {
  return block_bytes == 0 || block_bytes >= kMaxCoalescedMessageBytes
             ? 1
             : kMaxCoalescedMessageBytes / block_bytes;
}
// First u16 of a pull request that wants its blocks as one coalesced message
// (tag CoalescedTag) instead of one message per block; the indices follow.
inline constexpr uint16_t kCoalescedPullMarker = 0xffff;

// Receives posted ahead of the messages that fill them. Destroying the batch
// cancels what has not arrived and waits until UCX lets go of every buffer.
class ReceiveBatch {
 public:
  ~ReceiveBatch();
  ReceiveBatch(const ReceiveBatch&) = delete;
  ReceiveBatch& operator=(const ReceiveBatch&) = delete;

  // Waits until every receive with `expected[i]` set has completed; returns
  // the bytes received per op (0 for ops not expected). Cancels the others.
  absl::StatusOr<std::vector<size_t>> Wait(const std::vector<bool>& expected, absl::Time deadline);

  // Waits for receive `index` alone: its byte count once it has completed
  // without error; nullopt at the deadline, on an error, or once Interrupt()
  // was called. Lets a caller work on blocks that have landed while the rest
  // are still arriving.
  std::optional<size_t> WaitOne(size_t index, absl::Time deadline);
  // Ends every WaitOne, now and later (e.g. once the sender has replied).
  void Interrupt();

  struct State;

 private:
  friend class Engine;
  ReceiveBatch() = default;
  Engine* engine_ = nullptr;
  bool wait_on_destroy_ = true;
  std::vector<void*> requests_;
  std::shared_ptr<State> state_;
};

// A pull being served (Engine::ServePull). Destroying it cancels a pull that
// never came and waits for the sends of one that did.
class PullServer {
 public:
  ~PullServer();
  PullServer(const PullServer&) = delete;
  PullServer& operator=(const PullServer&) = delete;
  // Waits until the pull has arrived and every block it asked for was sent.
  absl::Status Wait(absl::Time deadline);

  struct State;

 private:
  friend class Engine;
  PullServer() = default;
  Engine* engine_ = nullptr;
  void* request_ = nullptr;  // the pending receive of the pull request
  std::shared_ptr<State> state_;
};

// An endpoint to one peer worker. Obtained from Engine::Connect and shared by
// every transfer to that peer. Once the peer fails (dies, times out) every call
// returns UNAVAILABLE and the engine replaces it on the next Connect.
class Peer {
 public:
  ~Peer();
  Peer(const Peer&) = delete;
  Peer& operator=(const Peer&) = delete;

  absl::StatusOr<std::unique_ptr<RemoteKey>> UnpackRkey(std::string_view packed);

  // Reads every op's remote range into its local buffer (ucp_get_nbx), or
  // writes every local buffer to its remote range (ucp_put_nbx); the batch is
  // completed by one flush. Returns OK once all bytes have arrived. On an error
  // or at the deadline the peer is marked failed; `keep_alive` is then held
  // until UCX has released the local buffers, so memory it guards is never
  // written after this returns and is freed.
  absl::Status Get(absl::Span<const RmaOp> ops, absl::Time deadline,
                   std::shared_ptr<void> keep_alive = nullptr);
  absl::Status Put(absl::Span<const RmaOp> ops, absl::Time deadline,
                   std::shared_ptr<void> keep_alive = nullptr);

  // Sends each op as one tagged message (eager or rendezvous, as UCX finds
  // best: on shared memory the receiver copies once with CMA; on TCP it is
  // about twice as fast as put). Returns once UCX is done with every local
  // buffer; the peer then holds the data or a receive for it failed there.
  // At the deadline on a shared-memory peer (which UCX 1.13 can neither
  // detect dead nor cancel sends to), `keep_alive` is let go at once: see
  // the comment in tagged.cc.
  absl::Status Send(absl::Span<const SendOp> ops, absl::Time deadline,
                    std::shared_ptr<void> keep_alive = nullptr);
  // Sends the blocks back to back as coalesced messages of
  // `blocks_per_message` blocks each, message k with tag
  // CoalescedTag(tag_base, k) (a UCX IOV datatype: nothing is copied to join
  // them; the blocks' own tags are ignored). For batches of small blocks,
  // where one message per block costs more than its bytes. Same completion
  // and deadline rules as Send.
  absl::Status SendCoalesced(absl::Span<const SendOp> blocks, uint64_t tag_base,
                             size_t blocks_per_message, absl::Time deadline,
                             std::shared_ptr<void> keep_alive = nullptr);

  // One request over UCX active messages (active_message.h): sends `header`
  // (at most Engine::max_am_header_bytes()) and the bytes of `data` (gathered,
  // IOV) to the peer's request handler and waits for its reply. Returns once
  // the reply has arrived and UCX is done with `data`; at the deadline the
  // peer is marked failed (as for every transfer) and DEADLINE_EXCEEDED
  // returned, and a late reply is dropped.
  absl::StatusOr<AmReply> Call(std::string_view header, absl::Span<const SendOp> data,
                               absl::Time deadline);
  // Several calls in flight at once (posted in order, then waited for): the
  // peer works on one while this side receives another. One result each.
  std::vector<absl::StatusOr<AmReply>> CallMany(absl::Span<const AmCallSpec> calls,
                                                absl::Time deadline);

  // UCX transport that carries this endpoint's bulk (RMA) traffic, e.g. "tcp",
  // "cma", "posix", "rc_mlx5"; several joined by ',' when UCX splits lanes.
  const std::string& transport() const { return transport_; }
  // Completes every operation posted so far on this endpoint.
  absl::Status Flush(absl::Time deadline) { return Transfer(false, {}, deadline, nullptr); }
  bool failed() const { return failed_.load(std::memory_order_acquire); }
  void* endpoint() const { return ep_; }  // ucp_ep_h, for this library's internals
  Engine& engine() const { return *engine_; }

 private:
  friend class Engine;
  Peer() = default;
  // Posts sends through `post` into one group, then waits for all of them.
  absl::Status SendAndWait(const std::function<void(const std::shared_ptr<SendGroup>&)>& post,
                           absl::Time deadline, std::shared_ptr<void> keep_alive);
  absl::Status Transfer(bool write, absl::Span<const RmaOp> ops, absl::Time deadline,
                        std::shared_ptr<void> keep_alive);
  // Marks the peer failed and drops it from the engine's cache, so its
  // endpoint is force-closed as soon as the last transfer lets go of it
  // (which fails whatever UCX still holds and releases its memory) instead
  // of at the next Connect.
  void MarkFailed();
  void Touch();
  bool IdleLongerThan(absl::Duration idle) const;

  Engine* engine_ = nullptr;
  void* ep_ = nullptr;  // ucp_ep_h
  std::string transport_;
  std::atomic<bool> failed_{false};
  std::atomic<int64_t> last_used_ns_{0};
  // UCP_ERR_HANDLING_MODE_PEER: UCX fails what is in flight when the endpoint
  // is force-closed. False for shared-memory peers (MODE_NONE).
  bool detects_failure_ = true;
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const EngineOptions& options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // This worker's address: what a peer needs to connect to it.
  const std::string& worker_address() const { return worker_address_; }

  // Registers caller-owned [addr, addr + length) for remote access.
  absl::StatusOr<std::unique_ptr<MemoryRegion>> Register(void* addr, size_t length);
  // Maps `length` bytes of anonymous memory (huge pages advised) and registers it.
  absl::StatusOr<std::unique_ptr<MemoryRegion>> Allocate(size_t length);

  // Endpoint to the worker at `worker_address`: cached, replaced once failed.
  // `same_host` peers may use shared memory (posix/sysv/cma), whose UCX 1.13
  // transports cannot detect a dead peer, so those endpoints rely on
  // deadlines alone; other peers get UCX's peer-failure detection (which
  // excludes shared memory). The first connect waits for UCX's wire-up.
  absl::StatusOr<std::shared_ptr<Peer>> Connect(std::string_view worker_address, bool same_host,
                                                absl::Time deadline);

  // Identifies this host (hostname and boot id): peers that report the same id
  // may use shared memory.
  static const std::string& HostId();
  // Whether this engine's transports include shared memory. A client tells
  // the node its HostId only when this is true.
  bool shared_memory_enabled() const { return shared_memory_enabled_; }

  // Posts one tagged receive per op (tags must be unique among pending
  // receives); peers fill them with Peer::Send. `keep_alive` is held until
  // UCX has released every buffer.
  // `buffers_in_keep_alive`: every op's buffer lives in `keep_alive`, so
  // destroying the batch need not wait for UCX to let go of them (a receive
  // half-filled by a same-host peer that died never completes in UCX 1.13).
  absl::StatusOr<std::unique_ptr<ReceiveBatch>> PostReceives(
      absl::Span<const ReceiveOp> ops, std::shared_ptr<void> keep_alive = nullptr,
      bool buffers_in_keep_alive = false);

  // The sending side of a node-driven pull: waits for the pull request the
  // node sends with tag PullTag(tag_base) (the indices it wants, u16 each) and
  // answers by sending blocks[i] with tag tag_base + i to `to`, or, when the
  // request starts with kCoalescedPullMarker, the wanted blocks coalesced
  // (Peer::SendCoalesced, CoalescedBlocksPerMessage of blocks[0]'s length per
  // message). `to` may belong to another engine: the request is received on
  // this engine's worker, the blocks go from `to`'s. Returns at once.
  absl::StatusOr<std::unique_ptr<PullServer>> ServePull(std::shared_ptr<Peer> to, uint64_t tag_base,
                                                        std::vector<SendOp> blocks);
  // A fresh 64-bit value for building unique tags (never 0).
  uint64_t NextTagBase();
  // Stray tagged messages received and dropped (discard_unexpected_messages).
  uint64_t discarded_messages() const;

  // Closes every cached endpoint and waits (up to 5 s) until UCX has failed
  // what was in flight on them, so memory they used can be released.
  void ClosePeers();

  // Largest header an active message may carry on this worker (0: none).
  size_t max_am_header_bytes() const { return max_am_header_bytes_; }

  // Transports of the live endpoints, deduplicated ("tcp", "cma", ...).
  std::vector<std::string> ActiveTransports();

  class Impl;

 private:
  friend class Peer;
  friend void ServeActiveMessages(Engine& engine,
                                  std::function<void(std::shared_ptr<AmRequest>)> handler);
  friend class ReceiveBatch;
  friend class PullServer;
  Engine() = default;
  std::unique_ptr<Impl> impl_;
  std::string worker_address_;
  bool shared_memory_enabled_ = false;
  size_t max_am_header_bytes_ = 0;
};

}  // namespace kvstrata::transfer
