// The linears of CPU decode steps (a few rows of float32 activations x):
//   float_linear(x, w)          y[m, n] = sum_k x[m, k] * w[n, k]                 w float32
//   int8_linear(x, w, scales)   y[m, n] = scales[n] * sum_k x[m, k] * w[n, k]     w int8, scales bfloat16
//
// Why not torch's: at one to eight rows MKL's float32 product and _weight_int8pack_mm read the
// weights at a quarter to a half of the memory's speed on the CPUs measured here. This loop streams
// each thread's block of weight rows once for all rows of x, 16 weights at a time (AVX-512, or AVX2
// with FMA), and asks for the next block ahead of use.
//
// Every output is summed in one fixed order, 16 lanes then the lanes in a fixed tree, whatever the
// number of rows or threads, so a row's result is bitwise the same alone or in a batch.
//
// Threads: as many as torch's intra-op setting for the calling thread (at::get_num_threads, read
// through libtorch so that torch's own per-thread state is used), in an OpenMP team of that size.
// Not at::parallel_for: inlined here, it keeps this library's own copy of torch's per-thread
// "initialised" flag, and its first call in a thread resets that thread's OpenMP team to the
// process default, undoing the engine's one-thread prefill worker.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <omp.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kLanes = 16;
// A pass keeps kRows x kOutputs sums in registers (24 of AVX-512's 32). Measured on one thread for 8
// rows: 4 x 6 took 22 ms per step's linears, 4 x 4 26 ms, 8 x 2 and 8 x 3 26 ms, 4 x 8 (spilling) 26 ms.
constexpr int64_t kOutputs = 6;         // weight rows per tile: each x load feeds this many sums
constexpr int64_t kRows = 4;            // rows of x per pass over a tile (then a pass of 2, then of 1)
constexpr int64_t kPrefetchTiles = 1;   // 2, 4 and 8 tiles ahead were no faster here
constexpr int64_t kTilesPerThread = 16; // fewer, and a second thread costs more than it saves

// 16 float32 lanes: one AVX-512 register, or two AVX2 registers; loaded from float32 or from int8.
#if defined(__AVX512F__)
struct Lanes {
  __m512 v = _mm512_setzero_ps();
  static Lanes load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Lanes load(const int8_t* p) {
    return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
  }
  void add_product(const Lanes& a, const Lanes& b) { v = _mm512_fmadd_ps(a.v, b.v, v); }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Lanes {
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  static Lanes load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static Lanes load(const int8_t* p) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)))};
  }
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
#error "the decode kernels need AVX2 with FMA, or AVX-512"
#endif

// Weights of type W, and for int8 one scale per output row (nullptr for float32).
template <typename W>
struct Product {
  const float* x;
  const W* w;
  const c10::BFloat16* scales;
  float* y;
  int64_t M, K, N;

  // Outputs [n0, n0 + OUTPUTS) for rows [m0, m0 + ROWS) of x, over the whole reduction.
  template <int64_t ROWS, int64_t OUTPUTS>
  void tile(int64_t m0, int64_t n0) const {
    Lanes acc[ROWS][OUTPUTS];
    const int64_t full = K - K % kLanes;
    // This tile's OUTPUTS rows are one contiguous block, read as OUTPUTS streams; the hardware
    // prefetcher alone kept each thread at ~7 GB/s, so each step also asks for the bytes it reads of
    // the block kPrefetchTiles ahead (the next tiles of this thread's range, contiguous too).
    const char* ahead = reinterpret_cast<const char*>(w + (n0 + kPrefetchTiles * OUTPUTS) * K);
    const char* end = reinterpret_cast<const char*>(w + N * K);
    constexpr int64_t kStepBytes = OUTPUTS * kLanes * sizeof(W);
    for (int64_t k = 0; k < full; k += kLanes) {
      for (int64_t byte = 0; byte < kStepBytes; byte += 64) {
        const char* line = ahead + k * OUTPUTS * sizeof(W) + byte;
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
          s[k - full] += x[(m0 + r) * K + k] * static_cast<float>(w[(n0 + o) * K + k]);
        for (int64_t width = kLanes / 2; width > 0; width /= 2)
          for (int64_t i = 0; i < width; ++i) s[i] += s[i + width];
        y[(m0 + r) * N + n0 + o] = scales ? s[0] * static_cast<float>(scales[n0 + o]) : s[0];
      }
  }

  template <int64_t OUTPUTS>
  void outputs(int64_t n0) const {
    int64_t m = 0;
    for (; m + kRows <= M; m += kRows) tile<kRows, OUTPUTS>(m, n0);
    for (; m + 2 <= M; m += 2) tile<2, OUTPUTS>(m, n0);
    for (; m < M; ++m) tile<1, OUTPUTS>(m, n0);
  }

  void tiles(int64_t begin, int64_t end) const {
    for (int64_t t = begin; t < end; ++t) outputs<kOutputs>(t * kOutputs);
  }

  void run() const {
    const int64_t tile_count = N / kOutputs;
    const int64_t threads = at::in_parallel_region()
                                ? 1
                                : std::min<int64_t>(at::get_num_threads(), tile_count / kTilesPerThread);
    if (threads <= 1) {
      tiles(0, tile_count);
    } else {
#pragma omp parallel num_threads(threads)
      {
        const int64_t team = omp_get_num_threads(), chunk = (tile_count + team - 1) / team;
        const int64_t begin = omp_get_thread_num() * chunk;
        tiles(begin, std::min(tile_count, begin + chunk));
      }
    }
    for (int64_t n = tile_count * kOutputs; n < N; ++n) outputs<1>(n);
  }
};

void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), op,
              ": x must be a contiguous 2-D float32 CPU tensor");
}

void check_weight(const at::Tensor& x, const at::Tensor& weight, at::ScalarType dtype, const char* op) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == dtype && weight.dim() == 2 &&
                  weight.is_contiguous() && weight.size(1) == x.size(1),
              op, ": weight must be a contiguous ", dtype, " [out, in] CPU tensor matching x");
}

at::Tensor float_linear(const at::Tensor& x, const at::Tensor& weight) {
  check_x(x, "float_linear");
  check_weight(x, weight, at::kFloat, "float_linear");
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  Product<float>{x.data_ptr<float>(), weight.data_ptr<float>(), nullptr, y.data_ptr<float>(),
                 x.size(0), x.size(1), weight.size(0)}
      .run();
  return y;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  check_x(x, "int8_linear");
  check_weight(x, weight, at::kChar, "int8_linear");
  TORCH_CHECK(scales.device().is_cpu() && scales.scalar_type() == at::kBFloat16 && scales.dim() == 1 &&
                  scales.is_contiguous() && scales.size(0) == weight.size(0),
              "int8_linear: scales must be a contiguous bfloat16 CPU tensor, one per output row");
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  Product<int8_t>{x.data_ptr<float>(), weight.data_ptr<int8_t>(), scales.data_ptr<c10::BFloat16>(),
                  y.data_ptr<float>(), x.size(0), x.size(1), weight.size(0)}
      .run();
  return y;
}

}  // namespace

TORCH_LIBRARY(llama_adapter, m) {
  m.def("float_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama_adapter, CPU, m) {
  m.impl("float_linear", &float_linear);
  m.impl("int8_linear", &int8_linear);
}
