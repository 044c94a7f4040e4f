// CUDA memory in the client without a GPU: the client is given the
// host-memory device double (tests/support/device) through
// ClientOptions::device, whose device pointers host code cannot touch, and
// publishes and fetches device buffers against a real kvstrata-node through
// its staging pool. Real UCX over loopback (ctest runs this over TCP and over
// shared memory).
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "host_device_memory.h"
#include "kvstrata.grpc.pb.h"
#include "kvstrata/transfer/engine.h"
#include "kvstrata/client/client.h"
#include "kvstrata/kvstrata.h"
#include "kvstrata/testing/auth_file.h"
#include "kvstrata/testing/blocks.h"
#include "kvstrata/testing/node_fixture.h"
#include "kvstrata/testing/process.h"
#include "kvstrata/testing/streams.h"

namespace kvstrata {
namespace {

using client::BlockOutcome;
using client::Buffer;
using client::Client;
using client::ClientOptions;
using client::FetchItem;
using client::MemoryKind;
using client::Namespace;
using client::PublishItem;
using testing::ChildProcess;
using testing::HostDeviceMemory;
using testing::NodeProcess;
using testing::Sha256Hex;

constexpr uint64_t kBlock = 256 * 1024;
constexpr uint32_t kTokensPerBlock = 16;

v1::NamespaceSpec Spec(uint64_t block_bytes = kBlock) {
  return testing::OpaqueSpec(absl::StrCat("device-client-", block_bytes), block_bytes,
                             kTokensPerBlock);
}

// Bytes to and from the double's device memory (host code cannot touch it).
void ToDevice(transfer::DeviceMemory& device, uint8_t* dst, const std::vector<uint8_t>& src) {
  auto stream = device.CreateStream();
  ASSERT_TRUE(stream.ok());
  ASSERT_TRUE((*stream)->Copy(dst, src.data(), src.size(), transfer::CopyKind::kHostToDevice).ok());
  ASSERT_TRUE((*stream)->Synchronize().ok());
}
std::vector<uint8_t> FromDevice(transfer::DeviceMemory& device, const uint8_t* src, size_t bytes) {
  std::vector<uint8_t> out(bytes);
  auto stream = device.CreateStream();
  EXPECT_TRUE(stream.ok());
  EXPECT_TRUE((*stream)->Copy(out.data(), src, bytes, transfer::CopyKind::kDeviceToHost).ok());
  EXPECT_TRUE((*stream)->Synchronize().ok());
  return out;
}
std::vector<uint8_t> Block(uint64_t seed, uint64_t index, uint64_t bytes = kBlock) {
  std::vector<uint8_t> b(bytes);
  testing::FillBlock(seed, index, b.data(), b.size());
  return b;
}

// The options of a client with `device` as its GPU (node_address still to set).
ClientOptions DeviceOptions(std::shared_ptr<transfer::DeviceMemory> device,
                            uint64_t staging_bytes = 16ull << 20) {
  ClientOptions options{.timeout = absl::Seconds(20)};
  options.device = std::move(device);
  options.device_staging_bytes = staging_bytes;
  return options;
}

class DeviceClientTest : public testing::NodeClientTest {
 protected:
  void SetUp() override {
    device_ = std::make_shared<HostDeviceMemory>();
    StartNodeAndClient(KVSTRATA_NODE_BINARY, {"--dram_bytes=268435456", "--transfer_timeout=5s"},
                       DeviceOptions(device_));
  }

  std::unique_ptr<Client> Connect(std::shared_ptr<transfer::DeviceMemory> device,
                                  uint64_t staging_bytes = 16ull << 20) {
    ClientOptions options = DeviceOptions(std::move(device), staging_bytes);
    options.node_address = node_->address();
    return testing::ConnectOrFail(options);
  }

  // `count` blocks of stream `seed` in one device buffer.
  std::unique_ptr<Buffer> DeviceBlocks(uint64_t seed, size_t count, uint64_t bytes = kBlock) {
    auto buffer = client_->Allocate(count * bytes, MemoryKind::kDevice);
    EXPECT_TRUE(buffer.ok()) << buffer.status();
    if (!buffer.ok()) return nullptr;
    EXPECT_EQ((*buffer)->kind(), MemoryKind::kDevice);
    for (size_t i = 0; i < count; ++i) {
      ToDevice(*device_, (*buffer)->data() + i * bytes, Block(seed, i, bytes));
    }
    return *std::move(buffer);
  }

  // Every chunk the node's DRAM tier holds belongs to a stored block (no
  // reservation of an abandoned transfer is left), within `settle`.
  void ExpectNodeHoldsOnlyBlocks(absl::Duration settle = absl::Seconds(20)) {
    const absl::Time deadline = absl::Now() + settle;
    v1::StatsResponse s = Stats();
    while (s.tiers(0).used_bytes() != s.tiers(0).stored_bytes() && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(100));
      s = Stats();
    }
    EXPECT_EQ(s.tiers(0).used_bytes(), s.tiers(0).stored_bytes()) << s.DebugString();
  }

  std::shared_ptr<HostDeviceMemory> device_;
};

TEST_F(DeviceClientTest, DeviceBuffersPublishAndFetchByteExactThroughStaging) {
  auto ns = client_->OpenNamespace(Spec());
  ASSERT_TRUE(ns.ok()) << ns.status();
  constexpr size_t kCount = 24;
  const std::vector<BlockKey> keys = ns->Keys(testing::Tokens(1, kCount, kTokensPerBlock));
  auto source = DeviceBlocks(1, kCount);
  std::vector<PublishItem> publish;
  for (size_t i = 0; i < kCount; ++i) {
    publish.push_back({keys[i], i == 0 ? std::nullopt : std::optional(keys[i - 1]), source.get(),
                       i * kBlock});
  }
  auto published = ns->Publish(publish);
  ASSERT_TRUE(published.ok()) << published.status();
  EXPECT_EQ(published->count(BlockOutcome::kOk), kCount);
  // What the node stored is the device bytes: a host fetch sees them.
  EXPECT_EQ(testing::FetchAndVerify(*client_, *ns, 1, kCount, 8), kCount);

  auto destination = client_->Allocate(kCount * kBlock, MemoryKind::kDevice);
  ASSERT_TRUE(destination.ok());
  std::vector<FetchItem> fetch;
  for (size_t i = 0; i < kCount; ++i) {
    fetch.push_back({keys[i], destination->get(), (kCount - 1 - i) * kBlock});  // reversed
  }
  auto fetched = ns->Fetch(fetch);
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  EXPECT_EQ(fetched->count(BlockOutcome::kOk), kCount);
  for (size_t i = 0; i < kCount; ++i) {
    EXPECT_EQ(FromDevice(*device_, (*destination)->data() + (kCount - 1 - i) * kBlock, kBlock),
              Block(1, i))
        << "block " << i;
  }
  const client::DeviceStagingCounters staging = client_->DeviceStaging();
  EXPECT_EQ(staging.staged_blocks, 2 * kCount);
  EXPECT_EQ(staging.fallback_blocks, 0u);
  EXPECT_EQ(staging.leased_bytes, 0u) << "a transfer kept its staging";
  EXPECT_EQ(staging.capacity_bytes, 16ull << 20);
  ExpectNodeHoldsOnlyBlocks();
}

// Host and device buffers in one batch, each block landing in the other
// kind; a staging pool smaller than the batch stages the rest in memory of
// its own, byte-exact all the same.
TEST_F(DeviceClientTest, MixedHostAndDeviceBuffersInOneBatchAndAFullPool) {
  client_ = Connect(device_, /*staging_bytes=*/4 * kBlock);
  auto ns = client_->OpenNamespace(Spec());
  ASSERT_TRUE(ns.ok()) << ns.status();
  constexpr size_t kCount = 16;
  const std::vector<BlockKey> keys = ns->Keys(testing::Tokens(2, kCount, kTokensPerBlock));
  auto device = DeviceBlocks(2, kCount);
  auto host = client_->Allocate(kCount * kBlock);
  ASSERT_TRUE(host.ok());
  std::vector<PublishItem> publish;
  for (size_t i = 0; i < kCount; ++i) {
    if (i % 2 == 1) {
      const std::vector<uint8_t> b = Block(2, i);
      std::memcpy((*host)->data() + i * kBlock, b.data(), kBlock);
    }
    publish.push_back({keys[i], std::nullopt, i % 2 == 0 ? device.get() : host->get(), i * kBlock});
  }
  auto published = ns->Publish(publish);
  ASSERT_TRUE(published.ok()) << published.status();
  ASSERT_EQ(published->count(BlockOutcome::kOk), kCount);

  auto device_out = client_->Allocate(kCount * kBlock, MemoryKind::kDevice);
  auto host_out = client_->Allocate(kCount * kBlock);
  ASSERT_TRUE(device_out.ok() && host_out.ok());
  std::vector<FetchItem> fetch;
  for (size_t i = 0; i < kCount; ++i) {
    fetch.push_back({keys[i], i % 2 == 1 ? device_out->get() : host_out->get(), i * kBlock});
  }
  auto fetched = ns->Fetch(fetch);
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  ASSERT_EQ(fetched->count(BlockOutcome::kOk), kCount);
  for (size_t i = 0; i < kCount; ++i) {
    const std::vector<uint8_t> got =
        i % 2 == 1 ? FromDevice(*device_, (*device_out)->data() + i * kBlock, kBlock)
                   : std::vector<uint8_t>((*host_out)->data() + i * kBlock,
                                          (*host_out)->data() + (i + 1) * kBlock);
    EXPECT_EQ(got, Block(2, i)) << "block " << i;
  }
  const client::DeviceStagingCounters staging = client_->DeviceStaging();
  EXPECT_EQ(staging.staged_blocks, kCount);  // 8 published, 8 fetched from the device side
  EXPECT_EQ(staging.fallback_blocks, 2 * (kCount / 2 - 4)) << "4 fit the pool each way";
  EXPECT_EQ(staging.leased_bytes, 0u);
  ExpectNodeHoldsOnlyBlocks();
}

// Small blocks over TCP go coalesced (several blocks per message, unpacked
// into the destinations): device destinations are unpacked into staging.
TEST_F(DeviceClientTest, SmallDeviceBlocksRoundTripCoalescedOrNot) {
  constexpr uint64_t kSmall = 16 << 10;
  auto ns = client_->OpenNamespace(Spec(kSmall));
  ASSERT_TRUE(ns.ok()) << ns.status();
  constexpr size_t kCount = 64;
  const std::vector<BlockKey> keys = ns->Keys(testing::Tokens(3, kCount, kTokensPerBlock));
  auto source = DeviceBlocks(3, kCount, kSmall);
  std::vector<PublishItem> publish;
  for (size_t i = 0; i < kCount; ++i) publish.push_back({keys[i], std::nullopt, source.get(), i * kSmall});
  auto published = ns->Publish(publish);
  ASSERT_TRUE(published.ok()) << published.status();
  ASSERT_EQ(published->count(BlockOutcome::kOk), kCount);
  auto destination = client_->Allocate(kCount * kSmall, MemoryKind::kDevice);
  ASSERT_TRUE(destination.ok());
  std::vector<FetchItem> fetch;
  for (size_t i = 0; i < kCount; ++i) fetch.push_back({keys[i], destination->get(), i * kSmall});
  auto fetched = ns->Fetch(fetch);
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  ASSERT_EQ(fetched->count(BlockOutcome::kOk), kCount);
  for (size_t i = 0; i < kCount; ++i) {
    EXPECT_EQ(FromDevice(*device_, (*destination)->data() + i * kSmall, kSmall), Block(3, i, kSmall));
  }
}

TEST_F(DeviceClientTest, ABadDevicePointerIsAClearErrorAtRegistration) {
  std::vector<uint8_t> host(kBlock);
  auto registered = client_->Register(host.data(), host.size(), MemoryKind::kDevice);
  ASSERT_FALSE(registered.ok());
  EXPECT_EQ(registered.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(registered.status().message().find("is not device memory of host double"),
            std::string::npos)
      << registered.status();
  // A range that starts on the device and runs past its allocation.
  auto allocation = device_->Allocate(kBlock);
  ASSERT_TRUE(allocation.ok());
  auto overrun = client_->Register(allocation->data(), 2 * kBlock, MemoryKind::kDevice);
  EXPECT_EQ(overrun.status().code(), absl::StatusCode::kInvalidArgument) << overrun.status();
  // The caller's own device memory registers, and publishes.
  auto own = client_->Register(allocation->data(), kBlock, MemoryKind::kDevice);
  ASSERT_TRUE(own.ok()) << own.status();
  ToDevice(*device_, allocation->data(), Block(4, 0));
  auto ns = client_->OpenNamespace(Spec());
  ASSERT_TRUE(ns.ok());
  const std::vector<BlockKey> keys = ns->Keys(testing::Tokens(4, 1, kTokensPerBlock));
  auto published = ns->Publish({{keys[0], std::nullopt, own->get(), 0}});
  ASSERT_TRUE(published.ok()) << published.status();
  EXPECT_EQ(published->outcomes[0], BlockOutcome::kOk);
  EXPECT_EQ(testing::FetchAndVerify(*client_, *ns, 4, 1, 1), 1u);
}

TEST_F(DeviceClientTest, DeviceBuffersRefuseRmaAndNeedAGpuWhenNoneIsGiven) {
  ClientOptions rma{.node_address = node_->address(),
                    .transfer_method = ClientOptions::TransferMethod::kRma};
  rma.device = device_;
  auto c = Client::Connect(rma);
  ASSERT_TRUE(c.ok());
  auto ns = (*c)->OpenNamespace(Spec());
  ASSERT_TRUE(ns.ok());
  auto buffer = (*c)->Allocate(kBlock, MemoryKind::kDevice);
  ASSERT_TRUE(buffer.ok());
  const std::vector<BlockKey> keys = ns->Keys(testing::Tokens(5, 1, kTokensPerBlock));
  auto published = ns->Publish({{keys[0], std::nullopt, buffer->get(), 0}});
  EXPECT_EQ(published.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(published.status().message().find("tagged"), std::string::npos) << published.status();

  if (transfer::OpenCudaDevice(0).ok()) GTEST_SKIP() << "this machine has a GPU";
  auto plain = Client::Connect({.node_address = node_->address()});
  ASSERT_TRUE(plain.ok());
  auto none = (*plain)->Allocate(kBlock, MemoryKind::kDevice);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.status().message().find("device buffers need a GPU"), std::string::npos)
      << none.status();
  // Host buffers of that client are unaffected.
  EXPECT_TRUE((*plain)->Allocate(kBlock).ok());
}

// The C API's device buffers use the CUDA device (no injection seam): here,
// without a GPU, they fail with a message that says why, and a host
// pointer never registers as device memory.
TEST_F(DeviceClientTest, CApiDeviceBuffersSayWhatIsMissing) {
  if (transfer::OpenCudaDevice(0).ok()) GTEST_SKIP() << "this machine has a GPU";
  kvs_client* c = nullptr;
  ASSERT_EQ(kvs_connect(node_->address().c_str(), 10000, &c), 0) << kvs_last_error();
  kvs_buffer* buffer = nullptr;
  EXPECT_NE(kvs_allocate_device(c, kBlock, &buffer), 0);
  EXPECT_NE(std::string(kvs_last_error()).find("device buffers need a GPU"), std::string::npos)
      << kvs_last_error();
  std::vector<uint8_t> host(kBlock);
  EXPECT_NE(kvs_register_device(c, host.data(), host.size(), &buffer), 0);
  EXPECT_EQ(buffer, nullptr);
  EXPECT_EQ(kvs_register_device(c, host.data(), host.size(), nullptr), static_cast<int>(absl::StatusCode::kInvalidArgument));
  ASSERT_EQ(kvs_allocate(c, kBlock, &buffer), 0) << "host buffers are unaffected";
  kvs_buffer_destroy(buffer);
  kvs_client_destroy(c);
}

// A device copy that fails (the double's fault injection: a CUDA error at
// synchronisation) never becomes wrong bytes: the publish is refused before
// the node is asked, a fetched block that cannot go up is kTransferFailed.
TEST_F(DeviceClientTest, FailedDeviceCopiesFailTheirBlocksNeverServeWrongBytes) {
  auto healthy = client_->OpenNamespace(Spec());
  ASSERT_TRUE(healthy.ok());
  ASSERT_EQ(testing::PublishStream(*client_, *healthy, 6, 4, 4)->count(BlockOutcome::kOk), 4u);
  // 4 copies: filling the source buffer (one 256 KiB copy per block); then
  // every copy fails.
  auto faulty = std::make_shared<HostDeviceMemory>(/*copies_before_failure=*/4);
  device_ = faulty;
  client_ = Connect(faulty);
  auto ns = client_->OpenNamespace(Spec());
  ASSERT_TRUE(ns.ok());
  auto source = DeviceBlocks(7, 4);  // the last good copies
  const std::vector<BlockKey> keys = ns->Keys(testing::Tokens(7, 4, kTokensPerBlock));
  std::vector<PublishItem> publish;
  for (size_t i = 0; i < 4; ++i) publish.push_back({keys[i], std::nullopt, source.get(), i * kBlock});
  auto published = ns->Publish(publish);
  EXPECT_FALSE(published.ok());
  EXPECT_NE(published.status().message().find("copying device blocks to staging"),
            std::string::npos)
      << published.status();
  EXPECT_EQ(ns->Lookup(keys)->prefix_length, 0u) << "nothing of a failed copy was stored";

  const std::vector<BlockKey> good = ns->Keys(testing::Tokens(6, 4, kTokensPerBlock));
  auto destination = client_->Allocate(4 * kBlock, MemoryKind::kDevice);
  ASSERT_TRUE(destination.ok());
  std::vector<FetchItem> fetch;
  for (size_t i = 0; i < 4; ++i) fetch.push_back({good[i], destination->get(), i * kBlock});
  auto fetched = ns->Fetch(fetch);
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  EXPECT_EQ(fetched->count(BlockOutcome::kTransferFailed), 4u);
  EXPECT_EQ(client_->DeviceStaging().leased_bytes, 0u);
  ExpectNodeHoldsOnlyBlocks();
}

// A client killed while its device blocks are staged and being pulled (or
// pushed) leaves nothing held on the node, which keeps serving.
TEST_F(DeviceClientTest, AClientKilledMidStagedTransferLeaksNothingOnTheNode) {
  auto ns = client_->OpenNamespace(Spec());
  ASSERT_TRUE(ns.ok());
  ASSERT_EQ(testing::PublishStream(*client_, *ns, 8, 16, 16)->count(BlockOutcome::kOk), 16u);
  const uint64_t start_in = Stats().bytes_in();
  const uint64_t start_out = Stats().bytes_out();
  auto child = ChildProcess::SpawnSelf({"--child=staged_forever", "--node=" + node_->address()});
  ASSERT_TRUE(child.ok()) << child.status();
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  v1::StatsResponse s;
  do {
    absl::SleepFor(absl::Milliseconds(20));
    s = Stats();
  } while ((s.bytes_in() - start_in < (32u << 20) || s.bytes_out() - start_out < (32u << 20)) &&
           absl::Now() < give_up);
  ASSERT_GE(s.bytes_in() - start_in, 32u << 20) << "the child never published";
  ASSERT_GE(s.bytes_out() - start_out, 32u << 20) << "the child never fetched";
  (*child)->Signal(SIGKILL);
  EXPECT_EQ((*child)->Wait(), -SIGKILL);
  ExpectNodeHoldsOnlyBlocks();
  EXPECT_EQ(testing::FetchAndVerify(*client_, *ns, 8, 16, 16), 16u);
  auto source = DeviceBlocks(9, 8);
  const std::vector<BlockKey> keys = ns->Keys(testing::Tokens(9, 8, kTokensPerBlock));
  std::vector<PublishItem> publish;
  for (size_t i = 0; i < 8; ++i) publish.push_back({keys[i], std::nullopt, source.get(), i * kBlock});
  auto published = ns->Publish(publish);
  ASSERT_TRUE(published.ok()) << published.status();
  EXPECT_EQ(published->count(BlockOutcome::kOk), 8u);
  EXPECT_EQ(testing::FetchAndVerify(*client_, *ns, 9, 8, 8), 8u);
}

// ---- same-host CUDA IPC (issue 19 item 5), on the test node's double ----
// kvstrata-test-node's HBM arena is the double's memfd: the client's double
// maps it through /proc/<node>/fd as cudaIpcOpenMemHandle would.

class DeviceIpcTest : public testing::NodeClientTest {
 protected:
  void StartNode(std::vector<std::string> extra) {
    std::vector<std::string> flags = {"--slab_bytes=1048576", "--transfer_timeout=3s",
                                      "--eviction_policy=lru"};
    flags.insert(flags.end(), extra.begin(), extra.end());
    ClientOptions options{.timeout = absl::Seconds(20)};
    options.device = device_;
    StartNodeAndClient(KVSTRATA_TEST_NODE_BINARY, flags, options, Spec());
  }
  // Fetches `count` blocks of stream `seed` into a device buffer (odd
  // items into host memory when `mixed`) and checks every byte.
  size_t FetchIntoDevice(uint64_t seed, size_t count, bool mixed = false) {
    const std::vector<BlockKey> keys = ns_->Keys(testing::Tokens(seed, count, kTokensPerBlock));
    auto device = client_->Allocate(count * kBlock, MemoryKind::kDevice);
    auto host = client_->Allocate(count * kBlock);
    EXPECT_TRUE(device.ok() && host.ok());
    std::vector<FetchItem> items;
    for (size_t i = 0; i < count; ++i) {
      items.push_back({keys[i], mixed && i % 2 ? host->get() : device->get(), i * kBlock});
    }
    auto fetched = ns_->Fetch(items);
    EXPECT_TRUE(fetched.ok()) << fetched.status();
    if (!fetched.ok()) return 0;
    size_t exact = 0;
    for (size_t i = 0; i < count; ++i) {
      if (fetched->outcomes[i] != BlockOutcome::kOk) continue;
      EXPECT_EQ(fetched->sizes[i], kBlock);
      const std::vector<uint8_t> got =
          mixed && i % 2 ? std::vector<uint8_t>((*host)->data() + i * kBlock,
                                                (*host)->data() + (i + 1) * kBlock)
                         : FromDevice(*device_, (*device)->data() + i * kBlock, kBlock);
      exact += got == Block(seed, i);
    }
    return exact;
  }

  std::shared_ptr<HostDeviceMemory> device_ = std::make_shared<HostDeviceMemory>();
};

TEST_F(DeviceIpcTest, HbmBlocksComeDeviceToDeviceAndTheRestStaged) {
  // 16 blocks of HBM over DRAM: 24 published, the first 8 evicted to DRAM.
  StartNode({absl::StrCat("--hbm_bytes=", 16 * kBlock), absl::StrCat("--dram_bytes=", 64 * kBlock)});
  ASSERT_EQ(testing::PublishStream(*client_, *ns_, 20, 24, 8)->count(BlockOutcome::kOk), 24u);
  const std::vector<BlockKey> keys = ns_->Keys(testing::Tokens(20, 24, kTokensPerBlock));
  auto tiers = ns_->Lookup(keys);
  ASSERT_TRUE(tiers.ok());
  const size_t in_hbm = std::count(tiers->tiers.begin(), tiers->tiers.end(), client::Tier::kHbm);
  ASSERT_EQ(in_hbm, 16u);
  const uint64_t staged_before = client_->DeviceStaging().staged_blocks;
  EXPECT_EQ(FetchIntoDevice(20, 24), 24u);
  const client::DeviceStagingCounters c = client_->DeviceStaging();
  EXPECT_TRUE(c.cuda_ipc);
  // The HBM blocks came by IPC; the DRAM ones through staging. (A staged
  // DRAM hit is promoted, evicting HBM blocks the IPC pass already copied.)
  EXPECT_EQ(c.ipc_blocks, in_hbm);
  EXPECT_EQ(c.staged_blocks - staged_before, 24u - in_hbm);
  v1::StatsResponse s = Stats();
  EXPECT_EQ(s.device_ipc_clients(), 1u);
  EXPECT_EQ(s.device_staged_clients(), 0u);
  EXPECT_EQ(s.device_ipc_blocks(), in_hbm);
  EXPECT_EQ(s.device_ipc_pinned_blocks(), 0u) << "the client released its lease";
  // Mixed host and device items in one batch: host items take the node's UCX.
  EXPECT_EQ(FetchIntoDevice(20, 24, /*mixed=*/true), 24u);
  EXPECT_EQ(Stats().device_ipc_clients(), 1u) << "the arena is exported once per client";
}

TEST_F(DeviceIpcTest, ANodeWithoutHbmStagesAndSaysSo) {
  StartNode({absl::StrCat("--dram_bytes=", 64 * kBlock)});
  ASSERT_EQ(testing::PublishStream(*client_, *ns_, 21, 8, 8)->count(BlockOutcome::kOk), 8u);
  EXPECT_EQ(FetchIntoDevice(21, 8), 8u);
  EXPECT_FALSE(client_->DeviceStaging().cuda_ipc);
  EXPECT_EQ(client_->DeviceStaging().ipc_blocks, 0u);
  EXPECT_EQ(Stats().device_staged_clients(), 1u);
  EXPECT_EQ(Stats().device_ipc_clients(), 0u);
}

// What a client that dies between FetchDeviceIpc and ReleaseDeviceIpc
// leaves: a lease, which expires at the node's transfer timeout (3 s here);
// another host is refused the arena; leases cannot be released by guessing.
TEST_F(DeviceIpcTest, LeasesExpireAndOnlyTheSameHostGetsTheArena) {
  StartNode({absl::StrCat("--hbm_bytes=", 16 * kBlock), absl::StrCat("--dram_bytes=", 64 * kBlock)});
  ASSERT_EQ(testing::PublishStream(*client_, *ns_, 22, 8, 8)->count(BlockOutcome::kOk), 8u);
  auto stub = v1::CacheNode::NewStub(
      grpc::CreateChannel(node_->address(), grpc::InsecureChannelCredentials()));
  {
    grpc::ClientContext context;
    v1::OpenDeviceIpcRequest request;
    request.set_host_id("some-other-host");
    v1::OpenDeviceIpcResponse response;
    ASSERT_TRUE(stub->OpenDeviceIpc(&context, request, &response).ok());
    EXPECT_EQ(response.path(), v1::DEVICE_PATH_STAGED);
    EXPECT_TRUE(response.handle().empty());
    EXPECT_NE(response.reason().find("another host"), std::string::npos) << response.reason();
  }
  const std::vector<BlockKey> keys = ns_->Keys(testing::Tokens(22, 8, kTokensPerBlock));
  v1::FetchDeviceIpcRequest fetch;
  fetch.set_namespace_id(ns_->id());
  for (const BlockKey& k : keys) fetch.add_keys(std::string(k.view()));
  fetch.add_keys(std::string(16, '\x7f'));  // not stored
  v1::FetchDeviceIpcResponse pinned;
  {
    grpc::ClientContext context;
    ASSERT_TRUE(stub->FetchDeviceIpc(&context, fetch, &pinned).ok());
  }
  ASSERT_NE(pinned.lease(), 0u);
  EXPECT_EQ(std::count(pinned.status().begin(), pinned.status().end(), v1::BLOCK_OK), 8);
  EXPECT_EQ(pinned.status(8), v1::BLOCK_NOT_FOUND);
  EXPECT_EQ(Stats().device_ipc_pinned_blocks(), 8u);
  {
    grpc::ClientContext context;
    v1::ReleaseDeviceIpcRequest release;
    release.set_lease(pinned.lease() ^ 1);  // a guess
    v1::ReleaseDeviceIpcResponse released;
    ASSERT_TRUE(stub->ReleaseDeviceIpc(&context, release, &released).ok());
    EXPECT_FALSE(released.released());
  }
  EXPECT_EQ(Stats().device_ipc_pinned_blocks(), 8u);
  absl::SleepFor(absl::Seconds(4));
  EXPECT_EQ(Stats().device_ipc_pinned_blocks(), 0u) << "an abandoned lease expired";
  {
    grpc::ClientContext context;
    v1::ReleaseDeviceIpcRequest release;
    release.set_lease(pinned.lease());
    v1::ReleaseDeviceIpcResponse released;
    ASSERT_TRUE(stub->ReleaseDeviceIpc(&context, release, &released).ok());
    EXPECT_FALSE(released.released()) << "expired already";
  }
  // Malformed: a bad key, no keys, an unknown namespace.
  v1::FetchDeviceIpcRequest bad = fetch;
  bad.set_keys(0, "short");
  v1::FetchDeviceIpcResponse ignored;
  grpc::ClientContext c1, c2, c3;
  EXPECT_EQ(stub->FetchDeviceIpc(&c1, bad, &ignored).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  bad.clear_keys();
  EXPECT_EQ(stub->FetchDeviceIpc(&c2, bad, &ignored).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  bad = fetch;
  bad.set_namespace_id(ns_->id() + 12345);
  EXPECT_FALSE(stub->FetchDeviceIpc(&c3, bad, &ignored).ok());
  // The blocks were never disturbed.
  EXPECT_EQ(FetchIntoDevice(22, 8), 8u);
}

// The arena mapping exposes every tenant's blocks: with authentication on,
// a tenant's client stages (seeing only its own blocks) and only an admin
// credential is given the arena.
TEST(DeviceIpcAuthTest, WithAuthenticationOnlyAnAdminGetsTheArena) {
  auto dir = testing::TempDir::Create("kvstrata-device-ipc-auth");
  ASSERT_TRUE(dir.ok());
  const std::string auth = (*dir)->File("auth");
  {
    FILE* f = fopen(auth.c_str(), "w");
    ASSERT_NE(f, nullptr);
    fprintf(f, "token sha256:%s tenant test\ntoken sha256:%s admin *\n",
            Sha256Hex("tenant-token").c_str(), Sha256Hex("admin-token").c_str());
    fclose(f);
  }
  auto node = NodeProcess::Start(
      KVSTRATA_TEST_NODE_BINARY,
      {"--slab_bytes=1048576", absl::StrCat("--hbm_bytes=", 16 * kBlock),
       absl::StrCat("--dram_bytes=", 64 * kBlock), "--auth_file=" + auth});
  ASSERT_TRUE(node.ok()) << node.status();
  auto device = std::make_shared<HostDeviceMemory>();
  auto connect = [&](const std::string& token) {
    ClientOptions options{.node_address = (*node)->address(), .timeout = absl::Seconds(20)};
    options.auth_token = token;
    options.device = device;
    return Client::Connect(options).value();
  };
  std::unique_ptr<Client> tenant = connect("tenant-token");
  std::unique_ptr<Client> admin = connect("admin-token");
  for (Client* c : {tenant.get(), admin.get()}) {
    auto ns = c->OpenNamespace(Spec());
    ASSERT_TRUE(ns.ok()) << ns.status();
    auto published = testing::PublishStream(*c, *ns, 30, 4, 4);  // the admin's: present already
    ASSERT_TRUE(published.ok()) << published.status();
    ASSERT_EQ(published->count(BlockOutcome::kOk) + published->count(BlockOutcome::kAlreadyPresent),
              4u);
    const std::vector<BlockKey> keys = ns->Keys(testing::Tokens(30, 4, kTokensPerBlock));
    auto buffer = c->Allocate(4 * kBlock, MemoryKind::kDevice);
    ASSERT_TRUE(buffer.ok());
    std::vector<FetchItem> items;
    for (size_t i = 0; i < 4; ++i) items.push_back({keys[i], buffer->get(), i * kBlock});
    auto fetched = ns->Fetch(items);
    ASSERT_TRUE(fetched.ok()) << fetched.status();
    EXPECT_EQ(fetched->count(BlockOutcome::kOk), 4u);
    for (size_t i = 0; i < 4; ++i) {
      EXPECT_EQ(FromDevice(*device, (*buffer)->data() + i * kBlock, kBlock), Block(30, i));
    }
  }
  EXPECT_FALSE(tenant->DeviceStaging().cuda_ipc);
  EXPECT_TRUE(admin->DeviceStaging().cuda_ipc);
  EXPECT_EQ(admin->DeviceStaging().ipc_blocks, 4u);
  v1::StatsResponse stats;
  ASSERT_TRUE(admin->Stats(&stats).ok());
  EXPECT_EQ(stats.device_ipc_clients(), 1u);
  EXPECT_EQ(stats.device_staged_clients(), 1u);
}

// The killed child: publishes fresh device blocks (so the node pulls every
// one from staging) and fetches them back into device memory, forever.
int RunChild(int argc, char** argv) {
  ClientOptions options{.node_address = testing::ChildArg(argc, argv, "node")};
  auto device = std::make_shared<HostDeviceMemory>();
  options.device = device;
  auto c = Client::Connect(options);
  if (!c.ok()) return 10;
  auto ns = (*c)->OpenNamespace(Spec());
  if (!ns.ok()) return 11;
  constexpr size_t kBatch = 16;
  auto source = (*c)->Allocate(kBatch * kBlock, MemoryKind::kDevice);
  auto destination = (*c)->Allocate(kBatch * kBlock, MemoryKind::kDevice);
  if (!source.ok() || !destination.ok()) return 12;
  for (uint64_t round = 100;; ++round) {
    const std::vector<BlockKey> keys = ns->Keys(testing::Tokens(round, kBatch, kTokensPerBlock));
    std::vector<PublishItem> publish;
    std::vector<FetchItem> fetch;
    for (size_t i = 0; i < kBatch; ++i) {
      publish.push_back({keys[i], std::nullopt, source->get(), i * kBlock});
      fetch.push_back({keys[i], destination->get(), i * kBlock});
    }
    ns->Publish(publish).IgnoreError();
    ns->Fetch(fetch).IgnoreError();
  }
}

}  // namespace
}  // namespace kvstrata

int main(int argc, char** argv) {
  if (!kvstrata::testing::ChildArg(argc, argv, "child").empty())
    return kvstrata::RunChild(argc, argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
