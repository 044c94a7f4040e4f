// Stored formats: the 64-byte header and sections of an encoded (quantized)
// block as a client decodes it after a fetch, and the node's ingest path that
// encodes a published block for its namespace's format.
//
// Input: a mode byte, then
//   mode even: an encoded block for ParseHeader and Dequantize (mode bit 1
//     rewrites the header checksum, so the fields behind it are explored);
//   mode odd: a KV layout (format, dtype, layers, tokens, heads, head_dim,
//     FuzzedDataProvider integers: read from the input's end) and the raw
//     block bytes to ingest with ApplyStoredFormat, whose output
//     must parse back to the same layout and decode to a block of the raw size.
// Decoding never reads past the encoded bytes nor writes past the output.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "kvstrata.pb.h"
#include "kvstrata/cachenode/dram_tier.h"
#include "kvstrata/cachenode/stored_format.h"
#include "kvstrata/common/block_key.h"
#include "kvstrata/kernels/quant.h"

namespace kernels = kvstrata::kernels;
namespace cachenode = kvstrata::cachenode;

namespace {

// Small blocks keep an input fast; the encodings' logic is the same at any size.
constexpr uint64_t kMaxRawBytes = 64 << 10;
constexpr uint64_t kSlabBytes = 256 << 10;
constexpr uint64_t kArenaBytes = 4 * kSlabBytes;

void Check(bool condition) {
  if (!condition) std::abort();
}

// The header's FNV-1a over bytes 0..59 (kernels/README.md).
void FixHeaderChecksum(std::vector<uint8_t>& block) {
  if (block.size() < kernels::kHeaderBytes) return;
  uint32_t h = 2166136261u;
  for (int i = 0; i < 60; ++i) h = (h ^ block[i]) * 16777619u;
  std::memcpy(block.data() + 60, &h, 4);
}

void DecodeEncoded(const std::vector<uint8_t>& block) {
  kernels::Header header;
  kernels::Status parsed = kernels::ParseHeader(block.data(), block.size(), &header);
  if (!parsed.ok()) {
    Check(parsed.code == kernels::Code::kCorrupt || parsed.code == kernels::Code::kUnsupported);
    return;
  }
  Check(header.total_bytes() <= block.size());
  Check(kernels::Validate(header.params).ok());
  const uint64_t raw = kernels::RawBytes(header.params.shape);
  if (raw > (64u << 20)) return;
  // Exactly sized: ASan reports any write past the decoded block.
  auto out = std::make_unique<uint8_t[]>(raw);
  Check(kernels::Dequantize(block.data(), block.size(), out.get(), raw).ok());
  if (raw > 0) {
    Check(kernels::Dequantize(block.data(), block.size(), out.get(), raw - 1).code ==
          kernels::Code::kBufferTooSmall);
  }
}

void Ingest(FuzzedDataProvider& input) {
  kvstrata::v1::NamespaceSpec spec;
  spec.set_format(static_cast<kvstrata::v1::StoredFormat>(input.ConsumeIntegralInRange(0, 5)));
  spec.set_dtype(static_cast<kvstrata::v1::DType>(input.ConsumeIntegralInRange(0, 6)));
  spec.set_num_layers(input.ConsumeIntegralInRange(0, 4));
  spec.set_tokens_per_block(input.ConsumeIntegralInRange(1, 80));
  spec.set_num_kv_heads(input.ConsumeIntegralInRange(1, 4));
  spec.set_head_dim(input.ConsumeIntegralInRange(1, 40) * 4);
  if (!cachenode::ValidateStoredFormat(spec).ok() || spec.num_layers() == 0) return;
  const uint64_t raw = uint64_t{spec.num_layers()} * 2 * spec.tokens_per_block() *
                       spec.num_kv_heads() * spec.head_dim() * 2;
  if (raw > kMaxRawBytes) return;

  static auto* arena = new std::vector<uint8_t>(kArenaBytes);
  auto policy = cachenode::MakeEvictionPolicy("lru");
  cachenode::DramTier dram(arena->data(), kArenaBytes, kSlabBytes, *std::move(policy));
  absl::StatusOr<std::shared_ptr<cachenode::StoredBlock>> received = dram.Reserve(raw);
  Check(received.ok());
  // Fuzz bytes first, then a repeating tail: the block is fully defined.
  const std::vector<uint8_t> bytes = input.ConsumeRemainingBytes<uint8_t>();
  for (uint64_t i = 0; i < raw; ++i) {
    (*received)->data()[i] = bytes.empty() ? 0 : bytes[i % bytes.size()];
  }
  absl::StatusOr<std::shared_ptr<cachenode::StoredBlock>> stored =
      cachenode::ApplyStoredFormat(dram, spec, *received);
  if (spec.format() == kvstrata::v1::FORMAT_RAW) {
    Check(stored.ok() && *stored == *received);
    return;
  }
  if (!stored.ok()) {
    // NaN and Inf are refused, never stored.
    Check(absl::IsInvalidArgument(stored.status()));
    return;
  }
  const cachenode::StoredBlock& block = **stored;
  Check(block.checksum == kvstrata::BlockChecksum(block.data(), block.size()));
  kernels::Header header;
  Check(kernels::ParseHeader(block.data(), block.size(), &header).ok());
  Check(header.total_bytes() == block.size());
  Check(header.params.shape.layers == spec.num_layers() &&
        header.params.shape.tokens == spec.tokens_per_block() &&
        header.params.shape.kv_heads == spec.num_kv_heads() &&
        header.params.shape.head_dim == spec.head_dim());
  Check(kernels::RawBytes(header.params.shape) == raw);
  std::vector<uint8_t> decoded(raw);
  Check(kernels::Dequantize(block.data(), block.size(), decoded.data(), raw).ok());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t mode = data[0];
  FuzzedDataProvider input(data + 1, size - 1);
  if (mode & 1) {
    Ingest(input);
    return 0;
  }
  std::vector<uint8_t> block = input.ConsumeRemainingBytes<uint8_t>();
  if (mode & 2) FixHeaderChecksum(block);
  DecodeEncoded(block);
  return 0;
}
