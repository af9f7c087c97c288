// quadllm::w4a8_mm and quadllm::w8a8_mm: INT8 activation codes x INT4 or INT8 weight codes -> the exact
// int32 sums, for the few rows of a decode step, with AVX512-VNNI (vpdpbusd: unsigned bytes x signed
// bytes, four products per int32 lane). cpu-int4 runs w4a8_mm where it builds, the w8a8 head w8a8_mm
// (quadllm/backends/vnni.py); torch's own INT4 GEMM rounds each sum to bfloat16 (speeds of both:
// scripts/int4_gemv_probe.py).
//
// Weight layouts (quadllm.backends.vnni.pack_w4 / pack_w8): tiles of four output rows whose 64-column
// blocks follow each other, so a thread reads its tiles as one sequential stream, which the hardware
// prefetchers follow (a decode step streams every weight from memory).
// - INT4, uint8 [N/4, Kp/64, 2, 64] (N rounded up to 4, Kp = K to 64): a block holds two 64-byte
//   vectors, rows 0/1 and rows 2/3 of the tile: byte j of a vector holds the first row's code for
//   column j (+ 8) in its low nibble and the second row's in its high one, so two masks and a shift
//   give both rows' 64 codes in the order of the activations.
// - INT8, uint8 [N/4, Kp/64, 4, 64]: a block holds the four rows' 64 codes (+ 128), one vector each.
// The unsigned weights make each sum 8 (INT4) or 128 (INT8) * sum(x) too large, corrected once per row
// of x. Columns past K and rows past N hold code 0; the columns are read against zero activations
// (masked loads), the rows are not written.
//
// quadllm::f16_mm: float32 x [M, r] times float16 weights [N, r] (the outlier columns, stored in
// float16 by checkpoints) -> float32 [M, N], for the same few rows. Layout (pack_f16): half
// [N/16, r, 16], each block of 16 output columns contiguous; a column of x is broadcast and
// multiplied into 16 outputs at once (no horizontal sums). The products are exact in float32; only
// the order of the float32 additions differs from a float32 GEMM's.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace {

// The sums of four int32 vectors' lanes, in lanes 0..3: pairwise interleaved adds, then the four
// 128-bit quarters added (fewer instructions than four separate full reductions).
inline __m128i reduce4(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
  const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
  const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
  // per 128-bit quarter: [a0, a1, a2, a3] partial sums
  const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// Output columns 4t..4t+rows-1 (tile t, rows <= 4) for activation rows m0..m0+MB-1: each block of the
// tile is unpacked once and used for all MB activation rows.
template <int BITS, int MB>
void tile(const int8_t* xs, const uint8_t* w, int32_t* y, const int32_t* xsum, int64_t m0, int64_t t,
          int64_t rows, int64_t K, int64_t N) {
  const int64_t blocks = (K + 63) / 64;
  constexpr int64_t stride = BITS == 4 ? 128 : 256;  // bytes of one block of a tile
  const uint8_t* wt = w + t * blocks * stride;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512i acc[MB][4];
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < 4; ++r) acc[i][r] = _mm512_setzero_si512();
  for (int64_t kb = 0; kb < blocks; ++kb) {
    const uint8_t* wb = wt + kb * stride;
    __m512i wv[4];
    if constexpr (BITS == 4) {
      const __m512i v01 = _mm512_loadu_si512(wb), v23 = _mm512_loadu_si512(wb + 64);
      wv[0] = _mm512_and_si512(v01, low);
      wv[1] = _mm512_and_si512(_mm512_srli_epi16(v01, 4), low);
      wv[2] = _mm512_and_si512(v23, low);
      wv[3] = _mm512_and_si512(_mm512_srli_epi16(v23, 4), low);
    } else {
      for (int r = 0; r < 4; ++r) wv[r] = _mm512_loadu_si512(wb + r * 64);
    }
    const int64_t left = K - kb * 64;
    const __mmask64 mask = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
    for (int i = 0; i < MB; ++i) {
      const __m512i xv = _mm512_maskz_loadu_epi8(mask, xs + (m0 + i) * K + kb * 64);
      for (int r = 0; r < 4; ++r) acc[i][r] = _mm512_dpbusd_epi32(acc[i][r], wv[r], xv);
    }
  }
  const __mmask8 keep = __mmask8((1u << rows) - 1);
  for (int i = 0; i < MB; ++i) {
    const __m128i sums = _mm_sub_epi32(reduce4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]),
                                       _mm_set1_epi32(xsum[m0 + i]));
    _mm_mask_storeu_epi32(y + (m0 + i) * N + t * 4, keep, sums);
  }
}

// x int8 [M, K], packed uint8 [ceil(N/4), Kp/64, 2 (INT4) or 4 (INT8), 64] -> int32 [M, n] = x @ codesᵀ
template <int BITS>
at::Tensor wxa8_mm(const char* name, const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  constexpr int64_t vectors = BITS == 4 ? 2 : 4, offset = BITS == 4 ? 8 : 128;
  TORCH_CHECK(x.scalar_type() == at::kChar && x.dim() == 2, name, ": x must be int8 [M, K]");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 4 && packed.size(2) == vectors &&
              packed.size(3) == 64 && packed.is_contiguous(),
              name, ": packed must be contiguous uint8 [N/4, K/64, ", vectors, ", 64]");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = n, tiles = packed.size(0);
  TORCH_CHECK(packed.size(1) == (K + 63) / 64, name, ": packed blocks ", packed.size(1), " do not fit K = ", K);
  TORCH_CHECK((N + 3) / 4 == tiles, name, ": packed tiles ", tiles, " do not fit n = ", N);
  at::Tensor out = at::empty({M, N}, xc.options().dtype(at::kInt));
  const int8_t* xs = xc.data_ptr<int8_t>();
  const uint8_t* w = packed.data_ptr<uint8_t>();
  int32_t* y = out.data_ptr<int32_t>();
  std::vector<int32_t> xsum(M);
  for (int64_t m = 0; m < M; ++m) {
    int32_t s = 0;
    for (int64_t k = 0; k < K; ++k) s += xs[m * K + k];
    xsum[m] = int32_t(offset) * s;
  }
  // contiguous ranges of tiles per thread (16 tiles at least: enough work per task)
  at::parallel_for(0, tiles, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t rows = std::min<int64_t>(4, N - t * 4);
      int64_t m0 = 0;
      for (; m0 + 4 <= M; m0 += 4) tile<BITS, 4>(xs, w, y, xsum.data(), m0, t, rows, K, N);
      switch (M - m0) {
        case 3: tile<BITS, 3>(xs, w, y, xsum.data(), m0, t, rows, K, N); break;
        case 2: tile<BITS, 2>(xs, w, y, xsum.data(), m0, t, rows, K, N); break;
        case 1: tile<BITS, 1>(xs, w, y, xsum.data(), m0, t, rows, K, N); break;
        default: break;
      }
    }
  });
  return out;
}

at::Tensor w4a8_mm(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  return wxa8_mm<4>("w4a8_mm", x, packed, n);
}

at::Tensor w8a8_mm(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  return wxa8_mm<8>("w8a8_mm", x, packed, n);
}

template <int MB>
void f16_block(const float* x, const uint16_t* w, float* y, int64_t m0, int64_t b, int64_t r, int64_t N) {
  const uint16_t* wb = w + b * r * 16;
  __m512 acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < r; ++k) {
    const __m512 wv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + k * 16)));
    for (int i = 0; i < MB; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(x[(m0 + i) * r + k]), wv, acc[i]);
  }
  const int64_t cols = std::min<int64_t>(16, N - b * 16);
  const __mmask16 keep = __mmask16((1u << cols) - 1);
  for (int i = 0; i < MB; ++i) _mm512_mask_storeu_ps(y + (m0 + i) * N + b * 16, keep, acc[i]);
}

// x float32 [M, r], packed half [ceil(N/16), r, 16] -> float32 [M, n] = x @ wᵀ
at::Tensor f16_mm(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "f16_mm: x must be float32 [M, r]");
  TORCH_CHECK(packed.scalar_type() == at::kHalf && packed.dim() == 3 && packed.size(2) == 16 &&
              packed.is_contiguous(), "f16_mm: packed must be contiguous float16 [N/16, r, 16]");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), r = xc.size(1), N = n, blocks = packed.size(0);
  TORCH_CHECK(packed.size(1) == r, "f16_mm: packed has ", packed.size(1), " columns, x has ", r);
  TORCH_CHECK((N + 15) / 16 == blocks, "f16_mm: packed blocks ", blocks, " do not fit n = ", N);
  at::Tensor out = at::empty({M, N}, xc.options());
  const float* xs = xc.data_ptr<float>();
  const uint16_t* w = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::Half>());
  float* y = out.data_ptr<float>();
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t m0 = 0;
      for (; m0 + 4 <= M; m0 += 4) f16_block<4>(xs, w, y, m0, b, r, N);
      switch (M - m0) {
        case 3: f16_block<3>(xs, w, y, m0, b, r, N); break;
        case 2: f16_block<2>(xs, w, y, m0, b, r, N); break;
        case 1: f16_block<1>(xs, w, y, m0, b, r, N); break;
        default: break;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(quadllm, m) {
  m.def("w4a8_mm(Tensor x, Tensor packed, int n) -> Tensor");
  m.def("w8a8_mm(Tensor x, Tensor packed, int n) -> Tensor");
  m.def("f16_mm(Tensor x, Tensor packed, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(quadllm, CPU, m) {
  m.impl("w4a8_mm", &w4a8_mm);
  m.impl("w8a8_mm", &w8a8_mm);
  m.impl("f16_mm", &f16_mm);
}
