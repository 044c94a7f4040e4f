// gtest fixtures over real kvstrata-node processes: a node shared by a whole
// suite (SharedNodeTest), or one a test starts, restarts and stops with a
// client of it (NodeClientTest). Header-only: the tests that use them link
// gtest, gRPC and the client; the support library does not.
#pragma once

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "kvstrata.grpc.pb.h"
#include "kvstrata/client/client.h"
#include "kvstrata/testing/process.h"

namespace kvstrata::testing {

// A client connected with `options`, or nullptr after a (non-fatal) test failure.
inline std::unique_ptr<client::Client> ConnectOrFail(const client::ClientOptions& options) {
  auto c = client::Client::Connect(options);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *std::move(c) : nullptr;
}

// The node's stats through `c`; a failed call is a test failure (and empty stats).
inline v1::StatsResponse StatsOf(client::Client& c) {
  v1::StatsResponse stats;
  EXPECT_TRUE(c.Stats(&stats).ok());
  return stats;
}

// A suite whose tests share one node: the suite's SetUpTestSuite calls
// StartSharedNode; the node stops after the suite's last test. `Suite` is
// the deriving fixture, so that every suite has a node of its own.
template <typename Suite>
class SharedNodeTest : public ::testing::Test {
 protected:
  static void StartSharedNode(const std::string& binary, const std::vector<std::string>& flags) {
    auto node = NodeProcess::Start(binary, flags);
    ASSERT_TRUE(node.ok()) << node.status();
    node_ = node->release();
  }
  static void TearDownTestSuite() {
    delete node_;
    node_ = nullptr;
  }
  void SetUp() override { ASSERT_NE(node_, nullptr); }

  static v1::StatsResponse Stats(client::Client& c) { return StatsOf(c); }

  static inline NodeProcess* node_ = nullptr;
};

// Tests that start their own node (and may restart it), with one client of
// it and, when asked, one namespace open. Everything is stopped
// in TearDown, before the deriving fixture's members (a node's directory,
// say) go.
class NodeClientTest : public ::testing::Test {
 protected:
  void TearDown() override { StopNode(); }

  // Stops the client and node there are, starts `binary` with `flags`, waits
  // until its Health says serving (up to 30 s), connects client_ with
  // `options` (node_address is set here) and, given a `spec`, opens it as ns_.
  void StartNodeAndClient(const std::string& binary, const std::vector<std::string>& flags,
                          client::ClientOptions options = {},
                          const std::optional<v1::NamespaceSpec>& spec = std::nullopt) {
    StopNode();
    auto node = NodeProcess::Start(binary, flags);
    ASSERT_TRUE(node.ok()) << node.status();
    node_ = *std::move(node);
    const absl::Time deadline = absl::Now() + absl::Seconds(30);
    auto stub = v1::CacheNode::NewStub(
        grpc::CreateChannel(node_->address(), grpc::InsecureChannelCredentials()));
    while (absl::Now() < deadline) {
      grpc::ClientContext context;
      v1::HealthResponse health;
      if (stub->Health(&context, v1::HealthRequest(), &health).ok() && health.serving()) break;
      absl::SleepFor(absl::Milliseconds(20));
    }
    options.node_address = node_->address();
    client_ = ConnectOrFail(options);
    ASSERT_NE(client_, nullptr);
    if (!spec.has_value()) return;
    auto ns = client_->OpenNamespace(*spec);
    ASSERT_TRUE(ns.ok()) << ns.status();
    ns_ = *ns;
  }

  void StopNode() {
    ns_.reset();
    client_.reset();
    node_.reset();
  }

  v1::StatsResponse Stats() { return StatsOf(*client_); }

  std::unique_ptr<NodeProcess> node_;
  std::unique_ptr<client::Client> client_;
  std::optional<client::Namespace> ns_;
};

}  // namespace kvstrata::testing
