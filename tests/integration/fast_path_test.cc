// The fast path through a real node: small Publish/Fetch calls as UCX active
// messages (docs/ARCHITECTURE.md §3, "Fast path"), their limits, and what a
// hostile sender of such messages gets. ctest runs this binary once per
// transport (UCX_TLS=tcp, =sm).
#include <dirent.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <atomic>
#include <cstring>
#include <random>
#include <thread>

#include "absl/time/clock.h"
#include "kvstrata.grpc.pb.h"
#include "kvstrata/client/client.h"
#include "kvstrata/common/fast_path_wire.h"
#include "kvstrata/testing/blocks.h"
#include "kvstrata/testing/node_fixture.h"
#include "kvstrata/testing/process.h"
#include "kvstrata/testing/streams.h"
#include "kvstrata/transfer/active_message.h"
#include "kvstrata/transfer/engine.h"

namespace kvstrata {
namespace {

using client::BlockOutcome;
using client::Client;
using client::FetchItem;
using client::Namespace;
using client::PublishItem;
using testing::ChildProcess;
using testing::FetchAndVerify;
using testing::FillBlock;
using testing::NodeProcess;
using testing::PublishStream;

constexpr uint32_t kTokensPerBlock = 16;

v1::NamespaceSpec Spec(const std::string& model, uint64_t block_bytes,
                       const std::string& tenant = "") {
  v1::NamespaceSpec spec = testing::OpaqueSpec(model, block_bytes, kTokensPerBlock);
  if (!tenant.empty()) spec.set_tenant(tenant);
  return spec;
}

std::unique_ptr<Client> Connect(const std::string& address, bool fast_path = true) {
  return testing::ConnectOrFail(
      {.node_address = address, .timeout = absl::Seconds(20), .fast_path = fast_path});
}

// Open file descriptors of process `pid`.
size_t OpenFds(pid_t pid) {
  size_t count = 0;
  DIR* dir = opendir(("/proc/" + std::to_string(pid) + "/fd").c_str());
  if (dir == nullptr) return 0;
  while (readdir(dir) != nullptr) ++count;
  closedir(dir);
  return count;
}

class FastPathTest : public testing::SharedNodeTest<FastPathTest> {
 protected:
  static void SetUpTestSuite() {
    StartSharedNode(KVSTRATA_NODE_BINARY, {"--dram_bytes=268435456", "--slab_bytes=4194304",
                                           "--transfer_timeout=5s", "--transfer_stall_timeout=2s"});
  }
};

TEST_F(FastPathTest, RoundTripsByteExactAtEverySizeAndBatch) {
  auto c = Connect(node_->address());
  for (uint64_t block : {4096u, 16384u, 65536u}) {
    auto ns = c->OpenNamespace(Spec("exact-" + std::to_string(block), block));
    ASSERT_TRUE(ns.ok()) << ns.status();
    for (size_t batch : {1u, 32u}) {
      const uint64_t seed = block * 100 + batch;
      const v1::StatsResponse before = Stats(*c);
      auto published = PublishStream(*c, *ns, seed, 64, batch);
      ASSERT_TRUE(published.ok()) << published.status();
      EXPECT_EQ(published->count(BlockOutcome::kOk), 64u) << block << " x " << batch;
      EXPECT_EQ(published->bytes, 64 * block);
      EXPECT_EQ(FetchAndVerify(*c, *ns, seed, 64, batch), 64u) << block << " x " << batch;
      // Every call went over the fast path: one request each, none refused.
      const v1::StatsResponse after = Stats(*c);
      // A call goes as requests of about 512 KiB each, in flight together.
      const uint64_t per_call = (batch * block + (512u << 10) - 1) / (512u << 10);
      EXPECT_EQ(after.fast_path_requests() - before.fast_path_requests(), 2 * 64 / batch * per_call)
          << block << " x " << batch;
      EXPECT_EQ(after.fast_path_refused(), before.fast_path_refused());
    }
  }
}

// A fetch whose destinations lie back to back gets a full reply straight
// into them (no staging copy); scattered destinations, or a reply short of a
// block, take the copy. Either way every hit is byte-exact, and a missed
// block's destination is never written.
TEST_F(FastPathTest, BackToBackScatteredAndShortRepliesAllLandRight) {
  auto c = Connect(node_->address());
  constexpr uint64_t kBlock = 65536;
  constexpr size_t kCount = 8;
  auto ns = c->OpenNamespace(Spec("in-place", kBlock));
  ASSERT_TRUE(ns.ok()) << ns.status();
  ASSERT_EQ(PublishStream(*c, *ns, 77, kCount, kCount)->count(BlockOutcome::kOk), kCount);
  const std::vector<BlockKey> keys = ns->Keys(testing::Tokens(77, kCount, kTokensPerBlock));
  const BlockKey absent = ns->Keys(testing::Tokens(78, 1, kTokensPerBlock))[0];
  auto buffer = c->Allocate((kCount + 1) * kBlock);
  ASSERT_TRUE(buffer.ok());
  std::vector<uint8_t> expected(kBlock);
  auto check = [&](size_t block, size_t slot) {
    FillBlock(77, block, expected.data(), kBlock);
    return std::memcmp(expected.data(), (*buffer)->data() + slot * kBlock, kBlock) == 0;
  };
  const v1::StatsResponse before = Stats(*c);
  // Back to back, all hits: the reply fills the buffer directly.
  std::memset((*buffer)->data(), 0xee, (kCount + 1) * kBlock);
  std::vector<FetchItem> items;
  for (size_t i = 0; i < kCount; ++i) items.push_back({keys[i], buffer->get(), i * kBlock});
  auto fetched = ns->Fetch(items);
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  for (size_t i = 0; i < kCount; ++i) {
    EXPECT_EQ(fetched->outcomes[i], BlockOutcome::kOk);
    EXPECT_TRUE(check(i, i)) << "back to back, block " << i;
  }
  EXPECT_EQ((*buffer)->data()[kCount * kBlock], 0xee) << "written past the last destination";
  // Scattered (reversed) destinations.
  std::memset((*buffer)->data(), 0, (kCount + 1) * kBlock);
  items.clear();
  for (size_t i = 0; i < kCount; ++i) items.push_back({keys[i], buffer->get(), (kCount - 1 - i) * kBlock});
  fetched = ns->Fetch(items);
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  for (size_t i = 0; i < kCount; ++i) EXPECT_TRUE(check(i, kCount - 1 - i)) << "scattered, block " << i;
  // Back to back with a miss in the middle: the reply is a block short.
  std::memset((*buffer)->data(), 0xee, (kCount + 1) * kBlock);
  items.clear();
  for (size_t i = 0; i < 4; ++i) items.push_back({keys[i], buffer->get(), i * kBlock});
  items.push_back({absent, buffer->get(), 4 * kBlock});
  for (size_t i = 4; i < kCount; ++i) items.push_back({keys[i], buffer->get(), (i + 1) * kBlock});
  fetched = ns->Fetch(items);
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  EXPECT_EQ(fetched->outcomes[4], BlockOutcome::kNotFound);
  for (size_t i = 0; i < kCount; ++i) {
    const size_t slot = i < 4 ? i : i + 1;
    EXPECT_EQ(fetched->outcomes[slot], BlockOutcome::kOk);
    EXPECT_TRUE(check(i, slot)) << "with a miss, block " << i;
  }
  for (size_t k = 0; k < kBlock; k += 4093) {
    ASSERT_EQ((*buffer)->data()[4 * kBlock + k], 0xee) << "the missed block's destination was written";
  }
  // All three went over the fast path; the last as two requests (512 KiB
  // each at most): eight blocks with the miss (copied), then one (in place).
  EXPECT_EQ(Stats(*c).fast_path_requests() - before.fast_path_requests(), 4u);
}

TEST_F(FastPathTest, LookupOfUpTo64KeysIsOneFastPathRequest) {
  auto c = Connect(node_->address());
  auto ns = c->OpenNamespace(Spec("lookup", 4096));
  ASSERT_TRUE(ns.ok()) << ns.status();
  ASSERT_EQ(PublishStream(*c, *ns, 3, 40, 40)->count(BlockOutcome::kOk), 40u);
  const std::vector<BlockKey> keys = ns->Keys(testing::Tokens(3, 64, kTokensPerBlock));
  const v1::StatsResponse before = Stats(*c);
  auto found = ns->Lookup(keys);
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ(found->prefix_length, 40u);
  EXPECT_EQ(found->tiers.size(), 40u);
  const v1::StatsResponse after = Stats(*c);
  EXPECT_EQ(after.fast_path_requests() - before.fast_path_requests(), 1u);
  EXPECT_EQ(after.lookup_hit_blocks() - before.lookup_hit_blocks(), 40u);
  // More keys than one request carries: gRPC, same answer.
  const std::vector<BlockKey> many = ns->Keys(testing::Tokens(3, 100, kTokensPerBlock));
  EXPECT_EQ(ns->Lookup(many)->prefix_length, 40u);
  EXPECT_EQ(Stats(*c).fast_path_requests(), after.fast_path_requests());
}

TEST_F(FastPathTest, MixedSizesAndBothPathsConcurrently) {
  // Three block sizes at once from three threads, with batches that fit the
  // fast path (1..40 blocks) and some that do not (80 blocks: gRPC), all on
  // one client and one UCX engine.
  auto c = Connect(node_->address());
  std::vector<std::thread> threads;
  std::atomic<size_t> wrong{0};
  for (uint64_t block : {4096u, 16384u, 65536u}) {
    threads.emplace_back([&, block] {
      auto ns = c->OpenNamespace(Spec("mixed-" + std::to_string(block), block));
      if (!ns.ok()) {
        wrong += 1000;
        return;
      }
      size_t seed = block;
      for (size_t batch : {1u, 7u, 40u, 80u, 3u}) {
        const size_t count = batch * 2;
        const absl::Time start = absl::Now();
        auto published = PublishStream(*c, *ns, ++seed, count, batch);
        if (!published.ok() || published->count(BlockOutcome::kOk) != count) {
          wrong += count;
          ADD_FAILURE() << "publish " << block << " x " << batch << " after "
                        << absl::Now() - start << ": "
                        << (published.ok() ? "" : published.status().ToString());
        }
        const size_t good = FetchAndVerify(*c, *ns, seed, count, batch);
        if (good != count) ADD_FAILURE() << "fetch " << block << " x " << batch;
        wrong += count - good;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(wrong.load(), 0u);
}

TEST_F(FastPathTest, DedupMovesNoBytesForPresentBlocks) {
  auto c = Connect(node_->address());
  for (uint64_t block : {4096u, 65536u}) {  // eager, and rendezvous at batch 32
    auto ns = c->OpenNamespace(Spec("dedup-" + std::to_string(block), block));
    ASSERT_TRUE(ns.ok()) << ns.status();
    ASSERT_EQ(PublishStream(*c, *ns, 5, 32, 32)->count(BlockOutcome::kOk), 32u);
    const v1::StatsResponse before = Stats(*c);
    auto again = PublishStream(*c, *ns, 5, 32, 32);
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(again->count(BlockOutcome::kAlreadyPresent), 32u);
    EXPECT_EQ(again->bytes, 0u);
    const v1::StatsResponse after = Stats(*c);
    EXPECT_EQ(after.bytes_in(), before.bytes_in()) << "a present block was stored again";
    EXPECT_EQ(after.published_blocks(), before.published_blocks());
    EXPECT_EQ(after.tiers(0).used_bytes(), before.tiers(0).used_bytes());
    EXPECT_EQ(after.fast_path_requests() - before.fast_path_requests(),
              (32 * block + (512u << 10) - 1) / (512u << 10));
  }
}

TEST_F(FastPathTest, BlocksOnlyOnNvmeAreNotOnTheFastPathButStillFetched) {
  // A node without NVMe has none: the reply's kNotInMemory path is covered
  // by the client merging gRPC results; here a miss among hits stays a miss.
  auto c = Connect(node_->address());
  auto ns = c->OpenNamespace(Spec("misses", 16384));
  ASSERT_TRUE(ns.ok()) << ns.status();
  ASSERT_EQ(PublishStream(*c, *ns, 9, 8, 8)->count(BlockOutcome::kOk), 8u);
  std::vector<BlockKey> keys = ns->Keys(testing::Tokens(9, 8, kTokensPerBlock));
  keys[3].bytes[0] ^= 0xff;  // never published
  auto buffer = c->Allocate(8 * 16384);
  ASSERT_TRUE(buffer.ok());
  std::vector<FetchItem> items;
  for (size_t i = 0; i < 8; ++i) items.push_back({keys[i], buffer->get(), i * 16384});
  auto fetched = ns->Fetch(items);
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  std::vector<uint8_t> expected(16384);
  for (size_t i = 0; i < 8; ++i) {
    if (i == 3) {
      EXPECT_EQ(fetched->outcomes[i], BlockOutcome::kNotFound);
      continue;
    }
    ASSERT_EQ(fetched->outcomes[i], BlockOutcome::kOk) << i;
    FillBlock(9, i, expected.data(), expected.size());
    EXPECT_EQ(std::memcmp(expected.data(), (*buffer)->data() + i * 16384, 16384), 0) << i;
  }
}

// ---- raw active messages: what a careless or hostile sender gets -----------

class RawFastPathTest : public FastPathTest {
 protected:
  static constexpr uint64_t kBlock = 16384;

  void SetUp() override {
    FastPathTest::SetUp();
    stub_ = v1::CacheNode::NewStub(
        grpc::CreateChannel(node_->address(), grpc::InsecureChannelCredentials()));
    auto engine = transfer::Engine::Create({});
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = *std::move(engine);
    opened_ = Open(Spec("raw-fast", kBlock, "tenant-a"));
    other_ = Open(Spec("raw-fast-other", kBlock, "tenant-b"));
    ASSERT_EQ(opened_.fast_path_capability().size(), 16u);
    const bool same_host =
        engine_->shared_memory_enabled() && opened_.host_id() == transfer::Engine::HostId();
    auto peer =
        engine_->Connect(opened_.worker_address(), same_host, absl::Now() + absl::Seconds(10));
    ASSERT_TRUE(peer.ok()) << peer.status();
    peer_ = *std::move(peer);
  }

  v1::OpenNamespaceResponse Open(const v1::NamespaceSpec& spec) {
    v1::OpenNamespaceRequest open;
    *open.mutable_spec() = spec;
    v1::OpenNamespaceResponse opened;
    grpc::ClientContext context;
    EXPECT_TRUE(stub_->OpenNamespace(&context, open, &opened).ok());
    return opened;
  }

  static fastpath::Capability CapabilityOf(const v1::OpenNamespaceResponse& opened) {
    fastpath::Capability capability{};
    std::memcpy(capability.data(), opened.fast_path_capability().data(),
                std::min(capability.size(), opened.fast_path_capability().size()));
    return capability;
  }

  static BlockKey Key(uint8_t tag, size_t i) {
    BlockKey key;
    key.bytes.fill(tag);
    key.bytes[0] = static_cast<uint8_t>(i);
    return key;
  }

  // A publish of `count` blocks of pattern `tag`, with right checksums.
  fastpath::Request PublishRequest(uint8_t tag, size_t count, std::vector<uint8_t>* data) {
    fastpath::Request request;
    request.op = fastpath::Op::kPublish;
    request.capability = CapabilityOf(opened_);
    request.namespace_id = opened_.namespace_id();
    request.block_bytes = kBlock;
    data->assign(count * kBlock, 0);
    for (size_t i = 0; i < count; ++i) {
      FillBlock(tag, i, data->data() + i * kBlock, kBlock);
      request.blocks.push_back({.key = Key(tag, i),
                                .checksum = BlockChecksum(data->data() + i * kBlock, kBlock)});
    }
    return request;
  }

  // Sends a raw header and data; the decoded reply (or why none).
  absl::StatusOr<fastpath::Reply> Send(std::string_view header, const std::vector<uint8_t>& data) {
    transfer::SendOp op{data.data(), data.size(), 0};
    absl::StatusOr<transfer::AmReply> reply =
        peer_->Call(header, data.empty() ? absl::Span<const transfer::SendOp>()
                                         : absl::Span<const transfer::SendOp>(&op, 1),
                    absl::Now() + absl::Seconds(10));
    if (!reply.ok()) return reply.status();
    return fastpath::DecodeReply(reply->header);
  }

  bool Stored(uint8_t tag, size_t i) {
    v1::LookupRequest lookup;
    lookup.set_namespace_id(opened_.namespace_id());
    lookup.add_keys(std::string(Key(tag, i).view()));
    v1::LookupResponse found;
    grpc::ClientContext context;
    EXPECT_TRUE(stub_->Lookup(&context, lookup, &found).ok());
    return found.prefix_length() == 1;
  }

  std::unique_ptr<v1::CacheNode::Stub> stub_;
  std::unique_ptr<transfer::Engine> engine_;
  std::shared_ptr<transfer::Peer> peer_;
  v1::OpenNamespaceResponse opened_;
  v1::OpenNamespaceResponse other_;
};

TEST_F(RawFastPathTest, AChecksumMismatchFailsItsBlockAlone) {
  std::vector<uint8_t> data;
  fastpath::Request request = PublishRequest(0x31, 8, &data);
  request.blocks[3].checksum ^= 1;
  data[5 * kBlock + 100] ^= 0x40;  // block 5's bytes damaged after checksumming
  absl::StatusOr<fastpath::Reply> reply = Send(fastpath::EncodeRequest(request), data);
  ASSERT_TRUE(reply.ok()) << reply.status();
  ASSERT_EQ(reply->code, 0u) << reply->message;
  ASSERT_EQ(reply->blocks.size(), 8u);
  for (size_t i = 0; i < 8; ++i) {
    const bool bad = i == 3 || i == 5;
    EXPECT_EQ(reply->blocks[i].status, bad ? v1::BLOCK_CHECKSUM_MISMATCH : v1::BLOCK_OK) << i;
    EXPECT_EQ(Stored(0x31, i), !bad) << i;
  }
}

TEST_F(RawFastPathTest, HostileRequestsGetErrorsWhileAnotherClientKeepsWorking) {
  // A well-behaved client publishes and fetches the whole time.
  std::atomic<bool> stop{false};
  std::atomic<size_t> good_rounds{0}, bad_rounds{0};
  std::thread honest([&] {
    auto c = Connect(node_->address());
    auto ns = c->OpenNamespace(Spec("honest", 16384));
    if (!ns.ok()) {
      ++bad_rounds;
      return;
    }
    for (uint64_t seed = 1; !stop.load(); ++seed) {
      auto published = PublishStream(*c, *ns, seed, 8, 8);
      const bool ok = published.ok() && published->count(BlockOutcome::kOk) == 8 &&
                      FetchAndVerify(*c, *ns, seed, 8, 8) == 8;
      ++(ok ? good_rounds : bad_rounds);
    }
  });

  auto expect_refused = [&](const std::string& what, std::string_view header,
                            const std::vector<uint8_t>& data, absl::StatusCode code) {
    absl::StatusOr<fastpath::Reply> reply = Send(header, data);
    ASSERT_TRUE(reply.ok()) << what << ": " << reply.status();
    EXPECT_EQ(reply->code, static_cast<uint32_t>(code)) << what << ": " << reply->message;
    EXPECT_TRUE(reply->blocks.empty()) << what;
  };
  std::vector<uint8_t> data;
  const fastpath::Request good = PublishRequest(0x51, 4, &data);
  const std::string header = fastpath::EncodeRequest(good);

  std::mt19937_64 random(7);
  for (int round = 0; round < 50; ++round) {
    std::string garbage(8 + random() % 600, '\0');
    for (char& ch : garbage) ch = static_cast<char>(random());
    expect_refused("garbage", garbage, {}, absl::StatusCode::kInvalidArgument);
  }
  for (size_t cut : {0ul, 3ul, 20ul, 40ul, header.size() - 1}) {
    expect_refused("truncated at " + std::to_string(cut), header.substr(0, cut), data,
                   absl::StatusCode::kInvalidArgument);
  }
  for (int bit = 0; bit < 8 * 28; ++bit) {  // every bit of op, padding and capability
    std::string flipped = header;
    flipped[4 + bit / 8] ^= static_cast<char>(1 << (bit % 8));
    absl::StatusOr<fastpath::Reply> reply = Send(flipped, data);
    ASSERT_TRUE(reply.ok()) << reply.status();
    EXPECT_NE(reply->code, 0u) << "bit " << bit << " flipped was served";
  }
  {
    fastpath::Request wrong = good;
    wrong.capability[0] ^= 1;
    expect_refused("wrong capability", fastpath::EncodeRequest(wrong), data,
                   absl::StatusCode::kPermissionDenied);
  }
  {
    fastpath::Request foreign = good;  // tenant-a's capability, tenant-b's namespace
    foreign.namespace_id = other_.namespace_id();
    expect_refused("another tenant's namespace", fastpath::EncodeRequest(foreign), data,
                   absl::StatusCode::kPermissionDenied);
  }
  {
    fastpath::Request huge = good;
    huge.block_bytes = 1u << 30;
    expect_refused("oversized", fastpath::EncodeRequest(huge), data,
                   absl::StatusCode::kInvalidArgument);
  }
  {
    fastpath::Request sized = good;
    sized.block_bytes = kBlock / 2;
    expect_refused("wrong block size", fastpath::EncodeRequest(sized), data,
                   absl::StatusCode::kInvalidArgument);
  }
  expect_refused("short data", header, std::vector<uint8_t>(data.begin(), data.end() - 1),
                 absl::StatusCode::kInvalidArgument);
  expect_refused("no data", header, {}, absl::StatusCode::kInvalidArgument);
  {
    std::vector<uint8_t> more = data;
    more.resize(data.size() + kBlock);
    expect_refused("long data", header, more, absl::StatusCode::kInvalidArgument);
  }
  for (size_t i = 0; i < 4; ++i) EXPECT_FALSE(Stored(0x51, i)) << i;

  // The good request still works, and so did the honest client throughout.
  absl::StatusOr<fastpath::Reply> reply = Send(header, data);
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_EQ(reply->code, 0u) << reply->message;
  for (size_t i = 0; i < 4; ++i) EXPECT_TRUE(Stored(0x51, i)) << i;
  absl::SleepFor(absl::Milliseconds(200));
  stop = true;
  honest.join();
  EXPECT_GT(good_rounds.load(), 0u);
  EXPECT_EQ(bad_rounds.load(), 0u);
}

TEST_F(RawFastPathTest, ACapabilityDiesWhenItsOpenerCloses) {
  // Two openers of one namespace: the first one's close revokes its own
  // capability only; the last close revokes every one.
  const v1::OpenNamespaceResponse first = Open(Spec("closing", kBlock));
  const v1::OpenNamespaceResponse second = Open(Spec("closing", kBlock));
  ASSERT_NE(first.fast_path_capability(), second.fast_path_capability());
  auto publish = [&](const v1::OpenNamespaceResponse& opener, uint8_t tag) {
    std::vector<uint8_t> data;
    fastpath::Request request = PublishRequest(tag, 2, &data);
    request.capability = CapabilityOf(opener);
    request.namespace_id = opener.namespace_id();
    absl::StatusOr<fastpath::Reply> reply = Send(fastpath::EncodeRequest(request), data);
    EXPECT_TRUE(reply.ok()) << reply.status();
    return reply.ok() ? reply->code : 999u;
  };
  auto close = [&](const v1::OpenNamespaceResponse& opener, bool with_capability) {
    v1::CloseNamespaceRequest request;
    request.set_namespace_id(opener.namespace_id());
    if (with_capability) request.set_fast_path_capability(opener.fast_path_capability());
    v1::CloseNamespaceResponse response;
    grpc::ClientContext context;
    EXPECT_TRUE(stub_->CloseNamespace(&context, request, &response).ok());
  };
  const uint32_t denied = static_cast<uint32_t>(absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(publish(first, 0x61), 0u);
  close(first, /*with_capability=*/true);
  EXPECT_EQ(publish(first, 0x62), denied);
  EXPECT_EQ(publish(second, 0x63), 0u);
  close(second, /*with_capability=*/false);  // the last close: every capability goes
  EXPECT_EQ(publish(second, 0x64), denied);
}

// ---- a client killed mid-batch ----------------------------------------------

TEST_F(FastPathTest, ClientsKilledMidBatchLeakNoMemoryAndNoFds) {
  auto c = Connect(node_->address());
  auto held = [&] {  // tier memory beyond what it stores: reservations in flight
    const v1::StatsResponse stats = Stats(*c);
    if (stats.tiers_size() == 0) {  // the node is gone: fail here, not on tiers(0)
      ADD_FAILURE() << "no Stats from the node";
      return int64_t{-1};
    }
    return static_cast<int64_t>(stats.tiers(0).used_bytes()) -
           static_cast<int64_t>(stats.tiers(0).stored_bytes());
  };
  const int64_t before = held();
  const pid_t node_pid = node_->process().pid();
  size_t fds_after_first = 0;
  for (int round = 0; round < 3; ++round) {
    const uint64_t start_requests = Stats(*c).fast_path_requests();
    auto child = ChildProcess::SpawnSelf({"--child=fast_forever", "--node=" + node_->address()});
    ASSERT_TRUE(child.ok()) << child.status();
    const absl::Time give_up = absl::Now() + absl::Seconds(30);
    while (Stats(*c).fast_path_requests() - start_requests < 40 && absl::Now() < give_up) {
      absl::SleepFor(absl::Milliseconds(20));
    }
    ASSERT_GE(Stats(*c).fast_path_requests() - start_requests, 40u) << "the child never got going";
    (*child)->Signal(SIGKILL);
    EXPECT_EQ((*child)->Wait(), -SIGKILL);
    absl::SleepFor(absl::Milliseconds(300));
    if (round == 0) fds_after_first = OpenFds(node_pid);
  }
  const absl::Time settle = absl::Now() + absl::Seconds(10);
  while (held() != before && absl::Now() < settle) absl::SleepFor(absl::Milliseconds(100));
  EXPECT_EQ(held(), before) << "a killed client's reservations were not released";
  // Each dead client may hold its UCX sockets until the node notices (the
  // idle reaper: 30 s); killing more must not grow them beyond that.
  EXPECT_LE(OpenFds(node_pid), fds_after_first + 16);
  // And the node serves a new client over the fast path.
  auto ns = c->OpenNamespace(Spec("after-kill", 65536));
  ASSERT_TRUE(ns.ok()) << ns.status();
  absl::StatusOr<client::TransferResult> published = PublishStream(*c, *ns, 77, 64, 32);
  ASSERT_TRUE(published.ok()) << published.status();
  ASSERT_EQ(published->count(BlockOutcome::kOk), 64u);
  EXPECT_EQ(FetchAndVerify(*c, *ns, 77, 64, 32), 64u);
}

int RunChild(int argc, char** argv) {
  auto c = Client::Connect({.node_address = testing::ChildArg(argc, argv, "node")});
  if (!c.ok()) return 10;
  if (testing::ChildArg(argc, argv, "child") == "fast_forever") {
    // Fast-path publishes and fetches of 2 MiB batches (rendezvous) until killed.
    auto ns = (*c)->OpenNamespace(Spec("doomed-fast", 65536));
    if (!ns.ok()) return 11;
    for (uint64_t seed = 1;; ++seed) {
      PublishStream(**c, *ns, seed, 32, 32).IgnoreError();
      FetchAndVerify(**c, *ns, seed, 32, 32);
    }
  }
  return 20;
}

}  // namespace
}  // namespace kvstrata

int main(int argc, char** argv) {
  if (!kvstrata::testing::ChildArg(argc, argv, "child").empty()) return kvstrata::RunChild(argc, argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
