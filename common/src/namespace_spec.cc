#include "kvstrata/common/namespace_spec.h"

#include <openssl/sha.h>

#include <string>

#include "absl/strings/str_cat.h"
#include "kvstrata/common/limits.h"

namespace kvstrata {

uint32_t DTypeBytes(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FP16:
    case v1::DTYPE_BF16:
      return 2;
    case v1::DTYPE_FP32:
      return 4;
    case v1::DTYPE_FP8_E4M3:
    case v1::DTYPE_INT8:
      return 1;
    default:
      return 0;
  }
}

absl::StatusOr<uint64_t> ValidateNamespaceSpec(const v1::NamespaceSpec& spec,
                                               uint64_t max_block_bytes) {
  if (spec.tenant().size() > limits::kMaxNameBytes || spec.model().size() > limits::kMaxNameBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("tenant and model are at most ", limits::kMaxNameBytes, " bytes"));
  }
  const uint32_t tp_size = spec.tp_size() == 0 ? 1 : spec.tp_size();
  if (spec.tp_rank() >= tp_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("tp_rank ", spec.tp_rank(), " is not below tp_size ", tp_size));
  }
  if (!v1::StoredFormat_IsValid(spec.format()) || !v1::StoredFormat_IsValid(spec.coarsest_format()) ||
      !v1::DType_IsValid(spec.dtype())) {
    return absl::InvalidArgumentError("unknown dtype or stored format");
  }
  uint64_t block_bytes = spec.block_bytes();
  if (spec.num_layers() != 0) {
    if (spec.num_layers() > limits::kMaxLayers || spec.num_kv_heads() == 0 ||
        spec.num_kv_heads() > limits::kMaxKvHeads || spec.head_dim() == 0 ||
        spec.head_dim() > limits::kMaxHeadDim || spec.tokens_per_block() == 0 ||
        spec.tokens_per_block() > limits::kMaxTokensPerBlock) {
      return absl::InvalidArgumentError(
          absl::StrCat("KV layout out of range: layers 1..", limits::kMaxLayers, ", kv_heads 1..",
                       limits::kMaxKvHeads, ", head_dim 1..", limits::kMaxHeadDim,
                       ", tokens_per_block 1..", limits::kMaxTokensPerBlock));
    }
    const uint32_t elem = DTypeBytes(spec.dtype());
    if (elem == 0) return absl::InvalidArgumentError("a KV layout needs a dtype");
    const uint64_t layout_bytes = uint64_t{spec.num_layers()} * 2 * spec.tokens_per_block() *
                                  spec.num_kv_heads() * spec.head_dim() * elem;
    if (block_bytes != 0 && block_bytes != layout_bytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("block_bytes ", block_bytes, " disagrees with the layout's ", layout_bytes));
    }
    block_bytes = layout_bytes;
  } else if (spec.tokens_per_block() > limits::kMaxTokensPerBlock) {
    return absl::InvalidArgumentError("tokens_per_block out of range");
  }
  if (block_bytes == 0) {
    return absl::InvalidArgumentError("an opaque namespace (num_layers = 0) needs block_bytes");
  }
  if (block_bytes > max_block_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "block of ", block_bytes, " bytes exceeds this node's limit of ", max_block_bytes));
  }
  return block_bytes;
}

uint64_t NamespaceId(const v1::NamespaceSpec& spec) {
  const std::string canonical = absl::StrCat(
      "kvstrata.ns.v1|", spec.tenant().size(), ":", spec.tenant(), "|", spec.model().size(), ":",
      spec.model(), "|", static_cast<int>(spec.dtype()), "|", spec.num_layers(), "|",
      spec.num_kv_heads(), "|", spec.head_dim(), "|", spec.tokens_per_block(), "|", spec.tp_rank(),
      "|", spec.tp_size() == 0 ? 1 : spec.tp_size(), "|", static_cast<int>(spec.format()), "|",
      // With a layout the block size is derived, so it must not split the id.
      spec.num_layers() != 0 ? 0 : spec.block_bytes());
  // A precision budget changes what a fetch may return, so it splits the id;
  // appended only when set, so namespaces without one keep their ids.
  const std::string canonical_with_budget =
      spec.coarsest_format() == v1::FORMAT_RAW
          ? canonical
          : absl::StrCat(canonical, "|c", static_cast<int>(spec.coarsest_format()));
  uint8_t digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const uint8_t*>(canonical_with_budget.data()),
         canonical_with_budget.size(), digest);
  uint64_t id = 0;
  for (int i = 0; i < 8; ++i) id |= uint64_t{digest[i]} << (8 * i);
  return id;
}

}  // namespace kvstrata
