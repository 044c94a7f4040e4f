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
#include <set>
#include <sstream>
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

// Local TCP port of each socket inode of `pid`'s network namespace.
inline std::map<std::string, int> SocketPorts(pid_t pid) {
  std::map<std::string, int> ports;
  for (const char* table : {"tcp", "tcp6"}) {
    std::ifstream in("/proc/" + std::to_string(pid) + "/net/" + table);
    std::string line;
    std::getline(in, line);  // header
    while (std::getline(in, line)) {
      // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
      std::istringstream fields(line);
      std::string sl, local, remote, state, queues, timer, retransmits, uid, timeout, inode;
      fields >> sl >> local >> remote >> state >> queues >> timer >> retransmits >> uid >> timeout >>
          inode;
      const size_t colon = local.rfind(':');
      if (colon == std::string::npos) continue;
      ports[inode] = std::stoi(local.substr(colon + 1), nullptr, 16);
    }
  }
  return ports;
}

// Inodes of `pid`'s Unix domain sockets.
inline std::set<std::string> UnixSockets(pid_t pid) {
  std::set<std::string> inodes;
  std::ifstream in("/proc/" + std::to_string(pid) + "/net/unix");
  std::string line;
  std::getline(in, line);  // header
  while (std::getline(in, line)) {
    // Num RefCount Protocol Flags Type St Inode [Path]
    std::istringstream fields(line);
    std::string num, refs, protocol, flags, type, state, inode;
    fields >> num >> refs >> protocol >> flags >> type >> state >> inode;
    inodes.insert(inode);
  }
  return inodes;
}

// Open descriptors by kind ("anon_inode:[eventfd]", the file's directory, or
// for sockets whether they are connections to `grpc_port`), for messages
// about what a process holds.
inline std::string DescribeFds(pid_t pid, int grpc_port) {
  const std::string dir_path = "/proc/" + std::to_string(pid) + "/fd";
  const std::map<std::string, int> ports = SocketPorts(pid);
  const std::set<std::string> unix_sockets = UnixSockets(pid);
  std::map<std::string, int> kinds;
  if (DIR* dir = opendir(dir_path.c_str())) {
    while (dirent* entry = readdir(dir)) {
      if (entry->d_name[0] == '.') continue;
      char target[512];
      const ssize_t n = readlink((dir_path + "/" + entry->d_name).c_str(), target, sizeof(target) - 1);
      std::string kind = n > 0 ? std::string(target, n) : "?";
      if (kind.rfind("socket:[", 0) == 0) {
        const std::string inode = kind.substr(8, kind.size() - 9);
        auto port = ports.find(inode);
        // A TCP socket whose connection is gone (reset by a dead peer) but
        // whose fd is still open is in neither table.
        kind = unix_sockets.contains(inode) ? "Unix socket"
               : port == ports.end()        ? "socket without a connection (closed TCP)"
               : port->second == grpc_port ? "TCP socket on the gRPC port"
                                           : "TCP socket on another port (UCX, metrics)";
      }
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
