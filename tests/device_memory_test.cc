// transfer::DeviceMemory and StagingPool, the same tests on each
// implementation: the host-memory double everywhere, CUDA where a GPU is
// (skipped, saying so, where none is). IPC goes through a second process.
#include "kvstrata/transfer/device_memory.h"

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "absl/strings/escaping.h"
#include "host_device_memory.h"
#include "kvstrata/testing/blocks.h"
#include "kvstrata/testing/process.h"
#include "kvstrata/transfer/staging.h"

namespace kvstrata {
namespace {

using transfer::CopyKind;
using transfer::DeviceAllocation;
using transfer::DeviceMemory;

absl::StatusOr<std::unique_ptr<DeviceMemory>> Open(const std::string& kind) {
  if (kind == "cuda") return transfer::OpenCudaDevice(0);
  return std::unique_ptr<DeviceMemory>(new testing::HostDeviceMemory());
}

std::vector<uint8_t> Pattern(uint64_t seed, size_t size) {
  std::vector<uint8_t> bytes(size + 8);
  testing::FillBlock(seed, 0, bytes.data(), bytes.size());
  bytes.resize(size);
  return bytes;
}

class DeviceMemoryTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    auto device = Open(GetParam());
    if (!device.ok()) GTEST_SKIP() << GetParam() << ": " << device.status();
    device_ = *std::move(device);
  }
  std::unique_ptr<DeviceMemory> device_;
};

// An odd size, so copies end mid-chunk and mid-page.
constexpr size_t kBytes = (3 << 20) + 4093;

TEST_P(DeviceMemoryTest, CopiesRoundTripByteExactThroughTwoDeviceBuffers) {
  auto a = device_->Allocate(kBytes);
  auto b = device_->Allocate(kBytes);
  auto host = device_->AllocatePinnedHost(kBytes);
  ASSERT_TRUE(a.ok() && b.ok() && host.ok()) << a.status() << b.status() << host.status();
  const std::vector<uint8_t> in = Pattern(1, kBytes);
  std::memcpy(host->data(), in.data(), kBytes);
  auto stream = device_->CreateStream();
  ASSERT_TRUE(stream.ok());
  ASSERT_TRUE((*stream)->Copy(a->data(), host->data(), kBytes, CopyKind::kHostToDevice).ok());
  ASSERT_TRUE((*stream)->Copy(b->data(), a->data(), kBytes, CopyKind::kDeviceToDevice).ok());
  ASSERT_TRUE((*stream)->Synchronize().ok());
  std::memset(host->data(), 0, kBytes);
  ASSERT_TRUE((*stream)->Copy(host->data(), b->data(), kBytes, CopyKind::kDeviceToHost).ok());
  auto event = (*stream)->Record();
  ASSERT_TRUE(event.ok());
  ASSERT_TRUE((*event)->Wait().ok());
  EXPECT_TRUE(*(*event)->Done());
  EXPECT_EQ(std::memcmp(host->data(), in.data(), kBytes), 0);
}

TEST_P(DeviceMemoryTest, PinnedCallerMemoryCopiesToo) {
  std::vector<uint8_t> in = Pattern(2, kBytes);
  std::vector<uint8_t> out(kBytes, 0);
  auto pin_in = device_->PinHost(in.data(), in.size());
  auto pin_out = device_->PinHost(out.data(), out.size());
  ASSERT_TRUE(pin_in.ok() && pin_out.ok()) << pin_in.status() << pin_out.status();
  auto a = device_->Allocate(kBytes);
  auto stream = device_->CreateStream();
  ASSERT_TRUE(a.ok() && stream.ok());
  ASSERT_TRUE((*stream)->Copy(a->data(), in.data(), kBytes, CopyKind::kHostToDevice).ok());
  ASSERT_TRUE((*stream)->Copy(out.data(), a->data(), kBytes, CopyKind::kDeviceToHost).ok());
  ASSERT_TRUE((*stream)->Synchronize().ok());
  EXPECT_EQ(out, in);
}

TEST_P(DeviceMemoryTest, AnotherProcessMapsAnExportedAllocation) {
  auto a = device_->Allocate(kBytes);
  auto host = device_->AllocatePinnedHost(kBytes);
  auto stream = device_->CreateStream();
  ASSERT_TRUE(a.ok() && host.ok() && stream.ok());
  const std::vector<uint8_t> in = Pattern(3, kBytes);
  std::memcpy(host->data(), in.data(), kBytes);
  ASSERT_TRUE((*stream)->Copy(a->data(), host->data(), kBytes, CopyKind::kHostToDevice).ok());
  ASSERT_TRUE((*stream)->Synchronize().ok());
  auto handle = device_->ExportIpc(*a);
  ASSERT_TRUE(handle.ok()) << handle.status();
  // The child checks seed 3's bytes and overwrites them with seed 4's.
  auto child = testing::ChildProcess::SpawnSelf(
      {"--child=ipc", "--kind=" + GetParam(), "--handle=" + absl::BytesToHexString(*handle)});
  ASSERT_TRUE(child.ok());
  ASSERT_EQ((*child)->Wait(), 0) << "the importing process failed";
  ASSERT_TRUE((*stream)->Copy(host->data(), a->data(), kBytes, CopyKind::kDeviceToHost).ok());
  ASSERT_TRUE((*stream)->Synchronize().ok());
  EXPECT_EQ(std::memcmp(host->data(), Pattern(4, kBytes).data(), kBytes), 0);
}

TEST_P(DeviceMemoryTest, AMalformedIpcHandleIsAnError) {
  EXPECT_EQ(device_->ImportIpc("short").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(device_->ImportIpc(std::string(72, '\x5a')).ok());
}

// What the client checks a registered device buffer with: device memory
// passes, host memory and a range running past its allocation do not.
TEST_P(DeviceMemoryTest, CheckDeviceRangeTellsDeviceMemoryFromHostMemory) {
  auto allocation = device_->Allocate(kBytes);
  ASSERT_TRUE(allocation.ok()) << allocation.status();
  EXPECT_TRUE(device_->CheckDeviceRange(allocation->data(), kBytes).ok());
  EXPECT_TRUE(device_->CheckDeviceRange(allocation->data() + 4096, kBytes - 4096).ok());
  std::vector<uint8_t> host(kBytes);
  EXPECT_EQ(device_->CheckDeviceRange(host.data(), host.size()).code(),
            absl::StatusCode::kInvalidArgument);
  auto pinned = device_->AllocatePinnedHost(4096);
  ASSERT_TRUE(pinned.ok());
  EXPECT_FALSE(device_->CheckDeviceRange(pinned->data(), 4096).ok()) << "pinned host is not device";
  EXPECT_FALSE(device_->CheckDeviceRange(nullptr, 16).ok());
}

TEST_P(DeviceMemoryTest, StagingLendsWholeChunksAndCopiesByteExact) {
  auto pool =
      transfer::StagingPool::Create(*device_, nullptr, {.bytes = 4 << 20, .chunk_bytes = 1 << 20});
  ASSERT_TRUE(pool.ok()) << pool.status();
  auto one = (*pool)->Take(1);
  auto two = (*pool)->Take((1 << 20) + 1);  // two chunks
  ASSERT_TRUE(one.ok() && two.ok());
  EXPECT_EQ((*two)->data(), (*one)->data() + (1 << 20));
  EXPECT_EQ((*pool)->Take(2 << 20).status().code(), absl::StatusCode::kResourceExhausted);
  auto last = (*pool)->Take(1 << 20);
  ASSERT_TRUE(last.ok());
  EXPECT_EQ((*pool)->counters().leased_bytes, 4u << 20);
  one->reset();
  last->reset();
  EXPECT_EQ((*pool)->Take(2 << 20).status().code(), absl::StatusCode::kResourceExhausted)
      << "the free chunks are not contiguous";
  two->reset();
  auto all = (*pool)->Take(4 << 20);
  ASSERT_TRUE(all.ok());
  EXPECT_EQ((*pool)->counters().exhausted, 2u);

  constexpr size_t kSize = (3 << 20) + 77;  // four copies, the last short
  const std::vector<uint8_t> in = Pattern(5, kSize);
  std::memcpy((*all)->data(), in.data(), kSize);
  auto a = device_->Allocate(kSize);
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE((*pool)->CopyToDevice(a->data(), (*all)->data(), kSize).ok());
  std::memset((*all)->data(), 0, kSize);
  ASSERT_TRUE((*pool)->CopyToHost((*all)->data(), a->data(), kSize).ok());
  EXPECT_EQ(std::memcmp((*all)->data(), in.data(), kSize), 0);
}

INSTANTIATE_TEST_SUITE_P(Devices, DeviceMemoryTest, ::testing::Values("host_double", "cuda"),
                         [](const auto& info) { return info.param; });

// CMake found CUDA, so the CUDA implementation must be in the library (it
// compiles in every CI run even where no GPU runs it).
TEST(DeviceMemoryBuildTest, TheCudaImplementationIsBuiltWhereCudaIs) {
  EXPECT_EQ(transfer::CudaDeviceMemoryBuilt(), KVSTRATA_EXPECT_CUDA != 0);
  if (!transfer::CudaDeviceMemoryBuilt()) {
    EXPECT_EQ(transfer::OpenCudaDevice(0).status().code(), absl::StatusCode::kUnimplemented);
  }
}

// What makes the double a faithful stand-in: device memory is not host memory.
TEST(HostDeviceDoubleTest, TheHostCannotTouchDeviceMemory) {
  testing::HostDeviceMemory device;
  auto a = device.Allocate(4096);
  ASSERT_TRUE(a.ok());
  volatile uint8_t* p = a->data();
  EXPECT_DEATH((void)p[0], "");
}

TEST(HostDeviceDoubleTest, CopiesCheckWhichSideIsWhich) {
  testing::HostDeviceMemory device;
  auto a = device.Allocate(4096);
  auto stream = device.CreateStream();
  ASSERT_TRUE(a.ok() && stream.ok());
  std::vector<uint8_t> host(8192);
  EXPECT_EQ((*stream)->Copy(host.data(), host.data() + 4096, 4096, CopyKind::kDeviceToHost).code(),
            absl::StatusCode::kInvalidArgument)
      << "host memory passed as device memory";
  EXPECT_EQ((*stream)->Copy(a->data(), host.data(), 4097, CopyKind::kHostToDevice).code(),
            absl::StatusCode::kInvalidArgument)
      << "past the allocation's end";
  EXPECT_EQ((*stream)->Copy(a->data(), a->data(), 16, CopyKind::kHostToDevice).code(),
            absl::StatusCode::kInvalidArgument)
      << "device memory passed as host memory";
}

int RunChild(int argc, char** argv) {
  auto device = Open(testing::ChildArg(argc, argv, "kind"));
  if (!device.ok()) return 10;
  const std::string handle = absl::HexStringToBytes(testing::ChildArg(argc, argv, "handle"));
  auto mapped = (*device)->ImportIpc(handle);
  if (!mapped.ok() || mapped->size() != kBytes) return 12;
  auto host = (*device)->AllocatePinnedHost(kBytes);
  auto stream = (*device)->CreateStream();
  if (!host.ok() || !stream.ok()) return 13;
  if (!(*stream)->Copy(host->data(), mapped->data(), kBytes, CopyKind::kDeviceToHost).ok())
    return 14;
  if (!(*stream)->Synchronize().ok()) return 15;
  if (std::memcmp(host->data(), Pattern(3, kBytes).data(), kBytes) != 0) return 16;
  std::memcpy(host->data(), Pattern(4, kBytes).data(), kBytes);
  if (!(*stream)->Copy(mapped->data(), host->data(), kBytes, CopyKind::kHostToDevice).ok())
    return 17;
  return (*stream)->Synchronize().ok() ? 0 : 18;
}

}  // namespace
}  // namespace kvstrata

int main(int argc, char** argv) {
  if (!kvstrata::testing::ChildArg(argc, argv, "child").empty())
    return kvstrata::RunChild(argc, argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
