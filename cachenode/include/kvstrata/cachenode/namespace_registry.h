// Namespaces a node has opened: id -> spec and block size. Thread-safe.
#pragma once

#include <cstdint>
#include <optional>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kvstrata.pb.h"

namespace kvstrata::cachenode {

struct NamespaceInfo {
  uint64_t id = 0;
  uint64_t block_bytes = 0;
  v1::NamespaceSpec spec;
};

class NamespaceRegistry {
 public:
  explicit NamespaceRegistry(uint64_t max_block_bytes) : max_block_bytes_(max_block_bytes) {}

  // Validates the spec and opens (idempotently) its namespace.
  absl::StatusOr<NamespaceInfo> Open(const v1::NamespaceSpec& spec);
  // NOT_FOUND when the namespace was never opened on this node.
  absl::StatusOr<NamespaceInfo> Get(uint64_t id) const;
  size_t size() const;

 private:
  const uint64_t max_block_bytes_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<uint64_t, NamespaceInfo> namespaces_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvstrata::cachenode
