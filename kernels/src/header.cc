// Names, validation and the 64-byte header of an encoded block.
#include <cstring>
#include <string>

#include "layout.h"
#include "kvstrata/kernels/quant.h"

namespace kvstrata::kernels {
namespace {

Status Error(Code c, std::string m) { return Status{c, std::move(m)}; }

void Put16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }  // little-endian hosts only
void Put32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }
void Put64(uint8_t* p, uint64_t v) { std::memcpy(p, &v, 8); }
uint16_t Get16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
uint32_t Get32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }
uint64_t Get64(const uint8_t* p) { uint64_t v; std::memcpy(&v, p, 8); return v; }

// FNV-1a over the first 60 bytes: catches a damaged header before its sizes
// are trusted (the node checksums whole blocks; this guards readers that
// get bytes from elsewhere).
uint32_t HeaderChecksum(const uint8_t* p) {
  uint32_t h = 2166136261u;
  for (int i = 0; i < 60; ++i) h = (h ^ p[i]) * 16777619u;
  return h;
}

bool IsPow2(uint32_t v) { return v && !(v & (v - 1)); }

}  // namespace

static_assert(sizeof(uint16_t) == 2 && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "the encoded layout is little-endian");

const char* FormatName(Format f) {
  switch (f) {
    case Format::kFp8E4m3: return "fp8_e4m3";
    case Format::kInt8: return "int8";
    case Format::kInt4Kivi: return "int4_kivi";
    case Format::kInt2Kivi: return "int2_kivi";
  }
  return "unknown";
}

bool ParseFormat(std::string_view name, Format* out) {
  for (Format f : {Format::kFp8E4m3, Format::kInt8, Format::kInt4Kivi, Format::kInt2Kivi}) {
    if (name == FormatName(f)) {
      *out = f;
      return true;
    }
  }
  return false;
}

const char* DTypeName(DType d) { return d == DType::kBf16 ? "bf16" : d == DType::kFp16 ? "fp16" : "unknown"; }

bool ParseDType(std::string_view name, DType* out) {
  if (name == "fp16") *out = DType::kFp16;
  else if (name == "bf16") *out = DType::kBf16;
  else return false;
  return true;
}

Status Validate(const QuantParams& p) {
  uint8_t f = static_cast<uint8_t>(p.format);
  if (f < 1 || f > 4) return Error(Code::kInvalidArgument, "unknown format " + std::to_string(f));
  if (p.dtype != DType::kFp16 && p.dtype != DType::kBf16)
    return Error(Code::kInvalidArgument, "unknown dtype " + std::to_string(int(p.dtype)));
  const BlockShape& s = p.shape;
  if (!s.layers || !s.tokens || !s.kv_heads || !s.head_dim)
    return Error(Code::kInvalidArgument, "every dimension of the block must be at least 1");
  if (s.head_dim % 8 != 0 || s.head_dim > 256)
    return Error(Code::kInvalidArgument, "head_dim must be a multiple of 8 and at most 256, got " +
                                             std::to_string(s.head_dim));
  // The CUDA kernels put layer * 2 + K/V on grid z (at most 65535).
  if (s.layers > 32767) return Error(Code::kInvalidArgument, "more than 32767 layers");
  // The CUDA kernels index rows (layer, K/V, token, head) with 32 bits.
  if (uint64_t(s.layers) * 2 * s.tokens * s.kv_heads >= (uint64_t(1) << 31))
    return Error(Code::kInvalidArgument, "block too large: layers*2*tokens*kv_heads >= 2^31");
  if (IsKivi(p.format) && (!IsPow2(p.group_size) || p.group_size < 8 || p.group_size > 256))
    return Error(Code::kInvalidArgument, "group_size must be a power of two in [8, 256], got " +
                                             std::to_string(p.group_size));
  // The CUDA key kernel puts token groups on grid y (at most 65535).
  if (IsKivi(p.format) && (s.tokens + p.group_size - 1) / p.group_size > 65535)
    return Error(Code::kInvalidArgument, "too many token groups (tokens / group_size > 65535)");
  return Status{};
}

uint64_t ElementCount(const BlockShape& s) {
  return uint64_t(s.layers) * 2 * s.tokens * s.kv_heads * s.head_dim;
}
uint64_t RawBytes(const BlockShape& s) { return ElementCount(s) * 2; }

Header MakeHeader(const QuantParams& p) {
  Header h;
  h.params = p;
  if (!IsKivi(p.format)) h.params.group_size = 0;
  Layout y = MakeLayout(h.params);
  h.meta_bytes = PadTo16(y.meta_bytes);
  h.code_bytes = y.code_bytes;
  return h;
}

uint64_t EncodedBytes(const QuantParams& p) {
  if (!Validate(p).ok()) return 0;
  return MakeHeader(p).total_bytes();
}

// Byte layout (kernels/README.md): magic u32 | version u16 | format u8 |
// dtype u8 | layers, tokens, kv_heads, head_dim, group_size, header_bytes u32 |
// meta_bytes u64 | code_bytes u64 | 12 zero bytes | FNV-1a of bytes 0..59 u32.
void EncodeHeader(const Header& h, void* out) {
  uint8_t* p = static_cast<uint8_t*>(out);
  std::memset(p, 0, kHeaderBytes);
  Put32(p + 0, kHeaderMagic);
  Put16(p + 4, h.version);
  p[6] = static_cast<uint8_t>(h.params.format);
  p[7] = static_cast<uint8_t>(h.params.dtype);
  Put32(p + 8, h.params.shape.layers);
  Put32(p + 12, h.params.shape.tokens);
  Put32(p + 16, h.params.shape.kv_heads);
  Put32(p + 20, h.params.shape.head_dim);
  Put32(p + 24, h.params.group_size);
  Put32(p + 28, kHeaderBytes);
  Put64(p + 32, h.meta_bytes);
  Put64(p + 40, h.code_bytes);
  Put32(p + 60, HeaderChecksum(p));
}

Status ParseHeader(const void* data, size_t size, Header* out) {
  if (size < kHeaderBytes)
    return Error(Code::kCorrupt, "encoded block of " + std::to_string(size) +
                                     " bytes is shorter than its 64-byte header");
  const uint8_t* p = static_cast<const uint8_t*>(data);
  if (Get32(p) != kHeaderMagic) return Error(Code::kCorrupt, "not an encoded KV block (bad magic)");
  if (Get32(p + 60) != HeaderChecksum(p)) return Error(Code::kCorrupt, "header checksum mismatch");
  Header h;
  h.version = Get16(p + 4);
  if (h.version != kHeaderVersion)
    return Error(Code::kUnsupported, "encoded block version " + std::to_string(h.version) +
                                         ", this library reads version " +
                                         std::to_string(kHeaderVersion));
  if (Get32(p + 28) != kHeaderBytes) return Error(Code::kCorrupt, "unexpected header size");
  h.params.format = static_cast<Format>(p[6]);
  h.params.dtype = static_cast<DType>(p[7]);
  h.params.shape = {Get32(p + 8), Get32(p + 12), Get32(p + 16), Get32(p + 20)};
  h.params.group_size = Get32(p + 24);
  if (Status st = Validate(h.params); !st.ok())
    return Error(Code::kCorrupt, "header names an invalid block: " + st.message);
  Header expect = MakeHeader(h.params);
  if (h.params.group_size != expect.params.group_size)
    return Error(Code::kCorrupt, "header group size does not fit its format");
  h.meta_bytes = Get64(p + 32);
  h.code_bytes = Get64(p + 40);
  if (h.meta_bytes != expect.meta_bytes || h.code_bytes != expect.code_bytes)
    return Error(Code::kCorrupt, "header section sizes do not match its shape");
  if (size < h.total_bytes())
    return Error(Code::kCorrupt, "encoded block truncated: " + std::to_string(size) + " of " +
                                     std::to_string(h.total_bytes()) + " bytes");
  *out = h;
  return Status{};
}

}  // namespace kvstrata::kernels
