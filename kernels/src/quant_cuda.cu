// CUDA kernels. Each thread owns 16-byte chunks (8 elements) of the input, so
// loads and stores are 16-byte and coalesced along head_dim and heads. Each
// format reads its input from DRAM once per quantize (fp8 reads it twice: one
// pass for the per-head amax over all tokens, one to encode) and the
// per-element arithmetic is quant_math.h's, shared with the CPU path.
#include <cuda_runtime.h>

#include <string>

#include "layout.h"
#include "ordered.h"
#include "quant_math.h"
#include "kvstrata/kernels/quant.h"
#include "kvstrata/kernels/quant_cuda.h"

namespace kvstrata::kernels {
namespace {

using namespace math;

constexpr int kThreads = 256;

struct HeaderWords {
  uint32_t w[16];
};

// Written by the last kernel of a quantize: the header and the metadata
// section's zero padding (the CPU writes the same).
struct Tail {
  HeaderWords header;
  uint32_t pad_offset;  // from the block start
  uint32_t pad_bytes;
};

__device__ void WriteTail(const Tail& tail, uint8_t* out) {
  if (blockIdx.x || blockIdx.y || blockIdx.z) return;
  unsigned i = threadIdx.x;
  if (i < 16) reinterpret_cast<uint32_t*>(out)[i] = tail.header.w[i];
  if (i >= 32 && i - 32 < tail.pad_bytes) out[kHeaderBytes + tail.pad_offset + (i - 32)] = 0;
}

struct Chunk {
  uint16_t v[8];
};

__device__ __forceinline__ Chunk Load(const uint16_t* p) {
  uint4 u = *reinterpret_cast<const uint4*>(p);
  Chunk c;
  c.v[0] = u.x & 0xffff; c.v[1] = u.x >> 16;
  c.v[2] = u.y & 0xffff; c.v[3] = u.y >> 16;
  c.v[4] = u.z & 0xffff; c.v[5] = u.z >> 16;
  c.v[6] = u.w & 0xffff; c.v[7] = u.w >> 16;
  return c;
}

__device__ __forceinline__ void Store(uint16_t* p, const Chunk& c) {
  uint4 u;
  u.x = c.v[0] | uint32_t(c.v[1]) << 16;
  u.y = c.v[2] | uint32_t(c.v[3]) << 16;
  u.z = c.v[4] | uint32_t(c.v[5]) << 16;
  u.w = c.v[6] | uint32_t(c.v[7]) << 16;
  *reinterpret_cast<uint4*>(p) = u;
}

__device__ __forceinline__ uint32_t ChunkAbsMax(const Chunk& c) {
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) m = max(m, AbsBits(c.v[i]));
  return m;
}

// Stores 8 codes (each < 2^bits) at element index e0 of the code section.
__device__ __forceinline__ void StoreCodes(uint8_t* codes, uint64_t e0, const uint32_t (&q)[8], uint32_t bits) {
  if (bits == 8) {
    uint2 u;
    u.x = (q[0] & 0xff) | (q[1] & 0xff) << 8 | (q[2] & 0xff) << 16 | (q[3] & 0xff) << 24;
    u.y = (q[4] & 0xff) | (q[5] & 0xff) << 8 | (q[6] & 0xff) << 16 | (q[7] & 0xff) << 24;
    *reinterpret_cast<uint2*>(codes + e0) = u;
  } else if (bits == 4) {
    uint32_t u = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) u |= q[i] << (4 * i);
    *reinterpret_cast<uint32_t*>(codes + e0 / 2) = u;
  } else {
    uint32_t u = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) u |= q[i] << (2 * i);
    *reinterpret_cast<uint16_t*>(codes + e0 / 4) = uint16_t(u);
  }
}

__device__ __forceinline__ void LoadCodes(const uint8_t* codes, uint64_t e0, uint32_t bits, uint32_t (&q)[8]) {
  if (bits == 8) {
    uint2 u = *reinterpret_cast<const uint2*>(codes + e0);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      q[i] = (u.x >> (8 * i)) & 0xff;
      q[i + 4] = (u.y >> (8 * i)) & 0xff;
    }
  } else if (bits == 4) {
    uint32_t u = *reinterpret_cast<const uint32_t*>(codes + e0 / 2);
#pragma unroll
    for (int i = 0; i < 8; ++i) q[i] = (u >> (4 * i)) & 0xf;
  } else {
    uint32_t u = *reinterpret_cast<const uint16_t*>(codes + e0 / 4);
#pragma unroll
    for (int i = 0; i < 8; ++i) q[i] = (u >> (2 * i)) & 0x3;
  }
}

// One KIVI group's metadata word (scale in the low half, zero point in the
// high half, i.e. scale first in memory) and what quantizing needs.
struct KiviGroup {
  uint32_t word;
  float zero, rcp;
};

template <bool B>
__device__ __forceinline__ KiviGroup MakeGroup(uint32_t min_key, uint32_t max_key, float qmax) {
  uint16_t zero16 = FromOrderKey(min_key);
  float mn = ToFloat<B>(zero16), mx = ToFloat<B>(FromOrderKey(max_key));
  uint16_t scale16 = FromFloat<B>(KiviScale<B>(mn, mx, qmax));
  return KiviGroup{scale16 | uint32_t(zero16) << 16, mn, KiviReciprocal(ToFloat<B>(scale16))};
}

// ---- fp8: per (layer, K/V, head) amax over all tokens -----------------------
// Grid: x over the H*D/8 chunk columns of a token row, y strides over tokens,
// z = layer*2 + K/V. A thread's column fixes its head.

template <bool B>
__global__ void Fp8AmaxKernel(const uint16_t* in, Layout y, uint32_t* amax, uint32_t* err) {
  uint32_t cols = y.H * y.D / 8;
  uint32_t c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const uint16_t* slab = in + uint64_t(blockIdx.z) * y.T * y.H * y.D + uint64_t(c) * 8;
  uint32_t m = 0;
#pragma unroll 4
  for (uint32_t t = blockIdx.y; t < y.T; t += gridDim.y) m = max(m, ChunkAbsMax(Load(slab + uint64_t(t) * y.H * y.D)));
  if (m >= InfBits<B>()) atomicOr(err, 1u);
  atomicMax(&amax[blockIdx.z * y.H + c / (y.D / 8)], m);
}

template <bool B>
__global__ void Fp8EncodeKernel(const uint16_t* in, Layout y, const uint32_t* amax, uint8_t* codes) {
  uint32_t cols = y.H * y.D / 8;
  uint32_t c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float rcp = Reciprocal(SymmetricScale(ToFloat<B>(uint16_t(amax[blockIdx.z * y.H + c / (y.D / 8)])), 448.0f));
  uint64_t base = uint64_t(blockIdx.z) * y.T * y.H * y.D + uint64_t(c) * 8;
#pragma unroll 4
  for (uint32_t t = blockIdx.y; t < y.T; t += gridDim.y) {
    uint64_t e0 = base + uint64_t(t) * y.H * y.D;
    Chunk x = Load(in + e0);
    uint32_t q[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) q[i] = FloatToE4m3(ToFloat<B>(x.v[i]) * rcp);
    StoreCodes(codes, e0, q, 8);
  }
}

// Turns the amax words into the stored fp32 scales, in place.
template <bool B>
__global__ void Fp8ScaleKernel(uint32_t* meta, uint32_t n, Tail tail, uint8_t* out) {
  WriteTail(tail, out);
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    meta[i] = AsUint(SymmetricScale(ToFloat<B>(uint16_t(meta[i])), 448.0f));
}

// ---- int8 and KIVI values: groups of channels within one row ---------------
// Slots: each row (layer, K/V, token, head) gets `groups` groups of W lanes
// (W a power of two <= 32); a lane owns 8 channels. Whole warps run every
// iteration so the xor shuffles inside a group see all of its lanes; lanes
// past the row's end hold the reduction's identity.

template <bool B, uint32_t kBits>
__global__ void RowGroupKernel(const uint16_t* in, Layout y, uint32_t group_ch, uint32_t lanes,
                               uint32_t groups, uint64_t rows, uint8_t* meta, uint8_t* codes,
                               uint32_t* err, Tail tail, uint8_t* out) {
  WriteTail(tail, out);
  const uint64_t per_row = uint64_t(groups) * lanes;
  const uint64_t total = rows * per_row;
  const uint64_t stride = uint64_t(gridDim.x) * blockDim.x;
  for (uint64_t base = uint64_t(blockIdx.x) * blockDim.x; base < total; base += stride) {
    uint64_t s = base + threadIdx.x;
    bool active = s < total;
    uint64_t row = active ? s / per_row : 0;  // row within the rows this kernel covers
    uint32_t k = uint32_t(s - row * per_row);
    uint32_t g = k / lanes, lane = k % lanes;
    uint32_t d0 = g * group_ch + lane * 8;
    bool valid = active && lane * 8 < group_ch && d0 < y.D;
    // int8 covers every row; KIVI only value rows: (l, t, h) -> (2l + 1, t, h).
    uint64_t grow = row;
    if (kBits != 8) {
      uint64_t th = uint64_t(y.T) * y.H;
      grow = (2 * (row / th) + 1) * th + row % th;
    }
    uint64_t e0 = grow * y.D + d0;
    Chunk x{};
    if (valid) x = Load(in + e0);
    uint32_t am = valid ? ChunkAbsMax(x) : 0;
    uint32_t lo = 0xffffu, hi = 0;
    if (kBits != 8 && valid) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        lo = min(lo, OrderKey(x.v[i]));
        hi = max(hi, OrderKey(x.v[i]));
      }
    }
    for (uint32_t off = lanes / 2; off > 0; off /= 2) {
      am = max(am, __shfl_xor_sync(0xffffffffu, am, off));
      if (kBits != 8) {
        lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, off));
        hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, off));
      }
    }
    if (!active) continue;
    if (lane == 0 && am >= InfBits<B>()) atomicOr(err, 1u);
    uint32_t q[8];
    if (kBits == 8) {
      float sc = SymmetricScale(ToFloat<B>(uint16_t(am)), 127.0f);
      if (lane == 0) reinterpret_cast<float*>(meta)[grow] = sc;
      float rcp = Reciprocal(sc);
#pragma unroll
      for (int i = 0; i < 8; ++i) q[i] = uint32_t(int32_t(Int8Code(ToFloat<B>(x.v[i]), rcp)));
    } else {
      const float qmax = float((1u << kBits) - 1);
      KiviGroup kg = MakeGroup<B>(lo, hi, qmax);
      if (lane == 0) reinterpret_cast<uint32_t*>(meta)[y.k_meta_entries + row * y.DG + g] = kg.word;
#pragma unroll
      for (int i = 0; i < 8; ++i) q[i] = KiviCode(ToFloat<B>(x.v[i]), kg.zero, kg.rcp, qmax);
    }
    if (valid) StoreCodes(codes, e0, q, kBits);
  }
}

// ---- KIVI keys: per channel, groups of G tokens ----------------------------
// Grid: x over the H*D/8 chunk columns, y = token group, z = layer. A thread
// reduces its 8 channels over the group's tokens, then encodes them (the
// second read of the group hits L2).

template <bool B, uint32_t kBits>
__global__ void KiviKeyKernel(const uint16_t* in, Layout y, uint32_t* meta, uint8_t* codes, uint32_t* err) {
  const uint32_t cols = y.H * y.D / 8;
  const uint32_t c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const uint32_t l = blockIdx.z, tg = blockIdx.y;
  const uint32_t t0 = tg * y.G, t1 = min(y.T, t0 + y.G);
  const uint64_t row_elems = uint64_t(y.H) * y.D;
  const uint64_t base = 2ull * l * y.T * row_elems + uint64_t(c) * 8;
  uint32_t lo[8], hi[8], am = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    lo[i] = 0xffffu;
    hi[i] = 0;
  }
#pragma unroll 8
  for (uint32_t t = t0; t < t1; ++t) {
    Chunk x = Load(in + base + t * row_elems);
    am = max(am, ChunkAbsMax(x));
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      lo[i] = min(lo[i], OrderKey(x.v[i]));
      hi[i] = max(hi[i], OrderKey(x.v[i]));
    }
  }
  if (am >= InfBits<B>()) atomicOr(err, 1u);
  const float qmax = float((1u << kBits) - 1);
  float zero[8], rcp[8];
  uint32_t words[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    KiviGroup kg = MakeGroup<B>(lo[i], hi[i], qmax);
    words[i] = kg.word;
    zero[i] = kg.zero;
    rcp[i] = kg.rcp;
  }
  uint4* m = reinterpret_cast<uint4*>(meta + (uint64_t(l) * y.TG + tg) * row_elems + uint64_t(c) * 8);
  m[0] = make_uint4(words[0], words[1], words[2], words[3]);
  m[1] = make_uint4(words[4], words[5], words[6], words[7]);
#pragma unroll 8
  for (uint32_t t = t0; t < t1; ++t) {
    uint64_t e0 = base + t * row_elems;
    Chunk x = Load(in + e0);
    uint32_t q[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) q[i] = KiviCode(ToFloat<B>(x.v[i]), zero[i], rcp[i], qmax);
    StoreCodes(codes, e0, q, kBits);
  }
}

// ---- dequantize: one thread per 8-element chunk ------------------------------

template <bool B, Format F>
__global__ void DequantKernel(const uint8_t* meta, const uint8_t* codes, Layout y, uint16_t* out) {
  const uint32_t dch = y.D / 8;
  const uint64_t chunks = y.elements / 8;
  constexpr uint32_t kBits = F == Format::kInt4Kivi ? 4 : F == Format::kInt2Kivi ? 2 : 8;
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < chunks;
       i += uint64_t(gridDim.x) * blockDim.x) {
    uint32_t row = uint32_t(i / dch);  // < 2^31 (Validate)
    uint32_t d0 = uint32_t(i - uint64_t(row) * dch) * 8;
    uint32_t h = row % y.H, rt = row / y.H;
    uint32_t t = rt % y.T, slab = rt / y.T;
    uint32_t q[8];
    LoadCodes(codes, i * 8, kBits, q);
    Chunk o;
    if constexpr (F == Format::kFp8E4m3) {
      float s = reinterpret_cast<const float*>(meta)[slab * y.H + h];
#pragma unroll
      for (int k = 0; k < 8; ++k) o.v[k] = FromFloatSat<B>(E4m3ToFloat(uint8_t(q[k])) * s);
    } else if constexpr (F == Format::kInt8) {
      float s = reinterpret_cast<const float*>(meta)[row];
#pragma unroll
      for (int k = 0; k < 8; ++k) o.v[k] = FromFloatSat<B>(float(int8_t(uint8_t(q[k]))) * s);
    } else {
      const uint32_t* words = reinterpret_cast<const uint32_t*>(meta);
      uint32_t l = slab >> 1;
      if ((slab & 1) == 0) {
        const uint4* m = reinterpret_cast<const uint4*>(words + ((uint64_t(l) * y.TG + t / y.G) * y.H + h) * y.D + d0);
        uint4 a = m[0], b = m[1];
        uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int k = 0; k < 8; ++k)
          o.v[k] = FromFloatSat<B>(KiviDecode(q[k], ToFloat<B>(uint16_t(w[k])), ToFloat<B>(uint16_t(w[k] >> 16))));
      } else {
        uint32_t w = words[y.k_meta_entries + ((uint64_t(l) * y.T + t) * y.H + h) * y.DG + d0 / y.G];
        float s = ToFloat<B>(uint16_t(w)), z = ToFloat<B>(uint16_t(w >> 16));
#pragma unroll
        for (int k = 0; k < 8; ++k) o.v[k] = FromFloatSat<B>(KiviDecode(q[k], s, z));
      }
    }
    Store(out + i * 8, o);
  }
}

Status CudaFailure(const char* what, cudaError_t e) {
  return Status{Code::kCudaError, std::string(what) + ": " + cudaGetErrorString(e)};
}

Status LastLaunch(const char* what) {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? Status{} : CudaFailure(what, e);
}

int SmCount() {
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms > 0 ? sms : 80;
}

uint32_t NextPow2(uint32_t v) {
  uint32_t p = 1;
  while (p < v) p *= 2;
  return p;
}

// Blocks for a grid-stride loop over `work` threads' worth of chunks.
unsigned GridFor(uint64_t work, int sms) {
  uint64_t want = (work + kThreads - 1) / kThreads;
  uint64_t cap = uint64_t(sms) * 16;
  return unsigned(want < cap ? (want ? want : 1) : cap);
}

// Threads per block for kernels over the H*D/8 chunk columns of a token row:
// no more than the columns (rounded up to a warp), so small rows (8 heads of
// 128 are 128 columns) do not leave half of each block idle.
unsigned ColumnThreads(const Layout& y) {
  uint32_t cols = y.H * y.D / 8;
  return cols >= uint32_t(kThreads) ? kThreads : (cols + 31) / 32 * 32;
}

// Token-strided grid (fp8): enough blocks along tokens to fill the GPU.
dim3 ColumnGrid(const Layout& y, int sms, uint32_t slabs) {
  uint32_t bx = (y.H * y.D / 8 + ColumnThreads(y) - 1) / ColumnThreads(y);
  uint64_t blocks_wanted = uint64_t(sms) * 8;
  uint64_t per_token = uint64_t(bx) * slabs;
  uint32_t by = uint32_t(std::min<uint64_t>(y.T, std::max<uint64_t>(1, blocks_wanted / per_token)));
  return dim3(bx, by, slabs);
}

template <bool B>
Status QuantizeTyped(const QuantParams& p, const Layout& y, const Header& h, const uint16_t* in, uint8_t* out,
                     uint32_t* err, cudaStream_t st) {
  uint8_t* meta = out + kHeaderBytes;
  uint8_t* codes = meta + h.meta_bytes;
  Tail tail{};
  EncodeHeader(h, tail.header.w);
  tail.pad_offset = uint32_t(y.meta_bytes);
  tail.pad_bytes = uint32_t(h.meta_bytes - y.meta_bytes);
  const int sms = SmCount();
  switch (p.format) {
    case Format::kFp8E4m3: {
      uint32_t n = 2 * y.L * y.H;
      cudaMemsetAsync(meta, 0, n * 4, st);
      dim3 grid = ColumnGrid(y, sms, 2 * y.L);
      Fp8AmaxKernel<B><<<grid, ColumnThreads(y), 0, st>>>(in, y, reinterpret_cast<uint32_t*>(meta), err);
      Fp8EncodeKernel<B><<<grid, ColumnThreads(y), 0, st>>>(in, y, reinterpret_cast<uint32_t*>(meta), codes);
      Fp8ScaleKernel<B><<<GridFor(n, sms), kThreads, 0, st>>>(reinterpret_cast<uint32_t*>(meta), n, tail, out);
      return LastLaunch("fp8 quantize");
    }
    case Format::kInt8: {
      uint32_t lanes = NextPow2(y.D / 8);
      uint64_t rows = 2ull * y.L * y.T * y.H;
      RowGroupKernel<B, 8><<<GridFor(rows * lanes, sms), kThreads, 0, st>>>(in, y, y.D, lanes, 1, rows, meta,
                                                                           codes, err, tail, out);
      return LastLaunch("int8 quantize");
    }
    default: {
      uint64_t rows = uint64_t(y.L) * y.T * y.H;
      uint32_t lanes = y.G / 8;
      const unsigned kthreads = ColumnThreads(y);
      dim3 kgrid((y.H * y.D / 8 + kthreads - 1) / kthreads, y.TG, y.L);
      if (y.bits == 4) {
        KiviKeyKernel<B, 4><<<kgrid, kthreads, 0, st>>>(in, y, reinterpret_cast<uint32_t*>(meta), codes, err);
        RowGroupKernel<B, 4><<<GridFor(rows * y.DG * lanes, sms), kThreads, 0, st>>>(
            in, y, y.G, lanes, y.DG, rows, meta, codes, err, tail, out);
      } else {
        KiviKeyKernel<B, 2><<<kgrid, kthreads, 0, st>>>(in, y, reinterpret_cast<uint32_t*>(meta), codes, err);
        RowGroupKernel<B, 2><<<GridFor(rows * y.DG * lanes, sms), kThreads, 0, st>>>(
            in, y, y.G, lanes, y.DG, rows, meta, codes, err, tail, out);
      }
      return LastLaunch("kivi quantize");
    }
  }
}

template <bool B>
Status DequantizeTyped(Format f, const Layout& y, const uint8_t* meta, const uint8_t* codes, uint16_t* out,
                       cudaStream_t st) {
  unsigned grid = GridFor(y.elements / 8, SmCount());
  switch (f) {
    case Format::kFp8E4m3: DequantKernel<B, Format::kFp8E4m3><<<grid, kThreads, 0, st>>>(meta, codes, y, out); break;
    case Format::kInt8: DequantKernel<B, Format::kInt8><<<grid, kThreads, 0, st>>>(meta, codes, y, out); break;
    case Format::kInt4Kivi: DequantKernel<B, Format::kInt4Kivi><<<grid, kThreads, 0, st>>>(meta, codes, y, out); break;
    case Format::kInt2Kivi: DequantKernel<B, Format::kInt2Kivi><<<grid, kThreads, 0, st>>>(meta, codes, y, out); break;
  }
  return LastLaunch("dequantize");
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

bool BuiltWithCuda() { return true; }

int CudaDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

Status QuantizeCudaAsync(const QuantParams& p, const void* d_in, void* d_out, size_t out_capacity,
                         uint32_t* d_error, void* stream) {
  if (Status s = Validate(p); !s.ok()) return s;
  Header h = MakeHeader(p);
  if (out_capacity < h.total_bytes())
    return Status{Code::kBufferTooSmall, "output has " + std::to_string(out_capacity) + " bytes, needs " +
                                             std::to_string(h.total_bytes())};
  if (!Aligned16(d_in) || !Aligned16(d_out))
    return Status{Code::kInvalidArgument, "device buffers must be 16-byte aligned"};
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (cudaError_t e = cudaMemsetAsync(d_error, 0, 4, st); e != cudaSuccess) return CudaFailure("memset", e);
  Layout y = MakeLayout(h.params);
  const uint16_t* in = static_cast<const uint16_t*>(d_in);
  uint8_t* out = static_cast<uint8_t*>(d_out);
  return p.dtype == DType::kBf16 ? QuantizeTyped<true>(p, y, h, in, out, d_error, st)
                                 : QuantizeTyped<false>(p, y, h, in, out, d_error, st);
}

Status QuantizeCudaFinish(const uint32_t* d_error, void* stream) {
  uint32_t flag = 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (cudaError_t e = cudaMemcpyAsync(&flag, d_error, 4, cudaMemcpyDeviceToHost, st); e != cudaSuccess)
    return CudaFailure("copy error flag", e);
  if (cudaError_t e = cudaStreamSynchronize(st); e != cudaSuccess) return CudaFailure("synchronize", e);
  if (flag) return Status{Code::kNonFinite, "input holds NaN or Inf"};
  return Status{};
}

Status DequantizeCudaAsync(const Header& h, const void* d_encoded, void* d_out, size_t out_capacity,
                           void* stream) {
  if (Status s = Validate(h.params); !s.ok()) return s;
  if (out_capacity < RawBytes(h.params.shape))
    return Status{Code::kBufferTooSmall, "output has " + std::to_string(out_capacity) + " bytes, needs " +
                                             std::to_string(RawBytes(h.params.shape))};
  if (!Aligned16(d_encoded) || !Aligned16(d_out))
    return Status{Code::kInvalidArgument, "device buffers must be 16-byte aligned"};
  Layout y = MakeLayout(h.params);
  const uint8_t* meta = static_cast<const uint8_t*>(d_encoded) + kHeaderBytes;
  const uint8_t* codes = meta + h.meta_bytes;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  uint16_t* out = static_cast<uint16_t*>(d_out);
  return h.params.dtype == DType::kBf16 ? DequantizeTyped<true>(h.params.format, y, meta, codes, out, st)
                                        : DequantizeTyped<false>(h.params.format, y, meta, codes, out, st);
}

}  // namespace kvstrata::kernels
