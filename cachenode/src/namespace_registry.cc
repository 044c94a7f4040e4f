#include "kvstrata/cachenode/namespace_registry.h"

#include "absl/strings/str_cat.h"
#include "kvstrata/common/limits.h"
#include "kvstrata/cachenode/stored_format.h"
#include "kvstrata/common/namespace_spec.h"

namespace kvstrata::cachenode {

absl::StatusOr<NamespaceInfo> NamespaceRegistry::Open(const v1::NamespaceSpec& spec,
                                                      uint32_t max_tenant_namespaces) {
  absl::StatusOr<uint64_t> block_bytes = ValidateNamespaceSpec(spec, max_block_bytes_);
  if (!block_bytes.ok()) return block_bytes.status();
  if (absl::Status s = ValidateStoredFormat(spec); !s.ok()) return s;
  NamespaceInfo info{NamespaceId(spec), *block_bytes, spec};
  absl::MutexLock lock(&mu_);
  if (auto it = namespaces_.find(info.id); it != namespaces_.end()) {
    ++it->second.opens;
    return it->second.info;
  }
  if (namespaces_.size() >= limits::kMaxNamespaces) {
    return absl::ResourceExhaustedError(
        absl::StrCat("this node holds its maximum of ", limits::kMaxNamespaces, " namespaces"));
  }
  size_t& of_tenant = per_tenant_[spec.tenant()];
  if (max_tenant_namespaces > 0 && of_tenant >= max_tenant_namespaces) {
    return absl::ResourceExhaustedError(
        absl::StrCat("tenant '", spec.tenant(), "' holds its quota of ", max_tenant_namespaces,
                     " namespaces on this node; close one (CloseNamespace) first"));
  }
  ++of_tenant;
  namespaces_.emplace(info.id, Entry{info, 1});
  return info;
}

absl::StatusOr<NamespaceInfo> NamespaceRegistry::Get(uint64_t id) const {
  absl::MutexLock lock(&mu_);
  auto it = namespaces_.find(id);
  if (it == namespaces_.end()) {
    return absl::NotFoundError(absl::StrCat("unknown namespace ", absl::Hex(id, absl::kZeroPad16),
                                            ": call OpenNamespace first"));
  }
  return it->second.info;
}

absl::StatusOr<bool> NamespaceRegistry::Close(uint64_t id) {
  absl::MutexLock lock(&mu_);
  auto it = namespaces_.find(id);
  if (it == namespaces_.end()) {
    return absl::NotFoundError(absl::StrCat("namespace ", absl::Hex(id, absl::kZeroPad16), " is not open"));
  }
  if (--it->second.opens > 0) return false;
  const std::string tenant = it->second.info.spec.tenant();
  namespaces_.erase(it);
  if (auto count = per_tenant_.find(tenant); count != per_tenant_.end() && --count->second == 0) {
    per_tenant_.erase(count);
  }
  return true;
}

size_t NamespaceRegistry::TenantNamespaces(const std::string& tenant) const {
  absl::MutexLock lock(&mu_);
  auto it = per_tenant_.find(tenant);
  return it == per_tenant_.end() ? 0 : it->second;
}

size_t NamespaceRegistry::size() const {
  absl::MutexLock lock(&mu_);
  return namespaces_.size();
}

}  // namespace kvstrata::cachenode
