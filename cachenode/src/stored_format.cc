#include "kvstrata/cachenode/stored_format.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "kvstrata/common/block_key.h"
#include "kvstrata/kernels/quant.h"

namespace kvstrata::cachenode {
namespace {

bool ToKernelFormat(v1::StoredFormat f, kernels::Format* out) {
  switch (f) {
    case v1::FORMAT_FP8_E4M3: *out = kernels::Format::kFp8E4m3; return true;
    case v1::FORMAT_INT8: *out = kernels::Format::kInt8; return true;
    case v1::FORMAT_INT4_KIVI: *out = kernels::Format::kInt4Kivi; return true;
    case v1::FORMAT_INT2_KIVI: *out = kernels::Format::kInt2Kivi; return true;
    default: return false;
  }
}

absl::StatusOr<kernels::QuantParams> ParamsFor(const v1::NamespaceSpec& spec) {
  kernels::QuantParams p;
  if (!ToKernelFormat(spec.format(), &p.format)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown stored format ", spec.format()));
  }
  if (spec.num_layers() == 0) {
    return absl::InvalidArgumentError(
        "a quantized stored format needs a KV layout (num_layers, num_kv_heads, head_dim)");
  }
  if (spec.dtype() == v1::DTYPE_FP16) {
    p.dtype = kernels::DType::kFp16;
  } else if (spec.dtype() == v1::DTYPE_BF16) {
    p.dtype = kernels::DType::kBf16;
  } else {
    return absl::InvalidArgumentError("a quantized stored format needs an fp16 or bf16 cache");
  }
  p.shape = {spec.num_layers(), spec.tokens_per_block(), spec.num_kv_heads(), spec.head_dim()};
  if (kernels::Status s = kernels::Validate(p); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        v1::StoredFormat_Name(spec.format()), " cannot store this layout: ", s.message));
  }
  return p;
}

}  // namespace

absl::Status ValidateStoredFormat(const v1::NamespaceSpec& spec) {
  if (spec.format() == v1::FORMAT_RAW) return absl::OkStatus();
  return ParamsFor(spec).status();
}

absl::StatusOr<std::shared_ptr<StoredBlock>> ApplyStoredFormat(
    DramTier& dram, const v1::NamespaceSpec& spec, std::shared_ptr<StoredBlock> received) {
  if (spec.format() == v1::FORMAT_RAW) return received;
  absl::StatusOr<kernels::QuantParams> p = ParamsFor(spec);
  if (!p.ok()) return p.status();
  absl::StatusOr<std::shared_ptr<StoredBlock>> encoded = dram.Reserve(kernels::EncodedBytes(*p));
  if (!encoded.ok()) return encoded.status();
  kernels::Status s = kernels::Quantize(*p, received->data(), received->size(), (*encoded)->data(),
                                        (*encoded)->size());
  if (!s.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot store the block as ", v1::StoredFormat_Name(spec.format()), ": ", s.message));
  }
  (*encoded)->checksum = BlockChecksum((*encoded)->data(), (*encoded)->size());
  return encoded;
}

}  // namespace kvstrata::cachenode
