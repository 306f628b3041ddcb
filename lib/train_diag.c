/* Diagnostics while training: metrics on a held-out slice (evaluated with sae_evaluate on the
 * model as it stands, every HELDOUT_EVERY steps and at TOTAL_STEPS), and the warnings a run
 * raises when, past its warm-up, it reconstructs worse than the mean (FVU above 1) or is not
 * sparse (L0 above a quarter of the latents), with the knob to turn. */
#include "train_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void sae__train_diag_free(sae_trainer *t)
{
    free(t->heldout_x);
    free(t->heldout_y);
    t->heldout_x = t->heldout_y = NULL;
    t->heldout_n = 0;
}

void sae__train_diag_reset(sae_trainer *t)
{
    t->metric[SAE_METRIC_HELDOUT_FVU] = NAN;
    t->metric[SAE_METRIC_HELDOUT_MSE] = NAN;
    t->metric[SAE_METRIC_HELDOUT_L0] = NAN;
    t->metric[SAE_METRIC_HELDOUT_STEP] = 0.0;
    t->metric[SAE_METRIC_WARNINGS] = 0.0;
    t->fvu_high_run = t->l0_high_run = 0;
    t->warning[0] = '\0';
}

/* Evaluates the held-out slice on the model as it stands. A failure (only SAE_ENOMEM, the tokens
 * having been checked when given) leaves the previous values: the step it follows succeeded. */
static void evaluate_heldout(sae_trainer *t)
{
    static const sae_eval_metric which[3] = {SAE_EVAL_FVU, SAE_EVAL_MSE, SAE_EVAL_L0};
    double v[3];
    const float *y = t->heldout_y != NULL ? t->heldout_y : t->heldout_x;
    if (sae_evaluate_to(t->m, t->heldout_x, y, t->heldout_n, which, 3, v) != SAE_OK)
        return;
    t->metric[SAE_METRIC_HELDOUT_FVU] = v[0];
    t->metric[SAE_METRIC_HELDOUT_MSE] = v[1];
    t->metric[SAE_METRIC_HELDOUT_L0] = v[2];
    t->metric[SAE_METRIC_HELDOUT_STEP] = (double)t->step;
}

int sae_trainer_set_heldout(sae_trainer *t, const float *x, const float *y, size_t n)
{
    SAE_CHECK_NULL(t);
    const sae_model *m = t->m;
    if (n == 0) {
        sae__train_diag_free(t);
        t->metric[SAE_METRIC_HELDOUT_FVU] = NAN;
        t->metric[SAE_METRIC_HELDOUT_MSE] = NAN;
        t->metric[SAE_METRIC_HELDOUT_L0] = NAN;
        t->metric[SAE_METRIC_HELDOUT_STEP] = 0.0;
        return SAE_OK;
    }
    SAE_CHECK_NULL(x);
    if (t->tc && y == NULL)
        return sae__fail(SAE_EINVAL, "sae_trainer_set_heldout: the model is a transcoder: give "
                         "the held-out targets y [n][%zu]", m->d_out);
    if (!t->tc && y != NULL)
        return sae__fail(SAE_EINVAL, "sae_trainer_set_heldout: the model is an SAE, whose "
                         "target is its input: pass y = NULL");
    int rc = sae__check_tokens(n, m->d_in > m->d_out ? m->d_in : m->d_out,
                               "sae_trainer_set_heldout");
    if (rc != SAE_OK)
        return rc;
    if ((rc = sae__check_finite(x, n * m->d_in, m->d_in, "x")) != SAE_OK ||
        (y != NULL && (rc = sae__check_finite(y, n * m->d_out, m->d_out, "y")) != SAE_OK))
        return rc;
    float *hx = sae__alloc(n * m->d_in, sizeof(float), "held-out tokens");
    float *hy = hx != NULL && y != NULL ? sae__alloc(n * m->d_out, sizeof(float),
                                                     "held-out targets") : NULL;
    if (hx == NULL || (y != NULL && hy == NULL)) {
        free(hx);
        return SAE_ENOMEM;
    }
    memcpy(hx, x, n * m->d_in * sizeof(float));
    if (y != NULL)
        memcpy(hy, y, n * m->d_out * sizeof(float));
    sae__train_diag_free(t);
    t->heldout_x = hx;
    t->heldout_y = hy;
    t->heldout_n = n;
    t->metric[SAE_METRIC_HELDOUT_FVU] = NAN;
    t->metric[SAE_METRIC_HELDOUT_MSE] = NAN;
    t->metric[SAE_METRIC_HELDOUT_L0] = NAN;
    t->metric[SAE_METRIC_HELDOUT_STEP] = 0.0;
    if (t->have_metrics)
        evaluate_heldout(t);
    return SAE_OK;
}

/* The step after which the warnings judge: the learning-rate and L1 warm-ups are over, and so
 * is the first quarter of the run (100 steps when its length is unknown), in which every recipe's
 * FVU and L0 are still falling from their starting values (JumpReLU's L0 the slowest: from half
 * the latents at init to 127 of 512 at step 90 of a default stories260K run, 24 at step 200). */
static double warmup_end(const sae_trainer *t)
{
    double total = t->param[SAE_TRAIN_TOTAL_STEPS];
    double w = total > 0.0 ? ceil(total / 4.0) : 100.0;
    double lr_warm = sae__train_param_value(t, SAE_TRAIN_WARMUP_STEPS);
    double l1_warm = t->sparse ? 0.0 : sae__train_param_value(t, SAE_TRAIN_L1_WARMUP_STEPS);
    return fmax(w, fmax(lr_warm, l1_warm));
}

/* The knob that makes each architecture's codes sparser. */
static const char *sparsity_knob(const sae_model *m)
{
    switch (m->arch) {
    case SAE_ARCH_RELU:
        return "raise the L1 coefficient (SAE_TRAIN_L1_COEFF, --l1-coeff) or the learning rate "
               "(SAE_TRAIN_LR, --lr), which lets the penalty act sooner";
    case SAE_ARCH_JUMPRELU:
        return "raise the L0 coefficient (SAE_TRAIN_L0_COEFF, --l0-coeff)";
    default: /* TopK, BatchTopK, Matryoshka: L0 is K */
        return "lower K (SAE_PARAM_K, --k)";
    }
}

static void compose_warning(sae_trainer *t, unsigned bits)
{
    const sae_model *m = t->m;
    char *w = t->warning;
    const size_t size = sizeof t->warning;
    w[0] = '\0';
    int used = 0;
    if (bits & SAE_TRAIN_WARN_FVU)
        used = snprintf(w, size, "FVU has stayed above 1 after warm-up (%.3g on the last "
                        "batch), worse than predicting the mean: raise the learning rate "
                        "(SAE_TRAIN_LR, --lr) or train longer (SAE_TRAIN_TOTAL_STEPS, --steps) "
                        "while the loss falls; lower the learning rate if it oscillates.",
                        t->metric[SAE_METRIC_FVU]);
    if ((bits & SAE_TRAIN_WARN_L0) && used >= 0 && (size_t)used < size)
        snprintf(w + used, size - (size_t)used, "%sL0 has stayed above a quarter of the %zu "
                 "latents after warm-up (%.1f on the last batch): %s.",
                 used > 0 ? " " : "", m->d_sae, t->metric[SAE_METRIC_L0], sparsity_knob(m));
}

void sae__train_diagnose(sae_trainer *t)
{
    const double total = t->param[SAE_TRAIN_TOTAL_STEPS];
    const double every = sae__train_param_value(t, SAE_TRAIN_HELDOUT_EVERY);
    const double step = (double)t->step;
    if (t->heldout_n > 0 &&
        ((every > 0.0 && fmod(step, every) == 0.0) || (total > 0.0 && step == total)))
        evaluate_heldout(t);

    /* A condition "stays" when it has held on every batch of the last tenth of the steps taken
     * (at least 10), so that a few bad batches raise nothing; a warning clears with the first
     * batch that no longer meets its condition. */
    const double fvu = t->metric[SAE_METRIC_FVU], l0 = t->metric[SAE_METRIC_L0];
    t->fvu_high_run = fvu > 1.0 ? t->fvu_high_run + 1 : 0; /* NaN (no variance): not high */
    t->l0_high_run = l0 > (double)t->m->d_sae / 4.0 ? t->l0_high_run + 1 : 0;
    const double window = fmax(10.0, floor(step / 10.0));
    unsigned bits = 0;
    if (step > warmup_end(t)) {
        if ((double)t->fvu_high_run >= window)
            bits |= SAE_TRAIN_WARN_FVU;
        if ((double)t->l0_high_run >= window)
            bits |= SAE_TRAIN_WARN_L0;
    }
    t->metric[SAE_METRIC_WARNINGS] = (double)bits;
    compose_warning(t, bits);
}

const char *sae_trainer_warning(const sae_trainer *t)
{
    return t != NULL && t->warning[0] != '\0' ? t->warning : NULL;
}
