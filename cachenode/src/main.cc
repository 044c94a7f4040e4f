// kvstrata-node: one cache node. Every flag has a safe default, so it starts
// with no arguments: loopback gRPC port, DRAM tier sized from free memory with a cap.
#include <csignal>
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/str_cat.h"
#include "kvstrata/cachenode/node.h"
#include "kvstrata/common/log.h"
#include "device_source.h"
#include "peer_check.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50151",
          "gRPC address to listen on, host:port. Port 0 picks a free port (see --port_file). "
          "Use 0.0.0.0:PORT to serve other hosts.");
ABSL_FLAG(std::string, port_file, "",
          "If set, the chosen port is written to this file once the node is ready (and the metrics "
          "port on a second line).");
ABSL_FLAG(std::string, metrics_listen, "127.0.0.1:9464",
          "Address of the Prometheus /metrics endpoint, host:port (port 0 picks a free one; empty "
          "turns it off). Use 0.0.0.0:9464 to be scraped from other hosts.");
ABSL_FLAG(std::string, tls_cert_file, "",
          "PEM certificate for gRPC TLS (with --tls_key_file). Empty: plaintext gRPC.");
ABSL_FLAG(std::string, tls_key_file, "", "PEM private key for gRPC TLS.");
ABSL_FLAG(std::string, tls_client_ca_file, "",
          "PEM CA bundle: clients must present a certificate it signed (mutual TLS).");
ABSL_FLAG(std::string, auth_file, "",
          "Who may call this node: bearer-token digests and mTLS identities mapped to a role "
          "(tenant or admin) and tenants, one per line: `token sha256:<hex> tenant acme,globex`, "
          "`cert <SAN or CN> admin *`. Re-read on SIGHUP. Empty: no authentication, allowed only "
          "on a loopback --listen (or with --allow_unauthenticated).");
ABSL_FLAG(bool, allow_unauthenticated, false,
          "Serve a non-loopback --listen without --auth_file: any client can then read, "
          "overwrite and delete every tenant's blocks and drain the node.");
ABSL_FLAG(int32_t, max_concurrent_calls, 512,
          "gRPC calls served at once; more get RESOURCE_EXHAUSTED (each call takes a thread).");
ABSL_FLAG(uint64_t, max_ucx_endpoints, 0,
          "Most client UCX endpoints held at once; a new client beyond it gets RESOURCE_EXHAUSTED "
          "while none is idle. 0: as many as the open-file limit allows (raised to its hard "
          "limit at start).");
ABSL_FLAG(std::string, ucx_net_devices, "",
          "UCX network devices (UCX_NET_DEVICES syntax). Empty: lo when --listen is loopback (UCX "
          "then listens on no other interface), else UCX_NET_DEVICES or every device.");
ABSL_FLAG(absl::Duration, transfer_stall_timeout, absl::Seconds(5),
          "A publish whose client sends no block for this long (the first one included) is given "
          "up and its reserved memory released, long before --transfer_timeout.");
ABSL_FLAG(double, max_request_share, 0.125,
          "Most of the DRAM tier a single Publish may reserve; its further blocks get NO_SPACE. "
          "Clients learn the block count from OpenNamespace and split larger batches.");
ABSL_FLAG(double, max_client_inflight_share, 0.25,
          "Most of the DRAM tier one client's publishes may hold reserved at once (a client is "
          "its credential, or its connection without --auth_file); a publish beyond it waits for "
          "the client's earlier ones, at most --transfer_stall_timeout.");
ABSL_FLAG(bool, fast_path, true,
          "Serve small Fetch and Publish requests (up to 64 blocks, 4 MiB) sent as UCX active "
          "messages, authorized by a capability OpenNamespace grants, on the UCX progress thread "
          "instead of a gRPC call. Clients fall back to gRPC when it is off.");
ABSL_FLAG(uint64_t, fast_path_buffer_bytes, 64 << 20,
          "Most staging and reply memory fast-path requests may hold in flight on this node; "
          "beyond it they are refused and the client uses gRPC.");
ABSL_FLAG(uint64_t, dram_bytes, 0,
          "Size of the DRAM tier in bytes. 0: a quarter of available memory, at most "
          "--dram_auto_cap_bytes.");
ABSL_FLAG(uint64_t, dram_auto_cap_bytes, 4ull << 30,
          "Upper bound of the automatic DRAM tier size.");
ABSL_FLAG(
    uint64_t, slab_bytes, 64ull << 20,
    "Slab size of the DRAM tier (multiple of 4096). Also the largest block a namespace may have.");
ABSL_FLAG(std::string, eviction_policy, "adaptive",
          "Eviction policy of the DRAM tier: adaptive (follows whichever of chain-slru, lru, "
          "return-aware and prefix-freq its sampled simulations show ahead; at or above LRU on "
          "every trace of the suite, see cachenode/README.md); lru; prefix-lru (never evicts a "
          "block whose descendants are cached; chains leave from their tail); prefix-freq "
          "(least often used leaves of the prefix tree first, counts age); chain-protect (new "
          "conversations and superseded tails leave before conversations that were reused); "
          "chain-slru (the same, keeping up to 10% of the tier for new conversations); "
          "return-aware (conversations ranked by the chance they come back, learned from "
          "engines' RequestFinished hints).");
ABSL_FLAG(std::string, ucx_transports, "",
          "UCX transports (UCX_TLS syntax, e.g. tcp or sm). Empty: UCX_TLS from the environment "
          "or UCX's choice.");
ABSL_FLAG(
    bool, ucx_tune_tcp, true,
    "Raise UCX's TCP segment and socket buffer sizes (a UCX_TCP_* environment variable wins).");
ABSL_FLAG(bool, prefault, false,
          "Touch the whole DRAM arena at start so first writes do not fault.");
ABSL_FLAG(bool, allow_client_rkeys, false,
          "Accept RMA transfers (client memory keys) as well as tagged ones. Only with a "
          "loopback --listen and trusted clients: UCX 1.13 cannot validate a packed key (a "
          "malformed one crashes the node), so the node refuses this flag on other addresses.");
ABSL_FLAG(bool, check_peer_addresses, true,
          "Vet each new client's UCX worker address in a child process before connecting to it "
          "(UCX crashes on malformed addresses). Costs one short-lived process per new client.");
ABSL_FLAG(absl::Duration, transfer_timeout, absl::Seconds(30),
          "Longest a single UCX transfer batch may take before the peer is treated as failed.");
ABSL_FLAG(std::vector<std::string>, nvme_dirs, {},
          "Comma-separated directories of the NVMe tier, one per device; each gets a "
          "preallocated data file. Empty: no NVMe tier (DRAM only).");
ABSL_FLAG(uint64_t, nvme_capacity_bytes, 16ull << 30,
          "Size of the data file preallocated in each --nvme_dirs directory.");
ABSL_FLAG(std::string, nvme_index_dir, "",
          "Directory of the NVMe tier's RocksDB index. Empty: <first --nvme_dirs>/kvstrata-index.");
ABSL_FLAG(double, nvme_high_watermark, 0.95,
          "Fraction of NVMe capacity above which the tier evicts down to --nvme_low_watermark.");
ABSL_FLAG(double, nvme_low_watermark, 0.85, "See --nvme_high_watermark.");
ABSL_FLAG(uint32_t, nvme_queue_depth, 32, "io_uring operations in flight per NVMe batch.");
ABSL_FLAG(uint64_t, nvme_write_queue_bytes, 0,
          "Bytes of DRAM-evicted blocks waiting to be written to NVMe; beyond it evicted blocks "
          "are dropped, never waited for. 0: a quarter of the DRAM tier, at most 256 MiB.");
ABSL_FLAG(absl::Duration, nvme_demotion_wait, absl::Milliseconds(100),
          "Longest a DRAM eviction waits for room in the full NVMe write queue before the block "
          "is dropped (publishers slow to the disk's pace for at most this long).");
ABSL_FLAG(bool, nvme_flush_on_shutdown, true,
          "On SIGTERM/SIGINT, write what the DRAM tier holds to NVMe before exiting, so a restart "
          "finds every block (a crash keeps only what had been demoted).");
ABSL_FLAG(bool, nvme_prefetch_on_lookup, true,
          "When a Lookup finds blocks on NVMe, start promoting them to DRAM in the background so "
          "the Fetch that follows finds them in memory.");
ABSL_FLAG(std::string, nvme_eviction_policy, "adaptive",
          "Eviction policy of the NVMe tier (same names as --eviction_policy).");
ABSL_FLAG(uint64_t, hbm_bytes, 0,
          "Size of the HBM tier in bytes of GPU memory (on --gpu_device). 0: no HBM tier. New and "
          "hit blocks go to HBM first; its evictions go to DRAM, then NVMe. Needs a CUDA build "
          "and a GPU (the node refuses to start otherwise).");
ABSL_FLAG(int32_t, gpu_device, 0, "CUDA device (index among the visible ones) of the HBM tier.");
ABSL_FLAG(uint64_t, hbm_staging_bytes, 64ull << 20,
          "Pinned host memory, registered with UCX once, that transfers of HBM blocks stage "
          "through (UCX here has no CUDA transports). A block finding it all in use is staged "
          "in memory of its own.");

namespace {

uint64_t AvailableMemoryBytes() {
  std::ifstream meminfo("/proc/meminfo");
  std::string name;
  uint64_t kib = 0;
  std::string unit;
  while (meminfo >> name >> kib >> unit) {
    if (name == "MemAvailable:") return kib * 1024;
  }
  return 1ull << 30;
}

}  // namespace

int main(int argc, char** argv) {
  // The node re-runs itself to vet untrusted UCX addresses (peer_check.h).
  if (kvstrata::cachenode::IsPeerCheckInvocation(argc, argv)) {
    return kvstrata::cachenode::RunPeerCheck(argc, argv);
  }
  // --help lists this file's flags (abseil's default looks for a file named
  // after the binary).
  absl::FlagsUsageConfig usage;
  usage.contains_help_flags = [](absl::string_view path) {
    return path == "kvstrata-node";
  };
  usage.contains_helpshort_flags = usage.contains_help_flags;
  // Shown as the binary's name, not the build machine's source path.
  usage.normalize_filename = [](absl::string_view path) {
    return path.find("cachenode/src/main.cc") != absl::string_view::npos ? std::string("kvstrata-node") : std::string(path);
  };
  absl::SetFlagsUsageConfig(usage);
  absl::SetProgramUsageMessage(
      "kvstrata cache node: stores prefix-hashed KV blocks and serves them over gRPC + UCX.\n"
      "Usage: kvstrata-node [flags]   (no flags needed on one machine)");
  absl::ParseCommandLine(argc, argv);

  // Block termination signals in every thread; a dedicated thread waits for them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  kvstrata::cachenode::NodeOptions options;
  options.listen_address = absl::GetFlag(FLAGS_listen);
  options.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  options.tls_cert_file = absl::GetFlag(FLAGS_tls_cert_file);
  options.tls_key_file = absl::GetFlag(FLAGS_tls_key_file);
  options.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca_file);
  options.auth_file = absl::GetFlag(FLAGS_auth_file);
  options.allow_unauthenticated = absl::GetFlag(FLAGS_allow_unauthenticated);
  options.max_concurrent_calls = absl::GetFlag(FLAGS_max_concurrent_calls);
  options.max_ucx_endpoints = absl::GetFlag(FLAGS_max_ucx_endpoints);
  options.ucx_net_devices = absl::GetFlag(FLAGS_ucx_net_devices);
  options.transfer_stall_timeout = absl::GetFlag(FLAGS_transfer_stall_timeout);
  options.max_request_share = absl::GetFlag(FLAGS_max_request_share);
  options.max_client_inflight_share = absl::GetFlag(FLAGS_max_client_inflight_share);
  options.fast_path = absl::GetFlag(FLAGS_fast_path);
  options.fast_path_buffer_bytes = absl::GetFlag(FLAGS_fast_path_buffer_bytes);
  options.slab_bytes = absl::GetFlag(FLAGS_slab_bytes);
  options.dram_bytes = absl::GetFlag(FLAGS_dram_bytes);
  if (options.dram_bytes == 0) {
    options.dram_bytes =
        std::min(AvailableMemoryBytes() / 4, absl::GetFlag(FLAGS_dram_auto_cap_bytes));
    options.dram_bytes = std::max(options.dram_bytes, options.slab_bytes);
  }
  options.eviction_policy = absl::GetFlag(FLAGS_eviction_policy);
  options.ucx_transports = absl::GetFlag(FLAGS_ucx_transports);
  options.ucx_tune_tcp = absl::GetFlag(FLAGS_ucx_tune_tcp);
  options.prefault = absl::GetFlag(FLAGS_prefault);
  options.transfer_timeout = absl::GetFlag(FLAGS_transfer_timeout);
  options.allow_client_rkeys = absl::GetFlag(FLAGS_allow_client_rkeys);
  options.check_peer_addresses = absl::GetFlag(FLAGS_check_peer_addresses);
  options.nvme.directories = absl::GetFlag(FLAGS_nvme_dirs);
  options.nvme.capacity_per_directory = absl::GetFlag(FLAGS_nvme_capacity_bytes);
  options.nvme.index_directory = absl::GetFlag(FLAGS_nvme_index_dir);
  options.nvme.high_watermark = absl::GetFlag(FLAGS_nvme_high_watermark);
  options.nvme.low_watermark = absl::GetFlag(FLAGS_nvme_low_watermark);
  options.nvme.queue_depth = absl::GetFlag(FLAGS_nvme_queue_depth);
  options.nvme.write_queue_bytes = absl::GetFlag(FLAGS_nvme_write_queue_bytes);
  options.nvme.eviction_policy = absl::GetFlag(FLAGS_nvme_eviction_policy);
  options.nvme_flush_on_shutdown = absl::GetFlag(FLAGS_nvme_flush_on_shutdown);
  options.nvme_prefetch_on_lookup = absl::GetFlag(FLAGS_nvme_prefetch_on_lookup);
  options.nvme.max_demotion_wait = absl::GetFlag(FLAGS_nvme_demotion_wait);
  options.hbm_bytes = absl::GetFlag(FLAGS_hbm_bytes);
  options.gpu_device = absl::GetFlag(FLAGS_gpu_device);
  options.hbm_staging_bytes = absl::GetFlag(FLAGS_hbm_staging_bytes);
  options.open_device = kvstrata::cachenode::OpenNodeDevice;

  auto node = kvstrata::cachenode::Node::Start(options);
  if (!node.ok()) {
    KVS_LOG(Error) << "cannot start: " << node.status();
    return 1;
  }
  const std::string port_file = absl::GetFlag(FLAGS_port_file);
  if (!port_file.empty()) {
    const std::string tmp = port_file + ".tmp";
    {
      std::ofstream out(tmp);
      out << (*node)->port() << "\n" << (*node)->metrics_port() << "\n";
    }
    std::rename(tmp.c_str(), port_file.c_str());  // readers never see a partial file
  }
  std::thread waiter([&] {
    int signal = 0;
    while (sigwait(&signals, &signal) == 0 && signal == SIGHUP) {
      const absl::Status reloaded = (*node)->ReloadAuth();
      KVS_LOG(Info) << "SIGHUP: auth file " << (reloaded.ok() ? "reloaded" : "NOT reloaded: ")
                    << (reloaded.ok() ? "" : reloaded.ToString());
    }
    KVS_LOG(Info) << "signal " << signal << ": shutting down";
    (*node)->Shutdown();
  });
  (*node)->Wait();
  waiter.join();
  node->reset();
  return 0;
}
