// Namespaces a node has opened: id -> spec and block size. Thread-safe.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

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

  // Validates the spec and opens its namespace, or counts one more open of
  // it. A tenant that holds `max_tenant_namespaces` already (0: no limit)
  // cannot open another (RESOURCE_EXHAUSTED).
  absl::StatusOr<NamespaceInfo> Open(const v1::NamespaceSpec& spec,
                                     uint32_t max_tenant_namespaces = 0);
  // NOT_FOUND when the namespace was never opened on this node (or closed).
  absl::StatusOr<NamespaceInfo> Get(uint64_t id) const;
  // Counts one open of the namespace closed, and forgets the namespace when
  // every open was closed (true then): several clients share a namespace,
  // and one client closing it must not end the others' use. Its blocks stay
  // until evicted, and reopening the same spec (same id) finds them again.
  // NOT_FOUND when not open.
  absl::StatusOr<bool> Close(uint64_t id);
  size_t size() const;
  size_t TenantNamespaces(const std::string& tenant) const;

 private:
  const uint64_t max_block_bytes_;
  mutable absl::Mutex mu_;
  struct Entry {
    NamespaceInfo info;
    uint64_t opens = 0;  // OpenNamespace calls not closed yet
  };
  absl::flat_hash_map<uint64_t, Entry> namespaces_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, size_t> per_tenant_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvstrata::cachenode
