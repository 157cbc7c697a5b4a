// Softmax attention of float32 operands on the CPU (AVX-512) as two XLA FFI handlers, forward and backward, that
// keep each block of attention weights in the cache: XLA:CPU writes the (heads, T, S) weights, their exponentials
// and their gradient to memory several times over and multiplies them with operands of 16-64 channels.
//
// Built and registered by spgd_jax/xla_setup/attention_kernels.py; called by spgd_jax/models/adm/_attention.py.
// Row-major float32 buffers; the leading dims (product B) are the images, T the queries, S the keys, H the heads,
// C the channels of a head:
//   spgd_attention_forward   q (..., T, H, C), k (..., S, H, C), v (..., S, H, C)
//                            -> out (..., T, H, C), lse (..., H, T)
//       w = softmax_s(q[t] . k[s]) (the logits already scaled); out[t] = sum_s w[t, s] v[s];
//       lse[t] = log sum_s exp(q[t] . k[s]), the log of the softmax's denominator
//   spgd_attention_backward  q, k, v, out, lse, g (..., T, H, C)  -> dq, dk, dv (the shapes of q, k, v)
//       w recomputed as exp(q[t] . k[s] - lse[t]); dw = g v^T; dlogits = w * (dw - sum_c g * out);
//       dq = dlogits k, dk = dlogits^T q, dv = w^T g
// Per (image, head): blocks of kRows queries against all the keys (a (kRows, S) block of weights), the products
// by the register-blocked microkernel that direct_conv.cc uses too (native_products.h: float32 fused multiply-adds,
// channels or keys in AVX-512 vectors of 16). Each (image, head) is one task on XLA's intra-op threads, its sums in a fixed order, so
// results do not depend on the threads.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "native_products.h"
#include "native_tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 24;  // queries per block: a (kRows, S) block of weights stays in L1/L2
constexpr int kP = 8;          // rows of the microkernel

int64_t Up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// out[r, :D] = (add ? out[r, :D] : 0) + sum over k < K of x[r, k] y[k, :D], for r < rows. x (rows rounded up to
// kP, >= K) with rows x_stride apart, all of them readable; y (K, D) row-major; D a multiple of 16; out's rows
// out_stride apart. Rows r >= rows are computed and not stored.
template <int NZ>
__attribute__((target("avx512f"))) void Columns(const float* x, int64_t x_stride, int64_t rows, const float* y,
                                                 int64_t K, int64_t D, int64_t d0, float* out, int64_t out_stride,
                                                 bool add) {
  for (int64_t r0 = 0; r0 < rows; r0 += kP) {
    const int count = static_cast<int>(std::min<int64_t>(kP, rows - r0));
    __m512 acc[kP][NZ];
    for (int p = 0; p < kP; ++p)
      for (int z = 0; z < NZ; ++z)
        acc[p][z] = add && p < count ? _mm512_loadu_ps(out + (r0 + p) * out_stride + d0 + 16 * z)
                                     : _mm512_setzero_ps();
    spgd::Accumulate<NZ, kP>(acc, x + r0 * x_stride, x_stride, y + d0, K, D);
    for (int p = 0; p < count; ++p)
      for (int z = 0; z < NZ; ++z) _mm512_storeu_ps(out + (r0 + p) * out_stride + d0 + 16 * z, acc[p][z]);
  }
}

void Gemm(const float* x, int64_t x_stride, int64_t rows, const float* y, int64_t K, int64_t D, float* out,
          int64_t out_stride, bool add) {
  int64_t d0 = 0;
  for (; d0 + 32 <= D; d0 += 32) Columns<2>(x, x_stride, rows, y, K, D, d0, out, out_stride, add);
  if (d0 < D) Columns<1>(x, x_stride, rows, y, K, D, d0, out, out_stride, add);
}

// exp(x) for x <= 0 (larger x are clamped to 88): Cephes' expf, exp(r) 2^n with |r| <= ln 2 / 2, within a few
// float32 ulps; 0 below -104; NaN stays NaN (max and min return their second operand when either is NaN).
__attribute__((target("avx512f"))) inline __m512 Exp(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

__mmask16 Lanes(int64_t s, int64_t S) {
  return S - s >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (S - s)) - 1);
}

// row[s] = exp(row[s] - shift) for s < S, 0 for S <= s < Sp; returns the sum of the first S.
__attribute__((target("avx512f"))) float ExpRow(float* row, int64_t S, int64_t Sp, float shift) {
  const __m512 m = _mm512_set1_ps(shift);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t s = 0; s < Sp; s += 16) {
    const __mmask16 lanes = s < S ? Lanes(s, S) : 0;
    const __m512 e = _mm512_maskz_mov_ps(lanes, Exp(_mm512_sub_ps(_mm512_loadu_ps(row + s), m)));
    sum = _mm512_add_ps(sum, e);
    _mm512_storeu_ps(row + s, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// The row's softmax in place (zeros past S); returns log sum_s exp(row[s]).
__attribute__((target("avx512f"))) float SoftmaxRow(float* row, int64_t S, int64_t Sp) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t s = 0; s < S; s += 16) mx = _mm512_mask_max_ps(mx, Lanes(s, S), mx, _mm512_loadu_ps(row + s));
  const float shift = _mm512_reduce_max_ps(mx);
  const float sum = ExpRow(row, S, Sp, shift);
  const __m512 inv = _mm512_set1_ps(1.0f / sum);
  for (int64_t s = 0; s < Sp; s += 16) _mm512_storeu_ps(row + s, _mm512_mul_ps(_mm512_loadu_ps(row + s), inv));
  return shift + std::log(sum);
}

struct Shape {
  int64_t images, T, S, H, C;
  int64_t Sp, Cp;  // S and C rounded up to 16
  int64_t At(int64_t image, int64_t position, int64_t positions, int64_t head) const {
    return ((image * positions + position) * H + head) * C;
  }
};

// rows (n, C) of a (..., positions, H, C) buffer at `src` (H * C apart) -> dst (n, Cp), zeros past C.
void Gather(const float* src, int64_t n, const Shape& sh, float* dst) {
  for (int64_t r = 0; r < n; ++r) {
    std::memcpy(dst + r * sh.Cp, src + r * sh.H * sh.C, sizeof(float) * sh.C);
    std::fill(dst + r * sh.Cp + sh.C, dst + (r + 1) * sh.Cp, 0.0f);
  }
}

// (n, C) rows (H * C apart) -> dst (Cp, ld) transposed: dst[c, r] for r < n; the rest as it was.
void GatherTransposed(const float* src, int64_t n, const Shape& sh, float* dst, int64_t ld) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < sh.C; ++c) dst[c * ld + r] = src[r * sh.H * sh.C + c];
}

struct Scratch {
  std::vector<float> kt, vt, kk, vv, q, g, qt, gt, w, dw, o, dkt, dvt;
  static Scratch& Get() {
    thread_local Scratch s;
    return s;
  }
};

void Resize(std::vector<float>& v, size_t n) {
  v.assign(n, 0.0f);
}

void ForwardHead(const float* q, const float* k, const float* v, float* out, float* lse, const Shape& sh,
                 int64_t b, int64_t h) {
  const int64_t S = sh.S, Sp = sh.Sp, C = sh.C, Cp = sh.Cp, T = sh.T;
  Scratch& s = Scratch::Get();
  Resize(s.kt, Up(Cp, kP) * Sp);
  Resize(s.vv, Sp * Cp);
  Resize(s.q, kRows * Cp);
  Resize(s.w, kRows * Sp);
  Resize(s.o, kRows * Cp);
  GatherTransposed(k + sh.At(b, 0, S, h), S, sh, s.kt.data(), Sp);
  Gather(v + sh.At(b, 0, S, h), S, sh, s.vv.data());
  for (int64_t t0 = 0; t0 < T; t0 += kRows) {
    const int64_t n = std::min(kRows, T - t0);
    Gather(q + sh.At(b, t0, T, h), n, sh, s.q.data());
    Gemm(s.q.data(), Cp, n, s.kt.data(), C, Sp, s.w.data(), Sp, false);
    for (int64_t r = 0; r < n; ++r) lse[(b * sh.H + h) * T + t0 + r] = SoftmaxRow(s.w.data() + r * Sp, S, Sp);
    Gemm(s.w.data(), Sp, n, s.vv.data(), S, Cp, s.o.data(), Cp, false);
    for (int64_t r = 0; r < n; ++r)
      std::memcpy(out + sh.At(b, t0 + r, T, h), s.o.data() + r * Cp, sizeof(float) * C);
  }
}

__attribute__((target("avx512f"))) void BackwardHead(const float* q, const float* k, const float* v,
                                                      const float* out, const float* lse, const float* g, float* dq,
                                                      float* dk, float* dv, const Shape& sh, int64_t b, int64_t h) {
  const int64_t S = sh.S, Sp = sh.Sp, C = sh.C, Cp = sh.Cp, T = sh.T;
  Scratch& s = Scratch::Get();
  Resize(s.kt, Up(Cp, kP) * Sp);
  Resize(s.vt, Up(Cp, kP) * Sp);
  Resize(s.kk, Sp * Cp);
  Resize(s.q, kRows * Cp);
  Resize(s.g, kRows * Cp);
  Resize(s.qt, Up(Cp, kP) * kRows);
  Resize(s.gt, Up(Cp, kP) * kRows);
  Resize(s.w, kRows * Sp);
  Resize(s.dw, kRows * Sp);
  Resize(s.o, kRows * Cp);
  Resize(s.dkt, Cp * Sp);
  Resize(s.dvt, Cp * Sp);
  GatherTransposed(k + sh.At(b, 0, S, h), S, sh, s.kt.data(), Sp);
  GatherTransposed(v + sh.At(b, 0, S, h), S, sh, s.vt.data(), Sp);
  Gather(k + sh.At(b, 0, S, h), S, sh, s.kk.data());
  for (int64_t t0 = 0; t0 < T; t0 += kRows) {
    const int64_t n = std::min(kRows, T - t0);
    Gather(q + sh.At(b, t0, T, h), n, sh, s.q.data());
    Gather(g + sh.At(b, t0, T, h), n, sh, s.g.data());
    GatherTransposed(q + sh.At(b, t0, T, h), n, sh, s.qt.data(), kRows);
    GatherTransposed(g + sh.At(b, t0, T, h), n, sh, s.gt.data(), kRows);
    Gemm(s.q.data(), Cp, n, s.kt.data(), C, Sp, s.w.data(), Sp, false);   // logits
    Gemm(s.g.data(), Cp, n, s.vt.data(), C, Sp, s.dw.data(), Sp, false);  // dw = g v^T
    for (int64_t r = 0; r < n; ++r) {
      const float* o = out + sh.At(b, t0 + r, T, h);
      const float* gr = s.g.data() + r * Cp;
      float dot = 0.0f;
      for (int64_t c = 0; c < C; ++c) dot += gr[c] * o[c];  // sum_s w dw = sum_c g * out
      float* w = s.w.data() + r * Sp;
      float* dw = s.dw.data() + r * Sp;
      ExpRow(w, S, Sp, lse[(b * sh.H + h) * T + t0 + r]);
      const __m512 d = _mm512_set1_ps(dot);
      for (int64_t j = 0; j < Sp; j += 16)  // dlogits, zeros past S (w is)
        _mm512_storeu_ps(dw + j, _mm512_mul_ps(_mm512_loadu_ps(w + j), _mm512_sub_ps(_mm512_loadu_ps(dw + j), d)));
    }
    Gemm(s.dw.data(), Sp, n, s.kk.data(), S, Cp, s.o.data(), Cp, false);  // dq = dlogits k
    for (int64_t r = 0; r < n; ++r)
      std::memcpy(dq + sh.At(b, t0 + r, T, h), s.o.data() + r * Cp, sizeof(float) * C);
    Gemm(s.qt.data(), kRows, Cp, s.dw.data(), n, Sp, s.dkt.data(), Sp, true);  // dk^T += q^T dlogits
    Gemm(s.gt.data(), kRows, Cp, s.w.data(), n, Sp, s.dvt.data(), Sp, true);   // dv^T += g^T w
  }
  for (int64_t j = 0; j < S; ++j)
    for (int64_t c = 0; c < C; ++c) {
      dk[sh.At(b, j, S, h) + c] = s.dkt[c * Sp + j];
      dv[sh.At(b, j, S, h) + c] = s.dvt[c * Sp + j];
    }
}

int64_t Product(ffi::Span<const int64_t> dims, size_t count) {
  int64_t p = 1;
  for (size_t i = 0; i < count; ++i) p *= dims[i];
  return p;
}

// sh from q (..., T, H, C) and k, v (..., S, H, C); an error unless they agree.
ffi::Error Attention(const char* name, ffi::Span<const int64_t> qd, ffi::Span<const int64_t> kd,
                     ffi::Span<const int64_t> vd, Shape& sh) {
  const size_t r = qd.size();
  if (r < 3 || kd.size() != r || vd.size() != r) return ffi::Error::InvalidArgument(std::string(name) + ": q, k, v of one rank >= 3");
  for (size_t i = 0; i < r; ++i)
    if (kd[i] != vd[i] || (i != r - 3 && kd[i] != qd[i]))
      return ffi::Error::InvalidArgument(std::string(name) + ": q (..., T, H, C), k and v (..., S, H, C) do not match");
  sh = Shape{Product(qd, r - 3), qd[r - 3], kd[r - 3], qd[r - 2], qd[r - 1], Up(kd[r - 3], 16), Up(qd[r - 1], 16)};
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  Shape sh;
  if (ffi::Error error = Attention("spgd_attention_forward", q.dimensions(), k.dimensions(), v.dimensions(), sh);
      error.failure())
    return error;
  if (out->element_count() != q.element_count() || lse->element_count() != sh.images * sh.H * sh.T)
    return ffi::Error::InvalidArgument("spgd_attention_forward: out (..., T, H, C) and lse (..., H, T) do not match q");
  if (sh.S == 0) {  // no keys: the softmax of nothing
    std::fill_n(out->typed_data(), out->element_count(), NAN);
    std::fill_n(lse->typed_data(), lse->element_count(), -INFINITY);
    return ffi::Error::Success();
  }
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  spgd::RunTasks(pool, sh.images * sh.H, [=](int64_t task) {
    ForwardHead(qp, kp, vp, op, lp, sh, task / sh.H, task % sh.H);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  Shape sh;
  if (ffi::Error error = Attention("spgd_attention_backward", q.dimensions(), k.dimensions(), v.dimensions(), sh);
      error.failure())
    return error;
  if (out.element_count() != q.element_count() || g.element_count() != q.element_count() ||
      lse.element_count() != sh.images * sh.H * sh.T || dq->element_count() != q.element_count() ||
      dk->element_count() != k.element_count() || dv->element_count() != v.element_count())
    return ffi::Error::InvalidArgument("spgd_attention_backward: out, g, lse, dq, dk, dv do not match q, k, v");
  if (sh.S == 0 || sh.T == 0) {
    std::fill_n(dq->typed_data(), dq->element_count(), 0.0f);
    std::fill_n(dk->typed_data(), dk->element_count(), 0.0f);
    std::fill_n(dv->typed_data(), dv->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *op = out.typed_data(),
              *lp = lse.typed_data(), *gp = g.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  spgd::RunTasks(pool, sh.images * sh.H, [=](int64_t task) {
    BackwardHead(qp, kp, vp, op, lp, gp, dqp, dkp, dvp, sh, task / sh.H, task % sh.H);
  });
  return ffi::Error::Success();
}

}  // namespace

// Whether this CPU runs the handlers' instructions (AVX-512F).
extern "C" int SpgdAttentionSupported() { return __builtin_cpu_supports("avx512f") ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpgdAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpgdAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
