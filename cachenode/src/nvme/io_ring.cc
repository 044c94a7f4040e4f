#include "nvme/io_ring.h"

#include <liburing.h>

#include <cstring>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace kvstrata::cachenode::nvme {

struct IoRingPool::Ring {
  io_uring ring{};
  ~Ring() { io_uring_queue_exit(&ring); }
};

IoRingPool::IoRingPool(unsigned queue_depth) : queue_depth_(queue_depth == 0 ? 1 : queue_depth) {}
IoRingPool::~IoRingPool() = default;

absl::StatusOr<std::unique_ptr<IoRingPool::Ring>> IoRingPool::Acquire() {
  {
    absl::MutexLock lock(&mu_);
    if (!idle_.empty()) {
      std::unique_ptr<Ring> ring = std::move(idle_.back());
      idle_.pop_back();
      return ring;
    }
  }
  auto ring = std::make_unique<Ring>();
  if (int rc = io_uring_queue_init(queue_depth_, &ring->ring, 0); rc < 0) {
    return absl::InternalError(absl::StrCat("io_uring_queue_init: ", std::strerror(-rc)));
  }
  return ring;
}

void IoRingPool::Release(std::unique_ptr<Ring> ring) {
  absl::MutexLock lock(&mu_);
  // Beyond a few idle rings, close the ring: a burst of concurrent batches
  // (one per gRPC thread) must not keep its rings' fds and kernel memory for
  // the process's lifetime (tests/soak saw 18 left after 32 clients).
  if (idle_.size() < kMaxIdleRings) idle_.push_back(std::move(ring));
}

absl::Status IoRingPool::RunImpl(absl::Span<IoOp> ops, void (*callback)(void*, size_t),
                                 void* context) {
  if (ops.empty()) return absl::OkStatus();
  absl::StatusOr<std::unique_ptr<Ring>> acquired = Acquire();
  if (!acquired.ok()) {
    for (IoOp& op : ops) op.result = acquired.status();
    return acquired.status();
  }
  io_uring* ring = &(*acquired)->ring;
  for (IoOp& op : ops) op.result = absl::UnknownError("not run");
  size_t next = 0, in_flight = 0, done = 0;
  absl::Status failure;
  while (done < ops.size()) {
    while (next < ops.size() && in_flight < queue_depth_) {
      io_uring_sqe* sqe = io_uring_get_sqe(ring);
      if (sqe == nullptr) break;
      IoOp& op = ops[next];
      if (op.write) {
        io_uring_prep_write(sqe, op.fd, op.buffer, static_cast<unsigned>(op.length), op.offset);
      } else {
        io_uring_prep_read(sqe, op.fd, op.buffer, static_cast<unsigned>(op.length), op.offset);
      }
      io_uring_sqe_set_data64(sqe, next);
      ++next;
      ++in_flight;
    }
    int rc = io_uring_submit_and_wait(ring, 1);
    if (rc < 0 && rc != -EINTR) {
      failure = absl::InternalError(absl::StrCat("io_uring_submit: ", std::strerror(-rc)));
      break;
    }
    io_uring_cqe* cqe = nullptr;
    while (io_uring_peek_cqe(ring, &cqe) == 0) {
      const size_t i = io_uring_cqe_get_data64(cqe);
      const int res = cqe->res;
      io_uring_cqe_seen(ring, cqe);
      --in_flight;
      ++done;
      IoOp& op = ops[i];
      if (res < 0) {
        op.result = absl::InternalError(absl::StrCat(op.write ? "write" : "read", " at ", op.offset,
                                                     ": ", std::strerror(-res)));
      } else if (static_cast<uint64_t>(res) != op.length) {
        op.result = absl::DataLossError(absl::StrCat("short ", op.write ? "write" : "read", " at ",
                                                     op.offset, ": ", res, " of ", op.length,
                                                     " bytes"));
      } else {
        op.result = absl::OkStatus();
        if (callback != nullptr) callback(context, i);
      }
    }
  }
  if (!failure.ok()) {
    // The ring's state is unknown: drop it rather than reuse it, after the
    // kernel is done with every buffer it was given.
    while (in_flight > 0) {
      io_uring_cqe* cqe = nullptr;
      if (io_uring_wait_cqe(ring, &cqe) != 0) break;
      io_uring_cqe_seen(ring, cqe);
      --in_flight;
    }
    for (size_t i = 0; i < ops.size(); ++i) {
      if (absl::IsUnknown(ops[i].result)) ops[i].result = failure;
    }
    return failure;
  }
  Release(*std::move(acquired));
  return absl::OkStatus();
}

}  // namespace kvstrata::cachenode::nvme
