// The node pool behind the policies' lists and maps (cachenode/src/node_pool.h):
// nodes come back for reuse, lists sharing a pool splice, and a hash map's
// arrays (not single nodes) stay out of it.
#include "node_pool.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <set>
#include <utility>

#include "absl/container/node_hash_map.h"

namespace kvstrata::cachenode {
namespace {

TEST(NodePoolTest, AListAtCapacityReusesTheNodesItFrees) {
  NodePool pool;
  PooledList<uint64_t> list{PoolAllocator<uint64_t>(&pool)};
  std::set<const void*> seen;
  for (uint64_t i = 0; i < 100; ++i) {
    list.push_front(i);
    seen.insert(&list.front());
  }
  // At capacity each insert follows an eviction: it gets the evicted node.
  for (uint64_t i = 100; i < 10000; ++i) {
    const void* freed = &list.back();
    list.pop_back();
    list.push_front(i);
    EXPECT_EQ(&list.front(), freed);
    seen.insert(&list.front());
  }
  EXPECT_EQ(seen.size(), 100u);  // never more nodes than the list held
  uint64_t expect = 9999;
  for (uint64_t v : list) EXPECT_EQ(v, expect--);
}

TEST(NodePoolTest, ListsSharingAPoolSplice) {
  NodePool pool;
  PooledList<int> a{PoolAllocator<int>(&pool)}, b{PoolAllocator<int>(&pool)};
  for (int i = 0; i < 10; ++i) a.push_back(i);
  auto five = std::next(a.begin(), 5);
  b.splice(b.begin(), a, five);
  EXPECT_EQ(a.size(), 9u);
  ASSERT_EQ(b.size(), 1u);
  EXPECT_EQ(*five, 5);  // the iterator follows its node
  const int* node = &*five;
  EXPECT_EQ(&b.front(), node);
  b.clear();
  a.push_back(42);  // the node b gave back
  EXPECT_EQ(&a.back(), node);
}

TEST(NodePoolTest, AHashMapOnThePoolKeepsItsEntries) {
  NodePool pool;
  using Alloc = PoolAllocator<std::pair<const uint64_t, uint64_t>>;
  absl::node_hash_map<uint64_t, uint64_t, absl::Hash<uint64_t>, std::equal_to<uint64_t>, Alloc>
      map{Alloc(&pool)};
  for (uint64_t round = 0; round < 3; ++round) {
    for (uint64_t i = 0; i < 5000; ++i) map[i] = i * 3 + round;
    for (uint64_t i = 0; i < 5000; i += 2) map.erase(i);
    for (uint64_t i = 0; i < 5000; ++i) {
      auto it = map.find(i);
      if (i % 2 == 0) {
        EXPECT_EQ(it, map.end());
      } else {
        ASSERT_NE(it, map.end());
        EXPECT_EQ(it->second, i * 3 + round);
      }
    }
  }
  map.clear();
}

}  // namespace
}  // namespace kvstrata::cachenode
