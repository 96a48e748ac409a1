/*
 * cndiff._kernels: the numpy backend's fused float32 kernels, in C.
 *
 * Why a native kernel: on x86 numpy converts float32 to float16 one element at a time
 * (about 5 ns each; numpy issue #28753), and a difference model needs a subtraction, a
 * max |d| and a rounding over every element: as separate numpy calls that is six passes
 * over each chunk and most of extract's time. Here one pass does it all, with the F16C
 * instruction (AVX2) where the CPU has it, and a portable scalar loop elsewhere.
 *
 * Every function gives the same bits as the numpy kernels of numpy_backend.py (and as
 * torch's casts): IEEE float32 subtraction/addition (compiled without contraction or
 * fast-math), round-to-nearest-even to float16 (F16C, or the same rule in integer steps)
 * and to bfloat16 (NaN -> 0xFFFF, as torch on x86). tests/test_backends.py checks both
 * paths against torch and against each other. The GIL is released while they run.
 *
 * The module is optional: when it cannot be built, cndiff uses numpy alone.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CNDIFF_X86 1
#include <immintrin.h>
#endif

enum { OP_COPY = 0, OP_SUB = 1, OP_ADD = 2 };
enum { OUT_F32 = 0, OUT_F16 = 1, OUT_BF16 = 2 };

/* -- scalar conversions (the reference every path must equal) ------------------------- */

static inline uint32_t f32_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float bits_f32(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

/* float32 -> float16, round to nearest even; NaN keeps its sign and top payload bits and
   becomes quiet (what x86's F16C does). */
static inline uint16_t f16_scalar(float x) {
    uint32_t u = f32_bits(x);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7FFFFFFFu;
    uint32_t h;
    if (a >= 0x477FF000u) {                   /* rounds to 65520 or more, inf, NaN */
        h = a > 0x7F800000u ? (0x7E00u | ((a >> 13) & 0x3FFu)) : 0x7C00u;
    } else if (a < 0x38800000u) {             /* below the smallest normal: subnormal */
        /* a float add rounds it to a multiple of 2^-24, to nearest even */
        h = f32_bits(bits_f32(a) + 0.5f) - 0x3F000000u;
    } else {
        h = (a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13;
    }
    return (uint16_t)(sign | h);
}

/* float32 -> bfloat16 bits, round to nearest even; NaN -> 0xFFFF (torch on x86). */
static inline uint16_t bf16_scalar(float x) {
    uint32_t u = f32_bits(x);
    if (x != x) return 0xFFFFu;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* float16 bits -> float32, exactly (a NaN keeps its payload, unquieted) */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0) {
        float v = (float)m * (1.0f / 16777216.0f); /* m * 2^-24, exact */
        return sign ? -v : v;
    }
    if (e == 31) return bits_f32(sign | 0x7F800000u | (m << 13));
    return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

/* -- the fused pass: d = c op b; out = round(d); max |d| ------------------------------------ */

/* An input of the pass: float32, or float16 bits (half) converted as they are read; a half
   input only with OP_SUB/OP_ADD, whose arithmetic quiets a NaN whichever way it came in
   (so F16C's conversion, which quiets a signaling NaN, gives the same bits as the exact one
   followed by the operation). */
typedef struct {
    const void *p;
    int half;
} In;

static inline float in_at(In x, Py_ssize_t i) {
    return x.half ? half_to_float(((const uint16_t *)x.p)[i]) : ((const float *)x.p)[i];
}

static inline In in_from(In x, Py_ssize_t i) {
    In r = {x.p ? (const char *)x.p + i * (x.half ? 2 : 4) : NULL, x.half};
    return r;
}

typedef struct {
    float maxabs;
    int nan;
} Stats;

static void combine_scalar(In c, In b, void *out, Py_ssize_t n, int op, int kind, Stats *st) {
    float m = st->maxabs;
    int nan = st->nan;
    for (Py_ssize_t i = 0; i < n; i++) {
        float ci = in_at(c, i);
        float d = op == OP_SUB ? ci - in_at(b, i) : op == OP_ADD ? ci + in_at(b, i) : ci;
        float a = fabsf(d);
        if (a != a) nan = 1;
        else if (a > m) m = a;
        if (kind == OUT_F16) ((uint16_t *)out)[i] = f16_scalar(d);
        else if (kind == OUT_BF16) ((uint16_t *)out)[i] = bf16_scalar(d);
        else ((float *)out)[i] = d;
    }
    st->maxabs = m;
    st->nan = nan;
}

#ifdef CNDIFF_X86
/* fold a SIMD loop's 8 lanes of max |d| and of NaN marks into the scalar figures */
__attribute__((target("avx2")))
static inline void fold_lanes(__m256 vmax, __m256 vnan, float *maxabs, int *nan) {
    float lanes[8], nans[8];
    _mm256_storeu_ps(lanes, vmax);
    _mm256_storeu_ps(nans, vnan);
    for (int k = 0; k < 8; k++) {
        if (f32_bits(nans[k])) *nan = 1;
        if (lanes[k] > *maxabs) *maxabs = lanes[k];
    }
}

__attribute__((target("avx2,f16c")))
static inline __m256 in_load8(In x, Py_ssize_t i) {
    if (x.half)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)x.p + i)));
    return _mm256_loadu_ps((const float *)x.p + i);
}

__attribute__((target("avx2,f16c")))
static void combine_avx2(In c, In b, void *out, Py_ssize_t n, int op, int kind, Stats *st) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 vmax = _mm256_setzero_ps();
    __m256 vnan = _mm256_setzero_ps();
    const __m256i lsb = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF);
    const __m256i allones = _mm256_set1_epi32(0xFFFF);
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 d = in_load8(c, i);
        if (op == OP_SUB) d = _mm256_sub_ps(d, in_load8(b, i));
        else if (op == OP_ADD) d = _mm256_add_ps(d, in_load8(b, i));
        __m256 a = _mm256_and_ps(d, absmask);
        vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
        vmax = _mm256_max_ps(vmax, a); /* (NaN lanes: vnan records them) */
        if (kind == OUT_F16) {
            __m128i h = _mm256_cvtps_ph(d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm_storeu_si128((__m128i *)((uint16_t *)out + i), h);
        } else if (kind == OUT_BF16) {
            __m256i u = _mm256_castps_si256(d);
            __m256i r = _mm256_srli_epi32(
                _mm256_add_epi32(_mm256_add_epi32(u, bias),
                                 _mm256_and_si256(_mm256_srli_epi32(u, 16), lsb)), 16);
            __m256i isnan = _mm256_castps_si256(_mm256_cmp_ps(d, d, _CMP_UNORD_Q));
            r = _mm256_blendv_epi8(r, allones, isnan);
            /* pack the 8 low halves: within-lane packus, then fix the lane order */
            __m256i p = _mm256_packus_epi32(r, r);
            p = _mm256_permute4x64_epi64(p, 0x08);
            _mm_storeu_si128((__m128i *)((uint16_t *)out + i), _mm256_castsi256_si128(p));
        } else {
            _mm256_storeu_ps((float *)out + i, d);
        }
    }
    fold_lanes(vmax, vnan, &st->maxabs, &st->nan);
    if (i < n) {
        size_t w = kind == OUT_F32 ? 4 : 2;
        combine_scalar(in_from(c, i), in_from(b, i), (char *)out + i * w, n - i, op, kind, st);
    }
}

static int have_avx2_f16c(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    }
    return cached;
}
#endif

/* -- the base check's statistics: b - e ---------------------------------------------------- */

typedef struct {
    float maxabs;
    int nan;
    double sum_abs, sum_sq, sum_sq_b;
} CompareStats;

static void compare_scalar(const float *e, const float *b, Py_ssize_t n, CompareStats *st) {
    for (Py_ssize_t i = 0; i < n; i++) {
        float d = b[i] - e[i];
        float a = fabsf(d);
        if (a != a) st->nan = 1;
        else if (a > st->maxabs) st->maxabs = a;
        st->sum_abs += a;
        st->sum_sq += (double)a * a;
        st->sum_sq_b += (double)b[i] * b[i];
    }
}

#ifdef CNDIFF_X86
__attribute__((target("avx2")))
static void compare_avx2(const float *e, const float *b, Py_ssize_t n, CompareStats *st) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 vmax = _mm256_setzero_ps(), vnan = _mm256_setzero_ps();
    Py_ssize_t i = 0;
    while (i + 8 <= n) {
        /* float32 partial sums over at most 4096 elements, then added in double */
        __m256 sa = _mm256_setzero_ps(), sd = _mm256_setzero_ps(), sb = _mm256_setzero_ps();
        Py_ssize_t end = i + 4096 < n ? i + 4096 : n;
        for (; i + 8 <= end; i += 8) {
            __m256 bv = _mm256_loadu_ps(b + i);
            __m256 a = _mm256_and_ps(_mm256_sub_ps(bv, _mm256_loadu_ps(e + i)), absmask);
            vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
            vmax = _mm256_max_ps(vmax, a);
            sa = _mm256_add_ps(sa, a);
            sd = _mm256_add_ps(sd, _mm256_mul_ps(a, a));
            sb = _mm256_add_ps(sb, _mm256_mul_ps(bv, bv));
        }
        float la[8], ld[8], lb[8];
        _mm256_storeu_ps(la, sa);
        _mm256_storeu_ps(ld, sd);
        _mm256_storeu_ps(lb, sb);
        for (int k = 0; k < 8; k++) {
            st->sum_abs += la[k];
            st->sum_sq += ld[k];
            st->sum_sq_b += lb[k];
        }
    }
    fold_lanes(vmax, vnan, &st->maxabs, &st->nan);
    if (i < n) compare_scalar(e + i, b + i, n - i, st);
}
#endif

/* -- verify: every loader's rebuild against its rounding bound -------------------------------- */

/* precision bits and smallest frexp exponent of a normal number, per kind */
static const int PREC[3] = {24, 11, 8}, EMIN[3] = {-125, -13, -125};

/* float16 bits -> float32, exact; NaN keeps sign and payload unquieted (as numpy) */
static void half_to_float_scalar(const uint16_t *h, float *out, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) out[i] = half_to_float(h[i]);
}

#ifdef CNDIFF_X86
__attribute__((target("avx2,f16c")))
static void half_to_float_avx2(const uint16_t *h, float *out, Py_ssize_t n) {
    const __m256i exp = _mm256_set1_epi32(0x7C00), man = _mm256_set1_epi32(0x3FF);
    const __m256i sgn = _mm256_set1_epi32(0x8000), inf = _mm256_set1_epi32(0x7F800000);
    const __m256i zero = _mm256_setzero_si256();
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i x = _mm_loadu_si128((const __m128i *)(h + i));
        __m256 f = _mm256_cvtph_ps(x); /* exact, but quiets a signaling NaN */
        __m256i u = _mm256_cvtepu16_epi32(x);
        __m256i m = _mm256_and_si256(u, man);
        __m256i isnan = _mm256_andnot_si256(_mm256_cmpeq_epi32(m, zero),
                                            _mm256_cmpeq_epi32(_mm256_and_si256(u, exp), exp));
        __m256i nanbits = _mm256_or_si256(
            _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(u, sgn), 16), inf),
            _mm256_slli_epi32(m, 13));
        __m256i r = _mm256_blendv_epi8(_mm256_castps_si256(f), nanbits, isnan);
        _mm256_storeu_si256((__m256i *)(out + i), r);
    }
    if (i < n) half_to_float_scalar(h + i, out + i, n - i);
}
#endif

/* x rounded to kind (as float32 values), round to nearest even; x finite */
static inline float round_kind(float x, int kind) {
    if (kind == OUT_F16) return half_to_float(f16_scalar(x));
    if (kind == OUT_BF16) return bits_f32((uint32_t)bf16_scalar(x) << 16);
    return x;
}

/* half the spacing of kind at |x|: the largest error of one rounding to kind (x a finite
   float32 value; the same as ldexp(0.5, max(frexp(x).e, emin) - p) in float64) */
static inline double pow2(int k) { /* 2^k for -1022 <= k <= 1023, exactly */
    uint64_t u = (uint64_t)(k + 1023) << 52;
    double v;
    memcpy(&v, &u, 8);
    return v;
}

static inline double half_spacing_f32(float x, int kind) {
    uint32_t E = (f32_bits(x) >> 23) & 0xFFu; /* (0 for zero and subnormals) */
    int e = (int)E - 126;
    if (e < EMIN[kind]) e = EMIN[kind];
    return pow2(e - PREC[kind] - 1);
}

typedef struct {
    int finite;
    double max_abs[3], max_ratio[3]; /* comfyui, webui, exact */
} VerifyStats;

static inline void note(VerifyStats *st, int m, double err, double bound) {
    if (err > st->max_abs[m]) st->max_abs[m] = err;
    /* divide only where the ratio may be a new maximum (the bound is a small margin
       around the comparison's rounding) */
    if (err > st->max_ratio[m] * bound * 0.9999999) {
        double r = err / bound;
        if (r > st->max_ratio[m]) st->max_ratio[m] = r;
    }
}

#define VERIFY_BODY(ROUND)                                                                       \
    for (Py_ssize_t i = 0; i < n; i++) {                                                          \
        float ci = c[i], si = s[i];                                                               \
        if (!isfinite(ci) || !isfinite(si) || (b && !isfinite(b[i]))) {                          \
            st->finite = 0;                                                                       \
            continue;                                                                             \
        }                                                                                         \
        if (!b) {                                                                                 \
            double err = fabs((double)si - (double)ci), bound = half_spacing_f32(ci, D);          \
            for (int m = 0; m < 3; m++) note(st, m, err, bound);                                  \
            continue;                                                                             \
        }                                                                                         \
        float bi = b[i];                                                                          \
        float d = ci - bi; /* what extract computed */                                            \
        double base_err = half_spacing_f32(d, D) + half_spacing_f32(d, OUT_F32);                  \
        float sb = si + bi;                                                                       \
        float webui = ROUND(sb, P);                                                               \
        float comfy = ROUND(si + ROUND(bi, D), D);                                                \
        double h32 = half_spacing_f32(sb, OUT_F32);                                               \
        if (!isfinite(sb) || !isfinite(webui) || !isfinite(comfy)) {                              \
            st->finite = 0;                                                                       \
            continue;                                                                             \
        }                                                                                         \
        note(st, 2, fabs((double)sb - ci), base_err + h32);                                       \
        note(st, 1, fabs((double)webui - ci), base_err + h32 + half_spacing_f32(webui, P));       \
        note(st, 0, fabs((double)comfy - ci),                                                     \
             base_err + half_spacing_f32(bi, D) + h32 + half_spacing_f32(comfy, D));              \
    }

static void verify_scalar(const float *c, const float *s, const float *b, Py_ssize_t n, int D,
                          int P, VerifyStats *st) {
    VERIFY_BODY(round_kind)
}

#ifdef CNDIFF_X86
__attribute__((target("f16c"))) static inline float round_kind_f16c(float x, int kind) {
    if (kind == OUT_F16) return _cvtsh_ss(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT));
    if (kind == OUT_BF16) return bits_f32((uint32_t)bf16_scalar(x) << 16);
    return x;
}

__attribute__((target("avx2,f16c")))
static void verify_f16c(const float *c, const float *s, const float *b, Py_ssize_t n, int D,
                        int P, VerifyStats *st) {
    VERIFY_BODY(round_kind_f16c)
}

/* 8 float32 values rounded to kind, as float32 values (finite lanes) */
__attribute__((target("avx2,f16c"))) static inline __m256 round8(__m256 x, int kind) {
    if (kind == OUT_F16)
        return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    if (kind == OUT_BF16) {
        __m256i u = _mm256_castps_si256(x);
        __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)),
                                     _mm256_and_si256(_mm256_srli_epi32(u, 16),
                                                      _mm256_set1_epi32(1)));
        return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32((int)0xFFFF0000u)));
    }
    return x;
}

/* half spacings of kind at 8 float32 values, as two vectors of 4 doubles */
__attribute__((target("avx2"))) static inline void hs8(__m256 x, int kind, __m256d *lo,
                                                        __m256d *hi) {
    __m256i E = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(x), 23),
                                 _mm256_set1_epi32(0xFF));
    __m256i e = _mm256_max_epi32(_mm256_sub_epi32(E, _mm256_set1_epi32(126)),
                                 _mm256_set1_epi32(EMIN[kind]));
    __m256i k = _mm256_add_epi32(e, _mm256_set1_epi32(1023 - PREC[kind] - 1));
    *lo = _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(k)), 52));
    *hi = _mm256_castsi256_pd(
        _mm256_slli_epi64(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(k, 1)), 52));
}

/* one method's errors and bounds for 8 lanes (two halves of 4 doubles) */
__attribute__((target("avx2"))) static inline void note8(VerifyStats *st, int m, __m256 r,
                                                          __m256d c_lo, __m256d c_hi,
                                                          __m256d b_lo, __m256d b_hi,
                                                          __m256d *vmax) {
    const __m256d absmask = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7FFFFFFFFFFFFFFFLL));
    __m256d e_lo = _mm256_and_pd(_mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(r)), c_lo),
                                 absmask);
    __m256d e_hi = _mm256_and_pd(
        _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(r, 1)), c_hi), absmask);
    vmax[m] = _mm256_max_pd(vmax[m], _mm256_max_pd(e_lo, e_hi));
    __m256d t = _mm256_set1_pd(st->max_ratio[m] * 0.9999999);
    __m256d cand = _mm256_or_pd(_mm256_cmp_pd(e_lo, _mm256_mul_pd(b_lo, t), _CMP_GT_OQ),
                                _mm256_cmp_pd(e_hi, _mm256_mul_pd(b_hi, t), _CMP_GT_OQ));
    if (_mm256_movemask_pd(cand)) {
        double el[8], bl[8];
        _mm256_storeu_pd(el, e_lo);
        _mm256_storeu_pd(el + 4, e_hi);
        _mm256_storeu_pd(bl, b_lo);
        _mm256_storeu_pd(bl + 4, b_hi);
        for (int j = 0; j < 8; j++) {
            double q = el[j] / bl[j];
            if (q > st->max_ratio[m]) st->max_ratio[m] = q;
        }
    }
}

/* the paired keys (a base tensor) 8 at a time; any lane that is not finite sends its 8
   elements through the scalar loop */
__attribute__((target("avx2,f16c")))
static void verify_avx2(const float *c, const float *s, const float *b, Py_ssize_t n, int D,
                        int P, VerifyStats *st) {
    const __m256 inf = _mm256_set1_ps(INFINITY);
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256d vmax[3] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
        __m256 bv = _mm256_loadu_ps(b + i);
        __m256 sb = _mm256_add_ps(sv, bv);
        __m256 webui = round8(sb, P);
        __m256 comfy = round8(_mm256_add_ps(sv, round8(bv, D)), D);
        __m256 fin = _mm256_and_ps(
            _mm256_and_ps(_mm256_cmp_ps(_mm256_and_ps(cv, absmask), inf, _CMP_LT_OQ),
                          _mm256_cmp_ps(_mm256_and_ps(sv, absmask), inf, _CMP_LT_OQ)),
            _mm256_and_ps(_mm256_cmp_ps(_mm256_and_ps(bv, absmask), inf, _CMP_LT_OQ),
                          _mm256_and_ps(
                              _mm256_cmp_ps(_mm256_and_ps(webui, absmask), inf, _CMP_LT_OQ),
                              _mm256_cmp_ps(_mm256_and_ps(comfy, absmask), inf, _CMP_LT_OQ))));
        fin = _mm256_and_ps(fin, _mm256_cmp_ps(_mm256_and_ps(sb, absmask), inf, _CMP_LT_OQ));
        if (_mm256_movemask_ps(fin) != 0xFF) {
            verify_f16c(c + i, s + i, b + i, 8, D, P, st);
            continue;
        }
        __m256 d = _mm256_sub_ps(cv, bv);
        __m256d hd_lo, hd_hi, h32d_lo, h32d_hi, h32sb_lo, h32sb_hi, t_lo, t_hi;
        hs8(d, D, &hd_lo, &hd_hi);
        hs8(d, OUT_F32, &h32d_lo, &h32d_hi);
        hs8(sb, OUT_F32, &h32sb_lo, &h32sb_hi);
        __m256d be_lo = _mm256_add_pd(_mm256_add_pd(hd_lo, h32d_lo), h32sb_lo);
        __m256d be_hi = _mm256_add_pd(_mm256_add_pd(hd_hi, h32d_hi), h32sb_hi);
        __m256d c_lo = _mm256_cvtps_pd(_mm256_castps256_ps128(cv));
        __m256d c_hi = _mm256_cvtps_pd(_mm256_extractf128_ps(cv, 1));
        /* exact: base_err + h32(sb) */
        note8(st, 2, sb, c_lo, c_hi, be_lo, be_hi, vmax);
        /* webui: + h_P(webui) */
        hs8(webui, P, &t_lo, &t_hi);
        note8(st, 1, webui, c_lo, c_hi, _mm256_add_pd(be_lo, t_lo), _mm256_add_pd(be_hi, t_hi),
              vmax);
        /* comfyui: + h_D(b) + h_D(comfy) */
        __m256d u_lo, u_hi;
        hs8(bv, D, &t_lo, &t_hi);
        hs8(comfy, D, &u_lo, &u_hi);
        note8(st, 0, comfy, c_lo, c_hi,
              _mm256_add_pd(be_lo, _mm256_add_pd(t_lo, u_lo)),
              _mm256_add_pd(be_hi, _mm256_add_pd(t_hi, u_hi)), vmax);
    }
    for (int m = 0; m < 3; m++) {
        double l[4];
        _mm256_storeu_pd(l, vmax[m]);
        for (int j = 0; j < 4; j++)
            if (l[j] > st->max_abs[m]) st->max_abs[m] = l[j];
    }
    if (i < n) verify_f16c(c + i, s + i, b + i, n - i, D, P, st);
}
#endif

/* -- Python glue --------------------------------------------------------------------------- */

static int get_buffer(PyObject *obj, Py_buffer *view, int writable, const char *what) {
    if (PyObject_GetBuffer(obj, view, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    (void)what;
    return 0;
}

static int use_simd = 1;

/* the element count of c (float32, or float16 bits when half) and whether b matches it */
static int inputs_ok(Py_buffer *c, int c_half, Py_buffer *b, int have_b, int b_half,
                     Py_ssize_t *n) {
    Py_ssize_t wc = c_half ? 2 : 4, wb = b_half ? 2 : 4;
    *n = c->len / wc;
    return c->len % wc == 0 && (!have_b || b->len == *n * wb);
}

static int args_ok(int op, int kind, int c_half, int b_half) {
    if (op < OP_COPY || op > OP_ADD || kind < OUT_F32 || kind > OUT_BF16 ||
        ((c_half || b_half) && op == OP_COPY)) {
        PyErr_SetString(PyExc_ValueError, "bad op, output kind or input kinds");
        return 0;
    }
    return 1;
}

static PyObject *py_combine(PyObject *self, PyObject *args) {
    PyObject *co, *bo, *oo;
    int op, kind, c_half = 0, b_half = 0;
    if (!PyArg_ParseTuple(args, "OOOii|pp", &co, &bo, &oo, &op, &kind, &c_half, &b_half))
        return NULL;
    if (!args_ok(op, kind, c_half, b_half)) return NULL;
    Py_buffer c, b, o;
    int have_b = bo != Py_None;
    if (get_buffer(co, &c, 0, "c") < 0) return NULL;
    if (have_b && get_buffer(bo, &b, 0, "b") < 0) { PyBuffer_Release(&c); return NULL; }
    if (get_buffer(oo, &o, 1, "out") < 0) {
        PyBuffer_Release(&c);
        if (have_b) PyBuffer_Release(&b);
        return NULL;
    }
    Py_ssize_t n;
    size_t w = kind == OUT_F32 ? 4 : 2;
    int ok = inputs_ok(&c, c_half, &b, have_b, b_half, &n) && (size_t)o.len >= (size_t)n * w
             && (have_b || op == OP_COPY);
    Stats st = {0.0f, 0};
    if (ok) {
        In ci = {c.buf, c_half}, bi = {have_b ? b.buf : NULL, b_half};
        Py_BEGIN_ALLOW_THREADS
#ifdef CNDIFF_X86
        if (use_simd && have_avx2_f16c())
            combine_avx2(ci, bi, o.buf, n, op, kind, &st);
        else
#endif
            combine_scalar(ci, bi, o.buf, n, op, kind, &st);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&c);
    if (have_b) PyBuffer_Release(&b);
    PyBuffer_Release(&o);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match");
        return NULL;
    }
    return PyFloat_FromDouble(st.nan ? (double)NAN : (double)st.maxabs);
}

/* combine over consecutive segments [starts[j], starts[j+1]): one call for many small
   tensors, each segment's max |d| in maxes[j] (NaN when it holds a NaN) */
static PyObject *py_combine_segments(PyObject *self, PyObject *args) {
    PyObject *co, *bo, *oo, *so, *mo;
    int op, kind, c_half = 0, b_half = 0;
    if (!PyArg_ParseTuple(args, "OOOiiOO|pp", &co, &bo, &oo, &op, &kind, &so, &mo, &c_half,
                          &b_half))
        return NULL;
    if (!args_ok(op, kind, c_half, b_half)) return NULL;
    Py_buffer c, b, o, st, mx;
    int have_b = bo != Py_None, got = 0;
    if (get_buffer(co, &c, 0, "c") < 0) return NULL;
    got = 1;
    if (have_b && get_buffer(bo, &b, 0, "b") < 0) goto fail;
    got = 2;
    if (get_buffer(oo, &o, 1, "out") < 0) goto fail;
    got = 3;
    if (get_buffer(so, &st, 0, "starts") < 0) goto fail;
    got = 4;
    if (get_buffer(mo, &mx, 1, "maxes") < 0) goto fail;
    got = 5;
    {
        Py_ssize_t n, k = mx.len / 8;
        size_t w = kind == OUT_F32 ? 4 : 2;
        const int64_t *starts = (const int64_t *)st.buf;
        double *maxes = (double *)mx.buf;
        int ok = inputs_ok(&c, c_half, &b, have_b, b_half, &n) && (size_t)o.len >= (size_t)n * w
                 && (have_b || op == OP_COPY) && st.len == (k + 1) * 8 && mx.len % 8 == 0;
        for (Py_ssize_t j = 0; ok && j < k; j++)
            ok = starts[j] >= 0 && starts[j] <= starts[j + 1] && starts[j + 1] <= n;
        if (!ok) {
            PyErr_SetString(PyExc_ValueError, "buffer sizes or segments do not match");
            goto fail;
        }
        In cb = {c.buf, c_half}, bb = {have_b ? b.buf : NULL, b_half};
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t j = 0; j < k; j++) {
            Stats sj = {0.0f, 0};
            Py_ssize_t a = starts[j], len = starts[j + 1] - a;
#ifdef CNDIFF_X86
            if (use_simd && have_avx2_f16c())
                combine_avx2(in_from(cb, a), in_from(bb, a), (char *)o.buf + a * w, len, op, kind,
                             &sj);
            else
#endif
                combine_scalar(in_from(cb, a), in_from(bb, a), (char *)o.buf + a * w, len, op,
                               kind, &sj);
            maxes[j] = sj.nan ? (double)NAN : (double)sj.maxabs;
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&c);
    if (have_b) PyBuffer_Release(&b);
    PyBuffer_Release(&o);
    PyBuffer_Release(&st);
    PyBuffer_Release(&mx);
    Py_RETURN_NONE;
fail:
    if (got >= 1) PyBuffer_Release(&c);
    if (got >= 2 && have_b) PyBuffer_Release(&b);
    if (got >= 3) PyBuffer_Release(&o);
    if (got >= 4) PyBuffer_Release(&st);
    if (got >= 5) PyBuffer_Release(&mx);
    return NULL;
}

static PyObject *py_compare(PyObject *self, PyObject *args) {
    PyObject *eo, *bo;
    if (!PyArg_ParseTuple(args, "OO", &eo, &bo)) return NULL;
    Py_buffer e, b;
    if (get_buffer(eo, &e, 0, "e") < 0) return NULL;
    if (get_buffer(bo, &b, 0, "b") < 0) { PyBuffer_Release(&e); return NULL; }
    if (e.len != b.len || e.len % 4) {
        PyBuffer_Release(&e);
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match");
        return NULL;
    }
    CompareStats st = {0.0f, 0, 0.0, 0.0, 0.0};
    Py_BEGIN_ALLOW_THREADS
#ifdef CNDIFF_X86
    if (use_simd && have_avx2_f16c())
        compare_avx2((const float *)e.buf, (const float *)b.buf, e.len / 4, &st);
    else
#endif
        compare_scalar((const float *)e.buf, (const float *)b.buf, e.len / 4, &st);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&e);
    PyBuffer_Release(&b);
    return Py_BuildValue("dddd", st.nan ? (double)NAN : (double)st.maxabs, st.sum_abs,
                         st.sum_sq, st.sum_sq_b);
}

static PyObject *py_verify(PyObject *self, PyObject *args) {
    PyObject *co, *so, *bo;
    int D, P;
    if (!PyArg_ParseTuple(args, "OOOii", &co, &so, &bo, &D, &P)) return NULL;
    if (D < 0 || D > 2 || P < 0 || P > 2) {
        PyErr_SetString(PyExc_ValueError, "bad dtype kind");
        return NULL;
    }
    Py_buffer c, s, b;
    int have_b = bo != Py_None;
    if (get_buffer(co, &c, 0, "c") < 0) return NULL;
    if (get_buffer(so, &s, 0, "s") < 0) { PyBuffer_Release(&c); return NULL; }
    if (have_b && get_buffer(bo, &b, 0, "b") < 0) {
        PyBuffer_Release(&c);
        PyBuffer_Release(&s);
        return NULL;
    }
    int ok = c.len == s.len && c.len % 4 == 0 && (!have_b || b.len == c.len);
    VerifyStats st = {1, {0, 0, 0}, {0, 0, 0}};
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
#ifdef CNDIFF_X86
        if (use_simd && have_avx2_f16c() && have_b)
            verify_avx2((const float *)c.buf, (const float *)s.buf, (const float *)b.buf,
                        c.len / 4, D, P, &st);
        else if (use_simd && have_avx2_f16c())
            verify_f16c((const float *)c.buf, (const float *)s.buf, NULL, c.len / 4, D, P, &st);
        else
#endif
            verify_scalar((const float *)c.buf, (const float *)s.buf,
                          have_b ? (const float *)b.buf : NULL, c.len / 4, D, P, &st);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&c);
    PyBuffer_Release(&s);
    if (have_b) PyBuffer_Release(&b);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match");
        return NULL;
    }
    return Py_BuildValue("O(dd)(dd)(dd)", st.finite ? Py_True : Py_False, st.max_abs[0],
                         st.max_ratio[0], st.max_abs[1], st.max_ratio[1], st.max_abs[2],
                         st.max_ratio[2]);
}

static PyObject *py_half_to_float(PyObject *self, PyObject *args) {
    PyObject *ho, *oo;
    if (!PyArg_ParseTuple(args, "OO", &ho, &oo)) return NULL;
    Py_buffer h, o;
    if (get_buffer(ho, &h, 0, "h") < 0) return NULL;
    if (get_buffer(oo, &o, 1, "out") < 0) { PyBuffer_Release(&h); return NULL; }
    int ok = h.len % 2 == 0 && o.len == h.len * 2;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
#ifdef CNDIFF_X86
        if (use_simd && have_avx2_f16c())
            half_to_float_avx2((const uint16_t *)h.buf, (float *)o.buf, h.len / 2);
        else
#endif
            half_to_float_scalar((const uint16_t *)h.buf, (float *)o.buf, h.len / 2);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&h);
    PyBuffer_Release(&o);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_same_bytes(PyObject *self, PyObject *args) {
    PyObject *ao, *bo;
    if (!PyArg_ParseTuple(args, "OO", &ao, &bo)) return NULL;
    Py_buffer a, b;
    if (get_buffer(ao, &a, 0, "a") < 0) return NULL;
    if (get_buffer(bo, &b, 0, "b") < 0) { PyBuffer_Release(&a); return NULL; }
    int same = a.len == b.len;
    if (same) {
        Py_BEGIN_ALLOW_THREADS
        same = memcmp(a.buf, b.buf, (size_t)a.len) == 0;
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return PyBool_FromLong(same);
}

static PyObject *py_set_simd(PyObject *self, PyObject *arg) {
    int previous = use_simd;
    use_simd = PyObject_IsTrue(arg);
    return PyBool_FromLong(previous);
}

static PyObject *py_simd(PyObject *self, PyObject *noargs) {
#ifdef CNDIFF_X86
    return PyBool_FromLong(use_simd && have_avx2_f16c());
#else
    return PyBool_FromLong(0);
#endif
}

static PyMethodDef methods[] = {
    {"combine", py_combine, METH_VARARGS,
     "combine(c, b, out, op, kind, c_half=False, b_half=False) -> max |d|: d = c op b "
     "(float32; op 0 copy, 1 sub, 2 add), rounded into out (kind 0 float32, 1 float16, 2 "
     "bfloat16 bits); NaN when any d is NaN. c_half/b_half: that input is float16 bits, "
     "converted as it is read (sub and add only)."},
    {"combine_segments", py_combine_segments, METH_VARARGS,
     "combine_segments(c, b, out, op, kind, starts, maxes, c_half=False, b_half=False): "
     "combine over the segments [starts[j], starts[j+1]) (int64), each one's max |d| into "
     "maxes[j] (float64)."},
    {"compare", py_compare, METH_VARARGS,
     "compare(e, b) -> (max |b-e|, sum |b-e|, sum (b-e)^2, sum b^2), float32 inputs."},
    {"half_to_float", py_half_to_float, METH_VARARGS,
     "half_to_float(h, out): float16 bits h (2-byte items) into float32 out, exactly; a NaN "
     "keeps its sign and payload bits, unquieted (numpy's cast)."},
    {"same_bytes", py_same_bytes, METH_VARARGS, "same_bytes(a, b) -> whether the bytes are equal."},
    {"verify", py_verify, METH_VARARGS,
     "verify(c, s, b, D, P) -> (finite, (max_abs, max_ratio) for comfyui, webui, exact): every "
     "loader's rebuild of control c from diff s (dtype kind D) and base b (None: a copied key; "
     "P the promoted kind) against its rounding bound (see commands/verify.py)."},
    {"set_simd", py_set_simd, METH_O, "set_simd(on) -> previous: use AVX2/F16C when the CPU can."},
    {"simd", py_simd, METH_NOARGS, "simd() -> whether the AVX2/F16C path is in use."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels",
                                    "cndiff's fused float32 kernels (optional).", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
