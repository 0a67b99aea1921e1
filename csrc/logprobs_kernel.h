// Row kernels of the native CPU token-logprob op, written once over GCC/Clang vector types and
// compiled once per instruction set: logprobs.cpp includes this file once per copy, with
// FASTPO_ISA naming the namespace, FASTPO_VEC_BYTES the vector width and FASTPO_F16C whether F16C
// instructions may be used (the x86 AVX2 copy is compiled under a target("avx2,fma,f16c") pragma).
// There is no include guard on purpose. Every function here works on one row; threading lives in
// logprobs.cpp. Each row is reduced by one thread in a fixed order, so results do not depend on
// the number of threads.
//
// Notation: x = one row of logits (length V), t = 1/temperature, l = the row's label.
//   forward:  lse = log sum_j exp(t*x_j),   logp = t*x_l - lse
//   backward: d(t*x_l)/dx_j = t*[j == l] and d lse/dx_j = exp(t*x_j) * t / sum_k exp(t*x_k)
//             = t * softmax(t*x)_j, so d logp/dx_j = t * (onehot(l)_j - softmax(t*x)_j), times
//             the incoming grad g; softmax(t*x)_j = exp(t*x_j - lse) is read back from the saved
//             lse, so the backward needs one pass and no max.

#if !defined(FASTPO_ISA) || !defined(FASTPO_F16C) || !defined(FASTPO_VEC_BYTES)
#error "define FASTPO_ISA, FASTPO_F16C and FASTPO_VEC_BYTES before including logprobs_kernel.h"
#endif

namespace fastpo_native {
namespace FASTPO_ISA {

#define FASTPO_INLINE inline __attribute__((always_inline))

// One fp32 vector: FASTPO_VEC_BYTES = 32 (8 lanes, one ymm register) for the AVX2 copy, 16 (4
// lanes: one xmm / NEON q register, so that no compiler has to split a wider type) for baseline.
constexpr int kLanes = FASTPO_VEC_BYTES / 4;
// Elements per block of the forward pass: the block is read from memory once (pass A) and then
// again from L1 (pass B); 2048 fp32 = 8 KiB.
constexpr int64_t kBlock = 2048;
// Elements per unrolled step: 4 independent accumulators hide the add/max latency.
constexpr int64_t kStep = 4 * kLanes;
static_assert(kBlock % kStep == 0, "a block is a whole number of steps");

typedef float vf __attribute__((vector_size(FASTPO_VEC_BYTES)));
typedef int32_t vi __attribute__((vector_size(FASTPO_VEC_BYTES)));
typedef uint32_t vu __attribute__((vector_size(FASTPO_VEC_BYTES)));
typedef uint16_t vh __attribute__((vector_size(FASTPO_VEC_BYTES / 2)));

FASTPO_INLINE vf splat(float v) {
  return vf{} + v;
}

FASTPO_INLINE vf vmax(vf a, vf b) {
  return a > b ? a : b;  // a NaN in `a` is dropped here; the exp pass re-reads it and propagates
}

// Fixed-order horizontal reductions (the same tree on every thread and every call).
FASTPO_INLINE float hsum(vf v) {
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int i = 0; i < width; ++i) v[i] += v[i + width];
  }
  return v[0];
}

FASTPO_INLINE float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// exp(x) on every lane, within 1 ulp (relative error < 2^-23) of exp over [-86.64, 88.72].
// Cody-Waite reduction x = n*ln2 + r with |r| <= ln2/2 and the classic Cephes degree-6 polynomial
// for e^r. n comes from the "1.5*2^23" rounding trick: adding it leaves round(x*log2e) in the low
// mantissa bits, so no float->int conversion is needed. n runs over [-125, 128]; 2^(n-1) is then a
// normal fp32 built in the exponent bits, and the polynomial's last step yields 2*e^r (doubling is
// exact), so y = (2*e^r) * 2^(n-1) never passes through an overflowing 2^128. Lanes outside
// [lo, hi] compute garbage (no FP exceptions are enabled) and are replaced by the two final
// selects: below lo (-inf included) 0, which flushes results under 2^-125 (softmax terms that
// small do not change an fp32 sum); above hi +inf. A NaN lane stays NaN: it fails both
// comparisons and NaN flows through the arithmetic.
FASTPO_INLINE vf vexp(vf x) {
  const vf lo = splat(-86.64339757f);   // -125 * ln2
  const vf hi = splat(88.72283906f);    // log(FLT_MAX)
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23
  const vf t = x * splat(1.44269504088896341f) + magic;
  const vf n = t - magic;
  vf r = x - n * splat(0.693359375f);  // ln2 split in a part exact in 9 bits and a remainder
  r = r - n * splat(-2.12194440e-4f);
  vf q = splat(1.9875691500e-4f);
  q = q * r + splat(1.3981999507e-3f);
  q = q * r + splat(8.3334519073e-3f);
  q = q * r + splat(4.1665795894e-2f);
  q = q * r + splat(1.6666665459e-1f);
  q = q * r + splat(5.0000001201e-1f);
  const vf p2 = (q * (r * r) + r) * splat(2.0f) + splat(2.0f);  // 2 * e^r, the doubling exact
  const vi ni = (vi)t - (vi)magic;     // round(x * log2e) as an integer
  const vi bits = (ni + 126) << 23;    // 2^(n-1) as an fp32 bit pattern, n - 1 in [-126, 127]
  vf y = p2 * (vf)bits;
  y = x < lo ? splat(0.0f) : y;
  y = x > hi ? splat(__builtin_huge_valf()) : y;
  return y;
}

// ---- loads and stores: fp32, bf16 and fp16 rows, converted to/from fp32 in registers ----------

FASTPO_INLINE float to_float(float v) { return v; }
FASTPO_INLINE float to_float(c10::BFloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}
FASTPO_INLINE float to_float(c10::Half v) {
  return c10::detail::fp16_ieee_to_fp32_value(v.x);
}

template <typename T>
FASTPO_INLINE T from_float(float v);
template <>
FASTPO_INLINE float from_float<float>(float v) { return v; }
template <>
FASTPO_INLINE c10::BFloat16 from_float<c10::BFloat16>(float v) {
  return c10::BFloat16(c10::detail::round_to_nearest_even(v), c10::BFloat16::from_bits());
}
template <>
FASTPO_INLINE c10::Half from_float<c10::Half>(float v) {
  return c10::Half(c10::detail::fp16_ieee_from_fp32_value(v), c10::Half::from_bits());
}

FASTPO_INLINE vf load(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
FASTPO_INLINE vf load(const c10::BFloat16* p) {
  vh h;
  __builtin_memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);  // bf16 is the top half of an fp32
}
FASTPO_INLINE vf load(const c10::Half* p) {
#if FASTPO_F16C && FASTPO_VEC_BYTES == 32
  return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vf v;
  for (int i = 0; i < kLanes; ++i) v[i] = c10::detail::fp16_ieee_to_fp32_value(p[i].x);
  return v;
#endif
}

FASTPO_INLINE void store(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
FASTPO_INLINE void store(c10::BFloat16* p, vf v) {
  // round to nearest even on the upper 16 bits; NaN becomes the canonical quiet NaN 0x7FC0
  const vu u = (vu)v;
  const vu rounded = (u + ((u >> 16) & 1u) + 0x7FFFu) >> 16;
  const vu bits = v != v ? vu{} + 0x7FC0u : rounded;
  const vh h = __builtin_convertvector(bits, vh);
  __builtin_memcpy(p, &h, sizeof h);
}
FASTPO_INLINE void store(c10::Half* p, vf v) {
#if FASTPO_F16C && FASTPO_VEC_BYTES == 32
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  for (int i = 0; i < kLanes; ++i) p[i] = from_float<c10::Half>(v[i]);
#endif
}

// The last < kLanes elements of a row, padded with `pad` (-inf for the exp sums, 0 for plain sums).
template <typename T>
FASTPO_INLINE vf load_partial(const T* p, int64_t count, float pad) {
  vf v = splat(pad);
  for (int64_t i = 0; i < count; ++i) v[i] = to_float(p[i]);
  return v;
}
template <typename T>
FASTPO_INLINE void store_partial(T* p, vf v, int64_t count) {
  for (int64_t i = 0; i < count; ++i) p[i] = from_float<T>(v[i]);
}

// ---- forward -------------------------------------------------------------------------------

struct ForwardRow {
  float lse;         // log sum_j exp(t * x_j)
  float logits_sum;  // sum_j x_j (raw logits, no temperature), when asked for
};

// One streaming pass over the row, in blocks of kBlock elements. Pass A reads the block from
// memory and takes its maximum M_b (and the raw sum); pass B re-reads it from L1 and adds
// exp(t*x - t*M) into vector accumulators, with M the running maximum. When a block raises M from
// M_old to M_new the accumulators are rescaled by exp(t*M_old - t*M_new), once per block (online
// log-sum-exp). While M is -inf (every element so far is -inf) the shift is 0 instead, so that
// -inf - -inf never appears; a row that is -inf throughout ends with sum 0 and lse = -inf.
// Compensated (Kahan) accumulation of one block's exp sums into the row total: with sums restarted
// per block, each lane adds at most kBlock / (2 * kLanes) terms plainly, and the error no longer
// grows with the number of blocks (a 2^20-entry row sums as accurately as a short one). The terms
// are finite and >= 0 (or NaN, which propagates), so the compensation never sees an infinity.
FASTPO_INLINE void kahan_add(vf& total, vf& compensation, vf value) {
  const vf y = value - compensation;
  const vf t = total + y;
  compensation = (t - total) - y;
  total = t;
}

template <typename T, bool kSum>
inline ForwardRow forward_row(const T* x, int64_t V, float inv_t) {
  const float ninf = -__builtin_huge_valf();
  const vf zero = splat(0.0f);
  const vf vt = splat(inv_t);
  vf s_total = zero, s_comp = zero, r_total = zero;
  float m_run = ninf;
  for (int64_t b = 0; b < V; b += kBlock) {
    const T* xb = x + b;
    const int64_t n = V - b < kBlock ? V - b : kBlock;
    const int64_t n_full = n - n % kStep;
    // pass A: block maximum (and raw sum), four independent accumulators each
    vf m0 = splat(ninf), m1 = m0, m2 = m0, m3 = m0;
    vf r0 = zero, r1 = zero, r2 = zero, r3 = zero;
    int64_t i = 0;
    for (; i < n_full; i += kStep) {
      const vf a0 = load(xb + i), a1 = load(xb + i + kLanes);
      const vf a2 = load(xb + i + 2 * kLanes), a3 = load(xb + i + 3 * kLanes);
      m0 = vmax(a0, m0); m1 = vmax(a1, m1); m2 = vmax(a2, m2); m3 = vmax(a3, m3);
      if (kSum) { r0 += a0; r1 += a1; r2 += a2; r3 += a3; }
    }
    for (; i < n; i += kLanes) {
      const int64_t c = n - i < kLanes ? n - i : kLanes;
      m0 = vmax(load_partial(xb + i, c, ninf), m0);
      if (kSum) r0 += load_partial(xb + i, c, 0.0f);
    }
    if (kSum) r_total += (r0 + r1) + (r2 + r3);  // plain: Kahan would turn an infinite sum to NaN
    const float m_blk = hmax(vmax(vmax(m0, m1), vmax(m2, m3)));
    if (m_blk > m_run) {
      if (m_run != ninf) {
        // rescale sum_j exp(t*x_j - t*M_old) to the new shift t*M_new
        const vf f = splat(vexp(splat(m_run * inv_t - m_blk * inv_t))[0]);
        s_total *= f;
        s_comp *= f;
      }
      m_run = m_blk;
    }
    const vf nshift = splat(m_run == ninf ? 0.0f : -(m_run * inv_t));
    // pass B: sum of exp(t*x - shift), the block now in L1; two accumulators (an exp is long
    // enough to hide the add latency)
    vf s0 = zero, s1 = zero;
    for (i = 0; i < n_full; i += kStep) {
      s0 += vexp(load(xb + i) * vt + nshift);
      s1 += vexp(load(xb + i + kLanes) * vt + nshift);
      s0 += vexp(load(xb + i + 2 * kLanes) * vt + nshift);
      s1 += vexp(load(xb + i + 3 * kLanes) * vt + nshift);
    }
    for (; i < n; i += kLanes) {
      const int64_t c = n - i < kLanes ? n - i : kLanes;
      s0 += vexp(load_partial(xb + i, c, ninf) * vt + nshift);
    }
    kahan_add(s_total, s_comp, s0 + s1);
  }
  const float shift = m_run == ninf ? 0.0f : m_run * inv_t;
  ForwardRow out;
  out.lse = shift + std::log(hsum(s_total - s_comp));
  out.logits_sum = kSum ? hsum(r_total) : 0.0f;
  return out;
}

// ---- backward ------------------------------------------------------------------------------

// out_j = g*t * (onehot(l)_j - exp(t*x_j - lse)): one pass that reads x and writes out (which may
// be x itself). The label's logit is read before the pass, then out_l is rewritten from it as
// g*t * (1 - p_l) = g*t * -expm1(t*x_l - lse), which keeps 1 - p_l accurate when p_l is near 1.
template <typename T>
inline void backward_row(const T* x, T* out, int64_t V, int64_t label, float inv_t, float lse,
                         float grad) {
  const float scale = grad * inv_t;
  const float x_label = to_float(x[label]);
  const vf vt = splat(inv_t);
  const vf nlse = splat(-lse);
  const vf nscale = splat(-scale);
  const int64_t n_full = V - V % kStep;
  int64_t i = 0;
  for (; i < n_full; i += kStep) {
    const vf p0 = vexp(load(x + i) * vt + nlse);
    const vf p1 = vexp(load(x + i + kLanes) * vt + nlse);
    const vf p2 = vexp(load(x + i + 2 * kLanes) * vt + nlse);
    const vf p3 = vexp(load(x + i + 3 * kLanes) * vt + nlse);
    store(out + i, nscale * p0);
    store(out + i + kLanes, nscale * p1);
    store(out + i + 2 * kLanes, nscale * p2);
    store(out + i + 3 * kLanes, nscale * p3);
  }
  for (; i < V; i += kLanes) {
    const int64_t c = V - i < kLanes ? V - i : kLanes;
    store_partial(out + i, nscale * vexp(load_partial(x + i, c, 0.0f) * vt + nlse), c);
  }
  out[label] = from_float<T>(-scale * std::expm1(x_label * inv_t - lse));
}

// ---- row ranges (one call per thread chunk) ---------------------------------------------------

template <typename T>
void forward_rows_t(const ForwardArgs& a, int64_t begin, int64_t end) {
  const T* logits = static_cast<const T*>(a.logits);
  for (int64_t k = begin; k < end; ++k) {
    const int64_t row = a.rows[k];
    const T* x = logits + row * a.row_stride;
    const int64_t label = a.labels[row];
    const ForwardRow r = a.logits_sum != nullptr ? forward_row<T, true>(x, a.vocab, a.inv_t)
                                                 : forward_row<T, false>(x, a.vocab, a.inv_t);
    a.lse[row] = r.lse;
    a.logps[row] = to_float(x[label]) * a.inv_t - r.lse;  // a single scalar read of the label
    if (a.logits_sum != nullptr) a.logits_sum[row] = r.logits_sum;
  }
}

template <typename T>
void backward_rows_t(const BackwardArgs& a, int64_t begin, int64_t end) {
  const T* logits = static_cast<const T*>(a.logits);
  T* grad_logits = static_cast<T*>(a.grad_logits);
  for (int64_t k = begin; k < end; ++k) {
    const int64_t row = a.rows[k];
    backward_row<T>(logits + row * a.row_stride, grad_logits + row * a.out_row_stride, a.vocab,
                    a.labels[row], a.inv_t, a.lse[row], a.grad[row]);
  }
}

inline void forward_rows(Dtype dtype, const ForwardArgs& a, int64_t begin, int64_t end) {
  switch (dtype) {
    case Dtype::kFloat32: forward_rows_t<float>(a, begin, end); break;
    case Dtype::kBFloat16: forward_rows_t<c10::BFloat16>(a, begin, end); break;
    case Dtype::kFloat16: forward_rows_t<c10::Half>(a, begin, end); break;
  }
}

inline void backward_rows(Dtype dtype, const BackwardArgs& a, int64_t begin, int64_t end) {
  switch (dtype) {
    case Dtype::kFloat32: backward_rows_t<float>(a, begin, end); break;
    case Dtype::kBFloat16: backward_rows_t<c10::BFloat16>(a, begin, end); break;
    case Dtype::kFloat16: backward_rows_t<c10::Half>(a, begin, end); break;
  }
}

#undef FASTPO_INLINE

}  // namespace FASTPO_ISA
}  // namespace fastpo_native
