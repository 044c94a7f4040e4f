// What a node's --auth_file holds for a token: its SHA-256 digest, computed
// with sha256sum, the tool an operator would use.
#pragma once

#include <gtest/gtest.h>

#include <cstdio>
#include <string>

namespace kvstrata::testing {

// The lowercase hex SHA-256 of `text` (a test failure when sha256sum fails).
inline std::string Sha256Hex(const std::string& text) {
  FILE* pipe = popen(("printf %s '" + text + "' | sha256sum").c_str(), "r");
  char out[65] = {};
  if (pipe == nullptr || fread(out, 1, 64, pipe) != 64) ADD_FAILURE() << "sha256sum failed";
  if (pipe != nullptr) pclose(pipe);
  return std::string(out, 64);
}

}  // namespace kvstrata::testing
