#include "node_process.h"

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"

extern char** environ;

namespace kvstrata::testing {
namespace {

absl::StatusOr<pid_t> Spawn(const std::string& binary, const std::vector<std::string>& args) {
  std::vector<std::string> argv_storage = {binary};
  argv_storage.insert(argv_storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_storage) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid;
  if (int rc = posix_spawn(&pid, binary.c_str(), nullptr, nullptr, argv.data(), environ); rc != 0) {
    return absl::InternalError(absl::StrCat("posix_spawn ", binary, ": ", strerror(rc)));
  }
  return pid;
}

}  // namespace

absl::StatusOr<NodeProcess> NodeProcess::Start(const std::vector<std::string>& extra_flags) {
  NodeProcess node;
  char pattern[] = "/tmp/kvstrata-node-XXXXXX";
  if (mkdtemp(pattern) == nullptr) return absl::InternalError("mkdtemp failed");
  node.dir_ = pattern;
  const std::string port_file = node.dir_ + "/port";
  std::vector<std::string> args = {"--listen=127.0.0.1:0", "--port_file=" + port_file};
  args.insert(args.end(), extra_flags.begin(), extra_flags.end());
  absl::StatusOr<pid_t> pid = Spawn(KVSTRATA_NODE_BINARY, args);
  if (!pid.ok()) return pid.status();
  node.pid_ = *pid;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    std::ifstream in(port_file);
    if (in >> node.port_ && node.port_ > 0) return node;
    if (!node.running()) return absl::InternalError("kvstrata-node exited during start-up");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return absl::DeadlineExceededError("kvstrata-node did not report its port within 30 s");
}

NodeProcess::NodeProcess(NodeProcess&& other) noexcept { *this = std::move(other); }

NodeProcess& NodeProcess::operator=(NodeProcess&& other) noexcept {
  std::swap(pid_, other.pid_);
  std::swap(port_, other.port_);
  std::swap(dir_, other.dir_);
  return *this;
}

NodeProcess::~NodeProcess() {
  if (pid_ > 0) Kill(SIGTERM);
  if (!dir_.empty()) {
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }
}

bool NodeProcess::running() const {
  if (pid_ <= 0) return false;
  int status;
  return waitpid(pid_, &status, WNOHANG) == 0;
}

void NodeProcess::Signal(int signal) {
  if (pid_ > 0) kill(pid_, signal);
}

void NodeProcess::Kill(int signal) {
  if (pid_ <= 0) return;
  kill(pid_, signal);
  kill(pid_, SIGCONT);  // a stopped node must run to act on it
  // A node stopping gracefully gets a few seconds, then SIGKILL.
  for (int i = 0; i < 500; ++i) {
    int status;
    if (waitpid(pid_, &status, WNOHANG) != 0) {
      pid_ = -1;
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  kill(pid_, SIGKILL);
  waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

absl::StatusOr<pid_t> SpawnSelf(const std::vector<std::string>& args) {
  return Spawn(std::filesystem::read_symlink("/proc/self/exe").string(), args);
}

int WaitChild(pid_t pid) {
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) return -1000;
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return -WTERMSIG(status);
  return -1000;
}

}  // namespace kvstrata::testing
