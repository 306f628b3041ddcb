/* Transcoder training: the gradient of the objective against central differences of a float64
 * reference (every architecture, with and without W_skip), a planted transcoder recovered and
 * beating the best affine map on held-out pairs, checkpoints holding W_skip, and every error
 * path of sae_trainer_init_to / sae_trainer_step_to. Links the static library to read the
 * allreduce buffer's layout. */
#include "train_internal.h"
#include "testutil.h"
#include "trainutil.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- a float64 reference of the transcoder loss (docs/training.md) ----------------------- */

typedef struct {
    sae_arch arch;
    size_t d_in, d_sae, d_out, k;
    bool skip;
    double scale;              /* INPUT_SCALE */
    double c, mse_norm, lambda; /* y's scale, the FVU normalizer, the L1 coefficient */
    double *We, *Wd, *be, *bd, *Ws;
} ref_tc;

static void ref_get(const sae_model *m, ref_tc *r)
{
    r->arch = sae_model_arch(m);
    r->d_in = sae_model_d_in(m);
    r->d_sae = sae_model_d_sae(m);
    r->d_out = sae_model_d_out(m);
    r->skip = m->skip;
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_INPUT_SCALE, &r->scale));
    double v = 0;
    if (r->arch != SAE_ARCH_RELU)
        ck_assert_ok(sae_model_get_param(m, SAE_PARAM_K, &v));
    r->k = (size_t)v;
    r->We = tu_dup_tensor(m, SAE_W_ENC, r->d_in * r->d_sae);
    r->Wd = tu_dup_tensor(m, SAE_W_DEC, r->d_sae * r->d_out);
    r->be = tu_dup_tensor(m, SAE_B_ENC, r->d_sae);
    r->bd = tu_dup_tensor(m, SAE_B_DEC, r->d_out);
    r->Ws = r->skip ? tu_dup_tensor(m, SAE_W_SKIP, r->d_in * r->d_out) : NULL;
}

static void ref_free(ref_tc *r)
{
    free(r->We);
    free(r->Wd);
    free(r->be);
    free(r->bd);
    free(r->Ws);
}

/* Mean over tokens of the per-token loss at the reference's weights. */
static double ref_loss(const ref_tc *r, const float *x, const float *y, size_t n)
{
    const size_t di = r->d_in, s = r->d_sae, dout = r->d_out;
    double *pre = tu_malloc(n * s * sizeof(double)), *f = calloc(n * s, sizeof(double));
    for (size_t t = 0; t < n; t++)
        for (size_t i = 0; i < s; i++) {
            double acc = r->be[i];
            for (size_t j = 0; j < di; j++)
                acc += (double)(float)(r->scale * x[t * di + j]) * r->We[j * s + i];
            pre[t * s + i] = acc;
        }
    if (r->arch == SAE_ARCH_RELU) {
        for (size_t i = 0; i < n * s; i++)
            f[i] = pre[i] > 0.0 ? pre[i] : 0.0;
    } else if (r->arch == SAE_ARCH_TOPK) {
        for (size_t t = 0; t < n; t++) {
            bool *taken = calloc(s, 1);
            for (size_t q = 0; q < r->k; q++) {
                size_t best = s;
                for (size_t i = 0; i < s; i++)
                    if (!taken[i] && (best == s || pre[t * s + i] > pre[t * s + best]))
                        best = i;
                taken[best] = true;
                f[t * s + best] = pre[t * s + best] > 0.0 ? pre[t * s + best] : 0.0;
            }
            free(taken);
        }
    } else {
        bool *taken = calloc(n * s, 1);
        for (size_t q = 0; q < r->k * n; q++) {
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
    double total = 0.0;
    for (size_t t = 0; t < n; t++) {
        double sq = 0.0;
        for (size_t j = 0; j < dout; j++) {
            double yh = r->bd[j];
            for (size_t i = 0; i < s; i++)
                yh += f[t * s + i] * r->Wd[i * dout + j];
            for (size_t q = 0; r->skip && q < di; q++)
                yh += (double)x[t * di + q] * r->Ws[q * dout + j];
            double e = r->c * (yh - y[t * dout + j]);
            sq += e * e;
        }
        if (r->arch != SAE_ARCH_RELU) {
            total += sq / r->mse_norm;
            continue;
        }
        double l1 = 0.0;
        for (size_t i = 0; i < s; i++) {
            double nrm = 0.0;
            for (size_t j = 0; j < dout; j++)
                nrm += r->Wd[i * dout + j] * r->Wd[i * dout + j];
            l1 += f[t * s + i] * r->c * sqrt(nrm);
        }
        total += sq + r->lambda * l1;
    }
    free(pre);
    free(f);
    return total / (double)n;
}

/* ---- helpers ------------------------------------------------------------------------------- */

/* Pairs with structure: x with a mean and spread, y a nonlinear function of x plus a mean. */
static void make_pairs(size_t n, size_t di, size_t dout, uint64_t seed, float **x, float **y)
{
    tu_rng r = {seed};
    *x = tu_malloc(n * di * sizeof(float));
    *y = tu_malloc(n * dout * sizeof(float));
    for (size_t t = 0; t < n; t++) {
        for (size_t j = 0; j < di; j++)
            (*x)[t * di + j] = 0.5f + 0.3f * (float)j / (float)di + tu_normal(&r);
        for (size_t j = 0; j < dout; j++) {
            float a = (*x)[t * di + j % di], b = (*x)[t * di + (j + 1) % di];
            (*y)[t * dout + j] = 3.0f + 2.0f * (a > 0.0f ? a : 0.0f) - 0.5f * b * b;
        }
    }
}

/* y's scale and the FVU normalizer as the trainer derives them from its init sample. */
static void sample_norms(const float *y, size_t n, size_t d, double *c, double *var)
{
    double norms = 0.0, *mean = calloc(d, sizeof(double));
    for (size_t t = 0; t < n; t++) {
        double ss = 0.0;
        for (size_t j = 0; j < d; j++) {
            ss += (double)y[t * d + j] * y[t * d + j];
            mean[j] += y[t * d + j] / (double)n;
        }
        norms += sqrt(ss);
    }
    *c = sqrt((double)d) / (norms / (double)n);
    *var = 0.0;
    for (size_t t = 0; t < n; t++)
        for (size_t j = 0; j < d; j++)
            *var += (y[t * d + j] - mean[j]) * (y[t * d + j] - mean[j]) / (double)n;
    *var *= *c * *c;
    free(mean);
}

/* ---- gradients ----------------------------------------------------------------------------- */

/* After one step (W_dec is zero at init, so the second step is the informative one), the
 * second step's gradient buffer against central differences of ref_loss. The buffer holds the
 * gradient of the normalized parameters: W_dec' = c W_dec, b_dec' = c b_dec,
 * W_skip' = (c / INPUT_SCALE) W_skip. */
static void check_gradient(sae_arch arch, bool skip)
{
    const size_t di = 5, s = 16, dout = 4, n = 9, ns = 40;
    sae_model *m;
    ck_assert_ok(sae_model_new_transcoder(&m, arch, di, s, dout, skip));
    if (arch != SAE_ARCH_RELU)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 3));
    float *xs0, *ys0, *x1, *y1, *x2, *y2;
    make_pairs(ns, di, dout, 1, &xs0, &ys0);
    make_pairs(n, di, dout, 2, &x1, &y1);
    make_pairs(n, di, dout, 3, &x2, &y2);
    sae_trainer *t;
    ck_assert_ok(sae_trainer_new(&t, m));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_AUXK, 0));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_L1_COEFF, 0.7));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_GRAD_CLIP, 0));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR, 0.05));
    ck_assert_ok(sae_trainer_init_to(t, xs0, ys0, ns));
    tu_capture cap = {0};
    ck_assert_ok(sae_trainer_set_allreduce(t, tu_capture_allreduce, &cap));
    ck_assert_ok(sae_trainer_step_to(t, x1, y1, n));

    ref_tc r;
    ref_get(m, &r);
    sample_norms(ys0, ns, dout, &r.c, &r.mse_norm);
    r.lambda = 0.7;
    ck_assert_ok(sae_trainer_step_to(t, x2, y2, n));
    sae__train_layout L;
    sae__train_layout_of(m, &L);
    ck_assert_uint_eq(cap.count, L.count);
    ck_assert_uint_eq(L.n_params - L.W_skip, skip ? di * dout : 0);
    const double N = cap.copy[L.stats + SAE__STAT_TOKENS];
    double want_loss = ref_loss(&r, x2, y2, n);
    ck_assert_msg(fabs(tu_metric(t, SAE_METRIC_LOSS) - want_loss) <= 1e-4 * fabs(want_loss),
                  "loss %g, reference %g", tu_metric(t, SAE_METRIC_LOSS), want_loss);

    double *params[5] = {r.We, r.Wd, r.be, r.bd, r.Ws};
    const size_t sizes[5] = {di * s, s * dout, s, dout, skip ? di * dout : 0};
    const size_t offs[5] = {L.W_enc, L.W_dec, L.b_enc, L.b_dec, L.W_skip};
    /* d/dW' = d/dW * dW/dW' */
    const double unit[5] = {1.0, 1.0 / r.c, 1.0, 1.0 / r.c, r.scale / r.c};
    const char *names[5] = {"W_enc", "W_dec", "b_enc", "b_dec", "W_skip"};
    double *fd = tu_malloc(L.n_params * sizeof(double)), fd_max = 0.0;
    for (size_t p = 0; p < 5; p++)
        for (size_t i = 0; i < sizes[p]; i++) {
            double keep = params[p][i], h = 1e-5;
            params[p][i] = keep + h;
            double up = ref_loss(&r, x2, y2, n);
            params[p][i] = keep - h;
            double down = ref_loss(&r, x2, y2, n);
            params[p][i] = keep;
            fd[offs[p] + i] = (up - down) / (2 * h) * unit[p];
            fd_max = fmax(fd_max, fabs(fd[offs[p] + i]));
        }
    ck_assert_msg(fd_max > 1e-3, "the gradient should not vanish (%g)", fd_max);
    for (size_t p = 0; p < 5; p++)
        for (size_t i = 0; i < sizes[p]; i++) {
            double got = cap.copy[offs[p] + i] / N, want = fd[offs[p] + i];
            ck_assert_msg(fabs(got - want) <= 2e-4 * fd_max + 1e-7,
                          "%s%s %s[%zu]: gradient %.9g, finite difference %.9g (max %g)",
                          sae_arch_name(arch), skip ? " skip" : "", names[p], i, got, want,
                          fd_max);
        }
    /* The metrics describe y: FVU of the prediction the step started from. */
    ck_assert_double_gt(tu_metric(t, SAE_METRIC_FVU), 0.0);
    free(fd);
    ref_free(&r);
    free(cap.copy);
    free(xs0), free(ys0), free(x1), free(y1), free(x2), free(y2);
    sae_trainer_free(t);
    sae_model_free(m);
}

START_TEST(gradient)
{
    static const sae_arch archs[3] = {SAE_ARCH_RELU, SAE_ARCH_TOPK, SAE_ARCH_BATCHTOPK};
    check_gradient(archs[_i / 2], _i % 2 == 1);
}
END_TEST

/* ---- learning ------------------------------------------------------------------------------ */

enum { PD_IN = 16, PD_OUT = 12, P_TRUE = 32 };

/* x = the sum of two of P_TRUE unit directions in R^16 with magnitudes in [0.5, 1.5]; y = the
 * same magnitudes on the matching output directions D_a, plus x @ A when A is given. 32
 * directions in 16 dimensions: no linear map recovers which fired. */
static void planted_pairs(size_t n, const float *in, const float *out, const float *A, tu_rng *r,
                          float *x, float *y)
{
    for (size_t t = 0; t < n; t++) {
        float *xr = x + t * PD_IN, *yr = y + t * PD_OUT;
        memset(xr, 0, PD_IN * sizeof(float));
        memset(yr, 0, PD_OUT * sizeof(float));
        for (int a = 0; a < 2; a++) {
            size_t which = tu_next(r) % P_TRUE;
            float mag = tu_uniform(r, 0.5f, 1.5f);
            for (size_t j = 0; j < PD_IN; j++)
                xr[j] += mag * in[which * PD_IN + j];
            for (size_t j = 0; j < PD_OUT; j++)
                yr[j] += mag * out[which * PD_OUT + j];
        }
        for (size_t j = 0; A != NULL && j < PD_OUT; j++)
            for (size_t q = 0; q < PD_IN; q++)
                yr[j] += xr[q] * A[q * PD_OUT + j];
    }
}

static void unit_rows(tu_rng *r, float *v, size_t rows, size_t d)
{
    for (size_t a = 0; a < rows; a++) {
        double nn = 0.0;
        for (size_t j = 0; j < d; j++) {
            v[a * d + j] = tu_normal(r);
            nn += (double)v[a * d + j] * v[a * d + j];
        }
        for (size_t j = 0; j < d; j++)
            v[a * d + j] = (float)(v[a * d + j] / sqrt(nn));
    }
}

/* Solves the normal equations (X^T X) B = X^T Y in double for the best affine map, X with a
 * column of ones, by Gauss-Jordan elimination with partial pivoting; returns the held-out FVU. */
static double affine_fvu(const float *x, const float *y, size_t n, const float *xh,
                         const float *yh, size_t nh)
{
    enum { P = PD_IN + 1 };
    double A[P][P + PD_OUT] = {{0}};
    for (size_t t = 0; t < n; t++) {
        double row[P];
        for (size_t j = 0; j < PD_IN; j++)
            row[j] = x[t * PD_IN + j];
        row[PD_IN] = 1.0;
        for (size_t a = 0; a < P; a++) {
            for (size_t b = 0; b < P; b++)
                A[a][b] += row[a] * row[b];
            for (size_t o = 0; o < PD_OUT; o++)
                A[a][P + o] += row[a] * y[t * PD_OUT + o];
        }
    }
    for (size_t col = 0; col < P; col++) {
        size_t piv = col;
        for (size_t r = col + 1; r < P; r++)
            if (fabs(A[r][col]) > fabs(A[piv][col]))
                piv = r;
        for (size_t b = 0; b < P + PD_OUT; b++) {
            double tmp = A[col][b];
            A[col][b] = A[piv][b];
            A[piv][b] = tmp;
        }
        for (size_t r = 0; r < P; r++) {
            if (r == col)
                continue;
            double f = A[r][col] / A[col][col];
            for (size_t b = 0; b < P + PD_OUT; b++)
                A[r][b] -= f * A[col][b];
        }
    }
    double mean[PD_OUT] = {0}, sse = 0.0, sst = 0.0;
    for (size_t t = 0; t < nh; t++)
        for (size_t o = 0; o < PD_OUT; o++)
            mean[o] += yh[t * PD_OUT + o] / (double)nh;
    for (size_t t = 0; t < nh; t++)
        for (size_t o = 0; o < PD_OUT; o++) {
            double pred = A[PD_IN][P + o] / A[PD_IN][PD_IN];
            for (size_t j = 0; j < PD_IN; j++)
                pred += xh[t * PD_IN + j] * A[j][P + o] / A[j][j];
            sse += (pred - yh[t * PD_OUT + o]) * (pred - yh[t * PD_OUT + o]);
            sst += (yh[t * PD_OUT + o] - mean[o]) * (yh[t * PD_OUT + o] - mean[o]);
        }
    return sse / sst;
}

static double held_out_fvu(const sae_model *m, const float *x, const float *y, size_t n)
{
    sae_eval_metric which = SAE_EVAL_FVU;
    double v;
    ck_assert_ok(sae_evaluate_to(m, x, y, n, &which, 1, &v));
    return v;
}

/* A planted transcoder is recovered: its features' output directions (without a skip), and in
 * every case a held-out FVU far below the best affine map's. */
START_TEST(recovers_planted_transcoder)
{
    static const sae_arch archs[3] = {SAE_ARCH_TOPK, SAE_ARCH_BATCHTOPK, SAE_ARCH_RELU};
    const sae_arch arch = archs[_i / 2];
    const bool skip = _i % 2 == 1;
    const size_t s = 64, batch = 64, steps = 2000, nfit = 4096, nh = 2048;
    tu_rng r = {41};
    float in[P_TRUE * PD_IN], out[P_TRUE * PD_OUT], A[PD_IN * PD_OUT];
    unit_rows(&r, in, P_TRUE, PD_IN);
    unit_rows(&r, out, P_TRUE, PD_OUT);
    for (size_t i = 0; i < PD_IN * PD_OUT; i++)
        A[i] = 0.3f * tu_normal(&r);
    const float *lin = skip ? A : NULL;
    float *x = tu_malloc(nfit * PD_IN * sizeof(float)), *y = tu_malloc(nfit * PD_OUT * sizeof(float));
    float *xh = tu_malloc(nh * PD_IN * sizeof(float)), *yh = tu_malloc(nh * PD_OUT * sizeof(float));
    planted_pairs(nfit, in, out, lin, &r, x, y);
    planted_pairs(nh, in, out, lin, &r, xh, yh);
    const double linear = affine_fvu(x, y, nfit, xh, yh, nh);

    sae_model *m;
    ck_assert_ok(sae_model_new_transcoder(&m, arch, PD_IN, s, PD_OUT, skip));
    if (arch != SAE_ARCH_RELU)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 2));
    sae_trainer *t;
    ck_assert_ok(sae_trainer_new(&t, m));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR, 5e-3));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_TOTAL_STEPS, (double)steps));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_L1_COEFF, 0.5));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_DEAD_TOKENS, 2000));
    ck_assert_ok(sae_trainer_init_to(t, x, y, nfit));
    float xb[64 * PD_IN], yb[64 * PD_OUT];
    for (size_t step = 0; step < steps; step++) {
        planted_pairs(batch, in, out, lin, &r, xb, yb);
        ck_assert_ok(sae_trainer_step_to(t, xb, yb, batch));
    }
    const double fvu = held_out_fvu(m, xh, yh, nh);
    ck_assert_msg(linear > 0.2, "the planted map should not be affine (FVU %g)", linear);
    ck_assert_msg(fvu < 0.25 * linear && fvu < 0.1, "%s%s: held-out FVU %.4f, affine %.4f",
                  sae_arch_name(arch), skip ? " skip" : "", fvu, linear);
    if (!skip && arch != SAE_ARCH_RELU) {
        /* Each planted output direction has a decoder row pointing its way. */
        float Wd[64 * PD_OUT];
        ck_assert_ok(sae_model_get_tensor(m, SAE_W_DEC, Wd));
        double total = 0.0;
        for (size_t a = 0; a < P_TRUE; a++) {
            double best = -1.0;
            for (size_t i = 0; i < s; i++) {
                double dot = 0.0, nn = 0.0;
                for (size_t j = 0; j < PD_OUT; j++) {
                    dot += (double)out[a * PD_OUT + j] * Wd[i * PD_OUT + j];
                    nn += (double)Wd[i * PD_OUT + j] * Wd[i * PD_OUT + j];
                }
                best = fmax(best, nn > 0.0 ? dot / sqrt(nn) : 0.0);
            }
            total += best;
        }
        ck_assert_msg(total / P_TRUE >= 0.95, "%s: MMCS %.4f", sae_arch_name(arch),
                      total / P_TRUE);
    }
    free(x), free(y), free(xh), free(yh);
    sae_trainer_free(t);
    sae_model_free(m);
}
END_TEST

/* ---- checkpoints --------------------------------------------------------------------------- */

static void all_weights(const sae_model *m, float *out)
{
    const size_t di = sae_model_d_in(m), s = sae_model_d_sae(m), dout = sae_model_d_out(m);
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_ENC, out));
    out += di * s;
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_DEC, out));
    out += s * dout;
    ck_assert_ok(sae_model_get_tensor(m, SAE_B_ENC, out));
    out += s;
    ck_assert_ok(sae_model_get_tensor(m, SAE_B_DEC, out));
    out += dout;
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_SKIP, out));
}

START_TEST(checkpoint_resumes_bit_for_bit)
{
    const size_t di = 6, s = 24, dout = 5, n = 16;
    float *x, *y;
    make_pairs(8 * n, di, dout, 7, &x, &y);
    sae_model *m, *m2;
    ck_assert_ok(sae_model_new_transcoder(&m, SAE_ARCH_TOPK, di, s, dout, true));
    ck_assert_ok(sae_model_new_transcoder(&m2, SAE_ARCH_TOPK, di, s, dout, true));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 3));
    ck_assert_ok(sae_model_set_param(m2, SAE_PARAM_K, 3));
    sae_trainer *t, *t2;
    ck_assert_ok(sae_trainer_new(&t, m));
    ck_assert_ok(sae_trainer_new(&t2, m2));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_DEAD_TOKENS, 20));
    ck_assert_ok(sae_trainer_init_to(t, x, y, 8 * n));
    for (size_t i = 0; i < 4; i++)
        ck_assert_ok(sae_trainer_step_to(t, x + i * n * di, y + i * n * dout, n));
    char *path = tu_tmp_path("tc.ckpt");
    ck_assert_ok(sae_trainer_save(t, path));
    ck_assert_ok(sae_trainer_load(t2, path));
    for (size_t i = 4; i < 8; i++) {
        ck_assert_ok(sae_trainer_step_to(t, x + i * n * di, y + i * n * dout, n));
        ck_assert_ok(sae_trainer_step_to(t2, x + i * n * di, y + i * n * dout, n));
    }
    const size_t total = di * s + s * dout + s + dout + di * dout;
    float *a = tu_malloc(total * sizeof(float)), *b = tu_malloc(total * sizeof(float));
    all_weights(m, a);
    all_weights(m2, b);
    ck_assert_int_eq(memcmp(a, b, total * sizeof(float)), 0);
    float Ws[6 * 5];
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_SKIP, Ws));
    double skip_norm = 0.0;
    for (size_t i = 0; i < di * dout; i++)
        skip_norm += fabs(Ws[i]);
    ck_assert_msg(skip_norm > 0.0, "W_skip should have trained");
    ck_assert_double_eq(tu_metric(t, SAE_METRIC_FVU), tu_metric(t2, SAE_METRIC_FVU));

    /* The checkpoint loads as the model it held (a skip transcoder), W_skip included. */
    ck_assert_ok(sae_trainer_save(t, path));
    sae_model *plain;
    ck_assert_ok(sae_model_load(&plain, path));
    ck_assert_int_eq(sae_model_is_transcoder(plain), 1);
    ck_assert_uint_eq(sae_model_d_out(plain), dout);
    all_weights(plain, b);
    ck_assert_int_eq(memcmp(a, b, total * sizeof(float)), 0);
    sae_model_free(plain);

    /* Another kind or shape is refused, and nothing changes. */
    sae_model *other;
    sae_trainer *to;
    ck_assert_ok(sae_model_new_transcoder(&other, SAE_ARCH_TOPK, di, s, dout, false));
    ck_assert_ok(sae_model_set_param(other, SAE_PARAM_K, 3));
    ck_assert_ok(sae_trainer_new(&to, other));
    ck_assert_sae(sae_trainer_load(to, path), SAE_EINVAL);
    sae_trainer_free(to);
    sae_model_free(other);
    ck_assert_ok(sae_model_new(&other, SAE_ARCH_TOPK, di, s));
    ck_assert_ok(sae_trainer_new(&to, other));
    ck_assert_sae(sae_trainer_load(to, path), SAE_EINVAL);
    sae_trainer_free(to);
    sae_model_free(other);

    free(path);
    free(a), free(b), free(x), free(y);
    sae_trainer_free(t);
    sae_trainer_free(t2);
    sae_model_free(m);
    sae_model_free(m2);
}
END_TEST

/* ---- errors -------------------------------------------------------------------------------- */

START_TEST(errors_are_reported_and_change_nothing)
{
    const size_t di = 4, s = 8, dout = 3, n = 10;
    float *x, *y;
    make_pairs(n, di, dout, 9, &x, &y);
    sae_model *m;
    ck_assert_ok(sae_model_new_transcoder(&m, SAE_ARCH_TOPK, di, s, dout, true));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 2));
    sae_trainer *t;
    ck_assert_ok(sae_trainer_new(&t, m));
    /* The SAE entry points, naming the _to variants. */
    ck_assert_sae(sae_trainer_init(t, x, n), SAE_EINVAL);
    ck_assert_msg(strstr(sae_last_error(), "sae_trainer_init_to") != NULL, "%s",
                  sae_last_error());
    ck_assert_sae(sae_trainer_init_to(t, x, NULL, n), SAE_EINVAL);
    ck_assert_sae(sae_trainer_init_to(t, NULL, y, n), SAE_EINVAL);
    ck_assert_sae(sae_trainer_init_to(t, x, y, 0), SAE_EINVAL);
    ck_assert_sae(sae_trainer_step_to(t, x, y, n), SAE_ESTATE);
    y[5] = NAN;
    ck_assert_sae(sae_trainer_init_to(t, x, y, n), SAE_EINVAL);
    ck_assert_msg(strstr(sae_last_error(), "y") != NULL, "%s", sae_last_error());
    y[5] = 1.0f;
    ck_assert_ok(sae_trainer_init_to(t, x, y, n));
    ck_assert_sae(sae_trainer_step(t, x, n), SAE_EINVAL);
    ck_assert_msg(strstr(sae_last_error(), "sae_trainer_step_to") != NULL, "%s",
                  sae_last_error());
    const size_t total = di * s + s * dout + s + dout + di * dout;
    float *before = tu_malloc(total * sizeof(float)), *after = tu_malloc(total * sizeof(float));
    all_weights(m, before);
    ck_assert_sae(sae_trainer_step_to(t, x, NULL, n), SAE_EINVAL);
    y[2] = INFINITY;
    ck_assert_sae(sae_trainer_step_to(t, x, y, n), SAE_EINVAL);
    y[2] = 0.5f;
    all_weights(m, after);
    ck_assert_int_eq(memcmp(before, after, total * sizeof(float)), 0);
    double steps;
    ck_assert_ok(sae_trainer_get_metric(t, SAE_METRIC_STEPS, &steps));
    ck_assert_double_eq(steps, 0.0);
    ck_assert_ok(sae_trainer_step_to(t, x, y, n));
    sae_trainer_free(t);
    sae_model_free(m);

    /* sparsify's skip-connection SAE (d_out = d_in, APPLY_B_DEC_TO_INPUT = 1) does not train. */
    ck_assert_ok(sae_model_new_transcoder(&m, SAE_ARCH_TOPK, di, s, di, true));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, 1));
    ck_assert_ok(sae_trainer_new(&t, m));
    ck_assert_sae(sae_trainer_init_to(t, x, x, n), SAE_EUNSUPPORTED);
    sae_trainer_free(t);
    sae_model_free(m);

    /* A normalized model stays refused. */
    ck_assert_ok(sae_model_new_transcoder(&m, SAE_ARCH_TOPK, di, s, dout, false));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_NORMALIZE, SAE_NORMALIZE_LAYER_NORM));
    ck_assert_sae(sae_trainer_new(&t, m), SAE_EUNSUPPORTED);
    sae_model_free(m);
    free(before), free(after), free(x), free(y);
}
END_TEST

/* An SAE's _to takes y = x (the same array or equal values) and trains exactly as init and
 * step; any other target is refused. */
START_TEST(sae_to_is_the_sae_case)
{
    const size_t d = 5, s = 12, n = 20;
    float *x, *unused;
    make_pairs(n, d, 1, 11, &x, &unused);
    float *copy = tu_malloc(n * d * sizeof(float));
    memcpy(copy, x, n * d * sizeof(float));
    sae_model *m1, *m2;
    sae_trainer *t1, *t2;
    ck_assert_ok(sae_model_new(&m1, SAE_ARCH_TOPK, d, s));
    ck_assert_ok(sae_model_new(&m2, SAE_ARCH_TOPK, d, s));
    ck_assert_ok(sae_model_set_param(m1, SAE_PARAM_K, 2));
    ck_assert_ok(sae_model_set_param(m2, SAE_PARAM_K, 2));
    ck_assert_ok(sae_trainer_new(&t1, m1));
    ck_assert_ok(sae_trainer_new(&t2, m2));
    ck_assert_ok(sae_trainer_init(t1, x, n));
    ck_assert_ok(sae_trainer_init_to(t2, x, copy, n));
    for (int i = 0; i < 3; i++) {
        ck_assert_ok(sae_trainer_step(t1, x, n));
        ck_assert_ok(sae_trainer_step_to(t2, x, i == 0 ? x : copy, n));
    }
    float a[5 * 12], b[5 * 12];
    ck_assert_ok(sae_model_get_tensor(m1, SAE_W_DEC, a));
    ck_assert_ok(sae_model_get_tensor(m2, SAE_W_DEC, b));
    ck_assert_int_eq(memcmp(a, b, sizeof a), 0);
    copy[7] += 1.0f;
    ck_assert_sae(sae_trainer_step_to(t2, x, copy, n), SAE_EINVAL);
    ck_assert_msg(strstr(sae_last_error(), "sae_model_new_transcoder") != NULL, "%s",
                  sae_last_error());
    ck_assert_sae(sae_trainer_init_to(t2, x, copy, n), SAE_EINVAL);
    sae_trainer_free(t1);
    sae_trainer_free(t2);
    sae_model_free(m1);
    sae_model_free(m2);
    free(x), free(unused), free(copy);
}
END_TEST

static Suite *train_tc_suite(void)
{
    Suite *s = suite_create("train_tc");
    TCase *tc = tcase_create("train_tc");
    tcase_set_timeout(tc, 240);
    tcase_add_loop_test(tc, gradient, 0, 6);
    tcase_add_loop_test(tc, recovers_planted_transcoder, 0, 6);
    tcase_add_test(tc, checkpoint_resumes_bit_for_bit);
    tcase_add_test(tc, errors_are_reported_and_change_nothing);
    tcase_add_test(tc, sae_to_is_the_sae_case);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(train_tc_suite)
