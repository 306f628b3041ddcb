/* JumpReLU training as Rajamanoharan et al. 2024 ("Jumping Ahead") and Gemma Scope describe it,
 * in SAELens's form (JumpReLUTrainingSAE, sparsity loss mode "step"). Per token
 *   f_i  = pre_i * H(pre_i - theta_i),   theta_i = exp(log_th_i)
 *   loss = ||x_hat_s - x_s||^2 + lambda * sum_i H(pre_i - theta_i)
 * (a transcoder's in its normalized units, ||c (y_hat - y)||^2). H has no useful derivative, so
 * the step uses straight-through estimators with a rectangle kernel of width eps
 * (JUMPRELU_BANDWIDTH), rect(u) = 1 for |u| < 1/2:
 *   d f_i / d pre_i   = H(pre_i - theta_i)
 *   d f_i / d theta_i = -(theta_i / eps) rect((pre_i - theta_i) / eps)
 *   d H / d theta_i   = -(1 / eps) rect((pre_i - theta_i) / eps)      (nothing reaches pre_i)
 * and the threshold is trained as log_th, so its gradient is theta times the one above. These
 * are the exact derivatives of the objective with f_i and H smoothed over the kernel in theta
 * (tests/test_train_recipes.c checks them that way). The threshold's gradient needs dL/df for
 * every latent near its threshold, fired or not. While many codes are (the first steps), the pass
 * is dense like ReLU's, every matrix product one SGEMM; once few are, it lists them and works on
 * those alone (the per-latent path below). */
#include "train_internal.h"

#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

void sae__jumprelu_init(sae_trainer *t)
{
    const float lt = logf((float)t->param[SAE_TRAIN_JUMPRELU_INIT_THRESHOLD]);
    for (size_t j = 0; j < t->m->d_sae; j++)
        t->log_th[j] = lt;
    sae__jumprelu_sync(t);
}

void sae__jumprelu_sync(sae_trainer *t)
{
    for (size_t j = 0; j < t->m->d_sae; j++)
        t->m->threshold[j] = expf(t->log_th[j]);
}

/* Per-token kernels over the latents with an inner count of 8, so that -O2 vectorizes them
 * (GCC's default cost model vectorizes no loop of unknown length; internal.h's kernels do the
 * same), and masks as arithmetic rather than branches. Not inlined: inside the loop over
 * tokens GCC no longer vectorizes them. */

/* Latent k of one token: f = p * (p > th) (thresholds are positive, so a code that passes is
 * positive too) and the firing count. */
static inline void mask_one(const float *restrict p, const float *restrict th,
                            float *restrict f, float *restrict fires, size_t k)
{
    const bool on = p[k] > th[k];
    f[k] = on ? p[k] : 0.0f;
    fires[k] += on ? 1.0f : 0.0f;
}

static void mask_codes(const float *restrict p, const float *restrict th, float *restrict f,
                       float *restrict fires, size_t d_sae)
{
    size_t k = 0;
    for (; k + 8 <= d_sae; k += 8)
        for (size_t q = 0; q < 8; q++)
            mask_one(p, th, f, fires, k + q);
    for (; k < d_sae; k++)
        mask_one(p, th, f, fires, k);
}

/* Latent k of one token: g holds dL/df on entry and dL/dpre on return (the estimator passes the
 * gradient where the code fired); g_th gains -(th / eps) rect(u) dL/df - (lambda / eps)
 * rect(u), g_benc gains dL/dpre. */
static inline void grads_one(const float *restrict p, const float *restrict th,
                             float *restrict g, float *restrict g_th, float *restrict g_benc,
                             size_t k, float inv_eps, float lam_eps)
{
    const float u = (p[k] - th[k]) * inv_eps;
    const float in = (float)((u > -0.5f) & (u < 0.5f));
    const float d = th[k] * inv_eps * g[k] + lam_eps;
    g_th[k] -= in * d;
    g[k] = p[k] > th[k] ? g[k] : 0.0f;
    g_benc[k] += g[k];
}

static void threshold_grads(const float *restrict p, const float *restrict th, float *restrict g,
                            float *restrict g_th, float *restrict g_benc, size_t d_sae,
                            float inv_eps, float lam_eps)
{
    size_t k = 0;
    for (; k + 8 <= d_sae; k += 8)
        for (size_t q = 0; q < 8; q++)
            grads_one(p, th, g, g_th, g_benc, k + q, inv_eps, lam_eps);
    for (; k < d_sae; k++)
        grads_one(p, th, g, g_th, g_benc, k, inv_eps, lam_eps);
}

/* ---- the per-latent path's kernels -------------------------------------------------------
 *
 * Each in two builds that give the same bits: portable C (fixed inner counts, so that -O2
 * vectorizes it for any x86-64 or other CPU), and AVX-512 (target attributes and a check of the
 * CPU when the pass starts: the library stays one binary). At d_out 64 a listed latent costs a
 * dot and up to three axpys of 64 floats; with SSE's 4 lanes those were most of a step (issue 19).
 * The same bits need the same operations in the same order, element by element: the axpys are
 * elementwise, so any width gives the same bits; the dot is defined with 16 lanes (lane q sums
 * elements q, q + 16, ... in order, from +0) and a fixed tree over the lanes, which is one
 * AVX-512 register or four SSE ones. No contraction into FMA (lib/CMakeLists.txt builds this
 * file with -ffp-contract=off): the portable build runs on CPUs without FMA.
 *
 * The backward runs latent by latent over the tokens that list it (the lists transposed once a
 * step): the decoder row and the latent's sums stay in registers (in L1 at other widths) while
 * the tokens' errors and inputs stream past, where token by token every listed latent's three
 * rows were read and two written back. Each sum still adds its terms in token order. */

typedef struct {
    const float *W_dec, *th, *E, *xin;
    float *g_wdec, *g_th, *g_benc, *fires, *gT;
    const size_t *lat_ptr;   /* latent k's tokens: lat_tok[lat_ptr[k] .. lat_ptr[k + 1]) */
    const uint32_t *lat_tok; /* increasing within a latent */
    const float *lat_val;    /* each one's pre-activation */
    size_t d_out, d_in;
    float c, inv_eps, lam_eps;
} backprop_args;

static float dot16(size_t n, const float *restrict x, const float *restrict y)
{
    float lane[16] = {0};
    size_t i = 0;
    /* Unrolled whole (GCC and clang read the pragma), so that the lanes stay in four registers
     * rather than in memory between blocks. */
    for (; i + 16 <= n; i += 16)
#pragma GCC unroll 16
        for (size_t q = 0; q < 16; q++)
            lane[q] += x[i + q] * y[i + q];
    for (size_t q = 0; i + q < n; q++)
        lane[q] += x[i + q] * y[i + q];
    /* The tree with fixed counts, which -O2 unrolls (a loop over the halving width kept the
     * lanes on the stack). */
    for (size_t q = 0; q < 8; q++)
        lane[q] += lane[q + 8];
    for (size_t q = 0; q < 4; q++)
        lane[q] += lane[q + 4];
    for (size_t q = 0; q < 2; q++)
        lane[q] += lane[q + 2];
    return lane[0] + lane[1];
}

/* Token p's latents that need dL/df (u = (pre - th) / eps > -1/2: fired, or within the kernel's
 * window of the threshold) into idx, in increasing order, and their pre-activations into val;
 * returns how many. idx and val have room for d_sae: every latent is written at the next free
 * place, which only advances for a listed one, so the loop has no branch to mispredict. */
static size_t list_portable(const float *restrict p, const float *restrict th,
                            uint32_t *restrict idx, float *restrict val, size_t d_sae,
                            float inv_eps)
{
    size_t c = 0;
    for (size_t k = 0; k < d_sae; k++) {
        idx[c] = (uint32_t)k;
        val[c] = p[k];
        c += (p[k] - th[k]) * inv_eps > -0.5f;
    }
    return c;
}

/* e[0..d_out) += val[a] W_dec[idx[a]] for the fired latents of a token's list, in its order. */
static void decode_portable(const backprop_args *b, const uint32_t *restrict idx,
                            const float *restrict val, size_t count, float *restrict e)
{
    for (size_t a = 0; a < count; a++) {
        const size_t k = idx[a];
        if (val[a] > b->th[k])
            sae__axpy(b->d_out, val[a], b->W_dec + k * b->d_out, e);
    }
}

/* Latents [k0, k1), each over its tokens (E holds 2 c (x_hat - tgt)): g = dL/df_k = c 2e .
 * W_dec[k]; the threshold gets its term where the token is in the window; where k fired, W_dec's
 * row k gets f_k 2e, b_enc g, the encoder column k (kept transposed in gT) g times the input,
 * and the firing count one. */
typedef float dot_fn(size_t n, const float *x, const float *y);
typedef void axpy_fn(size_t n, float a, const float *x, float *y);

/* One body for both builds: inlined into each, where the constant dot and axpy are inlined in
 * turn (objdump shows no calls in either). */
static inline __attribute__((always_inline)) void backward_with(const backprop_args *b, size_t k,
                                                                dot_fn *dot, axpy_fn *axpy)
{
    const size_t d_out = b->d_out, d_in = b->d_in;
    const float *w = b->W_dec + k * d_out, th = b->th[k];
    float *gw = b->g_wdec + k * d_out, *gt = b->gT + k * d_in;
    for (size_t a = b->lat_ptr[k]; a < b->lat_ptr[k + 1]; a++) {
        const size_t i = b->lat_tok[a];
        const float p = b->lat_val[a], *e = b->E + i * d_out;
        const float u = (p - th) * b->inv_eps;
        const float g = b->c * dot(d_out, e, w);
        if (u < 0.5f)
            b->g_th[k] -= th * b->inv_eps * g + b->lam_eps;
        if (!(p > th))
            continue;
        axpy(d_out, p, e, gw);
        b->g_benc[k] += g;
        axpy(d_in, g, b->xin + i * d_in, gt);
        b->fires[k] += 1.0f;
    }
}

static void backward_portable(const backprop_args *b, size_t k0, size_t k1)
{
    for (size_t k = k0; k < k1; k++)
        backward_with(b, k, dot16, sae__axpy);
}

#ifdef SAE__WIDEN_X86
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f")))

/* The lanes [0, n) of a 16-lane block (n < 16 at the tail, else all). */
AVX512 static inline __mmask16 lanes(size_t n)
{
    return (__mmask16)(n >= 16 ? 0xffffu : (1u << n) - 1u);
}

/* dot16's tree over the lanes of acc. */
AVX512 static inline float lanes_sum(__m512 acc)
{
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
    const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(acc), hi);
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

/* dot16's sum: lanes kept apart, the tail's lanes added where it has elements, then the tree. */
AVX512 static inline float dot_avx512(size_t n, const float *x, const float *y)
{
    __m512 acc = _mm512_setzero_ps();
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    if (i < n) {
        const __mmask16 m = lanes(n - i);
        const __m512 prod = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i),
                                          _mm512_maskz_loadu_ps(m, y + i));
        acc = _mm512_mask_add_ps(acc, m, acc, prod);
    }
    return lanes_sum(acc);
}

/* y[0..n) += a x[0..n) */
AVX512 static inline void axpy_avx512(size_t n, float a, const float *x, float *y)
{
    const __m512 va = _mm512_set1_ps(a);
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_add_ps(_mm512_loadu_ps(y + i),
                                              _mm512_mul_ps(va, _mm512_loadu_ps(x + i))));
    if (i < n) {
        const __mmask16 m = lanes(n - i);
        const __m512 ax = _mm512_mul_ps(va, _mm512_maskz_loadu_ps(m, x + i));
        _mm512_mask_storeu_ps(y + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + i), ax));
    }
}

/* list_portable's list: 16 comparisons at a time, the listed indices and values packed
 * together. The packed blocks are stored whole (c + 16 <= k + 16 <= d_sae: inside the room)
 * except the last. */
AVX512 static size_t list_avx512(const float *restrict p, const float *restrict th,
                                 uint32_t *restrict idx, float *restrict val, size_t d_sae,
                                 float inv_eps)
{
    const __m512 ie = _mm512_set1_ps(inv_eps), lo = _mm512_set1_ps(-0.5f);
    const __m512i step = _mm512_set1_epi32(16);
    __m512i k16 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    size_t c = 0;
    for (size_t k = 0; k < d_sae; k += 16) {
        const __mmask16 in = lanes(d_sae - k);
        const __m512 pk = _mm512_maskz_loadu_ps(in, p + k);
        const __m512 u = _mm512_mul_ps(_mm512_sub_ps(pk, _mm512_maskz_loadu_ps(in, th + k)), ie);
        const __mmask16 hit = _mm512_mask_cmp_ps_mask(in, u, lo, _CMP_GT_OQ);
        const __m512i packed = _mm512_maskz_compress_epi32(hit, k16);
        const __m512 values = _mm512_maskz_compress_ps(hit, pk);
        const unsigned count = (unsigned)__builtin_popcount((unsigned)hit);
        if (k + 16 <= d_sae) {
            _mm512_storeu_si512((void *)(idx + c), packed);
            _mm512_storeu_ps(val + c, values);
        } else {
            _mm512_mask_storeu_epi32(idx + c, lanes(count), packed);
            _mm512_mask_storeu_ps(val + c, lanes(count), values);
        }
        c += count;
        k16 = _mm512_add_epi32(k16, step);
    }
    return c;
}

AVX512 static void decode_avx512(const backprop_args *b, const uint32_t *restrict idx,
                                 const float *restrict val, size_t count, float *restrict e)
{
    const size_t d_out = b->d_out;
    /* 64 columns of e at a time in registers across the token's latents: each element still
     * gains its terms in the list's order. */
    for (size_t j = 0; j < d_out; j += 64) {
        const size_t left = d_out - j;
        const __mmask16 m0 = lanes(left), m1 = left > 16 ? lanes(left - 16) : 0,
                        m2 = left > 32 ? lanes(left - 32) : 0,
                        m3 = left > 48 ? lanes(left - 48) : 0;
        __m512 e0 = _mm512_maskz_loadu_ps(m0, e + j), e1 = _mm512_maskz_loadu_ps(m1, e + j + 16),
               e2 = _mm512_maskz_loadu_ps(m2, e + j + 32),
               e3 = _mm512_maskz_loadu_ps(m3, e + j + 48);
        for (size_t a = 0; a < count; a++) {
            /* A listed latent that did not fire adds nothing: masked, not branched around
             * (which one fired is as good as random to the branch predictor). */
            const size_t k = idx[a];
            const __mmask16 on = (__mmask16)-(int)(val[a] > b->th[k]);
            const __m512 f = _mm512_set1_ps(val[a]);
            const float *w = b->W_dec + k * d_out + j;
            e0 = _mm512_mask_add_ps(e0, on, e0, _mm512_mul_ps(f, _mm512_maskz_loadu_ps(m0, w)));
            e1 = _mm512_mask_add_ps(e1, on, e1,
                                    _mm512_mul_ps(f, _mm512_maskz_loadu_ps(m1, w + 16)));
            e2 = _mm512_mask_add_ps(e2, on, e2,
                                    _mm512_mul_ps(f, _mm512_maskz_loadu_ps(m2, w + 32)));
            e3 = _mm512_mask_add_ps(e3, on, e3,
                                    _mm512_mul_ps(f, _mm512_maskz_loadu_ps(m3, w + 48)));
        }
        _mm512_mask_storeu_ps(e + j, m0, e0);
        _mm512_mask_storeu_ps(e + j + 16, m1, e1);
        _mm512_mask_storeu_ps(e + j + 32, m2, e2);
        _mm512_mask_storeu_ps(e + j + 48, m3, e3);
    }
}

/* backward_portable at d_out = d_in = 64: the decoder row, its gradient and the encoder
 * column's in four registers each, the latent's scalars in registers, for all its tokens. The
 * window's and the firing's terms are masked in, not branched to (either is as good as random
 * to the branch predictor, and a miss stalls the next tokens' loads): a masked add leaves the
 * sum's bits as they were. */
AVX512 static void backward_avx512_64(const backprop_args *b, size_t k)
{
    const float th = b->th[k], inv_eps = b->inv_eps, lam_eps = b->lam_eps, c = b->c;
    const float *w = b->W_dec + k * 64;
    float *gw = b->g_wdec + k * 64, *gt = b->gT + k * 64;
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16),
                 w2 = _mm512_loadu_ps(w + 32), w3 = _mm512_loadu_ps(w + 48);
    __m512 a0 = _mm512_loadu_ps(gw), a1 = _mm512_loadu_ps(gw + 16), a2 = _mm512_loadu_ps(gw + 32),
           a3 = _mm512_loadu_ps(gw + 48);
    __m512 t0 = _mm512_loadu_ps(gt), t1 = _mm512_loadu_ps(gt + 16), t2 = _mm512_loadu_ps(gt + 32),
           t3 = _mm512_loadu_ps(gt + 48);
    __m128 g_th = _mm_set_ss(b->g_th[k]), g_benc = _mm_set_ss(b->g_benc[k]),
           fires = _mm_set_ss(b->fires[k]);
    const __m128 one = _mm_set_ss(1.0f);
    for (size_t a = b->lat_ptr[k]; a < b->lat_ptr[k + 1]; a++) {
        const size_t i = b->lat_tok[a];
        const float p = b->lat_val[a], *e = b->E + i * 64;
        const __m512 e0 = _mm512_loadu_ps(e), e1 = _mm512_loadu_ps(e + 16),
                     e2 = _mm512_loadu_ps(e + 32), e3 = _mm512_loadu_ps(e + 48);
        __m512 acc = _mm512_add_ps(_mm512_setzero_ps(), _mm512_mul_ps(e0, w0));
        acc = _mm512_add_ps(acc, _mm512_mul_ps(e1, w1));
        acc = _mm512_add_ps(acc, _mm512_mul_ps(e2, w2));
        acc = _mm512_add_ps(acc, _mm512_mul_ps(e3, w3));
        const float u = (p - th) * inv_eps;
        const float g = c * lanes_sum(acc);
        const __mmask8 win = (__mmask8)(u < 0.5f), fired8 = (__mmask8)(p > th);
        const __mmask16 fired = (__mmask16)-(int)(p > th);
        g_th = _mm_mask_sub_ss(g_th, win, g_th, _mm_set_ss(th * inv_eps * g + lam_eps));
        const __m512 vp = _mm512_set1_ps(p), vg = _mm512_set1_ps(g);
        a0 = _mm512_mask_add_ps(a0, fired, a0, _mm512_mul_ps(vp, e0));
        a1 = _mm512_mask_add_ps(a1, fired, a1, _mm512_mul_ps(vp, e1));
        a2 = _mm512_mask_add_ps(a2, fired, a2, _mm512_mul_ps(vp, e2));
        a3 = _mm512_mask_add_ps(a3, fired, a3, _mm512_mul_ps(vp, e3));
        g_benc = _mm_mask_add_ss(g_benc, fired8, g_benc, _mm_set_ss(g));
        const float *x = b->xin + i * 64;
        t0 = _mm512_mask_add_ps(t0, fired, t0, _mm512_mul_ps(vg, _mm512_loadu_ps(x)));
        t1 = _mm512_mask_add_ps(t1, fired, t1, _mm512_mul_ps(vg, _mm512_loadu_ps(x + 16)));
        t2 = _mm512_mask_add_ps(t2, fired, t2, _mm512_mul_ps(vg, _mm512_loadu_ps(x + 32)));
        t3 = _mm512_mask_add_ps(t3, fired, t3, _mm512_mul_ps(vg, _mm512_loadu_ps(x + 48)));
        fires = _mm_mask_add_ss(fires, fired8, fires, one);
    }
    _mm512_storeu_ps(gw, a0);
    _mm512_storeu_ps(gw + 16, a1);
    _mm512_storeu_ps(gw + 32, a2);
    _mm512_storeu_ps(gw + 48, a3);
    _mm512_storeu_ps(gt, t0);
    _mm512_storeu_ps(gt + 16, t1);
    _mm512_storeu_ps(gt + 32, t2);
    _mm512_storeu_ps(gt + 48, t3);
    b->g_th[k] = _mm_cvtss_f32(g_th);
    b->g_benc[k] = _mm_cvtss_f32(g_benc);
    b->fires[k] = _mm_cvtss_f32(fires);
}

/* backward_portable at any widths: the rows are the latent's own, so they stay in L1. */
AVX512 static void backward_avx512(const backprop_args *b, size_t k0, size_t k1)
{
    for (size_t k = k0; k < k1; k++) {
        if (b->d_out == 64 && b->d_in == 64)
            backward_avx512_64(b, k);
        else
            backward_with(b, k, dot_avx512, axpy_avx512);
    }
}
#endif

/* The kernels a pass uses: AVX-512 where the CPU runs it, unless the trainer asks for the
 * portable ones (jump_portable: tests compare the two). */
typedef struct {
    size_t (*list)(const float *restrict, const float *restrict, uint32_t *restrict,
                   float *restrict, size_t, float);
    void (*decode)(const backprop_args *, const uint32_t *restrict, const float *restrict, size_t,
                   float *restrict);
    void (*backward)(const backprop_args *, size_t, size_t);
} kernels;

#ifdef SAE__WIDEN_X86
static pthread_once_t avx512_once = PTHREAD_ONCE_INIT;
static bool avx512; /* written once, under avx512_once, before any trainer reads it */

static void check_avx512(void)
{
    /* libgcc's and compiler-rt's answers include the OS's consent (XCR0) to the registers. */
    __builtin_cpu_init();
    avx512 = __builtin_cpu_supports("avx512f");
}
#endif

static kernels kernels_for(const sae_trainer *t)
{
#ifdef SAE__WIDEN_X86
    pthread_once(&avx512_once, check_avx512);
    if (!t->jump_portable && avx512)
        return (kernels){list_avx512, decode_avx512, backward_avx512};
#else
    (void)t;
#endif
    return (kernels){list_portable, decode_portable, backward_portable};
}

/* The per-latent path. Every sum has one writer, which adds in token order, so the sums are the
 * same whether the steps run on the calling thread (small batches: lib/parallel.c's threads
 * would compete with the BLAS library's, still spinning after the encoder's product) or split
 * across threads, the decode by token and the backward by latent. */
typedef struct {
    const sae_trainer *t;
    backprop_args b;
    kernels k;
    float *E;
} sparse_job;

/* Token i: its fired latents decode into e = b_dec - tgt [+ skip] (on entry), then c scales it. */
static void decode_token(const sparse_job *j, size_t i)
{
    const sae_trainer *t = j->t;
    float *e = j->E + i * j->b.d_out;
    j->k.decode(&j->b, t->near_idx + t->near_ptr[i], t->near_val + t->near_ptr[i],
                t->near_ptr[i + 1] - t->near_ptr[i], e);
    if (t->tc)
        sae__sscal(j->b.d_out, j->b.c, e);
}

static void decode_range(void *ctx, size_t begin, size_t end, size_t worker)
{
    (void)worker;
    for (size_t i = begin; i < end; i++)
        decode_token(ctx, i);
}

static void latent_range(void *ctx, size_t begin, size_t end, size_t worker)
{
    (void)worker;
    const sparse_job *j = ctx;
    j->k.backward(&j->b, begin, end);
}

/* dL/dx_hat and the error's statistics: e = c (x_hat - tgt) on entry, 2e on return; adds
 * ||e||^2 to *sse, e to sum_err and 2e to b_dec's gradient. */
static void finish_error(sae_trainer *t, float *e, double *sse)
{
    const size_t d_out = t->m->d_out;
    float *sum_err = t->buf + t->lay.sum_err, *g_bdec = t->buf + t->lay.b_dec;
    *sse += sae__dot(d_out, e, e);
    sae__axpy(d_out, 1.0f, e, sum_err);
    sae__sscal(d_out, 2.0f, e);
    sae__axpy(d_out, 1.0f, e, g_bdec);
}

/* Room for n tokens' list offsets; false without memory (then the dense path runs). */
static bool ensure_lists(sae_trainer *t, size_t n)
{
    if (n + 1 > t->near_ptr_cap) {
        size_t *p = realloc(t->near_ptr, (n + 1) * sizeof(size_t));
        if (p == NULL)
            return false;
        t->near_ptr = p;
        t->near_ptr_cap = n + 1;
    }
    t->near_ptr[0] = 0;
    return true;
}

/* A list's new capacity for count entries of 4 bytes: half again at least, so that a step's
 * listing reallocates a few times, not per token. */
static size_t grown(size_t cap, size_t count)
{
    size_t want = cap + cap / 2;
    return want < count || want > SIZE_MAX / 4 ? count : want;
}

/* Room for count entries in a list's two arrays (indices, values) of capacity *cap; false
 * without memory (then the dense path runs; what was reallocated stays the trainer's). */
static bool ensure_pair_room(uint32_t **idx, float **val, size_t *cap, size_t count)
{
    if (count <= *cap)
        return true;
    const size_t want = grown(*cap, count);
    uint32_t *i = realloc(*idx, want * sizeof *i);
    if (i == NULL)
        return false;
    *idx = i;
    float *v = realloc(*val, want * sizeof *v);
    if (v == NULL)
        return false;
    *val = v;
    *cap = want;
    return true;
}

/* Encodes the batch and lists every token's latents that need dL/df, when they number fewer
 * than budget in all and memory allows; false otherwise (then the dense path runs, on pre
 * encoded whole). The batch is encoded and listed a block of tokens at a time into pre's first
 * rows: a block's 512 KB of pre-activations are still in L2 when they are listed, where the
 * whole batch's (2 MB at 1024 x 512) went out to L3 and came back, and pushed the decoder and
 * the lists out on the way. Measured at 64 -> 512, 1024 tokens a step (bench_train, tokens per
 * CPU second with one BLAS thread, five runs in turns): blocks of 32 tokens 520k, 64 559k,
 * 128 563k, 256 575k, the whole batch 555k; with two BLAS threads 128 and 256 alike. */
static bool list_batch(sae_trainer *t, const kernels *kern, size_t n, float inv_eps,
                       double budget)
{
    const size_t d_sae = t->m->d_sae;
    if (!ensure_lists(t, n))
        return false;
    /* 64 tokens at least, so that each product still runs at the BLAS library's speed. */
    const size_t block = 131072 / d_sae > 64 ? 131072 / d_sae : 64;
    for (size_t i0 = 0; i0 < n; i0 += block) {
        const size_t rows = n - i0 < block ? n - i0 : block;
        sae__train_encode_rows(t, i0, rows);
        for (size_t r = 0; r < rows; r++) {
            const size_t i = i0 + r, at = t->near_ptr[i];
            if (!ensure_pair_room(&t->near_idx, &t->near_val, &t->near_cap, at + d_sae))
                return false;
            t->near_ptr[i + 1] =
                at + kern->list(t->pre + r * d_sae, t->m->threshold, t->near_idx + at,
                                t->near_val + at, d_sae, inv_eps);
            if ((double)t->near_ptr[i + 1] >= budget)
                return false;
        }
    }
    return true;
}

/* The token lists transposed into latent lists (lat_ptr, lat_tok, lat_val; each latent's tokens
 * in increasing order), by counting; false without memory (then the dense path runs). */
static bool transpose_lists(sae_trainer *t, size_t n)
{
    const size_t d_sae = t->m->d_sae, listed = t->near_ptr[n];
    if (t->lat_ptr == NULL && (t->lat_ptr = malloc((d_sae + 2) * sizeof(size_t))) == NULL)
        return false;
    if (!ensure_pair_room(&t->lat_tok, &t->lat_val, &t->lat_cap, listed))
        return false;
    /* Latent k's count at ptr[k + 2], so that the sums leave its start at ptr[k + 1]: the
     * scatter advances that as its cursor, which leaves it at k's end, k + 1's start. */
    size_t *ptr = t->lat_ptr;
    memset(ptr, 0, (d_sae + 2) * sizeof(size_t));
    const uint32_t *idx = t->near_idx;
    for (size_t a = 0; a < listed; a++)
        ptr[idx[a] + 2]++;
    for (size_t k = 2; k < d_sae + 2; k++)
        ptr[k] += ptr[k - 1];
    for (size_t i = 0; i < n; i++)
        for (size_t a = t->near_ptr[i]; a < t->near_ptr[i + 1]; a++) {
            const size_t at = ptr[idx[a] + 1]++;
            t->lat_tok[at] = (uint32_t)i;
            t->lat_val[at] = t->near_val[a];
        }
    return true;
}

void sae__jumprelu_pass(sae_trainer *t, const float *x, const float *tgt, size_t n, double lambda)
{
    sae_model *m = t->m;
    const size_t d_in = m->d_in, d_out = m->d_out, d_sae = m->d_sae;
    const float c = (float)t->out_scale;
    const sae__train_layout *L = &t->lay;
    float *buf = t->buf, *pre = t->pre, *F = t->dense, *E = t->err;
    const float *th = m->threshold;
    float *fires = buf + L->fires, *g_lt = buf + L->log_th;
    const float inv_eps = (float)(1.0 / t->param[SAE_TRAIN_JUMPRELU_BANDWIDTH]);
    const float lam_eps = (float)lambda * inv_eps;
    double sse = 0.0;
    /* Few latents fired or near their thresholds (the usual case once the L0 penalty has
     * worked): vector operations on those alone beat dense products. */
    const kernels kern = kernels_for(t);
    const bool sparse =
        list_batch(t, &kern, n, inv_eps, t->jump_sparse_below * (double)n * (double)d_sae) &&
        transpose_lists(t, n);
    if (!sparse)
        sae__train_encode_rows(t, 0, n);
    /* E = c (f @ W_dec + b_dec [+ x @ W_skip] - tgt) */
    sae__train_error_base(t, x, tgt, n);
    if (sparse) {
        const backprop_args b = {
            .W_dec = m->W_dec, .th = th, .E = E, .xin = t->xin, .g_wdec = buf + L->W_dec,
            .g_th = g_lt, .g_benc = buf + L->b_enc, .fires = fires, .gT = t->gT,
            .lat_ptr = t->lat_ptr, .lat_tok = t->lat_tok, .lat_val = t->lat_val, .d_out = d_out,
            .d_in = d_in, .c = c, .inv_eps = inv_eps, .lam_eps = lam_eps};
        sparse_job job = {t, b, kern, E};
        const size_t listed = t->near_ptr[n], per = listed / n + 1;
        const size_t threads = sae__model_threads(m);
        const size_t grain = sae__grain(n * (1 + per * d_out / d_sae));
        /* A listed latent costs a dot and an axpy of d_out, a fired one an axpy of d_in more.
         * Threads pay off only on large steps: lib/parallel.c's are created per call, and the
         * BLAS library's (OpenBLAS's) keep spinning on the cores for a while after the
         * encoder's product, so that ours compete with them (docs/training.md, "Measured"). */
        const double work = (double)listed * (double)(2 * d_out + d_in) + (double)n;
        if (work <= t->jump_parallel_above || sae__parallel_chunks(threads, d_sae, grain) == 1) {
            for (size_t i = 0; i < n; i++) {
                decode_token(&job, i);
                finish_error(t, E + i * d_out, &sse);
            }
            kern.backward(&b, 0, d_sae);
        } else {
            sae__parallel_for(threads, n, sae__grain(per * d_out), decode_range, &job);
            for (size_t i = 0; i < n; i++)
                finish_error(t, E + i * d_out, &sse);
            sae__parallel_for(threads, d_sae, grain, latent_range, &job);
        }
        /* The encoder's columns back into W_enc's [d_in][d_sae] layout; gT is left zeroed. */
        sae__train_untranspose(t, buf + L->W_enc);
    } else {
        for (size_t i = 0; i < n; i++)
            mask_codes(pre + i * d_sae, th, F + i * d_sae, fires, d_sae);
        sae__sgemm(false, false, n, d_out, d_sae, 1.0f, F, d_sae, m->W_dec, d_out, 1.0f, E,
                   d_out);
        for (size_t i = 0; i < n; i++) {
            if (t->tc)
                sae__sscal(d_out, c, E + i * d_out);
            finish_error(t, E + i * d_out, &sse);
        }
        /* dW_dec' = f^T @ 2E */
        sae__sgemm(true, false, d_sae, d_out, n, 1.0f, F, d_sae, E, d_out, 0.0f,
                   buf + L->W_dec, d_out);
        /* G = dL/df = 2E @ W_dec'^T (f is not needed any more: G takes its place). */
        sae__sgemm(false, true, n, d_sae, d_out, c, E, d_out, m->W_dec, d_out, 0.0f, F, d_sae);
        for (size_t i = 0; i < n; i++)
            threshold_grads(pre + i * d_sae, th, F + i * d_sae, g_lt, buf + L->b_enc, d_sae,
                            inv_eps, lam_eps);
        /* dW_enc = xin^T @ dL/dpre */
        sae__sgemm(true, false, d_in, d_sae, n, 1.0f, t->xin, d_in, F, d_sae, 0.0f,
                   buf + L->W_enc, d_sae);
    }
    double l0 = 0.0; /* the firing counts started at 0 and are whole floats below 2^24 */
    for (size_t k = 0; k < d_sae; k++)
        l0 += fires[k];
    /* g_lt holds d loss / d theta summed over tokens: log-thresholds get theta times it */
    for (size_t k = 0; k < d_sae; k++)
        g_lt[k] *= th[k];
    sae__train_skip_gradient(t, E, n);
    float *st = buf + L->stats;
    st[SAE__STAT_SSE] = (float)sse;
    st[SAE__STAT_LOSS] = (float)(sse + lambda * l0);
    st[SAE__STAT_L0] = (float)l0;
}
