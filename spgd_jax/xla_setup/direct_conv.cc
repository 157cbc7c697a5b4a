// spgd_direct_conv3x3: a 3x3 'same' convolution with stride 1 of float32 operands on the CPU (AVX-512), as an
// XLA FFI handler: a direct convolution, with no im2col copy of the input.
//
// Built and registered by spgd_jax/xla_setup/direct_conv.py; called by spgd_jax/models/adm/_conv.py.
//   x      (..., H, W, C)       float32, row-major (NHWC)
//   kernel (..., 3, 3, C, D)    float32 (HWIO), D a multiple of 16
//   out    (..., H, W, D)       float32
// With the attribute flipped, the call computes the input gradient of the convolution by `kernel`: kernel is then
// (..., 3, 3, D, C), and the convolution's is that kernel flipped in space with its in/out axes swapped. The
// handler makes that copy itself and keeps it (up to kMaxKept of them), for the next call with the same kernel
// values: a sampler's loop passes the same weights at every step, where XLA would make the copy every time.
// The leading dims of x and out are the images. jax.vmap (vmap_method="expand_dims") may add leading dims to
// the kernel too: its leading dims (product G) then split out's images into G groups, each convolved with its
// own kernel, and x holds either the same G groups or one group shared by all (size 1 when expanded).
//
// Each output pixel's D sums are float32 fused multiply-adds, in the order: taps (kh, kw) row-major, the input
// channels ascending within a tap. Taps that fall outside the image above or below are skipped; those left or
// right of it multiply zeros. A block of P consecutive pixels of a row times 16 * NZ output channels is held in
// AVX-512 registers for the whole sum. The rows of all images are split into tasks on XLA's intra-op threads;
// every sum is computed by one thread in the same order, so results do not depend on the threads.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <vector>

#include "native_tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  int64_t height, width, in_channels, out_channels;
};

// out[p, d0 : d0 + 16 NZ] for the P pixels of a block, p < count stored. `window` points at input row
// (h - 1 + kh_begin), column (w0 - 1), channel 0, and `row_stride` floats separate its rows; taps kh_begin ..
// kh_end - 1 are summed, with kernel rows from `kernel` (3, 3, C, D) at output channel d0.
template <int NZ, int P>
__attribute__((target("avx512f"))) void Block(const float* window, int64_t row_stride, int kh_begin, int kh_end,
                                               const float* kernel, int64_t d0, const Problem& pr, float* out,
                                               int count) {
  const int64_t C = pr.in_channels, D = pr.out_channels;
  __m512 acc[P][NZ];
  for (int p = 0; p < P; ++p)
    for (int z = 0; z < NZ; ++z) acc[p][z] = _mm512_setzero_ps();
  for (int kh = kh_begin; kh < kh_end; ++kh) {
    for (int kw = 0; kw < 3; ++kw) {
      const float* x = window + (kh - kh_begin) * row_stride + kw * C;
      const float* k = kernel + (kh * 3 + kw) * C * D + d0;
      for (int64_t c = 0; c < C; ++c) {
        __m512 w[NZ];
        for (int z = 0; z < NZ; ++z) w[z] = _mm512_loadu_ps(k + c * D + 16 * z);
        for (int p = 0; p < P; ++p) {
          __m512 v = _mm512_set1_ps(x[p * C + c]);
          for (int z = 0; z < NZ; ++z) acc[p][z] = _mm512_fmadd_ps(v, w[z], acc[p][z]);
        }
      }
    }
  }
  for (int p = 0; p < count; ++p)
    for (int z = 0; z < NZ; ++z) _mm512_storeu_ps(out + p * D + d0 + 16 * z, acc[p][z]);
}

// One output row h of one image: x (H, W, C) -> out (W, D). `strip` holds 3 x (P + 2) x C floats.
template <int NZ, int P>
void Row(const float* x, const float* kernel, float* out, int64_t h, const Problem& pr, float* strip) {
  const int64_t C = pr.in_channels, W = pr.width;
  const int kh_begin = h == 0 ? 1 : 0, kh_end = h == pr.height - 1 ? 2 : 3;
  const float* first_row = x + (h - 1 + kh_begin) * W * C;
  for (int64_t w0 = 0; w0 < W; w0 += P) {
    const int count = static_cast<int>(std::min<int64_t>(P, W - w0));
    for (int64_t d0 = 0; d0 < pr.out_channels; d0 += 16 * NZ) {
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

template <int NZ, int P>
void Rows(ffi::ThreadPool pool, const float* x, const float* kernel, float* out, int64_t images, int64_t n,
          bool x_grouped, const Problem& pr) {
  const int64_t rows = images * pr.height;
  const double flops = 18.0 * rows * pr.width * pr.in_channels * pr.out_channels;
  // About 2 MFLOP per task at least (tens of microseconds), at most 8 tasks.
  const int64_t tasks = std::clamp<int64_t>(static_cast<int64_t>(flops / 2e6), 1, std::min<int64_t>(8, rows));
  const int64_t image_in = pr.height * pr.width * pr.in_channels, image_out = pr.height * pr.width * pr.out_channels;
  const int64_t kernel_size = 9 * pr.in_channels * pr.out_channels;
  spgd::RunTasks(pool, tasks, [=](int64_t task) {
    std::vector<float> strip(3 * (P + 2) * pr.in_channels);
    for (int64_t r = rows * task / tasks; r < rows * (task + 1) / tasks; ++r) {
      const int64_t image = r / pr.height, h = r % pr.height, group = image / n;
      const float* xi = x + (x_grouped ? image : image % n) * image_in;
      Row<NZ, P>(xi, kernel + group * kernel_size, out + image * image_out + h * pr.width * pr.out_channels, h, pr,
                 strip.data());
    }
  });
}

// A kernel (3, 3, C, D) flipped in space with its in/out axes swapped, (3, 3, D, C), kept with the values it was
// made from: found again only for a kernel at the same address with the same shape and the same values.
struct Flipped {
  const float* source;
  int64_t in_channels, out_channels;
  std::vector<float> values, flipped;
};

constexpr size_t kMaxKept = 256;

std::shared_ptr<const Flipped> FlippedKernel(const float* kernel, int64_t c, int64_t d) {
  static std::mutex mutex;
  static std::list<std::shared_ptr<const Flipped>> kept;  // most recently used first
  const size_t size = 9 * c * d;
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (auto it = kept.begin(); it != kept.end(); ++it) {
      const Flipped& f = **it;
      if (f.source == kernel && f.in_channels == c && f.out_channels == d &&
          std::memcmp(f.values.data(), kernel, sizeof(float) * size) == 0) {
        kept.splice(kept.begin(), kept, it);
        return kept.front();
      }
    }
  }
  auto made = std::make_shared<Flipped>(Flipped{kernel, c, d, std::vector<float>(kernel, kernel + size),
                                                std::vector<float>(size)});
  for (int64_t tap = 0; tap < 9; ++tap) {
    const float* from = kernel + (8 - tap) * c * d;  // (2 - kh, 2 - kw)
    float* to = made->flipped.data() + tap * c * d;
    for (int64_t i = 0; i < c; ++i)
      for (int64_t j = 0; j < d; ++j) to[j * c + i] = from[i * d + j];
  }
  std::lock_guard<std::mutex> lock(mutex);
  kept.push_front(made);
  if (kept.size() > kMaxKept) kept.pop_back();
  return made;
}

int64_t Product(ffi::Span<const int64_t> dims, size_t count) {
  int64_t p = 1;
  for (size_t i = 0; i < count; ++i) p *= dims[i];
  return p;
}

ffi::Error Conv3x3(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> out, bool flipped) {
  auto xd = x.dimensions(), kd = kernel.dimensions(), od = out->dimensions();
  if (xd.size() < 4 || kd.size() < 4 || od.size() < 4) return ffi::Error::InvalidArgument("rank below 4");
  size_t xr = xd.size(), kr = kd.size(), orank = od.size();
  // The convolution's own kernel is (3, 3, in, out); flipped, the buffer holds (3, 3, out, in).
  const int64_t k_in = kd[kr - (flipped ? 1 : 2)], k_out = kd[kr - (flipped ? 2 : 1)];
  Problem pr{xd[xr - 3], xd[xr - 2], xd[xr - 1], k_out};
  if (kd[kr - 4] != 3 || kd[kr - 3] != 3 || k_in != pr.in_channels || od[orank - 3] != pr.height ||
      od[orank - 2] != pr.width || od[orank - 1] != pr.out_channels)
    return ffi::Error::InvalidArgument("shapes do not make a 3x3 'same' convolution");
  if (pr.out_channels % 16 != 0) return ffi::Error::InvalidArgument("out channels must be a multiple of 16");
  int64_t x_images = Product(xd, xr - 3), groups = Product(kd, kr - 4), images = Product(od, orank - 3);
  if (images == 0 || pr.in_channels == 0) {
    std::fill_n(out->typed_data(), out->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  if (images % groups != 0 || (x_images != images && x_images * groups != images))
    return ffi::Error::InvalidArgument("batch dims of x, kernel and out do not match");
  const int64_t n = images / groups;
  const bool x_grouped = x_images == images;
  const float *xp = x.typed_data(), *kp = kernel.typed_data();
  float* op = out->typed_data();
  const int64_t kernel_size = 9 * pr.in_channels * pr.out_channels;
  std::vector<std::shared_ptr<const Flipped>> flips;  // held until the convolutions are done
  std::vector<float> grouped;
  if (flipped) {
    for (int64_t g = 0; g < groups; ++g) flips.push_back(FlippedKernel(kp + g * kernel_size, pr.out_channels,
                                                                       pr.in_channels));
    if (groups == 1) {
      kp = flips[0]->flipped.data();
    } else {
      grouped.resize(groups * kernel_size);
      for (int64_t g = 0; g < groups; ++g)
        std::copy(flips[g]->flipped.begin(), flips[g]->flipped.end(), grouped.begin() + g * kernel_size);
      kp = grouped.data();
    }
  }
  if (pr.out_channels % 64 == 0)
    Rows<4, 6>(pool, xp, kp, op, images, n, x_grouped, pr);
  else if (pr.out_channels % 32 == 0)
    Rows<2, 12>(pool, xp, kp, op, images, n, x_grouped, pr);
  else
    Rows<1, 24>(pool, xp, kp, op, images, n, x_grouped, pr);
  return ffi::Error::Success();
}

}  // namespace

// Whether this CPU runs the handler's instructions (AVX-512F).
extern "C" int SpgdDirectConvSupported() { return __builtin_cpu_supports("avx512f") ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpgdDirectConv3x3, Conv3x3,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("flipped"));
