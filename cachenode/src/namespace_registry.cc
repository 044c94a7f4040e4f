#include "kvstrata/cachenode/namespace_registry.h"

#include "absl/strings/str_cat.h"
#include "kvstrata/common/limits.h"
#include "kvstrata/cachenode/stored_format.h"
#include "kvstrata/common/namespace_spec.h"

namespace kvstrata::cachenode {

absl::StatusOr<NamespaceInfo> NamespaceRegistry::Open(const v1::NamespaceSpec& spec) {
  absl::StatusOr<uint64_t> block_bytes = ValidateNamespaceSpec(spec, max_block_bytes_);
  if (!block_bytes.ok()) return block_bytes.status();
  if (absl::Status s = ValidateStoredFormat(spec); !s.ok()) return s;
  NamespaceInfo info{NamespaceId(spec), *block_bytes, spec};
  absl::MutexLock lock(&mu_);
  if (auto it = namespaces_.find(info.id); it != namespaces_.end()) return it->second;
  if (namespaces_.size() >= limits::kMaxNamespaces) {
    return absl::ResourceExhaustedError(
        absl::StrCat("this node holds its maximum of ", limits::kMaxNamespaces, " namespaces"));
  }
  namespaces_.emplace(info.id, info);
  return info;
}

absl::StatusOr<NamespaceInfo> NamespaceRegistry::Get(uint64_t id) const {
  absl::MutexLock lock(&mu_);
  auto it = namespaces_.find(id);
  if (it == namespaces_.end()) {
    return absl::NotFoundError(absl::StrCat("unknown namespace ", absl::Hex(id, absl::kZeroPad16),
                                            ": call OpenNamespace first"));
  }
  return it->second;
}

size_t NamespaceRegistry::size() const {
  absl::MutexLock lock(&mu_);
  return namespaces_.size();
}

}  // namespace kvstrata::cachenode
