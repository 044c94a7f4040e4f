#include "kvstrata/testing/process.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

extern char** environ;

namespace kvstrata::testing {

absl::StatusOr<std::unique_ptr<TempDir>> TempDir::Create(const std::string& prefix,
                                                         const std::string& parent) {
  const std::filesystem::path base =
      parent.empty() ? std::filesystem::temp_directory_path() : std::filesystem::path(parent);
  std::string pattern = (base / (prefix + ".XXXXXX")).string();
  if (mkdtemp(pattern.data()) == nullptr) {
    return absl::InternalError(absl::StrCat("mkdtemp: ", strerror(errno)));
  }
  return std::unique_ptr<TempDir>(new TempDir(pattern));
}

TempDir::~TempDir() {
  std::error_code ignored;
  std::filesystem::remove_all(path_, ignored);
}

absl::StatusOr<std::unique_ptr<ChildProcess>> ChildProcess::Spawn(
    const std::vector<std::string>& argv, const std::string& log_path) {
  if (argv.empty() || access(argv[0].c_str(), X_OK) != 0) {
    return absl::NotFoundError(absl::StrCat(argv.empty() ? "" : argv[0], " is not an executable"));
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (!log_path.empty()) {
    posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log_path.c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  }
  std::vector<char*> args;
  for (const std::string& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
  args.push_back(nullptr);
  pid_t pid = 0;
  const int error = posix_spawn(&pid, argv[0].c_str(), &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (error != 0) {
    return absl::InternalError(absl::StrCat("posix_spawn ", argv[0], ": ", strerror(error)));
  }
  return std::unique_ptr<ChildProcess>(new ChildProcess(pid, log_path));
}

absl::StatusOr<std::unique_ptr<ChildProcess>> ChildProcess::SpawnSelf(
    const std::vector<std::string>& args) {
  std::vector<std::string> argv = {std::filesystem::read_symlink("/proc/self/exe").string()};
  argv.insert(argv.end(), args.begin(), args.end());
  return Spawn(argv);
}

ChildProcess::~ChildProcess() {
  if (Exited()) return;
  kill(pid_, SIGTERM);
  kill(pid_, SIGCONT);  // a stopped child must run to act on it
  const absl::Time give_up = absl::Now() + absl::Seconds(10);
  while (!Exited()) {
    if (absl::Now() > give_up) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
      return;
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
}

bool ChildProcess::Exited() {
  if (exited_) return true;
  int status = 0;
  if (waitpid(pid_, &status, WNOHANG) == pid_) {
    exited_ = true;
    exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
  }
  return exited_;
}

void ChildProcess::Signal(int signal) {
  if (!exited_) kill(pid_, signal);
}

bool ChildProcess::Freeze() {
  Signal(SIGSTOP);
  const absl::Time give_up = absl::Now() + absl::Seconds(5);
  while (absl::Now() < give_up) {
    std::ifstream stat("/proc/" + std::to_string(pid_) + "/stat");
    std::string pid, name, state;
    // "pid (comm) state ...": comm has no spaces for our binaries.
    if (stat >> pid >> name >> state && (state == "T" || state == "t")) return true;
    absl::SleepFor(absl::Milliseconds(1));
  }
  return false;
}

int ChildProcess::Wait() {
  if (exited_) return exit_code_;
  int status = 0;
  if (waitpid(pid_, &status, 0) != pid_) return -1000;
  exited_ = true;
  exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
  return exit_code_;
}

std::string ChildProcess::LogTail() const {
  if (log_path_.empty()) return "(log went to the parent's stderr)";
  std::ifstream in(log_path_);
  std::stringstream text;
  text << in.rdbuf();
  const std::string all = text.str();
  return all.size() > 4000 ? all.substr(all.size() - 4000) : all;
}

absl::StatusOr<std::unique_ptr<NodeProcess>> NodeProcess::Start(
    const std::string& binary, const std::vector<std::string>& extra_flags,
    const std::string& log_path, absl::Duration start_timeout) {
  std::unique_ptr<NodeProcess> node(new NodeProcess());
  absl::StatusOr<std::unique_ptr<TempDir>> dir = TempDir::Create("kvstrata-node");
  if (!dir.ok()) return dir.status();
  node->dir_ = *std::move(dir);
  const std::string port_file = node->dir_->File("port");
  std::vector<std::string> argv = {binary, "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
                                   "--port_file=" + port_file};
  argv.insert(argv.end(), extra_flags.begin(), extra_flags.end());
  absl::StatusOr<std::unique_ptr<ChildProcess>> process = ChildProcess::Spawn(argv, log_path);
  if (!process.ok()) return process.status();
  node->process_ = *std::move(process);
  const absl::Time deadline = absl::Now() + start_timeout;
  while (absl::Now() < deadline) {
    std::ifstream in(port_file);
    if (in >> node->port_ && node->port_ > 0) {
      in >> node->metrics_port_;
      return node;
    }
    if (node->process_->Exited()) {
      return absl::UnavailableError(absl::StrCat("kvstrata-node exited during start-up; its log:\n",
                                                 node->process_->LogTail()));
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return absl::DeadlineExceededError(absl::StrCat("kvstrata-node wrote no port file within ",
                                                  absl::FormatDuration(start_timeout),
                                                  "; its log:\n", node->process_->LogTail()));
}

absl::StatusOr<int> FreeLoopbackPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("socket: ", strerror(errno)));
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof(address);
  const bool ok = bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0 &&
                  getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0;
  const int saved_errno = errno;
  close(fd);
  if (!ok) return absl::InternalError(absl::StrCat("bind 127.0.0.1:0: ", strerror(saved_errno)));
  return static_cast<int>(ntohs(address.sin_port));
}

}  // namespace kvstrata::testing
