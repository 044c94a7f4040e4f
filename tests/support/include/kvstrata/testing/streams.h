// Chained block streams for tests: publish blocks [0, count) of stream
// `seed`, fetch them back and count those whose bytes are right.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "kvstrata/client/client.h"
#include "kvstrata/testing/blocks.h"

namespace kvstrata::testing {

// Publishes `count` chained blocks of stream `seed`; returns the outcomes.
inline absl::StatusOr<client::TransferResult> PublishStream(client::Client& c, client::Namespace& ns, uint64_t seed,
                                                     size_t count, size_t batch = 64) {
  const std::vector<BlockKey> keys = ns.Keys(Tokens(seed, count, ns.tokens_per_block()));
  auto buffer = c.Allocate(batch * ns.block_bytes());
  if (!buffer.ok()) return buffer.status();
  client::TransferResult all;
  for (size_t start = 0; start < count; start += batch) {
    std::vector<client::PublishItem> items;
    for (size_t i = start; i < std::min(count, start + batch); ++i) {
      const size_t offset = (i - start) * ns.block_bytes();
      FillBlock(seed, i, (*buffer)->data() + offset, ns.block_bytes());
      items.push_back(
          {keys[i], i ? std::optional(keys[i - 1]) : std::nullopt, buffer->get(), offset});
    }
    auto result = ns.Publish(items);
    if (!result.ok()) return result.status();
    all.outcomes.insert(all.outcomes.end(), result->outcomes.begin(), result->outcomes.end());
    all.bytes += result->bytes;
  }
  return all;
}

// Fetches blocks [0, count) of stream `seed` and counts those whose bytes match.
inline size_t FetchAndVerify(client::Client& c, client::Namespace& ns, uint64_t seed, size_t count, size_t batch = 64) {
  const std::vector<BlockKey> keys = ns.Keys(Tokens(seed, count, ns.tokens_per_block()));
  auto buffer = c.Allocate(batch * ns.block_bytes());
  EXPECT_TRUE(buffer.ok());
  std::vector<uint8_t> expected(ns.block_bytes());
  size_t good = 0;
  for (size_t start = 0; start < count; start += batch) {
    std::vector<client::FetchItem> items;
    for (size_t i = start; i < std::min(count, start + batch); ++i) {
      items.push_back({keys[i], buffer->get(), (i - start) * ns.block_bytes()});
    }
    std::memset((*buffer)->data(), 0, batch * ns.block_bytes());
    auto result = ns.Fetch(items);
    EXPECT_TRUE(result.ok()) << result.status();
    if (!result.ok()) return good;
    for (size_t i = start; i < std::min(count, start + batch); ++i) {
      if (result->outcomes[i - start] != client::BlockOutcome::kOk) continue;
      FillBlock(seed, i, expected.data(), expected.size());
      good += std::memcmp(expected.data(), (*buffer)->data() + (i - start) * ns.block_bytes(),
                          expected.size()) == 0;
    }
  }
  return good;
}

}  // namespace kvstrata::testing
