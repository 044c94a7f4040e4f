// Small blocks through a real node: coalesced tagged transfers (several
// blocks per UCX message, eager), next to the one-message-per-block path they
// replace for blocks up to 16 KiB. ctest runs this binary once per transport
// (UCX_TLS=tcp, =sm).
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <cstring>
#include <future>
#include <random>
#include <set>

#include "absl/time/clock.h"
#include "kvstrata.grpc.pb.h"
#include "kvstrata/client/client.h"
#include "kvstrata/client/quantized.h"
#include "kvstrata/common/limits.h"
#include "kvstrata/kvstrata.h"
#include "kvstrata/testing/blocks.h"
#include "kvstrata/testing/node_fixture.h"
#include "kvstrata/testing/process.h"
#include "kvstrata/testing/streams.h"
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

v1::NamespaceSpec Spec(const std::string& model, uint64_t block_bytes) {
  return testing::OpaqueSpec(model, block_bytes, kTokensPerBlock);
}

// The fast path off: these tests are about the gRPC path's coalesced
// transfers, which small calls would otherwise not take (fast_path_test.cc
// covers the fast path).
std::unique_ptr<Client> Connect(const std::string& address, bool coalesce = true) {
  return testing::ConnectOrFail({.node_address = address,
                                 .timeout = absl::Seconds(20),
                                 .coalesce_small_blocks = coalesce,
                                 .fast_path = false});
}

class SmallBlocksTest : public testing::SharedNodeTest<SmallBlocksTest> {
 protected:
  static void SetUpTestSuite() {
    StartSharedNode(KVSTRATA_NODE_BINARY, {"--dram_bytes=536870912", "--slab_bytes=4194304",
                                           "--transfer_timeout=5s", "--transfer_stall_timeout=2s"});
  }
};

TEST_F(SmallBlocksTest, CoalescedBlocksRoundTripByteExact) {
  // 100 blocks: several coalesced messages per call (128 of 4 KiB, 32 of
  // 16 KiB per message) and a short last one; batches of 37 make partial
  // messages too; 64 KiB blocks go one message each. The same data
  // round-trips with coalescing off.
  for (bool coalesce : {true, false}) {
    auto c = Connect(node_->address(), coalesce);
    ASSERT_NE(c, nullptr);
    for (uint64_t size : {4096u, 16384u, 65536u}) {
      auto ns = c->OpenNamespace(Spec(coalesce ? "coalesced" : "per-block", size));
      ASSERT_TRUE(ns.ok()) << ns.status();
      const uint64_t seed = size + (coalesce ? 1 : 2);
      auto published = PublishStream(*c, *ns, seed, 100, 100);
      ASSERT_TRUE(published.ok()) << published.status();
      EXPECT_EQ(published->count(BlockOutcome::kOk), 100u) << size;
      EXPECT_EQ(published->bytes, 100 * size);
      EXPECT_EQ(FetchAndVerify(*c, *ns, seed, 100, 100), 100u) << size;
      EXPECT_EQ(FetchAndVerify(*c, *ns, seed, 100, 37), 100u) << size;
      EXPECT_EQ(FetchAndVerify(*c, *ns, seed, 100, 1), 100u) << size;
    }
  }
}

TEST_F(SmallBlocksTest, CoalescedFetchPutsEveryHitInItsOwnBufferAroundMisses) {
  auto c = Connect(node_->address());
  constexpr uint64_t kSize = 16384;
  constexpr size_t kCount = 70;  // three messages of 32, 32 and 6 blocks
  auto ns = c->OpenNamespace(Spec("holes", kSize));
  ASSERT_TRUE(ns.ok()) << ns.status();
  ASSERT_EQ(PublishStream(*c, *ns, 9, kCount, kCount)->count(BlockOutcome::kOk), kCount);
  const auto keys = ns->Keys(testing::Tokens(9, kCount, kTokensPerBlock));
  // Misses at both ends, around a message boundary, and a run of them.
  const std::set<size_t> missing = {0, 5, 31, 32, 33, 50, 51, 52, 53, 69};
  std::vector<BlockKey> gone;
  for (size_t i : missing) gone.push_back(keys[i]);
  ASSERT_EQ(ns->Delete(gone).value(), missing.size());

  auto buffer = c->Allocate(kCount * kSize);
  ASSERT_TRUE(buffer.ok());
  std::memset((*buffer)->data(), 0xee, kCount * kSize);
  std::vector<FetchItem> items;
  for (size_t i = 0; i < kCount; ++i) items.push_back({keys[i], buffer->get(), i * kSize});
  auto fetched = ns->Fetch(items);
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  std::vector<uint8_t> expected(kSize);
  for (size_t i = 0; i < kCount; ++i) {
    const uint8_t* got = (*buffer)->data() + i * kSize;
    if (missing.contains(i)) {
      EXPECT_EQ(fetched->outcomes[i], BlockOutcome::kNotFound) << i;
      // A miss's buffer is never written.
      EXPECT_TRUE(std::all_of(got, got + kSize, [](uint8_t b) { return b == 0xee; })) << i;
      continue;
    }
    EXPECT_EQ(fetched->outcomes[i], BlockOutcome::kOk) << i;
    EXPECT_EQ(fetched->sizes[i], kSize);
    FillBlock(9, i, expected.data(), kSize);
    EXPECT_EQ(std::memcmp(expected.data(), got, kSize), 0) << "block " << i << " misplaced";
  }
  // All misses: no message comes, the call still answers at once.
  std::vector<FetchItem> only_missing;
  for (size_t i : missing) only_missing.push_back({keys[i], buffer->get(), i * kSize});
  const absl::Time start = absl::Now();
  auto none = ns->Fetch(only_missing);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(none->count(BlockOutcome::kNotFound), missing.size());
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
}

TEST_F(SmallBlocksTest, CoalescedRepublishMovesBytesOnlyForMissingBlocks) {
  auto c = Connect(node_->address());
  constexpr uint64_t kSize = 16384;
  constexpr size_t kCount = 40;
  auto ns = c->OpenNamespace(Spec("dedup", kSize));
  ASSERT_TRUE(ns.ok()) << ns.status();
  ASSERT_EQ(PublishStream(*c, *ns, 21, kCount, kCount)->count(BlockOutcome::kOk), kCount);
  const auto keys = ns->Keys(testing::Tokens(21, kCount, kTokensPerBlock));
  std::vector<BlockKey> gone;
  for (size_t i = 0; i < kCount; i += 3) gone.push_back(keys[i]);
  ASSERT_EQ(ns->Delete(gone).value(), gone.size());

  const uint64_t bytes_in = Stats(*c).bytes_in();
  auto again = PublishStream(*c, *ns, 21, kCount, kCount);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->count(BlockOutcome::kOk), gone.size());
  EXPECT_EQ(again->count(BlockOutcome::kAlreadyPresent), kCount - gone.size());
  EXPECT_EQ(again->bytes, gone.size() * kSize);
  EXPECT_EQ(Stats(*c).bytes_in() - bytes_in, gone.size() * kSize)
      << "present blocks must not travel";
  EXPECT_EQ(FetchAndVerify(*c, *ns, 21, kCount, kCount), kCount);

  // Everything present: no byte moves at all.
  auto third = PublishStream(*c, *ns, 21, kCount, kCount);
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_EQ(third->count(BlockOutcome::kAlreadyPresent), kCount);
  EXPECT_EQ(third->bytes, 0u);
}

TEST_F(SmallBlocksTest, MixedBlockSizesAtOnceFromOneClient) {
  // One client (one UCX endpoint to the node) publishes and fetches 16 KiB
  // and 64 KiB blocks (coalesced), 256 KiB blocks (a message each, eager) and
  // 1 MiB blocks (rendezvous) concurrently, so the message kinds interleave.
  auto c = Connect(node_->address());
  const std::vector<uint64_t> sizes = {16384, 65536, 262144, 1048576};
  std::vector<Namespace> spaces;
  for (uint64_t size : sizes) {
    auto ns = c->OpenNamespace(Spec("mixed", size));
    ASSERT_TRUE(ns.ok()) << ns.status();
    spaces.push_back(*ns);
  }
  std::vector<std::future<size_t>> published, verified;
  for (size_t k = 0; k < sizes.size(); ++k) {
    published.push_back(std::async(std::launch::async, [&, k] {
      auto result = PublishStream(*c, spaces[k], 300 + k, 24, 12);
      return result.ok() ? result->count(BlockOutcome::kOk) : 0;
    }));
  }
  for (auto& p : published) EXPECT_EQ(p.get(), 24u);
  for (size_t k = 0; k < sizes.size(); ++k) {
    verified.push_back(std::async(std::launch::async, [&, k] {
      return FetchAndVerify(*c, spaces[k], 300 + k, 24, 24);
    }));
  }
  for (size_t k = 0; k < sizes.size(); ++k) EXPECT_EQ(verified[k].get(), 24u) << sizes[k];
}

TEST_F(SmallBlocksTest, EncodedBlocksOfUnequalSizeUnpackFromCoalescedMessages) {
  // An fp8 namespace of 16 KiB fp16 blocks: the node stores (and returns)
  // encoded blocks smaller than the block size, so a coalesced fetch packs
  // blocks of another size than the destinations. Both ways must return the
  // same bytes, and each must decode.
  v1::NamespaceSpec spec;
  spec.set_tenant("test");
  spec.set_model("fp8-small");
  spec.set_dtype(v1::DTYPE_FP16);
  spec.set_num_layers(1);
  spec.set_num_kv_heads(2);
  spec.set_head_dim(128);
  spec.set_tokens_per_block(16);
  spec.set_format(v1::FORMAT_FP8_E4M3);
  constexpr size_t kCount = 40;
  std::vector<std::vector<uint8_t>> fetched_bytes[2];
  for (bool coalesce : {true, false}) {
    auto c = Connect(node_->address(), coalesce);
    auto ns = c->OpenNamespace(spec);
    ASSERT_TRUE(ns.ok()) << ns.status();
    const uint64_t block = ns->block_bytes();
    ASSERT_EQ(block, 16384u);
    auto buffer = c->Allocate(kCount * block);
    ASSERT_TRUE(buffer.ok());
    std::mt19937 rng(5);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (size_t e = 0; e < kCount * block / 2; ++e) {
      const _Float16 h = static_cast<_Float16>(normal(rng));
      std::memcpy((*buffer)->data() + 2 * e, &h, 2);
    }
    const auto keys = ns->Keys(testing::Tokens(coalesce ? 61 : 62, kCount, 16));
    std::vector<PublishItem> publish;
    std::vector<FetchItem> fetch;
    for (size_t i = 0; i < kCount; ++i) {
      publish.push_back({keys[i], std::nullopt, buffer->get(), i * block});
      fetch.push_back({keys[i], buffer->get(), i * block});
    }
    auto published = ns->Publish(publish);
    ASSERT_TRUE(published.ok()) << published.status();
    ASSERT_EQ(published->count(BlockOutcome::kOk), kCount);
    std::memset((*buffer)->data(), 0, kCount * block);
    auto fetched = ns->Fetch(fetch);
    ASSERT_TRUE(fetched.ok()) << fetched.status();
    std::vector<uint8_t> decoded(block);
    for (size_t i = 0; i < kCount; ++i) {
      ASSERT_EQ(fetched->outcomes[i], BlockOutcome::kOk) << i;
      ASSERT_LT(fetched->sizes[i], block) << "fp8 blocks are stored smaller";
      const uint8_t* stored = (*buffer)->data() + i * block;
      EXPECT_TRUE(client::DequantizeBlock(stored, fetched->sizes[i], decoded.data(), block).ok());
      fetched_bytes[coalesce ? 0 : 1].emplace_back(stored, stored + fetched->sizes[i]);
    }
  }
  EXPECT_EQ(fetched_bytes[0], fetched_bytes[1]) << "coalesced and per-block fetches differ";
}

TEST_F(SmallBlocksTest, ClientKilledMidSmallBatchesLeaksNoMemory) {
  auto c = Connect(node_->address());
  // Memory held by the tier beyond what it stores: reservations in flight.
  auto held = [&] {
    const v1::StatsResponse stats = Stats(*c);
    return static_cast<int64_t>(stats.tiers(0).used_bytes()) -
           static_cast<int64_t>(stats.tiers(0).stored_bytes());
  };
  const int64_t before = held();
  auto child = ChildProcess::SpawnSelf({"--child=small_forever", "--node=" + node_->address()});
  ASSERT_TRUE(child.ok()) << child.status();
  const uint64_t start_in = Stats(*c).bytes_in();
  const uint64_t start_out = Stats(*c).bytes_out();
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  v1::StatsResponse stats;
  do {
    absl::SleepFor(absl::Milliseconds(20));
    stats = Stats(*c);
  } while ((stats.bytes_in() - start_in < (8u << 20) || stats.bytes_out() - start_out < (8u << 20)) &&
           absl::Now() < give_up);
  ASSERT_GE(stats.bytes_in() - start_in, 8u << 20) << "the child never got going";
  ASSERT_GE(stats.bytes_out() - start_out, 8u << 20) << "the child never fetched";
  (*child)->Signal(SIGKILL);
  EXPECT_EQ((*child)->Wait(), -SIGKILL);

  // Its last calls end at the stall timeout or the transfer deadline at the
  // latest; then every reservation is back.
  const absl::Time settle = absl::Now() + absl::Seconds(15);
  while (held() != before && absl::Now() < settle) absl::SleepFor(absl::Milliseconds(100));
  EXPECT_EQ(held(), before) << "a killed client's reservations were not released";
  auto ns = c->OpenNamespace(Spec("after-kill", 16384));
  ASSERT_TRUE(ns.ok()) << ns.status();
  ASSERT_EQ(PublishStream(*c, *ns, 77, 64, 64)->count(BlockOutcome::kOk), 64u);
  EXPECT_EQ(FetchAndVerify(*c, *ns, 77, 64, 64), 64u);
}

// ---- raw requests: what a careless or hostile client can send ----------------

class RawCoalescedTest : public SmallBlocksTest {
 protected:
  static constexpr uint64_t kBlock = 65536;

  void SetUp() override {
    SmallBlocksTest::SetUp();
    stub_ = v1::CacheNode::NewStub(
        grpc::CreateChannel(node_->address(), grpc::InsecureChannelCredentials()));
    auto engine = transfer::Engine::Create({});
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = *std::move(engine);
    auto region = engine_->Allocate(80 * kBlock);
    ASSERT_TRUE(region.ok()) << region.status();
    region_ = *std::move(region);
    v1::OpenNamespaceRequest open;
    *open.mutable_spec() = Spec("raw-coalesced", kBlock);
    v1::OpenNamespaceResponse opened;
    grpc::ClientContext context;
    ASSERT_TRUE(stub_->OpenNamespace(&context, open, &opened).ok());
    ASSERT_EQ(opened.max_coalesced_bytes(), limits::kMaxCoalescedBytes);
    ns_id_ = opened.namespace_id();
    const bool same_host =
        engine_->shared_memory_enabled() && opened.host_id() == transfer::Engine::HostId();
    auto peer =
        engine_->Connect(opened.worker_address(), same_host, absl::Now() + absl::Seconds(10));
    ASSERT_TRUE(peer.ok()) << peer.status();
    node_peer_ = *std::move(peer);
  }

  // A coalesced publish of `count` blocks (block i at offset i x kBlock, keys
  // from `key_byte`), with the right checksums.
  v1::PublishRequest Request(uint8_t key_byte, size_t count) {
    v1::PublishRequest request;
    request.set_namespace_id(ns_id_);
    request.set_tag_base(engine_->NextTagBase());
    request.set_coalesced(true);
    v1::TransferEndpoint* source = request.mutable_source();
    source->set_worker_address(engine_->worker_address());
    if (engine_->shared_memory_enabled()) source->set_host_id(transfer::Engine::HostId());
    v1::MemoryRegion* region = source->add_regions();
    region->set_base_address(reinterpret_cast<uint64_t>(region_->data()));
    region->set_length(region_->size());
    for (size_t i = 0; i < count; ++i) {
      uint8_t* data = region_->data() + i * kBlock;
      FillBlock(key_byte, i, data, kBlock);
      v1::PublishBlock* block = request.add_blocks();
      block->set_key(Key(key_byte, i));
      block->set_offset(i * kBlock);
      block->set_size(kBlock);
      block->set_checksum(BlockChecksum(data, kBlock));
    }
    return request;
  }
  static std::string Key(uint8_t key_byte, size_t i) {
    std::string key(16, static_cast<char>(key_byte));
    key[0] = static_cast<char>(i);
    return key;
  }

  // Sends `request`, answering the node's pull with `send_bytes` of each block.
  grpc::Status Publish(const v1::PublishRequest& request, v1::PublishResponse* response,
                       size_t send_bytes = kBlock) {
    std::vector<transfer::SendOp> sends;
    for (const v1::PublishBlock& block : request.blocks()) {
      sends.push_back({region_->data() + block.offset(), send_bytes, 0});
    }
    std::unique_ptr<transfer::PullServer> pull;
    if (request.tag_base() != 0) {
      auto served = engine_->ServePull(node_peer_, request.tag_base(), sends);
      EXPECT_TRUE(served.ok()) << served.status();
      if (served.ok()) pull = *std::move(served);
    }
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
    return stub_->Publish(&context, request, response);
  }

  bool Stored(uint8_t key_byte, size_t i) {
    v1::LookupRequest lookup;
    lookup.set_namespace_id(ns_id_);
    lookup.add_keys(Key(key_byte, i));
    v1::LookupResponse found;
    grpc::ClientContext context;
    EXPECT_TRUE(stub_->Lookup(&context, lookup, &found).ok());
    return found.prefix_length() == 1;
  }

  std::unique_ptr<v1::CacheNode::Stub> stub_;
  std::unique_ptr<transfer::Engine> engine_;
  std::unique_ptr<transfer::MemoryRegion> region_;
  std::shared_ptr<transfer::Peer> node_peer_;
  uint64_t ns_id_ = 0;
};

TEST_F(RawCoalescedTest, ChecksumMismatchInsideACoalescedMessageFailsThatBlockOnly) {
  // 20 blocks of 64 KiB: three messages of 8, 8 and 4 blocks. Wrong checksums
  // for the first block, one mid-message and the last.
  v1::PublishRequest request = Request(0x41, 20);
  const std::set<size_t> bad = {0, 11, 19};
  for (size_t i : bad) {
    request.mutable_blocks(i)->set_checksum(request.blocks(i).checksum() ^ 0x10);
  }
  v1::PublishResponse response;
  ASSERT_TRUE(Publish(request, &response).ok());
  ASSERT_EQ(response.status_size(), 20);
  for (size_t i = 0; i < 20; ++i) {
    EXPECT_EQ(response.status(i), bad.contains(i) ? v1::BLOCK_CHECKSUM_MISMATCH : v1::BLOCK_OK)
        << i;
    EXPECT_EQ(Stored(0x41, i), !bad.contains(i)) << i;
  }
}

TEST_F(RawCoalescedTest, ShortCoalescedDataStoresNothing) {
  v1::PublishResponse response;
  EXPECT_FALSE(Publish(Request(0x42, 10), &response, kBlock / 2).ok());
  for (size_t i = 0; i < 10; ++i) EXPECT_FALSE(Stored(0x42, i)) << i;
}

TEST_F(RawCoalescedTest, OversizeOrRmaCoalescedRequestsAreRefused) {
  // Over max_coalesced_bytes (4 MiB: 64 blocks of 64 KiB).
  v1::PublishRequest big = Request(0x43, limits::kMaxCoalescedBytes / kBlock + 1);
  v1::PublishResponse response;
  EXPECT_EQ(Publish(big, &response).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_FALSE(Stored(0x43, 0));
  v1::FetchRequest fetch;
  fetch.set_namespace_id(ns_id_);
  fetch.set_tag_base(engine_->NextTagBase());
  fetch.set_coalesced(true);
  *fetch.mutable_destination() = big.source();
  for (const v1::PublishBlock& block : big.blocks()) {
    v1::FetchBlock* b = fetch.add_blocks();
    b->set_key(block.key());
    b->set_offset(block.offset());
    b->set_capacity(kBlock);
  }
  v1::FetchResponse fetched;
  grpc::ClientContext context;
  EXPECT_EQ(stub_->Fetch(&context, fetch, &fetched).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  // Coalescing is for tagged transfers; tag_base 0 (RMA) is refused either way.
  v1::PublishRequest rma = Request(0x44, 2);
  rma.set_tag_base(0);
  EXPECT_FALSE(Publish(rma, &response).ok());
  EXPECT_FALSE(Stored(0x44, 0));
  // The node still takes a good one.
  ASSERT_TRUE(Publish(Request(0x45, 3), &response).ok());
  for (size_t i = 0; i < 3; ++i) EXPECT_TRUE(Stored(0x45, i));
}

// ---- child processes ---------------------------------------------------------

int RunChild(int argc, char** argv) {
  auto c = Client::Connect({.node_address = testing::ChildArg(argc, argv, "node"), .fast_path = false});
  if (!c.ok()) return 10;
  if (testing::ChildArg(argc, argv, "child") == "small_forever") {
    // Coalesced publishes and fetches of 16 KiB blocks until killed.
    auto ns = (*c)->OpenNamespace(Spec("doomed-small", 16384));
    if (!ns.ok()) return 11;
    for (uint64_t seed = 1;; ++seed) {
      PublishStream(**c, *ns, seed, 128, 128).IgnoreError();
      FetchAndVerify(**c, *ns, seed, 128, 128);
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
