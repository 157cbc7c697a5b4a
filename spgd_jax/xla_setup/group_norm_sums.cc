// GroupNorm32's passes over the activations on the CPU, as four XLA FFI handlers: what XLA:CPU splits into chains
// of reduce-windows, or into several loops that each store a full-size array, read here once per pass.
//
// Built and registered by spgd_jax/xla_setup/group_norm_kernels.py; called by spgd_jax/models/adm/_group_norm.py.
// Row-major float32 buffers; the leading dims (product N, as many as the results have before their last) are
// the images, the dims after them (product P, at least one) the positions, C the channels, G the groups (C a
// multiple of G, consecutive channels per group). The activations come in their own shape, e.g. (..., H, W, C):
// a reshape to (..., P, C) before the call would make XLA:CPU compute them a second time for the call.
// x... (the last arguments) are the activations in 1 to kMaxParts parts side by side along the channels, (..., P...,
// C_q) with the same leading dims and sum C_q = C: the UNet's output blocks pass the skip concatenation's halves
// as they are, so that the concatenation is never stored. Results are the same as for the joined x (bit for bit
// where the parts come in 16s of channels; else the vector loops' remainders differ by float32 round-off).
//   spgd_group_norm_moments  x...                             -> mean (..., G), rstd (..., G)
//       mean = the group's mean; rstd = 1 / sqrt(mean((x - mean)^2) + eps), two passes (attribute eps)
//   spgd_group_norm_sums     g (..., P, C), x (..., P, C), mean (..., G) -> s1 (..., C), s2 (..., C)
//       per channel, s1 = sum_p g and s2 = sum_p g * (x - mean of its group)
//   spgd_group_norm_silu     m, a, b (..., C), x...           -> h (..., P, C)
//       h = silu(y) = y * sigmoid(y), y = (x - m) * a + b per channel: the normalisation (and a scale-shift)
//       as one affine map per image and channel, and SiLU, in one pass
//   spgd_group_norm_silu_grad g (..., P, C), m, a, b, x...     -> s1 (..., C), s2 (..., C), dx... (x's parts)
//       dy = g * silu'(y) (y recomputed from x), dx = dy * a, s1 = sum_p dy, s2 = sum_p dy * (x - m)
// The sigmoid is 1 / (1 + e^-y) with e^t from Cephes' expf (ExpClampedOf): within a few float32 ulp of XLA's.
// Each task on XLA's intra-op thread pool takes whole rows: one of up to 8 consecutive parts of an image's
// positions (PositionParts, decided by the shape alone). Sums run in float32 vectors over blocks of 64 positions,
// in float64 across the blocks and then across the parts in order, so results do not depend on the threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "native_tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 64;  // positions summed in float32 before the float64 total
constexpr int kMaxParts = 4;    // the activations' parts along the channels, at most

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPGD_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SPGD_VECTOR_CLONES
#endif

// The row loops below run over `rows` consecutive rows of `width` channels, each operand's rows its `..._stride`
// floats apart (the width, or C for a part of a row); the per-channel values (mu, m, a, b) and the sums (acc) have
// `width` entries.

// 16 float32 values: one AVX-512 vector (two AVX2, four SSE ones in the other clones).
typedef float Vec16 __attribute__((vector_size(64)));
inline Vec16 Load16(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void Store16(float* p, Vec16 v) { std::memcpy(p, &v, sizeof v); }

// AddRows of 16 * NV channels, their sums kept in registers across the rows (the same additions in the same order
// per channel as row by row through memory).
template <int NV>
__attribute__((always_inline)) inline void AddRowsInRegisters(const float* x, int64_t x_stride, int64_t rows,
                                                              const float* mu, float* acc) {
  Vec16 sum[NV], center[NV];
  for (int v = 0; v < NV; ++v) sum[v] = Load16(acc + 16 * v), center[v] = mu == nullptr ? Vec16{} : Load16(mu + 16 * v);
  if (mu == nullptr) {
    for (int64_t k = 0; k < rows; ++k)
      for (int v = 0; v < NV; ++v) sum[v] += Load16(x + k * x_stride + 16 * v);
  } else {
    for (int64_t k = 0; k < rows; ++k)
      for (int v = 0; v < NV; ++v) {
        const Vec16 t = Load16(x + k * x_stride + 16 * v) - center[v];
        sum[v] += t * t;
      }
  }
  for (int v = 0; v < NV; ++v) Store16(acc + 16 * v, sum[v]);
}

// acc[j] += sum of x[j], or of (x[j] - mu[j])^2 when `mu` is given.
SPGD_VECTOR_CLONES void AddRows(const float* x, int64_t x_stride, int64_t rows, int64_t width, const float* mu,
                                float* acc) {
  int64_t j0 = 0;
  while (width - j0 >= 16) {  // up to 128 channels at a time in registers
    const int64_t vectors = std::min<int64_t>(8, (width - j0) / 16);
    const float* part_mu = mu == nullptr ? nullptr : mu + j0;
    switch (vectors) {
      case 1: AddRowsInRegisters<1>(x + j0, x_stride, rows, part_mu, acc + j0); break;
      case 2: AddRowsInRegisters<2>(x + j0, x_stride, rows, part_mu, acc + j0); break;
      case 3: AddRowsInRegisters<3>(x + j0, x_stride, rows, part_mu, acc + j0); break;
      case 4: AddRowsInRegisters<4>(x + j0, x_stride, rows, part_mu, acc + j0); break;
      case 5: AddRowsInRegisters<5>(x + j0, x_stride, rows, part_mu, acc + j0); break;
      case 6: AddRowsInRegisters<6>(x + j0, x_stride, rows, part_mu, acc + j0); break;
      case 7: AddRowsInRegisters<7>(x + j0, x_stride, rows, part_mu, acc + j0); break;
      default: AddRowsInRegisters<8>(x + j0, x_stride, rows, part_mu, acc + j0); break;
    }
    j0 += 16 * vectors;
  }
  if (j0 >= width) return;
  x += j0, acc += j0, mu = mu == nullptr ? nullptr : mu + j0, width -= j0;  // the last channels (fewer than 16)
  for (int64_t k = 0; k < rows; ++k) {
    const float* row = x + k * x_stride;
    if (mu == nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) acc[j] += row[j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        float t = row[j] - mu[j];
        acc[j] += t * t;
      }
    }
  }
}

// acc1[j] += sum of g[j]; acc2[j] += sum of g[j] * (x[j] - mu[j]).
SPGD_VECTOR_CLONES void AddProducts(const float* g, const float* x, int64_t rows, int64_t width, const float* mu,
                                    float* acc1, float* acc2) {
  for (int64_t k = 0; k < rows; ++k) {
    const float* gr = g + k * width;
    const float* xr = x + k * width;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      acc1[j] += gr[j];
      acc2[j] += gr[j] * (xr[j] - mu[j]);
    }
  }
}

typedef int32_t Int16 __attribute__((vector_size(64)));  // 16 int32 values, Vec16's bits

// e^t for t clamped to [-87, 88] (the clamp keeps 2^n a normal float): Cephes' expf, t = n ln 2 + r with
// |r| <= ln 2 / 2 and a degree-6 polynomial for e^r; branch-free, so that the loops below vectorise. T: float
// (I: int32_t), or Vec16 (I: Int16) for 16 values at once, the same operations in the same order.
template <class T, class I>
__attribute__((always_inline)) inline T ExpClampedOf(T t) {
  t = t < -87.0f ? T{} - 87.0f : (t > 88.0f ? T{} + 88.0f : t);  // (NaN stays NaN: y carries it on)
  const T n = (t * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // rounded to an integer: 1.5 * 2^23
  const T r = (t - n * 0.693359375f) + n * 2.12194440e-4f;
  T p = T{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  I bits;
  if constexpr (std::is_same_v<T, float>)
    bits = (static_cast<int32_t>(n) + 127) << 23;
  else
    bits = (__builtin_convertvector(n, I) + 127) << 23;
  T two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

inline float Sigmoid(float y) { return 1.0f / (1.0f + ExpClampedOf<float, int32_t>(-y)); }
__attribute__((always_inline)) inline Vec16 Sigmoid(Vec16 y) { return 1.0f / (1.0f + ExpClampedOf<Vec16, Int16>(-y)); }

// h[j] = silu((x[j] - m[j]) * a[j] + b[j]).
SPGD_VECTOR_CLONES void SiluRows(const float* x, int64_t x_stride, int64_t rows, int64_t width, const float* m,
                                 const float* a, const float* b, float* h, int64_t h_stride) {
  for (int64_t k = 0; k < rows; ++k) {
    const float* xr = x + k * x_stride;
    float* hr = h + k * h_stride;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      const float y = (xr[j] - m[j]) * a[j] + b[j];
      hr[j] = y * Sigmoid(y);
    }
  }
}

// SiluGradRows of 16 * NV channels, their sums kept in registers across the rows: the row loop's operations per
// channel, on 16 values at once (GCC contracts them into fused multiply-adds a little differently: float32
// round-off apart, as close to float64; 1.2-1.45x faster).
template <int NV>
__attribute__((always_inline)) inline void SiluGradRowsInRegisters(const float* g, int64_t g_stride, const float* x,
                                                                   int64_t x_stride, int64_t rows, const float* m,
                                                                   const float* a, const float* b, float* dx,
                                                                   float* acc1, float* acc2) {
  Vec16 sum1[NV], sum2[NV], mv[NV], av[NV], bv[NV];
  for (int v = 0; v < NV; ++v) {
    sum1[v] = Load16(acc1 + 16 * v), sum2[v] = Load16(acc2 + 16 * v);
    mv[v] = Load16(m + 16 * v), av[v] = Load16(a + 16 * v), bv[v] = Load16(b + 16 * v);
  }
  for (int64_t k = 0; k < rows; ++k)
    for (int v = 0; v < NV; ++v) {
      const Vec16 d = Load16(x + k * x_stride + 16 * v) - mv[v], y = d * av[v] + bv[v], s = Sigmoid(y);
      const Vec16 dy = Load16(g + k * g_stride + 16 * v) * (s * (1.0f + y * (1.0f - s)));
      Store16(dx + k * x_stride + 16 * v, dy * av[v]);
      sum1[v] += dy;
      sum2[v] += dy * d;
    }
  for (int v = 0; v < NV; ++v) Store16(acc1 + 16 * v, sum1[v]), Store16(acc2 + 16 * v, sum2[v]);
}

// dx[j] = dy * a[j], acc1[j] += dy, acc2[j] += dy * (x[j] - m[j]), dy = g[j] * silu'(y) at y = (x[j] - m[j]) * a[j]
// + b[j].
SPGD_VECTOR_CLONES void SiluGradRows(const float* g, int64_t g_stride, const float* x, int64_t x_stride, int64_t rows,
                                     int64_t width, const float* m, const float* a, const float* b, float* dx,
                                     float* acc1, float* acc2) {
  int64_t j0 = 0;
  while (width - j0 >= 16) {  // up to 64 channels at a time in registers
    const int64_t vectors = std::min<int64_t>(4, (width - j0) / 16);
#define SPGD_SILU_GRAD_CHUNK(NV)                                                                                 \
  SiluGradRowsInRegisters<NV>(g + j0, g_stride, x + j0, x_stride, rows, m + j0, a + j0, b + j0, dx + j0, acc1 + j0, \
                              acc2 + j0)
    switch (vectors) {
      case 1: SPGD_SILU_GRAD_CHUNK(1); break;
      case 2: SPGD_SILU_GRAD_CHUNK(2); break;
      case 3: SPGD_SILU_GRAD_CHUNK(3); break;
      default: SPGD_SILU_GRAD_CHUNK(4); break;
    }
#undef SPGD_SILU_GRAD_CHUNK
    j0 += 16 * vectors;
  }
  if (j0 >= width) return;
  g += j0, x += j0, m += j0, a += j0, b += j0, dx += j0, acc1 += j0, acc2 += j0, width -= j0;  // fewer than 16
  for (int64_t k = 0; k < rows; ++k) {
    const float* gr = g + k * g_stride;
    const float* xr = x + k * x_stride;
    float* dxr = dx + k * x_stride;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      const float d = xr[j] - m[j], y = d * a[j] + b[j], s = Sigmoid(y);
      const float dy = gr[j] * (s * (1.0f + y * (1.0f - s)));
      dxr[j] = dy * a[j];
      acc1[j] += dy;
      acc2[j] += dy * d;
    }
  }
}

struct Layout {
  int64_t images = 1, positions = 1, channels = 0;
};

// (images, positions, channels) of a (..., P..., C) buffer whose first `image_dims` dims are the images.
Layout LayoutOf(ffi::Span<const int64_t> dims, size_t image_dims) {
  Layout layout;
  layout.channels = dims[dims.size() - 1];
  for (size_t i = 0; i + 1 < dims.size(); ++i) (i < image_dims ? layout.images : layout.positions) *= dims[i];
  return layout;
}

// The activations' parts (x... of the header): part q is (images, positions, width[q]) at data[q], channels
// offset[q] .. offset[q] + width[q] - 1 of the joined x. T: const float (arguments) or float (results).
template <class T>
struct Parts {
  int count = 0;
  T* data[kMaxParts] = {};
  int64_t width[kMaxParts] = {}, offset[kMaxParts] = {};
  // Part q's first value of position p of image i (row stride width[q]).
  T* At(int q, int64_t image, int64_t p, const Layout& l) const {
    return data[q] + (image * l.positions + p) * width[q];
  }
};

// Adds a part of dims `dims` to `parts`, checking it against the first part's images and positions (of
// `image_dims` leading dims); the joined layout into l. An error names `name`.
ffi::Error AddPart(const char* name, const float* data, ffi::Span<const int64_t> dims, size_t image_dims,
                   Parts<const float>& parts, Layout& l) {
  if (dims.size() < image_dims + 2) {
    return ffi::Error::InvalidArgument(std::string(name) + ": x (..., P..., C) expected");
  }
  const Layout part = LayoutOf(dims, image_dims);
  if (parts.count == kMaxParts || (parts.count > 0 && (part.images != l.images || part.positions != l.positions))) {
    return ffi::Error::InvalidArgument(std::string(name) + ": x's parts (at most 4) must have the same images and "
                                       "positions");
  }
  if (parts.count == 0) l = Layout{part.images, part.positions, 0};
  parts.data[parts.count] = data;
  parts.width[parts.count] = part.channels;
  parts.offset[parts.count] = l.channels;
  l.channels += part.channels;
  ++parts.count;
  return ffi::Error::Success();
}

// x's parts from the remaining arguments, the joined layout into l.
ffi::Error ArgParts(const char* name, ffi::RemainingArgs args, size_t image_dims, Parts<const float>& parts,
                    Layout& l) {
  if (args.size() == 0) return ffi::Error::InvalidArgument(std::string(name) + ": x expected");
  for (size_t q = 0; q < args.size(); ++q) {
    auto x = args.get<ffi::Buffer<ffi::F32>>(q);
    if (!x.has_value()) return ffi::Error::InvalidArgument(std::string(name) + ": x must be float32");
    if (ffi::Error error = AddPart(name, x->typed_data(), x->dimensions(), image_dims, parts, l); error.failure()) {
      return error;
    }
  }
  return ffi::Error::Success();
}

// Tasks of whole rows: each image's positions in this many consecutive parts, about 8192 values each and at most
// 8. The count depends on the shape only, so sums over the parts, added in order, do not depend on the threads.
int64_t PositionParts(const Layout& l) { return std::clamp<int64_t>(l.positions * l.channels / 8192, 1, 8); }

// Per-channel sums over every image's positions into total (images, S * C), S sums per channel: block(image, k,
// rows, acc) adds the S sums of positions k .. k + rows - 1 of that image into acc (S * C floats, zeroed before).
// float32 over blocks of kBlock positions, float64 across the blocks and the parts; tasks of PositionParts.
template <int S, class Block>
void BlockedSums(ffi::ThreadPool pool, const Layout& l, Block block, std::vector<double>& total) {
  const int64_t parts = PositionParts(l), width = S * l.channels;
  std::vector<double> partial(l.images * parts * width, 0.0);
  spgd::RunTasks(pool, l.images * parts, [&](int64_t task) {
    const int64_t image = task / parts, part = task % parts;
    const int64_t p0 = part * l.positions / parts, p1 = (part + 1) * l.positions / parts;
    double* sum = partial.data() + task * width;
    std::vector<float> acc(width);
    for (int64_t k = p0; k < p1; k += kBlock) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      block(image, k, std::min(kBlock, p1 - k), acc.data());
      for (int64_t j = 0; j < width; ++j) sum[j] += acc[j];
    }
  });
  total.assign(l.images * width, 0.0);
  for (int64_t image = 0; image < l.images; ++image)
    for (int64_t part = 0; part < parts; ++part)
      for (int64_t j = 0; j < width; ++j) total[image * width + j] += partial[(image * parts + part) * width + j];
}

// BlockedSums<2>'s total (images, 2, C) as float32 s1 and s2 (images, C).
void SplitSums(const std::vector<double>& total, const Layout& l, float* s1, float* s2) {
  for (int64_t image = 0; image < l.images; ++image)
    for (int64_t j = 0; j < l.channels; ++j) {
      s1[image * l.channels + j] = float(total[2 * image * l.channels + j]);
      s2[image * l.channels + j] = float(total[(2 * image + 1) * l.channels + j]);
    }
}

// Per-channel sums over every image's positions of x, or of (x - mu)^2 with mu (images, C) given, into
// total (images, C).
void ChannelSums(ffi::ThreadPool pool, const Parts<const float>& x, const Layout& l, const float* mu,
                 std::vector<double>& total) {
  BlockedSums<1>(pool, l, [&](int64_t image, int64_t k, int64_t rows, float* acc) {
    for (int q = 0; q < x.count; ++q) {
      const float* part_mu = mu == nullptr ? nullptr : mu + image * l.channels + x.offset[q];
      AddRows(x.At(q, image, k, l), x.width[q], rows, x.width[q], part_mu, acc + x.offset[q]);
    }
  }, total);
}

ffi::Error Moments(ffi::ThreadPool pool, ffi::RemainingArgs x_parts, ffi::ResultBuffer<ffi::F32> mean,
                   ffi::ResultBuffer<ffi::F32> rstd, float eps) {
  const auto results = mean->dimensions();
  Parts<const float> x;
  Layout l;
  if (results.size() == 0) {
    return ffi::Error::InvalidArgument("spgd_group_norm_moments: x (..., P..., C) and mean (..., G) expected");
  }
  if (ffi::Error error = ArgParts("spgd_group_norm_moments", x_parts, results.size() - 1, x, l); error.failure()) {
    return error;
  }
  const int64_t groups = results.back();
  if (groups <= 0 || l.channels % groups != 0 || mean->element_count() != l.images * groups ||
      rstd->element_count() != l.images * groups || l.positions == 0) {
    return ffi::Error::InvalidArgument("spgd_group_norm_moments: C must be a multiple of G, P > 0");
  }
  const int64_t per_group = l.channels / groups;
  const double count = double(l.positions) * double(per_group);
  std::vector<double> total(l.images * l.channels);
  std::vector<float> mu(l.images * l.channels);
  // Each group's sum of total's channels, divided by count, into out (images, G) and its channels' mu.
  auto per_group_means = [&](float* out, float* spread) {
    for (int64_t i = 0; i < l.images * groups; ++i) {
      double sum = 0;
      for (int64_t j = 0; j < per_group; ++j) sum += total[i * per_group + j];
      out[i] = float(sum / count);
      if (spread != nullptr) std::fill(spread + i * per_group, spread + (i + 1) * per_group, out[i]);
    }
  };
  ChannelSums(pool, x, l, nullptr, total);
  per_group_means(mean->typed_data(), mu.data());
  ChannelSums(pool, x, l, mu.data(), total);
  float* rstds = rstd->typed_data();
  per_group_means(rstds, nullptr);
  for (int64_t i = 0; i < l.images * groups; ++i) rstds[i] = 1.0f / std::sqrt(rstds[i] + eps);
  return ffi::Error::Success();
}

ffi::Error Sums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mean,
                ffi::ResultBuffer<ffi::F32> s1, ffi::ResultBuffer<ffi::F32> s2) {
  if (mean.dimensions().size() == 0 || mean.dimensions().size() + 1 > x.dimensions().size() ||
      g.element_count() != x.element_count()) {
    return ffi::Error::InvalidArgument("spgd_group_norm_sums: g and x (..., P..., C), mean (..., G) expected");
  }
  const Layout l = LayoutOf(x.dimensions(), mean.dimensions().size() - 1);
  const int64_t groups = mean.dimensions().back();
  if (groups <= 0 || l.channels % groups != 0 || mean.element_count() != l.images * groups ||
      s1->element_count() != l.images * l.channels || s2->element_count() != l.images * l.channels) {
    return ffi::Error::InvalidArgument("spgd_group_norm_sums: C must be a multiple of G");
  }
  const int64_t per_group = l.channels / groups, C = l.channels;
  std::vector<float> mu(l.images * C);
  for (int64_t j = 0; j < l.images * C; ++j) mu[j] = mean.typed_data()[j / per_group];
  std::vector<double> total;
  BlockedSums<2>(pool, l, [&](int64_t image, int64_t k, int64_t rows, float* acc) {
    const int64_t at = (image * l.positions + k) * C;
    AddProducts(g.typed_data() + at, x.typed_data() + at, rows, C, mu.data() + image * C, acc, acc + C);
  }, total);
  SplitSums(total, l, s1->typed_data(), s2->typed_data());
  return ffi::Error::Success();
}

// x's parts and their joined layout into x and l, checked against the per-channel values m, a, b (..., C); an
// error names `name`.
ffi::Error SiluLayout(const char* name, ffi::RemainingArgs x_parts, ffi::Buffer<ffi::F32> m, ffi::Buffer<ffi::F32> a,
                      ffi::Buffer<ffi::F32> b, Parts<const float>& x, Layout& l) {
  const auto per_channel = m.dimensions();
  if (per_channel.size() == 0 || a.element_count() != m.element_count() || b.element_count() != m.element_count()) {
    return ffi::Error::InvalidArgument(std::string(name) + ": x (..., P..., C) and m, a, b (..., C) expected");
  }
  if (ffi::Error error = ArgParts(name, x_parts, per_channel.size() - 1, x, l); error.failure()) return error;
  if (per_channel.back() != l.channels) {
    return ffi::Error::InvalidArgument(std::string(name) + ": x (..., P..., C) and m, a, b (..., C) expected");
  }
  if (m.element_count() != l.images * l.channels || l.positions == 0) {
    return ffi::Error::InvalidArgument(std::string(name) + ": m, a, b must have x's images and channels, P > 0");
  }
  return ffi::Error::Success();
}

ffi::Error Silu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> m, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                ffi::RemainingArgs x_parts, ffi::ResultBuffer<ffi::F32> h) {
  Parts<const float> x;
  Layout l;
  if (ffi::Error error = SiluLayout("spgd_group_norm_silu", x_parts, m, a, b, x, l); error.failure()) return error;
  if (h->element_count() != l.images * l.positions * l.channels) {
    return ffi::Error::InvalidArgument("spgd_group_norm_silu: h must have x's size");
  }
  const int64_t parts = PositionParts(l), C = l.channels;
  spgd::RunTasks(pool, l.images * parts, [&](int64_t task) {
    const int64_t image = task / parts, part = task % parts;
    const int64_t p0 = part * l.positions / parts, p1 = (part + 1) * l.positions / parts;
    for (int q = 0; q < x.count; ++q) {
      const int64_t values = image * C + x.offset[q];
      SiluRows(x.At(q, image, p0, l), x.width[q], p1 - p0, x.width[q], m.typed_data() + values,
               a.typed_data() + values, b.typed_data() + values,
               h->typed_data() + (image * l.positions + p0) * C + x.offset[q], C);
    }
  });
  return ffi::Error::Success();
}

ffi::Error SiluGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> m, ffi::Buffer<ffi::F32> a,
                    ffi::Buffer<ffi::F32> b, ffi::RemainingArgs x_parts, ffi::ResultBuffer<ffi::F32> s1,
                    ffi::ResultBuffer<ffi::F32> s2, ffi::RemainingRets dx_parts) {
  Parts<const float> x;
  Layout l;
  if (ffi::Error error = SiluLayout("spgd_group_norm_silu_grad", x_parts, m, a, b, x, l); error.failure()) {
    return error;
  }
  if (g.element_count() != l.images * l.positions * l.channels) {
    return ffi::Error::InvalidArgument("spgd_group_norm_silu_grad: g must have x's shape");
  }
  Parts<float> dx;
  Layout dx_layout;
  for (size_t q = 0; q < dx_parts.size(); ++q) {
    auto part = dx_parts.get<ffi::Buffer<ffi::F32>>(q);
    if (!part.has_value() || static_cast<int>(q) >= x.count || (*part)->element_count() !=
        l.images * l.positions * x.width[q]) {
      return ffi::Error::InvalidArgument("spgd_group_norm_silu_grad: dx must have x's parts");
    }
    dx.data[q] = (*part)->typed_data();
    dx.width[q] = x.width[q];
    ++dx.count;
  }
  if (dx.count != x.count) return ffi::Error::InvalidArgument("spgd_group_norm_silu_grad: dx must have x's parts");
  const int64_t C = l.channels;
  std::vector<double> total;
  BlockedSums<2>(pool, l, [&](int64_t image, int64_t k, int64_t rows, float* acc) {
    for (int q = 0; q < x.count; ++q) {
      const int64_t values = image * C + x.offset[q];
      SiluGradRows(g.typed_data() + (image * l.positions + k) * C + x.offset[q], C, x.At(q, image, k, l),
                   x.width[q], rows, x.width[q], m.typed_data() + values, a.typed_data() + values,
                   b.typed_data() + values, dx.At(q, image, k, l), acc + x.offset[q], acc + C + x.offset[q]);
    }
  }, total);
  SplitSums(total, l, s1->typed_data(), s2->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpgdGroupNormMoments, Moments,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpgdGroupNormSums, Sums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpgdGroupNormSilu, Silu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpgdGroupNormSiluGrad, SiluGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .RemainingRets());
