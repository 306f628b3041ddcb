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
 * positive too), the firing count, and whether the latent needs dL/df (fired, or within the
 * kernel's window of its threshold) counted in *near. */
static inline void mask_one(const float *restrict p, const float *restrict th,
                            float *restrict f, float *restrict fires, size_t k, float inv_eps,
                            float *restrict near)
{
    const bool on = p[k] > th[k];
    const float u = (p[k] - th[k]) * inv_eps;
    f[k] = on ? p[k] : 0.0f;
    fires[k] += on ? 1.0f : 0.0f;
    *near += (float)(on | (u > -0.5f));
}

/* One token; returns how many latents need dL/df. */
__attribute__((noinline)) static float mask_codes(const float *restrict p,
                                                  const float *restrict th, float *restrict f,
                                                  float *restrict fires, size_t d_sae,
                                                  float inv_eps)
{
    float lane[8] = {0};
    size_t k = 0;
    for (; k + 8 <= d_sae; k += 8)
        for (size_t q = 0; q < 8; q++)
            mask_one(p, th, f, fires, k + q, inv_eps, lane + q);
    for (; k < d_sae; k++)
        mask_one(p, th, f, fires, k, inv_eps, lane);
    return ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
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

/* The sparse path, in two passes that split across threads (lib/parallel.c) and give the same
 * sums whatever the thread count: every accumulator has one writer, which adds in token order.
 * Only the latents that fired or sit in the kernel's window of their thresholds are touched. */
typedef struct {
    sae_trainer *t;
    const float *pre;
    float *F, *E;
    size_t n;
    float inv_eps, lam_eps;
} sparse_job;

/* Tokens [begin, end): the fired latents decode into e = b_dec - tgt [+ skip], then c scales it. */
static void decode_range(void *ctx, size_t begin, size_t end, size_t worker)
{
    (void)worker;
    const sparse_job *j = ctx;
    const sae_model *m = j->t->m;
    const size_t d_out = m->d_out, d_sae = m->d_sae;
    for (size_t i = begin; i < end; i++) {
        const float *f = j->F + i * d_sae;
        float *e = j->E + i * d_out;
        for (size_t k = 0; k < d_sae; k++)
            if (f[k] != 0.0f)
                sae__axpy(d_out, f[k], m->W_dec + k * d_out, e);
        if (j->t->tc)
            sae__sscal(d_out, (float)j->t->out_scale, e);
    }
}

/* Latents [begin, end), over every token (E holds 2 c (x_hat - tgt)): dL/df_k = c 2e . W_dec[k]
 * where latent k fired or is in the window, W_dec's row k gets f_k 2e, the threshold and b_enc
 * their terms, and F's entries become dL/dpre as threshold_grads leaves them. */
static void latent_range(void *ctx, size_t begin, size_t end, size_t worker)
{
    (void)worker;
    const sparse_job *j = ctx;
    const sae_trainer *t = j->t;
    const sae_model *m = t->m;
    const size_t d_out = m->d_out, d_sae = m->d_sae;
    const float *th = m->threshold, c = (float)t->out_scale, inv_eps = j->inv_eps;
    float *g_wdec = t->buf + t->lay.W_dec, *g_th = t->buf + t->lay.log_th,
          *g_benc = t->buf + t->lay.b_enc;
    for (size_t i = 0; i < j->n; i++) {
        const float *p = j->pre + i * d_sae, *e = j->E + i * d_out;
        float *f = j->F + i * d_sae;
        for (size_t k = begin; k < end; k++) {
            const float u = (p[k] - th[k]) * inv_eps;
            if (!(u > -0.5f)) { /* neither fired nor in the window */
                f[k] = 0.0f;
                continue;
            }
            const float g = c * sae__dot(d_out, e, m->W_dec + k * d_out);
            if (f[k] != 0.0f)
                sae__axpy(d_out, f[k], e, g_wdec + k * d_out);
            if (u < 0.5f)
                g_th[k] -= th[k] * inv_eps * g + j->lam_eps;
            f[k] = f[k] != 0.0f ? g : 0.0f;
            g_benc[k] += f[k];
        }
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
    double near = 0.0, sse = 0.0;
    for (size_t i = 0; i < n; i++)
        near += mask_codes(pre + i * d_sae, th, F + i * d_sae, fires, d_sae, inv_eps);
    double l0 = 0.0; /* the firing counts started at 0 and are whole floats below 2^24 */
    for (size_t k = 0; k < d_sae; k++)
        l0 += fires[k];
    /* E = c (f @ W_dec + b_dec [+ x @ W_skip] - tgt) */
    sae__train_error_base(t, x, tgt, n);
    /* Few latents fired or near their thresholds (the usual case once the L0 penalty has
     * worked): vector operations on those alone beat dense products. */
    if (near < t->jump_sparse_below * (double)n * (double)d_sae) {
        sparse_job job = {t, pre, F, E, n, inv_eps, lam_eps};
        const size_t threads = sae__model_threads(m), per = (size_t)(near / (double)n) + 1;
        sae__parallel_for(threads, n, sae__grain(per * d_out), decode_range, &job);
        for (size_t i = 0; i < n; i++)
            finish_error(t, E + i * d_out, &sse);
        sae__parallel_for(threads, d_sae, sae__grain(n * (1 + per * d_out / d_sae)),
                          latent_range, &job);
    } else {
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
    }
    /* g_lt holds d loss / d theta summed over tokens: log-thresholds get theta times it */
    for (size_t k = 0; k < d_sae; k++)
        g_lt[k] *= th[k];
    /* dW_enc = xin^T @ dL/dpre */
    sae__sgemm(true, false, d_in, d_sae, n, 1.0f, t->xin, d_in, F, d_sae, 0.0f, buf + L->W_enc,
               d_sae);
    sae__train_skip_gradient(t, E, n);
    float *st = buf + L->stats;
    st[SAE__STAT_SSE] = (float)sse;
    st[SAE__STAT_LOSS] = (float)(sse + lambda * l0);
    st[SAE__STAT_L0] = (float)l0;
}
