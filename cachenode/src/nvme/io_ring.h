// Batched O_DIRECT file I/O through io_uring. A batch keeps up to the queue
// depth of operations in flight and refills as completions arrive, so one
// caller drives the device at depth without a thread per request. Rings are
// pooled: concurrent batches each take their own ring, and a few stay open.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"

namespace kvstrata::cachenode::nvme {

struct IoOp {
  int fd = -1;
  bool write = false;
  void* buffer = nullptr;  // 4 KiB-aligned for O_DIRECT
  uint64_t length = 0;     // multiple of 4 KiB for O_DIRECT
  uint64_t offset = 0;
  // Filled in by Run: OK, or why this operation failed (short transfers count).
  absl::Status result;
};

class IoRingPool {
 public:
  explicit IoRingPool(unsigned queue_depth);
  ~IoRingPool();
  IoRingPool(const IoRingPool&) = delete;
  IoRingPool& operator=(const IoRingPool&) = delete;

  // Runs every operation; each op's `result` says how it went. The returned
  // status is an error only when the ring itself failed (then every op that
  // had not completed carries that error too). `on_complete(i)` is called, on
  // this thread, as op i completes successfully: callers overlap work (such as
  // checksums) with the rest of the batch.
  template <typename F>
  absl::Status Run(absl::Span<IoOp> ops, F&& on_complete) {
    return RunImpl(ops, [](void* f, size_t i) { (*static_cast<F*>(f))(i); }, &on_complete);
  }
  absl::Status Run(absl::Span<IoOp> ops) {
    return RunImpl(ops, nullptr, nullptr);
  }

  unsigned queue_depth() const { return queue_depth_; }

  // Rings kept open for reuse once their batch is done; more concurrent
  // batches than this open rings of their own and close them afterwards.
  static constexpr size_t kMaxIdleRings = 4;

 private:
  struct Ring;
  absl::Status RunImpl(absl::Span<IoOp> ops, void (*callback)(void*, size_t), void* context);
  absl::StatusOr<std::unique_ptr<Ring>> Acquire();
  void Release(std::unique_ptr<Ring> ring);

  const unsigned queue_depth_;
  absl::Mutex mu_;
  std::vector<std::unique_ptr<Ring>> idle_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvstrata::cachenode::nvme
