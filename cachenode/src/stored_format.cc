#include "kvstrata/cachenode/stored_format.h"

#include <string>
#include <vector>

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

absl::StatusOr<kernels::QuantParams> ParamsFor(const v1::NamespaceSpec& spec,
                                               v1::StoredFormat format) {
  kernels::QuantParams p;
  if (!ToKernelFormat(format, &p.format)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown stored format ", format));
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
        v1::StoredFormat_Name(format), " cannot store this layout: ", s.message));
  }
  return p;
}

absl::StatusOr<kernels::QuantParams> ParamsFor(const v1::NamespaceSpec& spec) {
  return ParamsFor(spec, spec.format());
}

// Bits per element, roughly: the ladder's order (fp8 and int8 share a rung).
int Rank(v1::StoredFormat f) {
  switch (f) {
    case v1::FORMAT_RAW: return 0;
    case v1::FORMAT_FP8_E4M3:
    case v1::FORMAT_INT8: return 1;
    case v1::FORMAT_INT4_KIVI: return 2;
    case v1::FORMAT_INT2_KIVI: return 3;
    default: return -1;
  }
}

}  // namespace

std::optional<v1::StoredFormat> NextCoarserFormat(const v1::NamespaceSpec& spec,
                                                  v1::StoredFormat current) {
  const v1::StoredFormat budget = spec.coarsest_format();
  if (budget == v1::FORMAT_RAW) return std::nullopt;
  v1::StoredFormat next;
  switch (current) {
    // ReplayPrecision's ladder steps through fp8; a budget of int8 stops there.
    case v1::FORMAT_RAW: next = budget == v1::FORMAT_INT8 ? v1::FORMAT_INT8 : v1::FORMAT_FP8_E4M3; break;
    case v1::FORMAT_FP8_E4M3:
    case v1::FORMAT_INT8: next = v1::FORMAT_INT4_KIVI; break;
    case v1::FORMAT_INT4_KIVI: next = v1::FORMAT_INT2_KIVI; break;
    default: return std::nullopt;
  }
  if (Rank(next) > Rank(budget)) return std::nullopt;
  return next;
}

uint64_t StoredBytes(const v1::NamespaceSpec& spec, v1::StoredFormat format,
                     uint64_t block_bytes) {
  if (format == v1::FORMAT_RAW) return block_bytes;
  absl::StatusOr<kernels::QuantParams> p = ParamsFor(spec, format);
  return p.ok() ? kernels::EncodedBytes(*p) : 0;
}

absl::Status Transcode(const v1::NamespaceSpec& spec, const uint8_t* from, uint64_t from_size,
                       v1::StoredFormat from_format, v1::StoredFormat to_format, uint8_t* to,
                       uint64_t to_size) {
  absl::StatusOr<kernels::QuantParams> p = ParamsFor(spec, to_format);
  if (!p.ok()) return p.status();
  std::vector<uint8_t> raw;
  if (from_format != v1::FORMAT_RAW) {
    // Through the namespace's dtype: the kernels encode from raw KV only.
    raw.resize(kernels::RawBytes(p->shape));
    if (kernels::Status s = kernels::Dequantize(from, from_size, raw.data(), raw.size()); !s.ok()) {
      return absl::DataLossError(absl::StrCat("cannot decode the stored block: ", s.message));
    }
    from = raw.data();
    from_size = raw.size();
  }
  if (kernels::Status s = kernels::Quantize(*p, from, from_size, to, to_size); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("cannot transcode to ",
                                                   v1::StoredFormat_Name(to_format), ": ", s.message));
  }
  return absl::OkStatus();
}

absl::Status ValidateStoredFormat(const v1::NamespaceSpec& spec) {
  if (spec.format() != v1::FORMAT_RAW) {
    if (absl::Status s = ParamsFor(spec).status(); !s.ok()) return s;
  }
  if (spec.coarsest_format() == v1::FORMAT_RAW) return absl::OkStatus();
  if (Rank(spec.coarsest_format()) <= Rank(spec.format())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "coarsest_format ", v1::StoredFormat_Name(spec.coarsest_format()),
        " must be coarser than the stored format ", v1::StoredFormat_Name(spec.format())));
  }
  // Every rung the ladder may take must fit the layout.
  for (std::optional<v1::StoredFormat> f = NextCoarserFormat(spec, spec.format()); f.has_value();
       f = NextCoarserFormat(spec, *f)) {
    if (absl::Status s = ParamsFor(spec, *f).status(); !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("coarsest_format needs a layout every format down to it takes: ", s.message()));
    }
  }
  return absl::OkStatus();
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
  (*encoded)->format = static_cast<uint8_t>(spec.format());
  return encoded;
}

}  // namespace kvstrata::cachenode
