// spgd_direct_conv3x3: a 3x3 'same' convolution with stride 1 of float32 operands on the CPU (AVX-512), as an
// XLA FFI handler: a direct convolution or Winograd's F(2x2, 3x3) or F(4x4, 3x3), with no im2col copy of the
// input. The attribute winograd is the Winograd output tile (2 or 4), or 0 for the direct sums.
//
// Built and registered by spgd_jax/xla_setup/direct_conv.py; called by spgd_jax/models/adm/_direct.py.
//   x      (..., H, W, C)       float32, row-major (NHWC)
//   kernel (..., 3, 3, C, D)    float32 (HWIO)
//   out    (..., H, W, D)       float32
//   tokens (...)               int32, from spgd_prepare_conv3x3_kernel of the same kernel (below)
//   then, with the attribute bias, bias (..., D) float32 (one per kernel), and with the attribute residual,
//   residual (..., H, W, D) float32 (one per image, or one group's images): out is (conv + bias) + residual,
//   added to each tile or row of the output as it is written (the same bits as XLA's additions after the call).
// With the attribute flipped, the call computes the input gradient of the convolution by `kernel`: kernel is then
// (..., 3, 3, D, C), and the convolution's is that kernel flipped in space with its in/out axes swapped.
// spgd_prepare_conv3x3_kernel(kernel, flipped, winograd, bf16_products) -> tokens prepares the kernels a convolution
// needs (flipped, in Winograd's form, its out channels padded to 16s), keeps them (up to kMaxKept), and returns one token per
// kernel (0 where the kernel is used as it is). A kept preparation is found again by the next preparation of the
// same kernel values (address, shape and a comparison of the values), or by its token: the convolution takes the
// tokens of its own kernel operand, so it needs no comparison, and where a token's preparation is gone it
// prepares the kernel again. A preparation depends on the weights only, so XLA hoists it out of a sampler's loops:
// the weights are compared once per call of the program, not at every step, and no copy is made at every step.
// The leading dims of x and out are the images. jax.vmap (vmap_method="expand_dims") may add leading dims to
// the kernel too: its leading dims (product G) then split out's images into G groups, each convolved with its
// own kernel, and x holds either the same G groups or one group shared by all (size 1 when expanded).
//
// Direct: each output pixel's D sums are float32 fused multiply-adds, in the order: taps (kh, kw) row-major, the
// input channels ascending within a tap. Taps that fall outside the image above or below are skipped; those left
// or right of it multiply zeros. A block of P consecutive pixels of a row times 16 * NZ output channels is held in
// AVX-512 registers for the whole sum. D not a multiple of 16 (an RGB output) is computed in 16s with a kernel
// padded with zeros, the extra channels not stored.
// Winograd F(2x2, 3x3) (winograd = 2; H and W even, C a multiple of 16): each 2x2 output tile is A^T M A with M = sum
// over c of (G g G^T) * (B^T d B), d the 4x4 input tile around it (zeros outside the image), g the kernel (Lavin &
// Gray 2016, "Fast Algorithms for Convolutional Neural Networks"): 16 products of (tiles, C) x (C, D) in place of
// the 9 taps' (pixels, C) x (C, D) for 4 output pixels, 2.25x fewer multiplies. The transforms' coefficients are 0,
// +-1 and +-1/2, so the result is the convolution to float32 round-off, as the direct sums are (in tests, closer to
// float64's).
// Winograd F(4x4, 3x3) (winograd = 4; H and W multiples of 4, C a multiple of 16): the same with 6x6 input tiles,
// 36 products for 16 output pixels in place of 144 (4x fewer multiplies than the direct sums). Its transforms'
// coefficients reach 8 (and 1/24 in the kernel's, computed in float64), so its error is about ten times F(2x2,
// 3x3)'s: still float32 round-off, about 1e-5 of the output's scale in tests.
// F(2x2, 3x3) with the attribute bf16_products (CPUs with AVX512-BF16: SpgdBf16ProductsSupported): the transformed
// tiles B^T d B and kernels G g G^T are rounded to bfloat16 (to nearest even) before the 16 products, which sum in
// float32 two input channels per instruction (AVX512-BF16's dot of pairs); the transforms stay float32. The error
// is then bfloat16's, that of `jax.default_matmul_precision("bfloat16")`, for about half the products' time.
// The work (rows, or tiles) is split into tasks on XLA's intra-op threads; every sum is computed by one thread in
// the same order, so results do not depend on the threads.
#include <immintrin.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "native_products.h"
#include "native_tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  int64_t height, width, in_channels, out_channels;
  int64_t kernel_channels;  // the kernel's out channels: out_channels, or (direct) rounded up to 16 with zeros
};

// Accumulate<NZ, P>(acc, x, x_stride, k, C, D) (native_products.h): acc[p][z] += sum over c < C of
// x[p * x_stride + c] * k[c * D + 16 z .. + 16], P pixels times 16 NZ output channels of a (C, D) kernel.
using spgd::Accumulate;

// out[p * stride + 16 z ..] = acc[p][z] for the first `count` pixels and the first `channels` channels.
template <int NZ, int P>
__attribute__((target("avx512f"))) inline void Store(const __m512 (&acc)[P][NZ], float* out, int64_t stride,
                                                      int count, int64_t channels = 16 * NZ) {
  for (int p = 0; p < count; ++p)
    for (int z = 0; z < NZ; ++z) {
      if (16 * z + 16 <= channels)
        _mm512_storeu_ps(out + p * stride + 16 * z, acc[p][z]);
      else if (16 * z < channels)
        _mm512_mask_storeu_ps(out + p * stride + 16 * z, static_cast<__mmask16>((1u << (channels - 16 * z)) - 1),
                              acc[p][z]);
    }
}

// Direct: out[p, d0 : d0 + 16 NZ] for the P pixels of a block, p < count and channels below D stored. `window`
// points at input row (h - 1 + kh_begin), column (w0 - 1), channel 0, and `row_stride` floats separate its rows;
// taps kh_begin .. kh_end - 1 are summed, with kernel rows from `kernel` (3, 3, C, kernel_channels) at d0.
template <int NZ, int P>
__attribute__((target("avx512f"))) void Block(const float* window, int64_t row_stride, int kh_begin, int kh_end,
                                               const float* kernel, int64_t d0, const Problem& pr, float* out,
                                               int count) {
  const int64_t C = pr.in_channels, D = pr.out_channels, KD = pr.kernel_channels;
  __m512 acc[P][NZ];
  for (int p = 0; p < P; ++p)
    for (int z = 0; z < NZ; ++z) acc[p][z] = _mm512_setzero_ps();
  for (int kh = kh_begin; kh < kh_end; ++kh)
    for (int kw = 0; kw < 3; ++kw)
      Accumulate<NZ, P>(acc, window + (kh - kh_begin) * row_stride + kw * C, C, kernel + (kh * 3 + kw) * C * KD + d0,
                        C, KD);
  Store<NZ, P>(acc, out + d0, D, count, D - d0);
}

// One output row h of one image: x (H, W, C) -> out (W, D). `strip` holds 3 x (P + 2) x C floats.
template <int NZ, int P>
void Row(const float* x, const float* kernel, float* out, int64_t h, const Problem& pr, float* strip) {
  const int64_t C = pr.in_channels, W = pr.width;
  const int kh_begin = h == 0 ? 1 : 0, kh_end = h == pr.height - 1 ? 2 : 3;
  const float* first_row = x + (h - 1 + kh_begin) * W * C;
  for (int64_t w0 = 0; w0 < W; w0 += P) {
    const int count = static_cast<int>(std::min<int64_t>(P, W - w0));
    for (int64_t d0 = 0; d0 < pr.kernel_channels; d0 += 16 * NZ) {
      if (w0 >= 1 && w0 + P + 1 <= W) {  // the block's window lies inside the image's columns
        Block<NZ, P>(first_row + (w0 - 1) * C, W * C, kh_begin, kh_end, kernel, d0, pr, out + w0 * pr.out_channels,
                     count);
        continue;
      }
      if (d0 == 0) {  // the window's columns w0 - 1 .. w0 + P, zero outside the image, once per block
        std::memset(strip, 0, sizeof(float) * 3 * (P + 2) * C);
        for (int kh = kh_begin; kh < kh_end; ++kh)
          for (int64_t j = 0; j < P + 2; ++j) {
            int64_t col = w0 - 1 + j;
            if (col >= 0 && col < W)
              std::memcpy(strip + ((kh - kh_begin) * (P + 2) + j) * C, first_row + ((kh - kh_begin) * W + col) * C,
                          sizeof(float) * C);
          }
      }
      Block<NZ, P>(strip, (P + 2) * C, kh_begin, kh_end, kernel, d0, pr, out + w0 * pr.out_channels, count);
    }
  }
}

// The images, groups and tasks of one call. Image i is convolved with group i / n's kernel; its input is x's image
// i (x_grouped) or i % n.
struct Batch {
  int64_t images, n;
  bool x_grouped;
  int64_t Input(int64_t image) const { return x_grouped ? image : image % n; }
};

// What the call adds to its output, where present: a bias per output channel (one per kernel group) and a
// residual shaped like the output (one per image, or one per image of a group shared by the groups as x is), as
// (out + bias) + residual: XLA's order for nn.Conv's bias and a residual added after it, so the same bits.
struct Addends {
  const float* bias = nullptr;      // (groups, D)
  const float* residual = nullptr;  // (images or n, H, W, D)
  bool residual_grouped = true;     // one residual per image (else image % n)
  bool Any() const { return bias != nullptr || residual != nullptr; }
  // Image `image`'s bias (D) and residual (from `offset` in its image of `image_out` floats), or null.
  const float* Bias(int64_t image, const Batch& b, int64_t D) const {
    return bias == nullptr ? nullptr : bias + image / b.n * D;
  }
  const float* Residual(int64_t image, const Batch& b, int64_t image_out, int64_t offset) const {
    return residual == nullptr ? nullptr : residual + (residual_grouped ? image : image % b.n) * image_out + offset;
  }
};

// out[p * D + d] = (out[p * D + d] + bias[d]) + residual[p * D + d] for `count` consecutive pixels of D
// channels, bias and residual each where not null: run on output pixels just written, while they are in cache.
__attribute__((target("avx512f"))) void AddTo(float* out, const float* bias, const float* residual, int64_t count,
                                               int64_t D) {
  for (int64_t p = 0; p < count; ++p)
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const __mmask16 mask = static_cast<__mmask16>(D - d0 >= 16 ? 0xffff : (1u << (D - d0)) - 1);
      float* o = out + p * D + d0;
      __m512 v = _mm512_maskz_loadu_ps(mask, o);
      if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + d0));
      if (residual != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, residual + p * D + d0));
      _mm512_mask_storeu_ps(o, mask, v);
    }
}

// Tasks for `flops` of work: about 2 MFLOP each at least (tens of microseconds), at most 8 and at most `units`.
int64_t Tasks(double flops, int64_t units) {
  return std::clamp<int64_t>(static_cast<int64_t>(flops / 2e6), 1, std::min<int64_t>(8, units));
}

template <int NZ, int P>
void DirectRows(ffi::ThreadPool pool, const float* x, const float* kernel, float* out, const Batch& b,
                const Problem& pr, const Addends& add) {
  const int64_t rows = b.images * pr.height;
  const int64_t tasks = Tasks(18.0 * rows * pr.width * pr.in_channels * pr.out_channels, rows);
  const int64_t image_in = pr.height * pr.width * pr.in_channels, image_out = pr.height * pr.width * pr.out_channels;
  const int64_t kernel_size = 9 * pr.in_channels * pr.kernel_channels;
  spgd::RunTasks(pool, tasks, [=](int64_t task) {
    std::vector<float> strip(3 * (P + 2) * pr.in_channels);
    for (int64_t r = rows * task / tasks; r < rows * (task + 1) / tasks; ++r) {
      const int64_t image = r / pr.height, h = r % pr.height;
      Row<NZ, P>(x + b.Input(image) * image_in, kernel + image / b.n * kernel_size,
                 out + image * image_out + h * pr.width * pr.out_channels, h, pr, strip.data());
      if (add.Any()) {
        const int64_t offset = h * pr.width * pr.out_channels;
        AddTo(out + image * image_out + offset, add.Bias(image, b, pr.out_channels),
              add.Residual(image, b, image_out, offset), pr.width, pr.out_channels);
      }
    }
  });
}

// Winograd's tasks take tiles of at least this many output pixels (one task takes all of fewer): 24 of F(2x2,
// 3x3)'s, 6 of F(4x4, 3x3)'s.
constexpr int64_t kMinTaskPixels = 96;

// Winograd F(2x2, 3x3): the kernel (3, 3, C, D) -> u (16, C, KD), u[4 i + j] = (G g G^T)[i][j] for every (c, d),
// G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]; u's channels d >= D are left as they are.
void WinogradKernel(const float* kernel, int64_t C, int64_t D, int64_t KD, float* u) {
  for (int64_t c = 0; c < C; ++c)
    for (int64_t d = 0; d < D; ++d) {
      float g[3][3], gg[4][3];
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) g[i][j] = kernel[((i * 3 + j) * C + c) * D + d];
      for (int j = 0; j < 3; ++j) {
        gg[0][j] = g[0][j];
        gg[1][j] = 0.5f * (g[0][j] + g[1][j] + g[2][j]);
        gg[2][j] = 0.5f * (g[0][j] - g[1][j] + g[2][j]);
        gg[3][j] = g[2][j];
      }
      for (int i = 0; i < 4; ++i) {
        const float row[4] = {gg[i][0], 0.5f * (gg[i][0] + gg[i][1] + gg[i][2]),
                              0.5f * (gg[i][0] - gg[i][1] + gg[i][2]), gg[i][2]};
        for (int j = 0; j < 4; ++j) u[((i * 4 + j) * C + c) * KD + d] = row[j];
      }
    }
}

// Winograd F(4x4, 3x3): the kernel (3, 3, C, D) -> u (36, C, KD), u[6 i + j] = (G g G^T)[i][j] for every (c, d),
// G = [[1/4, 0, 0], [-1/6, -1/6, -1/6], [-1/6, 1/6, -1/6], [1/24, 1/12, 1/6], [1/24, -1/12, 1/6], [0, 0, 1]],
// computed in float64 and rounded once; u's channels d >= D are left as they are.
void WinogradKernel4(const float* kernel, int64_t C, int64_t D, int64_t KD, float* u) {
  const auto transform = [](const double (&g)[3], double (&out)[6]) {
    out[0] = g[0] / 4;
    out[1] = -(g[0] + g[1] + g[2]) / 6;
    out[2] = -(g[0] - g[1] + g[2]) / 6;
    out[3] = g[0] / 24 + g[1] / 12 + g[2] / 6;
    out[4] = g[0] / 24 - g[1] / 12 + g[2] / 6;
    out[5] = g[2];
  };
  for (int64_t c = 0; c < C; ++c)
    for (int64_t d = 0; d < D; ++d) {
      double gg[6][3];
      for (int j = 0; j < 3; ++j) {
        double column[3], out[6];
        for (int i = 0; i < 3; ++i) column[i] = kernel[((i * 3 + j) * C + c) * D + d];
        transform(column, out);
        for (int i = 0; i < 6; ++i) gg[i][j] = out[i];
      }
      for (int i = 0; i < 6; ++i) {
        double row[6];
        transform(gg[i], row);
        for (int j = 0; j < 6; ++j) u[((i * 6 + j) * C + c) * KD + d] = static_cast<float>(row[j]);
      }
    }
}

// v[e * C + c] = value for e = 4 i + j: T = float stores it as it is; T = uint16_t rounds it to bfloat16 (to
// nearest even, as its bits).
template <class T>
__attribute__((target("avx512f,avx512bf16"))) inline void StoreTransformed(T* v, __m512 value) {
  if constexpr (std::is_same_v<T, uint16_t>)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(v), (__m256i)_mm512_cvtneps_pbh(value));
  else
    _mm512_storeu_ps(v, value);
}

// Whether the n x n tile of x whose top left pixel is (r0, col0) lies inside the image.
inline bool TileInside(int64_t r0, int64_t col0, int n, const Problem& pr) {
  return r0 >= 0 && r0 + n <= pr.height && col0 >= 0 && col0 + n <= pr.width;
}

// The 16 channels from c0 of pixel (r, col) of x (H, W, C), zero outside the image (`inside`: known inside).
__attribute__((target("avx512f"))) inline __m512 Pixel(const float* x, int64_t r, int64_t col, int64_t c0,
                                                        const Problem& pr, bool inside) {
  return inside || (r >= 0 && r < pr.height && col >= 0 && col < pr.width)
             ? _mm512_loadu_ps(x + (r * pr.width + col) * pr.in_channels + c0)
             : _mm512_setzero_ps();
}

// (B^T d)[0 .. 3] of four values d (a column or a row of a 4x4 tile), F(2x2, 3x3)'s
// B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
__attribute__((target("avx512f"))) inline void InputTransform(const __m512 (&d)[4], __m512 (&r)[4]) {
  r[0] = _mm512_sub_ps(d[0], d[2]);
  r[1] = _mm512_add_ps(d[1], d[2]);
  r[2] = _mm512_sub_ps(d[2], d[1]);
  r[3] = _mm512_sub_ps(d[1], d[3]);
}

// The 2x2 output pixels of one tile, out (2 rows `row_stride` floats apart, 2 pixels, D): A^T M A of
// M[e] = m[e * KD ..] (KD: D rounded up to 16), A^T = [[1, 1, 1, 0], [0, 1, -1, -1]].
__attribute__((target("avx512f"))) void OutputTile(const float* m, int64_t D, int64_t KD, float* out,
                                                    int64_t row_stride) {
  for (int64_t d0 = 0; d0 < KD; d0 += 16) {
    const __mmask16 mask = static_cast<__mmask16>(D - d0 >= 16 ? 0xffff : (1u << (D - d0)) - 1);
    __m512 t[4][4], s[2][4];
    for (int e = 0; e < 16; ++e) t[e / 4][e % 4] = _mm512_loadu_ps(m + e * KD + d0);
    for (int j = 0; j < 4; ++j) {
      s[0][j] = _mm512_add_ps(_mm512_add_ps(t[0][j], t[1][j]), t[2][j]);
      s[1][j] = _mm512_sub_ps(_mm512_sub_ps(t[1][j], t[2][j]), t[3][j]);
    }
    for (int i = 0; i < 2; ++i) {
      float* row = out + i * row_stride + d0;
      _mm512_mask_storeu_ps(row, mask, _mm512_add_ps(_mm512_add_ps(s[i][0], s[i][1]), s[i][2]));
      _mm512_mask_storeu_ps(row + D, mask, _mm512_sub_ps(_mm512_sub_ps(s[i][1], s[i][2]), s[i][3]));
    }
  }
}

// (B^T d)[0 .. 5] of six values d (a column or a row of a 6x6 tile), F(4x4, 3x3)'s B^T = [[4, 0, -5, 0, 1, 0],
// [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]].
__attribute__((target("avx512f"))) inline void InputTransform(const __m512 (&d)[6], __m512 (&r)[6]) {
  const __m512 four = _mm512_set1_ps(4.0f), minus_four = _mm512_set1_ps(-4.0f), minus_five = _mm512_set1_ps(-5.0f);
  const __m512 a = _mm512_fmadd_ps(minus_four, d[2], d[4]), b = _mm512_fmadd_ps(minus_four, d[1], d[3]);
  const __m512 c = _mm512_sub_ps(d[4], d[2]), e = _mm512_add_ps(_mm512_sub_ps(d[3], d[1]), _mm512_sub_ps(d[3], d[1]));
  r[0] = _mm512_fmadd_ps(four, d[0], _mm512_fmadd_ps(minus_five, d[2], d[4]));
  r[1] = _mm512_add_ps(a, b);
  r[2] = _mm512_sub_ps(a, b);
  r[3] = _mm512_add_ps(c, e);
  r[4] = _mm512_sub_ps(c, e);
  r[5] = _mm512_fmadd_ps(four, d[1], _mm512_fmadd_ps(minus_five, d[3], d[5]));
}

// v[e * C + c] for e = N i + j: (B^T d B)[i][j] of the N x N tile d of x (H, W, C) whose top left pixel is
// (r0, col0), zero outside the image, as the products' operand T (StoreTransformed): N = 4 for F(2x2, 3x3), 6 for
// F(4x4, 3x3) (InputTransform's B^T), first B^T down each column, then along each row.
template <int N, class T>
__attribute__((target("avx512f,avx512bf16"))) void InputTile(const float* x, int64_t r0, int64_t col0,
                                                              const Problem& pr, T* v) {
  const int64_t C = pr.in_channels;
  const bool inside = TileInside(r0, col0, N, pr);
  for (int64_t c0 = 0; c0 < C; c0 += 16) {
    __m512 s[N][N];  // s[i][j] = (B^T d)[i][j]
    for (int j = 0; j < N; ++j) {
      __m512 d[N], r[N];
      for (int i = 0; i < N; ++i) d[i] = Pixel(x, r0 + i, col0 + j, c0, pr, inside);
      InputTransform(d, r);
      for (int i = 0; i < N; ++i) s[i][j] = r[i];
    }
    for (int i = 0; i < N; ++i) {
      __m512 r[N];
      InputTransform(s[i], r);
      for (int j = 0; j < N; ++j) StoreTransformed(v + (N * i + j) * C + c0, r[j]);
    }
  }
}

// (A^T m)[0 .. 3] of six values m, A^T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
// [0, 1, -1, 8, -8, 1]].
__attribute__((target("avx512f"))) inline void OutputTransform6(const __m512 (&m)[6], __m512 (&o)[4]) {
  const __m512 p = _mm512_add_ps(m[1], m[2]), q = _mm512_sub_ps(m[1], m[2]);
  const __m512 r = _mm512_add_ps(m[3], m[4]), s = _mm512_sub_ps(m[3], m[4]);
  o[0] = _mm512_add_ps(_mm512_add_ps(m[0], p), r);
  o[1] = _mm512_fmadd_ps(_mm512_set1_ps(2.0f), s, q);
  o[2] = _mm512_fmadd_ps(_mm512_set1_ps(4.0f), r, p);
  o[3] = _mm512_add_ps(_mm512_fmadd_ps(_mm512_set1_ps(8.0f), s, q), m[5]);
}

// The 4x4 output pixels of one tile, out (4 rows `row_stride` floats apart, 4 pixels, D): A^T M A of
// M[e] = m[e * KD ..] (36 slices).
__attribute__((target("avx512f"))) void OutputTile4(const float* m, int64_t D, int64_t KD, float* out,
                                                     int64_t row_stride) {
  for (int64_t d0 = 0; d0 < KD; d0 += 16) {
    const __mmask16 mask = static_cast<__mmask16>(D - d0 >= 16 ? 0xffff : (1u << (D - d0)) - 1);
    __m512 s[4][6];  // s[i][j] = (A^T M)[i][j]
    for (int j = 0; j < 6; ++j) {
      __m512 column[6], o[4];
      for (int i = 0; i < 6; ++i) column[i] = _mm512_loadu_ps(m + (6 * i + j) * KD + d0);
      OutputTransform6(column, o);
      for (int i = 0; i < 4; ++i) s[i][j] = o[i];
    }
    for (int i = 0; i < 4; ++i) {
      __m512 o[4];
      OutputTransform6(s[i], o);
      for (int j = 0; j < 4; ++j) _mm512_mask_storeu_ps(out + i * row_stride + j * D + d0, mask, o[j]);
    }
  }
}

// m[(s * S + e) * KD ..] = v[(s * S + e) * C ..] (C) x u[e] (C, KD) for the S slices e and the tiles s < count
// (blocks of P tiles; the last block's extra rows of v are read, their products not stored). T: float, or uint16_t
// for bfloat16 operands, u[e] then in Accumulate's pair layout (C / 2, KD, 2). The bfloat16 instructions are
// called only where T is uint16_t (and the CPU has them: SpgdBf16ProductsSupported).
template <int S, int NZ, int P, class T>
__attribute__((target("avx512f,avx512bf16"))) void TileProducts(const T* v, const T* u, float* m, int count,
                                                                 const Problem& pr) {
  const int64_t C = pr.in_channels, KD = pr.kernel_channels;
  constexpr int64_t kLanes = std::is_same_v<T, uint16_t> ? 2 : 1;  // u's values per output channel
  for (int e = 0; e < S; ++e)
    for (int p0 = 0; p0 < count; p0 += P)
      for (int64_t d0 = 0; d0 < KD; d0 += 16 * NZ) {
        __m512 acc[P][NZ];
        for (int p = 0; p < P; ++p)
          for (int z = 0; z < NZ; ++z) acc[p][z] = _mm512_setzero_ps();
        Accumulate<NZ, P>(acc, v + (p0 * S + e) * C, S * C, u + e * C * KD + kLanes * d0, C, KD);
        Store<NZ, P>(acc, m + (p0 * S + e) * KD + d0, S * KD, std::min(P, count - p0));
      }
}

// Tiles (M x M output pixels, M = 2: F(2x2, 3x3), or 4: F(4x4, 3x3); S = (M + 2)^2 slices) are numbered over
// images, tile rows and tile columns. A chunk of up to `chunk` consecutive tiles of one kernel group is transformed
// into v (chunk, S, C), multiplied slice by slice with u (S, C, KD) into m (chunk, S, KD) and transformed back into
// out. T: the products' operands, float or uint16_t (bfloat16: v is rounded to bfloat16 as it is stored, u comes
// so).
template <int M, int NZ, int P, class T>
void WinogradTiles(ffi::ThreadPool pool, const float* x, const T* u, float* out, const Batch& b,
                   const Problem& pr, const Addends& add) {
  constexpr int S = (M + 2) * (M + 2);
  const int64_t C = pr.in_channels, D = pr.out_channels, KD = pr.kernel_channels, W = pr.width;
  const int64_t tile_cols = W / M, per_image = pr.height / M * tile_cols, tiles = b.images * per_image;
  // v and m of about 400 KB each at most (they stay in L2); a multiple of 24 tiles, so of every P.
  const int64_t chunk = std::clamp<int64_t>(196608 / S / std::max(C, KD) / 24 * 24, 24, 96);
  const int64_t image_in = pr.height * W * C, image_out = pr.height * W * D;
  const int64_t tasks = Tasks(2.0 * S * tiles * C * KD, std::max<int64_t>(1, tiles * M * M / kMinTaskPixels));
  spgd::RunTasks(pool, tasks, [=](int64_t task) {
    thread_local std::vector<T> v;
    thread_local std::vector<float> m;
    v.resize(std::max<size_t>(v.size(), S * chunk * C));
    m.resize(std::max<size_t>(m.size(), S * chunk * KD));
    for (int64_t t = tiles * task / tasks, end = tiles * (task + 1) / tasks; t < end;) {
      const int64_t group = t / per_image / b.n;
      const int64_t stop = std::min({t + chunk, end, (group + 1) * b.n * per_image});
      const int count = static_cast<int>(stop - t);
      for (int s = 0; s < count; ++s) {
        const int64_t image = (t + s) / per_image, tile = (t + s) % per_image;
        const float* xi = x + b.Input(image) * image_in;
        const int64_t r0 = M * (tile / tile_cols) - 1, col0 = M * (tile % tile_cols) - 1;
        InputTile<M + 2>(xi, r0, col0, pr, v.data() + s * S * C);
      }
      TileProducts<S, NZ, P>(v.data(), u + group * S * C * KD, m.data(), count, pr);
      for (int s = 0; s < count; ++s) {
        const int64_t image = (t + s) / per_image, tile = (t + s) % per_image;
        const int64_t offset = (M * (tile / tile_cols) * W + M * (tile % tile_cols)) * D;
        float* o = out + image * image_out + offset;
        if constexpr (M == 2)
          OutputTile(m.data() + s * S * KD, D, KD, o, W * D);
        else
          OutputTile4(m.data() + s * S * KD, D, KD, o, W * D);
        if (add.Any())
          for (int i = 0; i < M; ++i)  // the tile's rows of M pixels
            AddTo(o + i * W * D, add.Bias(image, b, D), add.Residual(image, b, image_out, offset + i * W * D), M, D);
      }
      t = stop;
    }
  });
}

// A kernel buffer prepared for the handler's loops: flipped in space with its in/out axes swapped (the input
// gradient's) or not, in Winograd's form (16, C, KD) or the direct sums' (3, 3, C, KD), its out channels padded
// with zeros to KD, a multiple of 16; in Winograd's form with bfloat16 products (bf16), rounded to bfloat16 in
// Accumulate's pair layout (16, C / 2, KD, 2) instead. Kept with the values it was made from: found again only for a kernel at the
// same address with the same shape, the same preparation and the same values.
struct Prepared {
  int32_t token;  // unique in the process, from 1
  const float* source;
  int64_t rows, cols;  // the source's (3, 3, rows, cols)
  bool flipped;
  int32_t winograd;  // the Winograd tile (2 or 4), or 0: the direct sums' form
  bool bf16;
  std::vector<float> values, data;
  std::vector<uint16_t> pairs;  // bf16: the bfloat16 bits of data's values, in pairs of input channels
};

// x rounded to bfloat16 (to nearest even, as _mm512_cvtneps_pbh does; a NaN stays a NaN), as its bits.
uint16_t Bfloat16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

constexpr size_t kMaxKept = 256;

std::mutex kept_mutex;
std::list<std::shared_ptr<const Prepared>> kept;  // most recently used first
int32_t last_token = 0;

// The kept preparation with this token, or null.
std::shared_ptr<const Prepared> Kept(int32_t token) {
  std::lock_guard<std::mutex> lock(kept_mutex);
  for (auto it = kept.begin(); it != kept.end(); ++it)
    if ((*it)->token == token) {
      kept.splice(kept.begin(), kept, it);
      return kept.front();
    }
  return nullptr;
}

std::shared_ptr<const Prepared> PreparedKernel(const float* kernel, int64_t rows, int64_t cols, bool flipped,
                                               int32_t winograd, bool bf16) {
  const size_t size = 9 * rows * cols;
  {
    std::lock_guard<std::mutex> lock(kept_mutex);
    for (auto it = kept.begin(); it != kept.end(); ++it) {
      const Prepared& f = **it;
      if (f.source == kernel && f.rows == rows && f.cols == cols && f.flipped == flipped && f.winograd == winograd && f.bf16 == bf16 &&
          std::memcmp(f.values.data(), kernel, sizeof(float) * size) == 0) {
        kept.splice(kept.begin(), kept, it);
        return kept.front();
      }
    }
  }
  auto made = std::make_shared<Prepared>(
      Prepared{0, kernel, rows, cols, flipped, winograd, bf16, std::vector<float>(kernel, kernel + size), {}, {}});
  std::vector<float> flips;
  const float* conv_kernel = kernel;  // (3, 3, in, out) of the convolution computed
  if (flipped) {
    flips.resize(size);
    for (int64_t tap = 0; tap < 9; ++tap) {
      const float* from = kernel + (8 - tap) * rows * cols;  // (2 - kh, 2 - kw)
      float* to = flips.data() + tap * rows * cols;
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j) to[j * rows + i] = from[i * cols + j];
    }
    conv_kernel = flips.data();
  }
  const int64_t in = flipped ? cols : rows, out = flipped ? rows : cols, padded = (out + 15) / 16 * 16;
  if (winograd) {
    const int64_t slices = (winograd + 2) * (winograd + 2);
    made->data.assign(slices * in * padded, 0.0f);
    (winograd == 2 ? WinogradKernel : WinogradKernel4)(conv_kernel, in, out, padded, made->data.data());
    if (bf16) {  // (S, in, padded) -> (S, in / 2, padded, 2)
      made->pairs.resize(made->data.size());
      for (int64_t e = 0; e < slices; ++e)
        for (int64_t c = 0; c < in; ++c)
          for (int64_t d = 0; d < padded; ++d)
            made->pairs[((e * in + c - c % 2) * padded + 2 * d) + c % 2] = Bfloat16(made->data[(e * in + c) * padded + d]);
      made->data.clear();
    }
  } else {
    made->data.assign(9 * in * padded, 0.0f);
    for (int64_t r = 0; r < 9 * in; ++r)
      std::copy(conv_kernel + r * out, conv_kernel + (r + 1) * out, made->data.begin() + r * padded);
  }
  std::lock_guard<std::mutex> lock(kept_mutex);
  made->token = last_token = last_token == INT32_MAX ? 1 : last_token + 1;
  kept.push_front(made);
  if (kept.size() > kMaxKept) kept.pop_back();
  return made;
}

int64_t Product(ffi::Span<const int64_t> dims, size_t count) {
  int64_t p = 1;
  for (size_t i = 0; i < count; ++i) p *= dims[i];
  return p;
}

// The prepared kernels' `values` (Prepared::data or ::pairs) of every group, one after another: one group's in place,
// several groups' copied into `grouped`.
template <class T>
const T* Concatenated(const std::vector<std::shared_ptr<const Prepared>>& prepared, std::vector<T> Prepared::*values,
                      std::vector<T>& grouped) {
  if (prepared.size() == 1) return ((*prepared[0]).*values).data();
  const size_t size = ((*prepared[0]).*values).size();
  grouped.resize(prepared.size() * size);
  for (size_t g = 0; g < prepared.size(); ++g)
    std::copy(((*prepared[g]).*values).begin(), ((*prepared[g]).*values).end(), grouped.begin() + g * size);
  return grouped.data();
}

// Whether the convolution by a kernel (..., 3, 3, rows, cols) takes a prepared copy of it.
bool NeedsPreparation(int64_t rows, int64_t cols, bool flipped, int32_t winograd) {
  return flipped || winograd || cols % 16 != 0;  // unflipped, cols are the out channels
}

ffi::Error Prepare(ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::S32> tokens, bool flipped, int32_t winograd,
                   bool bf16_products) {
  if (winograd != 0 && winograd != 2 && winograd != 4)
    return ffi::Error::InvalidArgument("spgd_prepare_conv3x3_kernel: winograd is a tile of 2 or 4, or 0");
  if (bf16_products && winograd != 2)
    return ffi::Error::InvalidArgument("spgd_prepare_conv3x3_kernel: bfloat16 products are F(2x2, 3x3)'s only");
  auto kd = kernel.dimensions();
  const size_t kr = kd.size();
  if (kr < 4 || kd[kr - 4] != 3 || kd[kr - 3] != 3)
    return ffi::Error::InvalidArgument("spgd_prepare_conv3x3_kernel: the kernel is not (..., 3, 3, in, out)");
  const int64_t groups = Product(kd, kr - 4), rows = kd[kr - 2], cols = kd[kr - 1];
  if (tokens->element_count() != static_cast<size_t>(groups))
    return ffi::Error::InvalidArgument("spgd_prepare_conv3x3_kernel: one token per kernel");
  for (int64_t g = 0; g < groups; ++g)
    tokens->typed_data()[g] = NeedsPreparation(rows, cols, flipped, winograd) && rows * cols > 0
        ? PreparedKernel(kernel.typed_data() + g * 9 * rows * cols, rows, cols, flipped, winograd, bf16_products)->token
        : 0;
  return ffi::Error::Success();
}

ffi::Error Conv3x3(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::Buffer<ffi::S32> tokens, ffi::RemainingArgs addends, ffi::ResultBuffer<ffi::F32> out,
                   bool flipped, int32_t winograd, bool bf16_products, bool bias, bool residual) {
  auto xd = x.dimensions(), kd = kernel.dimensions(), od = out->dimensions();
  if (xd.size() < 4 || kd.size() < 4 || od.size() < 4) return ffi::Error::InvalidArgument("rank below 4");
  size_t xr = xd.size(), kr = kd.size(), orank = od.size();
  // The convolution's own kernel is (3, 3, in, out); flipped, the buffer holds (3, 3, out, in).
  const int64_t k_in = kd[kr - (flipped ? 1 : 2)], k_out = kd[kr - (flipped ? 2 : 1)];
  Problem pr{xd[xr - 3], xd[xr - 2], xd[xr - 1], k_out, (k_out + 15) / 16 * 16};
  if (kd[kr - 4] != 3 || kd[kr - 3] != 3 || k_in != pr.in_channels || od[orank - 3] != pr.height ||
      od[orank - 2] != pr.width || od[orank - 1] != pr.out_channels)
    return ffi::Error::InvalidArgument("shapes do not make a 3x3 'same' convolution");
  if (winograd != 0 && winograd != 2 && winograd != 4)
    return ffi::Error::InvalidArgument("winograd is a tile of 2 or 4, or 0 (the direct sums)");
  if (bf16_products && winograd != 2) return ffi::Error::InvalidArgument("bfloat16 products are F(2x2, 3x3)'s only");
  if (winograd && (pr.height % winograd != 0 || pr.width % winograd != 0 || pr.in_channels % 16 != 0))
    return ffi::Error::InvalidArgument("winograd needs a height and width that are multiples of its tile and in "
                                       "channels a multiple of 16");
  int64_t x_images = Product(xd, xr - 3), groups = Product(kd, kr - 4), images = Product(od, orank - 3);
  if (images == 0) return ffi::Error::Success();
  if (images % groups != 0 || (x_images != images && x_images * groups != images))
    return ffi::Error::InvalidArgument("batch dims of x, kernel and out do not match");
  const Batch batch{images, images / groups, x_images == images};
  if (addends.size() != static_cast<size_t>(bias) + static_cast<size_t>(residual))
    return ffi::Error::InvalidArgument("one operand after the tokens per addend: the bias, then the residual");
  Addends add;
  if (bias) {
    auto operand = addends.get<ffi::Buffer<ffi::F32>>(0);
    if (!operand.has_value()) return ffi::Error::InvalidArgument("the bias is not a float32 buffer");
    auto bd = operand->dimensions();
    if (bd.size() == 0 || bd[bd.size() - 1] != pr.out_channels || Product(bd, bd.size() - 1) != groups)
      return ffi::Error::InvalidArgument("the bias is not (..., out channels), one per kernel");
    add.bias = operand->typed_data();
  }
  if (residual) {
    auto operand = addends.get<ffi::Buffer<ffi::F32>>(bias ? 1 : 0);
    if (!operand.has_value()) return ffi::Error::InvalidArgument("the residual is not a float32 buffer");
    auto rd = operand->dimensions();
    const int64_t residual_images = rd.size() < 3 ? -1 : Product(rd, rd.size() - 3);
    if (rd.size() < 3 || rd[rd.size() - 3] != pr.height || rd[rd.size() - 2] != pr.width ||
        rd[rd.size() - 1] != pr.out_channels || (residual_images != images && residual_images != batch.n))
      return ffi::Error::InvalidArgument("the residual is not shaped as the output (or one group's images)");
    add.residual = operand->typed_data();
    add.residual_grouped = residual_images == images;
  }
  if (pr.in_channels == 0) {  // no products: the output is the addends alone
    const int64_t image_out = pr.height * pr.width * pr.out_channels;
    std::fill_n(out->typed_data(), out->element_count(), 0.0f);
    for (int64_t image = 0; add.Any() && image < images; ++image)
      AddTo(out->typed_data() + image * image_out, add.Bias(image, batch, pr.out_channels),
            add.Residual(image, batch, image_out, 0), pr.height * pr.width, pr.out_channels);
    return ffi::Error::Success();
  }
  const float *xp = x.typed_data(), *kp = kernel.typed_data();
  float* op = out->typed_data();
  const int64_t kernel_size = 9 * pr.in_channels * pr.out_channels;
  std::vector<std::shared_ptr<const Prepared>> prepared;  // held until the convolutions are done
  std::vector<float> grouped;
  std::vector<uint16_t> grouped_pairs;
  const uint16_t* pairs = nullptr;  // bf16_products: the kernels in bfloat16 pairs
  if (NeedsPreparation(kd[kr - 2], kd[kr - 1], flipped, winograd)) {
    if (tokens.element_count() != static_cast<size_t>(groups))
      return ffi::Error::InvalidArgument("one token per kernel: spgd_prepare_conv3x3_kernel's of this kernel");
    for (int64_t g = 0; g < groups; ++g) {
      auto found = Kept(tokens.typed_data()[g]);  // made from this kernel operand's values: no comparison needed
      if (found == nullptr || found->rows != kd[kr - 2] || found->cols != kd[kr - 1] || found->flipped != flipped ||
          found->winograd != winograd || found->bf16 != bf16_products)
        found = PreparedKernel(kp + g * kernel_size, kd[kr - 2], kd[kr - 1], flipped, winograd, bf16_products);
      prepared.push_back(std::move(found));
    }
    if (bf16_products)
      pairs = Concatenated(prepared, &Prepared::pairs, grouped_pairs);
    else
      kp = Concatenated(prepared, &Prepared::data, grouped);
  }
  const auto run = [&](auto nz, auto p) {
    constexpr int NZ = decltype(nz)::value, P = decltype(p)::value;
    if (bf16_products)
      WinogradTiles<2, NZ, P>(pool, xp, pairs, op, batch, pr, add);
    else if (winograd == 2)
      WinogradTiles<2, NZ, P>(pool, xp, kp, op, batch, pr, add);
    else if (winograd == 4)
      WinogradTiles<4, NZ, P>(pool, xp, kp, op, batch, pr, add);
    else
      DirectRows<NZ, P>(pool, xp, kp, op, batch, pr, add);
  };
  if (pr.kernel_channels % 64 == 0)
    run(std::integral_constant<int, 4>(), std::integral_constant<int, 6>());
  else if (pr.kernel_channels % 32 == 0)
    run(std::integral_constant<int, 2>(), std::integral_constant<int, 12>());
  else
    run(std::integral_constant<int, 1>(), std::integral_constant<int, 24>());
  return ffi::Error::Success();
}

}  // namespace

// Whether this CPU runs the handler's instructions (AVX-512F).
extern "C" int SpgdDirectConvSupported() { return __builtin_cpu_supports("avx512f") ? 1 : 0; }

// Whether it runs the bfloat16 products too (AVX512-BF16).
extern "C" int SpgdBf16ProductsSupported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16") ? 1 : 0;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpgdPrepareConv3x3Kernel, Prepare,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<bool>("flipped")
                                  .Attr<int32_t>("winograd")
                                  .Attr<bool>("bf16_products"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpgdDirectConv3x3, Conv3x3,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("flipped")
                                  .Attr<int32_t>("winograd")
                                  .Attr<bool>("bf16_products")
                                  .Attr<bool>("bias")
                                  .Attr<bool>("residual"));
