#include "kvstrata/cachenode/block_index.h"

#include <cstring>
#include <utility>

namespace kvstrata::cachenode {

BlockIndex::Shard& BlockIndex::ShardOf(const BlockId& id) const {
  // Keys are cryptographic hashes: their last bytes are already uniform
  // (flat_hash_map uses the whole hash, so shard and bucket bits differ).
  uint64_t bits;
  std::memcpy(&bits, id.key.bytes.data() + 8, sizeof(bits));
  return shards_[(bits ^ id.namespace_id) % kShards];
}

std::shared_ptr<StoredBlock> BlockIndex::Find(const BlockId& id) const {
  Shard& shard = ShardOf(id);
  absl::MutexLock lock(&shard.mu);
  auto it = shard.blocks.find(id);
  return it == shard.blocks.end() ? nullptr : it->second;
}

bool BlockIndex::Insert(const BlockId& id, std::shared_ptr<StoredBlock> block) {
  Shard& shard = ShardOf(id);
  absl::MutexLock lock(&shard.mu);
  return shard.blocks.emplace(id, std::move(block)).second;
}

bool BlockIndex::Replace(const BlockId& id, const StoredBlock* expected,
                         std::shared_ptr<StoredBlock> block) {
  std::shared_ptr<StoredBlock> old;  // dropped (maybe freeing its memory) after the lock
  Shard& shard = ShardOf(id);
  absl::MutexLock lock(&shard.mu);
  auto it = shard.blocks.find(id);
  if (it == shard.blocks.end() || it->second.get() != expected) return false;
  old = std::exchange(it->second, std::move(block));
  return true;
}

bool BlockIndex::ReplaceIfSole(const BlockId& id, const StoredBlock* expected,
                              absl::FunctionRef<std::shared_ptr<StoredBlock>()> make) {
  std::shared_ptr<StoredBlock> old;  // dropped after the lock
  Shard& shard = ShardOf(id);
  absl::MutexLock lock(&shard.mu);
  auto it = shard.blocks.find(id);
  // Pins come only from this index (Find, under this lock) or from copies of
  // a pin someone holds: two references are the index's and the caller's.
  if (it == shard.blocks.end() || it->second.get() != expected || it->second.use_count() != 2) {
    return false;
  }
  std::shared_ptr<StoredBlock> block = make();
  if (block == nullptr) return false;
  old = std::exchange(it->second, std::move(block));
  return true;
}

std::shared_ptr<StoredBlock> BlockIndex::Erase(const BlockId& id) {
  Shard& shard = ShardOf(id);
  absl::MutexLock lock(&shard.mu);
  auto it = shard.blocks.find(id);
  if (it == shard.blocks.end()) return nullptr;
  std::shared_ptr<StoredBlock> block = std::move(it->second);
  shard.blocks.erase(it);
  return block;
}

size_t BlockIndex::size() const {
  size_t total = 0;
  for (Shard& shard : shards_) {
    absl::MutexLock lock(&shard.mu);
    total += shard.blocks.size();
  }
  return total;
}

void BlockIndex::List(uint64_t namespace_id, BlockPage& page) const {
  for (Shard& shard : shards_) {
    absl::MutexLock lock(&shard.mu);
    for (const auto& [id, block] : shard.blocks) {
      if (id.namespace_id != namespace_id || !page.Wants(id.key)) continue;
      page.Offer({.key = id.key,
                  .parent = block->has_parent ? std::optional(block->parent) : std::nullopt,
                  .size = block->size(),
                  .tier = v1::TIER_DRAM});
    }
  }
}

}  // namespace kvstrata::cachenode
