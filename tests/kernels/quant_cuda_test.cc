// The CUDA kernels write the same bytes as the CPU path, both ways, for every
// format, dtype and odd shape; NaN/Inf is reported. Skips without a GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kv_random.h"
#include "kvstrata/kernels/quant.h"
#include "kvstrata/kernels/quant_cuda.h"

namespace kvstrata::kernels {
namespace {

#define CUDA_OK(x) ASSERT_EQ((x), cudaSuccess) << #x

class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t n) { cudaMalloc(&p_, n ? n : 1); }
  ~DeviceBuffer() { cudaFree(p_); }
  void* get() const { return p_; }

 private:
  void* p_ = nullptr;
};

// A macro: GTEST_SKIP() returns from the function it is written in.
#define SKIP_WITHOUT_GPU()      \
  if (CudaDeviceCount() == 0) \
  GTEST_SKIP() << "no CUDA GPU on this machine (or no driver): CPU/GPU byte comparison not run"

using Case = std::tuple<Format, DType, BlockShape>;
class CpuGpuBytes : public ::testing::TestWithParam<Case> {};

TEST_P(CpuGpuBytes, Identical) {
  SKIP_WITHOUT_GPU();
  auto [format, dtype, shape] = GetParam();
  QuantParams p{format, dtype, shape, 32};
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::vector<uint16_t> in = testing::RandomBlock(p, seed);
  const size_t raw = in.size() * 2, enc = EncodedBytes(p);

  std::vector<uint8_t> cpu(enc), gpu(enc);
  Status st = Quantize(p, in.data(), raw, cpu.data(), cpu.size());
  ASSERT_TRUE(st.ok()) << st.message;

  DeviceBuffer d_in(raw), d_enc(enc), d_out(raw), d_err(4);
  CUDA_OK(cudaMemcpy(d_in.get(), in.data(), raw, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(d_enc.get(), 0xa5, enc));  // every byte must be written
  uint32_t* err = static_cast<uint32_t*>(d_err.get());
  st = QuantizeCudaAsync(p, d_in.get(), d_enc.get(), enc, err, nullptr);
  ASSERT_TRUE(st.ok()) << st.message;
  st = QuantizeCudaFinish(err, nullptr);
  ASSERT_TRUE(st.ok()) << st.message;
  CUDA_OK(cudaMemcpy(gpu.data(), d_enc.get(), enc, cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < enc; ++i) ASSERT_EQ(gpu[i], cpu[i]) << "first differing byte " << i << " of " << enc;

  // Dequantize the (identical) encoding on both sides.
  std::vector<uint16_t> cpu_out(in.size()), gpu_out(in.size());
  ASSERT_TRUE(Dequantize(cpu.data(), cpu.size(), cpu_out.data(), raw).ok());
  Header h;
  ASSERT_TRUE(ParseHeader(cpu.data(), cpu.size(), &h).ok());
  st = DequantizeCudaAsync(h, d_enc.get(), d_out.get(), raw, nullptr);
  ASSERT_TRUE(st.ok()) << st.message;
  CUDA_OK(cudaMemcpy(gpu_out.data(), d_out.get(), raw, cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < in.size(); ++i) ASSERT_EQ(gpu_out[i], cpu_out[i]) << "element " << i;
}

const BlockShape kShapes[] = {
    {2, 100, 4, 128}, {1, 1, 1, 64}, {1, 33, 2, 256}, {3, 64, 2, 80}, {1, 40, 1, 8}, {4, 1000, 8, 128},
};

INSTANTIATE_TEST_SUITE_P(
    AllFormats, CpuGpuBytes,
    ::testing::Combine(::testing::Values(Format::kFp8E4m3, Format::kInt8, Format::kInt4Kivi, Format::kInt2Kivi),
                       ::testing::Values(DType::kFp16, DType::kBf16), ::testing::ValuesIn(kShapes)),
    [](const auto& info) { return testing::ParamName(info.param); });

TEST(CudaQuant, NonFiniteInputIsReported) {
  SKIP_WITHOUT_GPU();
  for (Format f : {Format::kFp8E4m3, Format::kInt8, Format::kInt4Kivi, Format::kInt2Kivi}) {
    for (uint32_t kv : {0u, 1u}) {
      QuantParams p{f, DType::kFp16, {2, 50, 3, 64}, 32};
      std::vector<uint16_t> in = testing::RandomBlock(p, 3);
      in[((uint64_t(1 * 2 + kv) * 50 + 37) * 3 + 2) * 64 + 5] = 0x7c00;  // +Inf
      DeviceBuffer d_in(in.size() * 2), d_enc(EncodedBytes(p)), d_err(4);
      CUDA_OK(cudaMemcpy(d_in.get(), in.data(), in.size() * 2, cudaMemcpyHostToDevice));
      uint32_t* err = static_cast<uint32_t*>(d_err.get());
      ASSERT_TRUE(QuantizeCudaAsync(p, d_in.get(), d_enc.get(), EncodedBytes(p), err, nullptr).ok());
      EXPECT_EQ(QuantizeCudaFinish(err, nullptr).code, Code::kNonFinite) << FormatName(f) << " kv " << kv;
    }
  }
}

}  // namespace
}  // namespace kvstrata::kernels
