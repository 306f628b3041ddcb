/* Reconstruction quality over a batch: the metrics SAELens' evals and sparsify report, each
 * accumulated in double over blocks of tokens so the batch can be any size. */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Tokens per block: enough for full-speed GEMMs, bounded scratch. */
#define EVAL_BLOCK 256

typedef struct {
    double sq_err, sum_x_sq, l0, l1, cosine, l2_ratio;
    size_t ratio_tokens;
    double *sum_x; /* [d_in], for the batch mean in the FVU */
    unsigned char *fired; /* [d_sae] */
} totals;

static void add_token(totals *acc, const float *x, const float *x_hat, size_t d_in)
{
    double err = 0, xx = 0, hh = 0, xh = 0;
    for (size_t j = 0; j < d_in; j++) {
        double a = x[j], b = x_hat[j];
        err += (a - b) * (a - b);
        xx += a * a;
        hh += b * b;
        xh += a * b;
        acc->sum_x[j] += a;
    }
    acc->sq_err += err;
    acc->sum_x_sq += xx;
    if (xx > 0 && hh > 0)
        acc->cosine += xh / sqrt(xx * hh);
    if (xx > 0) {
        acc->l2_ratio += sqrt(hh / xx);
        acc->ratio_tokens++;
    }
}

static void add_sparse_codes(totals *acc, const uint32_t *idx, const float *val, uint32_t count)
{
    acc->l0 += count;
    for (uint32_t j = 0; j < count; j++) {
        acc->l1 += val[j];
        acc->fired[idx[j]] = 1;
    }
}

static void add_dense_codes(totals *acc, const float *f, size_t d_sae)
{
    for (size_t i = 0; i < d_sae; i++) {
        if (f[i] != 0.0f) {
            acc->l0 += 1;
            acc->l1 += f[i];
            acc->fired[i] = 1;
        }
    }
}

static int check_metrics(const sae_eval_metric *which, size_t count)
{
    for (size_t i = 0; i < count; i++)
        if (which[i] < SAE_EVAL_MSE || which[i] > SAE_EVAL_DEAD_FRACTION)
            return sae__fail(SAE_EINVAL, "sae_evaluate: which[%zu] = %d is not a metric", i,
                             (int)which[i]);
    return SAE_OK;
}

int sae_evaluate(const sae_model *m, const float *x, size_t n, const sae_eval_metric *which,
                 size_t count, double *values)
{
    SAE_CHECK_NULL(m);
    if (m->d_out != m->d_in)
        return sae__fail(SAE_EINVAL, "sae_evaluate: this transcoder predicts %zu values from %zu; "
                         "score it against its target with sae_evaluate_to", m->d_out, m->d_in);
    return sae_evaluate_to(m, x, x, n, which, count, values);
}

int sae_evaluate_to(const sae_model *m, const float *x, const float *y, size_t n,
                    const sae_eval_metric *which, size_t count, double *values)
{
    SAE_CHECK_NULL(m);
    SAE_CHECK_NULL(x);
    SAE_CHECK_NULL(y);
    SAE_CHECK_NULL(which);
    SAE_CHECK_NULL(values);
    if (n == 0)
        return sae__fail(SAE_EINVAL, "sae_evaluate: n must be at least 1");
    int rc = check_metrics(which, count);
    if (rc != SAE_OK)
        return rc;
    const size_t d_in = m->d_in, d_out = m->d_out, d_sae = m->d_sae;
    if ((rc = sae__check_tokens(n, sae__model_width(m), "sae_evaluate")) != SAE_OK)
        return rc;
    if ((rc = sae__check_finite(x, n * d_in, d_in, "x")) != SAE_OK ||
        (rc = sae__check_finite(y, n * d_out, d_out, "y")) != SAE_OK)
        return rc;

    /* TopK and GroupMax codes are at most K wide, so sparse codes and K decoder rows per token
     * beat a dense decode; the other architectures go through dense codes and two GEMMs. */
    const bool sparse = !sae__codes_independent(m);
    const size_t k = m->k < d_sae ? m->k : d_sae;
    const size_t block = n < EVAL_BLOCK ? n : EVAL_BLOCK;
    const size_t code_floats = sparse ? block * k : block * d_sae;
    totals acc = {0};
    sae__finish fin = {0};
    acc.sum_x = sae__zalloc(d_out, sizeof(double), "evaluation sums");
    acc.fired = sae__zalloc(d_sae, 1, "evaluation firing marks");
    float *x_hat = sae__alloc(block * d_out, sizeof(float), "evaluation scratch");
    float *codes = sae__alloc(code_floats, sizeof(float), "evaluation scratch");
    uint32_t *idx = sparse ? sae__alloc(block * k, sizeof(uint32_t), "evaluation scratch") : NULL;
    uint32_t *nnz = sparse ? sae__alloc(block, sizeof(uint32_t), "evaluation scratch") : NULL;
    if (sae__finish_alloc(m, block, &fin) != SAE_OK || acc.sum_x == NULL || acc.fired == NULL ||
        x_hat == NULL || codes == NULL ||
        (sparse && (idx == NULL || nnz == NULL))) {
        rc = SAE_ENOMEM;
        goto done;
    }
    for (size_t first = 0; first < n && rc == SAE_OK; first += block) {
        size_t rows = n - first < block ? n - first : block;
        const float *xb = x + first * d_in;
        if (sparse)
            rc = sae_encode_sparse(m, xb, rows, k, idx, codes, nnz);
        else
            rc = sae_encode(m, xb, rows, codes);
        if (rc == SAE_OK)
            rc = sparse ? sae_decode_sparse(m, idx, codes, nnz, k, rows, x_hat)
                        : sae_decode(m, codes, rows, x_hat);
        for (size_t r = 0; fin.norms != NULL && r < rows && rc == SAE_OK; r++)
            rc = sae__token_norm_of(m, xb + r * d_in, first + r, &fin.norms[r]);
        if (rc == SAE_OK)
            rc = sae__finish_prepare(m, xb, rows, &fin);
        if (rc != SAE_OK)
            break;
        sae__finish_apply(m, &fin, rows, x_hat);
        const float *yb = y + first * d_out;
        for (size_t r = 0; r < rows; r++) {
            if (sparse)
                add_sparse_codes(&acc, idx + r * k, codes + r * k, nnz[r]);
            else
                add_dense_codes(&acc, codes + r * d_sae, d_sae);
            add_token(&acc, yb + r * d_out, x_hat + r * d_out, d_out);
        }
    }
    if (rc != SAE_OK)
        goto done;

    /* sum ||x - mean||^2 = sum ||x||^2 - n ||mean||^2 */
    double mean_sq = 0;
    for (size_t j = 0; j < d_out; j++)
        mean_sq += acc.sum_x[j] * acc.sum_x[j];
    double deviation = acc.sum_x_sq - mean_sq / (double)n;
    double fvu = deviation > 0 ? acc.sq_err / deviation : NAN;
    size_t dead = 0;
    for (size_t i = 0; i < d_sae; i++)
        dead += !acc.fired[i];
    for (size_t i = 0; i < count; i++) {
        switch (which[i]) {
        case SAE_EVAL_MSE: values[i] = acc.sq_err / (double)n; break;
        case SAE_EVAL_FVU: values[i] = fvu; break;
        case SAE_EVAL_EXPLAINED_VARIANCE: values[i] = 1.0 - fvu; break;
        case SAE_EVAL_L0: values[i] = acc.l0 / (double)n; break;
        case SAE_EVAL_L1: values[i] = acc.l1 / (double)n; break;
        case SAE_EVAL_COSINE: values[i] = acc.cosine / (double)n; break;
        case SAE_EVAL_L2_RATIO:
            values[i] = acc.ratio_tokens ? acc.l2_ratio / (double)acc.ratio_tokens : NAN;
            break;
        case SAE_EVAL_DEAD_FRACTION: values[i] = (double)dead / (double)d_sae; break;
        }
    }
done:
    sae__finish_free(&fin);
    free(acc.sum_x);
    free(acc.fired);
    free(x_hat);
    free(codes);
    free(idx);
    free(nnz);
    return rc;
}
