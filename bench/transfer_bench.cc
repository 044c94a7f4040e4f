// transfer_bench: kvstrata publish and fetch throughput over loopback TCP and
// shared memory, next to two baselines measured in the same run with the same
// block size and batch:
//   (a) single-threaded memcpy of the same bytes (the ceiling of any local copy);
//   (b) a real Redis server (what LMCache users pick as a remote store) doing
//       pipelined SET/GET of the same values through hiredis.
//
// Each transfer method (ClientOptions::transfer_method: tagged, rma) is
// measured for both publish and fetch. The benchmark starts its own
// kvstrata-node (one per UCX transport config, because the node's UCX_TLS is
// fixed when it starts) and its own redis-server, both as child processes that
// it stops on every exit path.
//
//   transfer_bench                 # full table, a couple of minutes
//   transfer_bench --quick         # smoke test (ctest: transfer_bench_smoke)
//
// Every line reports GB/s (1e9 bytes/s); batch-1 points add p50/p99 latency per
// call next to Redis's GET/SET, and each transport a Lookup of 64 keys next to
// a pipelined Redis EXISTS of 64 keys. A "targets" section at the end checks
// the project's goals: fetch and publish >= 1.5x Redis at batch 32 at every
// block size, batch 1 p50 at or below Redis's, and at 1 MiB x 32 fetch over
// shared memory >= 0.8x memcpy and over TCP >= 2x Redis GET. It is a report: the exit code
// is 0 whether targets pass or miss, and non-zero only when something failed
// to run.
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "kvstrata.pb.h"
#include "kvstrata/client/client.h"
#include "kvstrata/testing/process.h"

#ifndef KVSTRATA_NODE_BINARY
#define KVSTRATA_NODE_BINARY "kvstrata-node"
#endif

extern char** environ;

ABSL_FLAG(std::string, node_binary, KVSTRATA_NODE_BINARY,
          "Path of the kvstrata-node binary to start.");
ABSL_FLAG(std::string, redis_server, "/usr/bin/redis-server",
          "Path of the redis-server binary to start.");
ABSL_FLAG(std::vector<std::string>, transports, std::vector<std::string>({"tcp", "sm"}),
          "UCX transport configs to measure (each is a UCX_TLS value, given to the node and this "
          "client).");
ABSL_FLAG(std::vector<std::string>, block_sizes,
          std::vector<std::string>({"65536", "262144", "1048576", "4194304"}),
          "Block sizes in bytes.");
ABSL_FLAG(std::vector<std::string>, batches, std::vector<std::string>({"1", "8", "32", "128"}),
          "Blocks per publish / fetch call.");
ABSL_FLAG(double, seconds_per_point, 0.3,
          "Timed seconds per measurement (at least a few rounds are always timed).");
ABSL_FLAG(std::vector<std::string>, transfer_methods, std::vector<std::string>({"tagged", "rma"}),
          "How the node moves bytes (ClientOptions::transfer_method), each measured for publish "
          "and fetch: tagged (UCX tagged messages), rma (node-side get/put on the client's "
          "memory keys; the node is started with --allow_client_rkeys), tagged_per_block "
          "(tagged with one message per block also for small blocks, "
          "ClientOptions::coalesce_small_blocks off), tagged_grpc (tagged with the fast path off: "
          "every call a gRPC call, ClientOptions::fast_path). 'put' means rma.");
ABSL_FLAG(uint64_t, node_dram_bytes, 3ull << 30, "DRAM tier of the node the benchmark starts.");
ABSL_FLAG(bool, quick, false,
          "Smoke test: block sizes 65536,1048576, batches 1,32, 0.05 s per point, method tagged, "
          "a node of at most 1 GiB (overrides those flags).");

namespace {

using kvstrata::BlockKey;
using kvstrata::client::BlockOutcome;
using kvstrata::client::Buffer;
using kvstrata::client::Client;
using kvstrata::client::ClientOptions;
using kvstrata::client::FetchItem;
using kvstrata::client::Namespace;
using kvstrata::client::PublishItem;
using kvstrata::client::TransferResult;
using TransferMethod = kvstrata::client::ClientOptions::TransferMethod;

// The point the project's targets are stated at.
constexpr uint64_t kTargetBlock = 1 << 20;
constexpr size_t kTargetBatch = 32;
// Keys per Lookup in the lookup latency line (a 16k-token prompt in blocks of
// 256 tokens), next to a pipelined Redis EXISTS of as many keys.
constexpr size_t kLookupKeys = 64;
// Timed rounds per measurement even when one round outlasts --seconds_per_point,
// so a single slow round does not make the number.
constexpr int kMinTimedRounds = 3;

// ---------------------------------------------------------------------------
// Configuration

struct Method {
  std::string name;
  TransferMethod method;
  bool coalesce = true;  // ClientOptions::coalesce_small_blocks
  bool fast_path = true;  // ClientOptions::fast_path
};

struct Config {
  std::string node_binary;
  std::string redis_server;
  std::vector<std::string> transports;
  std::vector<uint64_t> block_sizes;
  std::vector<size_t> batches;
  std::vector<Method> methods;
  double seconds = 0;
  uint64_t node_dram_bytes = 0;
  bool node_needs_rkeys = false;  // start the node with --allow_client_rkeys
};

template <typename T>
absl::StatusOr<std::vector<T>> ParseNumbers(const std::vector<std::string>& values,
                                            const char* flag) {
  std::vector<T> out;
  for (const std::string& value : values) {
    T number{};
    if (!absl::SimpleAtoi(value, &number) || number == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", flag, ": '", value, "' is not a positive integer"));
    }
    out.push_back(number);
  }
  if (out.empty()) return absl::InvalidArgumentError(absl::StrCat("--", flag, " is empty"));
  return out;
}

absl::StatusOr<Config> ConfigFromFlags() {
  const bool quick = absl::GetFlag(FLAGS_quick);
  Config config;
  config.node_binary = absl::GetFlag(FLAGS_node_binary);
  config.redis_server = absl::GetFlag(FLAGS_redis_server);
  config.transports = absl::GetFlag(FLAGS_transports);
  // The smoke's points need tens of MiB: a smaller node starts in seconds
  // even where first-touching 3 GiB (--prefault) takes ~30 s (seen on this
  // VM after other processes' memory was freed).
  config.node_dram_bytes = quick ? std::min<uint64_t>(absl::GetFlag(FLAGS_node_dram_bytes), 1ull << 30)
                                 : absl::GetFlag(FLAGS_node_dram_bytes);
  config.seconds = quick ? 0.05 : absl::GetFlag(FLAGS_seconds_per_point);
  auto sizes = ParseNumbers<uint64_t>(
      quick ? std::vector<std::string>{"65536", "1048576"} : absl::GetFlag(FLAGS_block_sizes),
      "block_sizes");
  if (!sizes.ok()) return sizes.status();
  config.block_sizes = *std::move(sizes);
  auto batches = ParseNumbers<size_t>(
      quick ? std::vector<std::string>{"1", "32"} : absl::GetFlag(FLAGS_batches), "batches");
  if (!batches.ok()) return batches.status();
  config.batches = *std::move(batches);
  const std::vector<std::string> methods =
      quick ? std::vector<std::string>{"tagged"} : absl::GetFlag(FLAGS_transfer_methods);
  for (const std::string& name : methods) {
    if (name == "tagged") {
      config.methods.push_back({name, TransferMethod::kTagged});
    } else if (name == "tagged_per_block") {
      config.methods.push_back({name, TransferMethod::kTagged, /*coalesce=*/false});
    } else if (name == "tagged_grpc") {
      config.methods.push_back({name, TransferMethod::kTagged, /*coalesce=*/true,
                                /*fast_path=*/false});
    } else if (name == "rma" || name == "put") {
      config.methods.push_back({"rma", TransferMethod::kRma});
      config.node_needs_rkeys = true;  // a node refuses RMA on client memory without it
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("--transfer_methods: unknown method '", name, "'"));
    }
  }
  if (config.transports.empty() || config.methods.empty()) {
    return absl::InvalidArgumentError("--transports and --transfer_methods must name at least one");
  }
  if (config.seconds <= 0)
    return absl::InvalidArgumentError("--seconds_per_point must be positive");
  // Fail before the baselines run, not minutes later when the node starts.
  for (const std::string* binary : {&config.node_binary, &config.redis_server}) {
    if (access(binary->c_str(), X_OK) != 0) {
      return absl::NotFoundError(absl::StrCat(*binary, " is not an executable: ", strerror(errno)));
    }
  }
  return config;
}

// ---------------------------------------------------------------------------
// Child processes

// ---------------------------------------------------------------------------
// Redis

struct RedisFree {
  void operator()(redisContext* c) const { redisFree(c); }
  void operator()(redisReply* r) const { freeReplyObject(r); }
};
using RedisConnection = std::unique_ptr<redisContext, RedisFree>;
using RedisReply = std::unique_ptr<redisReply, RedisFree>;

absl::StatusOr<RedisConnection> ConnectRedis(int port) {
  RedisConnection c(redisConnectWithTimeout("127.0.0.1", port, {1, 0}));
  if (c == nullptr) return absl::ResourceExhaustedError("hiredis: out of memory");
  if (c->err != 0) return absl::UnavailableError(absl::StrCat("hiredis connect: ", c->errstr));
  RedisReply pong(static_cast<redisReply*>(redisCommand(c.get(), "PING")));
  if (pong == nullptr) return absl::UnavailableError(absl::StrCat("hiredis PING: ", c->errstr));
  if (pong->type != REDIS_REPLY_STATUS) return absl::UnavailableError("Redis did not answer PING");
  return c;
}

using kvstrata::testing::ChildProcess;
using kvstrata::testing::NodeProcess;
using kvstrata::testing::TempDir;

struct RunningRedis {
  std::unique_ptr<ChildProcess> process;
  RedisConnection connection;
};

// Starts a throwaway redis-server (no persistence, loopback only) on a free
// port and connects to it once it answers PING.
absl::StatusOr<RunningRedis> StartRedis(const Config& config, const TempDir& dir) {
  absl::StatusOr<int> port = kvstrata::testing::FreeLoopbackPort();
  if (!port.ok()) return port.status();
  auto process = ChildProcess::Spawn(
      {config.redis_server, "--port", absl::StrCat(*port), "--save", "", "--appendonly", "no",
       "--bind", "127.0.0.1", "--protected-mode", "no", "--daemonize", "no"},
      dir.File("redis.log"));
  if (!process.ok()) return process.status();
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (true) {
    absl::StatusOr<RedisConnection> connection = ConnectRedis(*port);
    if (connection.ok()) return RunningRedis{*std::move(process), *std::move(connection)};
    if ((*process)->Exited() || absl::Now() > deadline) {
      return absl::UnavailableError(absl::StrCat("redis-server did not come up (",
                                                 connection.status().message(), "); its log:\n",
                                                 (*process)->LogTail()));
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
}

// Pipelined SET of `batch` values of `size` bytes from `src`: every command is
// queued, then every reply read, as a client storing a batch would.
absl::Status RedisSetBatch(redisContext* c, uint64_t size, size_t batch, const uint8_t* src) {
  for (size_t i = 0; i < batch; ++i) {
    const std::string key = absl::StrCat("bench:", i);
    if (redisAppendCommand(c, "SET %b %b", key.data(), key.size(), src + i * size, size_t{size}) !=
        REDIS_OK) {
      return absl::InternalError(absl::StrCat("hiredis append SET: ", c->errstr));
    }
  }
  for (size_t i = 0; i < batch; ++i) {
    void* raw = nullptr;
    if (redisGetReply(c, &raw) != REDIS_OK)
      return absl::UnavailableError(absl::StrCat("SET: ", c->errstr));
    RedisReply reply(static_cast<redisReply*>(raw));
    if (reply->type != REDIS_REPLY_STATUS) {
      return absl::InternalError(
          absl::StrCat("SET answered type ", reply->type, ": ", reply->str ? reply->str : ""));
    }
  }
  return absl::OkStatus();
}

// Pipelined GET of the keys RedisSetBatch wrote; each value is copied into
// `dst`, because a kvstrata fetch too ends with the bytes in the caller's buffer.
absl::Status RedisGetBatch(redisContext* c, uint64_t size, size_t batch, uint8_t* dst) {
  for (size_t i = 0; i < batch; ++i) {
    const std::string key = absl::StrCat("bench:", i);
    if (redisAppendCommand(c, "GET %b", key.data(), key.size()) != REDIS_OK) {
      return absl::InternalError(absl::StrCat("hiredis append GET: ", c->errstr));
    }
  }
  for (size_t i = 0; i < batch; ++i) {
    void* raw = nullptr;
    if (redisGetReply(c, &raw) != REDIS_OK)
      return absl::UnavailableError(absl::StrCat("GET: ", c->errstr));
    RedisReply reply(static_cast<redisReply*>(raw));
    if (reply->type != REDIS_REPLY_STRING || reply->len != size) {
      return absl::InternalError(absl::StrCat("GET of bench:", i, " answered type ", reply->type,
                                              " with ", reply->len, " bytes, expected ", size));
    }
    std::memcpy(dst + i * size, reply->str, size);
  }
  return absl::OkStatus();
}

// Pipelined EXISTS of kLookupKeys keys RedisSetBatch wrote: Redis's nearest
// equivalent of a Lookup.
absl::Status RedisExistsBatch(redisContext* c) {
  for (size_t i = 0; i < kLookupKeys; ++i) {
    const std::string key = absl::StrCat("bench:", i);
    if (redisAppendCommand(c, "EXISTS %b", key.data(), key.size()) != REDIS_OK) {
      return absl::InternalError(absl::StrCat("hiredis append EXISTS: ", c->errstr));
    }
  }
  for (size_t i = 0; i < kLookupKeys; ++i) {
    void* raw = nullptr;
    if (redisGetReply(c, &raw) != REDIS_OK)
      return absl::UnavailableError(absl::StrCat("EXISTS: ", c->errstr));
    RedisReply reply(static_cast<redisReply*>(raw));
    if (reply->type != REDIS_REPLY_INTEGER || reply->integer != 1) {
      return absl::InternalError(absl::StrCat("EXISTS bench:", i, " did not find the key"));
    }
  }
  return absl::OkStatus();
}

absl::Status RedisFlush(redisContext* c) {
  RedisReply reply(static_cast<redisReply*>(redisCommand(c, "FLUSHALL")));
  if (reply == nullptr) return absl::UnavailableError(absl::StrCat("FLUSHALL: ", c->errstr));
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Measurement

// Throughput of a repeated operation and the latency of one call of it.
struct Measurement {
  double gbps = 0;
  double p50_us = 0;
  double p99_us = 0;
};

// Nearest-rank percentile of `sorted` (ascending), in microseconds.
double PercentileUs(const std::vector<double>& sorted, double fraction) {
  if (sorted.empty()) return 0;
  const size_t rank = static_cast<size_t>(fraction * static_cast<double>(sorted.size() - 1) + 0.5);
  return sorted[std::min(rank, sorted.size() - 1)] * 1e6;
}

// GB/s of `run`, which moves `bytes_per_round` bytes per call, and the p50 and
// p99 of one call. One untimed warm-up round (endpoint wire-up, first
// faults), then rounds until `seconds` of timed work and at least
// kMinTimedRounds. Only `run` is timed: `prepare` is per-round setup that is
// not part of the transfer (fresh keys, deleting old ones).
absl::StatusOr<Measurement> Measure(double seconds, uint64_t bytes_per_round,
                                    const std::function<absl::Status()>& prepare,
                                    const std::function<absl::Status()>& run) {
  using Clock = std::chrono::steady_clock;
  Clock::duration timed{};
  std::vector<double> rounds;  // seconds per timed call
  for (int round = 0;; ++round) {  // round 0 is the warm-up
    if (prepare) {
      if (absl::Status s = prepare(); !s.ok()) return s;
    }
    const Clock::time_point start = Clock::now();
    if (absl::Status s = run(); !s.ok()) return s;
    if (round == 0) continue;
    const Clock::duration took = Clock::now() - start;
    timed += took;
    rounds.push_back(std::chrono::duration<double>(took).count());
    const double elapsed = std::chrono::duration<double>(timed).count();
    if (round >= kMinTimedRounds && elapsed >= seconds) {
      std::sort(rounds.begin(), rounds.end());
      return Measurement{static_cast<double>(bytes_per_round) * round / elapsed / 1e9,
                         PercentileUs(rounds, 0.5), PercentileUs(rounds, 0.99)};
    }
  }
}

absl::StatusOr<double> MeasureGBps(double seconds, uint64_t bytes_per_round,
                                   const std::function<absl::Status()>& prepare,
                                   const std::function<absl::Status()>& run) {
  absl::StatusOr<Measurement> m = Measure(seconds, bytes_per_round, prepare, run);
  if (!m.ok()) return m.status();
  return m->gbps;
}

// Page-touched plain heap memory for the memcpy baseline.
std::unique_ptr<uint8_t[]> TouchedBytes(size_t size, uint8_t fill) {
  std::unique_ptr<uint8_t[]> bytes(new uint8_t[size]);
  std::memset(bytes.get(), fill, size);
  return bytes;
}

// Non-constant bytes, so nothing downstream can take a shortcut on zeros.
void FillPattern(uint8_t* data, size_t size) {
  uint64_t state = 0x9e3779b97f4a7c15ull;
  size_t i = 0;
  for (; i + 8 <= size; i += 8) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    std::memcpy(data + i, &state, 8);
  }
  for (; i < size; ++i) data[i] = static_cast<uint8_t>(i);
}

struct Baseline {
  double memcpy_gbps = 0;
  double redis_set_gbps = 0;
  double redis_get_gbps = 0;
  Measurement redis_set;  // latency of one pipelined batch of SETs
  Measurement redis_get;
};

// memcpy and Redis at one (block size, batch); the buffers hold the largest point.
absl::StatusOr<Baseline> MeasureBaseline(const Config& config, redisContext* redis, uint64_t size,
                                         size_t batch, uint8_t* src, uint8_t* dst) {
  const uint64_t bytes = size * batch;
  Baseline baseline;
  absl::StatusOr<double> gbps = MeasureGBps(config.seconds, bytes, nullptr, [&] {
    std::memcpy(dst, src, bytes);
    // Keep the copy: its result must look used to the compiler.
    asm volatile("" : : "r"(dst) : "memory");
    return absl::OkStatus();
  });
  if (!gbps.ok()) return gbps.status();
  baseline.memcpy_gbps = *gbps;
  absl::StatusOr<Measurement> set = Measure(config.seconds, bytes, nullptr,
                                            [&] { return RedisSetBatch(redis, size, batch, src); });
  if (!set.ok()) return set.status();
  baseline.redis_set = *set;
  baseline.redis_set_gbps = set->gbps;
  absl::StatusOr<Measurement> get = Measure(config.seconds, bytes, nullptr,
                                            [&] { return RedisGetBatch(redis, size, batch, dst); });
  if (!get.ok()) return get.status();
  baseline.redis_get = *get;
  baseline.redis_get_gbps = get->gbps;
  if (absl::Status s = RedisFlush(redis); !s.ok()) return s;
  return baseline;
}

// Distinct block keys: a per-run random prefix and a counter, so no publish
// is ever deduplicated against an earlier one (that would move no bytes).
class KeyGenerator {
 public:
  KeyGenerator() {
    std::random_device random;
    prefix_ = (uint64_t{random()} << 32) | random();
  }
  BlockKey Next() {
    BlockKey key;
    const uint64_t n = next_++;
    std::memcpy(key.bytes.data(), &prefix_, 8);
    std::memcpy(key.bytes.data() + 8, &n, 8);
    return key;
  }

 private:
  uint64_t prefix_ = 0;
  uint64_t next_ = 0;
};

absl::Status ExpectAllOk(const absl::StatusOr<TransferResult>& result, const char* what) {
  if (!result.ok())
    return absl::Status(result.status().code(),
                        absl::StrCat(what, ": ", result.status().message()));
  const size_t ok = result->count(BlockOutcome::kOk);
  if (ok == result->outcomes.size()) return absl::OkStatus();
  std::map<std::string, size_t> counts;
  for (BlockOutcome outcome : result->outcomes)
    ++counts[kvstrata::client::BlockOutcomeName(outcome)];
  return absl::InternalError(
      absl::StrCat(what, ": ", ok, " of ", result->outcomes.size(), " blocks ok (",
                   absl::StrJoin(counts, ", ", absl::PairFormatter("=")), ")"));
}

// One client (one UCX engine, one fetch method) with registered source and
// destination buffers sized for the largest point.
class KvBench {
 public:
  static absl::StatusOr<std::unique_ptr<KvBench>> Create(const std::string& address,
                                                         const Method& method, bool verify,
                                                         uint64_t max_bytes,
                                                         uint64_t delete_after_bytes) {
    ClientOptions options;
    options.node_address = address;
    options.transfer_method = method.method;
    options.coalesce_small_blocks = method.coalesce;
    options.fast_path = method.fast_path;
    options.verify_checksums = verify;
    // ucx_transports stays empty: the client takes UCX_TLS from the
    // environment, which the caller set for this transport config.
    absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(options);
    if (!client.ok()) return client.status();
    std::unique_ptr<KvBench> bench(new KvBench(*std::move(client), delete_after_bytes));
    if (absl::Status s = bench->client_->Ping(absl::Seconds(10)); !s.ok()) return s;
    auto src = bench->client_->Allocate(max_bytes);
    if (!src.ok()) return src.status();
    auto dst = bench->client_->Allocate(max_bytes);
    if (!dst.ok()) return dst.status();
    bench->src_ = *std::move(src);
    bench->dst_ = *std::move(dst);
    // Allocate maps lazily; touch every page now so faults are not measured.
    FillPattern(bench->src_->data(), max_bytes);
    std::memset(bench->dst_->data(), 0, max_bytes);
    return bench;
  }

  absl::StatusOr<Namespace> Open(uint64_t block_bytes) {
    kvstrata::v1::NamespaceSpec spec;
    spec.set_tenant("bench");
    spec.set_model("transfer_bench");
    spec.set_block_bytes(block_bytes);  // num_layers 0: an opaque namespace
    return client_->OpenNamespace(spec);
  }

  // Publish throughput: every round publishes `batch` new keys from the
  // source buffer. Published keys are deleted (untimed) once they hold
  // delete_after_bytes, and at the end, so the node never fills or evicts.
  absl::StatusOr<Measurement> Publish(Namespace& ns, size_t batch, double seconds) {
    const uint64_t size = ns.block_bytes();
    std::vector<PublishItem> items(batch);
    std::vector<BlockKey> stored;
    auto prepare = [&]() -> absl::Status {
      if ((stored.size() + batch) * size > delete_after_bytes_) {
        if (absl::Status s = Delete(ns, stored); !s.ok()) return s;
      }
      for (size_t i = 0; i < batch; ++i) {
        items[i] = PublishItem{keys_.Next(), std::nullopt, src_.get(), i * size};
        stored.push_back(items[i].key);
      }
      return absl::OkStatus();
    };
    absl::StatusOr<Measurement> gbps = Measure(
        seconds, size * batch, prepare, [&] { return ExpectAllOk(ns.Publish(items), "publish"); });
    // A failed publish stored fewer keys than were generated: the cleanup's
    // count would only hide the real error.
    if (!gbps.ok()) return gbps.status();
    if (absl::Status s = Delete(ns, stored); !s.ok()) return s;
    return gbps;
  }

  // Fetch throughput: `batch` stored blocks fetched again and again into the
  // destination buffer.
  absl::StatusOr<Measurement> Fetch(Namespace& ns, size_t batch, double seconds) {
    const uint64_t size = ns.block_bytes();
    std::vector<PublishItem> publish(batch);
    std::vector<FetchItem> fetch(batch);
    std::vector<BlockKey> stored;
    for (size_t i = 0; i < batch; ++i) {
      const BlockKey key = keys_.Next();
      publish[i] = PublishItem{key, std::nullopt, src_.get(), i * size};
      fetch[i] = FetchItem{key, dst_.get(), i * size};
      stored.push_back(key);
    }
    if (absl::Status s = ExpectAllOk(ns.Publish(publish), "publish of the fetch set"); !s.ok())
      return s;
    absl::StatusOr<Measurement> gbps = Measure(
        seconds, size * batch, nullptr, [&] { return ExpectAllOk(ns.Fetch(fetch), "fetch"); });
    if (!gbps.ok()) return gbps.status();
    if (std::memcmp(src_->data(), dst_->data(), size * batch) != 0) {
      return absl::DataLossError("fetched bytes differ from the published ones");
    }
    if (absl::Status s = Delete(ns, stored); !s.ok()) return s;
    return gbps;
  }

  // Latency of a Lookup of kLookupKeys keys that are all stored (the whole
  // prefix is found, so the node looks at every key).
  absl::StatusOr<Measurement> Lookup(Namespace& ns, double seconds) {
    const uint64_t size = ns.block_bytes();
    std::vector<PublishItem> publish(kLookupKeys);
    std::vector<BlockKey> keys;
    for (size_t i = 0; i < kLookupKeys; ++i) {
      keys.push_back(keys_.Next());
      publish[i] = PublishItem{keys.back(), std::nullopt, src_.get(), 0};
    }
    if (size > src_->size()) return absl::InvalidArgumentError("lookup blocks outgrow the buffer");
    if (absl::Status s = ExpectAllOk(ns.Publish(publish), "publish of the lookup set"); !s.ok())
      return s;
    absl::StatusOr<Measurement> m = Measure(seconds, 0, nullptr, [&]() -> absl::Status {
      absl::StatusOr<kvstrata::client::LookupResult> found = ns.Lookup(keys);
      if (!found.ok()) return found.status();
      if (found->prefix_length != kLookupKeys) {
        return absl::InternalError(absl::StrCat("lookup found ", found->prefix_length, " of ",
                                                kLookupKeys, " stored keys"));
      }
      return absl::OkStatus();
    });
    if (!m.ok()) return m.status();
    if (absl::Status s = Delete(ns, keys); !s.ok()) return s;
    return m;
  }

  // The UCX transports the node's endpoints use (asked while this client's
  // endpoints are alive: a node lists live peers only).
  absl::StatusOr<std::vector<std::string>> NodeTransports() {
    kvstrata::v1::StatsResponse stats;
    if (absl::Status s = client_->Stats(&stats); !s.ok()) return s;
    fast_path_requests_ = stats.fast_path_requests();
    return std::vector<std::string>(stats.transports().begin(), stats.transports().end());
  }
  // Fast-path requests the node served so far (read by NodeTransports).
  uint64_t fast_path_requests() const { return fast_path_requests_; }

 private:
  KvBench(std::unique_ptr<Client> client, uint64_t delete_after_bytes)
      : client_(std::move(client)), delete_after_bytes_(delete_after_bytes) {}

  static absl::Status Delete(Namespace& ns, std::vector<BlockKey>& keys) {
    if (keys.empty()) return absl::OkStatus();
    absl::StatusOr<size_t> deleted = ns.Delete(keys);
    if (!deleted.ok()) return deleted.status();
    if (*deleted != keys.size()) {
      return absl::InternalError(absl::StrCat("deleted ", *deleted, " of ", keys.size(),
                                              " published blocks: the node lost some"));
    }
    keys.clear();
    return absl::OkStatus();
  }

  // Declared before the buffers, so it outlives them: they are registered
  // with its UCX context.
  std::unique_ptr<Client> client_;
  std::unique_ptr<Buffer> src_;
  std::unique_ptr<Buffer> dst_;
  KeyGenerator keys_;
  uint64_t delete_after_bytes_;
  uint64_t fast_path_requests_ = 0;
};

// ---------------------------------------------------------------------------
// The run

using PointKey = std::tuple<uint64_t, size_t>;  // block, batch
using ResultKey =
    std::tuple<std::string, std::string, uint64_t, size_t>;  // transport, method, block, batch

struct KvResult {
  Measurement publish;
  Measurement fetch;
};

double Ratio(double a, double b) { return b > 0 ? a / b : 0; }

void PrintPoint(const std::string& transport, const std::string& method, const char* verify,
                uint64_t size, size_t batch, const std::optional<Measurement>& publish,
                const Measurement& fetch, const Baseline& base) {
  std::printf("transport=%s method=%s verify=%s block=%llu batch=%zu", transport.c_str(),
              method.c_str(), verify, static_cast<unsigned long long>(size), batch);
  if (publish.has_value()) std::printf(" publish_GBps=%.3f", publish->gbps);
  std::printf(" fetch_GBps=%.3f memcpy_GBps=%.3f redis_set_GBps=%.3f redis_get_GBps=%.3f",
              fetch.gbps, base.memcpy_gbps, base.redis_set_gbps, base.redis_get_gbps);
  std::printf(" fetch/memcpy=%.2f fetch/redis_get=%.2f", Ratio(fetch.gbps, base.memcpy_gbps),
              Ratio(fetch.gbps, base.redis_get_gbps));
  if (publish.has_value())
    std::printf(" publish/redis_set=%.2f", Ratio(publish->gbps, base.redis_set_gbps));
  std::printf("\n");
  if (batch == 1) {
    // One block per call: the latency a single-block caller sees.
    std::printf("  latency block=%llu batch=1 (p50/p99 us):",
                static_cast<unsigned long long>(size));
    if (publish.has_value()) {
      std::printf(" publish=%.0f/%.0f redis_set=%.0f/%.0f", publish->p50_us, publish->p99_us,
                  base.redis_set.p50_us, base.redis_set.p99_us);
    }
    std::printf(" fetch=%.0f/%.0f redis_get=%.0f/%.0f\n", fetch.p50_us, fetch.p99_us,
                base.redis_get.p50_us, base.redis_get.p99_us);
  }
  std::fflush(stdout);
}

// Whether the transports the node reports fit the config asked for: "tcp"
// must not have used shared memory, "sm" must not have fallen back to TCP.
std::string TransportVerdict(const std::string& config, const std::vector<std::string>& used) {
  if (used.empty()) return "UNKNOWN (node reported no live endpoint)";
  const std::string joined = absl::StrJoin(used, ",");
  if (config == "tcp" && joined.find_first_not_of("tcp,") != std::string::npos) return "MISMATCH";
  if (config == "sm" && joined.find("tcp") != std::string::npos) return "MISMATCH";
  return "ok";
}

// Measures every point of one fetch method on a running node.
absl::Status RunMethod(const Config& config, const std::string& transport,
                       const std::string& address, const Method& method, uint64_t max_bytes,
                       const std::map<PointKey, Baseline>& baselines,
                       std::map<ResultKey, KvResult>* results) {
  auto bench = KvBench::Create(address, method, /*verify=*/true, max_bytes,
                               config.node_dram_bytes / 4);
  if (!bench.ok()) return bench.status();
  for (uint64_t size : config.block_sizes) {
    absl::StatusOr<Namespace> ns = (*bench)->Open(size);
    if (!ns.ok()) return ns.status();
    for (size_t batch : config.batches) {
      absl::StatusOr<Measurement> publish = (*bench)->Publish(*ns, batch, config.seconds);
      if (!publish.ok()) return publish.status();
      absl::StatusOr<Measurement> fetch = (*bench)->Fetch(*ns, batch, config.seconds);
      if (!fetch.ok()) return fetch.status();
      (*results)[{transport, method.name, size, batch}] = {*publish, *fetch};
      PrintPoint(transport, method.name, "on", size, batch, *publish, *fetch,
                 baselines.at({size, batch}));
    }
  }
  {
    const uint64_t size = config.block_sizes.front();
    absl::StatusOr<Namespace> ns = (*bench)->Open(size);
    if (!ns.ok()) return ns.status();
    absl::StatusOr<Measurement> lookup = (*bench)->Lookup(*ns, config.seconds);
    if (!lookup.ok()) return lookup.status();
    (*results)[{transport, method.name, 0, kLookupKeys}] = {{}, *lookup};
    const Measurement& exists = baselines.at({0, kLookupKeys}).redis_get;
    std::printf("  latency lookup of %zu keys (p50/p99 us): lookup=%.0f/%.0f redis_exists=%.0f/%.0f"
                " lookup/redis_exists p50=%.2f\n",
                kLookupKeys, lookup->p50_us, lookup->p99_us, exists.p50_us, exists.p99_us,
                Ratio(lookup->p50_us, exists.p50_us));
    std::fflush(stdout);
  }
  absl::StatusOr<std::vector<std::string>> used = (*bench)->NodeTransports();
  if (!used.ok()) return used.status();
  // Calls that took the fast path (UCX active messages on the client's own
  // endpoint) create no node endpoint: a run of only those lists none.
  std::printf("# UCX_TLS=%s method=%s: node endpoints use [%s] -> %s; fast-path requests %llu\n",
              transport.c_str(), method.name.c_str(), absl::StrJoin(*used, " ").c_str(),
              TransportVerdict(transport, *used).c_str(),
              static_cast<unsigned long long>((*bench)->fast_path_requests()));
  std::fflush(stdout);
  return absl::OkStatus();
}

// Fetch with checksum verification off at the target point, so the cost of
// verification is visible next to the verified line.
absl::Status RunVerifyOff(const Config& config, const std::string& transport,
                          const std::string& address, const Method& method,
                          const Baseline& baseline) {
  auto bench = KvBench::Create(address, method, /*verify=*/false,
                               kTargetBlock * kTargetBatch, config.node_dram_bytes / 4);
  if (!bench.ok()) return bench.status();
  absl::StatusOr<Namespace> ns = (*bench)->Open(kTargetBlock);
  if (!ns.ok()) return ns.status();
  absl::StatusOr<Measurement> fetch = (*bench)->Fetch(*ns, kTargetBatch, config.seconds);
  if (!fetch.ok()) return fetch.status();
  PrintPoint(transport, method.name, "off", kTargetBlock, kTargetBatch, std::nullopt, *fetch,
             baseline);
  return absl::OkStatus();
}

// Starts a node for one UCX transport config and measures every method on it.
absl::Status RunTransport(const Config& config, const TempDir& dir, const std::string& transport,
                          uint64_t max_bytes, const std::map<PointKey, Baseline>& baselines,
                          std::map<ResultKey, KvResult>* results) {
  // Both sides read UCX_TLS when they create their UCX context: the node at
  // start (it inherits this environment), the client in Client::Connect.
  setenv("UCX_TLS", transport.c_str(), /*overwrite=*/1);
  std::vector<std::string> flags = {absl::StrCat("--dram_bytes=", config.node_dram_bytes),
                                    "--prefault"};
  if (config.node_needs_rkeys) flags.push_back("--allow_client_rkeys");
  absl::StatusOr<std::unique_ptr<NodeProcess>> started = NodeProcess::Start(
      config.node_binary, flags, dir.File(absl::StrCat("node_", transport, ".log")));
  if (!started.ok()) return started.status();
  NodeProcess& node = **started;
  const std::string address = node.address();
  std::printf("# UCX_TLS=%s: kvstrata-node at %s\n", transport.c_str(), address.c_str());
  std::fflush(stdout);
  for (const Method& method : config.methods) {
    absl::Status s = RunMethod(config, transport, address, method, max_bytes, baselines, results);
    if (!s.ok()) {
      return absl::Status(
          s.code(), absl::StrCat("UCX_TLS=", transport, " method=", method.name, ": ", s.message(),
                                 "\nnode log:\n", node.process().LogTail()));
    }
  }
  const PointKey target{kTargetBlock, kTargetBatch};
  if (baselines.contains(target)) {
    if (absl::Status s =
            RunVerifyOff(config, transport, address, config.methods.front(), baselines.at(target));
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

// The project's targets, from what this run measured: throughput ratios at
// batch kTargetBatch, and single-block p50 latency at batch 1 (a ratio over 1
// means kvstrata is faster: Redis's p50 / kvstrata's).
void PrintTargets(const Config& config, const std::map<PointKey, Baseline>& baselines,
                  const std::map<ResultKey, KvResult>& results) {
  std::printf("\ntargets:\n");
  auto line = [](const std::string& what, double factor, std::optional<double> ratio) {
    if (!ratio.has_value()) {
      std::printf("  %s >= %.1fx: NOT MEASURED\n", what.c_str(), factor);
      return;
    }
    std::printf("  %s >= %.1fx: %.2fx -> %s\n", what.c_str(), factor, *ratio,
                *ratio >= factor ? "PASS" : "MISS");
  };
  auto find = [&](const std::string& transport, const std::string& method, uint64_t size,
                  size_t batch) -> std::pair<const KvResult*, const Baseline*> {
    const auto r = results.find({transport, method, size, batch});
    const auto b = baselines.find({size, batch});
    if (r == results.end() || b == baselines.end()) return {nullptr, nullptr};
    return {&r->second, &b->second};
  };
  for (const Method& method : config.methods) {
    for (const std::string& transport : config.transports) {
      const std::string where = absl::StrCat("over ", transport, " (", method.name, ")");
      for (uint64_t size : config.block_sizes) {
        auto [kv, base] = find(transport, method.name, size, kTargetBatch);
        if (kv == nullptr) continue;
        const std::string point = absl::StrCat(size, " x ", kTargetBatch, " ", where);
        line(absl::StrCat("fetch   ", point, " / redis_get"), 1.5,
             Ratio(kv->fetch.gbps, base->redis_get_gbps));
        line(absl::StrCat("publish ", point, " / redis_set"), 1.5,
             Ratio(kv->publish.gbps, base->redis_set_gbps));
      }
      for (uint64_t size : config.block_sizes) {
        auto [kv, base] = find(transport, method.name, size, 1);
        if (kv == nullptr) continue;
        const std::string point = absl::StrCat(size, " x 1 ", where, " p50");
        line(absl::StrCat("fetch   ", point, " redis_get / kvstrata"), 1.0,
             Ratio(base->redis_get.p50_us, kv->fetch.p50_us));
        line(absl::StrCat("publish ", point, " redis_set / kvstrata"), 1.0,
             Ratio(base->redis_set.p50_us, kv->publish.p50_us));
      }
    }
    auto [sm, sm_base] = find("sm", method.name, kTargetBlock, kTargetBatch);
    line(absl::StrCat("fetch ", kTargetBlock, " x ", kTargetBatch, " over sm (", method.name,
                      ") / memcpy"),
         0.8, sm ? std::optional(Ratio(sm->fetch.gbps, sm_base->memcpy_gbps)) : std::nullopt);
    auto [tcp, tcp_base] = find("tcp", method.name, kTargetBlock, kTargetBatch);
    line(absl::StrCat("fetch ", kTargetBlock, " x ", kTargetBatch, " over tcp (", method.name,
                      ") / redis_get"),
         2.0, tcp ? std::optional(Ratio(tcp->fetch.gbps, tcp_base->redis_get_gbps)) : std::nullopt);
  }
}

absl::Status Run(const Config& config) {
  absl::StatusOr<std::unique_ptr<TempDir>> dir = TempDir::Create("transfer_bench");
  if (!dir.ok()) return dir.status();
  absl::StatusOr<RunningRedis> redis = StartRedis(config, **dir);
  if (!redis.ok()) return redis.status();

  const uint64_t max_bytes =
      *std::max_element(config.block_sizes.begin(), config.block_sizes.end()) *
      *std::max_element(config.batches.begin(), config.batches.end());
  std::printf("# transfer_bench: %ld cores, %.2f s per point, node %s, redis %s\n",
              sysconf(_SC_NPROCESSORS_ONLN), config.seconds, config.node_binary.c_str(),
              config.redis_server.c_str());
  std::fflush(stdout);

  // Baselines first, while no node runs, once per (block, batch): every
  // transport and method line is compared with the same numbers.
  std::map<PointKey, Baseline> baselines;
  {
    std::unique_ptr<uint8_t[]> src = TouchedBytes(max_bytes, 0);
    FillPattern(src.get(), max_bytes);
    std::unique_ptr<uint8_t[]> dst = TouchedBytes(max_bytes, 0);
    for (uint64_t size : config.block_sizes) {
      for (size_t batch : config.batches) {
        absl::StatusOr<Baseline> baseline =
            MeasureBaseline(config, redis->connection.get(), size, batch, src.get(), dst.get());
        if (!baseline.ok()) {
          return absl::Status(baseline.status().code(),
                              absl::StrCat("baseline block=", size, " batch=", batch, ": ",
                                           baseline.status().message()));
        }
        baselines[{size, batch}] = *baseline;
      }
    }
    // EXISTS of kLookupKeys stored keys (small values: EXISTS never reads them).
    if (absl::Status s = RedisSetBatch(redis->connection.get(), 64, kLookupKeys, src.get());
        !s.ok())
      return s;
    absl::StatusOr<Measurement> exists = Measure(
        config.seconds, 0, nullptr, [&] { return RedisExistsBatch(redis->connection.get()); });
    if (!exists.ok()) return exists.status();
    if (absl::Status s = RedisFlush(redis->connection.get()); !s.ok()) return s;
    baselines[{0, kLookupKeys}].redis_get = *exists;
  }
  std::map<ResultKey, KvResult> results;
  for (const std::string& transport : config.transports) {
    if (absl::Status s = RunTransport(config, **dir, transport, max_bytes, baselines, &results);
        !s.ok())
      return s;
  }
  PrintTargets(config, baselines, results);
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  absl::StatusOr<Config> config = ConfigFromFlags();
  if (!config.ok()) {
    std::fprintf(stderr, "transfer_bench: %s\n", config.status().ToString().c_str());
    return 2;
  }
  if (absl::Status s = Run(*config); !s.ok()) {
    std::fprintf(stderr, "transfer_bench: FAILED: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
