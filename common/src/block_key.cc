#include "kvstrata/common/block_key.h"

#include <openssl/evp.h>
#include <xxhash.h>

#include <bit>
#include <cstring>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace kvstrata {
namespace {}  // namespace

std::string BlockKey::Hex() const {
  return absl::BytesToHexString(absl::string_view(view().data(), view().size()));
}

absl::StatusOr<BlockKey> BlockKey::FromHex(std::string_view hex) {
  if (hex.size() != 32 && hex.size() != 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("a block key is 32 or 64 hex digits, got ", hex.size()));
  }
  for (char c : hex) {
    if (!absl::ascii_isxdigit(static_cast<unsigned char>(c))) {
      return absl::InvalidArgumentError("block key is not hexadecimal");
    }
  }
  return FromWire(absl::HexStringToBytes(absl::string_view(hex.data(), hex.size())));
}

absl::StatusOr<BlockKey> BlockKey::FromWire(std::string_view wire) {
  BlockKey key;
  if (wire.size() == 16) {
    std::memcpy(key.bytes.data(), wire.data(), 16);
    return key;
  }
  if (wire.size() == 32) {
    // Seeded so a folded 32-byte hash never equals a native 16-byte key by design.
    XXH128_hash_t h = XXH3_128bits_withSeed(wire.data(), wire.size(), 0x6b7673747261ULL);
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, h);
    std::memcpy(key.bytes.data(), c.digest, 16);
    return key;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("a block key is 16 or 32 bytes, got ", wire.size()));
}

std::vector<BlockKey> ComputeBlockKeys(uint64_t namespace_id, absl::Span<const uint32_t> tokens,
                                       uint32_t tokens_per_block, const BlockKey& parent) {
  std::vector<BlockKey> keys;
  if (tokens_per_block == 0) return keys;
  const size_t full_blocks = tokens.size() / tokens_per_block;
  keys.reserve(full_blocks);
  // One message buffer: ns id (8) | previous key (16) | tokens (4 each), all
  // little-endian. One digest context for the whole prompt: OpenSSL 3's
  // one-shot SHA256() looks the algorithm up on every call, which cost more
  // than hashing a 256-token block (bench/micro_bench).
  std::vector<uint8_t> message(8 + 16 + 4 * size_t{tokens_per_block});
  for (int i = 0; i < 8; ++i) message[i] = static_cast<uint8_t>(namespace_id >> (8 * i));
  EVP_MD_CTX* context = EVP_MD_CTX_new();
  const EVP_MD* sha256 = EVP_sha256();
  BlockKey previous = parent;
  for (size_t b = 0; b < full_blocks; ++b) {
    std::memcpy(message.data() + 8, previous.bytes.data(), 16);
    const uint32_t* block = tokens.data() + b * tokens_per_block;
    if constexpr (std::endian::native == std::endian::little) {
      std::memcpy(message.data() + 24, block, 4 * size_t{tokens_per_block});
    } else {
      for (size_t t = 0; t < tokens_per_block; ++t) {
        for (int i = 0; i < 4; ++i)
          message[24 + 4 * t + i] = static_cast<uint8_t>(block[t] >> (8 * i));
      }
    }
    uint8_t digest[EVP_MAX_MD_SIZE];
    unsigned int digest_size = 0;
    EVP_DigestInit_ex(context, sha256, nullptr);
    EVP_DigestUpdate(context, message.data(), message.size());
    EVP_DigestFinal_ex(context, digest, &digest_size);
    BlockKey key;
    std::memcpy(key.bytes.data(), digest, 16);
    keys.push_back(key);
    previous = key;
  }
  EVP_MD_CTX_free(context);
  return keys;
}

uint64_t BlockChecksum(const void* data, size_t size) { return XXH3_64bits(data, size); }

}  // namespace kvstrata
