#include "kvstrata/testing/certificates.h"

#include <cstdlib>

#include "absl/strings/str_cat.h"

namespace kvstrata::testing {

absl::Status MakeTestCertificates(const std::string& dir, const std::string& client_uri) {
  const std::string script = absl::StrCat(
      "cd '", dir, "' && exec >openssl.log 2>&1 && ",
      "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=test-ca && ",
      "openssl req -newkey rsa:2048 -nodes -keyout node.key -out node.csr -subj /CN=node && ",
      "printf 'subjectAltName=IP:127.0.0.1' > node.ext && ",
      "openssl x509 -req -in node.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out node.pem -days 1 -extfile node.ext && ",
      "openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=client && ",
      "printf 'subjectAltName=URI:", client_uri, "' > client.ext && ",
      "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 1 -extfile client.ext");
  if (std::system(script.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("openssl failed; see ", dir, "/openssl.log"));
  }
  return absl::OkStatus();
}

}  // namespace kvstrata::testing
