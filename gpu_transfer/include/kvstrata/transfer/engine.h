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
#include <memory>
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
};

class Engine;
class Peer;

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

  // UCX transport that carries this endpoint's bulk (RMA) traffic, e.g. "tcp",
  // "cma", "posix", "rc_mlx5"; several joined by ',' when UCX splits lanes.
  const std::string& transport() const { return transport_; }
  bool failed() const { return failed_.load(std::memory_order_acquire); }

 private:
  friend class Engine;
  Peer() = default;
  absl::Status Transfer(bool write, absl::Span<const RmaOp> ops, absl::Time deadline,
                        std::shared_ptr<void> keep_alive);
  void MarkFailed() { failed_.store(true, std::memory_order_release); }

  Engine* engine_ = nullptr;
  void* ep_ = nullptr;  // ucp_ep_h
  std::string transport_;
  std::atomic<bool> failed_{false};
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
  absl::StatusOr<std::shared_ptr<Peer>> Connect(std::string_view worker_address);

  // Transports of the live endpoints, deduplicated ("tcp", "cma", ...).
  std::vector<std::string> ActiveTransports();

  class Impl;

 private:
  friend class Peer;
  Engine() = default;
  std::unique_ptr<Impl> impl_;
  std::string worker_address_;
};

}  // namespace kvstrata::transfer
