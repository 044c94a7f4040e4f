#include "peer_check.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>
#include <xxhash.h>

#include <cstring>
#include <string_view>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "kvstrata/common/log.h"
#include "kvstrata/transfer/engine.h"

extern char** environ;

namespace kvstrata::cachenode {
namespace {

constexpr char kAddressFlag[] = "--check_ucx_peer=";
constexpr char kSameHostFlag[] = "--check_same_host=";
constexpr char kTransportsFlag[] = "--ucx_transports=";
constexpr int kMaxConcurrentChecks = 4;
constexpr size_t kMaxRemembered = 65536;
constexpr int kHangsBeforeRefusal = 2;
// The child's exit codes.
constexpr int kPeerCheckGood = 0;
constexpr int kPeerCheckUnreachable = 3;
constexpr int kPeerCheckMalformed = 4;

std::string FlagValue(int argc, char** argv, const char* prefix) {
  const size_t length = std::strlen(prefix);
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], prefix, length) == 0) return argv[i] + length;
  }
  return "";
}

}  // namespace

bool IsPeerCheckInvocation(int argc, char** argv) {
  return !FlagValue(argc, argv, kAddressFlag).empty();
}

int RunPeerCheck(int argc, char** argv) {
  const std::string address = absl::HexStringToBytes(FlagValue(argc, argv, kAddressFlag));
  const bool same_host = FlagValue(argc, argv, kSameHostFlag) == "1";
  auto engine = transfer::Engine::Create({.transports = FlagValue(argc, argv, kTransportsFlag)});
  if (!engine.ok()) return 2;
  // Creating the endpoint, wiring it up and closing it is everything the node
  // would do with the address. A peer that does not answer is well-formed
  // but gone (or not there yet), which the node must not find out itself:
  // UCX 1.13 leaks the socket of an endpoint it fails to create.
  // A dead peer refuses at once; 2 s (of the parent's 5) is for a live one
  // on a loaded machine, which must not be taken for a dead one.
  absl::Status connected =
      (*engine)->Connect(address, same_host, absl::Now() + absl::Seconds(2)).status();
  engine->reset();
  if (connected.ok()) return kPeerCheckGood;
  return absl::IsUnavailable(connected) || absl::IsDeadlineExceeded(connected)
             ? kPeerCheckUnreachable
             : kPeerCheckMalformed;
}

PeerAddressChecker::PeerAddressChecker(std::string transports, absl::Duration timeout)
    : transports_(std::move(transports)), timeout_(timeout) {}

absl::Status PeerAddressChecker::Check(const std::string& worker_address, bool same_host,
                                       bool failed_before) {
  const uint64_t digest = XXH3_64bits(worker_address.data(), worker_address.size()) ^ same_host;
  {
    absl::MutexLock lock(&mu_);
    if (good_.contains(digest) && !failed_before) return absl::OkStatus();
    if (bad_.contains(digest)) return absl::InvalidArgumentError("malformed UCX worker address");
    while (running_ >= kMaxConcurrentChecks) slot_freed_.Wait(&mu_);
    ++running_;
  }

  // /proc/self/exe is this very executable even if its file was replaced or
  // deleted since start (an upgrade on disk must not break running nodes).
  std::vector<std::string> args = {"kvstrata-node", kAddressFlag + absl::BytesToHexString(worker_address),
                                   absl::StrCat(kSameHostFlag, same_host ? 1 : 0),
                                   kTransportsFlag + transports_};
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
  pid_t pid = 0;
  const int spawned = posix_spawn(&pid, "/proc/self/exe", &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);

  enum class Verdict { kGood, kUnreachable, kHung, kBad };
  Verdict verdict = Verdict::kBad;
  if (spawned == 0) {
    const absl::Time give_up = absl::Now() + timeout_;
    int status = 0;
    pid_t done = 0;
    while ((done = waitpid(pid, &status, WNOHANG)) == 0 && absl::Now() < give_up) {
      absl::SleepFor(absl::Milliseconds(2));
    }
    if (done == 0) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      verdict = Verdict::kHung;
    } else if (WIFEXITED(status) && WEXITSTATUS(status) == kPeerCheckGood) {
      verdict = Verdict::kGood;
    } else if (WIFEXITED(status) && WEXITSTATUS(status) == kPeerCheckUnreachable) {
      verdict = Verdict::kUnreachable;
    }
  }

  absl::MutexLock lock(&mu_);
  --running_;
  slot_freed_.Signal();
  if (spawned != 0) {
    return absl::UnavailableError(absl::StrCat("cannot check a UCX address: ", strerror(spawned)));
  }
  auto remember = [&](absl::flat_hash_set<uint64_t>& set) {
    if (set.size() >= kMaxRemembered) set.clear();
    set.insert(digest);
  };
  switch (verdict) {
    case Verdict::kGood:
      remember(good_);
      hung_.erase(digest);
      return absl::OkStatus();
    case Verdict::kUnreachable:
      // Well-formed, but nobody answers: remembered as nothing, so the next
      // call checks again.
      return absl::UnavailableError(
          "the client's UCX worker does not answer (has the client exited?)");
    case Verdict::kHung:
      // A check slowed by a loaded machine is not proof of a hostile
      // address; a second hang is.
      if (hung_.size() >= kMaxRemembered) hung_.clear();
      if (++hung_[digest] < kHangsBeforeRefusal) {
        return absl::UnavailableError("checking the UCX worker address timed out; try again");
      }
      break;
    case Verdict::kBad:
      break;
  }
  remember(bad_);
  KVS_LOG(Warning) << "refused a malformed UCX worker address (" << worker_address.size()
                   << " bytes)";
  return absl::InvalidArgumentError("malformed UCX worker address");
}

}  // namespace kvstrata::cachenode
