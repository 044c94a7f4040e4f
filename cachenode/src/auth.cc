#include "auth.h"

#include <grpcpp/grpcpp.h>
#include <openssl/evp.h>
#include <sys/stat.h>

#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "kvstrata/common/files.h"
#include "kvstrata/common/log.h"

namespace kvstrata::cachenode {
namespace {

constexpr absl::string_view kDigestPrefix = "sha256:";
constexpr absl::string_view kBearer = "Bearer ";

absl::Status LineError(size_t line, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("auth file line ", line, ": ", why));
}

}  // namespace

std::string TokenDigest(absl::string_view token) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_Digest(token.data(), token.size(), digest, &length, EVP_sha256(), nullptr);
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(digest), length));
}

absl::StatusOr<std::shared_ptr<const AuthTable>> AuthTable::Parse(absl::string_view text) {
  auto table = std::make_shared<AuthTable>();
  size_t number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++number;
    if (size_t hash = line.find('#'); hash != absl::string_view::npos) line = line.substr(0, hash);
    std::vector<absl::string_view> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t\r"), absl::SkipEmpty());
    if (fields.empty()) continue;
    if (fields[0] == "quota") {
      if (fields.size() < 3) return LineError(number, "want: quota <tenant|*> key=value ...");
      TenantQuota quota;
      for (size_t i = 2; i < fields.size(); ++i) {
        std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(fields[i], '=');
        uint64_t value = 0;
        if (!absl::SimpleAtoi(kv.second, &value)) {
          return LineError(number, absl::StrCat("'", fields[i], "' is not key=<number>"));
        }
        if (kv.first == "dram_bytes") {
          quota.dram_bytes = value;
        } else if (kv.first == "namespaces" && value <= UINT32_MAX) {
          quota.namespaces = static_cast<uint32_t>(value);
        } else {
          return LineError(number, absl::StrCat("unknown quota '", kv.first,
                                                "' (dram_bytes, namespaces)"));
        }
      }
      if (fields[1] != "*") table->named_tenants_.emplace(fields[1]);
      if (!table->quotas_.emplace(std::string(fields[1]), quota).second) {
        return LineError(number, "this tenant's quota is given twice");
      }
      continue;
    }
    if (fields.size() != 4) {
      return LineError(number, "want 4 fields: token|cert, credential, tenant|admin, tenants");
    }
    Principal principal;
    if (fields[2] == "admin") {
      principal.admin = true;
    } else if (fields[2] != "tenant") {
      return LineError(number, absl::StrCat("unknown role '", fields[2], "' (tenant or admin)"));
    }
    if (fields[3] == "*") {
      principal.all_tenants = true;
    } else {
      for (absl::string_view tenant : absl::StrSplit(fields[3], ',', absl::SkipEmpty())) {
        principal.tenants.emplace(tenant);
      }
      if (principal.tenants.empty()) return LineError(number, "no tenants");
      table->named_tenants_.insert(principal.tenants.begin(), principal.tenants.end());
    }
    if (fields[0] == "token") {
      if (!absl::StartsWith(fields[1], kDigestPrefix)) {
        return LineError(number, "a token is given as sha256:<hex digest>, never in the clear");
      }
      std::string digest = absl::AsciiStrToLower(fields[1].substr(kDigestPrefix.size()));
      if (digest.size() != 64 || digest.find_first_not_of("0123456789abcdef") != std::string::npos) {
        return LineError(number, "a SHA-256 digest is 64 hex digits");
      }
      principal.name = absl::StrCat("token sha256:", digest.substr(0, 8));
      if (!table->by_token_digest_.emplace(std::move(digest), std::move(principal)).second) {
        return LineError(number, "this token is listed twice");
      }
    } else if (fields[0] == "cert") {
      principal.name = absl::StrCat("cert ", fields[1]);
      if (!table->by_identity_.emplace(std::string(fields[1]), std::move(principal)).second) {
        return LineError(number, "this identity is listed twice");
      }
    } else {
      return LineError(number, absl::StrCat("unknown kind '", fields[0], "' (token or cert)"));
    }
  }
  return std::shared_ptr<const AuthTable>(std::move(table));
}

TenantQuota AuthTable::QuotaFor(absl::string_view tenant) const {
  if (auto it = quotas_.find(tenant); it != quotas_.end()) return it->second;
  if (auto it = quotas_.find("*"); it != quotas_.end()) return it->second;
  return {};
}

const Principal* AuthTable::FindToken(absl::string_view token) const {
  auto it = by_token_digest_.find(TokenDigest(token));
  return it == by_token_digest_.end() ? nullptr : &it->second;
}

const Principal* AuthTable::FindIdentity(absl::string_view identity) const {
  auto it = by_identity_.find(identity);
  return it == by_identity_.end() ? nullptr : &it->second;
}

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::Load(std::string path) {
  std::unique_ptr<Authenticator> auth(new Authenticator(std::move(path)));
  if (absl::Status s = auth->Reload(); !s.ok()) return s;
  return auth;
}

namespace {

// What changes when the file is rewritten or a Secret's symlink is swapped.
std::string FileVersion(const std::string& path) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) return "";
  return absl::StrCat(st.st_ino, ":", st.st_size, ":", st.st_mtim.tv_sec, ".", st.st_mtim.tv_nsec);
}

}  // namespace

void Authenticator::ReloadIfChanged() {
  const std::string version = FileVersion(path_);
  {
    absl::MutexLock lock(&mu_);
    if (version.empty() || version == loaded_version_) return;
  }
  if (absl::Status s = Reload(); !s.ok()) {
    KVS_LOG(Warning) << "auth file changed but was NOT reloaded: " << s;
    absl::MutexLock lock(&mu_);
    loaded_version_ = version;  // warn once per change, not every poll
  }
}

absl::Status Authenticator::Reload() {
  const std::string version = FileVersion(path_);
  absl::StatusOr<std::string> text = ReadFileToString(path_);
  if (!text.ok()) return text.status();
  absl::StatusOr<std::shared_ptr<const AuthTable>> table = AuthTable::Parse(*text);
  if (!table.ok()) return table.status();
  KVS_LOG(Info) << "auth: " << (*table)->size() << " callers from " << path_;
  absl::MutexLock lock(&mu_);
  table_ = *std::move(table);
  loaded_version_ = version;
  return absl::OkStatus();
}

std::shared_ptr<const AuthTable> Authenticator::table() const {
  absl::MutexLock lock(&mu_);
  return table_;
}

absl::StatusOr<std::shared_ptr<const Principal>> Authenticator::Authenticate(
    const grpc::ServerContext& context) const {
  std::shared_ptr<const AuthTable> table = this->table();
  // The aliasing constructor keeps the whole table alive with the principal.
  const auto& metadata = context.client_metadata();
  if (auto it = metadata.find("authorization"); it != metadata.end()) {
    absl::string_view value(it->second.data(), it->second.size());
    if (!absl::StartsWith(value, kBearer)) {
      return absl::UnauthenticatedError("authorization metadata is not 'Bearer <token>'");
    }
    const Principal* principal = table->FindToken(value.substr(kBearer.size()));
    if (principal == nullptr) return absl::UnauthenticatedError("unknown token");
    return std::shared_ptr<const Principal>(table, principal);
  }
  if (std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
      auth != nullptr && auth->IsPeerAuthenticated()) {
    // SANs first: they are what certificates are issued for today; the CN is
    // the fallback of older ones.
    for (const char* property : {"x509_subject_alternative_name", "x509_common_name"}) {
      for (const grpc::string_ref& identity : auth->FindPropertyValues(property)) {
        const Principal* principal =
            table->FindIdentity(absl::string_view(identity.data(), identity.size()));
        if (principal != nullptr) return std::shared_ptr<const Principal>(table, principal);
      }
    }
    return absl::UnauthenticatedError("the client certificate's identity is not in the auth file");
  }
  return absl::UnauthenticatedError(
      "this node requires a credential: a bearer token (authorization metadata) or a client "
      "certificate");
}

}  // namespace kvstrata::cachenode
