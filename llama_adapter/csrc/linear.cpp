// float_linear, the float32 linear of CPU decode steps (a few rows of activations):
//   y[m, n] = sum_k x[m, k] * w[n, k]
//
// Why not MKL's: at one to eight rows its products read the weights at a quarter to a third of
// the memory's speed on the CPU measured here. This loop streams each thread's block of weight
// rows once for all rows of x, 16 weights at a time (AVX-512, or AVX2 with FMA), and asks for the
// next block ahead of use.
//
// Every output is summed in one fixed order, 16 lanes then the lanes in a fixed tree, whatever
// the number of rows or threads, so a row's result is bitwise the same alone or in a batch.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kOutputs = 4;  // weight rows per tile: each x load feeds this many sums
constexpr int64_t kRows = 4;     // rows of x per pass over a tile
constexpr int64_t kPrefetchTiles = 1;  // 2, 4 and 8 tiles ahead were no faster here

// 16 float32 lanes: one AVX-512 register, or two AVX2 registers.
#if defined(__AVX512F__)
struct Lanes {
  __m512 v = _mm512_setzero_ps();
  static Lanes load(const float* p) { return {_mm512_loadu_ps(p)}; }
  void add_product(const Lanes& a, const Lanes& b) { v = _mm512_fmadd_ps(a.v, b.v, v); }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Lanes {
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  static Lanes load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  void add_product(const Lanes& a, const Lanes& b) {
    lo = _mm256_fmadd_ps(a.lo, b.lo, lo);
    hi = _mm256_fmadd_ps(a.hi, b.hi, hi);
  }
  void store(float* p) const {
    _mm256_storeu_ps(p, lo);
    _mm256_storeu_ps(p + 8, hi);
  }
};
#else
#error "float_linear needs AVX2 with FMA, or AVX-512"
#endif

// Outputs [n0, n0 + OUTPUTS) for rows [m0, m0 + ROWS) of x, over the whole reduction.
template <int64_t ROWS, int64_t OUTPUTS>
inline void tile(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t n0) {
  Lanes acc[ROWS][OUTPUTS];
  const int64_t full = K - K % kLanes;
  // This tile's OUTPUTS rows are one contiguous block, read as OUTPUTS streams; the hardware
  // prefetcher alone kept each thread at ~7 GB/s, so each step also asks for the bytes it reads of
  // the block kPrefetchTiles ahead (the next tiles of this thread's range, contiguous too).
  const char* ahead = reinterpret_cast<const char*>(w + (n0 + kPrefetchTiles * OUTPUTS) * K);
  const char* end = reinterpret_cast<const char*>(w + N * K);
  constexpr int64_t kStepBytes = OUTPUTS * kLanes * sizeof(float);
  for (int64_t k = 0; k < full; k += kLanes) {
    for (int64_t byte = 0; byte < kStepBytes; byte += 64) {
      const char* line = ahead + k * OUTPUTS * sizeof(float) + byte;
      if (line < end) _mm_prefetch(line, _MM_HINT_T0);
    }
    Lanes wf[OUTPUTS];
    for (int64_t o = 0; o < OUTPUTS; ++o) wf[o] = Lanes::load(w + (n0 + o) * K + k);
    for (int64_t r = 0; r < ROWS; ++r) {
      const Lanes xr = Lanes::load(x + (m0 + r) * K + k);
      for (int64_t o = 0; o < OUTPUTS; ++o) acc[r][o].add_product(xr, wf[o]);
    }
  }
  for (int64_t r = 0; r < ROWS; ++r)
    for (int64_t o = 0; o < OUTPUTS; ++o) {
      float s[kLanes];
      acc[r][o].store(s);
      for (int64_t k = full; k < K; ++k)  // a tail shorter than the lanes goes to the first lanes
        s[k - full] += x[(m0 + r) * K + k] * w[(n0 + o) * K + k];
      for (int64_t width = kLanes / 2; width > 0; width /= 2)
        for (int64_t i = 0; i < width; ++i) s[i] += s[i + width];
      y[(m0 + r) * N + n0 + o] = s[0];
    }
}

template <int64_t OUTPUTS>
inline void outputs(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0) {
  int64_t m = 0;
  for (; m + kRows <= M; m += kRows) tile<kRows, OUTPUTS>(x, w, y, K, N, m, n0);
  for (; m < M; ++m) tile<1, OUTPUTS>(x, w, y, K, N, m, n0);
}

at::Tensor float_linear(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "float_linear: x must be a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 2 &&
                  weight.is_contiguous() && weight.size(1) == x.size(1),
              "float_linear: weight must be a contiguous float32 [out, in] CPU tensor matching x");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t tiles = N / kOutputs;
  at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) outputs<kOutputs>(xp, wp, yp, M, K, N, t * kOutputs);
  });
  for (int64_t n = tiles * kOutputs; n < N; ++n) outputs<1>(xp, wp, yp, M, K, N, n);
  return y;
}

}  // namespace

TORCH_LIBRARY(llama_adapter, m) { m.def("float_linear(Tensor x, Tensor weight) -> Tensor"); }

TORCH_LIBRARY_IMPL(llama_adapter, CPU, m) { m.impl("float_linear", &float_linear); }
