// Block keys from the wire (every Lookup/Publish/Fetch/Delete key and parent)
// and from hex (the CLI): only 16- or 32-byte keys and 32- or 64-digit hex
// strings are accepted, and what is accepted round-trips.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "kvstrata/common/block_key.h"

using kvstrata::BlockKey;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);

  absl::StatusOr<BlockKey> wire = BlockKey::FromWire(bytes);
  if (wire.ok() != (size == 16 || size == 32)) std::abort();
  if (wire.ok()) {
    // 16 bytes are the key itself; a 32-byte hash folds to a key that is
    // deterministic (the same on every node and client).
    if (size == 16 && wire->view() != bytes) std::abort();
    if (size == 32 && !(*BlockKey::FromWire(bytes) == *wire)) std::abort();
    absl::StatusOr<BlockKey> back = BlockKey::FromHex(wire->Hex());
    if (!back.ok() || !(*back == *wire)) std::abort();
  }

  absl::StatusOr<BlockKey> hex = BlockKey::FromHex(bytes);
  if (hex.ok()) {
    if (size != 32 && size != 64) std::abort();
    // A 32-digit key prints back as itself, in lower case.
    if (size == 32) {
      const std::string printed = hex->Hex();
      for (size_t i = 0; i < 32; ++i) {
        const char c = bytes[i] >= 'A' && bytes[i] <= 'F' ? bytes[i] - 'A' + 'a' : bytes[i];
        if (printed[i] != c) std::abort();
      }
    }
  }
  return 0;
}
