/* evalcore.c: see evalcore.h. */
#include "evalcore.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct evalcore {
    const sae_model *dict;
    size_t V, d_in, d_out, d_sae;
    double ce[3];           /* clean, spliced, zero */
    double kl[2];           /* spliced, zero */
    long n_ce, n_kl;
    double l0, err2, sum_y2;
    double *sum_y;          /* [d_out] */
    double sum_sq_elem;     /* sum over tokens and dims of y^2 */
    long n_rows;
    unsigned char *fired;   /* [d_sae] */
    double *lp[3];          /* scratch log-probs [V] */
    float *f, *yh;
    size_t cap;
};

evalcore *evalcore_new(const sae_model *dict, size_t vocab)
{
    evalcore *e = calloc(1, sizeof *e);
    if (!e)
        return NULL;
    e->dict = dict;
    e->V = vocab;
    e->d_in = sae_model_d_in(dict);
    e->d_out = sae_model_d_out(dict);
    e->d_sae = sae_model_d_sae(dict);
    e->sum_y = calloc(e->d_out, sizeof *e->sum_y);
    e->fired = calloc(e->d_sae, 1);
    for (int i = 0; i < 3; i++)
        e->lp[i] = malloc(vocab * sizeof(double));
    if (!e->sum_y || !e->fired || !e->lp[0] || !e->lp[1] || !e->lp[2]) {
        evalcore_free(e);
        return NULL;
    }
    return e;
}

void evalcore_free(evalcore *e)
{
    if (!e)
        return;
    free(e->sum_y);
    free(e->fired);
    for (int i = 0; i < 3; i++)
        free(e->lp[i]);
    free(e->f);
    free(e->yh);
    free(e);
}

static void log_softmax(const float *z, size_t V, double *out)
{
    double mx = z[0];
    for (size_t v = 1; v < V; v++)
        if (z[v] > mx) mx = z[v];
    double s = 0;
    for (size_t v = 0; v < V; v++)
        s += exp((double)z[v] - mx);
    const double lse = mx + log(s);
    for (size_t v = 0; v < V; v++)
        out[v] = (double)z[v] - lse;
}

void evalcore_logits(evalcore *e, const float *clean, const float *spliced, const float *zero,
                     const int32_t *tok, const unsigned char *special, size_t n)
{
    const size_t V = e->V;
    for (size_t t = 0; t < n; t++) {
        if (special[t])
            continue;
        log_softmax(clean + t * V, V, e->lp[0]);
        log_softmax(spliced + t * V, V, e->lp[1]);
        log_softmax(zero + t * V, V, e->lp[2]);
        double k1 = 0, k2 = 0;
        for (size_t v = 0; v < V; v++) {
            const double p = exp(e->lp[0][v]);
            k1 += p * (e->lp[0][v] - e->lp[1][v]);
            k2 += p * (e->lp[0][v] - e->lp[2][v]);
        }
        e->kl[0] += k1;
        e->kl[1] += k2;
        e->n_kl++;
        if (t + 1 < n) {
            const size_t next = (size_t)tok[t + 1];
            for (int i = 0; i < 3; i++)
                e->ce[i] -= e->lp[i][next];
            e->n_ce++;
        }
    }
}

int evalcore_rows(evalcore *e, const float *x, const float *y, const unsigned char *special,
                  size_t n)
{
    if (n > e->cap) {
        float *f = realloc(e->f, n * e->d_sae * sizeof *f);
        if (f) e->f = f;
        float *yh = realloc(e->yh, n * e->d_out * sizeof *yh);
        if (yh) e->yh = yh;
        if (!f || !yh)
            return SAE_ENOMEM;
        e->cap = n;
    }
    int rc = sae_encode(e->dict, x, n, e->f);
    if (rc == SAE_OK)
        rc = sae_reconstruct(e->dict, x, n, e->yh);
    if (rc != SAE_OK)
        return rc;
    for (size_t t = 0; t < n; t++) {
        if (special[t])
            continue;
        const float *ft = e->f + t * e->d_sae;
        for (size_t i = 0; i < e->d_sae; i++)
            if (ft[i] > 0) {
                e->l0 += 1;
                e->fired[i] = 1;
            }
        const float *yt = y + t * e->d_out, *ht = e->yh + t * e->d_out;
        for (size_t j = 0; j < e->d_out; j++) {
            const double r = (double)yt[j] - (double)ht[j];
            e->err2 += r * r;
            e->sum_y[j] += yt[j];
            e->sum_y2 += (double)yt[j] * yt[j];
        }
        e->n_rows++;
    }
    return SAE_OK;
}

void evalcore_print_json(const evalcore *e, FILE *f, const char *extra)
{
    const double N = (double)e->n_rows;
    double mean2 = 0;
    for (size_t j = 0; j < e->d_out; j++)
        mean2 += (e->sum_y[j] / N) * (e->sum_y[j] / N);
    const double var_total = e->sum_y2 - N * mean2;   /* sum ||y - mean||^2 */
    const double fvu = e->err2 / var_total;
    const double mean_sq_elem = e->sum_y2 / (N * (double)e->d_out);
    const double ev_saelens = 1 - (e->err2 / N) / (e->sum_y2 / N - mean_sq_elem * mean_sq_elem);
    size_t dead = 0;
    for (size_t i = 0; i < e->d_sae; i++)
        dead += !e->fired[i];
    const double ce0 = e->ce[0] / (double)e->n_ce, ce1 = e->ce[1] / (double)e->n_ce,
                 ce2 = e->ce[2] / (double)e->n_ce;
    const double kl1 = e->kl[0] / (double)e->n_kl, kl2 = e->kl[1] / (double)e->n_kl;
    fprintf(f, "{\"tokens\":%ld,\"ce_positions\":%ld,\"ce_loss_clean\":%.9g,"
               "\"ce_loss_spliced\":%.9g,\"ce_loss_zero_ablated\":%.9g,\"ce_loss_recovered\":%.9g,"
               "\"kl_spliced\":%.9g,\"kl_zero_ablated\":%.9g,\"kl_div_score\":%.9g,"
               "\"fvu\":%.9g,\"saelens_explained_variance\":%.9g,\"l0\":%.9g,"
               "\"dead_features\":%zu,\"d_sae\":%zu%s%s}\n",
            e->n_rows, e->n_ce, ce0, ce1, ce2, (ce2 - ce1) / (ce2 - ce0), kl1, kl2,
            (kl2 - kl1) / kl2, fvu, ev_saelens, e->l0 / N, dead, e->d_sae, extra ? "," : "",
            extra ? extra : "");
}
