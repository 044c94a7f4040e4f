// quant_eval: what each format costs in accuracy. For every format: the
// compression ratio, the relative error of K and of V, and the relative error
// of attention outputs softmax(Q K^T / sqrt(d)) V over the whole block,
// computed with the dequantized cache against the original one.
//
//   quant_eval --synthetic [--layers 4 --tokens 1024 --kv_heads 8 --head_dim 128
//                           --q_heads 32 --queries 32 --seed 1]
//   quant_eval --dir DIR    (DIR/shape.txt, DIR/kv.f16, DIR/q.f16 from eval/capture_kv.py)
//   common: [--dtype fp16|bf16] [--group 32] [--check]
//
// Relative errors are Frobenius norms: ||X' - X|| / ||X||. --check exits 1
// when an error exceeds the loose ceilings of kCeiling (a broken format, not
// a tuning target). The synthetic generator is described in
// kernels/README.md ("Quality").
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kvstrata/kernels/quant.h"

namespace {

using namespace kvstrata::kernels;

struct Data {
  BlockShape shape;
  uint32_t q_heads = 0, queries = 0;
  std::vector<float> kv;  // [L][2][T][H][D], values as stored in the input dtype
  std::vector<float> q;   // [L][queries][q_heads][D]
};

[[noreturn]] void Fail(const std::string& why) {
  std::fprintf(stderr, "quant_eval: %s\n", why.c_str());
  std::exit(2);
}

float HalfBits(uint16_t h) {
  _Float16 f;
  std::memcpy(&f, &h, 2);
  return float(f);
}
uint16_t ToHalfBits(float x) {
  _Float16 f = static_cast<_Float16>(x);
  uint16_t h;
  std::memcpy(&h, &f, 2);
  return h;
}
float Bf16Bits(uint16_t h) {
  uint32_t b = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
uint16_t ToBf16Bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return uint16_t((b + 0x7fff + ((b >> 16) & 1)) >> 16);
}

// Synthetic KV with the structure of real models' caches:
//  K = s_d * (b_d + z): a per-channel offset b_d ~ N(0,1) per (layer, head),
//      z ~ N(0,1) per element, s_d = 1 except 4 outlier channels per head with
//      s_d log-uniform in [10, 100];
//  V = a_t * t_3 / sqrt(3): Student-t with 3 degrees of freedom (heavy tails),
//      a per-token magnitude a_t = exp(N(0, 0.3^2));
//  Q ~ N(0,1) / s_d, so the outlier channels enter the logits like the others.
Data Synthetic(BlockShape s, uint32_t q_heads, uint32_t queries, uint64_t seed) {
  Data d;
  d.shape = s;
  d.q_heads = q_heads;
  d.queries = queries;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::student_t_distribution<float> st(3.0f);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  const uint32_t L = s.layers, T = s.tokens, H = s.kv_heads, D = s.head_dim;
  d.kv.resize(ElementCount(s));
  d.q.resize(size_t(L) * queries * q_heads * D);
  for (uint32_t l = 0; l < L; ++l) {
    std::vector<float> scale(size_t(H) * D, 1.0f), offset(size_t(H) * D);
    for (auto& o : offset) o = n(rng);
    for (uint32_t h = 0; h < H; ++h)
      for (int k = 0; k < 4; ++k) scale[h * D + uint32_t(u(rng) * D) % D] = std::exp(std::log(10.0f) + u(rng) * std::log(10.0f));
    for (uint32_t t = 0; t < T; ++t) {
      float a = std::exp(0.3f * n(rng));
      for (uint32_t j = 0; j < H * D; ++j) {
        d.kv[((size_t(l) * 2 + 0) * T + t) * H * D + j] = scale[j] * (offset[j] + n(rng));
        d.kv[((size_t(l) * 2 + 1) * T + t) * H * D + j] = a * st(rng) / std::sqrt(3.0f);
      }
    }
    for (uint32_t i = 0; i < queries; ++i)
      for (uint32_t qh = 0; qh < q_heads; ++qh)
        for (uint32_t e = 0; e < D; ++e)
          d.q[((size_t(l) * queries + i) * q_heads + qh) * D + e] = n(rng) / scale[(qh / (q_heads / H)) * D + e];
  }
  return d;
}

std::vector<float> ReadF16(const std::string& path, size_t n) {
  std::ifstream f(path, std::ios::binary);
  if (!f) Fail("cannot open " + path);
  std::vector<uint16_t> raw(n);
  f.read(reinterpret_cast<char*>(raw.data()), std::streamsize(n * 2));
  if (size_t(f.gcount()) != n * 2) Fail(path + " is shorter than shape.txt says");
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = HalfBits(raw[i]);
  return out;
}

Data FromDir(const std::string& dir) {
  std::ifstream f(dir + "/shape.txt");
  if (!f) Fail("cannot open " + dir + "/shape.txt");
  std::map<std::string, uint32_t> kv;
  std::string key;
  uint32_t v;
  while (f >> key >> v) kv[key] = v;
  for (const char* k : {"layers", "tokens", "kv_heads", "head_dim", "q_heads", "queries"})
    if (!kv.count(k)) Fail(std::string("shape.txt lacks ") + k);
  Data d;
  d.shape = {kv["layers"], kv["tokens"], kv["kv_heads"], kv["head_dim"]};
  d.q_heads = kv["q_heads"];
  d.queries = kv["queries"];
  d.kv = ReadF16(dir + "/kv.f16", ElementCount(d.shape));
  d.q = ReadF16(dir + "/q.f16", size_t(d.shape.layers) * d.queries * d.q_heads * d.shape.head_dim);
  return d;
}

// softmax(q K^T / sqrt(D)) V for every layer, query and query head; GQA maps
// q_heads / kv_heads query heads onto each KV head.
std::vector<double> Attention(const Data& d, const std::vector<float>& kv) {
  const uint32_t L = d.shape.layers, T = d.shape.tokens, H = d.shape.kv_heads, D = d.shape.head_dim;
  const uint32_t group = d.q_heads / H;
  std::vector<double> out(size_t(L) * d.queries * d.q_heads * D, 0.0);
  std::vector<double> p(T);
  const double inv = 1.0 / std::sqrt(double(D));
  for (uint32_t l = 0; l < L; ++l)
    for (uint32_t i = 0; i < d.queries; ++i)
      for (uint32_t qh = 0; qh < d.q_heads; ++qh) {
        const uint32_t h = qh / group;
        const float* q = &d.q[((size_t(l) * d.queries + i) * d.q_heads + qh) * D];
        double mx = -INFINITY;
        for (uint32_t t = 0; t < T; ++t) {
          const float* k = &kv[((size_t(l) * 2 + 0) * T + t) * H * D + size_t(h) * D];
          double s = 0;
          for (uint32_t e = 0; e < D; ++e) s += double(q[e]) * k[e];
          p[t] = s * inv;
          mx = std::max(mx, p[t]);
        }
        double sum = 0;
        for (uint32_t t = 0; t < T; ++t) sum += (p[t] = std::exp(p[t] - mx));
        double* o = &out[((size_t(l) * d.queries + i) * d.q_heads + qh) * D];
        for (uint32_t t = 0; t < T; ++t) {
          const float* v = &kv[((size_t(l) * 2 + 1) * T + t) * H * D + size_t(h) * D];
          const double w = p[t] / sum;
          for (uint32_t e = 0; e < D; ++e) o[e] += w * v[e];
        }
      }
  return out;
}

template <typename A, typename B>
double RelErr(const A& ref, const B& got, size_t begin, size_t end) {
  double num = 0, den = 0;
  for (size_t i = begin; i < end; ++i) {
    double e = double(got[i]) - double(ref[i]);
    num += e * e;
    den += double(ref[i]) * double(ref[i]);
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// Loose ceilings on the K and V errors for --check: well above what a
// working format gives, far below what a broken one does. Attention errors
// depend on the data (int8's per-token scale meets K's outlier channels), so
// they are only checked to be below 1.
const std::map<Format, double> kCeiling = {
    {Format::kFp8E4m3, 0.05}, {Format::kInt8, 0.05}, {Format::kInt4Kivi, 0.2}, {Format::kInt2Kivi, 0.7}};

}  // namespace

int main(int argc, char** argv) {
  bool synthetic = false, check = false;
  std::string dir;
  BlockShape shape{4, 1024, 8, 128};
  uint32_t q_heads = 32, queries = 32, group = 32;
  uint64_t seed = 1;
  DType dtype = DType::kFp16;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) Fail("missing value for " + a);
      return argv[++i];
    };
    auto num = [&]() { return uint32_t(std::strtoul(next().c_str(), nullptr, 10)); };
    if (a == "--synthetic") synthetic = true;
    else if (a == "--dir") dir = next();
    else if (a == "--check") check = true;
    else if (a == "--layers") shape.layers = num();
    else if (a == "--tokens") shape.tokens = num();
    else if (a == "--kv_heads") shape.kv_heads = num();
    else if (a == "--head_dim") shape.head_dim = num();
    else if (a == "--q_heads") q_heads = num();
    else if (a == "--queries") queries = num();
    else if (a == "--group") group = num();
    else if (a == "--seed") seed = num();
    else if (a == "--dtype") { if (!ParseDType(next(), &dtype)) Fail("dtype is fp16 or bf16"); }
    else Fail("unknown flag " + a + " (see the comment at the top of tools/quant_eval.cc)");
  }
  if (synthetic == !dir.empty()) Fail("give exactly one of --synthetic and --dir DIR");
  if (synthetic && q_heads % shape.kv_heads) q_heads = shape.kv_heads;
  Data d = synthetic ? Synthetic(shape, q_heads, queries, seed) : FromDir(dir);
  if (d.q_heads % d.shape.kv_heads) Fail("q_heads must be a multiple of kv_heads");

  // The cache as the engine holds it: rounded to the input dtype.
  std::vector<uint16_t> raw(d.kv.size());
  for (size_t i = 0; i < raw.size(); ++i) {
    raw[i] = dtype == DType::kBf16 ? ToBf16Bits(d.kv[i]) : ToHalfBits(d.kv[i]);
    d.kv[i] = dtype == DType::kBf16 ? Bf16Bits(raw[i]) : HalfBits(raw[i]);
  }
  const std::vector<double> ref = Attention(d, d.kv);
  const size_t half = d.kv.size() / 2 / d.shape.layers;  // one K or V slab

  std::printf("source: %s; block [%u][2][%u][%u][%u] %s, %u query heads x %u queries, group %u\n",
              (synthetic ? "synthetic (seed " + std::to_string(seed) + ")" : "captured " + dir).c_str(),
              d.shape.layers, d.shape.tokens, d.shape.kv_heads, d.shape.head_dim, DTypeName(dtype), d.q_heads,
              d.queries, group);
  std::printf("| format | compression | K rel err | V rel err | attention rel err |\n");
  std::printf("|---|---|---|---|---|\n");
  bool ok = true;
  for (Format f : {Format::kFp8E4m3, Format::kInt8, Format::kInt4Kivi, Format::kInt2Kivi}) {
    QuantParams p{f, dtype, d.shape, group};
    std::vector<uint8_t> enc(EncodedBytes(p));
    if (enc.empty()) Fail(Validate(p).message);
    Status st = Quantize(p, raw.data(), raw.size() * 2, enc.data(), enc.size());
    if (!st.ok()) Fail(st.message);
    std::vector<uint16_t> dec(raw.size());
    st = Dequantize(enc.data(), enc.size(), dec.data(), dec.size() * 2);
    if (!st.ok()) Fail(st.message);
    std::vector<float> got(dec.size());
    for (size_t i = 0; i < dec.size(); ++i) got[i] = dtype == DType::kBf16 ? Bf16Bits(dec[i]) : HalfBits(dec[i]);
    double num_k = 0, den_k = 0, num_v = 0, den_v = 0;
    for (uint32_t l = 0; l < d.shape.layers; ++l) {
      for (int kv = 0; kv < 2; ++kv) {
        size_t b = (size_t(l) * 2 + kv) * half;
        double r = RelErr(d.kv, got, b, b + half), n2 = 0;
        for (size_t i = b; i < b + half; ++i) n2 += double(d.kv[i]) * d.kv[i];
        (kv ? num_v : num_k) += r * r * n2;
        (kv ? den_v : den_k) += n2;
      }
    }
    double ek = std::sqrt(num_k / den_k), ev = std::sqrt(num_v / den_v);
    double ea = RelErr(ref, Attention(d, got), 0, ref.size());
    std::printf("| %s | %.2fx | %.4f | %.4f | %.4f |\n", FormatName(f), double(raw.size() * 2) / enc.size(), ek, ev,
                ea);
    if (check && (std::max(ek, ev) > kCeiling.at(f) || !(ea < 1.0))) {
      std::fprintf(stderr, "quant_eval: %s error above its ceiling %.2f\n", FormatName(f), kCeiling.at(f));
      ok = false;
    }
  }
  return ok ? 0 : 1;
}
