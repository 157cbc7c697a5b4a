// spgd_onednn_conv2d: a 2-D 'same' convolution with stride 1 of bfloat16 operands on the CPU through oneDNN, as an
// XLA FFI handler.
//
// Built and registered by spgd_jax/xla_setup/onednn.py; called by spgd_jax/models/adm/_onednn.py.
//   x      (..., H, W, C)         bfloat16, row-major (NHWC)
//   kernel (..., KH, KW, C, D)    bfloat16 (HWIO), KH and KW odd; padding (KH-1)/2 and (KW-1)/2
//   out    (..., H, W, D)         bfloat16, or float32 (the float32 sums, not rounded to bfloat16)
// The leading dims of x and out are the images. jax.vmap (vmap_method="expand_dims") may add leading dims to
// the kernel too: its leading dims (product G) then split out's images into G groups, each convolved with its
// own kernel, and x holds either the same G groups or one group shared by all (size 1 when expanded).
// Products accumulate in float32; on CPUs with AMX or AVX512-BF16, oneDNN's kernels use them.
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Tag = dnnl::memory::format_tag;
// images, height, width, in channels, out channels, kernel height, kernel width, float32 out
using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool>;

struct Plan {
  dnnl::convolution_forward::primitive_desc pd;
  dnnl::convolution_forward conv;
  dnnl::memory::desc kernel_desc;  // HWIO, as XLA holds it
  dnnl::reorder::primitive_desc reorder_pd;
  dnnl::reorder kernel_reorder;  // HWIO -> the layout the convolution chose
};

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One primitive per problem, made once: oneDNN generates its kernels when the primitive is made.
const Plan& plan_for(const Key& key) {
  static std::mutex mutex;
  static std::map<Key, Plan> plans;  // std::map: references stay valid as the map grows
  std::lock_guard<std::mutex> lock(mutex);
  auto found = plans.find(key);
  if (found != plans.end()) return found->second;
  auto [n, h, w, c, d, kh, kw, f32_out] = key;
  auto type = dnnl::memory::data_type::bf16;
  auto out_type = f32_out ? dnnl::memory::data_type::f32 : type;
  dnnl::memory::desc src({n, c, h, w}, type, Tag::nhwc), dst({n, d, h, w}, out_type, Tag::nhwc);
  dnnl::memory::desc kernel({d, c, kh, kw}, type, Tag::hwio), any_kernel({d, c, kh, kw}, type, Tag::any);
  dnnl::memory::dims pad{(kh - 1) / 2, (kw - 1) / 2};
  // Each call brings its own scratchpad: with oneDNN's own (one per primitive) two calls at once, from two
  // threads (spgd_jax.sharding.map_parts), would share it and spoil each other's results.
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::convolution_forward::primitive_desc pd(cpu_engine(), dnnl::prop_kind::forward_inference,
                                               dnnl::algorithm::convolution_direct, src, any_kernel, dst,
                                               {1, 1}, pad, pad, attr);
  dnnl::reorder::primitive_desc reorder_pd(cpu_engine(), kernel, cpu_engine(), pd.weights_desc(), attr);
  return plans.emplace(key, Plan{pd, dnnl::convolution_forward(pd), kernel, reorder_pd, dnnl::reorder(reorder_pd)})
      .first->second;
}

int64_t product(ffi::Span<const int64_t> dims, size_t count) {
  int64_t p = 1;
  for (size_t i = 0; i < count; ++i) p *= dims[i];
  return p;
}

ffi::Error Conv2d(ffi::AnyBuffer x, ffi::AnyBuffer kernel, ffi::Result<ffi::AnyBuffer> out) {
  auto xd = x.dimensions(), kd = kernel.dimensions(), od = out->dimensions();
  bool f32_out = out->element_type() == ffi::DataType::F32;
  if (x.element_type() != ffi::DataType::BF16 || kernel.element_type() != ffi::DataType::BF16 ||
      (out->element_type() != ffi::DataType::BF16 && !f32_out))
    return ffi::Error::InvalidArgument("x and kernel must be bfloat16, out bfloat16 or float32");
  if (xd.size() < 4 || kd.size() < 4 || od.size() < 4) return ffi::Error::InvalidArgument("rank below 4");
  size_t xr = xd.size(), kr = kd.size(), orank = od.size();
  int64_t h = xd[xr - 3], w = xd[xr - 2], c = xd[xr - 1];
  int64_t kh = kd[kr - 4], kw = kd[kr - 3], d = kd[kr - 1];
  if (kd[kr - 2] != c || od[orank - 3] != h || od[orank - 2] != w || od[orank - 1] != d || kh % 2 == 0 || kw % 2 == 0)
    return ffi::Error::InvalidArgument("shapes do not make a 'same' convolution");
  int64_t x_images = product(xd, xr - 3), groups = product(kd, kr - 4), images = product(od, orank - 3);
  if (images == 0) return ffi::Error::Success();
  if (images % groups != 0 || (x_images != images && x_images * groups != images))
    return ffi::Error::InvalidArgument("batch dims of x, kernel and out do not match");
  int64_t n = images / groups;
  bool x_grouped = x_images == images;
  const size_t item = 2, out_item = f32_out ? 4 : 2;  // bytes per element
  try {
    const Plan& p = plan_for(Key{n, h, w, c, d, kh, kw, f32_out});
    dnnl::stream stream(cpu_engine());
    dnnl::memory reordered(p.pd.weights_desc(), cpu_engine());
    dnnl::memory conv_scratch(p.pd.scratchpad_desc(), cpu_engine()), reorder_scratch(p.reorder_pd.scratchpad_desc(),
                                                                                     cpu_engine());
    for (int64_t g = 0; g < groups; ++g) {
      auto* xp = static_cast<char*>(x.untyped_data()) + (x_grouped ? g * n * h * w * c * item : 0);
      auto* kp = static_cast<char*>(kernel.untyped_data()) + g * kh * kw * c * d * item;
      auto* op = static_cast<char*>(out->untyped_data()) + g * n * h * w * d * out_item;
      dnnl::memory src(p.pd.src_desc(), cpu_engine(), xp), dst(p.pd.dst_desc(), cpu_engine(), op);
      dnnl::memory hwio(p.kernel_desc, cpu_engine(), kp);
      p.kernel_reorder.execute(stream, {{DNNL_ARG_FROM, hwio}, {DNNL_ARG_TO, reordered},
                                        {DNNL_ARG_SCRATCHPAD, reorder_scratch}});
      p.conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, reordered}, {DNNL_ARG_DST, dst},
                              {DNNL_ARG_SCRATCHPAD, conv_scratch}});
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

// The name of the implementation oneDNN picks for a small problem (32->32 channels, 8x8, 3x3), with a
// float32 out when f32_out is nonzero; "" when it has none. A name with "ref" in it is oneDNN's reference
// code, far slower than XLA's own convolutions: the Python side then takes no oneDNN route.
extern "C" const char* SpgdOnednnConvImplementation(int f32_out) {
  static std::string names[2];
  std::string& name = names[f32_out != 0];
  try {
    name = plan_for(Key{1, 8, 8, 32, 32, 3, 3, f32_out != 0}).pd.impl_info_str();
  } catch (const dnnl::error&) {
    name = "";
  }
  return name.c_str();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpgdOnednnConv2d, Conv2d,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
