// The NVMe tier's io_uring pool gives back the rings of a burst: after many
// concurrent batches only a few rings stay open (found by tests/soak, where
// every gRPC thread's ring stayed open for good).
#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <latch>
#include <string>
#include <thread>
#include <vector>

#include "nvme/io_ring.h"

namespace kvstrata::cachenode::nvme {
namespace {

size_t OpenFds() {
  size_t n = 0;
  DIR* dir = opendir("/proc/self/fd");
  while (dirent* entry = readdir(dir)) n += entry->d_name[0] != '.';
  closedir(dir);
  return n;
}

TEST(IoRingPoolTest, KeepsOnlyAFewRingsAfterABurst) {
  const std::string path = ::testing::TempDir() + "/io_ring_test.bin";
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, 4096), 0);
  IoRingPool pool(4);
  const size_t before = OpenFds();

  constexpr int kBatches = 16;
  for (int round = 0; round < 2; ++round) {
    // Every batch holds its ring until all of them have one: 16 rings at once.
    std::latch all_running(kBatches);
    std::vector<std::thread> threads;
    std::vector<absl::Status> results(kBatches);
    for (int t = 0; t < kBatches; ++t) {
      threads.emplace_back([&, t] {
        std::vector<char> buffer(4096);
        IoOp op{.fd = fd, .buffer = buffer.data(), .length = 4096, .offset = 0};
        results[t] = pool.Run(absl::MakeSpan(&op, 1), [&](size_t) { all_running.arrive_and_wait(); });
        if (results[t].ok()) results[t] = op.result;
      });
    }
    for (auto& thread : threads) thread.join();
    for (const absl::Status& result : results) EXPECT_TRUE(result.ok()) << result;
    EXPECT_LE(OpenFds(), before + IoRingPool::kMaxIdleRings) << "round " << round;
  }
  close(fd);
  unlink(path.c_str());
}

}  // namespace
}  // namespace kvstrata::cachenode::nvme
