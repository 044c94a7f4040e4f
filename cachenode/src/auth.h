// Who may call what. With --auth_file, every RPC but Health names its caller
// — a bearer token in the `authorization` gRPC metadata ("Bearer <token>"),
// or with mutual TLS the client certificate's identity (a SAN or the CN) —
// and the file maps callers to a role and the tenants whose namespaces they
// may use. The file holds SHA-256 digests of tokens, never tokens, so it can
// be a Kubernetes Secret readable by operators without leaking credentials.
//
// File format, one caller per line, '#' starts a comment:
//
//   token sha256:<64 hex digits>  tenant  acme,globex    # may use two tenants
//   token sha256:<64 hex digits>  admin   *              # Drain, Stats, every tenant
//   cert  spiffe://prod/ns/acme/engine  tenant  acme     # mTLS identity (SAN or CN)
//   quota acme    dram_bytes=8589934592 namespaces=512   # limits of one tenant
//   quota *       dram_bytes=2147483648                  # of every other tenant
//
// dram_bytes bounds a tenant's blocks in memory: DRAM and HBM together.
// A tenant over it evicts its own oldest blocks to take new ones
// (tenant_ledger.h); one over its namespace quota cannot open more.
//
// The digest of a token: `printf %s "$TOKEN" | sha256sum`.
#pragma once

#include <memory>
#include <string>
#include "absl/strings/string_view.h"

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace grpc {
class ServerContext;
}

namespace kvstrata::cachenode {

// Limits of one tenant; 0 means none.
struct TenantQuota {
  uint64_t dram_bytes = 0;
  uint32_t namespaces = 0;
};

struct Principal {
  std::string name;  // for logs: "token sha256:1a2b3c4d..." or "cert <identity>"
  bool admin = false;
  bool all_tenants = false;
  absl::flat_hash_set<std::string> tenants;

  bool MayUse(absl::string_view tenant) const {
    return all_tenants || tenants.contains(tenant);
  }
};

// The parsed file: immutable, so a reload swaps it whole.
class AuthTable {
 public:
  // INVALID_ARGUMENT naming the first bad line.
  static absl::StatusOr<std::shared_ptr<const AuthTable>> Parse(absl::string_view text);

  const Principal* FindToken(absl::string_view token) const;
  const Principal* FindIdentity(absl::string_view identity) const;
  size_t size() const { return by_token_digest_.size() + by_identity_.size(); }
  // The tenant's quota line, else the `*` line, else no limits.
  TenantQuota QuotaFor(absl::string_view tenant) const;
  // Tenants the file names (in credentials or quotas): metrics label these
  // alone, so a caller cannot grow the label set.
  bool Names(absl::string_view tenant) const { return named_tenants_.contains(tenant); }

 private:
  absl::flat_hash_map<std::string, TenantQuota> quotas_;  // "*" is the default
  absl::flat_hash_set<std::string> named_tenants_;
  absl::flat_hash_map<std::string, Principal> by_token_digest_;  // lowercase hex SHA-256
  absl::flat_hash_map<std::string, Principal> by_identity_;
};

class Authenticator {
 public:
  static absl::StatusOr<std::unique_ptr<Authenticator>> Load(std::string path);

  // Re-reads the file (SIGHUP). On an error the old table stays in force.
  absl::Status Reload();
  // Reloads when the file changed since the last load (a Kubernetes Secret
  // is updated in place, with no signal); the node polls this.
  void ReloadIfChanged();

  // The caller of `context`: UNAUTHENTICATED when it presents no credential
  // the table knows. The principal stays valid across reloads.
  absl::StatusOr<std::shared_ptr<const Principal>> Authenticate(
      const grpc::ServerContext& context) const;
  // The table in force now.
  std::shared_ptr<const AuthTable> table() const;

 private:
  explicit Authenticator(std::string path) : path_(std::move(path)) {}
  const std::string path_;
  mutable absl::Mutex mu_;
  std::shared_ptr<const AuthTable> table_ ABSL_GUARDED_BY(mu_);
  std::string loaded_version_ ABSL_GUARDED_BY(mu_);  // inode, size and mtime
};

// Lowercase hex SHA-256 of a token: what the file stores.
std::string TokenDigest(absl::string_view token);

}  // namespace kvstrata::cachenode
