// What a process holds, read from /proc: resident memory, open file
// descriptors and threads. For tests that check a server gives back what its
// clients made it take.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <dirent.h>
#include <fstream>
#include <string>

namespace kvstrata::soak {

struct ProcUsage {
  uint64_t rss_bytes = 0;
  uint64_t fds = 0;
  uint64_t threads = 0;
};

inline ProcUsage ReadProcUsage(pid_t pid) {
  ProcUsage usage;
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) usage.rss_bytes = std::stoull(line.substr(6)) * 1024;
    if (line.rfind("Threads:", 0) == 0) usage.threads = std::stoull(line.substr(8));
  }
  if (DIR* dir = opendir(("/proc/" + std::to_string(pid) + "/fd").c_str())) {
    while (dirent* entry = readdir(dir)) usage.fds += entry->d_name[0] != '.';
    closedir(dir);
  }
  return usage;
}

}  // namespace kvstrata::soak
