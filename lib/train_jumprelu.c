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
 * (tests/test_train_recipes.c checks them that way). Dense like ReLU's pass: every matrix
 * product is one SGEMM, and the threshold's gradient needs dL/df for every latent near its
 * threshold, fired or not. */
#include "train_internal.h"

#include <math.h>
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

__attribute__((noinline)) static void mask_codes(const float *restrict p,
                                                 const float *restrict th, float *restrict f,
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

__attribute__((noinline)) static void threshold_grads(const float *restrict p, const float *restrict th, float *restrict g,
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

/* Token p's latents that need dL/df (u = (pre - th) / eps > -1/2: fired, or within the kernel's
 * window of the threshold) into idx, in increasing order; returns how many. idx has room for
 * d_sae: every latent is written at the next free place, which only advances for a listed one,
 * so the loop has no branch to mispredict. */
__attribute__((noinline)) static size_t list_token(const float *restrict p,
                                                   const float *restrict th,
                                                   uint32_t *restrict idx, size_t d_sae,
                                                   float inv_eps)
{
    size_t c = 0;
    for (size_t k = 0; k < d_sae; k++) {
        idx[c] = (uint32_t)k;
        c += (p[k] - th[k]) * inv_eps > -0.5f;
    }
    return c;
}

/* The per-latent path. Every sum has one writer, which adds in token order, so the sums are the
 * same whether the tokens run in one loop on the calling thread (small batches: lib/parallel.c's
 * threads would compete with the BLAS library's, still spinning after the encoder's product) or
 * in two passes split across threads, by token and then by latent. */
typedef struct {
    sae_trainer *t;
    const float *pre;
    float *E;
    size_t n;
    float inv_eps, lam_eps;
} sparse_job;

/* Token i: its fired latents decode into e = b_dec - tgt [+ skip] (on entry), then c scales it. */
static void decode_token(const sparse_job *j, size_t i)
{
    const sae_trainer *t = j->t;
    const sae_model *m = t->m;
    const size_t d_out = m->d_out;
    const float *p = j->pre + i * m->d_sae;
    float *e = j->E + i * d_out;
    for (size_t a = t->near_ptr[i]; a < t->near_ptr[i + 1]; a++) {
        const size_t k = t->near_idx[a];
        if (p[k] > m->threshold[k])
            sae__axpy(d_out, p[k], m->W_dec + k * d_out, e);
    }
    if (t->tc)
        sae__sscal(d_out, (float)t->out_scale, e);
}

static void decode_range(void *ctx, size_t begin, size_t end, size_t worker)
{
    (void)worker;
    for (size_t i = begin; i < end; i++)
        decode_token(ctx, i);
}

/* Token i's listed latents at near_idx[a0 .. a1) (E holds 2 c (x_hat - tgt)): for each, g =
 * dL/df_k = 2e . W_dec'[k]; the threshold gets its term where k is in the window; where k fired,
 * W_dec's row k gets f_k 2e, b_enc g, the encoder column k (kept transposed in gT) g times the
 * input, and the firing count one. */
static void backprop_token(const sparse_job *j, size_t i, size_t a0, size_t a1)
{
    const sae_trainer *t = j->t;
    const sae_model *m = t->m;
    const size_t d_out = m->d_out, d_in = m->d_in;
    const float *th = m->threshold, *e = j->E + i * d_out, *p = j->pre + i * m->d_sae;
    const float *xin = t->xin + i * d_in, *W_dec = m->W_dec, c = (float)t->out_scale;
    const float inv_eps = j->inv_eps, lam_eps = j->lam_eps;
    float *g_wdec = t->buf + t->lay.W_dec, *g_th = t->buf + t->lay.log_th,
          *g_benc = t->buf + t->lay.b_enc, *fires = t->buf + t->lay.fires, *gT = t->gT;
    for (size_t a = a0; a < a1; a++) {
        const size_t k = t->near_idx[a];
        const float u = (p[k] - th[k]) * inv_eps;
        const float g = c * sae__dot(d_out, e, W_dec + k * d_out);
        if (u < 0.5f)
            g_th[k] -= th[k] * inv_eps * g + lam_eps;
        if (!(p[k] > th[k]))
            continue;
        sae__axpy(d_out, p[k], e, g_wdec + k * d_out);
        g_benc[k] += g;
        sae__axpy(d_in, g, xin, gT + k * d_in);
        fires[k] += 1.0f;
    }
}

/* The first of near_idx[lo .. hi) (increasing) that is at least k, or hi. */
static size_t list_find(const uint32_t *idx, size_t lo, size_t hi, size_t k)
{
    while (lo < hi) {
        const size_t mid = lo + (hi - lo) / 2;
        if (idx[mid] < k)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Latents [begin, end), over every token: each token's listed latents in that range. */
static void latent_range(void *ctx, size_t begin, size_t end, size_t worker)
{
    (void)worker;
    const sparse_job *j = ctx;
    const sae_trainer *t = j->t;
    for (size_t i = 0; i < j->n; i++) {
        const size_t lo = list_find(t->near_idx, t->near_ptr[i], t->near_ptr[i + 1], begin);
        backprop_token(j, i, lo, list_find(t->near_idx, lo, t->near_ptr[i + 1], end));
    }
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

/* Room for count listed latents, grown by half again at least so that a step's listing
 * reallocates a few times, not per token; false without memory (then the dense path runs). */
static bool ensure_list_room(sae_trainer *t, size_t count)
{
    if (count > t->near_cap) {
        size_t want = t->near_cap + t->near_cap / 2;
        if (want < count || want > SIZE_MAX / sizeof(uint32_t))
            want = count;
        uint32_t *p = realloc(t->near_idx, want * sizeof(uint32_t));
        if (p == NULL)
            return false;
        t->near_idx = p;
        t->near_cap = want;
    }
    return true;
}

/* Lists every token's latents that need dL/df, when they number fewer than budget in all and
 * memory allows; false otherwise (then the dense path runs). */
static bool list_batch(sae_trainer *t, size_t n, float inv_eps, double budget)
{
    const size_t d_sae = t->m->d_sae;
    if (!ensure_lists(t, n))
        return false;
    for (size_t i = 0; i < n; i++) {
        if (!ensure_list_room(t, t->near_ptr[i] + d_sae))
            return false;
        t->near_ptr[i + 1] = t->near_ptr[i] + list_token(t->pre + i * d_sae, t->m->threshold,
                                                         t->near_idx + t->near_ptr[i], d_sae,
                                                         inv_eps);
        if ((double)t->near_ptr[i + 1] >= budget)
            return false;
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
    const bool sparse = list_batch(t, n, inv_eps, t->jump_sparse_below * (double)n * (double)d_sae);
    /* E = c (f @ W_dec + b_dec [+ x @ W_skip] - tgt) */
    sae__train_error_base(t, x, tgt, n);
    if (sparse) {
        sparse_job job = {t, pre, E, n, inv_eps, lam_eps};
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
                backprop_token(&job, i, t->near_ptr[i], t->near_ptr[i + 1]);
            }
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
