// A minimal HTTP/1.0 GET for tests that talk to real servers (Prometheus,
// the node's /metrics) on loopback.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace kvstrata::testing {

struct HttpResponse {
  int status = 0;
  std::string body;
};

absl::StatusOr<HttpResponse> HttpGet(const std::string& host, int port, const std::string& path);

// Percent-encodes a query-string value.
std::string UrlEncode(const std::string& value);

}  // namespace kvstrata::testing
