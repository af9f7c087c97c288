// INT4 weight codes x INT8 activation codes -> the exact int32 sums, for the few rows of a decode step,
// with AVX512-VNNI (vpdpbusd: unsigned bytes x signed bytes, four products per int32 lane). The weight
// nibbles are stored unsigned (code + 8), so each sum is corrected by 8 * sum(x) once per row of x.
// Built and measured by scripts/int4_gemv_probe.py; not used by quadllm's backends.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// codes int8 [N, K] in [-8, 7], K % 64 == 0 -> uint8 [N, K/2]: per 64-block, byte j holds
// element j (+8) in its low nibble and element j+32 (+8) in its high nibble.
torch::Tensor pack(torch::Tensor codes) {
  TORCH_CHECK(codes.dtype() == torch::kInt8 && codes.dim() == 2 && codes.size(1) % 64 == 0);
  auto c = codes.contiguous();
  const int64_t N = c.size(0), K = c.size(1);
  auto out = torch::empty({N, K / 2}, torch::kUInt8);
  const int8_t* src = c.data_ptr<int8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < K / 64; ++b)
      for (int j = 0; j < 32; ++j) {
        uint8_t lo = uint8_t(src[n * K + b * 64 + j] + 8), hi = uint8_t(src[n * K + b * 64 + 32 + j] + 8);
        dst[n * (K / 2) + b * 32 + j] = uint8_t(lo | (hi << 4));
      }
  return out;
}

static inline __m512i unpack64(const uint8_t* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i m = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(v, m);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

// Rows n0..n0+3 of the output for activation rows m0..m0+MB-1: each 64-column block of the four
// weight rows is unpacked once and used for all MB activation rows.
template <int MB>
static void block(const int8_t* xs, const uint8_t* w, int32_t* y, const int32_t* xsum, int64_t m0, int64_t n0,
                  int64_t rows, int64_t K, int64_t N) {
  __m512i acc[MB][4];
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < 4; ++r) acc[i][r] = _mm512_setzero_si512();
  for (int64_t kb = 0; kb < K / 64; ++kb) {
    __m512i wv[4];
    for (int r = 0; r < 4; ++r) wv[r] = r < rows ? unpack64(w + (n0 + r) * (K / 2) + kb * 32) : _mm512_setzero_si512();
    for (int i = 0; i < MB; ++i) {
      const __m512i xv = _mm512_loadu_si512(xs + (m0 + i) * K + kb * 64);
      for (int r = 0; r < 4; ++r) acc[i][r] = _mm512_dpbusd_epi32(acc[i][r], wv[r], xv);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int64_t r = 0; r < rows; ++r) y[(m0 + i) * N + n0 + r] = _mm512_reduce_add_epi32(acc[i][r]) - xsum[m0 + i];
}

// x int8 [M, K], packed uint8 [N, K/2] -> int32 [M, N] = x @ codesᵀ
torch::Tensor mm(torch::Tensor x, torch::Tensor packed) {
  TORCH_CHECK(x.dtype() == torch::kInt8 && packed.dtype() == torch::kUInt8 && x.dim() == 2 && packed.dim() == 2);
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = packed.size(0);
  TORCH_CHECK(K % 64 == 0 && packed.size(1) * 2 == K && packed.is_contiguous());
  auto out = torch::empty({M, N}, torch::kInt32);
  const int8_t* xs = xc.data_ptr<int8_t>();
  const uint8_t* w = packed.data_ptr<uint8_t>();
  int32_t* y = out.data_ptr<int32_t>();
  std::vector<int32_t> xsum(M);
  for (int64_t m = 0; m < M; ++m) {
    int32_t s = 0;
    for (int64_t k = 0; k < K; ++k) s += xs[m * K + k];
    xsum[m] = 8 * s;
  }
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * 4, rows = std::min<int64_t>(4, N - n0);
      int64_t m0 = 0;
      for (; m0 + 4 <= M; m0 += 4) block<4>(xs, w, y, xsum.data(), m0, n0, rows, K, N);
      switch (M - m0) {
        case 3: block<3>(xs, w, y, xsum.data(), m0, n0, rows, K, N); break;
        case 2: block<2>(xs, w, y, xsum.data(), m0, n0, rows, K, N); break;
        case 1: block<1>(xs, w, y, xsum.data(), m0, n0, rows, K, N); break;
        default: break;
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("pack", &pack);
  mod.def("mm", &mm);
}
