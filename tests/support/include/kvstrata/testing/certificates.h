// Throwaway TLS certificates for tests, made with the openssl command line.
#pragma once

#include <string>

#include "absl/status/status.h"

namespace kvstrata::testing {

// Writes into `dir` (which must exist): ca.pem/ca.key, a node certificate
// node.pem/node.key for IP 127.0.0.1, and a client certificate
// client.pem/client.key with CN `client` and the URI SAN `client_uri`.
absl::Status MakeTestCertificates(const std::string& dir,
                                  const std::string& client_uri = "spiffe://test/client");

}  // namespace kvstrata::testing
