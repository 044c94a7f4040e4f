// What a process holds, read from /proc: resident memory, open file
// descriptors and threads. For tests that check a server gives back what its
// clients made it take.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <dirent.h>
#include <unistd.h>

#include <fstream>
#include <map>
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

// Open descriptors by kind ("socket", "anon_inode:[eventfd]", "/dev/shm",
// or the file's directory), for messages about what a process holds.
inline std::string DescribeFds(pid_t pid) {
  const std::string dir_path = "/proc/" + std::to_string(pid) + "/fd";
  std::map<std::string, int> kinds;
  if (DIR* dir = opendir(dir_path.c_str())) {
    while (dirent* entry = readdir(dir)) {
      if (entry->d_name[0] == '.') continue;
      char target[512];
      const ssize_t n = readlink((dir_path + "/" + entry->d_name).c_str(), target, sizeof(target) - 1);
      std::string kind = n > 0 ? std::string(target, n) : "?";
      if (kind.rfind("socket:", 0) == 0) kind = "socket";
      else if (kind.rfind("pipe:", 0) == 0) kind = "pipe";
      else if (kind[0] == '/') kind = kind.substr(0, kind.rfind('/') + 1);
      ++kinds[kind];
    }
    closedir(dir);
  }
  std::string out;
  for (const auto& [kind, count] : kinds) out += kind + " x" + std::to_string(count) + ", ";
  return out;
}

}  // namespace kvstrata::soak
