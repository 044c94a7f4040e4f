// quant_bench: quantize and dequantize throughput of every kernels/ format,
// in GB/s of fp16 (or bf16) input, against a copy of the same bytes measured
// in the same run: memcpy on the CPU (one thread), cudaMemcpy device to
// device on a GPU. On a GPU it also checks that the kernels' bytes equal the
// CPU path's and fails if they do not. It also times the precision tiers'
// transcodes, one rung down the ladder (raw > fp8 > int4 > int2), on the CPU.
//
//   quant_bench [--mib 64] [--dtype fp16|bf16] [--reps N] [--quick] [--cpu_only]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "kvstrata/kernels/quant.h"
#if defined(KVSTRATA_KERNELS_CUDA)
#include <cuda_runtime.h>

#include "kvstrata/kernels/quant_cuda.h"
#endif

namespace {

using namespace kvstrata::kernels;

constexpr Format kFormats[] = {Format::kFp8E4m3, Format::kInt8, Format::kInt4Kivi, Format::kInt2Kivi};

struct Options {
  double mib = 64;
  int reps = 5;
  DType dtype = DType::kFp16;
  bool cpu_only = false;
};

[[noreturn]] void Usage(const char* why) {
  std::fprintf(stderr, "quant_bench: %s\nusage: quant_bench [--mib 64] [--dtype fp16|bf16] [--reps 5] [--quick] [--cpu_only]\n", why);
  std::exit(2);
}

Options Parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) Usage(("missing value for " + a).c_str());
      return argv[++i];
    };
    if (a == "--mib") o.mib = std::atof(next().c_str());
    else if (a == "--reps") o.reps = std::max(1, std::atoi(next().c_str()));
    else if (a == "--dtype") { if (!ParseDType(next(), &o.dtype)) Usage("dtype is fp16 or bf16"); }
    else if (a == "--quick") { o.mib = 2; o.reps = 2; }
    else if (a == "--cpu_only") o.cpu_only = true;
    else Usage(("unknown flag " + a).c_str());
  }
  return o;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <typename F>
double CpuSeconds(int reps, F&& f) {
  f();  // warm: page faults, caches
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    auto a = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
  }
  return Median(t);
}

void Die(const Status& st, const char* what) {
  if (st.ok()) return;
  std::fprintf(stderr, "quant_bench: %s: %s\n", what, st.message.c_str());
  std::exit(1);
}

void Row(const char* name, const char* op, double bytes, double s, double base_gbs) {
  double gbs = bytes / s / 1e9;
  std::printf("  %-10s %-10s %9.2f GB/s  %6.2fx copy\n", name, op, gbs, gbs / base_gbs);
}

#if defined(KVSTRATA_KERNELS_CUDA)
#define CUDA_CHECK(x)                                                                    \
  do {                                                                                   \
    cudaError_t e_ = (x);                                                                \
    if (e_ != cudaSuccess) {                                                             \
      std::fprintf(stderr, "quant_bench: %s: %s\n", #x, cudaGetErrorString(e_));         \
      std::exit(1);                                                                      \
    }                                                                                    \
  } while (0)

template <typename F>
double GpuSeconds(int reps, F&& f) {
  cudaEvent_t a, b;
  CUDA_CHECK(cudaEventCreate(&a));
  CUDA_CHECK(cudaEventCreate(&b));
  f();
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    CUDA_CHECK(cudaEventRecord(a));
    for (int k = 0; k < 10; ++k) f();  // 10 back to back: launch gaps are part of the cost
    CUDA_CHECK(cudaEventRecord(b));
    CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms / 1e3 / 10);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return Median(t);
}

// Returns false if any GPU encoding or decoding differs from the CPU's.
bool RunGpu(const Options& o, const BlockShape& shape, const std::vector<uint16_t>& in) {
  const size_t raw = in.size() * 2;
  void *d_in, *d_copy, *d_enc, *d_out;
  uint32_t* d_err;
  size_t enc_max = 0;
  for (Format f : kFormats) enc_max = std::max<size_t>(enc_max, EncodedBytes({f, o.dtype, shape, 32}));
  CUDA_CHECK(cudaMalloc(&d_in, raw));
  CUDA_CHECK(cudaMalloc(&d_copy, raw));
  CUDA_CHECK(cudaMalloc(&d_out, raw));
  CUDA_CHECK(cudaMalloc(&d_enc, enc_max));
  CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&d_err), 4));
  CUDA_CHECK(cudaMemcpy(d_in, in.data(), raw, cudaMemcpyHostToDevice));
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  double copy_s = GpuSeconds(o.reps, [&] { CUDA_CHECK(cudaMemcpyAsync(d_copy, d_in, raw, cudaMemcpyDeviceToDevice)); });
  double copy_gbs = raw / copy_s / 1e9;
  std::printf("GPU %s (sm_%d%d)\n  %-10s %-10s %9.2f GB/s  %6.2fx copy\n", prop.name, prop.major, prop.minor,
              "cudaMemcpy", "D2D", copy_gbs, 1.0);
  bool same = true;
  std::vector<uint8_t> cpu_enc(enc_max), gpu_enc(enc_max);
  std::vector<uint16_t> cpu_out(in.size()), gpu_out(in.size());
  for (Format f : kFormats) {
    QuantParams p{f, o.dtype, shape, 32};
    const size_t enc = EncodedBytes(p);
    double q = GpuSeconds(o.reps, [&] { Die(QuantizeCudaAsync(p, d_in, d_enc, enc, d_err, nullptr), "quantize"); });
    Die(QuantizeCudaFinish(d_err, nullptr), "quantize");
    Header h;
    CUDA_CHECK(cudaMemcpy(gpu_enc.data(), d_enc, enc, cudaMemcpyDeviceToHost));
    Die(ParseHeader(gpu_enc.data(), enc, &h), "GPU header");
    double d = GpuSeconds(o.reps, [&] { Die(DequantizeCudaAsync(h, d_enc, d_out, raw, nullptr), "dequantize"); });
    CUDA_CHECK(cudaDeviceSynchronize());
    Row(FormatName(f), "quantize", raw, q, copy_gbs);
    Row(FormatName(f), "dequantize", raw, d, copy_gbs);
    // Same bytes as the CPU path.
    Die(Quantize(p, in.data(), raw, cpu_enc.data(), enc), "cpu quantize");
    bool enc_same = std::memcmp(cpu_enc.data(), gpu_enc.data(), enc) == 0;
    Die(Dequantize(cpu_enc.data(), enc, cpu_out.data(), raw), "cpu dequantize");
    CUDA_CHECK(cudaMemcpy(gpu_out.data(), d_out, raw, cudaMemcpyDeviceToHost));
    bool dec_same = std::memcmp(cpu_out.data(), gpu_out.data(), raw) == 0;
    std::printf("  %-10s bytes equal to the CPU path: encode %s, decode %s\n", FormatName(f),
                enc_same ? "yes" : "NO", dec_same ? "yes" : "NO");
    same = same && enc_same && dec_same;
  }
  cudaFree(d_in);
  cudaFree(d_copy);
  cudaFree(d_out);
  cudaFree(d_enc);
  cudaFree(d_err);
  return same;
}
#endif

}  // namespace

int main(int argc, char** argv) {
  Options o = Parse(argc, argv);
  // A Llama-like block: 4 layers, 8 KV heads of 128; tokens fill the size.
  BlockShape shape{4, 0, 8, 128};
  uint64_t per_token = RawBytes({shape.layers, 1, shape.kv_heads, shape.head_dim});
  shape.tokens = std::max<uint32_t>(1, uint32_t(o.mib * (1 << 20) / per_token));
  std::vector<uint16_t> in(ElementCount(shape));
  {
    std::mt19937_64 rng(42);
    std::normal_distribution<float> n(0.0f, 1.0f);
    for (auto& v : in) {
      float x = n(rng);
      uint16_t h;
      if (o.dtype == DType::kBf16) {
        uint32_t b;
        std::memcpy(&b, &x, 4);
        h = uint16_t((b + 0x7fff + ((b >> 16) & 1)) >> 16);
      } else {
        _Float16 f = static_cast<_Float16>(x);
        std::memcpy(&h, &f, 2);
      }
      v = h;
    }
  }
  const size_t raw = in.size() * 2;
  std::printf("quant_bench: %.1f MiB of %s input per call, block [%u][2][%u][%u][%u], KIVI group 32, median of %d\n",
              raw / 1048576.0, DTypeName(o.dtype), shape.layers, shape.tokens, shape.kv_heads, shape.head_dim, o.reps);

  std::vector<uint16_t> copy(in.size()), out(in.size());
  double memcpy_s = CpuSeconds(o.reps, [&] { std::memcpy(copy.data(), in.data(), raw); });
  double memcpy_gbs = raw / memcpy_s / 1e9;
  std::printf("CPU, one thread\n  %-10s %-10s %9.2f GB/s  %6.2fx copy\n", "memcpy", "", memcpy_gbs, 1.0);
  for (Format f : kFormats) {
    QuantParams p{f, o.dtype, shape, 32};
    std::vector<uint8_t> enc(EncodedBytes(p));
    double q = CpuSeconds(o.reps, [&] { Die(Quantize(p, in.data(), raw, enc.data(), enc.size()), "quantize"); });
    double d = CpuSeconds(o.reps, [&] { Die(Dequantize(enc.data(), enc.size(), out.data(), raw), "dequantize"); });
    Row(FormatName(f), "quantize", raw, q, memcpy_gbs);
    Row(FormatName(f), "dequantize", raw, d, memcpy_gbs);
    std::printf("  %-10s compression %.2fx (%zu -> %zu bytes)\n", FormatName(f), double(raw) / enc.size(), raw,
                enc.size());
  }

  // Precision tiers (NamespaceSpec.coarsest_format): what a node pays to move
  // a block one rung down its ladder, done as cachenode/src/stored_format.cc
  // does it: a raw block is encoded; an encoded one is decoded to raw first.
  // GB/s of the block's raw bytes; "copy" is memcpy of those same raw bytes.
  std::printf("precision-tier transcodes (node's CPU path, one thread)\n");
  struct Rung {
    const char* name;
    std::optional<Format> from;
    Format to;
  };
  const Rung rungs[] = {{"raw>fp8", std::nullopt, Format::kFp8E4m3},
                        {"raw>int8", std::nullopt, Format::kInt8},
                        {"fp8>int4", Format::kFp8E4m3, Format::kInt4Kivi},
                        {"int8>int4", Format::kInt8, Format::kInt4Kivi},
                        {"int4>int2", Format::kInt4Kivi, Format::kInt2Kivi}};
  for (const Rung& r : rungs) {
    QuantParams to{r.to, o.dtype, shape, 32};
    std::vector<uint8_t> src, dst(EncodedBytes(to));
    if (r.from.has_value()) {
      QuantParams from{*r.from, o.dtype, shape, 32};
      src.resize(EncodedBytes(from));
      Die(Quantize(from, in.data(), raw, src.data(), src.size()), "quantize");
    }
    double t = CpuSeconds(o.reps, [&] {
      const void* raw_in = in.data();
      if (r.from.has_value()) {
        Die(Dequantize(src.data(), src.size(), out.data(), raw), "dequantize");
        raw_in = out.data();
      }
      Die(Quantize(to, raw_in, raw, dst.data(), dst.size()), "quantize");
    });
    Row(r.name, "transcode", raw, t, memcpy_gbs);
  }

#if defined(KVSTRATA_KERNELS_CUDA)
  if (!o.cpu_only) {
    if (CudaDeviceCount() == 0) {
      std::printf("GPU: none found (built with CUDA): GPU figures skipped\n");
    } else if (!RunGpu(o, shape, in)) {
      std::fprintf(stderr, "quant_bench: GPU bytes differ from the CPU path\n");
      return 1;
    }
  }
#else
  std::printf("GPU: not built with CUDA\n");
#endif
  return 0;
}
