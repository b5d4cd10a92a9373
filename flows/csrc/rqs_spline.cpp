// The rational-quadratic spline with linear tails (Durkan et al., arXiv:1906.04032) for training: forward
// (data -> noise) and inverse (noise -> data), each with its backward, one pass per element, vectorised
// over features (GCC vector extensions: 8 float32 or 4 float64 lanes), rows spread over OpenMP threads
// (the libgomp torch has loaded).
//
// Layout (all C-contiguous; the parameters in nflows' layout, as the MADE outputs them):
//   v     (n, d)          inputs: x (forward) or y (inverse)
//   p     (n, d, 3K - 1)  per feature: unnormalised widths [0, K), heights [K, 2K), interior derivatives
//   out   (n, d)          outputs
//   lad   (n,)            row sums of log|d out / d v| (written)
// Backward: given g_out (n, d) and g_lad (n,), writes g_v (n, d) and/or g_p (n, d, 3K - 1) (either may be
// null). Each group of lanes is transposed into a small tile first. The arithmetic follows flows.transforms.rq_spline_linear_tails (nflows' linear-tail spline):
// identity outside [-B, B]; knots from softmax + minimum size + cumulative sum, end knots exactly -B, B;
// end derivatives = edge_d; the bin is the number of interior knots <= v (nflows' searchsorted).
//
// The backward is analytic. For the forward map y = f(x; p) it differentiates y and l = log f' in the
// bin's local variables (theta, delta = H / W, d0, d1, H, the knots) and carries the gradient back through
// the knots (cumulative sum, softmax) and the softplus of the derivatives. The inverse x = f^-1(y; p) uses
// the implicit-function theorem at the computed root: dx/dy = 1 / f'(x), dx/dp = -(df/dp) / f'(x) and
// log|dx/dy| = -l(x); so its parameter gradient is the forward's at x with upstream gradients (-G, -g_lad),
// G = (g_x - g_lad dl/dx) / f'(x), and G is the gradient of y.
// float32 exp/log are Cephes-style polynomials (S. L. Moshier's single-precision coefficients, a few ulp,
// as in rqs_inverse.cpp); float64 uses the C library's. Compiled at run time by flows/native.py;
// calodistill's own code.

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef double vd4 __attribute__((vector_size(32)));
typedef int64_t vl4 __attribute__((vector_size(32)));

template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
    using V = vf8;
    using I = vi8;
    static constexpr int W = 8;
};
template <>
struct Lanes<double> {
    using V = vd4;
    using I = vl4;
    static constexpr int W = 4;
};

template <typename V>
inline V load(const void* ptr) {
    V v;
    std::memcpy(&v, ptr, sizeof(V));
    return v;
}

template <typename V>
inline void store(void* ptr, V v) {
    std::memcpy(ptr, &v, sizeof(V));
}

template <typename V>
inline V vmin(V a, V b) { return a < b ? a : b; }
template <typename V>
inline V vmax(V a, V b) { return a > b ? a : b; }

inline vf8 vexp(vf8 x) {
    // e^x = 2^n e^r, n = floor(x / ln 2 + 1/2), |r| <= ln2 / 2, e^r by Cephes expf's polynomial
    x = vmin(vmax(x, vf8{} - 87.0f), vf8{} + 88.0f);
    const vf8 t = x * 1.44269504088896341f + 0.5f;
    vi8 n = __builtin_convertvector(t, vi8);
    n += (__builtin_convertvector(n, vf8) > t);  // truncation -> floor (the mask is -1 where it rounded up)
    const vf8 fx = __builtin_convertvector(n, vf8);
    vf8 r = x - fx * 0.693359375f;
    r = r - fx * -2.12194440e-4f;
    vf8 q = vf8{} + 1.9875691500e-4f;
    q = q * r + 1.3981999507e-3f;
    q = q * r + 8.3334519073e-3f;
    q = q * r + 4.1665795894e-2f;
    q = q * r + 1.6666665459e-1f;
    q = q * r + 5.0000001201e-1f;
    q = q * (r * r) + r + 1.0f;
    const vi8 pw = (n + 127) << 23;
    return q * (vf8)pw;
}

inline vf8 vlog(vf8 x) {
    // x > 0, normal: x = m 2^e with m in [sqrt(1/2), sqrt(2)); log(m) by Cephes logf's polynomial
    const vi8 xi = (vi8)x;
    vf8 e = __builtin_convertvector(((xi >> 23) & 0xff) - 126, vf8);
    vf8 m = (vf8)((xi & 0x007fffff) | 0x3f000000);  // [0.5, 1)
    const vi8 small = m < 0.707106781186547524f;
    e = small ? e - 1.0f : e;
    m = (small ? m + m : m) - 1.0f;
    const vf8 z = m * m;
    vf8 q = vf8{} + 7.0376836292e-2f;
    q = q * m - 1.1514610310e-1f;
    q = q * m + 1.1676998740e-1f;
    q = q * m - 1.2420140846e-1f;
    q = q * m + 1.4249322787e-1f;
    q = q * m - 1.6668057665e-1f;
    q = q * m + 2.0000714765e-1f;
    q = q * m - 2.4999993993e-1f;
    q = q * m + 3.3333331174e-1f;
    q = q * m * z;
    q = q + e * -2.12194440e-4f;
    q = q - 0.5f * z;
    return m + q + e * 0.693359375f;
}

inline vd4 vexp(vd4 x) {
    vd4 r;
    for (int i = 0; i < 4; ++i) r[i] = std::exp(x[i]);
    return r;
}

inline vd4 vlog(vd4 x) {
    vd4 r;
    for (int i = 0; i < 4; ++i) r[i] = std::log(x[i]);
    return r;
}

inline vd4 vsqrt(vd4 x) {
    vd4 r;
    for (int i = 0; i < 4; ++i) r[i] = std::sqrt(x[i]);
    return r;
}

inline vf8 vsqrt(vf8 x) {
    vf8 r;
    for (int i = 0; i < 8; ++i) r[i] = std::sqrt(x[i]);  // vectorised by the compiler (vsqrtps)
    return r;
}

template <typename V>
inline V softplus(V v) {
    // torch.nn.functional.softplus (beta 1, threshold 20): max(v, 0) + log1p(e^-|v|), exact to rounding
    const V a = v < 0 ? -v : v;
    const V t = vexp(-a);
    const V u = 1 + t;
    const V corr = ((u - 1) - t) / u;  // log1p(t) = log(u) - (u - 1 - t) / u
    return vmax(v, V{}) + (vlog(u) - corr);
}

template <typename V>
inline V softplus_grad(V v) {
    return v > 20 ? V{} + 1 : 1 / (1 + vexp(-v));
}

struct Spec {
    double bound, min_w, min_h, min_d, edge_d;
};

// One group of lanes: the bin of each and the spline's local variables there.
template <typename T, int K>
struct Local {
    using V = typename Lanes<T>::V;
    V ew[K], eh[K];  // softmax of the unnormalised widths / heights
    V cw, w, ch, h;  // the bin's left knots and sizes
    V u0, u1;        // unnormalised derivatives at the bin's knots (interior ones)
    V d0, d1;        // derivatives at the bin's knots
    V bin;           // bin index, as T
};

// p points at slot 0 of the lanes; slot k lies at p + k * ld.
template <typename T, int K>
inline void locate(const T* p, int64_t ld, typename Lanes<T>::V vc, bool by_heights, const Spec& s,
                   Local<T, K>& L) {
    using V = typename Lanes<T>::V;
    const T bound = T(s.bound);
    V uw[K], uh[K];
    V mw = load<V>(p), mh = load<V>(p + K * ld);
    for (int k = 0; k < K; ++k) {
        uw[k] = load<V>(p + k * ld);
        uh[k] = load<V>(p + (K + k) * ld);
        mw = vmax(mw, uw[k]);
        mh = vmax(mh, uh[k]);
    }
    V sw{}, sh{};
    for (int k = 0; k < K; ++k) {
        L.ew[k] = vexp(uw[k] - mw);
        L.eh[k] = vexp(uh[k] - mh);
        sw += L.ew[k];
        sh += L.eh[k];
    }
    const V iw = 1 / sw, ih = 1 / sh;
    const T scale_w = T(1) - T(s.min_w) * K, scale_h = T(1) - T(s.min_h) * K;
    V acc_w{}, acc_h{}, cw = V{} - bound, ch = V{} - bound;
    const T* pd = p + 2 * K * ld;
    for (int k = 0; k < K; ++k) {
        L.ew[k] *= iw;
        L.eh[k] *= ih;
        acc_w += T(s.min_w) + scale_w * L.ew[k];
        acc_h += T(s.min_h) + scale_h * L.eh[k];
        const V ncw = (k == K - 1) ? V{} + bound : T(2) * bound * acc_w - bound;
        const V nch = (k == K - 1) ? V{} + bound : T(2) * bound * acc_h - bound;
        if (k == 0) {
            L.cw = cw;
            L.w = ncw - cw;
            L.ch = ch;
            L.h = nch - ch;
            L.bin = V{};
            L.u0 = V{};
            L.u1 = K > 1 ? load<V>(pd) : V{};
        } else {
            const auto in = vc >= (by_heights ? ch : cw);
            L.cw = in ? cw : L.cw;
            L.w = in ? ncw - cw : L.w;
            L.ch = in ? ch : L.ch;
            L.h = in ? nch - ch : L.h;
            L.bin = in ? V{} + T(k) : L.bin;
            L.u0 = in ? load<V>(pd + (k - 1) * ld) : L.u0;
            if (k < K - 1) L.u1 = in ? load<V>(pd + k * ld) : L.u1;
        }
        cw = ncw;
        ch = nch;
    }
    L.d0 = L.bin == 0 ? V{} + T(s.edge_d) : T(s.min_d) + softplus(L.u0);
    L.d1 = L.bin == T(K - 1) ? V{} + T(s.edge_d) : T(s.min_d) + softplus(L.u1);
}

template <typename T, int K>
inline typename Lanes<T>::V root_of(const Local<T, K>& L, typename Lanes<T>::V y) {
    using V = typename Lanes<T>::V;
    const V delta = L.h / L.w;
    const V slope_sum = L.d0 + L.d1 - 2 * delta;
    const V dy = y - L.ch;
    const V a = dy * slope_sum + L.h * (delta - L.d0);
    const V b = L.h * L.d0 - dy * slope_sum;
    const V c = -delta * dy;
    const V disc = vmax(b * b - 4 * a * c, V{});
    return (2 * c) / (-b - vsqrt(disc));
}

// Forward / inverse of one group of lanes; returns the lanes' contribution to log|det|.
template <typename T, int K>
inline typename Lanes<T>::V forward_lanes(const T* v, const T* p, int64_t ld, T* out, bool inverse,
                                          const Spec& s) {
    using V = typename Lanes<T>::V;
    const T bound = T(s.bound);
    const V vin = load<V>(v);
    const V vc = vmin(vmax(vin, V{} - bound), V{} + bound);
    Local<T, K> L;
    locate<T, K>(p, ld, vc, inverse, s, L);
    const V delta = L.h / L.w;
    const V theta = inverse ? root_of<T, K>(L, vc) : (vc - L.cw) / L.w;
    const V t = theta * (1 - theta);
    const V om = 1 - theta;
    const V den = delta + (L.d0 + L.d1 - 2 * delta) * t;
    const V l = vlog(delta * delta * (L.d1 * theta * theta + 2 * delta * t + L.d0 * om * om)) - 2 * vlog(den);
    const V res = inverse ? theta * L.w + L.cw : L.ch + L.h * (delta * theta * theta + L.d0 * t) / den;
    const auto outside = (vin < -bound) | (vin > bound);
    store(out, outside ? vin : res);
    return outside ? V{} : (inverse ? -l : l);
}

template <typename T, int K>
inline void backward_lanes(const T* v, const T* p, int64_t ld, const T* g_out, typename Lanes<T>::V gl_row,
                           T* g_v, T* g_p, bool inverse, const Spec& s) {
    using V = typename Lanes<T>::V;
    const T bound = T(s.bound);
    const V vin = load<V>(v);
    const V vc = vmin(vmax(vin, V{} - bound), V{} + bound);
    const auto outside = (vin < -bound) | (vin > bound);
    const V go = load<V>(g_out);
    Local<T, K> L;
    locate<T, K>(p, ld, vc, inverse, s, L);
    const V delta = L.h / L.w;
    const V iw = 1 / L.w;
    const V theta = inverse ? root_of<T, K>(L, vc) : (vc - L.cw) * iw;
    // partial derivatives of y = f(x) and of l = log f'(x) in theta, delta, d0, d1 (and y in H)
    const V t = theta * (1 - theta);
    const V u = 1 - 2 * theta;
    const V om = 1 - theta;
    const V ss = L.d0 + L.d1 - 2 * delta;
    const V den = delta + ss * t;
    const V P = delta * theta * theta + L.d0 * t;
    const V q = L.d1 * theta * theta + 2 * delta * t + L.d0 * om * om;
    const V iden = 1 / den, iq = 1 / q;
    const V hd2 = L.h * iden * iden;
    const V y_th = hd2 * ((2 * delta * theta + L.d0 * u) * den - P * ss * u);
    const V y_de = hd2 * (theta * theta * den - P * (1 - 2 * t));
    const V y_d0 = hd2 * t * (den - P);
    const V y_d1 = -hd2 * P * t;
    const V y_h = P * iden;
    const V l_th = 2 * (L.d1 * theta + delta * u - L.d0 * om) * iq - 2 * ss * u * iden;
    const V l_de = 2 / delta + 2 * t * iq - 2 * (1 - 2 * t) * iden;
    const V l_d0 = om * om * iq - 2 * t * iden;
    const V l_d1 = theta * theta * iq - 2 * t * iden;
    V gy, gl;
    if (inverse) {
        const V G = (go - gl_row * l_th * iw) / (y_th * iw);
        if (g_v != nullptr) store(g_v, outside ? go : G);
        gy = -G;
        gl = -gl_row;
    } else {
        gy = go;
        gl = gl_row;
        if (g_v != nullptr) store(g_v, outside ? go : (gy * y_th + gl * l_th) * iw);
    }
    if (g_p == nullptr) return;
    gy = outside ? V{} : gy;
    gl = outside ? V{} : gl;
    const V G_th = gy * y_th + gl * l_th;
    const V G_de = gy * y_de + gl * l_de;
    const V G_d0 = gy * y_d0 + gl * l_d0;
    const V G_d1 = gy * y_d1 + gl * l_d1;
    const V g_cw = -G_th * iw;
    const V g_w = -(G_th * theta + G_de * delta) * iw;
    const V g_h = gy * y_h + G_de * iw;
    const V g_ch = gy;
    // knot gradients: left knot (bin) and right knot (bin + 1); only interior knots are free
    const V b = L.bin;
    const V kw_l = b >= 1 ? g_cw - g_w : V{}, kw_r = b <= T(K - 2) ? g_w : V{};
    const V kh_l = b >= 1 ? g_ch - g_h : V{}, kh_r = b <= T(K - 2) ? g_h : V{};
    // knot j = 2B * sum_{i<j} size_i - B: size i feeds the knots j > i
    const T cw2 = T(2 * s.bound) * (T(1) - T(s.min_w) * K), ch2 = T(2 * s.bound) * (T(1) - T(s.min_h) * K);
    V gew[K], geh[K];
    V dot_w{}, dot_h{};
    for (int i = 0; i < K; ++i) {
        gew[i] = cw2 * (b > T(i) ? kw_l + kw_r : (b == T(i) ? kw_r : V{}));
        geh[i] = ch2 * (b > T(i) ? kh_l + kh_r : (b == T(i) ? kh_r : V{}));
        dot_w += L.ew[i] * gew[i];
        dot_h += L.eh[i] * geh[i];
    }
    for (int i = 0; i < K; ++i) {
        store(g_p + i * ld, L.ew[i] * (gew[i] - dot_w));
        store(g_p + (K + i) * ld, L.eh[i] * (geh[i] - dot_h));
    }
    const V s0 = G_d0 * softplus_grad(L.u0), s1 = G_d1 * softplus_grad(L.u1);
    for (int k = 0; k < K - 1; ++k)
        store(g_p + (2 * K + k) * ld, b == T(k + 1) ? s0 : (b == T(k) ? s1 : V{}));
}

template <typename T, int K>
void run(const T* v, const T* p, T* out, T* lad, const T* g_out, const T* g_lad, T* g_v, T* g_p, int64_t n,
         int64_t d, bool inverse, bool backward, const Spec& s, int threads) {
    using V = typename Lanes<T>::V;
    constexpr int W = Lanes<T>::W;
    constexpr int M = 3 * K - 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        V total{};
        // W features at a time; their parameters transposed into a tile (slot k of lane i at k * W + i),
        // the last group padded with v = 0, p = 0, g_out = 0
        T tv[W], tp[M * W], to[W], tg[W], tgv[W], tgp[M * W];
        for (int64_t j = 0; j < d; j += W) {
            const int lanes = int(d - j < W ? d - j : W);
            const T* pj = p + (r * d + j) * M;
            for (int i = 0; i < W; ++i) {
                const bool ok = i < lanes;
                tv[i] = ok ? v[r * d + j + i] : T(0);
                if (backward) tg[i] = ok ? g_out[r * d + j + i] : T(0);
                for (int k = 0; k < M; ++k) tp[k * W + i] = ok ? pj[i * M + k] : T(0);
            }
            if (backward) {
                backward_lanes<T, K>(tv, tp, W, tg, V{} + g_lad[r], tgv, g_p != nullptr ? tgp : nullptr, inverse, s);
                for (int i = 0; i < lanes; ++i) {
                    if (g_v != nullptr) g_v[r * d + j + i] = tgv[i];
                    if (g_p != nullptr)
                        for (int k = 0; k < M; ++k) g_p[(r * d + j + i) * M + k] = tgp[k * W + i];
                }
            } else {
                const V part = forward_lanes<T, K>(tv, tp, W, to, inverse, s);
                for (int i = 0; i < lanes; ++i) {
                    out[r * d + j + i] = to[i];
                    total[i] += part[i];
                }
            }
        }
        if (!backward) {
            T sum = 0;
            for (int i = 0; i < W; ++i) sum += total[i];
            lad[r] = sum;
        }
    }
}

template <typename T>
int dispatch(const T* v, const T* p, T* out, T* lad, const T* g_out, const T* g_lad, T* g_v, T* g_p, int64_t n,
             int64_t d, int64_t bins, int inverse, int backward, const Spec& s, int threads) {
    if (threads < 1) threads = 1;
#define CALODISTILL_BINS(KK)                                                                              \
    case KK:                                                                                             \
        run<T, KK>(v, p, out, lad, g_out, g_lad, g_v, g_p, n, d, inverse != 0, backward != 0, s, threads); \
        return 0;
    switch (bins) {
        CALODISTILL_BINS(2)
        CALODISTILL_BINS(3)
        CALODISTILL_BINS(4)
        CALODISTILL_BINS(5)
        CALODISTILL_BINS(6)
        CALODISTILL_BINS(8)
        CALODISTILL_BINS(10)
        CALODISTILL_BINS(12)
        CALODISTILL_BINS(16)
        default:
            return -1;
    }
#undef CALODISTILL_BINS
}

}  // namespace

extern "C" {

int calodistill_rqs_train_f32(const float* v, const float* p, float* out, float* lad, const float* g_out,
                              const float* g_lad, float* g_v, float* g_p, int64_t n, int64_t d, int64_t bins,
                              int inverse, int backward, double bound, double min_w, double min_h, double min_d,
                              double edge_d, int threads) {
    return dispatch<float>(v, p, out, lad, g_out, g_lad, g_v, g_p, n, d, bins, inverse, backward,
                           Spec{bound, min_w, min_h, min_d, edge_d}, threads);
}

int calodistill_rqs_train_f64(const double* v, const double* p, double* out, double* lad, const double* g_out,
                              const double* g_lad, double* g_v, double* g_p, int64_t n, int64_t d, int64_t bins,
                              int inverse, int backward, double bound, double min_w, double min_h, double min_d,
                              double edge_d, int threads) {
    return dispatch<double>(v, p, out, lad, g_out, g_lad, g_v, g_p, n, d, bins, inverse, backward,
                            Spec{bound, min_w, min_h, min_d, edge_d}, threads);
}

}  // extern "C"
