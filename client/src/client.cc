#include <grpcpp/support/client_interceptor.h>

#include <algorithm>
#include <cstring>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <memory>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "client_impl.h"
#include "fast_path.h"
#include "kvstrata/client/quantized.h"
#include "kvstrata/common/files.h"
#include "kvstrata/common/limits.h"

namespace kvstrata::client {
namespace {

class RegisteredBuffer final : public Buffer {
 public:
  explicit RegisteredBuffer(std::unique_ptr<transfer::MemoryRegion> region)
      : region_(std::move(region)) {}
  uint8_t* data() const override { return region_->data(); }
  size_t size() const override { return region_->size(); }
  const transfer::MemoryRegion& region() const { return *region_; }

 private:
  std::unique_ptr<transfer::MemoryRegion> region_;
};

// Adds the caller's bearer token to every call of a channel, so no call site
// can forget it (a Cluster's node clients included).
class BearerTokenInterceptor final : public grpc::experimental::Interceptor {
 public:
  explicit BearerTokenInterceptor(const std::string* header) : header_(header) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->emplace("authorization", *header_);
    }
    methods->Proceed();
  }

 private:
  const std::string* header_;
};

class BearerTokenFactory final : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit BearerTokenFactory(std::string token) : header_("Bearer " + std::move(token)) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo*) override {
    return new BearerTokenInterceptor(&header_);
  }

 private:
  const std::string header_;  // lives as long as the channel, which owns the factory
};

void SetDeadline(grpc::ClientContext& context, absl::Duration timeout) {
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
}


// Adds the buffer's region to `endpoint` once and returns its index.
class RegionTable {
 public:
  RegionTable(v1::TransferEndpoint* endpoint, bool with_rkeys)
      : endpoint_(endpoint), with_rkeys_(with_rkeys) {}
  absl::StatusOr<uint32_t> IndexOf(const Buffer* buffer) {
    auto it = index_.find(buffer);
    if (it != index_.end()) return it->second;
    auto* registered = dynamic_cast<const RegisteredBuffer*>(buffer);
    auto* device = dynamic_cast<const DeviceBuffer*>(buffer);
    if (registered == nullptr && device == nullptr) {
      return absl::InvalidArgumentError("buffer was not registered by this client");
    }
    if (device != nullptr && with_rkeys_) {
      // RMA would hand the node a key to memory UCX cannot reach here.
      return absl::InvalidArgumentError(
          "device buffers take tagged transfers (TransferMethod::kTagged, the default)");
    }
    if (index_.size() >= limits::kMaxRegions) {
      return absl::InvalidArgumentError(
          absl::StrCat("one batch may use at most ", limits::kMaxRegions, " buffers"));
    }
    // A device buffer's region only bounds its offsets at the node: tagged
    // transfers never address it (its blocks move through staging).
    v1::MemoryRegion* region = endpoint_->add_regions();
    region->set_base_address(reinterpret_cast<uint64_t>(buffer->data()));
    region->set_length(buffer->size());
    if (with_rkeys_) region->set_packed_rkey(registered->region().packed_rkey());
    const uint32_t index = static_cast<uint32_t>(index_.size());
    index_.emplace(buffer, index);
    return index;
  }

 private:
  v1::TransferEndpoint* endpoint_;
  const bool with_rkeys_;  // only RMA transfers hand the node memory keys
  absl::flat_hash_map<const Buffer*, uint32_t> index_;
};

absl::Status CheckRange(const Buffer* buffer, size_t offset, uint64_t block_bytes) {
  if (buffer == nullptr) return absl::InvalidArgumentError("block without a buffer");
  if (offset > buffer->size() || block_bytes > buffer->size() - offset) {
    return absl::OutOfRangeError(absl::StrCat("block at offset ", offset, " of ", block_bytes,
                                              " bytes overruns its buffer of ", buffer->size()));
  }
  return absl::OkStatus();
}

// Blocks up to this size travel coalesced over TCP, a call's blocks in a few
// UCX messages, instead of one message each. Measured at batch 32 with calls
// of both kinds interleaved on one node (bench/coalesce_bench): 16 KiB blocks
// were 14-19% faster coalesced, publish and fetch; at 64 KiB coalescing was
// even (p10) or slower (p50), the staging copy it adds at the receiver
// costing what the messages it saves did.
constexpr uint64_t kCoalesceMaxBlockBytes = 16 << 10;

// What a tagged transfer keeps alive next to its RPC.
struct TaggedSide {
  // Host stand-ins of the batch's device blocks (null: none). First, so it
  // outlives the receives and the pull that use it.
  std::shared_ptr<StagedBlocks> staged;
  // fetch, coalesced: where the one message lands, unpacked after the reply.
  // Declared first, so the receives (which wait for UCX) go before it.
  std::shared_ptr<uint8_t[]> staging;
  std::unique_ptr<transfer::ReceiveBatch> receives;  // fetch: posted before the call
  std::unique_ptr<transfer::PullServer> pull;        // publish: answers the node's pull
  // fetch: checksums of blocks verified while the call was still in flight
  std::vector<std::optional<uint64_t>> checksums;
};

// Where item i's bytes are on the host: its buffer, or its staging when the
// buffer is on the device.
template <typename Item>
uint8_t* HostAt(const StagedBlocks* staged, const Item& item, size_t i) {
  if (staged != nullptr && staged->host[i] != nullptr) return staged->host[i];
  return const_cast<uint8_t*>(item.buffer->data()) + item.offset;
}

// The device address of each item (null for host items), for staging.
template <typename Item>
std::vector<uint8_t*> DeviceAddresses(absl::Span<const Item> slice) {
  std::vector<uint8_t*> device(slice.size(), nullptr);
  for (size_t i = 0; i < slice.size(); ++i) {
    if (slice[i].buffer->kind() == MemoryKind::kDevice) {
      device[i] = const_cast<uint8_t*>(slice[i].buffer->data()) + slice[i].offset;
    }
  }
  return device;
}

// Runs `call` over consecutive slices of at most `batch_size` items and joins
// the results: concurrently (gRPC's callback API, no thread per call), or
// `in_order`, each after the previous one finished. Publishes go in order:
// the node then commits a prompt's blocks parents first, as one request
// would, so its eviction order (and a prefix's survival) does not depend on
// how a large publish was split.
// Each block's stored format from a fetch reply (older nodes send none: raw).
void AppendFormats(const v1::FetchResponse& response, size_t blocks, TransferResult* result) {
  for (size_t i = 0; i < blocks; ++i) {
    const int f = static_cast<int>(i) < response.format_size() ? response.format(static_cast<int>(i)) : 0;
    const bool ok = result->outcomes.size() >= blocks &&
                    result->outcomes[result->outcomes.size() - blocks + i] == BlockOutcome::kOk;
    result->formats.push_back(ok && f >= 0 && f <= 4 ? static_cast<StoredFormat>(f) : StoredFormat::kRaw);
  }
}

// A coalesced fetch's messages: the hits back to back in request order,
// each response.size(i) bytes, CoalescedBlocksPerMessage hits per message
// (message k lands at staging + k x per_message x block_bytes). Copies each
// hit into its destination and checks its checksum there, while the copy is
// still in cache; a mismatch fails that block only.
absl::Status UnpackCoalesced(absl::Span<const FetchItem> slice, const v1::FetchResponse& response,
                             transfer::ReceiveBatch& receives, const uint8_t* staging,
                             const StagedBlocks* staged, uint64_t block_bytes, bool verify,
                             absl::Time deadline, TransferResult* result) {
  const size_t per_message = transfer::CoalescedBlocksPerMessage(block_bytes);
  const size_t messages = (slice.size() + per_message - 1) / per_message;
  std::vector<uint64_t> expected_bytes(messages, 0);
  size_t hits = 0;
  for (size_t i = 0; i < slice.size(); ++i) {
    if (response.status(i) != v1::BLOCK_OK) continue;
    if (response.size(i) > block_bytes) {
      return absl::InternalError("node answered a block larger than its destination");
    }
    expected_bytes[hits++ / per_message] += response.size(i);
  }
  std::vector<bool> expected(messages);
  for (size_t k = 0; k < messages; ++k) expected[k] = k * per_message < hits;
  absl::StatusOr<std::vector<size_t>> received = receives.Wait(expected, deadline);
  if (!received.ok()) return received.status();
  size_t hit = 0;
  uint64_t offset = 0;  // within the current message
  for (size_t i = 0; i < slice.size(); ++i) {
    BlockOutcome outcome = FromWire(response.status(i));
    if (outcome == BlockOutcome::kOk) {
      const size_t message = hit / per_message;
      if (hit % per_message == 0) offset = 0;
      const uint64_t size = response.size(i);
      if ((*received)[message] != expected_bytes[message]) {
        outcome = BlockOutcome::kTransferFailed;
      } else {
        uint8_t* destination = HostAt(staged, slice[i], i);
        std::memcpy(destination, staging + message * per_message * block_bytes + offset, size);
        if (verify && BlockChecksum(destination, size) != response.checksum(i)) {
          outcome = BlockOutcome::kChecksumMismatch;
        }
      }
      offset += size;
      ++hit;
    }
    result->outcomes.push_back(outcome);
    result->sizes.push_back(outcome == BlockOutcome::kOk ? response.size(i) : 0);
  }
  result->bytes += response.bytes_transferred();
  return absl::OkStatus();
}

template <typename Item, typename Request, typename Response>
absl::StatusOr<TransferResult> RunBatches(
    absl::Span<const Item> items, absl::Duration timeout, size_t batch_size, bool in_order,
    const std::function<absl::Status(absl::Span<const Item>, Request*, TaggedSide*)>& build,
    const std::function<void(grpc::ClientContext*, const Request*, Response*,
                             std::function<void(grpc::Status)>)>& call,
    const std::function<absl::Status(absl::Span<const Item>, const Response&, TaggedSide&,
                                     absl::Time, TransferResult*)>& collect,
    const std::function<void(absl::Span<const Item>, TaggedSide&, absl::Time)>& overlap = nullptr) {
  TransferResult result;
  if (items.empty()) return result;
  struct Batch {
    grpc::ClientContext context;
    Request request;
    Response response;
    std::promise<grpc::Status> done;
    TaggedSide tagged;
  };
  const absl::Time deadline = absl::Now() + timeout;
  std::vector<std::unique_ptr<Batch>> batches;
  for (size_t start = 0; start < items.size(); start += batch_size) {
    auto batch = std::make_unique<Batch>();
    absl::Status built = build(items.subspan(start, batch_size), &batch->request, &batch->tagged);
    if (!built.ok()) return built;
    batch->context.set_deadline(absl::ToChronoTime(deadline));
    batches.push_back(std::move(batch));
  }
  std::vector<std::future<grpc::Status>> pending;
  for (auto& batch : batches) {
    pending.push_back(batch->done.get_future());
    Batch* b = batch.get();
    call(&b->context, &b->request, &b->response, [b](grpc::Status s) {
      if (b->tagged.receives != nullptr) b->tagged.receives->Interrupt();
      b->done.set_value(s);
    });
    if (in_order) pending.back().wait();
  }
  absl::Status first_error;
  for (size_t i = 0; i < batches.size(); ++i) {
    const auto slice = items.subspan(i * batch_size, batch_size);
    if (overlap) overlap(slice, batches[i]->tagged, deadline);  // while the call is in flight
    grpc::Status status = pending[i].get();
    if (!status.ok()) {
      if (first_error.ok()) first_error = FromGrpc(status);
      result.outcomes.insert(result.outcomes.end(), slice.size(), BlockOutcome::kTransferFailed);
      result.sizes.resize(result.outcomes.size(), 0);
      result.formats.resize(result.outcomes.size(), StoredFormat::kRaw);
      continue;
    }
    const size_t before = result.outcomes.size();
    absl::Status collected =
        collect(slice, batches[i]->response, batches[i]->tagged, deadline, &result);
    if (!collected.ok()) {
      if (first_error.ok()) first_error = collected;
      result.outcomes.resize(before);
      result.outcomes.insert(result.outcomes.end(), slice.size(), BlockOutcome::kTransferFailed);
      result.sizes.resize(before);
      result.formats.resize(before);
    }
    result.sizes.resize(result.outcomes.size(), 0);  // Publish collects no sizes
    result.formats.resize(result.outcomes.size(), StoredFormat::kRaw);
  }
  // One batch: its error is the call's error. Several: report per block,
  // unless every batch failed.
  if (!first_error.ok() && (batches.size() == 1 || result.count(BlockOutcome::kTransferFailed) ==
                                                       result.outcomes.size())) {
    return first_error;
  }
  return result;
}

}  // namespace

BlockOutcome FromWire(v1::BlockStatus status) {
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

size_t Client::Impl::CoalescedBlocks(uint64_t block_bytes) {
  if (options.transfer_method != ClientOptions::TransferMethod::kTagged ||
      !options.coalesce_small_blocks || block_bytes == 0 ||
      block_bytes > kCoalesceMaxBlockBytes) {
    return 0;
  }
  absl::MutexLock lock(&mu);
  // Not to a node on this host over shared memory: there UCX 1.13 sends a
  // message over 8 KiB by rendezvous, and an IOV one stalled for ~4 ms in
  // most calls (16 KiB x 32: p50 4.0 ms coalesced, 0.5 ms one message per
  // block, coalesce_bench), while each block alone is one CMA copy.
  if (engine->shared_memory_enabled() && node_host_id == transfer::Engine::HostId()) return 0;
  return std::min<uint64_t>(max_coalesced_bytes / block_bytes, limits::kMaxTransferBlocks);
}

absl::Status FromGrpc(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

const char* BlockOutcomeName(BlockOutcome outcome) {
  switch (outcome) {
    case BlockOutcome::kOk:
      return "ok";
    case BlockOutcome::kAlreadyPresent:
      return "already_present";
    case BlockOutcome::kNotFound:
      return "not_found";
    case BlockOutcome::kChecksumMismatch:
      return "checksum_mismatch";
    case BlockOutcome::kNoSpace:
      return "no_space";
    case BlockOutcome::kTransferFailed:
      return "transfer_failed";
    case BlockOutcome::kRejected:
      return "rejected";
  }
  return "?";
}

size_t TransferResult::count(BlockOutcome outcome) const {
  return std::count(outcomes.begin(), outcomes.end(), outcome);
}

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(const ClientOptions& options) {
  absl::StatusOr<std::unique_ptr<transfer::Engine>> engine =
      transfer::Engine::Create({.transports = options.ucx_transports});
  if (!engine.ok()) return engine.status();
  return ConnectSharingEngine(options, *std::move(engine));
}

absl::StatusOr<std::unique_ptr<Client>> ConnectSharingEngine(
    const ClientOptions& options, std::shared_ptr<transfer::Engine> engine) {
  auto impl = std::make_unique<Client::Impl>();
  impl->options = options;
  impl->engine = std::move(engine);
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(limits::kMaxGrpcMessageBytes);
  args.SetMaxSendMessageSize(limits::kMaxGrpcMessageBytes);
  // Reconnect quickly after a node restart instead of backing off for minutes.
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (!options.tls_ca_file.empty()) {
    const auto read = ReadFileToString;
    grpc::SslCredentialsOptions ssl;
    absl::StatusOr<std::string> ca = read(options.tls_ca_file);
    if (!ca.ok()) return ca.status();
    ssl.pem_root_certs = *ca;
    if (!options.tls_cert_file.empty()) {
      absl::StatusOr<std::string> cert = read(options.tls_cert_file);
      if (!cert.ok()) return cert.status();
      absl::StatusOr<std::string> key = read(options.tls_key_file);
      if (!key.ok()) return key.status();
      ssl.pem_cert_chain = *cert;
      ssl.pem_private_key = *key;
    }
    credentials = grpc::SslCredentials(ssl);
  }
  std::string token = options.auth_token;
  if (token.empty()) {
    const char* from_env = std::getenv("KVSTRATA_TOKEN");
    if (from_env != nullptr) token = from_env;
  }
  if (token.empty()) {
    impl->channel = grpc::CreateCustomChannel(options.node_address, credentials, args);
  } else {
    if (token.find_first_of("\r\n") != std::string::npos) {
      return absl::InvalidArgumentError("an auth token cannot contain line breaks");
    }
    std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> factories;
    factories.push_back(std::make_unique<BearerTokenFactory>(std::move(token)));
    impl->channel = grpc::experimental::CreateCustomChannelWithInterceptors(
        options.node_address, credentials, args, std::move(factories));
  }
  impl->stub = v1::CacheNode::NewStub(impl->channel);
  impl->device = std::make_unique<DeviceStager>(impl->options, impl->engine.get());
  impl->ipc = std::make_unique<DeviceIpcPath>();
  return std::unique_ptr<Client>(new Client(std::move(impl)));
}

Client::Client(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::~Client() = default;

absl::StatusOr<Namespace> Client::OpenNamespace(const v1::NamespaceSpec& spec,
                                                std::optional<absl::Duration> timeout) {
  grpc::ClientContext context;
  SetDeadline(context, impl_->Timeout(timeout));
  v1::OpenNamespaceRequest request;
  *request.mutable_spec() = spec;
  v1::OpenNamespaceResponse response;
  absl::Status status = FromGrpc(impl_->stub->OpenNamespace(&context, request, &response));
  if (!status.ok()) return status;
  impl_->SetNodeWorker(response.worker_address(), response.host_id(), response.tag_prefix(),
                       std::min<uint64_t>(response.max_coalesced_bytes(), limits::kMaxCoalescedBytes));
  std::optional<Client::Impl::FastGrant> grant;
  if (!response.fast_path_capability().empty()) {
    grant = Client::Impl::FastGrant{.capability = response.fast_path_capability(),
                                    .max_blocks = response.fast_path_max_blocks(),
                                    .max_bytes = response.fast_path_max_bytes()};
  }
  impl_->SetFastGrant(response.namespace_id(), std::move(grant));
  // A node that does not say (older ones) takes a full batch.
  const uint32_t max_publish_blocks =
      response.max_publish_blocks() == 0
          ? static_cast<uint32_t>(limits::kMaxTransferBlocks)
          : std::min<uint32_t>(response.max_publish_blocks(), limits::kMaxTransferBlocks);
  Namespace ns(this, response.namespace_id(), response.block_bytes(), spec.tokens_per_block(),
               max_publish_blocks);
  // Blocks of a raw namespace come back encoded only when a precision tier
  // transcoded them; the library decodes those (quantized namespaces leave
  // decoding to the caller, who may do it on the GPU).
  ns.decode_to_raw_ = spec.format() == v1::FORMAT_RAW && spec.num_layers() != 0;
  return ns;
}

std::unique_ptr<Buffer> WrapRegion(std::unique_ptr<transfer::MemoryRegion> region) {
  return std::make_unique<RegisteredBuffer>(std::move(region));
}

absl::StatusOr<std::unique_ptr<Buffer>> Client::Register(void* data, size_t size,
                                                         MemoryKind kind) {
  if (kind == MemoryKind::kDevice) return impl_->device->Register(data, size);
  absl::StatusOr<std::unique_ptr<transfer::MemoryRegion>> region =
      impl_->engine->Register(data, size);
  if (!region.ok()) return region.status();
  return WrapRegion(*std::move(region));
}

absl::StatusOr<std::unique_ptr<Buffer>> Client::Allocate(size_t size, MemoryKind kind) {
  if (kind == MemoryKind::kDevice) return impl_->device->Allocate(size);
  absl::StatusOr<std::unique_ptr<transfer::MemoryRegion>> region = impl_->engine->Allocate(size);
  if (!region.ok()) return region.status();
  return WrapRegion(*std::move(region));
}

DeviceStagingCounters Client::DeviceStaging() const {
  DeviceStagingCounters counters = impl_->device->counters();
  impl_->ipc->AddCounters(counters);
  return counters;
}

absl::Status Client::Stats(v1::StatsResponse* out, std::optional<absl::Duration> timeout) {
  grpc::ClientContext context;
  SetDeadline(context, impl_->Timeout(timeout));
  return FromGrpc(impl_->stub->Stats(&context, v1::StatsRequest(), out));
}

absl::Status Client::Ping(std::optional<absl::Duration> timeout) {
  grpc::ClientContext context;
  SetDeadline(context, impl_->Timeout(timeout));
  v1::HealthResponse response;
  absl::Status status = FromGrpc(impl_->stub->Health(&context, v1::HealthRequest(), &response));
  if (status.ok() && !response.serving()) return absl::UnavailableError("node is not serving");
  return status;
}

std::vector<BlockKey> Namespace::Keys(absl::Span<const uint32_t> tokens,
                                      const BlockKey& parent) const {
  return ComputeBlockKeys(id_, tokens, tokens_per_block_, parent);
}

absl::StatusOr<LookupResult> Namespace::Lookup(absl::Span<const BlockKey> keys,
                                               std::optional<absl::Duration> timeout) {
  LookupResult result;
  const absl::Time deadline = absl::Now() + client_->impl().Timeout(timeout);
  if (auto fast = FastLookup(client_->impl(), id_, block_bytes_, keys, deadline)) return *fast;
  for (size_t start = 0; start < keys.size(); start += limits::kMaxLookupKeys) {
    const auto slice = keys.subspan(start, limits::kMaxLookupKeys);
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(deadline));
    v1::LookupRequest request;
    request.set_namespace_id(id_);
    for (const BlockKey& key : slice) request.add_keys(std::string(key.view()));
    v1::LookupResponse response;
    absl::Status status = FromGrpc(client_->impl().stub->Lookup(&context, request, &response));
    if (!status.ok()) return status;
    result.prefix_length += response.prefix_length();
    for (int tier : response.tiers()) {
      result.tiers.push_back(tier == v1::TIER_NVME  ? Tier::kNvme
                             : tier == v1::TIER_HBM ? Tier::kHbm
                                                    : Tier::kDram);
    }
    if (response.prefix_length() < slice.size()) break;  // the prefix ends in this slice
  }
  return result;
}

absl::StatusOr<TransferResult> Namespace::Publish(absl::Span<const PublishItem> items,
                                                  std::optional<absl::Duration> timeout) {
  const absl::Time deadline = absl::Now() + client_->impl().Timeout(timeout);
  FastOutcome fast =
      FastPublish(client_->impl(), id_, block_bytes_, items, max_publish_blocks_, deadline);
  if (fast.result.has_value()) return *std::move(fast.result);
  return PublishOverGrpc(items, deadline);
}

absl::StatusOr<TransferResult> Namespace::PublishOverGrpc(absl::Span<const PublishItem> items,
                                                          absl::Time deadline) {
  Client::Impl& impl = client_->impl();
  const uint64_t block_bytes = block_bytes_;
  const uint64_t ns = id_;
  const bool tagged = impl.options.transfer_method == ClientOptions::TransferMethod::kTagged;
  const absl::Duration timeout = std::max(deadline - absl::Now(), absl::ZeroDuration());
  // A single block is one message either way; coalescing would only add the
  // staging copy (16 KiB x 1 over TCP: 0.79-0.99x, coalesce_bench).
  const size_t coalesced_blocks = items.size() > 1 ? impl.CoalescedBlocks(block_bytes) : 0;
  const size_t batch_size = coalesced_blocks > 0
                                ? std::min<size_t>(max_publish_blocks_, coalesced_blocks)
                                : max_publish_blocks_;
  return RunBatches<PublishItem, v1::PublishRequest, v1::PublishResponse>(
      items, timeout, batch_size, /*in_order=*/true,
      [&](absl::Span<const PublishItem> slice, v1::PublishRequest* request,
          TaggedSide* side) -> absl::Status {
        request->set_namespace_id(ns);
        v1::TransferEndpoint* source = request->mutable_source();
        source->set_worker_address(impl.engine->worker_address());
        if (impl.engine->shared_memory_enabled()) source->set_host_id(transfer::Engine::HostId());
        RegionTable regions(source, !tagged);
        for (const PublishItem& item : slice) {
          if (absl::Status s = CheckRange(item.buffer, item.offset, block_bytes); !s.ok()) return s;
        }
        // Device blocks come down into staging first: the checksum and the
        // node's pull read them there.
        absl::StatusOr<std::shared_ptr<StagedBlocks>> staged =
            impl.device->Stage(DeviceAddresses(slice), block_bytes);
        if (!staged.ok()) return staged.status();
        side->staged = *std::move(staged);
        if (side->staged != nullptr) {
          if (absl::Status s = impl.device->CopyDown(*side->staged, block_bytes); !s.ok()) return s;
        }
        for (size_t i = 0; i < slice.size(); ++i) {
          const PublishItem& item = slice[i];
          absl::StatusOr<uint32_t> region = regions.IndexOf(item.buffer);
          if (!region.ok()) return region.status();
          v1::PublishBlock* block = request->add_blocks();
          block->set_key(std::string(item.key.view()));
          if (item.parent.has_value()) block->set_parent(std::string(item.parent->view()));
          block->set_region(*region);
          block->set_offset(item.offset);
          block->set_size(block_bytes);
          block->set_checksum(BlockChecksum(HostAt(side->staged.get(), item, i), block_bytes));
        }
        if (tagged) {
          absl::StatusOr<std::shared_ptr<transfer::Peer>> node = impl.PublishPeer(deadline);
          if (!node.ok()) return node.status();
          const uint64_t tag_base = impl.PublishTagBase();
          request->set_tag_base(tag_base);
          // The node then pulls every block it wants as one message.
          request->set_coalesced(coalesced_blocks > 0);
          std::vector<transfer::SendOp> sends;
          sends.reserve(slice.size());
          for (size_t i = 0; i < slice.size(); ++i) {
            sends.push_back({HostAt(side->staged.get(), slice[i], i), block_bytes, 0});
          }
          absl::StatusOr<std::unique_ptr<transfer::PullServer>> pull =
              impl.engine->ServePull(*std::move(node), tag_base, std::move(sends));
          if (!pull.ok()) return pull.status();
          side->pull = *std::move(pull);
        }
        return absl::OkStatus();
      },
      [&](grpc::ClientContext* context, const v1::PublishRequest* request,
          v1::PublishResponse* response, std::function<void(grpc::Status)> done) {
        impl.stub->async()->Publish(context, request, response, std::move(done));
      },
      [](absl::Span<const PublishItem> slice, const v1::PublishResponse& response, TaggedSide& side,
         absl::Time deadline, TransferResult* result) -> absl::Status {
        if (static_cast<size_t>(response.status_size()) != slice.size()) {
          return absl::InternalError("node answered a different number of blocks");
        }
        const bool pulled =
            std::count(response.status().begin(), response.status().end(), v1::BLOCK_OK) +
                std::count(response.status().begin(), response.status().end(),
                           v1::BLOCK_CHECKSUM_MISMATCH) >
            0;
        if (side.pull != nullptr && pulled) {
          // The node replied after receiving everything; this only reaps the sends.
          if (absl::Status s = side.pull->Wait(deadline); !s.ok()) return s;
        }
        for (int s : response.status()) result->outcomes.push_back(FromWire(v1::BlockStatus(s)));
        result->bytes += response.bytes_transferred();
        return absl::OkStatus();
      });
}

std::future<absl::StatusOr<TransferResult>> Namespace::PublishAsync(
    std::vector<PublishItem> items, std::optional<absl::Duration> timeout) {
  // A copy of the handle, not `this`: the caller's Namespace may be a temporary.
  return std::async(std::launch::async, [self = *this, items = std::move(items), timeout]() mutable {
    return self.Publish(items, timeout);
  });
}

namespace {

// A fetch batch's reply: waits for its blocks, checks them where they landed
// on the host (the caller's buffer, or staging for a device buffer) and
// appends one outcome, size and format per item.
absl::Status CollectFetch(absl::Span<const FetchItem> slice, const v1::FetchResponse& response,
                          TaggedSide& side, absl::Time deadline, bool verify, uint64_t block_bytes,
                          TransferResult* result) {
    transfer::ReceiveBatch* receives = side.receives.get();
    if (static_cast<size_t>(response.status_size()) != slice.size() ||
        response.size_size() != response.status_size() ||
        response.checksum_size() != response.status_size()) {
      return absl::InternalError("node answered a different number of blocks");
    }
    if (side.staging != nullptr) {
      absl::Status unpacked = UnpackCoalesced(slice, response, *receives, side.staging.get(),
                                              side.staged.get(), block_bytes, verify, deadline,
                                              result);
      if (unpacked.ok()) AppendFormats(response, slice.size(), result);
      return unpacked;
    }
    std::vector<size_t> received;
    if (receives != nullptr) {
      std::vector<bool> expected(slice.size());
      for (size_t i = 0; i < slice.size(); ++i)
        expected[i] = response.status(i) == v1::BLOCK_OK;
      absl::StatusOr<std::vector<size_t>> waited = receives->Wait(expected, deadline);
      if (!waited.ok()) return waited.status();
      received = *std::move(waited);
    }
    for (size_t i = 0; i < slice.size(); ++i) {
      BlockOutcome outcome = FromWire(response.status(i));
      if (outcome == BlockOutcome::kOk && receives != nullptr &&
          received[i] != response.size(i)) {
        outcome = BlockOutcome::kTransferFailed;
      }
      if (outcome == BlockOutcome::kOk && verify) {
        const bool early = i < side.checksums.size() && side.checksums[i].has_value();
        const uint64_t checksum =
            early ? *side.checksums[i]
                  : BlockChecksum(HostAt(side.staged.get(), slice[i], i), response.size(i));
        if (checksum != response.checksum(i)) outcome = BlockOutcome::kChecksumMismatch;
      }
      result->outcomes.push_back(outcome);
      result->sizes.push_back(outcome == BlockOutcome::kOk ? response.size(i) : 0);
    }
    result->bytes += response.bytes_transferred();
    AppendFormats(response, slice.size(), result);
    return absl::OkStatus();
  
}

// The device items of a collected batch (outcomes from `first` on): decodes
// transcoded ones in staging (where host code may touch them), then copies
// every good one up in one stream. A failed copy fails those blocks, never
// the others; a device block whose copy did not finish is never kOk.
void FinishDeviceBlocks(DeviceStager& device, const StagedBlocks& staged, uint64_t block_bytes,
                        bool decode_to_raw, size_t first, TransferResult& result) {
  std::vector<uint64_t> sizes(staged.device.size(), 0);
  std::vector<uint8_t> encoded;
  for (size_t i = 0; i < staged.device.size(); ++i) {
    const size_t r = first + i;
    if (staged.device[i] == nullptr || result.outcomes[r] != BlockOutcome::kOk) continue;
    if (decode_to_raw && result.formats[r] != StoredFormat::kRaw) {
      uint8_t* at = staged.host[i];
      encoded.assign(at, at + result.sizes[r]);
      if (!DequantizeBlock(encoded.data(), encoded.size(), at, block_bytes).ok()) {
        result.outcomes[r] = BlockOutcome::kChecksumMismatch;  // damaged: never served as KV
        result.sizes[r] = 0;
        continue;
      }
      result.sizes[r] = block_bytes;
    }
    sizes[i] = result.sizes[r];
  }
  if (device.CopyUp(staged, sizes).ok()) return;
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] == 0) continue;
    result.outcomes[first + i] = BlockOutcome::kTransferFailed;
    result.sizes[first + i] = 0;
  }
}

}  // namespace

absl::StatusOr<TransferResult> Namespace::Fetch(absl::Span<const FetchItem> items,
                                                std::optional<absl::Duration> timeout) {
  const absl::Time deadline = absl::Now() + client_->impl().Timeout(timeout);
  FastOutcome fast = FastFetch(client_->impl(), id_, block_bytes_, items, deadline);
  if (!fast.result.has_value()) return FetchOverGrpc(items, deadline);
  if (!fast.result->ok() || fast.grpc_items.empty()) return *std::move(fast.result);
  // Blocks the node holds on NVMe only: gRPC reads them on a thread of its own.
  TransferResult& result = **fast.result;
  std::vector<FetchItem> rest;
  for (size_t i : fast.grpc_items) rest.push_back(items[i]);
  absl::StatusOr<TransferResult> slow = FetchOverGrpc(rest, deadline);
  if (!slow.ok()) return result;  // those stay kTransferFailed
  for (size_t k = 0; k < fast.grpc_items.size(); ++k) {
    result.outcomes[fast.grpc_items[k]] = slow->outcomes[k];
    result.sizes[fast.grpc_items[k]] = slow->sizes[k];
  }
  result.bytes += slow->bytes;
  return result;
}

absl::StatusOr<TransferResult> Namespace::FetchOverGrpc(absl::Span<const FetchItem> items,
                                                        absl::Time deadline) {
  const absl::Duration timeout = std::max(deadline - absl::Now(), absl::ZeroDuration());
  Client::Impl& impl = client_->impl();
  if (impl.options.device_ipc && impl.ipc != nullptr &&
      std::any_of(items.begin(), items.end(), [](const FetchItem& item) {
        return item.buffer != nullptr && item.buffer->kind() == MemoryKind::kDevice;
      })) {
    return FetchWithDeviceIpc(items, timeout);
  }
  return FetchThroughNode(items, timeout);
}

absl::StatusOr<TransferResult> Namespace::FetchThroughNode(absl::Span<const FetchItem> items,
                                                           std::optional<absl::Duration> timeout) {
  Client::Impl& impl = client_->impl();
  const uint64_t block_bytes = block_bytes_;
  const uint64_t ns = id_;
  const bool verify = impl.options.verify_checksums;
  const bool tagged = impl.options.transfer_method == ClientOptions::TransferMethod::kTagged;
  const size_t coalesced_blocks = items.size() > 1 ? impl.CoalescedBlocks(block_bytes) : 0;
  const bool coalesced = coalesced_blocks > 0;
  absl::StatusOr<TransferResult> fetched = RunBatches<FetchItem, v1::FetchRequest, v1::FetchResponse>(
      items, impl.Timeout(timeout), coalesced ? coalesced_blocks : limits::kMaxTransferBlocks,
      /*in_order=*/false,
      [&](absl::Span<const FetchItem> slice, v1::FetchRequest* request,
          TaggedSide* side) -> absl::Status {
        request->set_namespace_id(ns);
        v1::TransferEndpoint* destination = request->mutable_destination();
        destination->set_worker_address(impl.engine->worker_address());
        if (impl.engine->shared_memory_enabled()) {
          destination->set_host_id(transfer::Engine::HostId());
        }
        RegionTable regions(destination, !tagged);
        for (const FetchItem& item : slice) {
          if (absl::Status s = CheckRange(item.buffer, item.offset, block_bytes); !s.ok()) return s;
        }
        // Device blocks land in staging and go up after their checksums.
        absl::StatusOr<std::shared_ptr<StagedBlocks>> staged =
            impl.device->Stage(DeviceAddresses(slice), block_bytes);
        if (!staged.ok()) return staged.status();
        side->staged = *std::move(staged);
        for (const FetchItem& item : slice) {
          absl::StatusOr<uint32_t> region = regions.IndexOf(item.buffer);
          if (!region.ok()) return region.status();
          v1::FetchBlock* block = request->add_blocks();
          block->set_key(std::string(item.key.view()));
          block->set_region(*region);
          block->set_offset(item.offset);
          block->set_capacity(block_bytes);
        }
        if (tagged && coalesced) {
          // One receive for every block; the node packs the hits back to back.
          const uint64_t tag_base = impl.engine->NextTagBase();
          request->set_tag_base(tag_base);
          request->set_coalesced(true);
          side->staging = std::shared_ptr<uint8_t[]>(new uint8_t[slice.size() * block_bytes]);
          const size_t per_message = transfer::CoalescedBlocksPerMessage(block_bytes);
          std::vector<transfer::ReceiveOp> ops;
          for (size_t start = 0; start < slice.size(); start += per_message) {
            const size_t blocks = std::min(per_message, slice.size() - start);
            ops.push_back({side->staging.get() + start * block_bytes, blocks * block_bytes,
                           transfer::CoalescedTag(tag_base, ops.size())});
          }
          absl::StatusOr<std::unique_ptr<transfer::ReceiveBatch>> posted =
              impl.engine->PostReceives(ops, side->staging);
          if (!posted.ok()) return posted.status();
          side->receives = *std::move(posted);
        } else if (tagged) {
          const uint64_t tag_base = impl.engine->NextTagBase();
          request->set_tag_base(tag_base);
          std::vector<transfer::ReceiveOp> ops;
          ops.reserve(slice.size());
          for (size_t i = 0; i < slice.size(); ++i) {
            ops.push_back({HostAt(side->staged.get(), slice[i], i), block_bytes, tag_base + i});
          }
          // The staging stays leased until UCX lets go of the receives, so a
          // late block never lands in memory lent to another transfer.
          absl::StatusOr<std::unique_ptr<transfer::ReceiveBatch>> posted =
              impl.engine->PostReceives(ops, side->staged);
          if (!posted.ok()) return posted.status();
          side->receives = *std::move(posted);
        }
        return absl::OkStatus();
      },
      [&](grpc::ClientContext* context, const v1::FetchRequest* request,
          v1::FetchResponse* response, std::function<void(grpc::Status)> done) {
        impl.stub->async()->Fetch(context, request, response, std::move(done));
      },
      [&impl, verify, block_bytes, decode = decode_to_raw_](
          absl::Span<const FetchItem> slice, const v1::FetchResponse& response, TaggedSide& side,
          absl::Time deadline, TransferResult* result) -> absl::Status {
        const size_t before = result->outcomes.size();
        absl::Status collected =
            CollectFetch(slice, response, side, deadline, verify, block_bytes, result);
        if (collected.ok() && side.staged != nullptr) {
          FinishDeviceBlocks(*impl.device, *side.staged, block_bytes, decode, before, *result);
        }
        return collected;
      },
      // Checksum blocks as they land, on this thread, while the UCX progress
      // thread receives the rest: copy and verification overlap on two cores.
      [verify, block_bytes](absl::Span<const FetchItem> slice, TaggedSide& side,
                            absl::Time deadline) {
        if (!verify || side.receives == nullptr || side.staging != nullptr) return;
        side.checksums.resize(slice.size());
        for (size_t i = 0; i < slice.size(); ++i) {
          std::optional<size_t> landed = side.receives->WaitOne(i, deadline);
          if (!landed.has_value()) return;  // the node replied (a miss), or trouble: finish later
          if (*landed == block_bytes) {
            side.checksums[i] = BlockChecksum(HostAt(side.staged.get(), slice[i], i), *landed);
          }
        }
      });
  if (fetched.ok() && decode_to_raw_) DecodeTranscoded(items, block_bytes, *fetched);
  return fetched;
}

// A raw namespace with a precision budget gets back some blocks the node
// transcoded coarser: decode them in place (after their checksums matched)
// so the caller always finds its dtype's layout, block_bytes of it.
void Namespace::DecodeTranscoded(absl::Span<const FetchItem> items, uint64_t block_bytes,
                                 TransferResult& result) {
  std::vector<uint8_t> encoded;
  for (size_t i = 0; i < result.outcomes.size() && i < items.size(); ++i) {
    if (result.outcomes[i] != BlockOutcome::kOk || result.formats[i] == StoredFormat::kRaw) continue;
    if (items[i].buffer->kind() == MemoryKind::kDevice) continue;  // decoded in staging
    uint8_t* at = items[i].buffer->data() + items[i].offset;
    encoded.assign(at, at + result.sizes[i]);  // decoding writes over where it lies
    if (!DequantizeBlock(encoded.data(), encoded.size(), at, block_bytes).ok()) {
      result.outcomes[i] = BlockOutcome::kChecksumMismatch;  // damaged: never served as KV
      result.sizes[i] = 0;
      continue;
    }
    result.sizes[i] = block_bytes;
  }
}

std::future<absl::StatusOr<TransferResult>> Namespace::FetchAsync(
    std::vector<FetchItem> items, std::optional<absl::Duration> timeout) {
  return std::async(std::launch::async, [self = *this, items = std::move(items), timeout]() mutable {
    return self.Fetch(items, timeout);
  });
}

absl::Status Namespace::Close(std::optional<absl::Duration> timeout) {
  grpc::ClientContext context;
  SetDeadline(context, client_->impl().Timeout(timeout));
  v1::CloseNamespaceRequest request;
  request.set_namespace_id(id_);
  if (std::optional<Client::Impl::FastGrant> grant = client_->impl().GetFastGrant(id_)) {
    request.set_fast_path_capability(grant->capability);
    client_->impl().SetFastGrant(id_, std::nullopt);
  }
  v1::CloseNamespaceResponse response;
  return FromGrpc(client_->impl().stub->CloseNamespace(&context, request, &response));
}

absl::StatusOr<size_t> Namespace::Delete(absl::Span<const BlockKey> keys,
                                         std::optional<absl::Duration> timeout) {
  size_t deleted = 0;
  for (size_t start = 0; start < keys.size(); start += limits::kMaxDeleteKeys) {
    grpc::ClientContext context;
    SetDeadline(context, client_->impl().Timeout(timeout));
    v1::DeleteRequest request;
    request.set_namespace_id(id_);
    for (const BlockKey& key : keys.subspan(start, limits::kMaxDeleteKeys)) {
      request.add_keys(std::string(key.view()));
    }
    v1::DeleteResponse response;
    absl::Status status = FromGrpc(client_->impl().stub->Delete(&context, request, &response));
    if (!status.ok()) return status;
    deleted += response.deleted();
  }
  return deleted;
}

absl::StatusOr<bool> Namespace::RequestFinished(const BlockKey& last_key, uint32_t output_tokens,
                                                std::optional<absl::Duration> timeout) {
  grpc::ClientContext context;
  SetDeadline(context, client_->impl().Timeout(timeout));
  v1::RequestFinishedRequest request;
  request.set_namespace_id(id_);
  request.set_last_key(std::string(last_key.view()));
  request.set_output_tokens(output_tokens);
  v1::RequestFinishedResponse response;
  absl::Status status =
      FromGrpc(client_->impl().stub->RequestFinished(&context, request, &response));
  if (!status.ok()) return status;
  return response.known();
}

}  // namespace kvstrata::client
