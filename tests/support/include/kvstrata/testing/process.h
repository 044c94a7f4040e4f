// Child processes for tests and benchmarks: real kvstrata-node and Redis
// servers on free loopback ports, always stopped and reaped.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kvstrata::testing {

// A scratch directory, removed with everything in it on destruction.
class TempDir {
 public:
  // Under `parent` (the system's temporary directory when empty).
  static absl::StatusOr<std::unique_ptr<TempDir>> Create(const std::string& prefix,
                                                         const std::string& parent = "");
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  explicit TempDir(std::string path) : path_(std::move(path)) {}
  std::string path_;
};

// A process started with posix_spawn and this process's environment. The
// destructor stops it (SIGTERM, SIGKILL after 10 s) and reaps it, so no exit
// path leaves one behind.
class ChildProcess {
 public:
  // `log_path` empty: the child shares this process's stdout and stderr.
  static absl::StatusOr<std::unique_ptr<ChildProcess>> Spawn(const std::vector<std::string>& argv,
                                                             const std::string& log_path = "");
  // This very binary again, with `args` (tests re-run themselves as
  // workers; the worker reads its `--name=value` args with ChildArg).
  static absl::StatusOr<std::unique_ptr<ChildProcess>> SpawnSelf(
      const std::vector<std::string>& args);
  ~ChildProcess();
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  pid_t pid() const { return pid_; }
  // True once it has exited (it is then reaped).
  bool Exited();
  // Delivers a signal without waiting (SIGKILL, ...).
  void Signal(int signal);
  // Freezes it (SIGSTOP) and returns once the kernel reports it stopped:
  // signal delivery is asynchronous, and a request could slip in meanwhile.
  bool Freeze();
  // Waits for the exit: its exit code, or -N when signal N ended it.
  int Wait();
  // The tail of its log, for error messages.
  std::string LogTail() const;

 private:
  ChildProcess(pid_t pid, std::string log_path) : pid_(pid), log_path_(std::move(log_path)) {}
  pid_t pid_;
  bool exited_ = false;
  int exit_code_ = 0;
  std::string log_path_;
};

// The value of `--name=value` in a worker's argv (ChildProcess::SpawnSelf),
// or "" when absent.
inline std::string ChildArg(int argc, char** argv, const std::string& name) {
  const std::string prefix = "--" + name + "=";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind(prefix, 0) == 0) return arg.substr(prefix.size());
  }
  return "";
}

// A kvstrata-node on free loopback ports (`--listen=127.0.0.1:0`, metrics too), started
// and waited for until it has written its port file.
class NodeProcess {
 public:
  // `log_path` empty: the node logs to this process's stderr.
  static absl::StatusOr<std::unique_ptr<NodeProcess>> Start(
      const std::string& binary, const std::vector<std::string>& extra_flags = {},
      const std::string& log_path = "", absl::Duration start_timeout = absl::Seconds(30));

  int port() const { return port_; }
  int metrics_port() const { return metrics_port_; }  // its /metrics, on a free port
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  ChildProcess& process() { return *process_; }

 private:
  NodeProcess() = default;
  std::unique_ptr<TempDir> dir_;
  std::unique_ptr<ChildProcess> process_;  // destroyed before dir_
  int port_ = 0;
  int metrics_port_ = 0;
};

// A loopback TCP port nobody listens on right now.
absl::StatusOr<int> FreeLoopbackPort();

}  // namespace kvstrata::testing
