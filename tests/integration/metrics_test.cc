// A real Prometheus server scrapes a real node with deploy/'s scrape config;
// the counters it stores must move exactly as the traffic we drive implies.
#include <fstream>
#include <regex>
#include <sstream>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "kvstrata.pb.h"
#include "kvstrata/client/client.h"
#include "kvstrata/testing/blocks.h"
#include "kvstrata/testing/http.h"
#include "kvstrata/testing/process.h"

namespace kvstrata {
namespace {

using testing::ChildProcess;
using testing::HttpGet;
using testing::NodeProcess;
using testing::TempDir;

constexpr uint64_t kBlock = 64 * 1024;
constexpr uint32_t kTokensPerBlock = 16;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

class PrometheusTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto node = NodeProcess::Start(KVSTRATA_NODE_BINARY, {"--dram_bytes=268435456"});
    ASSERT_TRUE(node.ok()) << node.status();
    node_ = *std::move(node);
    ASSERT_GT(node_->metrics_port(), 0);

    auto dir = TempDir::Create("kvstrata-prometheus");
    ASSERT_TRUE(dir.ok());
    dir_ = *std::move(dir);
    // deploy/'s configuration, pointed at this node and scraping every second.
    std::string config = ReadFile(KVSTRATA_SOURCE_DIR "/deploy/prometheus/prometheus.yml");
    ASSERT_NE(config.find("127.0.0.1:9464"), std::string::npos);
    config = absl::StrReplaceAll(config, {{"127.0.0.1:9464", absl::StrCat("127.0.0.1:", node_->metrics_port())},
                                          {"scrape_interval: 15s", "scrape_interval: 1s"},
                                          {"evaluation_interval: 15s", "evaluation_interval: 1s"}});
    std::ofstream(dir_->File("prometheus.yml")) << config;
    std::ofstream(dir_->File("alerts.yml")) << ReadFile(KVSTRATA_SOURCE_DIR "/deploy/prometheus/alerts.yml");

    auto port = testing::FreeLoopbackPort();
    ASSERT_TRUE(port.ok());
    prometheus_port_ = *port;
    auto prometheus = ChildProcess::Spawn(
        {"/usr/bin/prometheus", "--config.file=" + dir_->File("prometheus.yml"),
         "--storage.tsdb.path=" + dir_->File("data"),
         absl::StrCat("--web.listen-address=127.0.0.1:", prometheus_port_)},
        dir_->File("prometheus.log"));
    ASSERT_TRUE(prometheus.ok()) << prometheus.status();
    prometheus_ = *std::move(prometheus);
    const absl::Time give_up = absl::Now() + absl::Seconds(30);
    while (absl::Now() < give_up) {
      auto ready = HttpGet("127.0.0.1", prometheus_port_, "/-/ready");
      if (ready.ok() && ready->status == 200) return;
      ASSERT_FALSE(prometheus_->Exited()) << prometheus_->LogTail();
      absl::SleepFor(absl::Milliseconds(100));
    }
    FAIL() << "Prometheus did not become ready: " << prometheus_->LogTail();
  }

  // The value of an instant query that returns one sample, or -1.
  double Query(const std::string& promql) {
    auto response = HttpGet("127.0.0.1", prometheus_port_,
                            "/api/v1/query?query=" + testing::UrlEncode(promql));
    if (!response.ok() || response->status != 200) return -1;
    static const std::regex kValue(R"re("value":\[[0-9.]+,"([^"]+)"\])re");
    std::smatch match;
    if (!std::regex_search(response->body, match, kValue)) return -1;
    return std::stod(match[1]);
  }

  // Waits until `promql` evaluates to `expected` (Prometheus scrapes every second).
  double AwaitValue(const std::string& promql, double expected) {
    double value = -1;
    const absl::Time give_up = absl::Now() + absl::Seconds(30);
    while (absl::Now() < give_up) {
      value = Query(promql);
      if (value == expected) break;
      absl::SleepFor(absl::Milliseconds(250));
    }
    return value;
  }

  std::unique_ptr<NodeProcess> node_;
  std::unique_ptr<TempDir> dir_;
  std::unique_ptr<ChildProcess> prometheus_;
  int prometheus_port_ = 0;
};

TEST_F(PrometheusTest, CountersMoveAsTheTrafficImplies) {
  auto c = client::Client::Connect({.node_address = node_->address()});
  ASSERT_TRUE(c.ok());
  auto ns = (*c)->OpenNamespace(testing::OpaqueSpec("metrics", kBlock, kTokensPerBlock));
  ASSERT_TRUE(ns.ok()) << ns.status();
  std::vector<uint32_t> tokens(20 * kTokensPerBlock);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint32_t>(i);
  const auto keys = ns->Keys(tokens);
  auto buffer = (*c)->Allocate(20 * kBlock);
  std::vector<client::PublishItem> publish;
  std::vector<client::FetchItem> fetch;
  for (size_t i = 0; i < 20; ++i) {
    std::memset((*buffer)->data() + i * kBlock, static_cast<int>(i), kBlock);
    publish.push_back({keys[i], i ? std::optional(keys[i - 1]) : std::nullopt, buffer->get(), i * kBlock});
    fetch.push_back({keys[i], buffer->get(), i * kBlock});
  }
  ASSERT_EQ(ns->Publish(publish)->count(client::BlockOutcome::kOk), 20u);
  EXPECT_EQ(ns->Lookup(keys)->prefix_length, 20u);                    // 20 hits
  std::vector<BlockKey> unknown = ns->Keys(std::vector<uint32_t>(10 * kTokensPerBlock, 7));
  EXPECT_EQ(ns->Lookup(unknown)->prefix_length, 0u);                  // 10 misses
  EXPECT_EQ(ns->Fetch(fetch)->count(client::BlockOutcome::kOk), 20u);  // 20 hits
  std::vector<client::FetchItem> missing;
  for (size_t i = 0; i < 5; ++i) missing.push_back({unknown[i], buffer->get(), i * kBlock});
  EXPECT_EQ(ns->Fetch(missing)->count(client::BlockOutcome::kNotFound), 5u);  // 5 misses
  EXPECT_TRUE(*ns->RequestFinished(keys.back(), 100));     // a known hint
  EXPECT_FALSE(*ns->RequestFinished(unknown.back(), 100));  // an unknown one
  EXPECT_FALSE(*ns->RequestFinished(unknown.front(), 1));

  EXPECT_EQ(AwaitValue(R"(up{job="kvstrata"})", 1), 1);
  EXPECT_EQ(AwaitValue(R"(kvstrata_lookup_blocks_total{result="hit"})", 20), 20);
  EXPECT_EQ(AwaitValue(R"(kvstrata_lookup_blocks_total{result="miss"})", 10), 10);
  EXPECT_EQ(AwaitValue(R"(kvstrata_lookup_tokens_total{result="hit"})", 20 * kTokensPerBlock),
            20 * kTokensPerBlock);
  EXPECT_EQ(AwaitValue(R"(kvstrata_fetch_blocks_total{result="hit"})", 20), 20);
  EXPECT_EQ(AwaitValue(R"(kvstrata_fetch_blocks_total{result="miss"})", 5), 5);
  EXPECT_EQ(AwaitValue(R"(kvstrata_publish_blocks_total{result="stored"})", 20), 20);
  EXPECT_EQ(AwaitValue(R"(sum(kvstrata_transfer_bytes_total{direction="in"}))", 20.0 * kBlock),
            20.0 * kBlock);
  EXPECT_EQ(AwaitValue(R"(sum(kvstrata_transfer_bytes_total{direction="out"}))", 20.0 * kBlock),
            20.0 * kBlock);
  EXPECT_EQ(AwaitValue(R"(kvstrata_tier_stored_bytes{tier="dram"})", 20.0 * kBlock), 20.0 * kBlock);
  EXPECT_EQ(AwaitValue(R"(kvstrata_tier_blocks{tier="dram"})", 20), 20);
  // The one publish call went as fast-path requests (as many as the client
  // cut it into), each counted with path="fast_path".
  EXPECT_EQ(AwaitValue(
                R"(clamp_max(sum(kvstrata_rpc_requests_total{method="Publish",code="0",path="fast_path"}), 1))",
                1),
            1);
  EXPECT_EQ(AwaitValue(R"(sum(kvstrata_rpc_requests_total{method="OpenNamespace",path="grpc"}))", 1),
            1);
  EXPECT_EQ(AwaitValue(R"(kvstrata_checksum_failures_total)", 0), 0);
  EXPECT_EQ(AwaitValue(R"(kvstrata_request_hints_total{result="known"})", 1), 1);
  EXPECT_EQ(AwaitValue(R"(kvstrata_request_hints_total{result="unknown"})", 2), 2);
  // deploy/'s alert rules are loaded and evaluated.
  auto rules = HttpGet("127.0.0.1", prometheus_port_, "/api/v1/rules");
  ASSERT_TRUE(rules.ok());
  for (const char* alert : {"KvstrataNodeDown", "KvstrataHitRateCollapse", "KvstrataTierFull",
                            "KvstrataChecksumFailures"}) {
    EXPECT_NE(rules->body.find(alert), std::string::npos) << alert;
  }
}

}  // namespace
}  // namespace kvstrata
