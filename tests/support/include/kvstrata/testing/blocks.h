// Deterministic test data: token streams and block bytes that a writer and a
// reader (in different processes) derive from the same seed, and namespaces.
#pragma once

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kvstrata.pb.h"

namespace kvstrata::testing {

// Bytes of block `index` of stream `seed`.
inline void FillBlock(uint64_t seed, uint64_t index, uint8_t* data, size_t size) {
  uint64_t state = (seed * 0x9E3779B97F4A7C15ULL) ^ (index + 1) * 0xD1B54A32D192ED03ULL;
  for (size_t i = 0; i + 8 <= size; i += 8) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    std::memcpy(data + i, &state, 8);
  }
}

// `blocks` blocks' worth of token ids of stream `seed`.
inline std::vector<uint32_t> Tokens(uint64_t seed, size_t blocks, uint32_t tokens_per_block) {
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::vector<uint32_t> tokens(blocks * tokens_per_block);
  for (auto& t : tokens) t = rng() % 100000;
  return tokens;
}

// An opaque namespace (no KV layout, just a block size) of tenant "test".
inline v1::NamespaceSpec OpaqueSpec(const std::string& model, uint64_t block_bytes,
                                    uint32_t tokens_per_block) {
  v1::NamespaceSpec spec;
  spec.set_tenant("test");
  spec.set_model(model);
  spec.set_tokens_per_block(tokens_per_block);
  spec.set_block_bytes(block_bytes);
  return spec;
}

}  // namespace kvstrata::testing
