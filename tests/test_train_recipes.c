/* JumpReLU and Matryoshka BatchTopK training: gradients against finite differences of float64
 * reference objectives, the one-group Matryoshka against plain BatchTopK, checkpoints, the
 * data-parallel hook, errors, and recovery of planted features. Links the static library to
 * read the allreduce buffer's layout. */
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

/* ---- helpers ------------------------------------------------------------------------------- */

/* Every weight of an SAE (and a JumpReLU model's thresholds) in one array. */
static size_t get_all(const sae_model *m, float *out)
{
    const size_t d = sae_model_d_in(m), s = sae_model_d_sae(m), o = sae_model_d_out(m);
    const struct {
        sae_tensor which;
        size_t count;
    } parts[] = {{SAE_W_ENC, d * s}, {SAE_W_DEC, s * o},     {SAE_B_ENC, s},
                 {SAE_B_DEC, o},     {SAE_THRESHOLD, s},     {SAE_W_SKIP, d * o}};
    size_t total = 0;
    for (size_t q = 0; q < sizeof parts / sizeof parts[0]; q++) {
        if (!sae_model_has_tensor(m, parts[q].which))
            continue;
        if (out != NULL)
            ck_assert_ok(sae_model_get_tensor(m, parts[q].which, out + total));
        total += parts[q].count;
    }
    return total;
}

/* ---- float64 references -------------------------------------------------------------------- */

typedef struct {
    size_t d, s, k;
    int apply;
    double scale;
    double *We, *Wd, *be, *bd, *th; /* model layouts; th: JumpReLU's thresholds */
} ref_model;

static void ref_get(const sae_model *m, ref_model *r)
{
    r->d = sae_model_d_in(m);
    r->s = sae_model_d_sae(m);
    double v;
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, &v));
    r->apply = (int)v;
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_INPUT_SCALE, &r->scale));
    r->k = 0;
    if (sae_model_arch(m) == SAE_ARCH_BATCHTOPK) {
        ck_assert_ok(sae_model_get_param(m, SAE_PARAM_K, &v));
        r->k = (size_t)v;
    }
    r->We = tu_dup_tensor(m, SAE_W_ENC, r->d * r->s);
    r->Wd = tu_dup_tensor(m, SAE_W_DEC, r->d * r->s);
    r->be = tu_dup_tensor(m, SAE_B_ENC, r->s);
    r->bd = tu_dup_tensor(m, SAE_B_DEC, r->d);
    r->th = sae_model_arch(m) == SAE_ARCH_JUMPRELU ? tu_dup_tensor(m, SAE_THRESHOLD, r->s) : NULL;
}

static void ref_free(ref_model *r)
{
    free(r->We);
    free(r->Wd);
    free(r->be);
    free(r->bd);
    free(r->th);
}

static void ref_pre(const ref_model *r, const float *x, size_t n, double *xs, double *pre)
{
    const size_t d = r->d, s = r->s;
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
}

/* BatchTopK: the k * n largest positive pre-activations of the batch, lower flat index first. */
static void ref_batchtopk(const ref_model *r, const double *pre, size_t n, double *f)
{
    const size_t total = n * r->s, want = r->k * n;
    bool *taken = calloc(total, 1);
    for (size_t i = 0; i < total; i++)
        f[i] = 0.0;
    for (size_t c = 0; c < want; c++) {
        size_t best = total;
        for (size_t i = 0; i < total; i++)
            if (!taken[i] && pre[i] > 0.0 && (best == total || pre[i] > pre[best]))
                best = i;
        if (best == total)
            break;
        taken[best] = true;
        f[best] = pre[best];
    }
    free(taken);
}

/* JumpReLU's code f = pre * H(pre - theta) smoothed in theta over the rectangle kernel:
 * Phi(p, theta) = int_theta^inf (t / eps) rect((p - t) / eps) dt, which is p * H(p - theta)
 * outside the window |p - theta| < eps / 2; and the step's Psi(p, theta) = int_theta^inf
 * (1 / eps) rect((p - t) / eps) dt. Their theta-derivatives are the straight-through estimators
 * -(theta / eps) rect and -(1 / eps) rect. */
static double Phi(double p, double th, double eps)
{
    double lo = th > p - eps / 2 ? th : p - eps / 2, hi = p + eps / 2;
    return lo < hi ? (hi * hi - lo * lo) / (2 * eps) : 0.0;
}

static double Psi(double p, double th, double eps)
{
    double lo = th > p - eps / 2 ? th : p - eps / 2, hi = p + eps / 2;
    return lo < hi ? (hi - lo) / eps : 0.0;
}

/* JumpReLU's mean loss. th_at NULL: the true (hard) objective, sum_d e^2 + lambda * L0. Else the
 * objective smoothed in the thresholds around th_at: the hard codes at th_at, plus for each
 * latent Phi(p, theta) - Phi(p, th_at) along its decoder row, and lambda * sum_i Psi(p, theta_i).
 * Its gradient in log-theta at theta = th_at is what the estimators claim. */
static double ref_jump_loss(const ref_model *r, const float *x, size_t n, double lambda,
                            double eps, const double *th_at)
{
    const size_t d = r->d, s = r->s;
    double *xs = tu_malloc(n * d * sizeof(double)), *pre = tu_malloc(n * s * sizeof(double));
    ref_pre(r, x, n, xs, pre);
    const double *anchor = th_at ? th_at : r->th;
    double total = 0.0;
    for (size_t t = 0; t < n; t++) {
        double sq = 0.0, sparsity = 0.0;
        for (size_t j = 0; j < d; j++) {
            double acc = r->bd[j] - xs[t * d + j];
            for (size_t i = 0; i < s; i++) {
                double p = pre[t * s + i];
                double f = p > anchor[i] ? p : 0.0;
                if (th_at != NULL)
                    f += Phi(p, r->th[i], eps) - Phi(p, anchor[i], eps);
                acc += f * r->Wd[i * d + j];
            }
            sq += acc * acc;
        }
        for (size_t i = 0; i < s; i++) {
            double p = pre[t * s + i];
            sparsity += th_at ? Psi(p, r->th[i], eps) : (p > r->th[i] ? 1.0 : 0.0);
        }
        total += sq + lambda * sparsity;
    }
    free(xs);
    free(pre);
    return total / (double)n;
}

typedef struct {
    double mse_norm, aux_norm, coeff;
    size_t auxk, n_groups;
    const size_t *group_end;
    const bool *dead;  /* NULL: no AuxK term */
    const double *e0;  /* [n][d] residual held fixed in the AuxK target */
    const double *bd0; /* b_dec when e0 was computed */
} mat_ctx;

/* Matryoshka's mean loss: the mean over groups of the prefix errors' ||e_g||^2 / v, plus AuxK on
 * the full error (as BatchTopK's, test_train.c). */
static double ref_mat_loss(const ref_model *r, const float *x, size_t n, const mat_ctx *c)
{
    const size_t d = r->d, s = r->s;
    double *xs = tu_malloc(n * d * sizeof(double)), *pre = tu_malloc(n * s * sizeof(double));
    double *f = tu_malloc(n * s * sizeof(double)), *e = tu_malloc(d * sizeof(double));
    ref_pre(r, x, n, xs, pre);
    ref_batchtopk(r, pre, n, f);
    double total = 0.0;
    for (size_t t = 0; t < n; t++) {
        for (size_t g = 0; g < c->n_groups; g++) {
            double sq = 0.0;
            for (size_t j = 0; j < d; j++) {
                double acc = r->bd[j] - xs[t * d + j];
                for (size_t i = 0; i < c->group_end[g]; i++)
                    acc += f[t * s + i] * r->Wd[i * d + j];
                sq += acc * acc;
            }
            total += sq / c->mse_norm / (double)c->n_groups;
        }
        if (c->dead == NULL)
            continue;
        for (size_t j = 0; j < d; j++)
            e[j] = c->e0[t * d + j] + r->bd[j] - c->bd0[j];
        total += c->coeff * tu_auxk_sq(e, pre + t * s, c->dead, c->auxk, r->Wd, s, d) / c->aux_norm;
    }
    free(xs);
    free(pre);
    free(f);
    free(e);
    return total / (double)n;
}

/* Central differences of loss(r) in each of the n values at p. */
typedef double (*loss_fn)(const ref_model *r, const void *ctx);

static void central_differences(ref_model *r, double *p, size_t n, loss_fn fn, const void *ctx,
                                double *out)
{
    for (size_t i = 0; i < n; i++) {
        double keep = p[i], h = 1e-5;
        p[i] = keep + h;
        double up = fn(r, ctx);
        p[i] = keep - h;
        double down = fn(r, ctx);
        p[i] = keep;
        out[i] = (up - down) / (2 * h);
    }
}

static void compare(const char *what, const char *name, const float *got, double N,
                    const double *want, size_t n, double scale)
{
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(fabs(got[i] / N - want[i]) <= 2e-4 * scale + 1e-7,
                      "%s %s[%zu]: gradient %.9g, finite difference %.9g (max %g)", what, name, i,
                      got[i] / N, want[i], scale);
}

/* ---- JumpReLU gradients -------------------------------------------------------------------- */

typedef struct {
    const float *x;
    size_t n;
    double lambda, eps;
    const double *th_at;
} jump_args;

static double jump_loss_hard(const ref_model *r, const void *ctx)
{
    const jump_args *a = ctx;
    return ref_jump_loss(r, a->x, a->n, a->lambda, a->eps, NULL);
}

static double jump_loss_smooth(const ref_model *r, const void *ctx)
{
    const jump_args *a = ctx;
    return ref_jump_loss(r, a->x, a->n, a->lambda, a->eps, a->th_at);
}

/* The hard objective's differences in theta's logarithm: the test perturbs log-thresholds. */
static double jump_loss_smooth_log(const ref_model *r, const void *ctx)
{
    ref_model q = *r;
    double th[32];
    for (size_t i = 0; i < r->s; i++)
        th[i] = exp(r->th[i]);
    q.th = th;
    return jump_loss_smooth(&q, ctx);
}

/* A first step (so the thresholds differ), then the second step's gradient buffer against
 * central differences: of the hard objective for W_enc, W_dec, b_enc, b_dec (no
 * pre-activation is near its threshold, so the codes' pattern does not change under the
 * perturbation, and the L0 term gives pre nothing, as the estimator says), and of the
 * threshold-smoothed objective for the log-thresholds. */
static void check_jump_gradient(int apply_b_dec, bool sparse)
{
    const size_t d = 6, s = 20, n = 9;
    const double lambda = 0.3, eps = 0.6;
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_JUMPRELU, d, s));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, apply_b_dec));
    float *sample = tu_train_data(40, d, 1), *b1 = tu_train_data(n, d, 2),
          *b2 = tu_train_data(n, d, 3);
    sae_trainer *t;
    ck_assert_ok(sae_trainer_new(&t, m));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_L0_COEFF, lambda));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_JUMPRELU_BANDWIDTH, eps));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_JUMPRELU_INIT_THRESHOLD, 0.4));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR, 0.05));
    ck_assert_ok(sae_trainer_init(t, sample, 40));
    /* The dense products, or the per-latent path the trainer takes when few codes are near
     * their thresholds (forced either way). */
    t->jump_sparse_below = sparse ? 2.0 : 0.0;
    tu_capture cap = {0};
    ck_assert_ok(sae_trainer_set_allreduce(t, tu_capture_allreduce, &cap));
    ck_assert_ok(sae_trainer_step(t, b1, n));

    ref_model r;
    ref_get(m, &r);
    double th_spread = 0.0;
    for (size_t i = 0; i < s; i++)
        th_spread = fmax(th_spread, fabs(r.th[i] - r.th[0]));
    ck_assert_msg(th_spread > 1e-3, "step 1 should move the thresholds apart (%g)", th_spread);
    double *xs = tu_malloc(n * d * sizeof(double)), *pre = tu_malloc(n * s * sizeof(double));
    ref_pre(&r, b2, n, xs, pre);
    size_t in_window = 0, fired = 0;
    for (size_t q = 0; q < n * s; q++) {
        double gap = pre[q] - r.th[q % s];
        ck_assert_msg(fabs(gap) > 1e-3, "pre-activation %zu is %g from its threshold: the "
                      "differences would cross it", q, gap);
        in_window += fabs(gap) < eps / 2;
        fired += gap > 0;
    }
    ck_assert_msg(in_window > 10 && fired > 10 && fired < n * s - 10,
                  "the batch should exercise the kernel (%zu in the window, %zu fired)",
                  in_window, fired);

    ck_assert_ok(sae_trainer_step(t, b2, n));
    sae__train_layout L;
    sae__train_layout_of(m, &L);
    ck_assert_uint_eq(cap.count, L.count);
    ck_assert_uint_eq(L.n_params - L.log_th, s);
    const double N = cap.copy[L.stats + SAE__STAT_TOKENS];
    ck_assert_double_eq(N, (double)n);

    jump_args a = {b2, n, lambda, eps, NULL};
    double want_loss = jump_loss_hard(&r, &a);
    ck_assert_msg(fabs(tu_metric(t, SAE_METRIC_LOSS) - want_loss) <= 1e-4 * fabs(want_loss),
                  "loss %g, reference %g", tu_metric(t, SAE_METRIC_LOSS), want_loss);
    ck_assert_double_eq_tol(tu_metric(t, SAE_METRIC_SPARSITY_LOSS),
                            lambda * (double)fired / (double)n, 1e-5);

    double *params[4] = {r.We, r.Wd, r.be, r.bd};
    size_t sizes[4] = {d * s, d * s, s, d}, offs[4] = {L.W_enc, L.W_dec, L.b_enc, L.b_dec};
    const char *names[4] = {"W_enc", "W_dec", "b_enc", "b_dec"};
    double *fd = tu_malloc(L.n_params * sizeof(double)), fd_max = 0.0;
    for (size_t p = 0; p < 4; p++)
        central_differences(&r, params[p], sizes[p], jump_loss_hard, &a, fd + offs[p]);
    /* The log-thresholds, through the smoothed objective around the step's thresholds. */
    double th_at[32], lt[32];
    for (size_t i = 0; i < s; i++) {
        th_at[i] = r.th[i];
        lt[i] = log(r.th[i]);
    }
    jump_args sm = {b2, n, lambda, eps, th_at};
    ref_model rl = r;
    rl.th = lt;
    central_differences(&rl, lt, s, jump_loss_smooth_log, &sm, fd + L.log_th);
    for (size_t i = 0; i < L.n_params; i++)
        fd_max = fmax(fd_max, fabs(fd[i]));
    ck_assert_msg(fd_max > 1e-3, "the gradient should not vanish (%g)", fd_max);
    double lt_max = 0.0;
    for (size_t i = 0; i < s; i++)
        lt_max = fmax(lt_max, fabs(fd[L.log_th + i]));
    ck_assert_msg(lt_max > 1e-2, "the thresholds' gradient should not vanish (%g)", lt_max);
    for (size_t p = 0; p < 4; p++)
        compare("JumpReLU", names[p], cap.copy + offs[p], N, fd + offs[p], sizes[p], fd_max);
    compare("JumpReLU", "log_threshold", cap.copy + L.log_th, N, fd + L.log_th, s, fd_max);
    free(fd);
    free(xs);
    free(pre);
    ref_free(&r);
    free(cap.copy);
    free(sample);
    free(b1);
    free(b2);
    sae_trainer_free(t);
    sae_model_free(m);
}

START_TEST(gradient_jumprelu) { check_jump_gradient(0, false); }
END_TEST
START_TEST(gradient_jumprelu_b_dec_input) { check_jump_gradient(1, false); }
END_TEST
START_TEST(gradient_jumprelu_sparse) { check_jump_gradient(0, true); }
END_TEST
START_TEST(gradient_jumprelu_sparse_b_dec_input) { check_jump_gradient(1, true); }
END_TEST

/* ---- Matryoshka gradients ------------------------------------------------------------------ */

typedef struct {
    const float *x;
    size_t n;
    const mat_ctx *c;
} mat_args;

static double mat_loss(const ref_model *r, const void *ctx)
{
    const mat_args *a = ctx;
    return ref_mat_loss(r, a->x, a->n, a->c);
}

/* As test_train.c's BatchTopK check, with groups: a first step leaves some latents dead (DEAD_TOKENS
 * 1) and sets the AuxK normalizer; the second step's gradient against central differences. */
static void check_mat_gradient(int apply_b_dec, size_t auxk)
{
    const size_t d = 6, s = 20, n = 9, sizes[3] = {3, 5, 12}, ends[3] = {3, 8, 20};
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_BATCHTOPK, d, s));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 3));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, apply_b_dec));
    float *sample = tu_train_data(40, d, 1), *b1 = tu_train_data(n, d, 2),
          *b2 = tu_train_data(n, d, 3);
    sae_trainer *t;
    ck_assert_ok(sae_trainer_new(&t, m));
    ck_assert_ok(sae_trainer_set_groups(t, sizes, 3));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_DEAD_TOKENS, 1));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_AUXK, (double)auxk));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_AUXK_COEFF, 0.5));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR, 0.05));
    ck_assert_ok(sae_trainer_init(t, sample, 40));
    tu_capture cap = {0};
    ck_assert_ok(sae_trainer_set_allreduce(t, tu_capture_allreduce, &cap));

    /* After step 1: the dead set (latents batch 1 never kept) and the residual's variance. */
    ref_model r1;
    ref_get(m, &r1);
    double *xs = tu_malloc(n * d * sizeof(double)), *pre = tu_malloc(n * s * sizeof(double));
    double *f = tu_malloc(n * s * sizeof(double)), *e = tu_malloc(n * d * sizeof(double));
    ref_pre(&r1, b1, n, xs, pre);
    ref_batchtopk(&r1, pre, n, f);
    bool dead[20];
    size_t n_dead = 0;
    for (size_t i = 0; i < s; i++) {
        dead[i] = true;
        for (size_t q = 0; q < n; q++)
            dead[i] = dead[i] && f[q * s + i] == 0.0;
        n_dead += dead[i];
    }
    double mean_e[6] = {0}, var = 0.0, smean[6] = {0}, svar = 0.0;
    for (size_t q = 0; q < n; q++)
        for (size_t j = 0; j < d; j++) {
            double acc = r1.bd[j] - xs[q * d + j];
            for (size_t i = 0; i < s; i++)
                acc += f[q * s + i] * r1.Wd[i * d + j];
            e[q * d + j] = acc;
            mean_e[j] += acc / (double)n;
        }
    for (size_t q = 0; q < n; q++)
        for (size_t j = 0; j < d; j++)
            var += (e[q * d + j] - mean_e[j]) * (e[q * d + j] - mean_e[j]) / (double)n;
    for (size_t q = 0; q < 40; q++)
        for (size_t j = 0; j < d; j++)
            smean[j] += (double)((float)r1.scale * sample[q * d + j]) / 40.0;
    for (size_t q = 0; q < 40; q++)
        for (size_t j = 0; j < d; j++) {
            double v = (double)((float)r1.scale * sample[q * d + j]) - smean[j];
            svar += v * v / 40.0;
        }
    ck_assert_ok(sae_trainer_step(t, b1, n));
    ck_assert_msg(n_dead > 0 && n_dead < s, "step 1 should leave some latents dead (%zu)",
                  n_dead);

    ref_model r;
    ref_get(m, &r);
    /* The AuxK target: the full residual of batch 2 at these weights, held fixed. */
    ref_pre(&r, b2, n, xs, pre);
    ref_batchtopk(&r, pre, n, f);
    size_t per_group[3] = {0};
    for (size_t q = 0; q < n * s; q++)
        if (f[q] > 0.0)
            per_group[(q % s) < 3 ? 0 : (q % s) < 8 ? 1 : 2]++;
    ck_assert_msg(per_group[0] > 0 && per_group[1] > 0 && per_group[2] > 0,
                  "every group should fire in batch 2 (%zu, %zu, %zu)", per_group[0],
                  per_group[1], per_group[2]);
    for (size_t q = 0; q < n; q++)
        for (size_t j = 0; j < d; j++) {
            double acc = r.bd[j] - xs[q * d + j];
            for (size_t i = 0; i < s; i++)
                acc += f[q * s + i] * r.Wd[i * d + j];
            e[q * d + j] = acc;
        }
    double bd0[6];
    memcpy(bd0, r.bd, sizeof bd0);
    mat_ctx c = {svar, var, 0.5, auxk, 3, ends, dead, e, bd0};
    ck_assert_ok(sae_trainer_step(t, b2, n));
    sae__train_layout L;
    sae__train_layout_of(m, &L);
    const double N = cap.copy[L.stats + SAE__STAT_TOKENS];
    mat_args a = {b2, n, &c};
    double want_loss = mat_loss(&r, &a);
    ck_assert_msg(fabs(tu_metric(t, SAE_METRIC_LOSS) - want_loss) <= 1e-4 * fabs(want_loss),
                  "loss %g, reference %g", tu_metric(t, SAE_METRIC_LOSS), want_loss);

    double *params[4] = {r.We, r.Wd, r.be, r.bd};
    size_t psz[4] = {d * s, d * s, s, d}, offs[4] = {L.W_enc, L.W_dec, L.b_enc, L.b_dec};
    const char *names[4] = {"W_enc", "W_dec", "b_enc", "b_dec"};
    double *fd = tu_malloc(L.n_params * sizeof(double)), fd_max = 0.0;
    for (size_t p = 0; p < 4; p++)
        central_differences(&r, params[p], psz[p], mat_loss, &a, fd + offs[p]);
    for (size_t i = 0; i < L.n_params; i++)
        fd_max = fmax(fd_max, fabs(fd[i]));
    ck_assert_msg(fd_max > 1e-3, "the gradient should not vanish (%g)", fd_max);
    /* The unit-norm projection happens after the allreduce: the buffer holds the raw gradient. */
    for (size_t p = 0; p < 4; p++)
        compare("Matryoshka", names[p], cap.copy + offs[p], N, fd + offs[p], psz[p], fd_max);
    free(fd);
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

/* AUXK 4 of 20 latents takes the dense AuxK path, AUXK 1 the sparse one. */
START_TEST(gradient_matryoshka_with_auxk) { check_mat_gradient(1, 4); }
END_TEST
START_TEST(gradient_matryoshka_with_sparse_auxk) { check_mat_gradient(0, 1); }
END_TEST

/* One group is plain BatchTopK: the same weights, bit for bit. */
START_TEST(one_group_is_batchtopk)
{
    const size_t d = 6, s = 24;
    sae_model *m[2];
    sae_trainer *t[2];
    float *sample = tu_train_data(64, d, 5);
    for (int i = 0; i < 2; i++) {
        ck_assert_ok(sae_model_new(&m[i], SAE_ARCH_BATCHTOPK, d, s));
        ck_assert_ok(sae_model_set_param(m[i], SAE_PARAM_K, 3));
        ck_assert_ok(sae_trainer_new(&t[i], m[i]));
        ck_assert_ok(sae_trainer_set_param(t[i], SAE_TRAIN_DEAD_TOKENS, 50));
        ck_assert_ok(sae_trainer_set_param(t[i], SAE_TRAIN_AUXK, 4));
        ck_assert_ok(sae_trainer_init(t[i], sample, 64));
    }
    ck_assert_ok(sae_trainer_set_groups(t[1], &s, 1));
    for (uint64_t step = 0; step < 10; step++) {
        float *x = tu_train_data(32, d, 100 + step);
        ck_assert_ok(sae_trainer_step(t[0], x, 32));
        ck_assert_ok(sae_trainer_step(t[1], x, 32));
        free(x);
    }
    size_t total = get_all(m[0], NULL);
    float *w0 = tu_malloc(total * sizeof(float)), *w1 = tu_malloc(total * sizeof(float));
    get_all(m[0], w0);
    get_all(m[1], w1);
    ck_assert_mem_eq(w0, w1, total * sizeof(float));
    ck_assert_double_eq(tu_metric(t[0], SAE_METRIC_LOSS), tu_metric(t[1], SAE_METRIC_LOSS));
    ck_assert_double_eq(tu_metric(t[1], SAE_METRIC_PREFIX_FVU), tu_metric(t[1], SAE_METRIC_FVU));
    free(w0);
    free(w1);
    free(sample);
    for (int i = 0; i < 2; i++) {
        sae_trainer_free(t[i]);
        sae_model_free(m[i]);
    }
}
END_TEST

/* Three JumpReLU trainers d -> s on the same init sample (seed), with the thread counts given,
 * LR 1e-2 and thresholds from 1; the caller sets the paths (jump_* fields) and frees them. */
static float *jumprelu_trio(size_t d, size_t s, const size_t threads[3], uint64_t seed,
                            sae_model *m[3], sae_trainer *t[3])
{
    float *sample = tu_train_data(256, d, seed);
    for (int i = 0; i < 3; i++) {
        ck_assert_ok(sae_model_new(&m[i], SAE_ARCH_JUMPRELU, d, s));
        ck_assert_ok(sae_model_set_param(m[i], SAE_PARAM_THREADS, (double)threads[i]));
        ck_assert_ok(sae_trainer_new(&t[i], m[i]));
        ck_assert_ok(sae_trainer_set_param(t[i], SAE_TRAIN_LR, 1e-2));
        ck_assert_ok(sae_trainer_set_param(t[i], SAE_TRAIN_JUMPRELU_INIT_THRESHOLD, 1.0));
        ck_assert_ok(sae_trainer_init(t[i], sample, 256));
    }
    return sample;
}

/* All weights of m[0..3) in w[0..3) (allocated here). */
static size_t get_trio(sae_model *const m[3], float *w[3])
{
    const size_t total = get_all(m[0], NULL);
    for (int i = 0; i < 3; i++) {
        w[i] = tu_malloc(total * sizeof(float));
        get_all(m[i], w[i]);
    }
    return total;
}

/* steps steps of n fresh tokens of width d (seeds seed, seed + 1, ...) through each trainer. */
static void step_trio(sae_trainer *const t[3], size_t n, size_t d, uint64_t steps, uint64_t seed)
{
    for (uint64_t step = 0; step < steps; step++) {
        float *x = tu_train_data(n, d, seed + step);
        for (int i = 0; i < 3; i++)
            ck_assert_ok(sae_trainer_step(t[i], x, n));
        free(x);
    }
}

/* Frees the trainers, models and weights of a trio. */
static void free_trio(sae_model *const m[3], sae_trainer *const t[3], float *const w[3])
{
    for (int i = 0; i < 3; i++) {
        free(w[i]);
        sae_trainer_free(t[i]);
        sae_model_free(m[i]);
    }
}

/* JumpReLU's per-latent path splits across threads with one writer per sum: the weights do not
 * depend on the thread count, nor on the path (to float rounding). */
START_TEST(jumprelu_threads_do_not_change_the_sums)
{
    /* Big enough that both passes split into 4 chunks (lib/parallel.c's grain). */
    const size_t d = 16, s = 512, n = 8192, threads[3] = {4, 1, 4};
    sae_model *m[3];
    sae_trainer *t[3];
    float *sample = jumprelu_trio(d, s, threads, 7, m, t);
    for (int i = 0; i < 3; i++) {
        t[i]->jump_sparse_below = i < 2 ? 2.0 : 0.0;
        t[i]->jump_parallel_above = 0.0; /* split whenever there are threads */
    }
    step_trio(t, n, d, 10, 300);
    float *w[3];
    const size_t total = get_trio(m, w);
    ck_assert_mem_eq(w[0], w[1], total * sizeof(float));
    for (size_t q = 0; q < total; q++)
        ck_assert_msg(fabsf(w[0][q] - w[2][q]) <= 1e-4f * (1.0f + fabsf(w[2][q])),
                      "weight %zu: per-latent path %g, dense %g", q, (double)w[0][q],
                      (double)w[2][q]);
    free_trio(m, t, w);
    free(sample);
}
END_TEST

/* Below JUMP_PARALLEL_ABOVE element operations the per-latent path runs token by token on the
 * calling thread, above it in two passes split across threads: both add every sum in token
 * order, so they give the same bits (the same thread count either side of the threshold, and
 * one thread). */
START_TEST(jumprelu_calling_thread_and_split_agree)
{
    const size_t d = 16, s = 512, n = 8192, threads[3] = {3, 3, 1};
    const double above[3] = {0.0, 1e300, 0.0};
    sae_model *m[3];
    sae_trainer *t[3];
    float *sample = jumprelu_trio(d, s, threads, 8, m, t);
    for (int i = 0; i < 3; i++) {
        t[i]->jump_sparse_below = 2.0;
        t[i]->jump_parallel_above = above[i];
    }
    step_trio(t, n, d, 6, 400);
    /* The latents fired (so decoder rows, encoder columns and thresholds all took gradients). */
    ck_assert_double_gt(tu_metric(t[0], SAE_METRIC_L0), 1.0);
    float *w[3];
    const size_t total = get_trio(m, w);
    ck_assert_mem_eq(w[0], w[1], total * sizeof(float));
    ck_assert_mem_eq(w[0], w[2], total * sizeof(float));
    free_trio(m, t, w);
    free(sample);
}
END_TEST

/* JumpReLU's per-latent path has AVX-512 kernels (listing, decode, backward) and portable ones
 * that give the same bits: the trainers' lists and every tensor agree after each step, for an
 * SAE at the widths whose backward is specialized (64), one with vector tails everywhere
 * (23 -> 101) and a skip transcoder (23 -> 101 -> 40, its output scale in the decode); the third
 * trainer of each runs the portable kernels split across threads. On a CPU without AVX-512 the
 * first trainer runs the portable kernels too (the test says so). */
START_TEST(jumprelu_avx512_and_portable_kernels_agree)
{
    const size_t shapes[3][3] = {{64, 512, 64}, {23, 101, 23}, {23, 101, 40}};
    const size_t d_in = shapes[_i][0], s = shapes[_i][1], d_out = shapes[_i][2], n = 300;
    const bool tc = _i == 2;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f"))
        fprintf(stderr, "jumprelu_avx512_and_portable_kernels_agree: no AVX-512 on this CPU, "
                        "portable kernels on both sides\n");
    sae_model *m[3];
    sae_trainer *t[3];
    float *sx = tu_train_data(256, d_in, 9), *sy = tc ? tu_train_data(256, d_out, 10) : NULL;
    for (int i = 0; i < 3; i++) {
        if (tc)
            ck_assert_ok(sae_model_new_transcoder(&m[i], SAE_ARCH_JUMPRELU, d_in, s, d_out, 1));
        else
            ck_assert_ok(sae_model_new(&m[i], SAE_ARCH_JUMPRELU, d_in, s));
        ck_assert_ok(sae_model_set_param(m[i], SAE_PARAM_THREADS, i == 2 ? 3.0 : 1.0));
        ck_assert_ok(sae_trainer_new(&t[i], m[i]));
        ck_assert_ok(sae_trainer_set_param(t[i], SAE_TRAIN_LR, 1e-2));
        ck_assert_ok(sae_trainer_set_param(t[i], SAE_TRAIN_JUMPRELU_INIT_THRESHOLD, 0.5));
        ck_assert_ok(tc ? sae_trainer_init_to(t[i], sx, sy, 256) : sae_trainer_init(t[i], sx, 256));
        t[i]->jump_sparse_below = 2.0;
        t[i]->jump_portable = i > 0;
        t[i]->jump_parallel_above = i == 2 ? 0.0 : 1e300;
    }
    for (uint64_t step = 0; step < 6; step++) {
        float *x = tu_train_data(n, d_in, 600 + step), *y = tc ? tu_train_data(n, d_out, 700 + step)
                                                               : NULL;
        for (int i = 0; i < 3; i++)
            ck_assert_ok(tc ? sae_trainer_step_to(t[i], x, y, n) : sae_trainer_step(t[i], x, n));
        for (int i = 1; i < 3; i++) {
            ck_assert_mem_eq(t[0]->near_ptr, t[i]->near_ptr, (n + 1) * sizeof(size_t));
            ck_assert_mem_eq(t[0]->near_idx, t[i]->near_idx, t[0]->near_ptr[n] * sizeof(uint32_t));
        }
        free(x);
        free(y);
    }
    /* Latents fired, and some sat in the threshold's window unfired. */
    ck_assert_double_gt(tu_metric(t[0], SAE_METRIC_L0), 1.0);
    ck_assert_double_gt((double)t[0]->near_ptr[n] / (double)n, tu_metric(t[0], SAE_METRIC_L0));
    float *w[3];
    const size_t total = get_trio(m, w);
    ck_assert_mem_eq(w[0], w[1], total * sizeof(float));
    ck_assert_mem_eq(w[0], w[2], total * sizeof(float));
    free_trio(m, t, w);
    free(sx);
    free(sy);
}
END_TEST

/* BatchTopK's selection (train_batchtopk.c) against sorting the whole batch: the k n largest
 * positive values, ties to the lower flat index, listed per token in index order, and the cut.
 * Batches made to be hard: values spread over many octaves, many ties at the cut, zeros,
 * negatives, subnormals (the bucket +0 shares), +inf, fewer positives than k n, none. */
static int by_value_then_index(const void *a, const void *b)
{
    const float *const *x = a, *const *y = b;
    if (**x != **y)
        return **x > **y ? -1 : 1;
    return *x < *y ? -1 : *x > *y;
}

START_TEST(batchtopk_selection_is_the_sorted_one)
{
    const size_t d = 4, s = 40, n = 25, k = 3;
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, SAE_ARCH_BATCHTOPK, d, s));
    ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, (double)k));
    sae_trainer *t;
    ck_assert_ok(sae_trainer_new(&t, m));
    float *x = tu_train_data(n, d, 31);
    ck_assert_ok(sae_trainer_init(t, x, n));
    ck_assert_ok(sae_trainer_step(t, x, n)); /* the scratch for n tokens */
    const float pool[] = {2.0f, 1.0f, 1.0f, 0.5f, 0.0f, -0.0f, -1.0f, 1e-40f, 3e-41f, 1.0f};
    const float *order[25 * 40];
    tu_rng r = {5};
    for (int kind = 0; kind < 7; kind++) {
        for (size_t q = 0; q < n * s; q++) {
            const float z = tu_normal(&r);
            float v = kind == 0   ? z * expf(4.0f * tu_normal(&r))       /* many octaves */
                      : kind == 1 ? pool[tu_next(&r) % 10]                /* ties at the cut */
                      : kind == 2 ? -fabsf(z)                             /* none positive */
                      : kind == 3 ? (tu_next(&r) % 40 == 0 ? fabsf(z) : -1.0f) /* too few */
                      : kind == 4 ? (z > 0.0f ? 1e-39f * z : z)           /* subnormal cut */
                      : kind == 5 ? (tu_next(&r) % 300 == 0 ? INFINITY : z) /* +inf */
                                  : 1.0f + 0x1p-20f * (float)(tu_next(&r) % 4); /* one bucket */
            t->pre[q] = v;
        }
        size_t positive = 0;
        for (size_t q = 0; q < n * s; q++)
            if (t->pre[q] > 0.0f)
                order[positive++] = t->pre + q;
        qsort(order, positive, sizeof order[0], by_value_then_index);
        const size_t want = k * n < positive ? k * n : positive;
        bool *taken = calloc(n * s, 1);
        for (size_t q = 0; q < want; q++)
            taken[order[q] - t->pre] = true;
        const float cut = sae__train_select_batchtopk(t, n);
        ck_assert_msg(cut == (want > 0 ? *order[want - 1] : 0.0f), "batch %d: cut %g, sorted %g",
                      kind, (double)cut, want > 0 ? (double)*order[want - 1] : 0.0);
        ck_assert_uint_eq(t->act_ptr[n], want);
        size_t a = 0;
        for (size_t i = 0; i < n; i++) {
            ck_assert_uint_eq(t->act_ptr[i], a);
            for (size_t j = 0; j < s; j++) {
                if (!taken[i * s + j])
                    continue;
                ck_assert_msg(a < t->act_ptr[i + 1] && t->act_idx[a] == j &&
                                  t->act_val[a] == t->pre[i * s + j],
                              "batch %d: token %zu latent %zu should be listed", kind, i, j);
                a++;
            }
            ck_assert_uint_eq(t->act_ptr[i + 1], a);
        }
        free(taken);
        if (kind == 2)
            ck_assert_uint_eq(want, 0);
        if (kind == 3)
            ck_assert_uint_lt(want, k * n);
    }
    free(x);
    sae_trainer_free(t);
    sae_model_free(m);
}
END_TEST

/* ---- checkpoints --------------------------------------------------------------------------- */

/* A = 0: JumpReLU; 1: Matryoshka. */
static sae_model *recipe_model(int which, size_t d, size_t s)
{
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, which == 0 ? SAE_ARCH_JUMPRELU : SAE_ARCH_BATCHTOPK, d, s));
    if (which == 1)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, 2));
    return m;
}

static const size_t test_groups[3] = {2, 6, 8};

START_TEST(checkpoint_resumes_bit_for_bit)
{
    const int which = _i;
    const size_t d = 5, s = 16;
    sae_model *m = recipe_model(which, d, s);
    float *x = tu_train_data(64, d, 9);
    sae_trainer *t;
    ck_assert_ok(sae_trainer_new(&t, m));
    if (which == 1)
        ck_assert_ok(sae_trainer_set_groups(t, test_groups, 3));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_DEAD_TOKENS, 40));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR, 1e-2));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_TOTAL_STEPS, 12));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_L0_COEFF, 0.5));
    ck_assert_ok(sae_trainer_init(t, x, 64));
    tu_run_steps(t, d, 0, 6);
    char *path = tu_tmp_path("train_recipes_ckpt.safetensors");
    ck_assert_ok(sae_trainer_save(t, path));
    tu_run_steps(t, d, 6, 12);
    const size_t total = get_all(m, NULL);
    float *want = tu_malloc(total * sizeof(float)), *got = tu_malloc(total * sizeof(float));
    get_all(m, want);

    sae_model *m2;
    ck_assert_ok(sae_model_load(&m2, path)); /* the checkpoint is also a model file */
    ck_assert_int_eq(sae_model_arch(m2), sae_model_arch(m));
    sae_trainer *t2;
    ck_assert_ok(sae_trainer_new(&t2, m2));
    ck_assert_ok(sae_trainer_load(t2, path));
    size_t sizes[4], ng;
    ck_assert_ok(sae_trainer_get_groups(t2, sizes, 4, &ng));
    ck_assert_uint_eq(ng, which == 1 ? 3 : 0);
    if (which == 1)
        ck_assert_mem_eq(sizes, test_groups, sizeof test_groups);
    double v;
    ck_assert_ok(sae_trainer_get_param(t2, SAE_TRAIN_L0_COEFF, &v));
    ck_assert_double_eq(v, 0.5);
    tu_run_steps(t2, d, 6, 12);
    get_all(m2, got);
    ck_assert_mem_eq(want, got, total * sizeof(float));
    ck_assert_double_eq(tu_metric(t2, SAE_METRIC_LOSS), tu_metric(t, SAE_METRIC_LOSS));
    ck_assert_double_eq(tu_metric(t2, SAE_METRIC_PREFIX_FVU), tu_metric(t, SAE_METRIC_PREFIX_FVU));
    if (which == 0) {
        /* The thresholds moved from their start and are what the model encodes with. */
        ck_assert(tu_metric(t, SAE_METRIC_THRESHOLD_MEAN) != 0.01);
        ck_assert_double_eq(tu_metric(t2, SAE_METRIC_THRESHOLD_MEAN),
                            tu_metric(t, SAE_METRIC_THRESHOLD_MEAN));
    } else {
        ck_assert(tu_metric(t, SAE_METRIC_PREFIX_FVU) > tu_metric(t, SAE_METRIC_FVU));
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
END_TEST

START_TEST(checkpoint_groups_are_checked)
{
    const size_t d = 5, s = 16;
    sae_model *m = recipe_model(1, d, s);
    float *x = tu_train_data(64, d, 9);
    sae_trainer *t;
    ck_assert_ok(sae_trainer_new(&t, m));
    ck_assert_ok(sae_trainer_set_groups(t, test_groups, 3));
    ck_assert_ok(sae_trainer_init(t, x, 64));
    tu_run_steps(t, d, 0, 2);
    char *path = tu_tmp_path("train_recipes_groups.safetensors");
    ck_assert_ok(sae_trainer_save(t, path));
    /* A checkpoint of 16 latents in groups does not load into 8. */
    sae_model *small = recipe_model(1, d, 8);
    sae_trainer *ts;
    ck_assert_ok(sae_trainer_new(&ts, small));
    ck_assert_sae(sae_trainer_load(ts, path), SAE_EINVAL);
    /* A damaged group list is refused, and the trainer keeps its own groups. */
    size_t size;
    unsigned char *bytes = tu_read_file(path, &size);
    unsigned char *at = NULL;
    for (size_t i = 0; i + 7 <= size && at == NULL; i++)
        if (memcmp(bytes + i, "\"2,6,8\"", 7) == 0)
            at = bytes + i;
    ck_assert_ptr_nonnull(at);
    memcpy(at, "\"2,6,9\"", 7);
    tu_write_file(path, bytes, size);
    sae_trainer *t2;
    sae_model *m2 = recipe_model(1, d, s);
    ck_assert_ok(sae_trainer_new(&t2, m2));
    const size_t other[2] = {8, 8};
    ck_assert_ok(sae_trainer_set_groups(t2, other, 2));
    ck_assert_sae(sae_trainer_load(t2, path), SAE_EFORMAT);
    size_t got[4], ng;
    ck_assert_ok(sae_trainer_get_groups(t2, got, 4, &ng));
    ck_assert_uint_eq(ng, 2);
    ck_assert_uint_eq(got[0], 8);
    free(bytes);
    free(path);
    free(x);
    sae_trainer_free(t);
    sae_trainer_free(ts);
    sae_trainer_free(t2);
    sae_model_free(m);
    sae_model_free(small);
    sae_model_free(m2);
}
END_TEST

/* ---- errors -------------------------------------------------------------------------------- */

START_TEST(groups_are_checked)
{
    sae_model *m = recipe_model(1, 4, 10), *tk;
    ck_assert_ok(sae_model_new(&tk, SAE_ARCH_TOPK, 4, 10));
    sae_trainer *t, *tt;
    ck_assert_ok(sae_trainer_new(&t, m));
    ck_assert_ok(sae_trainer_new(&tt, tk));
    const size_t good[2] = {4, 6}, short_[2] = {4, 5}, zero[3] = {4, 0, 6}, over[2] = {11, 1};
    ck_assert_sae(sae_trainer_set_groups(NULL, good, 2), SAE_EINVAL);
    ck_assert_sae(sae_trainer_set_groups(t, NULL, 2), SAE_EINVAL);
    ck_assert_sae(sae_trainer_set_groups(t, short_, 2), SAE_EINVAL);
    ck_assert_sae(sae_trainer_set_groups(t, zero, 3), SAE_EINVAL);
    ck_assert_sae(sae_trainer_set_groups(t, over, 2), SAE_EINVAL);
    ck_assert_sae(sae_trainer_set_groups(tt, good, 2), SAE_EUNSUPPORTED);
    size_t got[2], n;
    ck_assert_ok(sae_trainer_get_groups(t, NULL, 0, &n));
    ck_assert_uint_eq(n, 0);
    ck_assert_ok(sae_trainer_set_groups(t, good, 2));
    ck_assert_sae(sae_trainer_get_groups(t, got, 1, &n), SAE_EINVAL);
    ck_assert_sae(sae_trainer_get_groups(t, got, 2, NULL), SAE_EINVAL);
    ck_assert_ok(sae_trainer_get_groups(t, got, 2, &n));
    ck_assert_uint_eq(n, 2);
    ck_assert_uint_eq(got[1], 6);
    ck_assert_ok(sae_trainer_set_groups(t, NULL, 0));
    ck_assert_ok(sae_trainer_get_groups(t, NULL, 0, &n));
    ck_assert_uint_eq(n, 0);
    /* JumpReLU's parameters are checked like the others. */
    ck_assert_sae(sae_trainer_set_param(t, SAE_TRAIN_JUMPRELU_BANDWIDTH, 0.0), SAE_EINVAL);
    ck_assert_sae(sae_trainer_set_param(t, SAE_TRAIN_JUMPRELU_INIT_THRESHOLD, -1.0), SAE_EINVAL);
    ck_assert_sae(sae_trainer_set_param(t, SAE_TRAIN_L0_COEFF, NAN), SAE_EINVAL);
    sae_trainer_free(t);
    sae_trainer_free(tt);
    sae_model_free(m);
    sae_model_free(tk);
}
END_TEST

START_TEST(jumprelu_defaults_and_init)
{
    sae_model *m = recipe_model(0, 6, 12);
    sae_trainer *t;
    ck_assert_ok(sae_trainer_new(&t, m));
    const struct {
        sae_train_param p;
        double want;
    } want[] = {{SAE_TRAIN_LR, 0.1 / sqrt(6.0)}, /* the width rule's cap (docs/training.md) */
                {SAE_TRAIN_BETA1, 0.0},
                {SAE_TRAIN_ADAM_EPS, 1e-8},
                {SAE_TRAIN_GRAD_CLIP, 0.0},
                {SAE_TRAIN_JUMPRELU_BANDWIDTH, 0.05},
                {SAE_TRAIN_JUMPRELU_INIT_THRESHOLD, 0.01},
                {SAE_TRAIN_L0_COEFF, 1.0}};
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        double v;
        ck_assert_ok(sae_trainer_get_param(t, want[i].p, &v));
        ck_assert_double_eq(v, want[i].want);
    }
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_TOTAL_STEPS, 1000));
    double v;
    ck_assert_ok(sae_trainer_get_param(t, SAE_TRAIN_L1_WARMUP_STEPS, &v));
    ck_assert_double_eq(v, 50);
    ck_assert_ok(sae_trainer_get_param(t, SAE_TRAIN_LR_DECAY_STEPS, &v));
    ck_assert_double_eq(v, 0);
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_JUMPRELU_INIT_THRESHOLD, 0.25));
    float *x = tu_train_data(30, 6, 3);
    ck_assert_ok(sae_trainer_init(t, x, 30));
    float th[12], wd[72];
    ck_assert_ok(sae_model_get_tensor(m, SAE_THRESHOLD, th));
    for (size_t i = 0; i < 12; i++)
        ck_assert_float_eq_tol(th[i], 0.25f, 1e-7f);
    /* Unit-norm decoder rows, as TopK's. */
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_DEC, wd));
    for (size_t i = 0; i < 12; i++) {
        float nn = 0.0f;
        for (size_t j = 0; j < 6; j++)
            nn += wd[i * 6 + j] * wd[i * 6 + j];
        ck_assert_float_eq_tol(nn, 1.0f, 1e-5f);
    }
    ck_assert_ok(sae_trainer_step(t, x, 30));
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_DEC, wd));
    for (size_t i = 0; i < 12; i++) {
        float nn = 0.0f;
        for (size_t j = 0; j < 6; j++)
            nn += wd[i * 6 + j] * wd[i * 6 + j];
        ck_assert_float_eq_tol(nn, 1.0f, 1e-5f);
    }
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

static void *work(void *arg)
{
    worker *w = arg;
    for (int s = 0; s < w->steps; s++) {
        float *x = tu_train_data(w->batch, w->d, 500 + (uint64_t)s);
        size_t half = w->batch / 2;
        const float *mine = w->rank == 0 ? x : x + half * w->d;
        int rc = sae_trainer_step(w->t, mine, w->rank == 0 ? half : w->batch - half);
        free(x);
        if (rc != SAE_OK) {
            w->rc = rc;
            return NULL;
        }
    }
    return NULL;
}

/* Two processes agree exactly. JumpReLU's sums are over tokens, so they also match one process
 * on the combined batch; Matryoshka's BatchTopK selects per process, so only agreement holds. */
START_TEST(allreduce_keeps_processes_identical)
{
    const int which = _i;
    const size_t d = 6, s = 24, batch = 40;
    sae_model *ms[3];
    sae_trainer *ts[3];
    float *sample = tu_train_data(100, d, 77);
    const size_t groups[3] = {4, 8, 12};
    for (int i = 0; i < 3; i++) {
        ms[i] = recipe_model(which, d, s);
        ck_assert_ok(sae_trainer_new(&ts[i], ms[i]));
        if (which == 1)
            ck_assert_ok(sae_trainer_set_groups(ts[i], groups, 3));
        ck_assert_ok(sae_trainer_set_param(ts[i], SAE_TRAIN_DEAD_TOKENS, 60));
        ck_assert_ok(sae_trainer_set_param(ts[i], SAE_TRAIN_AUXK, 4));
        ck_assert_ok(sae_trainer_set_param(ts[i], SAE_TRAIN_LR, 1e-3));
        ck_assert_ok(sae_trainer_set_param(ts[i], SAE_TRAIN_JUMPRELU_BANDWIDTH, 0.5));
        ck_assert_ok(sae_trainer_set_param(ts[i], SAE_TRAIN_JUMPRELU_INIT_THRESHOLD, 0.3));
        ck_assert_ok(sae_trainer_init(ts[i], sample, 100));
        ts[i]->jump_sparse_below = 2.0; /* JumpReLU's per-latent path, listing included */
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
    for (int step = 0; step < 8; step++) {
        float *x = tu_train_data(batch, d, 500 + (uint64_t)step);
        ck_assert_ok(sae_trainer_step(ts[0], x, batch));
        free(x);
    }
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    ck_assert_ok(w[0].rc);
    ck_assert_ok(w[1].rc);
    const size_t total = get_all(ms[0], NULL);
    float *one = tu_malloc(total * sizeof(float)), *p0 = tu_malloc(total * sizeof(float)),
          *p1 = tu_malloc(total * sizeof(float));
    get_all(ms[0], one);
    get_all(ms[1], p0);
    get_all(ms[2], p1);
    ck_assert_mem_eq(p0, p1, total * sizeof(float));
    if (which == 0)
        for (size_t i = 0; i < total; i++)
            ck_assert_msg(fabsf(p0[i] - one[i]) <= 1e-4f * (1.0f + fabsf(one[i])),
                          "weight %zu: data-parallel %g, one process %g", i, (double)p0[i],
                          (double)one[i]);
    ck_assert_double_eq(tu_metric(ts[1], SAE_METRIC_TOKENS), 8.0 * (double)batch);
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
END_TEST

/* ---- learning ------------------------------------------------------------------------------ */

enum { P_D = 32, P_TRUE = 48, P_SAE = 96, P_ACTIVE = 4 };

/* Each token is a sum of P_ACTIVE distinct true directions with magnitudes in [0.5, 1.5]. */
static void planted(float *x, size_t n, const float *truth, tu_rng *r)
{
    for (size_t q = 0; q < n; q++) {
        float *row = x + q * P_D;
        memset(row, 0, P_D * sizeof(float));
        size_t picked[P_ACTIVE];
        for (int a = 0; a < P_ACTIVE; a++) {
            size_t which;
            bool again;
            do {
                which = tu_next(r) % P_TRUE;
                again = false;
                for (int b = 0; b < a; b++)
                    again = again || picked[b] == which;
            } while (again);
            picked[a] = which;
            float mag = tu_uniform(r, 0.5f, 1.5f);
            for (size_t j = 0; j < P_D; j++)
                row[j] += mag * truth[which * P_D + j];
        }
    }
}

/* Planted features: JumpReLU (which = 0) and Matryoshka (1) recover them, MMCS >= 0.98, at an
 * L0 near the planted 4. */
START_TEST(recovers_planted_features)
{
    const int which = _i;
    const size_t batch = 128, steps = 3000;
    tu_rng r = {31};
    float *truth = tu_malloc(P_TRUE * P_D * sizeof(float));
    for (size_t a = 0; a < P_TRUE; a++) {
        double nn = 0.0;
        for (size_t j = 0; j < P_D; j++) {
            truth[a * P_D + j] = tu_normal(&r);
            nn += (double)truth[a * P_D + j] * truth[a * P_D + j];
        }
        for (size_t j = 0; j < P_D; j++)
            truth[a * P_D + j] = (float)(truth[a * P_D + j] / sqrt(nn));
    }
    sae_model *m;
    ck_assert_ok(sae_model_new(&m, which == 0 ? SAE_ARCH_JUMPRELU : SAE_ARCH_BATCHTOPK, P_D,
                               P_SAE));
    sae_trainer *t;
    if (which == 1)
        ck_assert_ok(sae_model_set_param(m, SAE_PARAM_K, P_ACTIVE));
    ck_assert_ok(sae_trainer_new(&t, m));
    if (which == 1) {
        /* The first group has room for every planted feature, and its prefix loss puts them
         * there. (With a smaller first group of these equally frequent features, its latents
         * learn blends of several, and MMCS stays near 0.97: Matryoshka's early groups are for
         * the frequent, general features.) */
        const size_t groups[3] = {48, 24, 24};
        ck_assert_ok(sae_trainer_set_groups(t, groups, 3));
    } else {
        ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_L0_COEFF, 0.5));
    }
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR, 3e-3));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_TOTAL_STEPS, (double)steps));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_DEAD_TOKENS, 20000));
    ck_assert_ok(sae_trainer_set_param(t, SAE_TRAIN_LR_DECAY_STEPS, (double)steps / 5));
    float *x = tu_malloc(4096 * P_D * sizeof(float));
    planted(x, 4096, truth, &r);
    ck_assert_ok(sae_trainer_init(t, x, 4096));
    for (size_t step = 0; step < steps; step++) {
        planted(x, batch, truth, &r);
        ck_assert_ok(sae_trainer_step(t, x, batch));
    }
    float *Wd = tu_malloc(P_SAE * P_D * sizeof(float));
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_DEC, Wd));
    double score = tu_mmcs(truth, P_TRUE, Wd, P_SAE, P_D);
    /* L0 and FVU of the inference model (threshold form) on fresh data. */
    planted(x, 4096, truth, &r);
    const sae_eval_metric em[2] = {SAE_EVAL_FVU, SAE_EVAL_L0};
    double ev[2];
    ck_assert_ok(sae_evaluate(m, x, 4096, em, 2, ev));
    fprintf(stderr, "%s: MMCS %.4f, FVU %.4f, L0 %.2f (training batch: FVU %.4f, first group "
            "alone %.4f, L0 %.2f)\n", which == 0 ? "JumpReLU" : "Matryoshka", score, ev[0], ev[1],
            tu_metric(t, SAE_METRIC_FVU), tu_metric(t, SAE_METRIC_PREFIX_FVU),
            tu_metric(t, SAE_METRIC_L0));
    if (which == 1)
        ck_assert_msg(tu_metric(t, SAE_METRIC_PREFIX_FVU) < 0.25, "the first group alone: FVU %.4f",
                      tu_metric(t, SAE_METRIC_PREFIX_FVU));
    ck_assert_msg(score >= 0.98, "MMCS %.4f, FVU %.4f, L0 %.2f", score, ev[0], ev[1]);
    ck_assert_msg(ev[1] >= 3.0 && ev[1] <= 6.0, "L0 %.2f, planted %d", ev[1], P_ACTIVE);
    ck_assert_msg(ev[0] < 0.1, "FVU %.4f", ev[0]);
    free(Wd);
    free(x);
    free(truth);
    sae_trainer_free(t);
    sae_model_free(m);
}
END_TEST

static Suite *recipes_suite(void)
{
    Suite *s = suite_create("train_recipes");
    TCase *tc = tcase_create("train_recipes");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, gradient_jumprelu);
    tcase_add_test(tc, gradient_jumprelu_b_dec_input);
    tcase_add_test(tc, gradient_jumprelu_sparse);
    tcase_add_test(tc, gradient_jumprelu_sparse_b_dec_input);
    tcase_add_test(tc, gradient_matryoshka_with_auxk);
    tcase_add_test(tc, gradient_matryoshka_with_sparse_auxk);
    tcase_add_test(tc, one_group_is_batchtopk);
    tcase_add_test(tc, jumprelu_threads_do_not_change_the_sums);
    tcase_add_test(tc, jumprelu_calling_thread_and_split_agree);
    tcase_add_loop_test(tc, jumprelu_avx512_and_portable_kernels_agree, 0, 3);
    tcase_add_test(tc, batchtopk_selection_is_the_sorted_one);
    tcase_add_loop_test(tc, checkpoint_resumes_bit_for_bit, 0, 2);
    tcase_add_test(tc, checkpoint_groups_are_checked);
    tcase_add_test(tc, groups_are_checked);
    tcase_add_test(tc, jumprelu_defaults_and_init);
    tcase_add_loop_test(tc, allreduce_keeps_processes_identical, 0, 2);
    tcase_add_loop_test(tc, recovers_planted_features, 0, 2);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(recipes_suite)
