// Block keys: the identity of a KV block (DESIGN.md §3).
//
//   key_i = trunc128(SHA-256(ns_id as u64 LE || key_{i-1} || token_ids_i as u32 LE))
//
// with key_{-1} = 16 zero bytes. Deterministic across processes, languages and
// machines: there is no per-process seed.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace kvstrata {

struct BlockKey {
  std::array<uint8_t, 16> bytes{};

  // As two words: the defaulted comparison and a byte-wise hash call memcmp
  // and hash 16 single bytes, and every index and eviction policy compares
  // and hashes keys on each call.
  friend bool operator==(const BlockKey& a, const BlockKey& b) {
    return a.word(0) == b.word(0) && a.word(1) == b.word(1);
  }
  template <typename H>
  friend H AbslHashValue(H h, const BlockKey& k) {
    return H::combine(std::move(h), k.word(0), k.word(1));
  }
  uint64_t word(int i) const {
    uint64_t w;
    std::memcpy(&w, bytes.data() + 8 * i, sizeof(w));
    return w;
  }

  std::string_view view() const {
    return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
  }
  std::string Hex() const;
  static absl::StatusOr<BlockKey> FromHex(std::string_view hex);

  // Accepts a 16-byte key as is, or a caller's own 32-byte hash, which is
  // folded to 16 bytes (XXH3-128) so the index stores one key size.
  static absl::StatusOr<BlockKey> FromWire(std::string_view wire);
};

// Keys of every *full* block of `tokens`, chained from `parent` (all zero for
// the start of a prompt). A trailing partial block gets no key: partial blocks
// are never published.
std::vector<BlockKey> ComputeBlockKeys(uint64_t namespace_id, absl::Span<const uint32_t> tokens,
                                       uint32_t tokens_per_block,
                                       const BlockKey& parent = BlockKey{});

// XXH3-64 with seed 0: the checksum of stored block bytes, end to end.
uint64_t BlockChecksum(const void* data, size_t size);

}  // namespace kvstrata
