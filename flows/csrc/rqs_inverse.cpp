// Fused inverse of the rational-quadratic spline with linear tails (Durkan et al., arXiv:1906.04032),
// for the IAF student's sampling pass (flows/fast.py): one pass over the MADE output per element
// (softmax of widths and heights, knots, bin search, root of the quadratic, optionally log|dx/dy|),
// rows spread over OpenMP threads (the libgomp torch has loaded).
//
// Layout (all C-contiguous):
//   y   (n, d)          noise-side values, rows ldy apart
//   p   (n, 3K - 1, d)  unnormalised widths [0, K), heights [K, 2K), interior derivatives [2K, 3K - 1)
//   x   (n, d)          data-side values, rows ldx apart (output; must not alias y or p)
//   lad (n,)            if not null: lad[r] += sum_j log|dx_j / dy_j|
// The arithmetic follows nflows' unconstrained_rational_quadratic_spline(inverse=True, tails="linear"):
// identity outside [-B, B]; minimum bin width/height/derivative; end derivatives = edge_d; the bin is the
// number of interior height knots <= y (nflows' searchsorted).
//
// Two implementations of the same arithmetic: a scalar one (any T; float64, remainders, CPUs without
// AVX2) and an AVX2/FMA one for float32, eight features per step, all selections as blends. Its exp and
// log are Cephes-style polynomials (S. L. Moshier's single-precision coefficients, a few ulp).
// Compiled at run time by flows/native.py; calodistill's own code.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CALODISTILL_AVX2 1
#endif

namespace {

template <typename T>
inline T softplus(T v) {
    // torch.nn.functional.softplus (beta 1, threshold 20)
    return v > T(20) ? v : std::log1p(std::exp(v));
}

struct Spec {
    double bound, min_w, min_h, min_d, edge_d;
};

// One feature j of one row, scalar.
template <typename T, int K>
inline T spline_one(const T* y, const T* p, int64_t j, int64_t d, const Spec& s, T* lad) {
    const T bound = T(s.bound), min_w = T(s.min_w), min_h = T(s.min_h), min_d = T(s.min_d);
    const T* pw = p + j;
    const T* ph = p + K * d + j;
    const T* pd = p + 2 * K * d + j;
    const T yin = y[j];
    const T yc = std::min(std::max(yin, -bound), bound);
    T ew[K], eh[K];
    T mw = pw[0], mh = ph[0];
    for (int k = 1; k < K; ++k) {
        mw = std::max(mw, pw[k * d]);
        mh = std::max(mh, ph[k * d]);
    }
    T sw = 0, sh = 0;
    for (int k = 0; k < K; ++k) {
        ew[k] = std::exp(pw[k * d] - mw);
        eh[k] = std::exp(ph[k * d] - mh);
        sw += ew[k];
        sh += eh[k];
    }
    const T scale_w = (T(1) - min_w * K) / sw, scale_h = (T(1) - min_h * K) / sh;
    T acc_w = 0, acc_h = 0, cw = -bound, ch = -bound;
    T sel_cw = -bound, sel_w = 0, sel_ch = -bound, sel_h = 0;
    int sel = 0;
    for (int k = 0; k < K; ++k) {
        acc_w += min_w + scale_w * ew[k];
        acc_h += min_h + scale_h * eh[k];
        const T ncw = (k == K - 1) ? bound : T(2) * bound * acc_w - bound;
        const T nch = (k == K - 1) ? bound : T(2) * bound * acc_h - bound;
        if (k == 0 || yc >= ch) {
            sel_cw = cw;
            sel_w = ncw - cw;
            sel_ch = ch;
            sel_h = nch - ch;
            sel = k;
        }
        cw = ncw;
        ch = nch;
    }
    const T d0 = sel == 0 ? T(s.edge_d) : min_d + softplus(pd[(sel - 1) * d]);
    const T d1 = sel == K - 1 ? T(s.edge_d) : min_d + softplus(pd[sel * d]);
    const T delta = sel_h / sel_w;
    const T slope_sum = d0 + d1 - T(2) * delta;
    const T dy = yc - sel_ch;
    const T a = sel_h * (delta - d0) + dy * slope_sum;
    const T b = sel_h * d0 - dy * slope_sum;
    const T c = delta * dy;  // minus nflows' c
    const T disc = std::max(b * b + T(4) * a * c, T(0));
    const T root = T(2) * c / (b + std::sqrt(disc));
    if (yin < -bound || yin > bound) return yin;  // linear tails: identity, log|det| 0
    if (lad != nullptr) {
        const T t1 = root * (T(1) - root);
        const T den = delta + slope_sum * t1;
        const T om = T(1) - root;
        const T num = delta * delta * (d1 * root * root + T(2) * delta * t1 + d0 * om * om);
        *lad += T(2) * std::log(den) - std::log(num);
    }
    return root * sel_w + sel_cw;
}

template <typename T, int K>
void spline_cols(const T* y, const T* p, T* x, T* lad, int64_t j0, int64_t d, const Spec& s) {
    T total = 0;
    for (int64_t j = j0; j < d; ++j) x[j] = spline_one<T, K>(y, p, j, d, s, lad != nullptr ? &total : nullptr);
    if (lad != nullptr) *lad += total;
}

#ifdef CALODISTILL_AVX2
inline __m256 exp8(__m256 x) {
    // e^x = 2^n e^r, n = round(x / ln 2), |r| <= ln2 / 2, e^r by a degree-7 polynomial (Cephes expf)
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 q = _mm256_set1_ps(1.9875691500e-4f);
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.3981999507e-3f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(8.3334519073e-3f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(4.1665795894e-2f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.6666665459e-1f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(5.0000001201e-1f));
    q = _mm256_fmadd_ps(q, _mm256_mul_ps(r, r), r);
    q = _mm256_add_ps(q, _mm256_set1_ps(1.0f));
    const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(q, _mm256_castsi256_ps(n));
}

inline __m256 log8(__m256 x) {
    // x > 0, normal: x = m 2^e with m in [sqrt(1/2), sqrt(2)); log(m) by Cephes logf's polynomial
    const __m256i xi = _mm256_castps_si256(x);
    __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(xi, 23), _mm256_set1_epi32(126)));
    __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(xi, _mm256_set1_epi32(0x007fffff)),
                                                   _mm256_set1_epi32(0x3f000000)));  // [0.5, 1)
    const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
    e = _mm256_sub_ps(e, _mm256_and_ps(small, _mm256_set1_ps(1.0f)));
    m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), _mm256_set1_ps(1.0f));
    const __m256 z = _mm256_mul_ps(m, m);
    __m256 q = _mm256_set1_ps(7.0376836292e-2f);
    q = _mm256_fmadd_ps(q, m, _mm256_set1_ps(-1.1514610310e-1f));
    q = _mm256_fmadd_ps(q, m, _mm256_set1_ps(1.1676998740e-1f));
    q = _mm256_fmadd_ps(q, m, _mm256_set1_ps(-1.2420140846e-1f));
    q = _mm256_fmadd_ps(q, m, _mm256_set1_ps(1.4249322787e-1f));
    q = _mm256_fmadd_ps(q, m, _mm256_set1_ps(-1.6668057665e-1f));
    q = _mm256_fmadd_ps(q, m, _mm256_set1_ps(2.0000714765e-1f));
    q = _mm256_fmadd_ps(q, m, _mm256_set1_ps(-2.4999993993e-1f));
    q = _mm256_fmadd_ps(q, m, _mm256_set1_ps(3.3333331174e-1f));
    q = _mm256_mul_ps(_mm256_mul_ps(q, m), z);
    q = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), q);
    q = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, q);
    return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(m, q));
}

inline __m256 softplus8(__m256 v) {
    // max(v, 0) + log(1 + e^-|v|); torch's threshold (v > 20 -> v) agrees to float precision
    const __m256 absv = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
    const __m256 t = exp8(_mm256_sub_ps(_mm256_setzero_ps(), absv));
    const __m256 u = _mm256_add_ps(_mm256_set1_ps(1.0f), t);
    // log1p(t) = log(u) - (u - 1 - t) / u: corrects the rounding of 1 + t for small t
    const __m256 corr = _mm256_div_ps(_mm256_sub_ps(_mm256_sub_ps(u, _mm256_set1_ps(1.0f)), t), u);
    return _mm256_add_ps(_mm256_max_ps(v, _mm256_setzero_ps()), _mm256_sub_ps(log8(u), corr));
}

template <int K, bool LAD>
void spline_row_avx2(const float* y, const float* p, float* x, float* lad, int64_t d, const Spec& s) {
    const __m256 bound = _mm256_set1_ps(float(s.bound)), nbound = _mm256_set1_ps(-float(s.bound));
    const __m256 two_b = _mm256_set1_ps(float(2 * s.bound));
    const __m256 min_w = _mm256_set1_ps(float(s.min_w)), min_h = _mm256_set1_ps(float(s.min_h));
    const __m256 min_d = _mm256_set1_ps(float(s.min_d)), edge_d = _mm256_set1_ps(float(s.edge_d));
    const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f), zero = _mm256_setzero_ps();
    const __m256 scale_w0 = _mm256_set1_ps(float(1 - s.min_w * K)), scale_h0 = _mm256_set1_ps(float(1 - s.min_h * K));
    __m256 total = zero;
    const int64_t d8 = d - d % 8;
    for (int64_t j = 0; j < d8; j += 8) {
        const float* pw = p + j;
        const float* ph = p + K * d + j;
        const float* pd = p + 2 * K * d + j;
        const __m256 yin = _mm256_loadu_ps(y + j);
        const __m256 yc = _mm256_min_ps(_mm256_max_ps(yin, nbound), bound);
        __m256 ew[K], eh[K];
        __m256 mw = _mm256_loadu_ps(pw), mh = _mm256_loadu_ps(ph);
        for (int k = 1; k < K; ++k) {
            mw = _mm256_max_ps(mw, _mm256_loadu_ps(pw + k * d));
            mh = _mm256_max_ps(mh, _mm256_loadu_ps(ph + k * d));
        }
        __m256 sw = zero, sh = zero;
        for (int k = 0; k < K; ++k) {
            ew[k] = exp8(_mm256_sub_ps(_mm256_loadu_ps(pw + k * d), mw));
            eh[k] = exp8(_mm256_sub_ps(_mm256_loadu_ps(ph + k * d), mh));
            sw = _mm256_add_ps(sw, ew[k]);
            sh = _mm256_add_ps(sh, eh[k]);
        }
        const __m256 scale_w = _mm256_div_ps(scale_w0, sw), scale_h = _mm256_div_ps(scale_h0, sh);
        __m256 acc_w = zero, acc_h = zero, cw = nbound, ch = nbound;
        __m256 sel_cw = nbound, sel_w = zero, sel_ch = nbound, sel_h = zero, u0 = zero, u1 = zero;
        __m256 first = _mm256_castsi256_ps(_mm256_set1_epi32(-1)), last = zero;
        for (int k = 0; k < K; ++k) {
            acc_w = _mm256_add_ps(acc_w, _mm256_fmadd_ps(scale_w, ew[k], min_w));
            acc_h = _mm256_add_ps(acc_h, _mm256_fmadd_ps(scale_h, eh[k], min_h));
            const __m256 ncw = (k == K - 1) ? bound : _mm256_fmsub_ps(two_b, acc_w, bound);
            const __m256 nch = (k == K - 1) ? bound : _mm256_fmsub_ps(two_b, acc_h, bound);
            if (k == 0) {
                sel_w = _mm256_sub_ps(ncw, cw);
                sel_h = _mm256_sub_ps(nch, ch);
                if (K > 1) u1 = _mm256_loadu_ps(pd);
            } else {
                const __m256 in = _mm256_cmp_ps(yc, ch, _CMP_GE_OQ);
                sel_cw = _mm256_blendv_ps(sel_cw, cw, in);
                sel_w = _mm256_blendv_ps(sel_w, _mm256_sub_ps(ncw, cw), in);
                sel_ch = _mm256_blendv_ps(sel_ch, ch, in);
                sel_h = _mm256_blendv_ps(sel_h, _mm256_sub_ps(nch, ch), in);
                u0 = _mm256_blendv_ps(u0, _mm256_loadu_ps(pd + (k - 1) * d), in);
                if (k < K - 1) u1 = _mm256_blendv_ps(u1, _mm256_loadu_ps(pd + k * d), in);
                first = _mm256_andnot_ps(in, first);
                if (k == K - 1) last = in;
            }
            cw = ncw;
            ch = nch;
        }
        const __m256 d0 = _mm256_blendv_ps(_mm256_add_ps(min_d, softplus8(u0)), edge_d, first);
        const __m256 d1 = _mm256_blendv_ps(_mm256_add_ps(min_d, softplus8(u1)), edge_d, last);
        const __m256 delta = _mm256_div_ps(sel_h, sel_w);
        const __m256 slope_sum = _mm256_fnmadd_ps(two, delta, _mm256_add_ps(d0, d1));
        const __m256 dy = _mm256_sub_ps(yc, sel_ch);
        const __m256 a = _mm256_fmadd_ps(dy, slope_sum, _mm256_mul_ps(sel_h, _mm256_sub_ps(delta, d0)));
        const __m256 b = _mm256_fnmadd_ps(dy, slope_sum, _mm256_mul_ps(sel_h, d0));
        const __m256 c = _mm256_mul_ps(delta, dy);  // minus nflows' c
        const __m256 disc = _mm256_max_ps(_mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(4.0f), a), c,
                                                          _mm256_mul_ps(b, b)), zero);
        const __m256 root = _mm256_div_ps(_mm256_mul_ps(two, c), _mm256_add_ps(b, _mm256_sqrt_ps(disc)));
        const __m256 outside = _mm256_or_ps(_mm256_cmp_ps(yin, nbound, _CMP_LT_OQ),
                                            _mm256_cmp_ps(yin, bound, _CMP_GT_OQ));
        _mm256_storeu_ps(x + j, _mm256_blendv_ps(_mm256_fmadd_ps(root, sel_w, sel_cw), yin, outside));
        if (LAD) {
            const __m256 om = _mm256_sub_ps(one, root);
            const __m256 t1 = _mm256_mul_ps(root, om);
            const __m256 den = _mm256_fmadd_ps(slope_sum, t1, delta);
            __m256 num = _mm256_mul_ps(d1, _mm256_mul_ps(root, root));
            num = _mm256_fmadd_ps(_mm256_mul_ps(two, delta), t1, num);
            num = _mm256_fmadd_ps(d0, _mm256_mul_ps(om, om), num);
            num = _mm256_mul_ps(_mm256_mul_ps(delta, delta), num);
            const __m256 l = _mm256_fmsub_ps(two, log8(den), log8(num));
            total = _mm256_add_ps(total, _mm256_andnot_ps(outside, l));
        }
    }
    if (LAD) {
        alignas(32) float parts[8];
        _mm256_store_ps(parts, total);
        float sum = 0;
        for (float v : parts) sum += v;
        *lad += sum;
    }
    if (d8 < d) spline_cols<float, K>(y, p, x, LAD ? lad : nullptr, d8, d, s);
}
#endif

template <typename T, int K>
void spline_rows(const T* y, const T* p, T* x, T* lad, int64_t n, int64_t d, int64_t ldy, int64_t ldx,
                 const Spec& s, int threads) {
    const int64_t m = 3 * K - 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        T* lr = lad != nullptr ? lad + r : nullptr;
#ifdef CALODISTILL_AVX2
        if constexpr (std::is_same_v<T, float>) {
            if (lr != nullptr)
                spline_row_avx2<K, true>(y + r * ldy, p + r * m * d, x + r * ldx, lr, d, s);
            else
                spline_row_avx2<K, false>(y + r * ldy, p + r * m * d, x + r * ldx, nullptr, d, s);
            continue;
        }
#endif
        spline_cols<T, K>(y + r * ldy, p + r * m * d, x + r * ldx, lr, 0, d, s);
    }
}

template <typename T>
int dispatch(const T* y, const T* p, T* x, T* lad, int64_t n, int64_t d, int64_t ldy, int64_t ldx,
             int64_t bins, const Spec& s, int threads) {
    if (threads < 1) threads = 1;
#define CALODISTILL_BINS(KK)                                       \
    case KK:                                                      \
        spline_rows<T, KK>(y, p, x, lad, n, d, ldy, ldx, s, threads);       \
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

int calodistill_rqs_inverse_f32(const float* y, const float* p, float* x, float* lad, int64_t n, int64_t d,
                                int64_t ldy, int64_t ldx, int64_t bins, double bound, double min_w, double min_h, double min_d,
                                double edge_d, int threads) {
    return dispatch<float>(y, p, x, lad, n, d, ldy, ldx, bins, Spec{bound, min_w, min_h, min_d, edge_d}, threads);
}

int calodistill_rqs_inverse_f64(const double* y, const double* p, double* x, double* lad, int64_t n,
                                int64_t d, int64_t ldy, int64_t ldx, int64_t bins, double bound, double min_w, double min_h,
                                double min_d, double edge_d, int threads) {
    return dispatch<double>(y, p, x, lad, n, d, ldy, ldx, bins, Spec{bound, min_w, min_h, min_d, edge_d}, threads);
}

int calodistill_rqs_supported_bins(int64_t bins) {
    switch (bins) {
        case 2: case 3: case 4: case 5: case 6: case 8: case 10: case 12: case 16:
            return 1;
        default:
            return 0;
    }
}

int calodistill_rqs_vectorised(void) {
#ifdef CALODISTILL_AVX2
    return 1;
#else
    return 0;
#endif
}

}  // extern "C"
