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
 * positive too), and the firing count. */
static inline void mask_one(const float *restrict p, const float *restrict th,
                            float *restrict f, float *restrict fires, size_t k)
{
    const bool on = p[k] > th[k];
    f[k] = on ? p[k] : 0.0f;
    fires[k] += on ? 1.0f : 0.0f;
}

__attribute__((noinline)) static void mask_codes(const float *restrict p, const float *restrict th, float *restrict f,
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

void sae__jumprelu_pass(sae_trainer *t, const float *x, const float *tgt, size_t n, double lambda)
{
    sae_model *m = t->m;
    const size_t d_in = m->d_in, d_out = m->d_out, d_sae = m->d_sae;
    const float c = (float)t->out_scale;
    const sae__train_layout *L = &t->lay;
    float *buf = t->buf, *pre = t->pre, *F = t->dense, *E = t->err;
    const float *th = m->threshold;
    float *fires = buf + L->fires, *sum_err = buf + L->sum_err;
    for (size_t i = 0; i < n; i++)
        mask_codes(pre + i * d_sae, th, F + i * d_sae, fires, d_sae);
    double l0 = 0.0; /* the firing counts started at 0 and are whole floats below 2^24 */
    for (size_t k = 0; k < d_sae; k++)
        l0 += fires[k];
    /* E = c (f @ W_dec + b_dec [+ x @ W_skip] - tgt) */
    sae__train_error_base(t, x, tgt, n);
    sae__sgemm(false, false, n, d_out, d_sae, 1.0f, F, d_sae, m->W_dec, d_out, 1.0f, E, d_out);
    if (t->tc)
        sae__sscal(n * d_out, c, E);
    double sse = 0.0;
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < d_out; j++) {
            const float e = E[i * d_out + j];
            sse += (double)e * e;
            sum_err[j] += e;
        }
    /* dL/dx_hat = 2 E; dW_dec' = f^T @ 2E; b_dec gets the column sums. */
    sae__sscal(n * d_out, 2.0f, E);
    sae__sgemm(true, false, d_sae, d_out, n, 1.0f, F, d_sae, E, d_out, 0.0f, buf + L->W_dec,
               d_out);
    float *g_bdec = buf + L->b_dec;
    for (size_t i = 0; i < n; i++)
        sae__axpy(d_out, 1.0f, E + i * d_out, g_bdec);
    /* G = dL/df = 2E @ W_dec'^T (f is not needed any more: G takes its place). */
    sae__sgemm(false, true, n, d_sae, d_out, c, E, d_out, m->W_dec, d_out, 0.0f, F, d_sae);
    const float inv_eps = (float)(1.0 / t->param[SAE_TRAIN_JUMPRELU_BANDWIDTH]);
    float *g_lt = buf + L->log_th; /* d loss / d theta summed over tokens, then times theta */
    for (size_t i = 0; i < n; i++)
        threshold_grads(pre + i * d_sae, th, F + i * d_sae, g_lt, buf + L->b_enc, d_sae, inv_eps,
                        (float)lambda * inv_eps);
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
