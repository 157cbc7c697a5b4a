// The register-blocked AVX-512 product that spgd_jax's float32 FFI handlers share (direct_conv.cc, attention.cc).
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

}  // namespace spgd
