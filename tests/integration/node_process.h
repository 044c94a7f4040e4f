// Starts a real kvstrata-node process on a free loopback port for a test and
// stops it afterwards.
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvstrata::testing {

class NodeProcess {
 public:
  // Starts `kvstrata-node --listen=127.0.0.1:0 <extra_flags>` and waits until
  // it has written its port.
  static absl::StatusOr<NodeProcess> Start(const std::vector<std::string>& extra_flags = {});
  NodeProcess(NodeProcess&& other) noexcept;
  NodeProcess& operator=(NodeProcess&& other) noexcept;
  ~NodeProcess();

  int port() const { return port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  bool running() const;
  void Kill(int signal);    // and reap
  void Signal(int signal);  // only deliver (e.g. SIGSTOP)

 private:
  NodeProcess() = default;
  pid_t pid_ = -1;
  int port_ = 0;
  std::string dir_;
};

// Runs this test binary again as a child with `args`; returns its pid.
absl::StatusOr<pid_t> SpawnSelf(const std::vector<std::string>& args);
// Waits for a child and returns its exit code (-signal when killed).
int WaitChild(pid_t pid);

}  // namespace kvstrata::testing
