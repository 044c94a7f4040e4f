// kvstrata client library: publish, look up and fetch prefix-hashed KV blocks.
//
//   auto client = Client::Connect({.node_address = "127.0.0.1:50151"});
//   auto ns = (*client)->OpenNamespace(spec);             // fixes the block size
//   auto buffer = (*client)->Allocate(n * ns->block_bytes()); // registered memory
//   std::vector<BlockKey> keys = ns->Keys(prompt_tokens);  // one per full block
//   ns->Publish({{keys[0], std::nullopt, buffer.get(), 0}, ...});
//   size_t cached = *ns->Lookup(keys);                    // longest stored prefix
//   ns->Fetch({{keys[0], buffer.get(), 0}, ...});          // bytes land in buffer
//
// Bulk bytes never pass through this library: the node reads published blocks
// from, and writes fetched blocks into, memory registered here (Allocate or
// Register), over UCX (shared memory on one host, TCP or RDMA across hosts).
//
// Errors: absl::Status with gRPC's codes. A node that is down or unreachable
// gives UNAVAILABLE (or DEADLINE_EXCEEDED) within the call's timeout. A miss is
// not an error: it is a per-block outcome.
//
// Thread safety: Client and Namespace are safe for concurrent use. Buffers
// must outlive every call that names them, and must not be written while a
// publish reads them or read while a fetch fills them.
#pragma once

#include <cstdint>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "kvstrata/common/block_key.h"

namespace kvstrata::v1 {
class NamespaceSpec;
class StatsResponse;
}  // namespace kvstrata::v1
namespace kvstrata::transfer {
class Engine;
class DeviceMemory;
}  // namespace kvstrata::transfer

namespace kvstrata::client {

struct ClientOptions {
  std::string node_address = "127.0.0.1:50151";
  // Timeout of each call that does not give its own.
  absl::Duration timeout = absl::Seconds(30);
  // UCX transports (UCX_TLS syntax); empty: UCX_TLS or UCX's own choice.
  std::string ucx_transports;
  // Check every fetched block against the checksum the node stored with it.
  bool verify_checksums = true;
  // How the node moves bytes: tagged UCX messages (the default: the node
  // pulls published blocks and pushes fetched ones into receives posted here;
  // fastest on TCP and shared memory, see bench/transfer_bench) or RMA get/put
  // on this client's memory keys (only nodes run with --allow_client_rkeys).
  enum class TransferMethod { kTagged, kRma };
  TransferMethod transfer_method = TransferMethod::kTagged;
  // gRPC over TLS when set: PEM file of the CA that signed the node's
  // certificate; certificate and key files add a client certificate (mTLS).
  std::string tls_ca_file;
  std::string tls_cert_file;
  std::string tls_key_file;
  // Bearer token for nodes run with --auth_file, sent with every call. Empty:
  // the KVSTRATA_TOKEN environment variable, if set (so the C and Python
  // bindings, the CLI and engine connectors pick it up without code).
  std::string auth_token;
  // Tagged transfers of small blocks (up to 16 KiB) carry a call's blocks in
  // a few UCX messages (512 KiB each at most) instead of one message per
  // block, when the node supports it and is not reached over shared memory.
  // Off only to compare the two (bench/coalesce_bench).
  bool coalesce_small_blocks = true;

  // GPU memory (Register/Allocate with MemoryKind::kDevice). The device its
  // buffers live on; null: the CUDA runtime's device `cuda_device`, opened
  // on the first device buffer (an error then in a build without CUDA or on
  // a machine without that GPU). Tests inject the host-memory double here.
  std::shared_ptr<transfer::DeviceMemory> device;
  int cuda_device = 0;
  // Device blocks travel through pinned host memory registered with UCX
  // once (transfer::StagingPool; Debian's UCX has no CUDA transports): a
  // publish copies its device blocks down before the node pulls them, a
  // fetch receives them there and copies them up. A batch that finds the
  // pool full stages through memory of its own (slower, counted in
  // Client::DeviceStaging).
  uint64_t device_staging_bytes = 64ull << 20;
  uint64_t device_staging_chunk_bytes = 256ull << 10;  // lease and copy granularity
  // Fetches into device buffers from a node on this host with an HBM tier
  // map its HBM arena (CUDA IPC, once per client, if the node offers it)
  // and copy HBM blocks device-to-device; other blocks stage as above. Such
  // blocks are not checksummed here (their bytes never reach the host; the
  // node verified them on ingest and pins them during the copy).
  bool device_ipc = true;
  // Small Lookup/Publish/Fetch calls (up to 64 keys; up to 4 MiB of blocks,
  // in requests of about 512 KiB and at most the node's fast_path_max_blocks
  // each, in flight together) go as UCX active messages, one each way per
  // request, instead of a gRPC call plus UCX transfers, when the node offers it
  // (docs/ARCHITECTURE.md §3, "Fast path"). Any fast-path failure falls back
  // to gRPC within the same deadline. Off only to compare the two.
  bool fast_path = true;
};

// Where a buffer's bytes are: host memory, or the memory of the client's GPU
// (ClientOptions::device), which host code must not touch.
enum class MemoryKind { kHost, kDevice };

// Per-block outcome of Publish and Fetch.
enum class BlockOutcome {
  kOk,                // Publish: stored. Fetch: bytes are in the buffer (and verified).
  kAlreadyPresent,    // Publish: stored before; no bytes moved.
  kNotFound,          // Fetch: not cached (recompute it).
  kChecksumMismatch,  // bytes did not match their checksum; nothing stored / do not use
  kNoSpace,           // Publish: the node could not make room.
  kTransferFailed,
  kRejected,          // Publish: not storable in the namespace's format (NaN/Inf under quantization)
};
const char* BlockOutcomeName(BlockOutcome outcome);

// Memory registered for transfers: either the caller's (Register) or owned (Allocate).
class Buffer {
 public:
  virtual ~Buffer() = default;
  virtual uint8_t* data() const = 0;  // a device address for kDevice
  virtual size_t size() const = 0;
  virtual MemoryKind kind() const { return MemoryKind::kHost; }
};

// Counters of a client's device staging (Client::DeviceStaging).
struct DeviceStagingCounters {
  uint64_t capacity_bytes = 0;
  uint64_t leased_bytes = 0;    // held by transfers now
  uint64_t staged_blocks = 0;   // device blocks moved through staging so far
  uint64_t fallback_blocks = 0; // of which through memory of their own (pool full)
  // Same-host CUDA IPC (ClientOptions::device_ipc): whether the node's HBM
  // arena is mapped here, and blocks fetched device-to-device through it.
  bool cuda_ipc = false;
  uint64_t ipc_blocks = 0;
};

struct PublishItem {
  BlockKey key;
  std::optional<BlockKey> parent;  // the previous block of the prompt; none for the first
  const Buffer* buffer = nullptr;
  size_t offset = 0;  // the block is buffer[offset, offset + block_bytes)
};

struct FetchItem {
  BlockKey key;
  Buffer* buffer = nullptr;
  size_t offset = 0;  // the block lands in buffer[offset, offset + block_bytes)
};
// A namespace with a quantized stored format (NamespaceSpec.format) gets back
// fewer bytes than block_bytes: the encoded block, which
// kvstrata/client/quantized.h decodes.

// How the node stored a fetched block (NamespaceSpec.format, or coarser when
// the namespace's precision budget, NamespaceSpec.coarsest_format, let the
// node transcode it under pressure). Values are v1::StoredFormat's.
enum class StoredFormat : uint8_t { kRaw = 0, kFp8E4m3 = 1, kInt8 = 2, kInt4Kivi = 3, kInt2Kivi = 4 };

struct TransferResult {
  std::vector<BlockOutcome> outcomes;  // one per item, same order
  // Fetch: the bytes each kOk block filled (block_bytes, or less for a
  // quantized stored format); 0 for other outcomes, and for Publish.
  std::vector<uint64_t> sizes;
  // Fetch: each kOk block's stored format at the node (kRaw otherwise, and
  // for Publish). A namespace opened raw with a KV layout gets transcoded
  // blocks decoded in place by the library: sizes[i] is then block_bytes and
  // formats[i] says how lossy the bytes are (kernels/README.md has each
  // format's error bound). A block that does not decode is kChecksumMismatch.
  std::vector<StoredFormat> formats;
  uint64_t bytes = 0;                  // bytes moved
  size_t count(BlockOutcome outcome) const;
};

// Where a stored block lives on its node. An NVMe block is read back into
// DRAM by the Fetch that asks for it, so it costs a disk read once.
enum class Tier { kHbm, kDram, kNvme };

struct LookupResult {
  size_t prefix_length = 0;  // keys[0..prefix_length) are stored
  // The tier of each key in the prefix (single-node Lookup; empty from a
  // cluster, where the prefix spans nodes).
  std::vector<Tier> tiers;
};

class Client;

// A namespace opened on the node: one model, KV layout and stored format.
// Cheap to copy; must not outlive the Client that opened it.
class Namespace {
 public:
  uint64_t id() const { return id_; }
  uint64_t block_bytes() const { return block_bytes_; }
  uint32_t tokens_per_block() const { return tokens_per_block_; }

  // Keys of every full block of `tokens` (DESIGN.md §3), chained from `parent`.
  std::vector<BlockKey> Keys(absl::Span<const uint32_t> tokens,
                             const BlockKey& parent = BlockKey{}) const;

  // Longest stored prefix of `keys` (any number; sent in batches of 4096).
  absl::StatusOr<LookupResult> Lookup(absl::Span<const BlockKey> keys,
                                      std::optional<absl::Duration> timeout = std::nullopt);

  // Publishes blocks from registered memory. Batches over the node's
  // per-request limit (1024 blocks, fewer on a small node: at most an eighth
  // of its DRAM tier by default) are split and sent one after another, in
  // order. The call-level status is an error only when
  // nothing could be attempted (bad input, node down); per-block outcomes
  // say what happened to each block.
  absl::StatusOr<TransferResult> Publish(absl::Span<const PublishItem> items,
                                         std::optional<absl::Duration> timeout = std::nullopt);
  std::future<absl::StatusOr<TransferResult>> PublishAsync(
      std::vector<PublishItem> items, std::optional<absl::Duration> timeout = std::nullopt);

  // Fetches blocks into registered memory; misses are kNotFound.
  absl::StatusOr<TransferResult> Fetch(absl::Span<const FetchItem> items,
                                       std::optional<absl::Duration> timeout = std::nullopt);
  std::future<absl::StatusOr<TransferResult>> FetchAsync(
      std::vector<FetchItem> items, std::optional<absl::Duration> timeout = std::nullopt);

  // Removes blocks; returns how many were stored.
  absl::StatusOr<size_t> Delete(absl::Span<const BlockKey> keys,
                                std::optional<absl::Duration> timeout = std::nullopt);

  // Tells the node that the engine finished the request whose prompt ended
  // with `last_key` (its last published block), generating `output_tokens`
  // tokens. A hint for the node's eviction policies (how long the output was
  // says something about whether the conversation comes back); it stores and
  // removes nothing. True when the node holds that block. An engine should
  // log a failed hint and go on: the cache works without it.
  absl::StatusOr<bool> RequestFinished(const BlockKey& last_key, uint32_t output_tokens,
                                       std::optional<absl::Duration> timeout = std::nullopt);

  // Closes this OpenNamespace on the node. The node forgets the namespace
  // (its slot counts against the tenant's namespace quota) once every open
  // of it, by any client, was closed: closing never ends another client's
  // use. Blocks stay until evicted; OpenNamespace with the same spec finds
  // them again. This object is unusable afterwards.
  absl::Status Close(std::optional<absl::Duration> timeout = std::nullopt);

 private:
  friend class Client;
  Namespace(Client* client, uint64_t id, uint64_t block_bytes, uint32_t tokens_per_block,
            uint32_t max_publish_blocks)
      : client_(client),
        id_(id),
        block_bytes_(block_bytes),
        tokens_per_block_(tokens_per_block),
        max_publish_blocks_(max_publish_blocks) {}
  void DecodeTranscoded(absl::Span<const FetchItem> items, uint64_t block_bytes,
                        TransferResult& result);
  // Fetch without the CUDA IPC pass (every block through the node's UCX).
  absl::StatusOr<TransferResult> FetchThroughNode(absl::Span<const FetchItem> items,
                                                  std::optional<absl::Duration> timeout);
  // Device items from HBM by CUDA IPC, the rest by FetchThroughNode
  // (src/device_ipc.cc).
  absl::StatusOr<TransferResult> FetchWithDeviceIpc(absl::Span<const FetchItem> items,
                                                    std::optional<absl::Duration> timeout);
  // The gRPC control path (the fast path's fallback, and for large calls).
  absl::StatusOr<TransferResult> PublishOverGrpc(absl::Span<const PublishItem> items,
                                                 absl::Time deadline);
  absl::StatusOr<TransferResult> FetchOverGrpc(absl::Span<const FetchItem> items,
                                               absl::Time deadline);
  Client* client_;
  uint64_t id_;
  uint64_t block_bytes_;
  bool decode_to_raw_ = false;  // raw with a layout: decode transcoded blocks
  uint32_t tokens_per_block_;
  // Blocks per Publish request the node accepts (its share limit).
  uint32_t max_publish_blocks_;
};

class Client {
 public:
  // Connects lazily: this fails only on bad options or UCX setup; the first
  // call finds out whether the node answers.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(const ClientOptions& options);
  ~Client();

  absl::StatusOr<Namespace> OpenNamespace(const v1::NamespaceSpec& spec,
                                          std::optional<absl::Duration> timeout = std::nullopt);

  // Registers caller-owned memory [data, data + size) for transfers. For
  // kDevice, memory of ClientOptions::device (a cudaMalloc'd pointer, a
  // torch tensor's data_ptr): checked here, so a host or foreign pointer is
  // INVALID_ARGUMENT now rather than a failed transfer later. Device
  // buffers take tagged transfers only (the default TransferMethod) and
  // may be mixed with host buffers in one batch.
  absl::StatusOr<std::unique_ptr<Buffer>> Register(void* data, size_t size,
                                                   MemoryKind kind = MemoryKind::kHost);
  // Allocates and registers `size` bytes (kDevice: on the client's GPU).
  absl::StatusOr<std::unique_ptr<Buffer>> Allocate(size_t size,
                                                   MemoryKind kind = MemoryKind::kHost);
  // The device staging's counters (zero before the first device buffer).
  DeviceStagingCounters DeviceStaging() const;

  // The node's counters (include kvstrata.pb.h to read them).
  absl::Status Stats(v1::StatsResponse* out, std::optional<absl::Duration> timeout = std::nullopt);
  // True when the node answers Health within the timeout.
  absl::Status Ping(std::optional<absl::Duration> timeout = std::nullopt);

  class Impl;
  Impl& impl() { return *impl_; }

 private:
  friend absl::StatusOr<std::unique_ptr<Client>> ConnectSharingEngine(
      const ClientOptions& options, std::shared_ptr<transfer::Engine> engine);
  explicit Client(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvstrata::client
