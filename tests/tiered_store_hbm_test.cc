// TieredStore with an HBM tier on the GPU double (tests/support/device): a
// Delete racing a block's move between tiers. The double's copy hook holds
// the move's device copy on the mover's thread while another thread
// deletes the block, so the interleaving that resurrected a deleted block
// (the copy committed after the Delete) happens every run.
#include <gtest/gtest.h>

#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "host_device_memory.h"
#include "kvstrata/cachenode/dram_tier.h"
#include "kvstrata/cachenode/eviction_policy.h"
#include "kvstrata/cachenode/hbm_tier.h"
#include "kvstrata/testing/blocks.h"
#include "tiered_store.h"

namespace kvstrata::cachenode {
namespace {

constexpr uint64_t kSize = 64 << 10;
constexpr uint64_t kHbmBlocks = 2;

// Holds the first copy of one kind on the copying thread until released.
class CopyGate {
 public:
  void Arm(transfer::CopyKind kind) {
    std::lock_guard lock(mu_);
    kind_ = kind;
    armed_ = true;
  }
  void OnCopy(transfer::CopyKind kind) {
    std::unique_lock lock(mu_);
    if (!armed_ || kind != kind_) return;
    armed_ = false;
    entered_.Notify();
    cv_.wait(lock, [&] { return released_; });
  }
  void WaitEntered() { entered_.WaitForNotification(); }
  void Release() {
    {
      std::lock_guard lock(mu_);
      released_ = true;
    }
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  transfer::CopyKind kind_ = transfer::CopyKind::kDeviceToHost;
  bool armed_ = false;
  bool released_ = false;
  absl::Notification entered_;
};

class TieredStoreHbmTest : public ::testing::Test {
 protected:
  TieredStoreHbmTest()
      : dram_arena_(static_cast<uint8_t*>(std::aligned_alloc(4096, kDram))),
        dram_(dram_arena_, kDram, kDram / 4, MakeLruPolicy()) {
    auto device = std::make_unique<testing::HostDeviceMemory>();
    device_ = device.get();
    device_->set_copy_hook([this](transfer::CopyKind kind) { gate_.OnCopy(kind); });
    HbmTierOptions options{.capacity_bytes = kHbmBlocks * kSize, .slab_bytes = kSize};
    options.staging = {.bytes = 16 * kSize, .chunk_bytes = kSize};
    auto hbm = HbmTier::Create(std::move(device), options, MakeLruPolicy(), nullptr);
    EXPECT_TRUE(hbm.ok()) << hbm.status();
    hbm_ = *std::move(hbm);
    store_ = std::make_unique<TieredStore>(dram_, nullptr, false, hbm_.get());
  }
  ~TieredStoreHbmTest() override {
    store_.reset();
    hbm_.reset();
    std::free(dram_arena_);
  }

  static BlockId Id(uint64_t n) { return NumberedBlockId(n, 7); }

  void Publish(uint64_t n, uint8_t format = 0) {
    auto block = store_->Reserve(kSize);
    ASSERT_TRUE(block.ok()) << block.status();
    testing::FillBlock(n, 0, (*block)->data(), kSize);
    (*block)->checksum = BlockChecksum((*block)->data(), kSize);
    (*block)->format = format;
    auto stored = store_->Commit(Id(n), *std::move(block));
    ASSERT_TRUE(stored.ok() && *stored) << stored.status();
  }

  bool Served(uint64_t n) {
    const BlockId id = Id(n);
    return store_->Contains(id) || store_->Pin({&id, 1})[0] != nullptr;
  }

  // Deletes `n` on another thread while the gated copy is held; releases
  // the copy once the Delete returned or, when it waits for the move (the
  // fix), after a while. True when the Delete said it deleted something.
  bool DeleteDuringGatedCopy(uint64_t n, std::thread& mover) {
    gate_.WaitEntered();
    bool deleted = false;
    absl::Notification done;
    std::thread deleter([&] {
      deleted = store_->Erase(Id(n));
      done.Notify();
    });
    done.WaitForNotificationWithTimeout(absl::Milliseconds(300));
    gate_.Release();
    mover.join();
    deleter.join();
    return deleted;
  }

  static constexpr uint64_t kDram = 16 * kSize;
  uint8_t* dram_arena_;
  DramTier dram_;
  testing::HostDeviceMemory* device_ = nullptr;
  CopyGate gate_;
  std::unique_ptr<HbmTier> hbm_;
  std::unique_ptr<TieredStore> store_;
};

TEST_F(TieredStoreHbmTest, DeleteDuringHbmToDramDemotionLeavesNothing) {
  Publish(1);
  Publish(2);
  ASSERT_NE(hbm_->slabs().Find(Id(1), false), nullptr);
  // Publishing a third block evicts block 1 from HBM; its copy down to DRAM
  // is held while block 1 is deleted.
  gate_.Arm(transfer::CopyKind::kDeviceToHost);
  std::thread mover([&] { Publish(3); });
  EXPECT_TRUE(DeleteDuringGatedCopy(1, mover)) << "the block existed (moving) when deleted";
  EXPECT_FALSE(Served(1)) << "the demoted copy resurrected a deleted block";
  EXPECT_TRUE(Served(2));
  EXPECT_TRUE(Served(3));
  EXPECT_EQ(store_->moves_in_flight(), 0u);
}

TEST_F(TieredStoreHbmTest, DeleteDuringDramToHbmPromotionLeavesNothing) {
  Publish(1);
  Publish(2);
  Publish(3);  // block 1 demoted to DRAM
  ASSERT_NE(dram_.Find(Id(1), false), nullptr);
  // A hit on block 1 copies it up into HBM; that copy is held while block 1
  // is deleted.
  gate_.Arm(transfer::CopyKind::kHostToDevice);
  std::thread mover([&] {
    const BlockId id = Id(1);
    std::vector<std::shared_ptr<StoredBlock>> pinned = store_->Pin({&id, 1});
    EXPECT_NE(pinned[0], nullptr) << "a fetch concurrent with the Delete may still get it";
  });
  EXPECT_TRUE(DeleteDuringGatedCopy(1, mover));
  EXPECT_FALSE(Served(1)) << "the promoted copy resurrected a deleted block";
  EXPECT_EQ(hbm_->slabs().Find(Id(1), false), nullptr);
  EXPECT_TRUE(Served(2) && Served(3));
  EXPECT_EQ(store_->moves_in_flight(), 0u);
}

// A block's stored format (a quantized namespace's, or a precision
// transcode's coarser copy) travels with it through HBM: Fetch reports it per
// block, and the client decodes by it. HBM copies used to drop it, so an fp8
// block promoted into HBM was served as raw, its encoded bytes taken for KV.
TEST_F(TieredStoreHbmTest, StoredFormatSurvivesHbmPlacementDemotionAndPromotion) {
  const uint8_t kFp8 = v1::FORMAT_FP8_E4M3;
  Publish(1, kFp8);
  const BlockId id = Id(1);
  ASSERT_NE(hbm_->slabs().Find(id, false), nullptr);
  EXPECT_EQ(store_->StoredFormatOf(id), kFp8) << "placed in HBM";
  EXPECT_EQ(store_->Pin({&id, 1})[0]->format, kFp8) << "a staged copy for a fetch";
  Publish(2);
  Publish(3);  // block 1 demoted to DRAM
  ASSERT_NE(dram_.Find(id, false), nullptr);
  EXPECT_EQ(store_->StoredFormatOf(id), kFp8) << "demoted";
  EXPECT_EQ(store_->Pin({&id, 1})[0]->format, kFp8) << "the DRAM copy a hit serves";
  ASSERT_NE(hbm_->slabs().Find(id, false), nullptr) << "the hit promoted it";
  EXPECT_EQ(store_->StoredFormatOf(id), kFp8) << "promoted";
  EXPECT_EQ(store_->Pin({&id, 1})[0]->format, kFp8);
  EXPECT_EQ(store_->PinHbm({&id, 1})[0]->format, kFp8) << "what FetchDeviceIpc reports";
}

TEST_F(TieredStoreHbmTest, DeleteWithoutMovesDoesNotWait) {
  Publish(1);
  EXPECT_TRUE(store_->Erase(Id(1)));
  EXPECT_FALSE(store_->Erase(Id(1)));
  EXPECT_FALSE(Served(1));
}

}  // namespace
}  // namespace kvstrata::cachenode
