// Client internals shared by client.cc and c_api.cc.
#pragma once

#include <grpcpp/grpcpp.h>

#include "kvstrata.grpc.pb.h"
#include "kvstrata/client/client.h"
#include "kvstrata/transfer/engine.h"

namespace kvstrata::client {

class Client::Impl {
 public:
  ClientOptions options;
  std::unique_ptr<transfer::Engine> engine;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::CacheNode::Stub> stub;

  absl::Duration Timeout(std::optional<absl::Duration> timeout) const {
    return timeout.value_or(options.timeout);
  }
};

absl::Status FromGrpc(const grpc::Status& status);

}  // namespace kvstrata::client
