/* Dictionary learning: gradients against finite differences of a float64 reference loss for
 * each architecture, metrics against float64 loops, initialization, determinism, checkpoints,
 * the data-parallel hook (two threads summing their buffers), errors, and recovery of planted
 * features. Links the static library to read the allreduce buffer's layout. */
#define _POSIX_C_SOURCE 200809L /* pthread barriers */
#include "train_internal.h"
#include "testutil.h"
#include "trainutil.h"

#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- a float64 reference of the training losses ------------------------------------------- */

typedef struct {
    sae_arch arch;
    size_t d_in, d_sae, k;
    int apply;
    double scale;
    double *We, *Wd, *be, *bd; /* model layouts */
} ref_model;

typedef struct {
    double mse_norm, aux_norm, lambda, coeff;
    size_t auxk;
    const bool *dead; /* NULL: no AuxK term */
    const double *e0; /* [n][d_in] residual held fixed in the AuxK target */
    const double *bd0;
} ref_ctx;

static void ref_get(const sae_model *m, ref_model *r)
{
    r->arch = sae_model_arch(m);
    r->d_in = sae_model_d_in(m);
    r->d_sae = sae_model_d_sae(m);
    double v;
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, &v));
    r->apply = (int)v;
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_INPUT_SCALE, &r->scale));
    r->k = 0;
    if (r->arch != SAE_ARCH_RELU) {
        ck_assert_ok(sae_model_get_param(m, SAE_PARAM_K, &v));
        r->k = (size_t)v;
    }
    r->We = tu_dup_tensor(m, SAE_W_ENC, r->d_in * r->d_sae);
    r->Wd = tu_dup_tensor(m, SAE_W_DEC, r->d_in * r->d_sae);
    r->be = tu_dup_tensor(m, SAE_B_ENC, r->d_sae);
    r->bd = tu_dup_tensor(m, SAE_B_DEC, r->d_in);
}

static void ref_free(ref_model *r)
{
    free(r->We);
    free(r->Wd);
    free(r->be);
    free(r->bd);
}

/* Scaled inputs, pre-activations and codes for n tokens. */
static void ref_forward(const ref_model *r, const float *x, size_t n, double *xs, double *pre,
                        double *f)
{
    const size_t d = r->d_in, s = r->d_sae;
    for (size_t t = 0; t < n; t++) {
        for (size_t j = 0; j < d; j++)
            xs[t * d + j] = r->scale * (double)x[t * d + j];
        for (size_t i = 0; i < s; i++) {
            double acc = r->be[i];
            for (size_t j = 0; j < d; j++)
                acc += (xs[t * d + j] - r->apply * r->bd[j]) * r->We[j * s + i];
            pre[t * s + i] = acc;
        }
    }
    for (size_t i = 0; i < n * s; i++)
        f[i] = 0.0;
    if (r->arch == SAE_ARCH_RELU) {
        for (size_t i = 0; i < n * s; i++)
            f[i] = pre[i] > 0.0 ? pre[i] : 0.0;
    } else if (r->arch == SAE_ARCH_TOPK) {
        size_t k = r->k < s ? r->k : s;
        for (size_t t = 0; t < n; t++) {
            const double *p = pre + t * s;
            bool *taken = calloc(s, 1);
            for (size_t c = 0; c < k; c++) {
                size_t best = s;
                for (size_t i = 0; i < s; i++)
                    if (!taken[i] && (best == s || p[i] > p[best]))
                        best = i;
                taken[best] = true;
                f[t * s + best] = p[best] > 0.0 ? p[best] : 0.0;
            }
            free(taken);
        }
    } else { /* BatchTopK: the k * n largest positive values of the batch, lower flat index first */
        size_t want = r->k * n;
        bool *taken = calloc(n * s, 1);
        for (size_t c = 0; c < want; c++) {
            size_t best = n * s;
            for (size_t i = 0; i < n * s; i++)
                if (!taken[i] && pre[i] > 0.0 && (best == n * s || pre[i] > pre[best]))
                    best = i;
            if (best == n * s)
                break;
            taken[best] = true;
            f[best] = pre[best];
        }
        free(taken);
    }
}

/* e = x_hat_s - x_s for every token. */
static void ref_error(const ref_model *r, const double *xs, const double *f, size_t n, double *e)
{
    const size_t d = r->d_in, s = r->d_sae;
    for (size_t t = 0; t < n; t++)
        for (size_t j = 0; j < d; j++) {
            double acc = r->bd[j];
            for (size_t i = 0; i < s; i++)
                acc += f[t * s + i] * r->Wd[i * d + j];
            e[t * d + j] = acc - xs[t * d + j];
        }
}

/* The mean training loss of the batch, as docs/training.md defines it. */
static double ref_loss(const ref_model *r, const float *x, size_t n, const ref_ctx *c)
{
    const size_t d = r->d_in, s = r->d_sae;
    double *xs = tu_malloc(n * d * sizeof(double)), *e = tu_malloc(n * d * sizeof(double));
    double *pre = tu_malloc(n * s * sizeof(double)), *f = tu_malloc(n * s * sizeof(double));
    ref_forward(r, x, n, xs, pre, f);
    ref_error(r, xs, f, n, e);
    double total = 0.0;
    for (size_t t = 0; t < n; t++) {
        double sq = 0.0;
        for (size_t j = 0; j < d; j++)
            sq += e[t * d + j] * e[t * d + j];
        if (r->arch == SAE_ARCH_RELU) {
            double l1 = 0.0;
            for (size_t i = 0; i < s; i++) {
                double nrm = 0.0;
                for (size_t j = 0; j < d; j++)
                    nrm += r->Wd[i * d + j] * r->Wd[i * d + j];
                l1 += f[t * s + i] * sqrt(nrm);
            }
            total += sq + c->lambda * l1;
            continue;
        }
        total += sq / c->mse_norm;
        if (c->dead == NULL)
            continue;
        /* AuxK: the auxk largest dead pre-activations, rectified, reconstruct the fixed residual
         * (OpenAI: decode_sparse adds b_dec, the target adds b_dec detached). */
        double *dv = tu_malloc(d * sizeof(double));
        for (size_t j = 0; j < d; j++)
            dv[j] = c->e0[t * d + j] + r->bd[j] - c->bd0[j];
        total += c->coeff * tu_auxk_sq(dv, pre + t * s, c->dead, c->auxk, r->Wd, s, d) / c->aux_norm;
        free(dv);
    }
    free(xs);
    free(e);
    free(pre);
    free(f);
    return total / (double)n;
}

/* ---- helpers ------------------------------------------------------------------------------- */

static sae_trainer *make_trainer(sae_model *m, const float *sample, size_t n)
{
    sae_trainer *t;
    ck_assert_ok(sae_trainer_new(&t, m));
    ck_assert_ok(sae_trainer_init(t, sample, n));
    return t;
}

static void get_all(const sae_model *m, float *out)
{
    size_t w = sae_model_d_in(m) * sae_model_d_sae(m);
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_ENC, out));
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_DEC, out + w));
    ck_assert_ok(sae_model_get_tensor(m, SAE_B_ENC, out + 2 * w));
    ck_assert_ok(sae_model_get_tensor(m, SAE_B_DEC, out + 2 * w + sae_model_d_sae(m)));
}

/* ---- gradients ----------------------------------------------------------------------------- */

/* Takes a first step (so some latents die with DEAD_TOKENS = 1 and the AuxK normalizer is set),
 * then checks the second step's gradient buffer against central differences of ref_loss. */
static void check_gradient(sae_arch arch, int apply_b_dec, size_t auxk)
{
    const size_t d = 6, s = 20, n = 9;
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, arch, d, s));
    if (arch != SAE_ARCH_RELU)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 2));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, apply_b_dec));
    float *sample = tu_train_data(40, d, 1), *b1 = tu_train_data(n, d, 2),
          *b2 = tu_train_data(n, d, 3);
    sae_trainer *t;
    ck_assert_ok(sae_trainer_new(&t, m));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_DEAD_TOKENS, 1));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_AUXK, (double)auxk));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_AUXK_COEFF, 0.5));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_L1_COEFF, 0.7));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR, 0.05));
    ck_assert_ok(sae_trainer_init(t, sample, 40));
    tu_capture cap = {0};
    ck_assert_ok(sae_trainer_set_allreduce(t, tu_capture_allreduce, &cap));

    /* Reference state after step 1: the dead set and the residual variance of batch 1. */
    ref_model r1;
    ref_get(m, &r1);
    double *xs = tu_malloc(n * d * sizeof(double)), *pre = tu_malloc(n * s * sizeof(double));
    double *f = tu_malloc(n * s * sizeof(double)), *e = tu_malloc(n * d * sizeof(double));
    ref_forward(&r1, b1, n, xs, pre, f);
    ref_error(&r1, xs, f, n, e);
    bool dead[20];
    size_t n_dead = 0;
    for (size_t i = 0; i < s; i++) {
        dead[i] = true;
        for (size_t q = 0; q < n; q++)
            if (f[q * s + i] > 0.0)
                dead[i] = false;
        n_dead += dead[i];
    }
    double mean_e[6] = {0}, var = 0.0;
    for (size_t q = 0; q < n; q++)
        for (size_t j = 0; j < d; j++)
            mean_e[j] += e[q * d + j] / (double)n;
    for (size_t q = 0; q < n; q++)
        for (size_t j = 0; j < d; j++)
            var += (e[q * d + j] - mean_e[j]) * (e[q * d + j] - mean_e[j]) / (double)n;
    /* The init sample's per-token variance, TopK's MSE normalizer. */
    double smean[6] = {0}, svar = 0.0;
    for (size_t q = 0; q < 40; q++)
        for (size_t j = 0; j < d; j++)
            smean[j] += (double)((float)r1.scale * sample[q * d + j]) / 40.0;
    for (size_t q = 0; q < 40; q++)
        for (size_t j = 0; j < d; j++) {
            double v = (double)((float)r1.scale * sample[q * d + j]) - smean[j];
            svar += v * v / 40.0;
        }
    ck_assert_ok(sae_trainer_step(t, b1, n));
    if (arch != SAE_ARCH_RELU)
        ck_assert_msg(n_dead > 0 && n_dead < s, "step 1 should leave some latents dead (%zu)",
                      n_dead);

    ref_model r;
    ref_get(m, &r);
    ref_forward(&r, b2, n, xs, pre, f);
    ref_error(&r, xs, f, n, e);
    ref_ctx c = {svar, var, 0.7, 0.5, auxk, arch == SAE_ARCH_RELU ? NULL : dead, e, NULL};
    double *bd0 = tu_malloc(d * sizeof(double));
    memcpy(bd0, r.bd, d * sizeof(double));
    c.bd0 = bd0;
    ck_assert_ok(sae_trainer_step(t, b2, n));
    ck_assert_int_eq(cap.calls, 2);
    sae__train_layout L;
    sae__train_layout_of(m, &L);
    ck_assert_uint_eq(cap.count, L.count);
    double N = cap.copy[L.stats + SAE__STAT_TOKENS];
    ck_assert_double_eq(N, (double)n);

    /* The loss reported is the reference loss at the weights the step started from. */
    double want_loss = ref_loss(&r, b2, n, &c);
    ck_assert_msg(fabs(tu_metric(t, SAE_METRIC_LOSS) - want_loss) <= 1e-4 * fabs(want_loss),
                  "loss %g, reference %g", tu_metric(t, SAE_METRIC_LOSS), want_loss);

    double *params[4] = {r.We, r.Wd, r.be, r.bd};
    size_t sizes[4] = {d * s, d * s, s, d}, offs[4] = {L.W_enc, L.W_dec, L.b_enc, L.b_dec};
    const char *names[4] = {"W_enc", "W_dec", "b_enc", "b_dec"};
    double *fd = tu_malloc(L.n_params * sizeof(double));
    double fd_max = 0.0;
    for (size_t p = 0, at = 0; p < 4; p++) {
        for (size_t i = 0; i < sizes[p]; i++, at++) {
            double keep = params[p][i], h = 1e-5;
            params[p][i] = keep + h;
            double up = ref_loss(&r, b2, n, &c);
            params[p][i] = keep - h;
            double down = ref_loss(&r, b2, n, &c);
            params[p][i] = keep;
            fd[offs[p] + i] = (up - down) / (2 * h);
            if (fabs(fd[offs[p] + i]) > fd_max)
                fd_max = fabs(fd[offs[p] + i]);
        }
    }
    ck_assert_msg(fd_max > 1e-3, "the gradient should not vanish (%g)", fd_max);
    for (size_t p = 0; p < 4; p++) {
        for (size_t i = 0; i < sizes[p]; i++) {
            double got = cap.copy[offs[p] + i] / N, want = fd[offs[p] + i];
            ck_assert_msg(fabs(got - want) <= 2e-4 * fd_max + 1e-7,
                          "%s %s[%zu]: gradient %.9g, finite difference %.9g (max %g)",
                          sae_arch_name(arch), names[p], i, got, want, fd_max);
        }
    }
    free(fd);
    free(bd0);
    free(xs);
    free(pre);
    free(f);
    free(e);
    ref_free(&r1);
    ref_free(&r);
    free(cap.copy);
    free(sample);
    free(b1);
    free(b2);
    sae_trainer_free(t);
    sae_model_free(m);
}

/* AUXK 4 of 20 latents takes the dense AuxK path (16 * AUXK >= d_sae), AUXK 1 the sparse one. */
START_TEST(gradient_relu) { check_gradient(SAE_ARCH_RELU, 1, 4); }
END_TEST
START_TEST(gradient_relu_raw_input) { check_gradient(SAE_ARCH_RELU, 0, 4); }
END_TEST
START_TEST(gradient_topk_with_auxk) { check_gradient(SAE_ARCH_TOPK, 1, 4); }
END_TEST
START_TEST(gradient_topk_with_sparse_auxk) { check_gradient(SAE_ARCH_TOPK, 1, 1); }
END_TEST
START_TEST(gradient_topk_raw_input) { check_gradient(SAE_ARCH_TOPK, 0, 4); }
END_TEST
START_TEST(gradient_batchtopk_with_auxk) { check_gradient(SAE_ARCH_BATCHTOPK, 1, 4); }
END_TEST
START_TEST(gradient_batchtopk_with_sparse_auxk) { check_gradient(SAE_ARCH_BATCHTOPK, 0, 1); }
END_TEST

/* ---- metrics ------------------------------------------------------------------------------- */

static void check_metrics(sae_arch arch, size_t d, size_t s, size_t k)
{
    const size_t n = 17;
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, arch, d, s));
    if (arch != SAE_ARCH_RELU)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, (double)k));
    float *sample = tu_train_data(50, d, 11), *x = tu_train_data(n, d, 12);
    sae_trainer *t;
    ck_assert_ok(sae_trainer_new(&t, m));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_DEAD_TOKENS, (double)(2 * n)));
    ck_assert_ok(sae_trainer_init(t, sample, 50));
    double v;
    ck_assert_sae(sae_trainer_get_metric(t, SAE_METRIC_FVU, &v), SAE_ESTATE);
    ck_assert_ok(sae_trainer_get_metric(t, SAE_METRIC_STEPS, &v));
    ck_assert_double_eq(v, 0);
    for (int step = 0; step < 3; step++) {
        ref_model r;
        ref_get(m, &r);
        double *xs = tu_malloc(n * d * sizeof(double)), *pre = tu_malloc(n * s * sizeof(double));
        double *f = tu_malloc(n * s * sizeof(double)), *e = tu_malloc(n * d * sizeof(double));
        ref_forward(&r, x, n, xs, pre, f);
        ref_error(&r, xs, f, n, e);
        double sse = 0.0, l0 = 0.0, dev = 0.0, *mean = calloc(d, sizeof(double));
        for (size_t i = 0; i < n * d; i++)
            sse += e[i] * e[i];
        for (size_t i = 0; i < n * s; i++)
            l0 += f[i] > 0.0;
        for (size_t q = 0; q < n; q++)
            for (size_t j = 0; j < d; j++)
                mean[j] += xs[q * d + j] / (double)n;
        for (size_t q = 0; q < n; q++)
            for (size_t j = 0; j < d; j++)
                dev += (xs[q * d + j] - mean[j]) * (xs[q * d + j] - mean[j]);
        ck_assert_ok(sae_trainer_step(t, x, n));
        double fvu = tu_metric(t, SAE_METRIC_FVU), mse = tu_metric(t, SAE_METRIC_MSE);
        ck_assert_msg(fabs(fvu - sse / dev) <= 1e-4 * (sse / dev), "FVU %g vs %g", fvu, sse / dev);
        double want_mse = sse / (r.scale * r.scale * (double)n);
        ck_assert_msg(fabs(mse - want_mse) <= 1e-4 * want_mse, "MSE %g vs %g", mse, want_mse);
        ck_assert_double_eq_tol(tu_metric(t, SAE_METRIC_L0), l0 / (double)n, 1e-9);
        ck_assert_double_eq(tu_metric(t, SAE_METRIC_STEPS), step + 1);
        ck_assert_double_eq(tu_metric(t, SAE_METRIC_TOKENS), (double)(n * (size_t)(step + 1)));
        /* Nothing can be dead before DEAD_TOKENS tokens have passed. */
        if (step == 0)
            ck_assert_double_eq(tu_metric(t, SAE_METRIC_DEAD_FRACTION), 0.0);
        free(mean);
        free(xs);
        free(pre);
        free(f);
        free(e);
        ref_free(&r);
    }
    /* After three steps (> DEAD_TOKENS), the dead are those that never fired in steps 2-3. */
    double dead = tu_metric(t, SAE_METRIC_DEAD_FRACTION);
    ck_assert(dead >= 0.0 && dead <= 1.0);
    free(sample);
    free(x);
    sae_trainer_free(t);
    sae_model_free(m);
}

START_TEST(metrics_match_float64_loops)
{
    check_metrics(SAE_ARCH_RELU, 7, 13, 0);
    check_metrics(SAE_ARCH_TOPK, 7, 13, 4);
    check_metrics(SAE_ARCH_BATCHTOPK, 7, 13, 4);
    /* boundaries: d_in = 1, k >= d_sae */
    check_metrics(SAE_ARCH_TOPK, 1, 5, 9);
    check_metrics(SAE_ARCH_BATCHTOPK, 1, 5, 9);
    check_metrics(SAE_ARCH_RELU, 1, 3, 0);
}
END_TEST

START_TEST(dead_fraction_counts_silent_latents)
{
    /* A latent whose encoder column points away from all data never fires. */
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_TOPK, 4, 32));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 1));
    float *x = tu_train_data(30, 4, 5);
    sae_trainer *t = make_trainer(m, x, 30);
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_DEAD_TOKENS, 60));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR, 1e-9));
    ck_assert_ok(sae_trainer_step(t, x, 30));
    ck_assert_double_eq(tu_metric(t, SAE_METRIC_DEAD_FRACTION), 0.0);
    ck_assert_ok(sae_trainer_step(t, x, 30));
    /* 60 tokens without firing: every latent that was not in any token's top 1 is dead. */
    float *f = tu_malloc(30 * 32 * sizeof(float));
    ck_assert_ok(sae_encode(m, x, 30, f));
    size_t alive = 0;
    for (size_t i = 0; i < 32; i++) {
        bool fired = false;
        for (size_t q = 0; q < 30; q++)
            fired |= f[q * 32 + i] > 0.0f;
        alive += fired;
    }
    ck_assert_double_eq_tol(tu_metric(t, SAE_METRIC_DEAD_FRACTION), (32.0 - (double)alive) / 32.0,
                            1e-12);
    ck_assert_msg(alive < 32, "with K = 1 some latents should stay silent");
    free(f);
    free(x);
    sae_trainer_free(t);
    sae_model_free(m);
}
END_TEST

/* ---- initialization ------------------------------------------------------------------------ */

START_TEST(init_sets_bias_scale_and_tied_unit_decoder)
{
    const size_t d = 5, s = 12, n = 200;
    for (int a = SAE_ARCH_RELU; a <= SAE_ARCH_BATCHTOPK; a++) {
        sae_model *m;
        ck_assert_ok(sae_model_new(&m, (sae_arch)a, d, s));
        float *x = tu_train_data(n, d, 21);
        x[0] = 1000.0f; /* an outlier the geometric median ignores and the mean does not */
        sae_trainer *t = make_trainer(m, x, n);
        double scale;
        ck_assert_ok(sae_model_get_param(m, SAE_PARAM_INPUT_SCALE, &scale));
        double norms = 0.0;
        for (size_t q = 0; q < n; q++) {
            double nn = 0.0;
            for (size_t j = 0; j < d; j++)
                nn += (double)x[q * d + j] * x[q * d + j];
            norms += sqrt(nn) * scale;
        }
        ck_assert_double_eq_tol(norms / (double)n, sqrt((double)d), 1e-4);
        float We[60], Wd[60], bd[5], be[12];
        ck_assert_ok(sae_model_get_tensor(m, SAE_W_ENC, We));
        ck_assert_ok(sae_model_get_tensor(m, SAE_W_DEC, Wd));
        ck_assert_ok(sae_model_get_tensor(m, SAE_B_DEC, bd));
        ck_assert_ok(sae_model_get_tensor(m, SAE_B_ENC, be));
        const double want_norm = 1.0; /* unit rows for every architecture */
        for (size_t i = 0; i < s; i++) {
            double nn = 0.0;
            for (size_t j = 0; j < d; j++) {
                nn += (double)Wd[i * d + j] * Wd[i * d + j];
                ck_assert_float_eq(We[j * s + i], Wd[i * d + j]);
            }
            ck_assert_double_eq_tol(sqrt(nn), want_norm, 1e-6);
            ck_assert_float_eq(be[i], 0.0f);
        }
        /* The geometric median: the unit vectors from it to the points sum to about zero. */
        double g[5] = {0};
        for (size_t q = 0; q < n; q++) {
            double diff[5], nn = 0.0;
            for (size_t j = 0; j < d; j++) {
                diff[j] = scale * x[q * d + j] - bd[j];
                nn += diff[j] * diff[j];
            }
            for (size_t j = 0; j < d; j++)
                g[j] += diff[j] / sqrt(nn);
        }
        for (size_t j = 0; j < d; j++)
            ck_assert_msg(fabs(g[j]) < 1e-2 * (double)n, "median optimality %zu: %g", j, g[j]);
        /* The mean, when asked for. */
        ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_B_DEC_INIT, 1));
        ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_NORMALIZE_INPUT, 0));
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_INPUT_SCALE, 1));
        ck_assert_ok(sae_trainer_init(t, x, n));
        ck_assert_ok(sae_model_get_tensor(m, SAE_B_DEC, bd));
        for (size_t j = 0; j < d; j++) {
            double mean = 0.0;
            for (size_t q = 0; q < n; q++)
                mean += x[q * d + j];
            ck_assert_double_eq_tol(bd[j], mean / (double)n, 1e-4);
        }
        ck_assert_ok(sae_model_get_param(m, SAE_PARAM_INPUT_SCALE, &scale));
        ck_assert_double_eq(scale, 1.0);
        free(x);
        sae_trainer_free(t);
        sae_model_free(m);
    }
}
END_TEST

START_TEST(defaults_follow_architecture_and_total_steps)
{
    sae_model *relu, *topk;
    ck_assert_ok(sae_model_new(&relu, SAE_ARCH_RELU, 4, 16384));
    ck_assert_ok(sae_model_new(&topk, SAE_ARCH_TOPK, 4, 16384));
    sae_trainer *tr, *tt;
    ck_assert_ok(sae_trainer_new(&tr, relu));
    ck_assert_ok(sae_trainer_new(&tt, topk));
    double v;
    /* The width rule (docs/training.md): 2e-4 / sqrt(d_sae / 2^14) * 768 / d_in, at most
     * 0.1 / sqrt(d_in), for every recipe; ReLU's L1 coefficient min(5, sqrt(d_in) / 4). */
    ck_assert_ok(sae_trainer_get_param(tr, SAE_TRAIN_LR, &v));
    ck_assert_double_eq_tol(v, 2e-4 * 192.0, 1e-15); /* under the cap 0.05 */
    ck_assert_ok(sae_trainer_get_param(tt, SAE_TRAIN_LR, &v));
    ck_assert_double_eq_tol(v, 2e-4 * 192.0, 1e-15);
    ck_assert_ok(sae_trainer_get_param(tr, SAE_TRAIN_L1_COEFF, &v));
    ck_assert_double_eq(v, 0.5);
    ck_assert_ok(sae_trainer_get_param(tt, SAE_TRAIN_AUXK_COEFF, &v));
    ck_assert_double_eq(v, 1.0 / 32);
    ck_assert_ok(sae_trainer_get_param(tr, SAE_TRAIN_GRAD_CLIP, &v));
    ck_assert_double_eq(v, 1.0);
    ck_assert_ok(sae_trainer_set_param(tr, SAE_TRAIN_TOTAL_STEPS, 1000));
    ck_assert_ok(sae_trainer_get_param(tr, SAE_TRAIN_L1_WARMUP_STEPS, &v));
    ck_assert_double_eq(v, 50);
    ck_assert_ok(sae_trainer_get_param(tr, SAE_TRAIN_LR_DECAY_STEPS, &v));
    ck_assert_double_eq(v, 200);
    ck_assert_ok(sae_trainer_set_param(tr, SAE_TRAIN_LR_DECAY_STEPS, 7));
    ck_assert_ok(sae_trainer_set_param(tr, SAE_TRAIN_TOTAL_STEPS, 2000));
    ck_assert_ok(sae_trainer_get_param(tr, SAE_TRAIN_LR_DECAY_STEPS, &v));
    ck_assert_double_eq(v, 7);
    ck_assert_ok(sae_trainer_get_param(tr, SAE_TRAIN_L1_WARMUP_STEPS, &v));
    ck_assert_double_eq(v, 100);
    sae_trainer_free(tr);
    sae_trainer_free(tt);
    sae_model_free(relu);
    sae_model_free(topk);
}
END_TEST

START_TEST(schedules_shape_lr)
{
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_RELU, 3, 4));
    float *x = tu_train_data(8, 3, 3);
    sae_trainer *t;
    ck_assert_ok(sae_trainer_new(&t, m));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR, 1e-3));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_TOTAL_STEPS, 10));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_WARMUP_STEPS, 2));
    ck_assert_ok(sae_trainer_init(t, x, 8));
    const double want[10] = {0.5e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 0.5e-3};
    for (int s = 0; s < 10; s++) {
        ck_assert_ok(sae_trainer_step(t, x, 8));
        ck_assert_double_eq_tol(tu_metric(t, SAE_METRIC_LR), want[s], 1e-15);
    }
    free(x);
    sae_trainer_free(t);
    sae_model_free(m);
}
END_TEST

/* ---- determinism and checkpoints ----------------------------------------------------------- */

START_TEST(same_seed_same_weights)
{
    for (int a = SAE_ARCH_RELU; a <= SAE_ARCH_BATCHTOPK; a++) {
        float *w[3];
        for (int rep = 0; rep < 3; rep++) {
            sae_model *m;
            ck_assert_ok(sae_model_new(&m, (sae_arch)a, 6, 20));
            if (a != SAE_ARCH_RELU)
                ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 3));
            float *x = tu_train_data(64, 6, 7);
            sae_trainer *t;
            ck_assert_ok(sae_trainer_new(&t, m));
            ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_SEED, rep == 2 ? 8 : 7));
            ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_DEAD_TOKENS, 64));
            ck_assert_ok(sae_trainer_init(t, x, 64));
            tu_run_steps(t, 6, 0, 10);
            w[rep] = tu_malloc((2 * 6 * 20 + 26) * sizeof(float));
            get_all(m, w[rep]);
            free(x);
            sae_trainer_free(t);
            sae_model_free(m);
        }
        ck_assert_mem_eq(w[0], w[1], (2 * 6 * 20 + 26) * sizeof(float));
        ck_assert(memcmp(w[0], w[2], (2 * 6 * 20 + 26) * sizeof(float)) != 0);
        for (int rep = 0; rep < 3; rep++)
            free(w[rep]);
    }
}
END_TEST

START_TEST(checkpoint_resumes_bit_for_bit)
{
    for (int a = SAE_ARCH_RELU; a <= SAE_ARCH_BATCHTOPK; a++) {
        const size_t d = 5, s = 16, total = 2 * d * s + s + d;
        sae_model *m;
        ck_assert_ok(sae_model_new(&m, (sae_arch)a, d, s));
        if (a != SAE_ARCH_RELU)
            ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 2));
        float *x = tu_train_data(64, d, 9);
        sae_trainer *t;
        ck_assert_ok(sae_trainer_new(&t, m));
        ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_DEAD_TOKENS, 40));
        ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_TOTAL_STEPS, 12));
        ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR_DECAY_STEPS, 6));
        ck_assert_ok(sae_trainer_init(t, x, 64));
        tu_run_steps(t, d, 0, 6);
        char *path = tu_tmp_path("train_ckpt.safetensors");
        ck_assert_ok(sae_trainer_save(t, path));
        tu_run_steps(t, d, 6, 12);
        float *want = tu_malloc(total * sizeof(float)), *got = tu_malloc(total * sizeof(float));
        get_all(m, want);
        double want_loss = tu_metric(t, SAE_METRIC_LOSS),
               want_dead = tu_metric(t, SAE_METRIC_DEAD_FRACTION);

        /* A fresh model and trainer, from the file alone. */
        sae_model *m2;
        ck_assert_ok(sae_model_load(&m2, path)); /* the checkpoint is also a model file */
        sae_trainer *t2;
        ck_assert_ok(sae_trainer_new(&t2, m2));
        ck_assert_ok(sae_trainer_load(t2, path));
        ck_assert_double_eq(tu_metric(t2, SAE_METRIC_STEPS), 6);
        double v;
        ck_assert_ok(sae_trainer_get_param(t2, SAE_TRAIN_LR_DECAY_STEPS, &v));
        ck_assert_double_eq(v, 6);
        ck_assert_ok(sae_trainer_get_param(t2, SAE_TRAIN_DEAD_TOKENS, &v));
        ck_assert_double_eq(v, 40);
        tu_run_steps(t2, d, 6, 12);
        get_all(m2, got);
        ck_assert_mem_eq(want, got, total * sizeof(float));
        ck_assert_double_eq(tu_metric(t2, SAE_METRIC_LOSS), want_loss);
        ck_assert_double_eq(tu_metric(t2, SAE_METRIC_DEAD_FRACTION), want_dead);
        if (a == SAE_ARCH_BATCHTOPK) {
            double th1, th2;
            ck_assert_ok(sae_model_get_param(m, SAE_PARAM_THRESHOLD, &th1));
            ck_assert_ok(sae_model_get_param(m2, SAE_PARAM_THRESHOLD, &th2));
            ck_assert_double_eq(th1, th2);
            ck_assert(th1 > 0.0);
        }
        free(want);
        free(got);
        free(path);
        free(x);
        sae_trainer_free(t);
        sae_trainer_free(t2);
        sae_model_free(m);
        sae_model_free(m2);
    }
}
END_TEST

START_TEST(checkpoint_errors)
{
    sae_model *m, *other, *relu;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_TOPK, 4, 8));
    ck_assert_ok(sae_model_new(&other, SAE_ARCH_TOPK, 4, 9));
    ck_assert_ok(sae_model_new(&relu, SAE_ARCH_RELU, 4, 8));
    sae_trainer *t, *to, *tr;
    ck_assert_ok(sae_trainer_new(&t, m));
    ck_assert_ok(sae_trainer_new(&to, other));
    ck_assert_ok(sae_trainer_new(&tr, relu));
    char *path = tu_tmp_path("train_errors.safetensors");
    ck_assert_sae(sae_trainer_save(t, path), SAE_ESTATE);
    ck_assert_sae(sae_trainer_save(NULL, path), SAE_EINVAL);
    ck_assert_sae(sae_trainer_save(t, NULL), SAE_EINVAL);
    float *x = tu_train_data(20, 4, 1);
    ck_assert_ok(sae_trainer_init(t, x, 20));
    ck_assert_ok(sae_trainer_save(t, path));
    ck_assert_sae(sae_trainer_load(to, path), SAE_EINVAL);
    ck_assert_msg(strstr(sae_last_error(), "4 x 8") != NULL, "message: %s", sae_last_error());
    ck_assert_sae(sae_trainer_load(tr, path), SAE_EINVAL);
    ck_assert_sae(sae_trainer_load(t, NULL), SAE_EINVAL);
    /* A plain model file is not a checkpoint. */
    char *model_path = tu_tmp_path("train_model.safetensors");
    ck_assert_ok(sae_model_save(m, model_path));
    ck_assert_sae(sae_trainer_load(t, model_path), SAE_EFORMAT);
    /* Truncated and damaged checkpoints are refused, and the trainer is left as it was. */
    size_t size;
    unsigned char *bytes = tu_read_file(path, &size);
    char *bad = tu_tmp_path("train_bad.safetensors");
    tu_write_file(bad, bytes, size - 10);
    float before[32], after[32];
    ck_assert_ok(sae_model_get_tensor(relu, SAE_W_DEC, before));
    ck_assert_sae(sae_trainer_load(tr, bad), SAE_EFORMAT);
    ck_assert_ok(sae_model_get_tensor(relu, SAE_W_DEC, after));
    ck_assert_mem_eq(before, after, sizeof before);
    /* A NaN in the Adam moments (the last tensors written). */
    memcpy(bytes + size - 4 * 8 - 4 * 8 - 4, &(float){NAN}, 4);
    tu_write_file(bad, bytes, size);
    ck_assert_sae(sae_trainer_load(t, bad), SAE_EFORMAT);
    ck_assert_sae(sae_trainer_load(t, "/nonexistent/ckpt.safetensors"), SAE_EIO);
    free(bytes);
    free(bad);
    free(model_path);
    free(path);
    free(x);
    sae_trainer_free(t);
    sae_trainer_free(to);
    sae_trainer_free(tr);
    sae_model_free(m);
    sae_model_free(other);
    sae_model_free(relu);
}
END_TEST

/* ---- steps and checkpoints that would leave values not finite --------------------------------- */

/* Everything a trainer holds (weights, Adam moments, counters, normalizers, parameters, metrics)
 * as the bytes of a checkpoint, so that two states compare with memcmp. */
static unsigned char *state_bytes(const sae_trainer *t, const char *name, size_t *size)
{
    char *path = tu_tmp_path(name);
    ck_assert_ok(sae_trainer_save(t, path));
    unsigned char *bytes = tu_read_file(path, size);
    free(path);
    return bytes;
}

static void assert_state_is(const sae_trainer *t, const unsigned char *want, size_t want_size)
{
    size_t size;
    unsigned char *now = state_bytes(t, "train_state_now.safetensors", &size);
    ck_assert_msg(size == want_size && memcmp(now, want, size) == 0,
                  "the trainer's state (weights, Adam moments, counters, metrics) changed");
    free(now);
}

/* LR 1e38 is a finite float, but with Adam's bias correction the step size is not: the step
 * fails naming a tensor, changes nothing, and a sane rate then trains on. */
START_TEST(overflowing_step_fails_and_changes_nothing)
{
    const sae_arch arch = (sae_arch)_i;
    const size_t d = 6, s = 12, n = 32;
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, arch, d, s));
    if (arch != SAE_ARCH_RELU)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 3));
    float *x = tu_train_data(n, d, 21);
    sae_trainer *t = make_trainer(m, x, n);
    ck_assert_ok(sae_trainer_step(t, x, n));
    size_t size;
    unsigned char *before = state_bytes(t, "train_state_before.safetensors", &size);
    float w0[2 * 6 * 12 + 12 + 6], w1[2 * 6 * 12 + 12 + 6];
    get_all(m, w0);
    double metrics[SAE_METRIC_GRAD_NORM + 1];
    for (int k = SAE_METRIC_LOSS; k <= SAE_METRIC_GRAD_NORM; k++)
        metrics[k] = tu_metric(t, (sae_train_metric)k);

    double lr;
    ck_assert_ok(sae_trainer_get_param(t, SAE_TRAIN_LR, &lr));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR, 1e38));
    ck_assert_sae(sae_trainer_step(t, x, n), SAE_ERANGE);
    const char *msg = sae_last_error();
    ck_assert_msg(strstr(msg, "W_enc[") || strstr(msg, "W_dec[") || strstr(msg, "b_enc[") ||
                      strstr(msg, "b_dec["),
                  "the message should name the tensor: %s", msg);
    ck_assert_msg(strstr(msg, "not finite") != NULL, "message: %s", msg);
    get_all(m, w1);
    ck_assert_mem_eq(w0, w1, sizeof w0);
    for (int k = SAE_METRIC_LOSS; k <= SAE_METRIC_GRAD_NORM; k++) {
        double v = tu_metric(t, (sae_train_metric)k);
        ck_assert_msg(memcmp(&v, &metrics[k], sizeof v) == 0, "metric %d changed", k);
    }
    /* The checkpoint holds the LR: put the old one back before comparing whole states. */
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR, lr));
    assert_state_is(t, before, size);

    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR, 1e-3));
    ck_assert_ok(sae_trainer_step(t, x, n));
    get_all(m, w1);
    ck_assert_msg(memcmp(w0, w1, sizeof w0) != 0, "a sane step should change the weights");
    for (size_t i = 0; i < sizeof w1 / sizeof w1[0]; i++)
        ck_assert(isfinite(w1[i]));
    ck_assert_double_eq(tu_metric(t, SAE_METRIC_STEPS), 2.0);
    free(before);
    free(x);
    sae_trainer_free(t);
    sae_model_free(m);
}
END_TEST

/* Activations far larger than the sample the trainer was initialized on: the gradient is finite
 * (about 1e30) but its square is not, so Adam's second moment would become infinite while the
 * weights stayed finite and stopped moving for good. Refused, naming the moment. */
START_TEST(overflowing_adam_moment_fails_and_changes_nothing)
{
    const size_t d = 4, s = 8, n = 16;
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_TOPK, d, s));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 2));
    float *x = tu_train_data(n, d, 22);
    sae_trainer *t = make_trainer(m, x, n);
    size_t size;
    unsigned char *before = state_bytes(t, "train_moment_before.safetensors", &size);
    float *big = tu_malloc(n * d * sizeof(float));
    for (size_t i = 0; i < n * d; i++)
        big[i] = x[i] * 1e15f;
    ck_assert_sae(sae_trainer_step(t, big, n), SAE_ERANGE);
    ck_assert_msg(strstr(sae_last_error(), "Adam second moment") != NULL, "message: %s",
                  sae_last_error());
    assert_state_is(t, before, size);
    ck_assert_ok(sae_trainer_step(t, x, n));
    free(big);
    free(before);
    free(x);
    sae_trainer_free(t);
    sae_model_free(m);
}
END_TEST

/* Real-valued parameters are used as floats: values that are fine as doubles but infinite, zero
 * or subnormal as floats, or that round out of their range, are refused. */
START_TEST(parameters_are_checked_as_floats)
{
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_TOPK, 4, 8));
    sae_trainer *t;
    ck_assert_ok(sae_trainer_new(&t, m));
    const struct {
        sae_train_param p;
        double v;
    } bad[] = {{SAE_TRAIN_LR, 1e300},           {SAE_TRAIN_LR, 1e39},
               {SAE_TRAIN_LR, 1e-50},           {SAE_TRAIN_LR, 1e-40},
               {SAE_TRAIN_L1_COEFF, 1e39},      {SAE_TRAIN_AUXK_COEFF, 1e300},
               {SAE_TRAIN_BETA2, 0.99999999},   {SAE_TRAIN_BETA1, 0.999999999},
               {SAE_TRAIN_ADAM_EPS, 1e-45},     {SAE_TRAIN_GRAD_CLIP, 1e39},
               {SAE_TRAIN_DECODER_INIT_NORM, 1e39}, {SAE_TRAIN_DECODER_INIT_NORM, 1e-39}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        double was, now;
        ck_assert_ok(sae_trainer_get_param(t, bad[i].p, &was));
        ck_assert_sae(sae_trainer_set_param(t, bad[i].p, bad[i].v), SAE_EINVAL);
        ck_assert_msg(strstr(sae_last_error(), "float") != NULL, "message: %s", sae_last_error());
        ck_assert_ok(sae_trainer_get_param(t, bad[i].p, &now));
        ck_assert_double_eq(now, was);
    }
    /* The edges that are floats are taken. */
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR, 3e38));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR, 2e-38));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_BETA2, 0.9999999));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_ADAM_EPS, 0));
    sae_trainer_free(t);
    sae_model_free(m);
}
END_TEST

/* Rewrites a safetensors file with __metadata__[key] = value (the header re-padded). */
static void set_meta(const char *src, const char *dst, const char *key, const char *value)
{
    size_t size;
    unsigned char *b = tu_read_file(src, &size);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | b[i];
    char *json = tu_malloc(hlen + 1);
    memcpy(json, b + 8, hlen);
    json[hlen] = '\0';
    char pat[96];
    snprintf(pat, sizeof pat, "\"%s\":\"", key);
    char *at = strstr(json, pat);
    ck_assert_msg(at != NULL, "no %s in the header", key);
    at += strlen(pat);
    char *end = strchr(at, '"');
    size_t json_len = strlen(json);
    while (json_len > 0 && json[json_len - 1] == ' ')
        json[--json_len] = '\0';
    size_t out_len = (size_t)(at - json) + strlen(value) + strlen(end);
    size_t padded = (8 + out_len + 63) / 64 * 64 - 8;
    unsigned char *out = tu_malloc(8 + padded + size - 8 - hlen);
    for (int i = 0; i < 8; i++)
        out[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    char *h = (char *)out + 8;
    memcpy(h, json, (size_t)(at - json));
    memcpy(h + (at - json), value, strlen(value));
    memcpy(h + (at - json) + strlen(value), end, strlen(end));
    memset(h + out_len, ' ', padded - out_len);
    memcpy(out + 8 + padded, b + 8 + hlen, size - 8 - hlen);
    tu_write_file(dst, out, 8 + padded + size - 8 - hlen);
    free(out);
    free(json);
    free(b);
}

/* The first float of tensor name in a safetensors file's bytes. */
static float *tensor_in(unsigned char *b, const char *name)
{
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | b[i];
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":{", name);
    const char *at = strstr((const char *)b + 8, pat);
    ck_assert(at != NULL && at < (const char *)b + 8 + hlen);
    const char *offs = strstr(at, "\"data_offsets\":[");
    ck_assert(offs != NULL);
    unsigned long long first = strtoull(offs + strlen("\"data_offsets\":["), NULL, 10);
    return (float *)(void *)(b + 8 + hlen + first);
}

/* Checkpoints whose state is finite as doubles but not usable as floats, or that Adam would turn
 * into NaN, are refused naming the file and the key, and change nothing; the trainer then steps. */
START_TEST(checkpoint_with_unusable_values_is_refused)
{
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_BATCHTOPK, 4, 8));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 2));
    float *x = tu_train_data(20, 4, 23);
    sae_trainer *t = make_trainer(m, x, 20);
    ck_assert_ok(sae_trainer_step(t, x, 20));
    char *good = tu_tmp_path("train_good.safetensors");
    char *bad = tu_tmp_path("train_unusable.safetensors");
    ck_assert_ok(sae_trainer_save(t, good));
    size_t size;
    unsigned char *before = state_bytes(t, "train_unusable_before.safetensors", &size);
    const struct {
        const char *key, *value;
    } meta[] = {{"input_scale", "1e-46"},    {"input_scale", "1e39"},
                {"train.theta", "1e39"},     {"batch_threshold", "-1e39"},
                {"train.param.lr", "1e300"}, {"train.param.beta2", "0.99999999"},
                {"train.param.adam_eps", "1e-45"}};
    for (size_t i = 0; i < sizeof meta / sizeof meta[0]; i++) {
        set_meta(good, bad, meta[i].key, meta[i].value);
        ck_assert_sae(sae_trainer_load(t, bad), SAE_EFORMAT);
        const char *msg = sae_last_error();
        const char *name = strrchr(meta[i].key, '.') ? strrchr(meta[i].key, '.') + 1 : meta[i].key;
        ck_assert_msg(strstr(msg, bad) != NULL && strstr(msg, name) != NULL,
                      "%s = %s: the message should name the file and key: %s", meta[i].key,
                      meta[i].value, msg);
        assert_state_is(t, before, size);
    }
    /* Adam moments: NaN in the first, a negative second (whose square root is NaN). */
    const struct {
        const char *tensor;
        float value;
    } moments[] = {{"train.adam_m", NAN}, {"train.adam_v", -1e-3f}, {"train.adam_v", INFINITY}};
    for (size_t i = 0; i < 3; i++) {
        size_t n;
        unsigned char *b = tu_read_file(good, &n);
        float *v = tensor_in(b, moments[i].tensor);
        memcpy(v + 5, &moments[i].value, sizeof(float));
        tu_write_file(bad, b, n);
        free(b);
        ck_assert_sae(sae_trainer_load(t, bad), SAE_EFORMAT);
        ck_assert_msg(strstr(sae_last_error(), moments[i].tensor) != NULL, "message: %s",
                      sae_last_error());
        assert_state_is(t, before, size);
    }
    ck_assert_ok(sae_trainer_load(t, good));
    ck_assert_ok(sae_trainer_step(t, x, 20));
    free(before);
    free(good);
    free(bad);
    free(x);
    sae_trainer_free(t);
    sae_model_free(m);
}
END_TEST

/* ---- data-parallel --------------------------------------------------------------------------- */

typedef struct {
    sae_trainer *t;
    tu_group *g;
    int rank, steps;
    size_t d, batch;
    int rc;
} worker;

/* Step s's global batch is tu_train_data(batch, d, 500 + s); rank r takes its half (rank 1 gets
 * nothing at step 2, so an empty local batch is covered). */
static void *work(void *arg)
{
    worker *w = arg;
    for (int s = 0; s < w->steps; s++) {
        float *x = tu_train_data(w->batch, w->d, 500 + (uint64_t)s);
        size_t half = s == 2 ? w->batch : w->batch / 2;
        const float *mine = w->rank == 0 ? x : x + half * w->d;
        size_t n = w->rank == 0 ? half : w->batch - half;
        int rc = sae_trainer_step(w->t, mine, n);
        free(x);
        if (rc != SAE_OK) {
            w->rc = rc;
            return NULL;
        }
    }
    return NULL;
}

START_TEST(allreduce_matches_one_process_on_the_combined_batch)
{
    const size_t d = 6, s = 24, batch = 40, total = 2 * d * s + s + d;
    for (int a = SAE_ARCH_RELU; a <= SAE_ARCH_TOPK; a++) {
        sae_model *ms[3];
        sae_trainer *ts[3];
        float *sample = tu_train_data(100, d, 77);
        for (int i = 0; i < 3; i++) {
            ck_assert_ok(sae_model_new(&ms[i], (sae_arch)a, d, s));
            if (a != SAE_ARCH_RELU)
                ck_assert_ok(sae_model_set_param(ms[i], SAE_PARAM_K, 3));
            ck_assert_ok(sae_trainer_new(&ts[i], ms[i]));
            ck_assert_ok(sae_trainer_set_param(ts[i], SAE_TRAIN_DEAD_TOKENS, 60));
            ck_assert_ok(sae_trainer_set_param(ts[i], SAE_TRAIN_AUXK, 4));
            ck_assert_ok(sae_trainer_set_param(ts[i], SAE_TRAIN_LR, 1e-3));
            ck_assert_ok(sae_trainer_init(ts[i], sample, 100));
        }
        sae__train_layout L;
        sae__train_layout_of(ms[0], &L);
        tu_group *g = tu_group_new(L.count, 2);
        worker w[2] = {{ts[1], g, 0, 8, d, batch, 0}, {ts[2], g, 1, 8, d, batch, 0}};
        for (int i = 1; i < 3; i++)
            ck_assert_ok(sae_trainer_set_allreduce(ts[i], tu_thread_allreduce, g));
        pthread_t th[2];
        for (int i = 0; i < 2; i++)
            pthread_create(&th[i], NULL, work, &w[i]);
        float *one = tu_malloc(total * sizeof(float)), *p0 = tu_malloc(total * sizeof(float)),
              *p1 = tu_malloc(total * sizeof(float));
        for (int step = 0; step < 8; step++) {
            float *x = tu_train_data(batch, d, 500 + (uint64_t)step);
            ck_assert_ok(sae_trainer_step(ts[0], x, batch));
            free(x);
        }
        for (int i = 0; i < 2; i++)
            pthread_join(th[i], NULL);
        ck_assert_ok(w[0].rc);
        ck_assert_ok(w[1].rc);
        get_all(ms[0], one);
        get_all(ms[1], p0);
        get_all(ms[2], p1);
        ck_assert_mem_eq(p0, p1, total * sizeof(float)); /* the processes agree exactly */
        for (size_t i = 0; i < total; i++)
            ck_assert_msg(fabsf(p0[i] - one[i]) <= 1e-4f * (1.0f + fabsf(one[i])),
                          "%s weight %zu: data-parallel %g, one process %g", sae_arch_name((sae_arch)a),
                          i, (double)p0[i], (double)one[i]);
        ck_assert_double_eq(tu_metric(ts[1], SAE_METRIC_TOKENS), 8.0 * (double)batch);
        ck_assert_double_eq_tol(tu_metric(ts[1], SAE_METRIC_FVU), tu_metric(ts[0], SAE_METRIC_FVU),
                                1e-4);
        ck_assert_double_eq(tu_metric(ts[1], SAE_METRIC_DEAD_FRACTION),
                            tu_metric(ts[0], SAE_METRIC_DEAD_FRACTION));
        free(one);
        free(p0);
        free(p1);
        tu_group_free(g);
        free(sample);
        for (int i = 0; i < 3; i++) {
            sae_trainer_free(ts[i]);
            sae_model_free(ms[i]);
        }
    }
}
END_TEST

static int failing_allreduce(float *buf, size_t count, void *user)
{
    (void)buf;
    (void)count;
    (void)user;
    return -3;
}

/* ---- errors -------------------------------------------------------------------------------- */

START_TEST(errors_are_reported_and_change_nothing)
{
    sae_model *m, *jr;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_TOPK, 4, 8));
    ck_assert_ok(sae_model_new(&jr, SAE_ARCH_GATED, 4, 8));
    sae_trainer *t;
    ck_assert_sae(sae_trainer_new(NULL, m), SAE_EINVAL);
    ck_assert_sae(sae_trainer_new(&t, NULL), SAE_EINVAL);
    ck_assert_sae(sae_trainer_new(&t, jr), SAE_EUNSUPPORTED);
    ck_assert_ptr_null(t);
    sae_trainer_free(NULL);
    ck_assert_ok(sae_trainer_new(&t, m));
    float *x = tu_train_data(10, 4, 2);
    ck_assert_sae(sae_trainer_step(t, x, 10), SAE_ESTATE);
    ck_assert_sae(sae_trainer_init(t, x, 0), SAE_EINVAL);
    ck_assert_sae(sae_trainer_init(t, NULL, 3), SAE_EINVAL);
    ck_assert_sae(sae_trainer_init(NULL, x, 3), SAE_EINVAL);
    x[13] = NAN;
    ck_assert_sae(sae_trainer_init(t, x, 10), SAE_EINVAL);
    ck_assert_msg(strstr(sae_last_error(), "x[3][1]") != NULL, "message: %s", sae_last_error());
    x[13] = 0.5f;
    ck_assert_ok(sae_trainer_init(t, x, 10));
    ck_assert_sae(sae_trainer_step(t, x, 0), SAE_EINVAL);
    ck_assert_sae(sae_trainer_step(t, NULL, 4), SAE_EINVAL);
    ck_assert_sae(sae_trainer_step(NULL, x, 4), SAE_EINVAL);
    ck_assert_sae(sae_trainer_step(t, x, (size_t)1 << 25), SAE_EINVAL);
    x[5] = INFINITY;
    ck_assert_sae(sae_trainer_step(t, x, 10), SAE_EINVAL);
    x[5] = 0.25f;

    /* Parameters: each kind of range. */
    const struct {
        sae_train_param p;
        double bad;
    } bad[] = {{SAE_TRAIN_LR, 0},           {SAE_TRAIN_LR, NAN},
               {SAE_TRAIN_LR, INFINITY},    {SAE_TRAIN_L1_COEFF, -1},
               {SAE_TRAIN_AUXK, 2.5},       {SAE_TRAIN_AUXK, -1},
               {SAE_TRAIN_DEAD_TOKENS, 0},  {SAE_TRAIN_BETA1, 1},
               {SAE_TRAIN_BETA2, -0.1},     {SAE_TRAIN_SEED, 1e300},
               {SAE_TRAIN_THRESHOLD_LR, 1.5}, {SAE_TRAIN_NORMALIZE_INPUT, 2},
               {SAE_TRAIN_B_DEC_INIT, 3},   {SAE_TRAIN_DECODER_INIT_NORM, 0},
               {SAE_TRAIN_GRAD_CLIP, -1},   {SAE_TRAIN_ADAM_EPS, NAN},
               {(sae_train_param)0, 1},     {(sae_train_param)99, 1}};
    double v;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        double was = 0.0;
        sae_trainer_get_param(t, bad[i].p, &was);
        ck_assert_sae(sae_trainer_set_param(t, bad[i].p, bad[i].bad), SAE_EINVAL);
        if (bad[i].p >= SAE_TRAIN_LR && bad[i].p <= SAE_TRAIN_B_DEC_INIT) {
            ck_assert_ok(sae_trainer_get_param(t, bad[i].p, &v));
            ck_assert_double_eq(v, was);
        }
    }
    ck_assert_sae(sae_trainer_set_param(NULL, SAE_TRAIN_LR, 1), SAE_EINVAL);
    ck_assert_sae(sae_trainer_get_param(t, SAE_TRAIN_LR, NULL), SAE_EINVAL);
    ck_assert_sae(sae_trainer_get_param(t, (sae_train_param)0, &v), SAE_EINVAL);
    ck_assert_sae(sae_trainer_get_metric(t, (sae_train_metric)0, &v), SAE_EINVAL);
    ck_assert_sae(sae_trainer_get_metric(t, (sae_train_metric)N_METRICS, &v), SAE_EINVAL);
    ck_assert_sae(sae_trainer_get_metric(t, SAE_METRIC_LOSS, NULL), SAE_EINVAL);
    ck_assert_sae(sae_trainer_get_metric(NULL, SAE_METRIC_LOSS, &v), SAE_EINVAL);
    ck_assert_sae(sae_trainer_set_allreduce(NULL, NULL, NULL), SAE_EINVAL);

    /* A failing callback or a diverging step leaves the model as it was. */
    float before[32], after[32];
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_DEC, before));
    ck_assert_ok(sae_trainer_set_allreduce(t, failing_allreduce, NULL));
    ck_assert_sae(sae_trainer_step(t, x, 10), SAE_ECALLBACK);
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_DEC, after));
    ck_assert_mem_eq(before, after, sizeof before);
    ck_assert_double_eq(tu_metric(t, SAE_METRIC_STEPS), 0);
    ck_assert_ok(sae_trainer_set_allreduce(t, NULL, NULL));
    float huge[40];
    for (int i = 0; i < 40; i++)
        huge[i] = 3e38f * (i % 2 ? 1.0f : -1.0f);
    ck_assert_sae(sae_trainer_step(t, huge, 10), SAE_ERANGE);
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_DEC, after));
    ck_assert_mem_eq(before, after, sizeof before);
    ck_assert_ok(sae_trainer_step(t, x, 10));
    free(x);
    sae_trainer_free(t);
    sae_model_free(m);
    sae_model_free(jr);
}
END_TEST

/* ---- learning ------------------------------------------------------------------------------ */

static void planted(float *x, size_t n, const float *truth, size_t n_true, size_t d, tu_rng *r)
{
    for (size_t q = 0; q < n; q++) {
        float *row = x + q * d;
        memset(row, 0, d * sizeof(float));
        for (int a = 0; a < 2; a++) {
            size_t which = tu_next(r) % n_true;
            float mag = tu_uniform(r, 0.5f, 1.5f);
            for (size_t j = 0; j < d; j++)
                row[j] += mag * truth[which * d + j];
        }
    }
}

START_TEST(recovers_planted_features)
{
    const size_t d = 16, n_true = 32, s = 64, batch = 64;
    tu_rng r = {31};
    float truth[32 * 16];
    for (size_t a = 0; a < n_true; a++) {
        double nn = 0.0;
        for (size_t j = 0; j < d; j++) {
            truth[a * d + j] = tu_normal(&r);
            nn += (double)truth[a * d + j] * truth[a * d + j];
        }
        for (size_t j = 0; j < d; j++)
            truth[a * d + j] = (float)(truth[a * d + j] / sqrt(nn));
    }
    for (int a = SAE_ARCH_RELU; a <= SAE_ARCH_TOPK; a++) {
        sae_model *m;
        ck_assert_ok(sae_model_new(&m, (sae_arch)a, d, s));
        if (a == SAE_ARCH_TOPK)
            ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 2));
        sae_trainer *t;
        ck_assert_ok(sae_trainer_new(&t, m));
        ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR, 5e-3));
        ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_TOTAL_STEPS, 1500));
        ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_L1_COEFF, 2.0));
        ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_DEAD_TOKENS, 2000));
        float *x = tu_malloc(1024 * d * sizeof(float));
        planted(x, 1024, truth, n_true, d, &r);
        ck_assert_ok(sae_trainer_init(t, x, 1024));
        for (int step = 0; step < 1500; step++) {
            planted(x, batch, truth, n_true, d, &r);
            ck_assert_ok(sae_trainer_step(t, x, batch));
        }
        float Wd[64 * 16];
        ck_assert_ok(sae_model_get_tensor(m, SAE_W_DEC, Wd));
        double score = tu_mmcs(truth, n_true, Wd, s, d);
        ck_assert_msg(score >= 0.98, "%s: MMCS %.4f, FVU %.4f, L0 %.2f", sae_arch_name((sae_arch)a),
                      score, tu_metric(t, SAE_METRIC_FVU), tu_metric(t, SAE_METRIC_L0));
        ck_assert_msg(tu_metric(t, SAE_METRIC_FVU) < 0.3, "FVU %g", tu_metric(t, SAE_METRIC_FVU));
        free(x);
        sae_trainer_free(t);
        sae_model_free(m);
    }
}
END_TEST

START_TEST(batchtopk_threshold_is_the_inference_form)
{
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_BATCHTOPK, 5, 12));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 2));
    float *x = tu_train_data(30, 5, 4);
    sae_trainer *t = make_trainer(m, x, 30);
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_THRESHOLD_LR, 0.5));
    /* The first step's threshold is 0.5 * the smallest of the 2 * 30 kept activations. */
    ref_model r;
    ref_get(m, &r);
    double *xs = tu_malloc(30 * 5 * sizeof(double)), *pre = tu_malloc(30 * 12 * sizeof(double));
    double *f = tu_malloc(30 * 12 * sizeof(double));
    ref_forward(&r, x, 30, xs, pre, f);
    double smallest = INFINITY;
    size_t kept = 0;
    for (size_t i = 0; i < 30 * 12; i++)
        if (f[i] > 0.0) {
            kept++;
            smallest = f[i] < smallest ? f[i] : smallest;
        }
    ck_assert_uint_eq(kept, 60);
    ck_assert_ok(sae_trainer_step(t, x, 30));
    double th;
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_THRESHOLD, &th));
    ck_assert_double_eq_tol(th, 0.5 * smallest, 1e-5 * smallest);
    ck_assert_double_eq_tol(tu_metric(t, SAE_METRIC_L0), 2.0, 1e-12);
    free(xs);
    free(pre);
    free(f);
    ref_free(&r);
    free(x);
    sae_trainer_free(t);
    sae_model_free(m);
}
END_TEST

static Suite *train_suite(void)
{
    Suite *s = suite_create("train");
    TCase *tc = tcase_create("train");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, gradient_relu);
    tcase_add_test(tc, gradient_relu_raw_input);
    tcase_add_test(tc, gradient_topk_with_auxk);
    tcase_add_test(tc, gradient_topk_with_sparse_auxk);
    tcase_add_test(tc, gradient_topk_raw_input);
    tcase_add_test(tc, gradient_batchtopk_with_sparse_auxk);
    tcase_add_test(tc, gradient_batchtopk_with_auxk);
    tcase_add_test(tc, metrics_match_float64_loops);
    tcase_add_test(tc, dead_fraction_counts_silent_latents);
    tcase_add_test(tc, init_sets_bias_scale_and_tied_unit_decoder);
    tcase_add_test(tc, defaults_follow_architecture_and_total_steps);
    tcase_add_test(tc, schedules_shape_lr);
    tcase_add_test(tc, same_seed_same_weights);
    tcase_add_test(tc, checkpoint_resumes_bit_for_bit);
    tcase_add_test(tc, checkpoint_errors);
    tcase_add_loop_test(tc, overflowing_step_fails_and_changes_nothing, SAE_ARCH_RELU,
                        SAE_ARCH_BATCHTOPK + 1);
    tcase_add_test(tc, overflowing_adam_moment_fails_and_changes_nothing);
    tcase_add_test(tc, parameters_are_checked_as_floats);
    tcase_add_test(tc, checkpoint_with_unusable_values_is_refused);
    tcase_add_test(tc, allreduce_matches_one_process_on_the_combined_batch);
    tcase_add_test(tc, errors_are_reported_and_change_nothing);
    tcase_add_test(tc, recovers_planted_features);
    tcase_add_test(tc, batchtopk_threshold_is_the_inference_form);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(train_suite)
