// GroupNorm32's sums over the positions on the CPU, as two XLA FFI handlers: what XLA:CPU splits into chains of
// reduce-windows, read here once per pass with per-channel vector sums.
//
// Built and registered by spgd_jax/xla_setup/group_norm_kernels.py; called by spgd_jax/models/adm/_group_norm.py.
// Row-major float32 buffers; the leading dims (product N, as many as the results have before their last) are
// the images, the dims after them (product P, at least one) the positions, C the channels, G the groups (C a
// multiple of G, consecutive channels per group). The activations come in their own shape, e.g. (..., H, W, C):
// a reshape to (..., P, C) before the call would make XLA:CPU compute them a second time for the call.
//   spgd_group_norm_moments  x (..., P, C)                    -> mean (..., G), rstd (..., G)
//       mean = the group's mean; rstd = 1 / sqrt(mean((x - mean)^2) + eps), two passes (attribute eps)
//   spgd_group_norm_sums     g (..., P, C), x (..., P, C), mean (..., G) -> s1 (..., C), s2 (..., C)
//       per channel, s1 = sum_p g and s2 = sum_p g * (x - mean of its group)
// Sums run in float32 vectors over blocks of positions and in float64 across the blocks; each (image, half of
// the groups or channels) is one task on XLA's intra-op thread pool, so results do not depend on the threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "native_tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 64;  // positions summed in float32 before the float64 total

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPGD_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SPGD_VECTOR_CLONES
#endif

// acc[j] += sum over `rows` rows (`stride` apart) of x[j], or of (x[j] - mu[j])^2 when `mu` is given.
SPGD_VECTOR_CLONES void AddRows(const float* x, int64_t rows, int64_t stride, int64_t width, const float* mu,
                                float* acc) {
  for (int64_t k = 0; k < rows; ++k) {
    const float* row = x + k * stride;
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

// acc1[j] += sum of g[j]; acc2[j] += sum of g[j] * (x[j] - mu[j]), over `rows` rows `stride` apart.
SPGD_VECTOR_CLONES void AddProducts(const float* g, const float* x, int64_t rows, int64_t stride, int64_t width,
                                    const float* mu, float* acc1, float* acc2) {
  for (int64_t k = 0; k < rows; ++k) {
    const float* gr = g + k * stride;
    const float* xr = x + k * stride;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      acc1[j] += gr[j];
      acc2[j] += gr[j] * (xr[j] - mu[j]);
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

// Sums of `width` channels over the positions, blocked: total[j] (float64) of AddRows' sums.
void ChannelSums(const float* x, const Layout& l, int64_t width, const float* mu, std::vector<double>& total,
                 std::vector<float>& acc) {
  std::fill(total.begin(), total.end(), 0.0);
  for (int64_t k = 0; k < l.positions; k += kBlock) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    AddRows(x + k * l.channels, std::min(kBlock, l.positions - k), l.channels, width, mu, acc.data());
    for (int64_t j = 0; j < width; ++j) total[j] += acc[j];
  }
}

ffi::Error Moments(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> mean,
                   ffi::ResultBuffer<ffi::F32> rstd, float eps) {
  if (mean->dimensions().size() == 0 || mean->dimensions().size() + 1 > x.dimensions().size()) {
    return ffi::Error::InvalidArgument("spgd_group_norm_moments: x (..., P..., C) and mean (..., G) expected");
  }
  const Layout l = LayoutOf(x.dimensions(), mean->dimensions().size() - 1);
  const int64_t groups = mean->dimensions().back();
  if (groups <= 0 || l.channels % groups != 0 || mean->element_count() != l.images * groups ||
      rstd->element_count() != l.images * groups || l.positions == 0) {
    return ffi::Error::InvalidArgument("spgd_group_norm_moments: C must be a multiple of G, P > 0");
  }
  const int64_t per_group = l.channels / groups, parts = groups >= 2 ? 2 : 1;
  const float* xs = x.typed_data();
  float* means = mean->typed_data();
  float* rstds = rstd->typed_data();
  spgd::RunTasks(pool, l.images * parts, [&](int64_t task) {
    const int64_t image = task / parts, part = task % parts;
    const int64_t g0 = part * groups / parts, g1 = (part + 1) * groups / parts;
    const int64_t c0 = g0 * per_group, width = (g1 - g0) * per_group;
    const float* xi = xs + image * l.positions * l.channels + c0;
    const double count = double(l.positions) * double(per_group);
    std::vector<double> total(width);
    std::vector<float> acc(width), mu(width);
    ChannelSums(xi, l, width, nullptr, total, acc);
    for (int64_t g = g0; g < g1; ++g) {
      double sum = 0;
      for (int64_t j = 0; j < per_group; ++j) sum += total[(g - g0) * per_group + j];
      const float m = float(sum / count);
      std::fill(mu.begin() + (g - g0) * per_group, mu.begin() + (g - g0 + 1) * per_group, m);
      means[image * groups + g] = m;
    }
    ChannelSums(xi, l, width, mu.data(), total, acc);
    for (int64_t g = g0; g < g1; ++g) {
      double sum = 0;
      for (int64_t j = 0; j < per_group; ++j) sum += total[(g - g0) * per_group + j];
      rstds[image * groups + g] = 1.0f / std::sqrt(float(sum / count) + eps);
    }
  });
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
  const int64_t per_group = l.channels / groups;
  // Two halves of the channels where each is at least a 64-byte line wide.
  const int64_t parts = l.channels >= 32 ? 2 : 1;
  const float* gs = g.typed_data();
  const float* xs = x.typed_data();
  const float* means = mean.typed_data();
  float* out1 = s1->typed_data();
  float* out2 = s2->typed_data();
  spgd::RunTasks(pool, l.images * parts, [&](int64_t task) {
    const int64_t image = task / parts, part = task % parts;
    const int64_t c0 = part * l.channels / parts, width = (part + 1) * l.channels / parts - c0;
    const int64_t offset = image * l.positions * l.channels + c0;
    std::vector<double> total1(width, 0.0), total2(width, 0.0);
    std::vector<float> acc1(width), acc2(width), mu(width);
    for (int64_t j = 0; j < width; ++j) mu[j] = means[image * groups + (c0 + j) / per_group];
    for (int64_t k = 0; k < l.positions; k += kBlock) {
      std::fill(acc1.begin(), acc1.end(), 0.0f);
      std::fill(acc2.begin(), acc2.end(), 0.0f);
      AddProducts(gs + offset + k * l.channels, xs + offset + k * l.channels, std::min(kBlock, l.positions - k),
                  l.channels, width, mu.data(), acc1.data(), acc2.data());
      for (int64_t j = 0; j < width; ++j) {
        total1[j] += acc1[j];
        total2[j] += acc2[j];
      }
    }
    for (int64_t j = 0; j < width; ++j) {
      out1[image * l.channels + c0 + j] = float(total1[j]);
      out2[image * l.channels + c0 + j] = float(total2[j]);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpgdGroupNormMoments, Moments,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
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
