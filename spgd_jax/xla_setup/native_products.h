// The register-blocked AVX-512 products that spgd_jax's FFI handlers share (direct_conv.cc, attention.cc): float32
// operands, or bfloat16 ones (AVX512-BF16), both with float32 sums.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace spgd {

// acc[p][z] += sum over k < K of x[p * x_stride + k] * y[k * D + 16 z .. + 16]: P rows of x times 16 NZ columns of
// a row-major (K, D) matrix y, k ascending, in float32 fused multiply-adds (an element of x broadcast, 16 columns
// of y a vector). The caller holds acc in registers: P * NZ + NZ + 1 of the 32 vector registers.
template <int NZ, int P>
__attribute__((target("avx512f"))) inline void Accumulate(__m512 (&acc)[P][NZ], const float* x, int64_t x_stride,
                                                           const float* y, int64_t K, int64_t D) {
  for (int64_t k = 0; k < K; ++k) {
    __m512 w[NZ];
    for (int z = 0; z < NZ; ++z) w[z] = _mm512_loadu_ps(y + k * D + 16 * z);
    for (int p = 0; p < P; ++p) {
      __m512 s = _mm512_set1_ps(x[p * x_stride + k]);
      for (int z = 0; z < NZ; ++z) acc[p][z] = _mm512_fmadd_ps(s, w[z], acc[p][z]);
    }
  }
}

// acc[p][z] += sum over k < K of x[p * x_stride + k] * y[k][16 z .. + 16] in bfloat16 operands (uint16_t bits) with
// float32 sums: y is (K / 2, D, 2), each pair of rows k = 2 k2, 2 k2 + 1 interleaved, K even. AVX512-BF16's dot of
// pairs adds both products of a pair to acc per instruction (products of bfloat16s are exact in float32), k2
// ascending; twice the multiplies of Accumulate per instruction.
template <int NZ, int P>
__attribute__((target("avx512f,avx512bf16"))) inline void Accumulate(__m512 (&acc)[P][NZ], const uint16_t* x,
                                                                      int64_t x_stride, const uint16_t* y, int64_t K,
                                                                      int64_t D) {
  for (int64_t k2 = 0; k2 < K / 2; ++k2) {
    __m512bh w[NZ];
    for (int z = 0; z < NZ; ++z) w[z] = (__m512bh)_mm512_loadu_si512(y + (k2 * D + 16 * z) * 2);
    for (int p = 0; p < P; ++p) {
      int32_t pair;
      __builtin_memcpy(&pair, x + p * x_stride + 2 * k2, sizeof(pair));
      const __m512bh s = (__m512bh)_mm512_set1_epi32(pair);
      for (int z = 0; z < NZ; ++z) acc[p][z] = _mm512_dpbf16_ps(acc[p][z], s, w[z]);
    }
  }
}

}  // namespace spgd
