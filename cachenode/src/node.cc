#include "kvstrata/cachenode/node.h"

#include <grpcpp/grpcpp.h>
#include <grpcpp/resource_quota.h>
#include <sys/mman.h>
#include <sys/resource.h>

#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "kvstrata/common/files.h"
#include "kvstrata/common/limits.h"
#include "kvstrata/transfer/memory_types.h"
#include "kvstrata/common/log.h"
#include "absl/strings/match.h"
#include "auth.h"
#include "metrics.h"
#include "nvme/data_file.h"
#include "node_service.h"
#include "peer_check.h"
#include "precision_transcoder.h"

namespace kvstrata::cachenode {

// Members are declared in dependency order, so they are destroyed in reverse:
// the server stops first, then the tier, the arena registration and finally
// the UCX engine.
class Node::Impl {
 public:
  std::unique_ptr<PeerAddressChecker> address_checker;  // used by the engine
  std::unique_ptr<Authenticator> auth;                  // used by the service
  std::unique_ptr<transfer::Engine> engine;
  std::unique_ptr<transfer::MemoryRegion> arena;
  std::unique_ptr<HbmTier> hbm;  // its staging is registered with the engine
  transfer::DeviceAllocation arena_pin;  // the DRAM arena page-locked for GPU copies
  // Before the tiers: the transcoder reads the registry while they make room.
  std::unique_ptr<NamespaceRegistry> namespaces;
  std::unique_ptr<PrecisionTranscoder> transcoder;  // used by the DRAM tier
  std::unique_ptr<DramTier> dram;
  std::unique_ptr<NvmeTier> nvme;
  std::unique_ptr<TieredStore> store;
  std::unique_ptr<TenantLedger> ledger;
  std::thread recovery;
  std::thread auth_poller;  // reloads a changed auth file
  bool flush_on_shutdown = false;
  NodeCounters counters;
  std::unique_ptr<NodeMetrics> metrics;
  std::unique_ptr<NodeService> service;
  std::unique_ptr<grpc::Server> server;
  int port = 0;
  absl::Notification shutdown;

  // Writes every DRAM block to NVMe (least valuable first, in batches at the
  // tier's queue depth), so a clean restart loses nothing.
  void FlushDramToNvme() {
    const absl::Time start = absl::Now();
    std::vector<std::pair<BlockId, std::shared_ptr<StoredBlock>>> batch;
    size_t written = 0;
    auto write = [&] {
      for (const absl::Status& s : nvme->Write(batch)) written += s.ok() ? 1 : 0;
      batch.clear();
    };
    dram->Drain([&](const BlockId& id, std::shared_ptr<StoredBlock> block) {
      batch.emplace_back(id, std::move(block));
      if (batch.size() == 32) write();
    });
    write();
    nvme->Flush();
    KVS_LOG(Info) << "shutdown: " << written << " DRAM blocks on NVMe in "
                  << absl::ToDoubleMilliseconds(absl::Now() - start) << " ms";
  }

  // Writes every HBM block to NVMe through host memory, as DRAM's are.
  void FlushHbmToNvme() {
    std::vector<std::pair<BlockId, std::shared_ptr<StoredBlock>>> batch;
    size_t written = 0;
    auto write = [&] {
      for (const absl::Status& s : nvme->Write(batch)) written += s.ok() ? 1 : 0;
      batch.clear();
    };
    hbm->slabs().Drain([&](const BlockId& id, std::shared_ptr<StoredBlock> block) {
      uint8_t* heap = nvme::AllocateAligned(block->size()).release();
      if (heap == nullptr) return;
      auto host = std::make_shared<StoredBlock>(heap, block->size(), [heap] { nvme::AlignedFree()(heap); });
      if (!hbm->CopyToHost(*block, heap).ok()) return;
      host->checksum = block->checksum;
      host->parent = block->parent;
      host->has_parent = block->has_parent;
      batch.emplace_back(id, std::move(host));
      if (batch.size() == 32) write();
    });
    write();
    KVS_LOG(Info) << "shutdown: " << written << " HBM blocks on NVMe";
  }

  ~Impl() {
    if (server) server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    server.reset();
    service.reset();
    metrics.reset();
    if (recovery.joinable()) recovery.join();
    if (!shutdown.HasBeenNotified()) shutdown.Notify();
    if (auth_poller.joinable()) auth_poller.join();
    if (store != nullptr) store->StopPrefetch();
    if (nvme != nullptr && flush_on_shutdown && hbm != nullptr) FlushHbmToNvme();
    if (nvme != nullptr && flush_on_shutdown) FlushDramToNvme();
    store.reset();
    // Writes what is queued for NVMe: it reads DRAM chunks, so before the arena goes.
    nvme.reset();
    // Transfers abandoned at a deadline may still target the arena: end them
    // before it is unregistered and unmapped.
    if (engine) engine->ClosePeers();
    hbm.reset();
    arena_pin = transfer::DeviceAllocation();
    dram.reset();
  }
};

namespace {

constexpr char kLivenessService[] = "kvstrata.liveness";
// File descriptors kept for everything but client endpoints (RocksDB,
// io_uring, gRPC sockets, metrics); each UCX endpoint over TCP takes up to
// about 4 (measured: 2 per distinct client address on loopback, more with
// several lanes).
constexpr uint64_t kReservedFds = 256;
constexpr uint64_t kFdsPerEndpoint = 4;
// How often the auth file is checked for changes (Kubernetes propagates a
// Secret update within about a minute; this adds at most 10 s).
constexpr absl::Duration kAuthFilePollInterval = absl::Seconds(10);

// True for 127.x.y.z, [::1], localhost and unix sockets: addresses no other
// host can reach.
bool IsLoopbackListen(absl::string_view address) {
  if (absl::StartsWith(address, "unix:")) return true;
  absl::string_view host = address.substr(0, address.rfind(':'));
  return absl::StartsWith(host, "127.") || host == "[::1]" || host == "localhost";
}

// Raises the soft open-file limit to the hard one and returns how many UCX
// endpoints fit in it, so a flood of clients is refused before UCX runs out
// of descriptors (it aborts on EMFILE instead of failing).
size_t EndpointsForFdLimit() {
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0) return 1024;
  if (limit.rlim_cur < limit.rlim_max) {
    limit.rlim_cur = limit.rlim_max;
    setrlimit(RLIMIT_NOFILE, &limit);
    getrlimit(RLIMIT_NOFILE, &limit);
  }
  const uint64_t fds = limit.rlim_cur == RLIM_INFINITY ? (1u << 20) : limit.rlim_cur;
  return fds <= 2 * kReservedFds ? 16 : (fds - kReservedFds) / kFdsPerEndpoint;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(
    const NodeOptions& options) {
  if (options.tls_cert_file.empty() && options.tls_key_file.empty()) {
    if (!options.tls_client_ca_file.empty()) {
      return absl::InvalidArgumentError("a TLS client CA needs a TLS certificate and key");
    }
    return grpc::InsecureServerCredentials();
  }
  absl::StatusOr<std::string> cert = ReadFileToString(options.tls_cert_file);
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadFileToString(options.tls_key_file);
  if (!key.ok()) return key.status();
  grpc::SslServerCredentialsOptions ssl;
  ssl.pem_key_cert_pairs.push_back({*key, *cert});
  if (!options.tls_client_ca_file.empty()) {
    absl::StatusOr<std::string> ca = ReadFileToString(options.tls_client_ca_file);
    if (!ca.ok()) return ca.status();
    ssl.pem_root_certs = *ca;
    ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(ssl);
}

// The HBM tier on the GPU the options name, with the DRAM tier's slab size
// and policy; the DRAM arena is page-locked so copies to and from it are
// asynchronous (a failure there only makes them slower).
absl::Status StartHbm(const NodeOptions& options, Node::Impl& impl) {
  auto open = options.open_device ? options.open_device : transfer::OpenCudaDevice;
  absl::StatusOr<std::unique_ptr<transfer::DeviceMemory>> device = open(options.gpu_device);
  if (!device.ok()) {
    return absl::Status(device.status().code(),
                        absl::StrCat("--hbm_bytes needs GPU ", options.gpu_device, ": ",
                                     device.status().message()));
  }
  absl::StatusOr<std::unique_ptr<EvictionPolicy>> policy = MakeEvictionPolicy(options.eviction_policy);
  if (!policy.ok()) return policy.status();
  HbmTierOptions hbm{.capacity_bytes = options.hbm_bytes, .slab_bytes = options.slab_bytes};
  hbm.staging.bytes = std::max<uint64_t>(options.hbm_staging_bytes, hbm.staging.chunk_bytes);
  absl::StatusOr<std::unique_ptr<HbmTier>> tier =
      HbmTier::Create(*std::move(device), hbm, *std::move(policy), impl.engine.get());
  if (!tier.ok()) return tier.status();
  impl.hbm = *std::move(tier);
  absl::StatusOr<transfer::DeviceAllocation> pin =
      impl.hbm->device().PinHost(impl.arena->data(), impl.arena->size());
  if (pin.ok()) {
    impl.arena_pin = *std::move(pin);
  } else {
    KVS_LOG(Warning) << "HBM: cannot page-lock the DRAM arena (copies stay synchronous): "
                     << pin.status();
  }
  // Device memory reaches clients through staging either way (handing UCX
  // device memory directly is not built yet); say whether it could.
  absl::StatusOr<bool> ucx_cuda = transfer::UcxSupportsCudaMemory(options.ucx_transports);
  impl.hbm->set_ucx_cuda_memory(ucx_cuda.ok() && *ucx_cuda);
  KVS_LOG(Info) << "HBM tier: " << impl.hbm->slabs().capacity_bytes() << " bytes on "
                << impl.hbm->device().description() << "; transfers staged through "
                << options.hbm_staging_bytes << " bytes of pinned host memory (UCX "
                << (!ucx_cuda.ok() ? ucx_cuda.status().ToString()
                                   : *ucx_cuda ? "reports CUDA memory" : "has no CUDA memory support")
                << ")";
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Node>> Node::Start(const NodeOptions& options) {
  constexpr uint64_t kPage = 4096;
  if (options.slab_bytes == 0 || options.slab_bytes % kPage != 0) {
    return absl::InvalidArgumentError("slab size must be a positive multiple of 4 KiB");
  }
  if (options.dram_bytes < options.slab_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("DRAM tier of ", options.dram_bytes,
                                                   " bytes is smaller than one slab (",
                                                   options.slab_bytes, ")"));
  }
  auto impl = std::make_unique<Impl>();
  const bool loopback = IsLoopbackListen(options.listen_address);
  if (!options.auth_file.empty()) {
    absl::StatusOr<std::unique_ptr<Authenticator>> auth = Authenticator::Load(options.auth_file);
    if (!auth.ok()) return auth.status();
    impl->auth = *std::move(auth);
  } else if (!loopback) {
    if (!options.allow_unauthenticated) {
      return absl::FailedPreconditionError(absl::StrCat(
          "listening on ", options.listen_address,
          " without --auth_file lets anyone on the network read, overwrite and delete every "
          "tenant's blocks; give an --auth_file, or pass --allow_unauthenticated to accept that"));
    }
    KVS_LOG(Warning) << "serving " << options.listen_address
                     << " WITHOUT authentication (--allow_unauthenticated): any client can use "
                        "every tenant's blocks and drain this node";
  }
  if (options.allow_client_rkeys && !loopback) {
    // UCX 1.13 takes packed remote keys on trust: ucp_ep_rkey_unpack reads
    // whatever a malformed key says (random keys crashed the node), and no
    // API tells which process's memory a key opens. Nothing the node can
    // check makes client keys safe from untrusted callers, so they stay a
    // single-host, trusted-client feature.
    return absl::FailedPreconditionError(
        "--allow_client_rkeys needs a loopback --listen: UCX 1.13 cannot validate client memory "
        "keys, so only trusted clients on this host may send them");
  }
  impl->address_checker =
      std::make_unique<PeerAddressChecker>(options.ucx_transports, absl::Seconds(5));
  transfer::EngineOptions engine_options{.transports = options.ucx_transports,
                                         .tune_tcp = options.ucx_tune_tcp};
  engine_options.net_devices = options.ucx_net_devices;
  if (engine_options.net_devices.empty() && loopback && std::getenv("UCX_NET_DEVICES") == nullptr) {
    engine_options.net_devices = "lo";
  }
  const size_t fd_endpoints = EndpointsForFdLimit();
  engine_options.max_peers = options.max_ucx_endpoints == 0
                                 ? fd_endpoints
                                 : std::min(options.max_ucx_endpoints, fd_endpoints);
  engine_options.discard_unexpected_messages = true;
  if (options.check_peer_addresses) {
    engine_options.check_address = [checker = impl->address_checker.get()](
                                       const std::string& address, bool same_host,
                                       bool failed_before) {
      return checker->Check(address, same_host, failed_before);
    };
  }
  absl::StatusOr<std::unique_ptr<transfer::Engine>> engine =
      transfer::Engine::Create(engine_options);
  if (!engine.ok()) return engine.status();
  impl->engine = *std::move(engine);

  const uint64_t arena_bytes = options.dram_bytes / options.slab_bytes * options.slab_bytes;
  absl::StatusOr<std::unique_ptr<transfer::MemoryRegion>> arena =
      impl->engine->Allocate(arena_bytes);
  if (!arena.ok()) return arena.status();
  impl->arena = *std::move(arena);
  if (options.prefault) {
    std::memset(impl->arena->data(), 0, impl->arena->size());
  }

  absl::StatusOr<std::unique_ptr<EvictionPolicy>> policy =
      MakeEvictionPolicy(options.eviction_policy);
  if (!policy.ok()) return policy.status();
  impl->dram = std::make_unique<DramTier>(impl->arena->data(), arena_bytes, options.slab_bytes,
                                          *std::move(policy));
  if (!options.nvme.directories.empty()) {
    NvmeTierOptions nvme = options.nvme;
    if (nvme.write_queue_bytes == 0) nvme.write_queue_bytes = std::min<uint64_t>(arena_bytes / 4, uint64_t{256} << 20);
    absl::StatusOr<std::unique_ptr<NvmeTier>> tier = NvmeTier::Open(nvme);
    if (!tier.ok()) return tier.status();
    impl->nvme = *std::move(tier);
    impl->flush_on_shutdown = options.nvme_flush_on_shutdown;
  }
  if (options.hbm_bytes > 0) {
    if (absl::Status s = StartHbm(options, *impl); !s.ok()) return s;
  }
  impl->store = std::make_unique<TieredStore>(*impl->dram, impl->nvme.get(),
                                              options.nvme_prefetch_on_lookup, impl->hbm.get());
  impl->namespaces = std::make_unique<NamespaceRegistry>(options.slab_bytes);
  // Precision tiers: namespaces with a coarsest_format transcode before evicting.
  impl->transcoder = std::make_unique<PrecisionTranscoder>(*impl->namespaces);
  impl->dram->set_transcoder(impl->transcoder.get());
  // Quotas count HBM and DRAM (docs/ARCHITECTURE.md §4).
  impl->ledger = std::make_unique<TenantLedger>(*impl->store);
  impl->store->set_memory_residency_hook(
      [ledger = impl->ledger.get()](const BlockId& id, uint64_t size, bool resident) {
        ledger->OnResidency(id, size, resident);
      });
  if (!options.metrics_listen.empty()) {
    impl->metrics = std::make_unique<NodeMetrics>(impl->counters, *impl->store,
                                                  *impl->namespaces, *impl->ledger,
                                                  *impl->engine, impl->auth.get());
    if (absl::Status s = impl->metrics->Serve(options.metrics_listen); !s.ok()) return s;
  }
  impl->service = std::make_unique<NodeService>(
      *impl->namespaces, *impl->store, *impl->ledger, *impl->engine, impl->counters,
      impl->metrics.get(),
      NodeServiceOptions{.transfer_timeout = options.transfer_timeout,
                         .transfer_stall_timeout = options.transfer_stall_timeout,
                         .max_request_share = options.max_request_share,
                         .max_client_inflight_share = options.max_client_inflight_share,
                         .allow_client_rkeys = options.allow_client_rkeys,
                         .authenticator = impl->auth.get(),
                         .fast_path = options.fast_path,
                         .fast_path_buffer_bytes = options.fast_path_buffer_bytes});

  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials = ServerCredentials(options);
  if (!credentials.ok()) return credentials.status();
  // The standard grpc.health.v1 service, for Kubernetes gRPC probes.
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen_address, *credentials, &impl->port);
  builder.RegisterService(impl->service.get());
  builder.SetMaxReceiveMessageSize(limits::kMaxGrpcMessageBytes);
  builder.SetMaxSendMessageSize(limits::kMaxGrpcMessageBytes);
  // The synchronous server takes a thread per call; the quota caps them, and
  // gRPC answers calls beyond it with RESOURCE_EXHAUSTED.
  grpc::ResourceQuota quota("kvstrata-node");
  quota.SetMaxThreads(std::max(options.max_concurrent_calls, 4));
  builder.SetResourceQuota(quota);
  impl->server = builder.BuildAndStart();
  if (impl->server == nullptr || impl->port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen_address));
  }
  grpc::HealthCheckServiceInterface* health = impl->server->GetHealthCheckService();
  // "kvstrata.liveness" answers SERVING while the process works (liveness
  // probes); the overall status "" is readiness.
  if (health != nullptr) health->SetServingStatus(kLivenessService, true);
  if (impl->nvme != nullptr) {
    // Serve at once (DRAM works), but report not-ready until the NVMe index
    // is recovered, so orchestrators and clusters wait for it.
    if (health != nullptr) health->SetServingStatus("", false);
    impl->recovery = std::thread([nvme = impl->nvme.get(), health] {
      nvme->Recover();
      if (health != nullptr) health->SetServingStatus("", true);
    });
  }
  if (impl->auth != nullptr) {
    impl->auth_poller = std::thread([auth = impl->auth.get(), done = &impl->shutdown] {
      while (!done->WaitForNotificationWithTimeout(kAuthFilePollInterval)) auth->ReloadIfChanged();
    });
  }
  KVS_LOG(Info) << "kvstrata-node listening port=" << impl->port
                << " metrics_port=" << (impl->metrics ? impl->metrics->port() : 0) << " dram_bytes=" << arena_bytes
                << " slab_bytes=" << options.slab_bytes << " policy=" << options.eviction_policy
                << " auth=" << (impl->auth ? options.auth_file : "off")
                << " max_ucx_endpoints=" << engine_options.max_peers
                << " hbm_bytes=" << (impl->hbm ? impl->hbm->slabs().capacity_bytes() : 0);
  return std::unique_ptr<Node>(new Node(std::move(impl)));
}

Node::Node(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Node::~Node() = default;
int Node::port() const { return impl_->port; }
int Node::metrics_port() const { return impl_->metrics ? impl_->metrics->port() : 0; }
void Node::Wait() { impl_->shutdown.WaitForNotification(); }
absl::Status Node::ReloadAuth() {
  if (impl_->auth == nullptr) return absl::FailedPreconditionError("no --auth_file to reload");
  return impl_->auth->Reload();
}

void Node::Shutdown() {
  if (!impl_->shutdown.HasBeenNotified()) impl_->shutdown.Notify();
}

}  // namespace kvstrata::cachenode
