// A running cache node: UCX engine, DRAM tier, namespaces and the gRPC
// service, assembled from options. `kvstrata-node` is a thin main over this.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kvstrata/cachenode/nvme_tier.h"
#include "kvstrata/transfer/device_memory.h"

namespace kvstrata::cachenode {

struct NodeOptions {
  std::string listen_address = "127.0.0.1:50151";  // port 0 picks a free one
  std::string metrics_listen = "127.0.0.1:9464";  // Prometheus /metrics; empty: none
  // TLS for gRPC: PEM files. Certificate and key turn TLS on; a client CA
  // file also requires and verifies client certificates (mutual TLS).
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_client_ca_file;
  // Callers, roles and tenants (src/auth.h has the format); empty: no
  // authentication, which a node accepts only when it listens on loopback or
  // `allow_unauthenticated` is set.
  std::string auth_file;
  bool allow_unauthenticated = false;
  // gRPC calls served at once; further ones fail with RESOURCE_EXHAUSTED
  // instead of each taking a thread.
  int max_concurrent_calls = 512;
  // Most client UCX endpoints held at once (0: from the open-file limit).
  size_t max_ucx_endpoints = 0;
  // UCX network devices (UCX_NET_DEVICES syntax); empty: "lo" when listening
  // on loopback (so UCX listens on no other interface), else every device.
  std::string ucx_net_devices;
  uint64_t dram_bytes = 1ull << 30;
  uint64_t slab_bytes = 64ull << 20;  // also the largest block
  std::string eviction_policy = "adaptive";
  std::string ucx_transports;  // empty: UCX_TLS or UCX's choice
  bool ucx_tune_tcp = true;
  bool prefault = false;  // touch the whole arena at start
  absl::Duration transfer_timeout = absl::Seconds(30);
  // A publish whose client sends nothing for this long is given up and its
  // reservations released (see NodeServiceOptions).
  absl::Duration transfer_stall_timeout = absl::Seconds(5);
  // Most of the DRAM tier one Publish may reserve, and one client's
  // publishes together.
  double max_request_share = 0.125;
  double max_client_inflight_share = 0.25;
  // Serve small Fetch/Publish requests as UCX active messages (the fast
  // path), and the staging/reply memory it may hold in flight.
  bool fast_path = true;
  uint64_t fast_path_buffer_bytes = 64 << 20;
  // Accept RMA descriptors (client memory keys) in Publish/Fetch. Off by
  // default: UCX 1.13 crashes unpacking some malformed keys on shared memory,
  // so only trusted clients may use them (tagged transfers need no keys).
  bool allow_client_rkeys = false;
  // Vet each new client UCX worker address in a child process first (see
  // src/peer_check.h): UCX crashes on malformed addresses.
  bool check_peer_addresses = true;
  // The NVMe tier; none when `nvme.directories` is empty. A zero
  // write_queue_bytes means a quarter of the DRAM tier, at most 256 MiB.
  NvmeTierOptions nvme{.write_queue_bytes = 0};
  // On a clean shutdown, write what DRAM holds to NVMe so a restart finds it.
  bool nvme_flush_on_shutdown = true;
  // A Lookup that finds blocks on NVMe starts promoting them to DRAM in the
  // background, so the Fetch that follows does not wait for the disk.
  bool nvme_prefetch_on_lookup = true;
  // The HBM tier: `hbm_bytes` of GPU `gpu_device`'s memory (0: none), with
  // the DRAM tier's slab size and eviction policy; transfers of its blocks
  // stage through `hbm_staging_bytes` of pinned host memory.
  uint64_t hbm_bytes = 0;
  int gpu_device = 0;
  uint64_t hbm_staging_bytes = 64ull << 20;
  // Opens the GPU: transfer::OpenCudaDevice when unset. The binary chooses
  // (cachenode/src/device_source.h): tests' node binary passes the host
  // double, which lives in tests/.
  std::function<absl::StatusOr<std::unique_ptr<transfer::DeviceMemory>>(int device)> open_device;
};

class Node {
 public:
  static absl::StatusOr<std::unique_ptr<Node>> Start(const NodeOptions& options);
  ~Node();

  int port() const;
  int metrics_port() const;  // 0 without a metrics endpoint
  // Blocks until Shutdown() is called from another thread.
  void Wait();
  void Shutdown();
  // Re-reads the auth file (SIGHUP); the old one stays in force on an error.
  absl::Status ReloadAuth();

  class Impl;

 private:
  explicit Node(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvstrata::cachenode
