// Quantized KV blocks: fp8_e4m3, int8, int4_kivi and int2_kivi.
//
// A KV block is one array laid out as [layers][2 (K, V)][tokens][kv_heads][head_dim]
// of fp16 or bf16, densely packed, little-endian. Quantize() turns it into an
// *encoded block*: a 64-byte self-describing header, a metadata section
// (scales, zero points) and a packed code section; Dequantize() turns any
// encoded block back into the original layout and dtype. The byte layout and
// every format's error bound are in kernels/README.md.
//
// The CPU functions here and the CUDA kernels (quant_cuda.h) write the same
// bytes for the same input.
//
// Inputs must be finite: a NaN or an infinity makes Quantize() fail with
// kNonFinite (nothing is clamped silently). Shapes: every dimension >= 1,
// head_dim a multiple of 8 and at most 256; group_size (KIVI only) a power of
// two in [8, 256]. Tokens and head_dim need not be multiples of the group size
// (the last group is partial).
//
// Everything here is thread-compatible and allocates nothing but the Status
// message: callers own all buffers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace kvstrata::kernels {

enum class Format : uint8_t { kFp8E4m3 = 1, kInt8 = 2, kInt4Kivi = 3, kInt2Kivi = 4 };
enum class DType : uint8_t { kFp16 = 1, kBf16 = 2 };

struct BlockShape {
  uint32_t layers = 0;
  uint32_t tokens = 0;
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;
};

struct QuantParams {
  Format format = Format::kInt8;
  DType dtype = DType::kFp16;
  BlockShape shape;
  uint32_t group_size = 32;  // KIVI only; ignored (stored as 0) otherwise
};

enum class Code {
  kOk = 0,
  kInvalidArgument,  // bad shape, format, dtype or group size
  kNonFinite,        // the input holds a NaN or an infinity
  kBufferTooSmall,   // an input or output buffer is smaller than required
  kCorrupt,          // an encoded block's header is damaged or inconsistent
  kUnsupported,      // a header from a newer version of this library
  kCudaError,        // a CUDA runtime call failed
};

struct Status {
  Code code = Code::kOk;
  std::string message;
  bool ok() const { return code == Code::kOk; }
};

inline constexpr uint32_t kHeaderMagic = 0x4251564b;  // bytes "KVQB"
inline constexpr uint16_t kHeaderVersion = 1;
inline constexpr size_t kHeaderBytes = 64;

// What a header says; ParseHeader() fills it from an encoded block.
struct Header {
  uint16_t version = kHeaderVersion;
  QuantParams params;
  uint64_t meta_bytes = 0;  // metadata section, padded to 16 bytes
  uint64_t code_bytes = 0;  // packed code section
  uint64_t total_bytes() const { return kHeaderBytes + meta_bytes + code_bytes; }
};

const char* FormatName(Format f);  // "fp8_e4m3", "int8", "int4_kivi", "int2_kivi"
bool ParseFormat(std::string_view name, Format* out);
const char* DTypeName(DType d);  // "fp16", "bf16"
bool ParseDType(std::string_view name, DType* out);

Status Validate(const QuantParams& p);

// Elements in a block: layers * 2 * tokens * kv_heads * head_dim.
uint64_t ElementCount(const BlockShape& s);
// Bytes of the unquantized block (2 bytes per element).
uint64_t RawBytes(const BlockShape& s);
// Header and sections for `p`. REQUIRES: Validate(p).ok().
Header MakeHeader(const QuantParams& p);
// Size of the encoded block for `p`; 0 if `p` is invalid.
uint64_t EncodedBytes(const QuantParams& p);

// Writes the 64-byte header for `h` to `out`.
void EncodeHeader(const Header& h, void* out);
// Checks magic, version, checksum, fields and that `size` holds the whole
// encoded block; fills `*out`.
Status ParseHeader(const void* data, size_t size, Header* out);

// Encodes `in` (RawBytes(p.shape) bytes) into `out` (EncodedBytes(p) bytes).
// On error `out` holds nothing usable.
Status Quantize(const QuantParams& p, const void* in, size_t in_bytes, void* out,
                size_t out_capacity);

// Decodes an encoded block into `out` (RawBytes of its shape, in its dtype).
Status Dequantize(const void* encoded, size_t encoded_bytes, void* out, size_t out_capacity);

// True when this library was built with the CUDA kernels.
bool BuiltWithCuda();

}  // namespace kvstrata::kernels
