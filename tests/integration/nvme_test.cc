// The NVMe tier through a real node process: spill past DRAM and promote on
// hits, restart (clean and kill -9), damaged data files and index records,
// unusable directories. Real files, real RocksDB, real UCX over loopback.
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <rocksdb/db.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kvstrata.grpc.pb.h"
#include "kvstrata/client/client.h"
#include "kvstrata/testing/blocks.h"
#include "kvstrata/testing/process.h"
#include "kvstrata/testing/streams.h"

namespace kvstrata {
namespace {

using client::BlockOutcome;
using client::Client;
using client::Namespace;
using testing::FetchAndVerify;
using testing::NodeProcess;
using testing::PublishStream;

constexpr uint64_t kBlock = 256 * 1024;
constexpr uint32_t kTokensPerBlock = 16;
constexpr uint64_t kDramBytes = 16 << 20;  // 64 blocks

v1::NamespaceSpec Spec() { return testing::OpaqueSpec("nvme-test", kBlock, kTokensPerBlock); }

class NvmeNodeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto temp = testing::TempDir::Create("kvstrata-nvme-node");
    ASSERT_TRUE(temp.ok()) << temp.status();
    temp_ = *std::move(temp);
    dir_ = temp_->path();
  }

  std::string DataDir() const { return dir_ + "/nvme0"; }

  // Starts (or restarts) the node on the same NVMe directory and waits until
  // its index is recovered.
  void StartNode(std::vector<std::string> extra = {}) {
    std::vector<std::string> flags = {absl::StrCat("--dram_bytes=", kDramBytes),
                                      "--slab_bytes=4194304", "--transfer_timeout=5s",
                                      "--nvme_dirs=" + DataDir(),
                                      "--nvme_capacity_bytes=268435456",
                                      // A loaded test machine may stall the writer; these
                                      // tests are about what is kept, not about timing.
                                      "--nvme_demotion_wait=10s"};
    flags.insert(flags.end(), extra.begin(), extra.end());
    auto node = NodeProcess::Start(KVSTRATA_NODE_BINARY, flags);
    ASSERT_TRUE(node.ok()) << node.status();
    node_ = *std::move(node);
    auto channel = grpc::CreateChannel(node_->address(), grpc::InsecureChannelCredentials());
    auto stub = v1::CacheNode::NewStub(channel);
    const absl::Time deadline = absl::Now() + absl::Seconds(30);
    while (absl::Now() < deadline) {
      grpc::ClientContext context;
      v1::HealthResponse health;
      if (stub->Health(&context, v1::HealthRequest(), &health).ok() && health.serving()) {
        EXPECT_FALSE(health.recovering());
        client_ = nullptr;
        auto c = Client::Connect({.node_address = node_->address(), .timeout = absl::Seconds(20)});
        ASSERT_TRUE(c.ok()) << c.status();
        client_ = *std::move(c);
        auto ns = client_->OpenNamespace(Spec());
        ASSERT_TRUE(ns.ok()) << ns.status();
        ns_ = *ns;
        return;
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
    FAIL() << "node never finished recovering";
  }

  v1::StatsResponse Stats() {
    v1::StatsResponse stats;
    EXPECT_TRUE(client_->Stats(&stats).ok());
    return stats;
  }
  static const v1::TierStats* Tier(const v1::StatsResponse& stats, v1::Tier tier) {
    for (const auto& t : stats.tiers()) {
      if (t.tier() == tier) return &t;
    }
    return nullptr;
  }

  // Waits until DRAM plus NVMe hold `blocks` blocks (demotion is behind).
  void WaitStored(size_t blocks) {
    const absl::Time deadline = absl::Now() + absl::Seconds(20);
    while (absl::Now() < deadline) {
      const v1::StatsResponse s = Stats();
      if (Tier(s, v1::TIER_DRAM)->blocks() + Tier(s, v1::TIER_NVME)->blocks() >= blocks) return;
      absl::SleepFor(absl::Milliseconds(20));
    }
    ADD_FAILURE() << "demotions never caught up: " << Stats().DebugString();
  }

  std::vector<BlockKey> Keys(uint64_t seed, size_t count) {
    return ns_->Keys(testing::Tokens(seed, count, kTokensPerBlock));
  }

  std::unique_ptr<testing::TempDir> temp_;  // outlives the node using it
  std::string dir_;
  std::unique_ptr<NodeProcess> node_;
  std::unique_ptr<Client> client_;
  std::optional<Namespace> ns_;
};

TEST_F(NvmeNodeTest, SpillsPastDramAndEveryBlockFetchesBackPromoted) {
  StartNode();
  constexpr size_t kCount = 200;  // 50 MiB through a 16 MiB DRAM tier
  auto published = PublishStream(*client_, *ns_, 1, kCount, /*batch=*/16);
  ASSERT_TRUE(published.ok()) << published.status();
  ASSERT_EQ(published->count(BlockOutcome::kOk), kCount);
  WaitStored(kCount);
  v1::StatsResponse before = Stats();
  EXPECT_GE(Tier(before, v1::TIER_NVME)->blocks(), kCount - kDramBytes / kBlock);
  EXPECT_EQ(before.demotion_drops(), 0u);

  auto lookup = ns_->Lookup(Keys(1, kCount));
  ASSERT_TRUE(lookup.ok());
  EXPECT_EQ(lookup->prefix_length, kCount);
  ASSERT_EQ(lookup->tiers.size(), kCount);
  EXPECT_EQ(lookup->tiers.front(), client::Tier::kNvme) << "the oldest blocks were demoted";
  EXPECT_EQ(lookup->tiers.back(), client::Tier::kDram);

  EXPECT_EQ(FetchAndVerify(*client_, *ns_, 1, kCount, /*batch=*/16), kCount);
  const v1::StatsResponse after = Stats();
  EXPECT_GT(after.promoted_blocks(), 0u);
  EXPECT_EQ(after.fetch_miss_blocks(), 0u);
  EXPECT_EQ(after.nvme_corrupt_blocks(), 0u);
  // A promoted block is in DRAM now: fetching the tail again needs no NVMe read.
  auto again = ns_->Lookup(Keys(1, kCount));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->tiers.back(), client::Tier::kDram);
}

TEST_F(NvmeNodeTest, LookupPrefetchesNvmeBlocksIntoDram) {
  StartNode();
  constexpr size_t kCount = 200;
  ASSERT_EQ(PublishStream(*client_, *ns_, 6, kCount, 16)->count(BlockOutcome::kOk), kCount);
  WaitStored(kCount);
  const std::vector<BlockKey> head = Keys(6, 16);
  auto first = ns_->Lookup(head);
  ASSERT_TRUE(first.ok());
  ASSERT_EQ(first->tiers.size(), 16u);
  EXPECT_EQ(first->tiers.front(), client::Tier::kNvme);
  // Without any Fetch, the Lookup alone brings the prefix into DRAM.
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  bool in_dram = false;
  while (!in_dram && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
    v1::StatsResponse stats = Stats();
    in_dram = stats.promoted_blocks() >= 16;
  }
  EXPECT_TRUE(in_dram) << Stats().DebugString();
  EXPECT_EQ(Stats().fetch_hit_blocks(), 0u);
  EXPECT_EQ(FetchAndVerify(*client_, *ns_, 6, 16, 16), 16u);
  EXPECT_EQ(Stats().promoted_blocks(), 16u) << "the Fetch found them promoted already";
}

TEST_F(NvmeNodeTest, RequestFinishedKnowsABlockOnlyOnNvme) {
  StartNode();
  constexpr size_t kCount = 120;  // 30 MiB through a 16 MiB DRAM tier
  ASSERT_EQ(PublishStream(*client_, *ns_, 4, kCount, 16)->count(BlockOutcome::kOk), kCount);
  WaitStored(kCount);
  const std::vector<BlockKey> keys = Keys(4, kCount);
  auto known = ns_->RequestFinished(keys.front(), 64);
  ASSERT_TRUE(known.ok()) << known.status();
  EXPECT_TRUE(*known) << "the oldest block was demoted, and the NVMe tier holds it";
  EXPECT_EQ(Stats().request_hints(), 1u);
  // The hint moved nothing: the block is still on NVMe only.
  auto lookup = ns_->Lookup({keys.front()});
  ASSERT_TRUE(lookup.ok());
  ASSERT_EQ(lookup->tiers.size(), 1u);
  EXPECT_EQ(lookup->tiers.front(), client::Tier::kNvme);
}

TEST_F(NvmeNodeTest, RestartFindsEveryBlockThatReachedNvme) {
  StartNode({"--nvme_flush_on_shutdown=false"});
  constexpr size_t kCount = 120;
  ASSERT_EQ(PublishStream(*client_, *ns_, 2, kCount, 16)->count(BlockOutcome::kOk), kCount);
  WaitStored(kCount);
  const uint64_t on_nvme = Tier(Stats(), v1::TIER_NVME)->blocks();
  ASSERT_GT(on_nvme, 0u);
  client_.reset();
  node_.reset();  // SIGTERM; DRAM is not flushed with this flag

  StartNode({"--nvme_flush_on_shutdown=false"});
  auto lookup = ns_->Lookup(Keys(2, kCount));
  ASSERT_TRUE(lookup.ok());
  // Demotion is oldest-first, so the blocks on NVMe are the stream's head.
  EXPECT_EQ(lookup->prefix_length, on_nvme);
  EXPECT_EQ(FetchAndVerify(*client_, *ns_, 2, lookup->prefix_length, 16), lookup->prefix_length);
}

TEST_F(NvmeNodeTest, CleanShutdownFlushesDramSoNothingIsLost) {
  StartNode();
  constexpr size_t kCount = 100;
  ASSERT_EQ(PublishStream(*client_, *ns_, 3, kCount, 16)->count(BlockOutcome::kOk), kCount);
  client_.reset();
  node_.reset();
  StartNode();
  auto lookup = ns_->Lookup(Keys(3, kCount));
  ASSERT_TRUE(lookup.ok());
  EXPECT_EQ(lookup->prefix_length, kCount);
  EXPECT_EQ(FetchAndVerify(*client_, *ns_, 3, kCount, 16), kCount);
}

TEST_F(NvmeNodeTest, KillNineDuringHeavyPublishNeverServesAWrongBlock) {
  StartNode();
  // A publisher streams until the node dies under it.
  std::atomic<size_t> published{0};
  std::thread publisher([&, address = node_->address()] {
    auto c = Client::Connect({.node_address = address, .timeout = absl::Seconds(5)});
    if (!c.ok()) return;
    auto ns = (*c)->OpenNamespace(Spec());
    if (!ns.ok()) return;
    for (uint64_t seed = 100;; ++seed) {
      auto result = PublishStream(**c, *ns, seed, 32, 16);
      if (!result.ok()) return;
      published += result->count(BlockOutcome::kOk);
    }
  });
  // 200 blocks (50 MiB) through a 64-block DRAM: demotion is in full swing.
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (published < 200 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(10));
  node_->process().Signal(SIGKILL);
  node_->process().Wait();
  publisher.join();
  ASSERT_GE(published.load(), 200u);

  client_.reset();
  StartNode();
  size_t found = 0;
  for (uint64_t seed = 100; seed < 100 + published / 32 + 2; ++seed) {
    auto lookup = ns_->Lookup(Keys(seed, 32));
    ASSERT_TRUE(lookup.ok());
    found += lookup->prefix_length;
    // Everything Lookup reports comes back byte-exact (or, had its bytes been
    // torn, as a miss: FetchAndVerify counts only matching blocks).
    EXPECT_EQ(FetchAndVerify(*client_, *ns_, seed, lookup->prefix_length, 16),
              lookup->prefix_length)
        << "seed " << seed;
  }
  EXPECT_GT(found, 0u) << "demoted blocks survive kill -9";
  const v1::StatsResponse stats = Stats();
  EXPECT_EQ(stats.nvme_corrupt_blocks(), 0u);
  EXPECT_EQ(stats.fetch_miss_blocks(), 0u);
}

TEST_F(NvmeNodeTest, DamagedDataAndIndexBecomeCountedMisses) {
  StartNode();
  constexpr size_t kCount = 64;
  ASSERT_EQ(PublishStream(*client_, *ns_, 4, kCount, 16)->count(BlockOutcome::kOk), kCount);
  const std::vector<BlockKey> keys = Keys(4, kCount);
  client_.reset();
  node_.reset();  // clean: all 64 blocks on NVMe

  // Damage one index record (block 40) and the bytes of some blocks.
  {
    rocksdb::DB* raw = nullptr;
    ASSERT_TRUE(rocksdb::DB::Open(rocksdb::Options(), DataDir() + "/kvstrata-index", &raw).ok());
    std::unique_ptr<rocksdb::DB> db(raw);
    std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions()));
    std::string victim_key;
    for (it->Seek("b"); it->Valid() && it->key().starts_with("b"); it->Next()) {
      if (it->key().ToString().substr(9) == std::string(keys[40].view())) {
        victim_key = it->key().ToString();
      }
    }
    ASSERT_FALSE(victim_key.empty());
    std::string value;
    ASSERT_TRUE(db->Get(rocksdb::ReadOptions(), victim_key, &value).ok());
    value[30] ^= 0x01;
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), victim_key, value).ok());
  }
  {
    const int fd = ::open((DataDir() + "/kvstrata-data").c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    for (off_t at : {off_t{1000}, off_t{10 * kBlock + 77}}) {
      char byte;
      ASSERT_EQ(::pread(fd, &byte, 1, at), 1);
      byte ^= 0x20;
      ASSERT_EQ(::pwrite(fd, &byte, 1, at), 1);
    }
    ::close(fd);
  }

  StartNode();
  EXPECT_EQ(Stats().nvme_corrupt_records(), 1u);
  auto lookup = ns_->Lookup(keys);
  ASSERT_TRUE(lookup.ok());
  EXPECT_EQ(lookup->prefix_length, 40u) << "the prefix ends at the dropped record";
  // Fetch everything but block 40: exactly the blocks whose bytes were hit
  // are misses; every block served is right.
  const size_t good = FetchAndVerify(*client_, *ns_, 4, kCount, 16);
  const v1::StatsResponse stats = Stats();
  EXPECT_EQ(stats.nvme_corrupt_blocks(), 2u);
  EXPECT_EQ(good, kCount - 1 - 2);
  EXPECT_EQ(stats.fetch_miss_blocks(), 3u);
  EXPECT_TRUE(client_->Ping().ok()) << "the node keeps running";
}

// Moves the index's records into SST files (a node's index may still hold
// them in its write-ahead log) and returns the largest SST.
std::string CompactIndex(const std::string& index_dir) {
  rocksdb::DB* raw = nullptr;
  EXPECT_TRUE(rocksdb::DB::Open(rocksdb::Options(), index_dir, &raw).ok());
  std::unique_ptr<rocksdb::DB> db(raw);
  EXPECT_TRUE(db->Flush(rocksdb::FlushOptions()).ok());
  EXPECT_TRUE(db->CompactRange(rocksdb::CompactRangeOptions(), nullptr, nullptr).ok());
  db.reset();
  std::string largest;
  uintmax_t size = 0;
  for (const auto& entry : std::filesystem::directory_iterator(index_dir)) {
    if (entry.path().extension() == ".sst" && entry.file_size() > size) {
      size = entry.file_size();
      largest = entry.path().string();
    }
  }
  return largest;
}

TEST_F(NvmeNodeTest, AFlippedBitInTheIndexCostsOneBlockOfRecordsOnce) {
  StartNode();
  constexpr size_t kCount = 400;
  ASSERT_EQ(PublishStream(*client_, *ns_, 8, kCount, 16)->count(BlockOutcome::kOk), kCount);
  client_.reset();
  node_.reset();  // clean: every block on NVMe
  const std::string sst = CompactIndex(DataDir() + "/kvstrata-index");
  ASSERT_FALSE(sst.empty());
  {
    // One bit in the middle of the table: a data block (they come first).
    const int fd = ::open(sst.c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    const off_t at = std::filesystem::file_size(sst) / 2;
    char byte;
    ASSERT_EQ(::pread(fd, &byte, 1, at), 1);
    byte ^= 0x10;
    ASSERT_EQ(::pwrite(fd, &byte, 1, at), 1);
    ::close(fd);
  }

  StartNode();
  v1::StatsResponse stats = Stats();
  const uint64_t recovered = stats.nvme_recovered_blocks();
  EXPECT_EQ(stats.nvme_index_repairs(), 1u);
  EXPECT_LT(recovered, kCount) << "the flipped bit cost nothing: did it land in a data block?";
  // A 4 KiB index block holds a few dozen records; before, every record
  // after the damage was lost (and again at every start).
  EXPECT_GE(recovered, kCount - 100);
  EXPECT_FALSE(Tier(stats, v1::TIER_NVME)->last_error().empty()) << "the repair is reported";
  const size_t good = FetchAndVerify(*client_, *ns_, 8, kCount, 16);
  EXPECT_EQ(good, recovered) << "every recovered block serves, right";

  // The damage is gone: the next start keeps everything, and new blocks.
  ASSERT_EQ(PublishStream(*client_, *ns_, 9, 50, 16)->count(BlockOutcome::kOk), 50u);
  client_.reset();
  node_.reset();
  StartNode();
  stats = Stats();
  EXPECT_EQ(stats.nvme_index_repairs(), 0u);
  EXPECT_EQ(stats.nvme_recovered_blocks(), recovered + 50);
  EXPECT_EQ(FetchAndVerify(*client_, *ns_, 8, kCount, 16), good);
  EXPECT_EQ(FetchAndVerify(*client_, *ns_, 9, 50, 16), 50u);
}

TEST_F(NvmeNodeTest, AnUnreadableCurrentFileIsRepairedNotADisabledTier) {
  StartNode();
  constexpr size_t kCount = 100;
  ASSERT_EQ(PublishStream(*client_, *ns_, 10, kCount, 16)->count(BlockOutcome::kOk), kCount);
  client_.reset();
  node_.reset();
  CompactIndex(DataDir() + "/kvstrata-index");
  {
    std::ofstream current(DataDir() + "/kvstrata-index/CURRENT", std::ios::trunc);
    current << "MANIFEST-999999\n";  // names a manifest that does not exist
  }
  StartNode();
  const v1::StatsResponse stats = Stats();
  ASSERT_NE(Tier(stats, v1::TIER_NVME), nullptr);
  EXPECT_GT(Tier(stats, v1::TIER_NVME)->capacity_bytes(), 0u) << "the tier was disabled";
  EXPECT_EQ(stats.nvme_index_repairs(), 1u);
  EXPECT_EQ(stats.nvme_recovered_blocks(), kCount);
  EXPECT_EQ(FetchAndVerify(*client_, *ns_, 10, kCount, 16), kCount);
}

// ---- index damage, then two restarts -----------------------------------------

enum class IndexDamage { kSstBitFlip, kCurrent, kManifest, kWal, kTruncatedSst, kDeletedIndex };

std::string DamageName(const ::testing::TestParamInfo<IndexDamage>& info) {
  switch (info.param) {
    case IndexDamage::kSstBitFlip: return "SstBitFlip";
    case IndexDamage::kCurrent: return "Current";
    case IndexDamage::kManifest: return "Manifest";
    case IndexDamage::kWal: return "Wal";
    case IndexDamage::kTruncatedSst: return "TruncatedSst";
    case IndexDamage::kDeletedIndex: return "DeletedIndex";
  }
  return "Unknown";
}

// The newest file in `dir` whose name starts with `prefix` and ends with `suffix`.
std::string FileLike(const std::string& dir, const std::string& prefix, const std::string& suffix) {
  std::string found;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind(prefix, 0) == 0 && name.size() >= suffix.size() &&
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0 &&
        entry.path().string() > found) {
      found = entry.path().string();
    }
  }
  return found;
}

// XORs `length` bytes of `path` with 0x5a, `where` of the way in (0.5: the middle).
void Scramble(const std::string& path, size_t length, double where = 0.5) {
  const int fd = ::open(path.c_str(), O_RDWR);
  ASSERT_GE(fd, 0) << path;
  const off_t size = static_cast<off_t>(std::filesystem::file_size(path));
  const off_t at = std::max<off_t>(0, static_cast<off_t>(static_cast<double>(size) * where) -
                                          static_cast<off_t>(length) / 2);
  std::vector<char> bytes(std::min<off_t>(length, size - at));
  ASSERT_EQ(::pread(fd, bytes.data(), bytes.size(), at), static_cast<ssize_t>(bytes.size()));
  for (char& b : bytes) b ^= 0x5a;
  ASSERT_EQ(::pwrite(fd, bytes.data(), bytes.size(), at), static_cast<ssize_t>(bytes.size()));
  ::close(fd);
}

class IndexDamageTest : public NvmeNodeTest, public ::testing::WithParamInterface<IndexDamage> {};

// Whatever the damage: the node comes up with a working tier, serves every
// block whose record survived (and no other, and never a wrong one), says
// in Stats what recovery kept and repaired, and the next restart, after new
// publishes, keeps all of that.
TEST_P(IndexDamageTest, EverySurvivingBlockServesOnEveryRestartAndNoneIsWrong) {
  StartNode();
  constexpr size_t kCount = 200;
  ASSERT_EQ(PublishStream(*client_, *ns_, 71, kCount, 16)->count(BlockOutcome::kOk), kCount);
  client_.reset();
  node_.reset();  // clean: every block on NVMe
  const std::string index = DataDir() + "/kvstrata-index";
  // Records live in SSTs (compacted) for every case but the WAL's.
  if (GetParam() != IndexDamage::kWal) {
    ASSERT_FALSE(CompactIndex(index).empty());
  }
  bool all_records_survive = false;  // the damage leaves every record readable somewhere
  switch (GetParam()) {
    case IndexDamage::kSstBitFlip:
      ASSERT_NO_FATAL_FAILURE(Scramble(FileLike(index, "", ".sst"), 1));
      break;
    case IndexDamage::kCurrent:
      { std::ofstream(index + "/CURRENT", std::ios::trunc) << "garbage\n"; }
      all_records_survive = true;  // the tables are intact
      break;
    case IndexDamage::kManifest:
      ASSERT_NO_FATAL_FAILURE(Scramble(FileLike(index, "MANIFEST-", ""), 64));
      all_records_survive = true;
      break;
    case IndexDamage::kWal: {
      const std::string wal = FileLike(index, "", ".log");
      ASSERT_FALSE(wal.empty());
      ASSERT_GT(std::filesystem::file_size(wal), 4096u) << "the records are not in the WAL";
      // Early in the log, so most batches follow the damage.
      ASSERT_NO_FATAL_FAILURE(Scramble(wal, 64, 0.2));
      break;
    }
    case IndexDamage::kTruncatedSst: {
      const std::string sst = FileLike(index, "", ".sst");
      std::filesystem::resize_file(sst, std::filesystem::file_size(sst) / 2);
      break;
    }
    case IndexDamage::kDeletedIndex:
      std::filesystem::remove_all(index);
      break;
  }

  ASSERT_NO_FATAL_FAILURE(StartNode());  // waits for ready: recovery is over
  v1::StatsResponse stats = Stats();
  ASSERT_NE(Tier(stats, v1::TIER_NVME), nullptr);
  EXPECT_GT(Tier(stats, v1::TIER_NVME)->capacity_bytes(), 0u) << "the tier was disabled";
  const uint64_t recovered = stats.nvme_recovered_blocks();
  EXPECT_LE(recovered, kCount);
  if (all_records_survive) {
    EXPECT_EQ(recovered, kCount);
  }
  if (GetParam() == IndexDamage::kDeletedIndex) {
    EXPECT_EQ(recovered, 0u);
  }
  // The figures the docs' "what survives what" table quotes.
  std::printf("damage %s: recovered %lu of %zu blocks, index repairs %lu\n",
              DamageName({GetParam(), 0}).c_str(), static_cast<unsigned long>(recovered), kCount,
              static_cast<unsigned long>(stats.nvme_index_repairs()));
  // A damaged WAL record is stepped over inside RocksDB, unreported: the
  // count of blocks recovered is what shows it.
  if (GetParam() != IndexDamage::kWal) {
    EXPECT_EQ(stats.nvme_index_repairs(), 1u) << "the damage went unnoticed";
  }
  if (stats.nvme_index_repairs() > 0) {
    EXPECT_FALSE(Tier(stats, v1::TIER_NVME)->last_error().empty()) << "the repair is reported";
  }
  // Exactly the recovered blocks serve, each byte-exact.
  const size_t good = FetchAndVerify(*client_, *ns_, 71, kCount, 16);
  EXPECT_EQ(good, recovered);
  EXPECT_EQ(Stats().fetch_hit_blocks(), good) << "a block served with wrong bytes";
  EXPECT_EQ(Stats().nvme_corrupt_blocks(), 0u);

  // New blocks, a clean restart: the damage is gone and nothing more is lost.
  ASSERT_EQ(PublishStream(*client_, *ns_, 72, 50, 16)->count(BlockOutcome::kOk), 50u);
  client_.reset();
  node_.reset();
  ASSERT_NO_FATAL_FAILURE(StartNode());
  stats = Stats();
  EXPECT_EQ(stats.nvme_index_repairs(), 0u);
  EXPECT_EQ(stats.nvme_recovered_blocks(), good + 50);
  EXPECT_EQ(FetchAndVerify(*client_, *ns_, 71, kCount, 16), good);
  EXPECT_EQ(FetchAndVerify(*client_, *ns_, 72, 50, 16), 50u);
}

INSTANTIATE_TEST_SUITE_P(Damage, IndexDamageTest,
                         ::testing::Values(IndexDamage::kSstBitFlip, IndexDamage::kCurrent,
                                           IndexDamage::kManifest, IndexDamage::kWal,
                                           IndexDamage::kTruncatedSst, IndexDamage::kDeletedIndex),
                         DamageName);

TEST_F(NvmeNodeTest, AMovedDataDirectoryStartsEmptyNeverWrong) {
  StartNode();
  constexpr size_t kCount = 100;
  ASSERT_EQ(PublishStream(*client_, *ns_, 75, kCount, 16)->count(BlockOutcome::kOk), kCount);
  client_.reset();
  node_.reset();  // clean: every block on NVMe
  const std::string moved = dir_ + "/moved";
  std::filesystem::copy(DataDir(), moved, std::filesystem::copy_options::recursive);
  std::filesystem::remove_all(DataDir());
  // The last --nvme_dirs wins.
  ASSERT_NO_FATAL_FAILURE(StartNode({"--nvme_dirs=" + moved}));
  v1::StatsResponse stats = Stats();
  std::printf("moved directory: recovered %lu of %zu blocks, corrupt records %lu\n",
              static_cast<unsigned long>(stats.nvme_recovered_blocks()), kCount,
              static_cast<unsigned long>(stats.nvme_corrupt_records()));
  // Records name the path of the file they point into: none is taken for
  // a block of this file (by design; see cachenode/README.md).
  EXPECT_EQ(stats.nvme_recovered_blocks(), 0u);
  EXPECT_GT(Tier(stats, v1::TIER_NVME)->capacity_bytes(), 0u) << "the tier was disabled";
  EXPECT_EQ(FetchAndVerify(*client_, *ns_, 75, kCount, 16), 0u);
  EXPECT_EQ(Stats().fetch_hit_blocks(), 0u);
  // The moved directory works from here on.
  ASSERT_EQ(PublishStream(*client_, *ns_, 76, 50, 16)->count(BlockOutcome::kOk), 50u);
  client_.reset();
  node_.reset();
  ASSERT_NO_FATAL_FAILURE(StartNode({"--nvme_dirs=" + moved}));
  EXPECT_EQ(Stats().nvme_recovered_blocks(), 50u);
  EXPECT_EQ(FetchAndVerify(*client_, *ns_, 76, 50, 16), 50u);
}

TEST_F(NvmeNodeTest, UnusableDirectoryLeavesDramServingAndReportsWhy) {
  { std::ofstream(dir_ + "/not-a-dir") << "x"; }
  // An NVMe "directory" under a regular file cannot be created.
  std::vector<std::string> flags = {absl::StrCat("--dram_bytes=", kDramBytes),
                                    "--slab_bytes=4194304", "--nvme_dirs=" + dir_ + "/not-a-dir/nvme",
                                    "--nvme_capacity_bytes=268435456"};
  auto node = NodeProcess::Start(KVSTRATA_NODE_BINARY, flags);
  ASSERT_TRUE(node.ok()) << node.status();
  node_ = *std::move(node);
  auto c = Client::Connect({.node_address = node_->address(), .timeout = absl::Seconds(20)});
  ASSERT_TRUE(c.ok());
  client_ = *std::move(c);
  auto ns = client_->OpenNamespace(Spec());
  ASSERT_TRUE(ns.ok());
  ns_ = *ns;
  auto published = PublishStream(*client_, *ns_, 5, 100, 16);  // more than DRAM holds
  ASSERT_TRUE(published.ok());
  EXPECT_EQ(published->count(BlockOutcome::kOk), 100u) << "DRAM keeps taking publishes";
  const v1::StatsResponse stats = Stats();
  const v1::TierStats* nvme = Tier(stats, v1::TIER_NVME);
  ASSERT_NE(nvme, nullptr);
  EXPECT_NE(nvme->last_error().find("Not a directory"), std::string::npos) << nvme->last_error();
  EXPECT_EQ(nvme->capacity_bytes(), 0u);
  EXPECT_GT(stats.demotion_drops(), 0u);
}

}  // namespace
}  // namespace kvstrata

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
