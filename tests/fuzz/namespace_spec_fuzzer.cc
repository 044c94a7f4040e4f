// Namespace specs as OpenNamespace receives them: protobuf bytes -> spec ->
// validation, stored-format check, id and the node's registry. What is
// accepted has a positive block size within the node's limit, a layout's
// size is the product of its dimensions, the id ignores only the fields that
// cannot change what is stored, and the registry opens it idempotently.
#include <cstdint>
#include <cstdlib>

#include "kvstrata.pb.h"
#include "kvstrata/cachenode/namespace_registry.h"
#include "kvstrata/cachenode/stored_format.h"
#include "kvstrata/common/namespace_spec.h"
#include "kvstrata/kernels/quant.h"

namespace {

constexpr uint64_t kMaxBlockBytes = 64ull << 20;  // the node's default slab

void Check(bool condition) {
  if (!condition) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);  // invalid UTF-8 in strings is logged per input
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kvstrata::v1::NamespaceSpec spec;
  if (!spec.ParseFromArray(data, static_cast<int>(size))) return 0;
  absl::StatusOr<uint64_t> block_bytes = kvstrata::ValidateNamespaceSpec(spec, kMaxBlockBytes);
  const uint64_t id = kvstrata::NamespaceId(spec);
  Check(id == kvstrata::NamespaceId(spec));
  if (!block_bytes.ok()) {
    Check(absl::IsInvalidArgument(block_bytes.status()));
    kvstrata::cachenode::NamespaceRegistry registry(kMaxBlockBytes);
    Check(!registry.Open(spec).ok() && registry.size() == 0);
    return 0;
  }
  Check(*block_bytes > 0 && *block_bytes <= kMaxBlockBytes);
  if (spec.num_layers() != 0) {
    const uint64_t layout = uint64_t{spec.num_layers()} * 2 * spec.tokens_per_block() *
                            spec.num_kv_heads() * spec.head_dim() *
                            kvstrata::DTypeBytes(spec.dtype());
    Check(*block_bytes == layout);
    // block_bytes 0 and the derived size name the same namespace.
    kvstrata::v1::NamespaceSpec other = spec;
    other.set_block_bytes(spec.block_bytes() == 0 ? layout : 0);
    Check(kvstrata::NamespaceId(other) == id);
    Check(*kvstrata::ValidateNamespaceSpec(other, kMaxBlockBytes) == *block_bytes);
  } else {
    Check(*block_bytes == spec.block_bytes());
  }
  // tp_size 0 means 1.
  if (spec.tp_size() <= 1) {
    kvstrata::v1::NamespaceSpec other = spec;
    other.set_tp_size(spec.tp_size() == 0 ? 1 : 0);
    Check(kvstrata::NamespaceId(other) == id);
  }
  // Any other field changes the id (a different tenant or layout never
  // shares blocks).
  kvstrata::v1::NamespaceSpec renamed = spec;
  renamed.set_model(spec.model() + "x");
  Check(kvstrata::NamespaceId(renamed) != id);

  // A quantized format is accepted only for a layout the kernels can encode
  // (the node reserves EncodedBytes for every published block).
  const absl::Status format = kvstrata::cachenode::ValidateStoredFormat(spec);
  if (format.ok() && spec.format() != kvstrata::v1::FORMAT_RAW) {
    kvstrata::kernels::QuantParams p;
    p.format = static_cast<kvstrata::kernels::Format>(spec.format());
    p.dtype = spec.dtype() == kvstrata::v1::DTYPE_BF16 ? kvstrata::kernels::DType::kBf16
                                                       : kvstrata::kernels::DType::kFp16;
    p.shape = {spec.num_layers(), spec.tokens_per_block(), spec.num_kv_heads(), spec.head_dim()};
    Check(kvstrata::kernels::EncodedBytes(p) > 0);
  }
  kvstrata::cachenode::NamespaceRegistry registry(kMaxBlockBytes);
  absl::StatusOr<kvstrata::cachenode::NamespaceInfo> opened = registry.Open(spec);
  Check(opened.ok() == format.ok());
  if (opened.ok()) {
    Check(opened->id == id && opened->block_bytes == *block_bytes);
    absl::StatusOr<kvstrata::cachenode::NamespaceInfo> again = registry.Open(spec);
    Check(again.ok() && again->id == id && registry.size() == 1);
    Check(registry.Get(id).ok());
  }
  return 0;
}
