// Hostile and careless clients against a real kvstrata-node process: tenant
// authentication and isolation, admission before resources, transfers that
// cannot be jammed, and bounded threads and endpoints. ctest runs this binary
// once per UCX transport, like the integration suite.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <filesystem>
#include <fstream>
#include <future>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kvstrata.grpc.pb.h"
#include "kvstrata/client/client.h"
#include "kvstrata/common/block_key.h"
#include "kvstrata/testing/auth_file.h"
#include "kvstrata/testing/blocks.h"
#include "kvstrata/testing/certificates.h"
#include "kvstrata/testing/http.h"
#include "kvstrata/testing/node_fixture.h"
#include "kvstrata/testing/process.h"
#include "kvstrata/testing/streams.h"
#include "kvstrata/transfer/engine.h"

namespace kvstrata {
namespace {

using client::BlockOutcome;
using client::Client;
using testing::FetchAndVerify;
using testing::NodeProcess;
using testing::PublishStream;
using testing::Sha256Hex;

constexpr uint64_t kBlock = 256 * 1024;
constexpr uint32_t kTokensPerBlock = 16;

// Tokens in the clear here; the file the node reads holds only their digests.
constexpr char kAcmeToken[] = "acme-secret-token";
constexpr char kGlobexToken[] = "globex-secret-token";
constexpr char kAdminToken[] = "admin-secret-token";
constexpr char kLateToken[] = "added-on-reload";

v1::NamespaceSpec Spec(const std::string& tenant, const std::string& model,
                       uint64_t block_bytes = kBlock) {
  v1::NamespaceSpec spec = testing::OpaqueSpec(model, block_bytes, kTokensPerBlock);
  spec.set_tenant(tenant);
  return spec;
}

std::unique_ptr<Client> Connect(const std::string& address, const std::string& token,
                                absl::Duration timeout = absl::Seconds(20)) {
  auto c = Client::Connect({.node_address = address, .timeout = timeout, .auth_token = token});
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *std::move(c) : nullptr;
}

// A raw stub that sends `token` (none when empty), so no client-library check
// can filter what a hostile caller sends.
class RawCaller {
 public:
  RawCaller(const std::string& address, std::string token)
      : stub_(v1::CacheNode::NewStub(
            grpc::CreateChannel(address, grpc::InsecureChannelCredentials()))),
        token_(std::move(token)) {}

  template <typename Method, typename Request, typename Response>
  grpc::StatusCode Call(Method method, const Request& request, Response* response,
                        absl::Duration timeout = absl::Seconds(20)) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    if (!token_.empty()) context.AddMetadata("authorization", "Bearer " + token_);
    return ((*stub_).*method)(&context, request, response).error_code();
  }
  v1::CacheNode::Stub& stub() { return *stub_; }

 private:
  std::unique_ptr<v1::CacheNode::Stub> stub_;
  std::string token_;
};

uint64_t NodeThreads(pid_t pid) {
  std::ifstream status(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("Threads:", 0) == 0) return std::stoull(line.substr(8));
  }
  return 0;
}

uint64_t NodeFds(pid_t pid) {
  uint64_t fds = 0;
  for (const auto& entry : std::filesystem::directory_iterator(absl::StrCat("/proc/", pid, "/fd"))) {
    (void)entry;
    ++fds;
  }
  return fds;
}

// ---- authentication and tenant isolation ---------------------------------

class AuthTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto dir = testing::TempDir::Create("kvstrata-auth");
    ASSERT_TRUE(dir.ok());
    dir_ = *std::move(dir);
    auth_file_ = dir_->File("auth");
    WriteAuthFile({});
    auto node = NodeProcess::Start(KVSTRATA_NODE_BINARY,
                                   {"--dram_bytes=67108864", "--slab_bytes=4194304",
                                    "--auth_file=" + auth_file_, "--transfer_timeout=5s"});
    ASSERT_TRUE(node.ok()) << node.status();
    node_ = *std::move(node);
  }

  void WriteAuthFile(const std::vector<std::string>& extra) {
    std::ofstream out(auth_file_);
    out << "# kind credential role tenants\n"
        << "token sha256:" << Sha256Hex(kAcmeToken) << " tenant acme\n"
        << "token sha256:" << Sha256Hex(kGlobexToken) << " tenant globex,shared\n"
        << "token sha256:" << Sha256Hex(kAdminToken) << " admin *\n";
    for (const std::string& line : extra) out << line << "\n";
  }

  v1::StatsResponse AdminStats() {
    v1::StatsResponse stats;
    auto admin = Connect(node_->address(), kAdminToken);
    EXPECT_TRUE(admin->Stats(&stats).ok());
    return stats;
  }

  std::unique_ptr<testing::TempDir> dir_;
  std::string auth_file_;
  std::unique_ptr<NodeProcess> node_;
};

TEST_F(AuthTest, CallsWithoutAKnownTokenAreRefusedButHealthAnswers) {
  auto anonymous = Connect(node_->address(), "");
  EXPECT_TRUE(anonymous->Ping().ok()) << "probes need Health without credentials";
  auto opened = anonymous->OpenNamespace(Spec("acme", "m"));
  EXPECT_TRUE(absl::IsUnauthenticated(opened.status())) << opened.status();
  auto wrong = Connect(node_->address(), "not-a-token");
  EXPECT_TRUE(absl::IsUnauthenticated(wrong->OpenNamespace(Spec("acme", "m")).status()));
  RawCaller malformed(node_->address(), "");
  v1::OpenNamespaceRequest open;
  *open.mutable_spec() = Spec("acme", "m");
  v1::OpenNamespaceResponse response;
  grpc::ClientContext context;
  context.AddMetadata("authorization", "Basic YWNtZTpwYXNz");
  EXPECT_EQ(malformed.stub().OpenNamespace(&context, open, &response).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_GE(AdminStats().unauthenticated_calls(), 3u);
}

TEST_F(AuthTest, AnotherTenantCannotReadOverwriteDeleteOrHintABlock) {
  auto acme = Connect(node_->address(), kAcmeToken);
  auto ns = acme->OpenNamespace(Spec("acme", "llama"));
  ASSERT_TRUE(ns.ok()) << ns.status();
  auto published = PublishStream(*acme, *ns, 5, 8, 8);
  ASSERT_TRUE(published.ok()) << published.status();
  ASSERT_EQ(published->count(BlockOutcome::kOk), 8u);
  const std::vector<BlockKey> keys = ns->Keys(testing::Tokens(5, 8, kTokensPerBlock));

  // Globex knows the spec, so it can compute the namespace id and every key.
  auto globex = Connect(node_->address(), kGlobexToken);
  auto opened = globex->OpenNamespace(Spec("acme", "llama"));
  EXPECT_TRUE(absl::IsPermissionDenied(opened.status())) << opened.status();

  RawCaller raw(node_->address(), kGlobexToken);
  v1::LookupRequest lookup;
  lookup.set_namespace_id(ns->id());
  for (const BlockKey& key : keys) lookup.add_keys(std::string(key.view()));
  v1::LookupResponse looked;
  EXPECT_EQ(raw.Call(&v1::CacheNode::Stub::Lookup, lookup, &looked),
            grpc::StatusCode::PERMISSION_DENIED);

  v1::FetchRequest fetch;
  fetch.set_namespace_id(ns->id());
  fetch.set_tag_base(1 << 16);
  v1::FetchResponse fetched;
  EXPECT_EQ(raw.Call(&v1::CacheNode::Stub::Fetch, fetch, &fetched),
            grpc::StatusCode::PERMISSION_DENIED);

  v1::PublishRequest overwrite;
  overwrite.set_namespace_id(ns->id());
  overwrite.set_tag_base(1 << 16);
  v1::PublishResponse overwritten;
  EXPECT_EQ(raw.Call(&v1::CacheNode::Stub::Publish, overwrite, &overwritten),
            grpc::StatusCode::PERMISSION_DENIED);

  v1::DeleteRequest erase;
  erase.set_namespace_id(ns->id());
  for (const BlockKey& key : keys) erase.add_keys(std::string(key.view()));
  v1::DeleteResponse erased;
  EXPECT_EQ(raw.Call(&v1::CacheNode::Stub::Delete, erase, &erased),
            grpc::StatusCode::PERMISSION_DENIED);

  v1::RequestFinishedRequest hint;
  hint.set_namespace_id(ns->id());
  hint.set_last_key(std::string(keys.back().view()));
  v1::RequestFinishedResponse hinted;
  EXPECT_EQ(raw.Call(&v1::CacheNode::Stub::RequestFinished, hint, &hinted),
            grpc::StatusCode::PERMISSION_DENIED);

  // Nothing changed: acme still reads its own bytes.
  EXPECT_EQ(ns->Lookup(keys)->prefix_length, 8u);
  EXPECT_EQ(FetchAndVerify(*acme, *ns, 5, 8, 8), 8u);
  // Globex's own tenants work, and only them.
  EXPECT_TRUE(globex->OpenNamespace(Spec("globex", "llama")).ok());
  EXPECT_TRUE(globex->OpenNamespace(Spec("shared", "llama")).ok());
  EXPECT_GE(AdminStats().permission_denied_calls(), 6u);
}

TEST_F(AuthTest, DrainAndStatsNeedAdmin) {
  RawCaller tenant(node_->address(), kAcmeToken);
  v1::DrainRequest drain;
  drain.set_draining(true);
  v1::DrainResponse drained;
  EXPECT_EQ(tenant.Call(&v1::CacheNode::Stub::Drain, drain, &drained),
            grpc::StatusCode::PERMISSION_DENIED);
  v1::StatsResponse stats;
  EXPECT_EQ(tenant.Call(&v1::CacheNode::Stub::Stats, v1::StatsRequest(), &stats),
            grpc::StatusCode::PERMISSION_DENIED);
  // Still serving: the refused drain changed nothing.
  auto acme = Connect(node_->address(), kAcmeToken);
  auto ns = acme->OpenNamespace(Spec("acme", "drain"));
  ASSERT_TRUE(ns.ok());
  EXPECT_EQ(PublishStream(*acme, *ns, 6, 2)->count(BlockOutcome::kOk), 2u);

  RawCaller admin(node_->address(), kAdminToken);
  EXPECT_EQ(admin.Call(&v1::CacheNode::Stub::Drain, drain, &drained), grpc::StatusCode::OK);
  EXPECT_TRUE(drained.draining());
  EXPECT_EQ(admin.Call(&v1::CacheNode::Stub::Stats, v1::StatsRequest(), &stats),
            grpc::StatusCode::OK);
}

TEST_F(AuthTest, SighupReloadsTheFileAndABrokenFileKeepsTheOldOne) {
  auto late = Connect(node_->address(), kLateToken);
  EXPECT_TRUE(absl::IsUnauthenticated(late->OpenNamespace(Spec("late", "m")).status()));
  WriteAuthFile({"token sha256:" + Sha256Hex(kLateToken) + " tenant late"});
  node_->process().Signal(SIGHUP);
  absl::Status opened;
  for (int i = 0; i < 100; ++i) {  // the reload is asynchronous
    opened = late->OpenNamespace(Spec("late", "m")).status();
    if (opened.ok()) break;
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_TRUE(opened.ok()) << opened;

  WriteAuthFile({"token not-a-digest tenant late"});  // a bad line: refused whole
  node_->process().Signal(SIGHUP);
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_TRUE(late->OpenNamespace(Spec("late", "m")).ok()) << "a broken file replaced a good one";
  EXPECT_FALSE(node_->process().Exited());
}

TEST_F(AuthTest, OneClientClosingASharedNamespaceDoesNotEndAnothersUse) {
  // Two engines of one tenant share a namespace; the first one leaves.
  auto first = Connect(node_->address(), kAcmeToken);
  auto second = Connect(node_->address(), kAcmeToken);
  auto mine = first->OpenNamespace(Spec("acme", "shared-model"));
  auto theirs = second->OpenNamespace(Spec("acme", "shared-model"));
  ASSERT_TRUE(mine.ok() && theirs.ok());
  ASSERT_EQ(PublishStream(*first, *mine, 31, 4)->count(BlockOutcome::kOk), 4u);
  EXPECT_TRUE(mine->Close().ok());
  // The other engine still reads, writes and hints.
  EXPECT_EQ(FetchAndVerify(*second, *theirs, 31, 4), 4u);
  EXPECT_EQ(PublishStream(*second, *theirs, 32, 2)->count(BlockOutcome::kOk), 2u);
  const auto keys = theirs->Keys(testing::Tokens(32, 2, kTokensPerBlock));
  EXPECT_TRUE(theirs->RequestFinished(keys.back(), 10).ok());
  // Its own close is the last: the node forgets the namespace.
  EXPECT_TRUE(theirs->Close().ok());
  RawCaller raw(node_->address(), kAcmeToken);
  v1::LookupRequest lookup;
  lookup.set_namespace_id(theirs->id());
  lookup.add_keys(std::string(keys.front().view()));
  v1::LookupResponse found;
  EXPECT_EQ(raw.Call(&v1::CacheNode::Stub::Lookup, lookup, &found), grpc::StatusCode::NOT_FOUND);
}

TEST_F(AuthTest, ATenantOverItsQuotaEvictsItsOwnBlocksNotOthers) {
  // 64 MiB node (256 blocks); acme may hold 8 MiB (32 blocks) and 2 namespaces.
  WriteAuthFile({"quota acme dram_bytes=8388608 namespaces=2"});
  node_->process().Signal(SIGHUP);
  absl::SleepFor(absl::Milliseconds(300));
  auto globex = Connect(node_->address(), kGlobexToken);
  auto kept = globex->OpenNamespace(Spec("globex", "kept"));
  ASSERT_TRUE(kept.ok()) << kept.status();
  ASSERT_EQ(PublishStream(*globex, *kept, 60, 100, 20)->count(BlockOutcome::kOk), 100u);

  auto acme = Connect(node_->address(), kAcmeToken);
  auto flood = acme->OpenNamespace(Spec("acme", "flood"));
  ASSERT_TRUE(flood.ok()) << flood.status();
  auto flooded = PublishStream(*acme, *flood, 61, 400, 16);
  ASSERT_TRUE(flooded.ok()) << flooded.status();
  EXPECT_EQ(flooded->count(BlockOutcome::kOk), 400u) << "a tenant at its quota must make room";
  // Without the quota, 500 blocks in a 256-block tier would have evicted globex's.
  EXPECT_EQ(FetchAndVerify(*globex, *kept, 60, 100, 20), 100u);
  // acme's newest blocks are what it kept.
  const std::vector<BlockKey> keys = flood->Keys(testing::Tokens(61, 400, kTokensPerBlock));
  EXPECT_EQ(flood->Lookup(absl::MakeSpan(keys).subspan(0, 32))->prefix_length, 0u);
  const v1::StatsResponse stats = AdminStats();
  bool found = false;
  for (const v1::TenantStats& tenant : stats.tenants()) {
    if (tenant.tenant() != "acme") continue;
    found = true;
    EXPECT_LE(tenant.dram_bytes(), 8388608u);
    EXPECT_EQ(tenant.dram_quota_bytes(), 8388608u);
    EXPECT_GE(tenant.quota_evictions(), 400u - 32u);
    EXPECT_EQ(tenant.namespaces(), 1u);
  }
  EXPECT_TRUE(found) << "no per-tenant stats for acme";
  auto metrics = testing::HttpGet("127.0.0.1", node_->metrics_port(), "/metrics");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  EXPECT_NE(metrics->body.find("kvstrata_tenant_quota_evictions_total{tenant=\"acme\"}"),
            std::string::npos);

  // Namespaces: two at most, and closing one frees its slot.
  auto second = acme->OpenNamespace(Spec("acme", "second"));
  ASSERT_TRUE(second.ok()) << second.status();
  auto third = acme->OpenNamespace(Spec("acme", "third"));
  EXPECT_TRUE(absl::IsResourceExhausted(third.status())) << third.status();
  EXPECT_TRUE(second->Close().ok());
  EXPECT_TRUE(acme->OpenNamespace(Spec("acme", "third")).ok());
  // Another tenant cannot close acme's namespace.
  RawCaller raw(node_->address(), kGlobexToken);
  v1::CloseNamespaceRequest close;
  close.set_namespace_id(flood->id());
  v1::CloseNamespaceResponse closed;
  EXPECT_EQ(raw.Call(&v1::CacheNode::Stub::CloseNamespace, close, &closed),
            grpc::StatusCode::PERMISSION_DENIED);
}

TEST(MutualTlsAuthTest, TheCertificatesIdentityPicksItsTenants) {
  auto dir = testing::TempDir::Create("kvstrata-mtls-auth");
  ASSERT_TRUE(dir.ok());
  const std::string d = (*dir)->File("");
  ASSERT_TRUE(testing::MakeTestCertificates(d, "spiffe://test/acme-engine").ok());
  {
    std::ofstream out(d + "auth");
    out << "cert spiffe://test/acme-engine tenant acme\n"
        << "token sha256:" << Sha256Hex(kGlobexToken) << " tenant globex\n";
  }
  auto node = NodeProcess::Start(
      KVSTRATA_NODE_BINARY,
      {"--dram_bytes=67108864", "--tls_cert_file=" + d + "node.pem",
       "--tls_key_file=" + d + "node.key", "--tls_client_ca_file=" + d + "ca.pem",
       "--auth_file=" + d + "auth"});
  ASSERT_TRUE(node.ok()) << node.status();
  client::ClientOptions options{.node_address = (*node)->address(), .timeout = absl::Seconds(10)};
  options.tls_ca_file = d + "ca.pem";
  options.tls_cert_file = d + "client.pem";
  options.tls_key_file = d + "client.key";
  auto acme = Client::Connect(options);
  ASSERT_TRUE(acme.ok());
  auto ns = (*acme)->OpenNamespace(Spec("acme", "tls"));
  ASSERT_TRUE(ns.ok()) << ns.status();
  EXPECT_EQ(PublishStream(**acme, *ns, 7, 4)->count(BlockOutcome::kOk), 4u);
  EXPECT_EQ(FetchAndVerify(**acme, *ns, 7, 4), 4u);
  EXPECT_TRUE(absl::IsPermissionDenied((*acme)->OpenNamespace(Spec("globex", "tls")).status()))
      << "a certificate mapped to acme opened globex";
  // The same certificate with a token: the token names the caller.
  options.auth_token = kGlobexToken;
  auto globex = Client::Connect(options);
  ASSERT_TRUE(globex.ok());
  EXPECT_TRUE((*globex)->OpenNamespace(Spec("globex", "tls")).ok());
  EXPECT_TRUE(absl::IsPermissionDenied((*globex)->OpenNamespace(Spec("acme", "tls")).status()));
}

TEST(AuthStartTest, NonLoopbackListenWithoutAuthNeedsAnExplicitFlag) {
  auto refused = NodeProcess::Start(KVSTRATA_NODE_BINARY,
                                    {"--dram_bytes=67108864", "--listen=0.0.0.0:0"}, "",
                                    absl::Seconds(10));
  EXPECT_FALSE(refused.ok()) << "a node served the network without authentication";
  auto allowed =
      NodeProcess::Start(KVSTRATA_NODE_BINARY,
                         {"--dram_bytes=67108864", "--listen=0.0.0.0:0", "--allow_unauthenticated"});
  ASSERT_TRUE(allowed.ok()) << allowed.status();
  auto anyone = Connect((*allowed)->address(), "");
  EXPECT_TRUE(anyone->OpenNamespace(Spec("t", "m")).ok());
  // Client memory keys cannot be validated: never offered off loopback.
  auto rkeys = NodeProcess::Start(KVSTRATA_NODE_BINARY,
                                  {"--dram_bytes=67108864", "--listen=0.0.0.0:0",
                                   "--allow_unauthenticated", "--allow_client_rkeys"},
                                  "", absl::Seconds(10));
  EXPECT_FALSE(rkeys.ok()) << "--allow_client_rkeys served the network";
}

// ---- admission, stalls and jamming ---------------------------------------

class HostileTest : public testing::SharedNodeTest<HostileTest> {
 protected:
  static void SetUpTestSuite() {
    // 64 MiB: 256 blocks; one request may reserve an eighth (32 blocks).
    StartSharedNode(KVSTRATA_NODE_BINARY, {"--dram_bytes=67108864", "--slab_bytes=4194304",
                                           "--transfer_timeout=20s", "--transfer_stall_timeout=1s"});
  }
  void SetUp() override {
    ASSERT_NE(node_, nullptr);
    auto engine = transfer::Engine::Create({});
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = *std::move(engine);
    auto region = engine_->Allocate(64 * kBlock);
    ASSERT_TRUE(region.ok());
    region_ = *std::move(region);
  }

  v1::OpenNamespaceResponse OpenRaw(RawCaller& raw, const std::string& model) {
    v1::OpenNamespaceRequest open;
    *open.mutable_spec() = Spec("test", model);
    v1::OpenNamespaceResponse opened;
    EXPECT_EQ(raw.Call(&v1::CacheNode::Stub::OpenNamespace, open, &opened), grpc::StatusCode::OK);
    return opened;
  }

  // A tagged fetch of `keys` into a made-up region of `worker_address`.
  static v1::FetchRequest RawFetch(const v1::OpenNamespaceResponse& opened,
                                   const std::vector<BlockKey>& keys, uint64_t tag,
                                   const std::string& worker_address) {
    v1::FetchRequest fetch;
    fetch.set_namespace_id(opened.namespace_id());
    fetch.set_tag_base(uint64_t{opened.tag_prefix()} << 32 | tag << 16);
    fetch.mutable_destination()->set_worker_address(worker_address);
    v1::MemoryRegion* region = fetch.mutable_destination()->add_regions();
    region->set_base_address(0x10000);
    region->set_length(keys.size() * kBlock);
    for (size_t i = 0; i < keys.size(); ++i) {
      v1::FetchBlock* block = fetch.add_blocks();
      block->set_key(std::string(keys[i].view()));
      block->set_offset(i * kBlock);
      block->set_capacity(kBlock);
    }
    return fetch;
  }

  // A publish of `count` blocks from this test's (real) UCX worker, which
  // never answers the node's pull unless the caller serves it.
  v1::PublishRequest SilentPublish(uint64_t ns_id, size_t count, uint64_t tag_base,
                                   const std::string& worker_address) {
    v1::PublishRequest request;
    request.set_namespace_id(ns_id);
    request.set_tag_base(tag_base);
    request.mutable_source()->set_worker_address(worker_address);
    if (engine_->shared_memory_enabled())
      request.mutable_source()->set_host_id(transfer::Engine::HostId());
    v1::MemoryRegion* region = request.mutable_source()->add_regions();
    region->set_base_address(reinterpret_cast<uint64_t>(region_->data()));
    region->set_length(region_->size());
    for (size_t i = 0; i < count; ++i) {
      v1::PublishBlock* block = request.add_blocks();
      std::string key(16, 'k');
      key[0] = static_cast<char>(i);
      key[1] = static_cast<char>(i >> 8);
      block->set_key(key);
      block->set_region(0);
      block->set_offset((i % 64) * kBlock);
      block->set_size(kBlock);
      block->set_checksum(1);
    }
    return request;
  }

  static v1::StatsResponse Stats() {
    auto c = Connect(node_->address(), "");
    v1::StatsResponse stats;
    EXPECT_TRUE(c->Stats(&stats).ok());
    return stats;
  }

  std::unique_ptr<transfer::Engine> engine_;
  std::unique_ptr<transfer::MemoryRegion> region_;
};

TEST_F(HostileTest, GarbageWorkerAddressEvictsNothing) {
  auto victim = Connect(node_->address(), "");
  auto ns = victim->OpenNamespace(Spec("test", "victim-garbage"));
  ASSERT_TRUE(ns.ok());
  ASSERT_EQ(PublishStream(*victim, *ns, 11, 200, 25)->count(BlockOutcome::kOk), 200u);
  const uint64_t evictions = Stats().tiers(0).evictions();

  RawCaller raw(node_->address(), "");
  v1::OpenNamespaceResponse opened = OpenRaw(raw, "garbage");
  v1::PublishRequest request =
      SilentPublish(opened.namespace_id(), 200, uint64_t{opened.tag_prefix()} << 32 | 1 << 16,
                    std::string(300, '\x5a'));
  v1::PublishResponse response;
  EXPECT_NE(raw.Call(&v1::CacheNode::Stub::Publish, request, &response), grpc::StatusCode::OK);
  EXPECT_EQ(Stats().tiers(0).evictions(), evictions) << "a request that was refused evicted blocks";
  EXPECT_EQ(FetchAndVerify(*victim, *ns, 11, 200, 25), 200u);
}

TEST_F(HostileTest, SilentSourcesReleaseTheirReservationsAtTheStallTimeout) {
  RawCaller raw(node_->address(), "");
  v1::OpenNamespaceResponse opened = OpenRaw(raw, "silent");
  EXPECT_EQ(opened.max_publish_blocks(), 32u) << "an eighth of 64 MiB in 256 KiB blocks";
  const uint64_t used_before = Stats().tiers(0).used_bytes();
  // Eight concurrent publishes from one connection, from a real worker that
  // connects fine and then never sends a byte: 8 x 32 blocks would reserve
  // the whole tier, but one client may hold a quarter of it.
  std::vector<std::future<std::pair<grpc::StatusCode, absl::Duration>>> silent;
  for (int i = 0; i < 8; ++i) {
    silent.push_back(std::async(std::launch::async, [&, i] {
      v1::PublishRequest request =
          SilentPublish(opened.namespace_id(), 1000,
                        uint64_t{opened.tag_prefix()} << 32 | uint64_t(i + 2) << 16,
                        engine_->worker_address());
      v1::PublishResponse response;
      const absl::Time start = absl::Now();
      const grpc::StatusCode code = raw.Call(&v1::CacheNode::Stub::Publish, request, &response);
      return std::make_pair(code, absl::Now() - start);
    }));
  }
  absl::SleepFor(absl::Milliseconds(200));
  // Meanwhile another client publishes and reads back a quarter tier.
  auto other = Connect(node_->address(), "");
  auto ns = other->OpenNamespace(Spec("test", "bystander"));
  ASSERT_TRUE(ns.ok());
  auto published = PublishStream(*other, *ns, 12, 64, 64);
  ASSERT_TRUE(published.ok()) << published.status();
  EXPECT_EQ(published->count(BlockOutcome::kOk), 64u) << "silent publishes held the tier";
  EXPECT_EQ(FetchAndVerify(*other, *ns, 12, 64, 64), 64u);
  for (auto& call : silent) {
    const auto [code, took] = call.get();
    // Given up at the stall timeout, or refused (NO_SPACE per block, an OK
    // call) when the client's budget stayed full.
    EXPECT_TRUE(code == grpc::StatusCode::DEADLINE_EXCEEDED || code == grpc::StatusCode::OK)
        << code;
    EXPECT_LT(took, absl::Seconds(8)) << "held its reservation towards the 20 s transfer deadline";
  }
  EXPECT_GE(Stats().stalled_transfers(), 1u);
  // Only the bystander's 64 blocks remain in use; the silent reservations are gone.
  EXPECT_LE(Stats().tiers(0).used_bytes(), used_before + 64 * kBlock);
}

TEST_F(HostileTest, LargePublishesAreSplitToTheNodesShare) {
  auto c = Connect(node_->address(), "");
  auto ns = c->OpenNamespace(Spec("test", "split"));
  ASSERT_TRUE(ns.ok());
  // 100 blocks in one call: more than one request may reserve (32).
  auto published = PublishStream(*c, *ns, 13, 100, 100);
  ASSERT_TRUE(published.ok()) << published.status();
  EXPECT_EQ(published->count(BlockOutcome::kOk), 100u);
  EXPECT_EQ(FetchAndVerify(*c, *ns, 13, 100, 100), 100u);
}

TEST_F(HostileTest, FetchIntoTheNodesOwnWorkerIsRefused) {
  auto c = Connect(node_->address(), "");
  auto ns = c->OpenNamespace(Spec("test", "self"));
  ASSERT_TRUE(ns.ok());
  ASSERT_EQ(PublishStream(*c, *ns, 14, 4)->count(BlockOutcome::kOk), 4u);
  const std::vector<BlockKey> keys = ns->Keys(testing::Tokens(14, 4, kTokensPerBlock));
  RawCaller raw(node_->address(), "");
  v1::OpenNamespaceResponse opened = OpenRaw(raw, "self");
  v1::FetchRequest fetch = RawFetch(opened, keys, 3, opened.worker_address());
  fetch.mutable_destination()->set_host_id(opened.host_id());
  for (int round = 0; round < 20; ++round) {
    v1::FetchResponse response;
    EXPECT_EQ(raw.Call(&v1::CacheNode::Stub::Fetch, fetch, &response),
              grpc::StatusCode::INVALID_ARGUMENT);
  }
  EXPECT_EQ(FetchAndVerify(*c, *ns, 14, 4), 4u);
}

TEST_F(HostileTest, FetchesToClientsThatDiedLeaveNoSocketsBehind) {
  // A client killed between sending a fetch and the node's connect: the
  // node's endpoint to it fails (connection refused). UCX 1.13 keeps the
  // socket of such an endpoint open for good unless the node avoids it.
  auto c = Connect(node_->address(), "");
  auto ns = c->OpenNamespace(Spec("test", "dead-clients"));
  ASSERT_TRUE(ns.ok());
  ASSERT_EQ(PublishStream(*c, *ns, 15, 4)->count(BlockOutcome::kOk), 4u);
  const std::vector<BlockKey> keys = ns->Keys(testing::Tokens(15, 4, kTokensPerBlock));
  RawCaller raw(node_->address(), "");
  v1::OpenNamespaceResponse opened = OpenRaw(raw, "dead-clients");
  const pid_t pid = node_->process().pid();
  const uint64_t fds_before = NodeFds(pid);
  constexpr int kDeadClients = 12;
  for (int round = 0; round < kDeadClients; ++round) {
    std::string address;
    {
      auto dead = transfer::Engine::Create({});
      ASSERT_TRUE(dead.ok());
      address = (*dead)->worker_address();
    }  // its worker and listening sockets are gone now
    v1::FetchRequest fetch = RawFetch(opened, keys, round + 1, address);
    v1::FetchResponse response;
    EXPECT_NE(raw.Call(&v1::CacheNode::Stub::Fetch, fetch, &response), grpc::StatusCode::OK);
  }
  // Failed endpoints are closed within a second or two (the engine's reaper).
  uint64_t fds_after = 0;
  for (int i = 0; i < 50; ++i) {
    fds_after = NodeFds(pid);
    if (fds_after <= fds_before + 2) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  EXPECT_LE(fds_after, fds_before + 2) << kDeadClients << " dead clients left "
                                       << fds_after - fds_before << " fds in the node";
  EXPECT_EQ(FetchAndVerify(*c, *ns, 15, 4), 4u);
}

TEST_F(HostileTest, PlantedMessagesNeitherJamNorPoisonOtherPublishes) {
  // The attacker sends tagged messages straight to the node's worker, with
  // tags next to its own prefix (where sequential prefixes would put the
  // next client's) and pull-request tags.
  RawCaller raw(node_->address(), "");
  v1::OpenNamespaceResponse opened = OpenRaw(raw, "planter");
  auto peer = engine_->Connect(opened.worker_address(),
                               engine_->shared_memory_enabled() &&
                                   opened.host_id() == transfer::Engine::HostId(),
                               absl::Now() + absl::Seconds(10));
  ASSERT_TRUE(peer.ok()) << peer.status();
  std::vector<transfer::SendOp> planted;
  for (uint64_t prefix = opened.tag_prefix() + 1; prefix < opened.tag_prefix() + 9; ++prefix) {
    for (uint64_t i = 0; i < 8; ++i) {
      planted.push_back({region_->data(), 4096, (prefix << 32) | (1 << 16) | i});
    }
    planted.push_back({region_->data(), 4096, transfer::PullTag((prefix << 32) | (1 << 16))});
  }
  ASSERT_TRUE((*peer)->Send(planted, absl::Now() + absl::Seconds(10)).ok());
  absl::SleepFor(absl::Milliseconds(300));

  for (int round = 0; round < 4; ++round) {
    auto victim = Connect(node_->address(), "", absl::Seconds(10));
    auto ns = victim->OpenNamespace(Spec("test", absl::StrCat("victim-planted-", round)));
    ASSERT_TRUE(ns.ok());
    const absl::Time start = absl::Now();
    auto published = PublishStream(*victim, *ns, 20 + round, 8, 8);
    ASSERT_TRUE(published.ok()) << published.status();
    EXPECT_EQ(published->count(BlockOutcome::kOk), 8u);
    EXPECT_LT(absl::Now() - start, absl::Seconds(5));
    EXPECT_EQ(FetchAndVerify(*victim, *ns, 20 + round, 8, 8), 8u);
  }
  EXPECT_GE(Stats().discarded_messages(), planted.size())
      << "stray messages stayed queued in the node";
}

TEST(PinTest, AClientKilledMidFetchReleasesEveryPinnedBlock) {
  // 16 MiB: exactly 64 blocks, all of them fetched over and over by a child.
  auto node = NodeProcess::Start(
      KVSTRATA_NODE_BINARY, {"--dram_bytes=16777216", "--slab_bytes=1048576",
                             "--transfer_timeout=2s", "--max_request_share=1"});
  ASSERT_TRUE(node.ok()) << node.status();
  auto c = Connect((*node)->address(), "");
  auto ns = c->OpenNamespace(Spec("test", "pinned"));
  ASSERT_TRUE(ns.ok());
  ASSERT_EQ(PublishStream(*c, *ns, 50, 64, 64)->count(BlockOutcome::kOk), 64u);
  for (int round = 0; round < 3; ++round) {
    auto child = testing::ChildProcess::SpawnSelf(
        {"--child=fetch_forever", "--node=" + (*node)->address(), "--seed=50", "--count=64"});
    ASSERT_TRUE(child.ok());
    absl::SleepFor(absl::Milliseconds(400 + 200 * round));  // mid-fetch, at varying points
    (*child)->Signal(SIGKILL);
    EXPECT_EQ((*child)->Wait(), -SIGKILL);
  }
  // Past the transfer deadline every send to the dead clients has ended.
  absl::SleepFor(absl::Seconds(4));
  // A whole new tier's worth must fit: nothing of the old one may stay pinned.
  auto fresh = PublishStream(*c, *ns, 51, 64, 16);
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_EQ(fresh->count(BlockOutcome::kOk), 64u) << "blocks of killed clients stayed pinned";
  EXPECT_EQ(FetchAndVerify(*c, *ns, 51, 64, 16), 64u);
}

TEST(BoundsTest, CallsBeyondTheCapAreRefusedAndThreadsStayBounded) {
  auto node = NodeProcess::Start(
      KVSTRATA_NODE_BINARY, {"--dram_bytes=67108864", "--slab_bytes=4194304",
                             "--max_concurrent_calls=8", "--transfer_stall_timeout=2s"});
  ASSERT_TRUE(node.ok()) << node.status();
  auto engine = transfer::Engine::Create({});
  ASSERT_TRUE(engine.ok());
  auto region = (*engine)->Allocate(kBlock);
  ASSERT_TRUE(region.ok());
  RawCaller raw((*node)->address(), "");
  v1::OpenNamespaceRequest open;
  *open.mutable_spec() = Spec("test", "bounded");
  v1::OpenNamespaceResponse opened;
  ASSERT_EQ(raw.Call(&v1::CacheNode::Stub::OpenNamespace, open, &opened), grpc::StatusCode::OK);
  const uint64_t threads_before = NodeThreads((*node)->process().pid());

  // 40 publishes whose source never answers: each would park a thread.
  std::vector<std::future<grpc::StatusCode>> parked;
  for (int i = 0; i < 40; ++i) {
    parked.push_back(std::async(std::launch::async, [&, i] {
      v1::PublishRequest request;
      request.set_namespace_id(opened.namespace_id());
      request.set_tag_base(uint64_t{opened.tag_prefix()} << 32 | uint64_t(i + 1) << 16);
      request.mutable_source()->set_worker_address((*engine)->worker_address());
      v1::MemoryRegion* r = request.mutable_source()->add_regions();
      r->set_base_address(reinterpret_cast<uint64_t>((*region)->data()));
      r->set_length(kBlock);
      v1::PublishBlock* block = request.add_blocks();
      block->set_key(std::string(15, 'b') + static_cast<char>(i));
      block->set_size(kBlock);
      v1::PublishResponse response;
      RawCaller own((*node)->address(), "");
      return own.Call(&v1::CacheNode::Stub::Publish, request, &response);
    }));
  }
  absl::SleepFor(absl::Milliseconds(500));
  const uint64_t threads_during = NodeThreads((*node)->process().pid());
  size_t exhausted = 0;
  for (auto& call : parked) exhausted += call.get() == grpc::StatusCode::RESOURCE_EXHAUSTED;
  EXPECT_GT(exhausted, 0u) << "40 parked calls on a node capped at 8";
  EXPECT_LT(threads_during, threads_before + 20) << "a thread per parked call";
  // Served again once the parked calls are gone.
  auto c = Connect((*node)->address(), "");
  auto ns = c->OpenNamespace(Spec("test", "after"));
  ASSERT_TRUE(ns.ok()) << ns.status();
  EXPECT_EQ(PublishStream(*c, *ns, 30, 4)->count(BlockOutcome::kOk), 4u);
}

TEST(BoundsTest, ManyClientsAtALowFileLimitNeverAbortTheNode) {
  // prlimit pins the hard limit, so the node cannot raise it: 300 fds leave
  // it room for 16 client endpoints.
  if (std::system("command -v prlimit >/dev/null") != 0) GTEST_SKIP() << "no prlimit";
  auto dir = testing::TempDir::Create("kvstrata-fds");
  ASSERT_TRUE(dir.ok());
  const std::string wrapper = (*dir)->File("node.sh");
  {
    std::ofstream out(wrapper);
    out << "#!/bin/sh\nexec prlimit --nofile=300:300 " << KVSTRATA_NODE_BINARY << " \"$@\"\n";
  }
  ASSERT_EQ(std::system(("chmod +x " + wrapper).c_str()), 0);
  auto node = NodeProcess::Start(wrapper, {"--dram_bytes=67108864", "--slab_bytes=4194304"});
  ASSERT_TRUE(node.ok()) << node.status();
  size_t ok = 0;
  for (int i = 0; i < 40; ++i) {  // a distinct UCX worker each
    auto c = Connect((*node)->address(), "", absl::Seconds(10));
    auto ns = c->OpenNamespace(Spec("test", "fds"));
    ASSERT_TRUE(ns.ok()) << ns.status();
    auto published = PublishStream(*c, *ns, 40 + i, 1);
    if (published.ok() && published->count(BlockOutcome::kOk) == 1) ++ok;
  }
  EXPECT_FALSE((*node)->process().Exited()) << "the node died at its file limit";
  EXPECT_EQ(ok, 40u) << "idle endpoints were not recycled";
}

// ---- child processes ---------------------------------------------------------

// Fetches stream `seed` over and over until it is killed.
int RunChild(int argc, char** argv) {
  auto c = Client::Connect({.node_address = testing::ChildArg(argc, argv, "node")});
  if (!c.ok()) return 10;
  auto ns = (*c)->OpenNamespace(Spec("test", "pinned"));
  if (!ns.ok()) return 11;
  const uint64_t seed = std::stoull(testing::ChildArg(argc, argv, "seed"));
  const size_t count = std::stoull(testing::ChildArg(argc, argv, "count"));
  while (true) FetchAndVerify(**c, *ns, seed, count, count);
}

}  // namespace
}  // namespace kvstrata

int main(int argc, char** argv) {
  if (!kvstrata::testing::ChildArg(argc, argv, "child").empty()) return kvstrata::RunChild(argc, argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
