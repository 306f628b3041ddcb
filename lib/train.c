/* Dictionary learning: ReLU (Anthropic, April 2024), TopK (OpenAI, 2024), BatchTopK, JumpReLU
 * (Rajamanoharan et al. 2024; its pass: train_jumprelu.c) and Matryoshka BatchTopK (Bussmann et
 * al. 2025; train_matryoshka.c) training of an SAE or a transcoder (sparsify's recipe) in place:
 * the trainer object, its parameters, data-aware initialization, the step and the data-parallel
 * hook (checkpoints: train_checkpoint.c).
 *
 * A step computes, on this process's tokens, the sums over tokens of the per-token loss's
 * gradient into one buffer (with the firing counts and metric sums), lets the caller sum that
 * buffer over processes, then divides by the global token count and takes the Adam step. Every
 * quantity that must agree across processes therefore travels in that buffer or derives from
 * state that already agrees (the weights, the counters, the previous step's sums). */
#include "train_internal.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const sae__train_param_info sae__train_params[N_PARAMS] = {
    [SAE_TRAIN_LR] = {"lr", K_POS, 0},
    [SAE_TRAIN_L1_COEFF] = {"l1_coeff", K_NONNEG, 0},
    [SAE_TRAIN_AUXK] = {"auxk", K_WHOLE, 0},
    [SAE_TRAIN_AUXK_COEFF] = {"auxk_coeff", K_NONNEG, 0},
    [SAE_TRAIN_DEAD_TOKENS] = {"dead_tokens", K_WHOLE_POS, 0},
    [SAE_TRAIN_WARMUP_STEPS] = {"warmup_steps", K_WHOLE, 0},
    [SAE_TRAIN_BETA1] = {"beta1", K_UNIT_OPEN, 0},
    [SAE_TRAIN_BETA2] = {"beta2", K_UNIT_OPEN, 0},
    [SAE_TRAIN_SEED] = {"seed", K_WHOLE, 0},
    [SAE_TRAIN_TOTAL_STEPS] = {"total_steps", K_WHOLE, 0},
    [SAE_TRAIN_L1_WARMUP_STEPS] = {"l1_warmup_steps", K_WHOLE, 0},
    [SAE_TRAIN_LR_DECAY_STEPS] = {"lr_decay_steps", K_WHOLE, 0},
    [SAE_TRAIN_GRAD_CLIP] = {"grad_clip", K_NONNEG, 0},
    [SAE_TRAIN_DECODER_INIT_NORM] = {"decoder_init_norm", K_POS, 0},
    [SAE_TRAIN_THRESHOLD_LR] = {"threshold_lr", K_UNIT, 0},
    [SAE_TRAIN_ADAM_EPS] = {"adam_eps", K_NONNEG, 0},
    [SAE_TRAIN_NORMALIZE_INPUT] = {"normalize_input", K_ENUM, 1},
    [SAE_TRAIN_B_DEC_INIT] = {"b_dec_init", K_ENUM, 2},
    [SAE_TRAIN_JUMPRELU_BANDWIDTH] = {"jumprelu_bandwidth", K_POS, 0},
    [SAE_TRAIN_JUMPRELU_INIT_THRESHOLD] = {"jumprelu_init_threshold", K_POS, 0},
    [SAE_TRAIN_L0_COEFF] = {"l0_coeff", K_NONNEG, 0},
    [SAE_TRAIN_HELDOUT_EVERY] = {"heldout_every", K_WHOLE, 0},
    [SAE_TRAIN_BF16] = {"bf16", K_RUN, 1},
};

/* Parameters whose setting does more than store the value: SAE_TRAIN_BF16 allocates its state.
 * Called with a validated value; the value is stored only if this succeeds. */
static int (*const param_apply[N_PARAMS])(sae_trainer *t, double v) = {
    [SAE_TRAIN_BF16] = sae__train_bf16_set,
};

const char *const sae__train_metric_names[N_METRICS] = {
    [SAE_METRIC_LOSS] = "loss",
    [SAE_METRIC_MSE] = "mse",
    [SAE_METRIC_FVU] = "fvu",
    [SAE_METRIC_L0] = "l0",
    [SAE_METRIC_DEAD_FRACTION] = "dead_fraction",
    [SAE_METRIC_STEPS] = "steps",
    [SAE_METRIC_TOKENS] = "tokens",
    [SAE_METRIC_AUXK_LOSS] = "auxk_loss",
    [SAE_METRIC_LR] = "lr",
    [SAE_METRIC_GRAD_NORM] = "grad_norm",
    [SAE_METRIC_SPARSITY_LOSS] = "sparsity_loss",
    [SAE_METRIC_THRESHOLD_MEAN] = "threshold_mean",
    [SAE_METRIC_PREFIX_FVU] = "prefix_fvu",
    [SAE_METRIC_HELDOUT_FVU] = "heldout_fvu",
    [SAE_METRIC_HELDOUT_MSE] = "heldout_mse",
    [SAE_METRIC_HELDOUT_L0] = "heldout_l0",
    [SAE_METRIC_HELDOUT_STEP] = "heldout_step",
    [SAE_METRIC_WARNINGS] = "warnings",
};

void sae__train_layout_of(const sae_model *m, sae__train_layout *l)
{
    /* Every product was checked not to overflow when the model was made. */
    l->W_enc = 0;
    l->W_dec = m->d_in * m->d_sae;
    l->b_enc = l->W_dec + m->d_sae * m->d_out;
    l->b_dec = l->b_enc + m->d_sae;
    l->W_skip = l->b_dec + m->d_out;
    l->log_th = l->W_skip + (m->skip ? m->d_in * m->d_out : 0);
    l->n_params = l->log_th + (m->arch == SAE_ARCH_JUMPRELU ? m->d_sae : 0);
    l->fires = l->n_params;
    l->stats = l->fires + m->d_sae;
    l->sum_dx = l->stats + SAE__STAT_COUNT;
    l->sum_err = l->sum_dx + m->d_out;
    l->count = l->sum_err + m->d_out;
}

/* ---- parameters ---------------------------------------------------------------------------- */

static bool is_sparse_arch(sae_arch a) { return a == SAE_ARCH_TOPK || a == SAE_ARCH_BATCHTOPK; }

/* The learning rate for a model of this width, for every recipe (docs/training.md, "Defaults for
 * the run"): Gao et al.'s 2e-4 / sqrt(d_sae / 2^14), fitted on GPT-2 small (d_in 768), times
 * 768 / d_in, muP's rule for Adam (Yang et al. 2022: a matrix's rate goes as 1 / fan-in, here
 * W_enc's d_in), and at most 0.1 / sqrt(d_in): one Adam step (about lr per element) stays under
 * a tenth of a unit-norm row's element size. */
static double width_lr(const sae_model *m)
{
    const double d_in = (double)m->d_in, d_sae = (double)m->d_sae;
    double lr = 2e-4 / sqrt(d_sae / 16384.0) * (768.0 / d_in);
    double cap = 0.1 / sqrt(d_in);
    return lr < cap ? lr : cap;
}

/* Each architecture's recipe defaults, over the common ones set_defaults put first. A new
 * architecture adds its case here (and its warning knob in train_diag.c). */
static void arch_defaults(sae_trainer *t, double *p)
{
    const sae_model *m = t->m;
    switch (m->arch) {
    case SAE_ARCH_RELU:
        /* Anthropic's lambda = 5 leaves about d_in / lambda^2 latents active (a latent pays for
         * itself when its coefficient, about sqrt(d_in / L0) on inputs of norm sqrt(d_in),
         * exceeds lambda): below d_in = 400 that is under 16, too sparse to reconstruct
         * (measured at d_in 64: L0 2, FVU 0.29); sqrt(d_in) / 4 keeps L0 near d_in / 16. */
        p[SAE_TRAIN_L1_COEFF] = fmin(5.0, sqrt((double)m->d_in) / 4.0);
        p[SAE_TRAIN_GRAD_CLIP] = 1.0;
        p[SAE_TRAIN_ADAM_EPS] = 1e-8;
        break;
    case SAE_ARCH_JUMPRELU:
        /* Rajamanoharan et al. 2024: Adam beta1 0, as dictionary_learning's JumpReluTrainer;
         * SAELens's JumpReLUTrainingSAEConfig for the bandwidth 0.05, initial threshold 0.01 and
         * L0 coefficient 1, in the units of activations scaled to mean norm sqrt(d_in), which
         * are libsae's. Their learning rate, 7e-5 for Gemma 2 (d_in 2304, 16k latents), is what
         * width_lr gives there (6.7e-5), so JumpReLU takes the width rule too. */
        p[SAE_TRAIN_BETA1] = 0.0;
        p[SAE_TRAIN_GRAD_CLIP] = 0.0;
        p[SAE_TRAIN_ADAM_EPS] = 1e-8;
        break;
    default: /* TopK, BatchTopK (and Matryoshka, a BatchTopK model) */
        p[SAE_TRAIN_GRAD_CLIP] = 0.0;
        p[SAE_TRAIN_ADAM_EPS] = 6.25e-10;
        /* Bussmann et al.'s code for BatchTopK and for Matryoshka (config.py of
         * bartbussmann/BatchTopK and /matryoshka_sae): Adam betas (0.9, 0.99). Its second moment
         * then follows the last ~100 steps instead of ~1000: within 6% of the best rate of the
         * sweep on planted features, 12% with 0.999 (docs/training.md, "The sweep"). */
        if (m->arch == SAE_ARCH_BATCHTOPK)
            p[SAE_TRAIN_BETA2] = 0.99;
        break;
    }
}

static void set_defaults(sae_trainer *t)
{
    double *p = t->param;
    /* Sources: docs/training.md. */
    p[SAE_TRAIN_LR] = width_lr(t->m);
    p[SAE_TRAIN_L1_COEFF] = 5.0;
    p[SAE_TRAIN_AUXK] = 256;
    p[SAE_TRAIN_AUXK_COEFF] = 1.0 / 32.0;
    p[SAE_TRAIN_DEAD_TOKENS] = 10e6;
    p[SAE_TRAIN_WARMUP_STEPS] = 0;
    p[SAE_TRAIN_BETA1] = 0.9;
    p[SAE_TRAIN_BETA2] = 0.999;
    p[SAE_TRAIN_SEED] = 0;
    p[SAE_TRAIN_TOTAL_STEPS] = 0;
    p[SAE_TRAIN_L1_WARMUP_STEPS] = 0;
    p[SAE_TRAIN_LR_DECAY_STEPS] = 0;
    p[SAE_TRAIN_DECODER_INIT_NORM] = 1.0; /* the contract: unit-norm rows after init */
    p[SAE_TRAIN_THRESHOLD_LR] = 0.01;
    p[SAE_TRAIN_NORMALIZE_INPUT] = 1;
    /* A transcoder's b_dec starts at y's mean (sparsify's trainer), an SAE's at the geometric
     * median (OpenAI's init_from_data_). */
    p[SAE_TRAIN_B_DEC_INIT] = t->tc ? 1 : 2;
    p[SAE_TRAIN_JUMPRELU_BANDWIDTH] = 0.05;
    p[SAE_TRAIN_JUMPRELU_INIT_THRESHOLD] = 0.01;
    p[SAE_TRAIN_L0_COEFF] = 1.0;
    p[SAE_TRAIN_HELDOUT_EVERY] = 0;
    p[SAE_TRAIN_BF16] = 0;
    arch_defaults(t, p);
    memset(t->param_set, 0, sizeof t->param_set);
}

bool sae__train_param_known(int p)
{
    return p >= SAE_TRAIN_LR && p < N_PARAMS && sae__train_params[p].name != NULL;
}

bool sae__train_param_derived(int p)
{
    return p == SAE_TRAIN_L1_WARMUP_STEPS || p == SAE_TRAIN_LR_DECAY_STEPS ||
           p == SAE_TRAIN_HELDOUT_EVERY;
}

/* The value in force: the schedule lengths follow TOTAL_STEPS until set explicitly. */
double sae__train_param_value(const sae_trainer *t, sae_train_param p)
{
    double total = t->param[SAE_TRAIN_TOTAL_STEPS];
    /* Twenty held-out evaluations a run: each costs about a third of a step per held-out token. */
    if (p == SAE_TRAIN_HELDOUT_EVERY && !t->param_set[p])
        return total > 0.0 ? fmax(1.0, floor(total / 20.0)) : 100.0;
    if (p == SAE_TRAIN_L1_WARMUP_STEPS && !t->param_set[p])
        return t->sparse ? 0.0 : floor(total / 20.0);
    /* The last fifth of the run: Anthropic's ReLU recipe, and dictionary_learning's TopK,
     * BatchTopK and Matryoshka trainers (decay from decay_start, 80% of the steps in its runs);
     * OpenAI's TopK and the JumpReLU recipe keep the rate constant, but on a run of libsae's
     * default length the decay brings TopK within 2% of the best rate a sweep finds on planted
     * features, 23% without it (docs/training.md). */
    if (p == SAE_TRAIN_LR_DECAY_STEPS && !t->param_set[p])
        return t->jump ? 0.0 : floor(total / 5.0);
    return t->param[p];
}

int sae__train_check_param(sae_train_param p, double v)
{
    if (!sae__train_param_known((int)p))
        return sae__fail(SAE_EINVAL, "unknown training parameter %d", (int)p);
    const char *name = sae__train_params[p].name;
    bool whole = v == floor(v) && v >= 0.0 && v <= WHOLE_MAX;
    switch (sae__train_params[p].kind) {
    case K_POS:
        if (!(v > 0.0) || !isfinite(v))
            return sae__fail(SAE_EINVAL, "training parameter %s must be finite and > 0, not %g",
                             name, v);
        break;
    case K_NONNEG:
        if (!(v >= 0.0) || !isfinite(v))
            return sae__fail(SAE_EINVAL, "training parameter %s must be finite and >= 0, not %g",
                             name, v);
        break;
    case K_WHOLE:
        if (!whole)
            return sae__fail(SAE_EINVAL,
                             "training parameter %s must be a whole number from 0 to 2^53, not %g",
                             name, v);
        return SAE_OK;
    case K_WHOLE_POS:
        if (!whole || v < 1.0)
            return sae__fail(SAE_EINVAL,
                             "training parameter %s must be a whole number from 1 to 2^53, not %g",
                             name, v);
        return SAE_OK;
    case K_UNIT_OPEN:
        if (!(v >= 0.0 && v < 1.0))
            return sae__fail(SAE_EINVAL, "training parameter %s must be in [0, 1), not %g", name,
                             v);
        break;
    case K_UNIT:
        if (!(v >= 0.0 && v <= 1.0))
            return sae__fail(SAE_EINVAL, "training parameter %s must be in [0, 1], not %g", name,
                             v);
        break;
    case K_ENUM:
    case K_RUN:
        if (!whole || v > sae__train_params[p].max)
            return sae__fail(SAE_EINVAL, "training parameter %s must be a whole number from 0 to "
                             "%g, not %g", name, sae__train_params[p].max, v);
        return SAE_OK;
    }
    /* Real-valued parameters reach the step's arithmetic as floats (Adam's step size, eps and
     * betas, the L1 coefficient): the value must survive that conversion, finite, 0 or normal,
     * and still in its range (1e300 would be an infinite learning rate, 1e-50 a zero one, a
     * beta2 of 0.99999999 exactly 1). */
    const param_kind kind = sae__train_params[p].kind;
    const double lo = kind == K_POS ? FLT_MIN : 0.0;
    const double hi = kind == K_UNIT_OPEN ? (double)nextafterf(1.0f, 0.0f)
                      : kind == K_UNIT    ? 1.0
                                          : FLT_MAX;
    char label[48];
    snprintf(label, sizeof label, "training parameter %s", name);
    float f;
    return sae__float_in_range(v, lo, hi, label, &f);
}

int sae_trainer_set_param(sae_trainer *t, sae_train_param p, double v)
{
    SAE_CHECK_NULL(t);
    int rc = sae__train_check_param(p, v);
    if (rc == SAE_OK && param_apply[p] != NULL)
        rc = param_apply[p](t, v);
    if (rc != SAE_OK)
        return rc;
    t->param[p] = v;
    t->param_set[p] = true;
    return SAE_OK;
}

int sae_trainer_get_param(const sae_trainer *t, sae_train_param p, double *v)
{
    SAE_CHECK_NULL(t);
    SAE_CHECK_NULL(v);
    if (!sae__train_param_known((int)p))
        return sae__fail(SAE_EINVAL, "unknown training parameter %d", (int)p);
    *v = sae__train_param_value(t, p);
    return SAE_OK;
}

int sae_trainer_get_metric(const sae_trainer *t, sae_train_metric which, double *v)
{
    SAE_CHECK_NULL(t);
    SAE_CHECK_NULL(v);
    if (which < SAE_METRIC_LOSS || which >= N_METRICS || sae__train_metric_names[which] == NULL)
        return sae__fail(SAE_EINVAL, "unknown training metric %d", (int)which);
    if (which == SAE_METRIC_STEPS) {
        *v = (double)t->step;
        return SAE_OK;
    }
    if (which == SAE_METRIC_TOKENS) {
        *v = (double)t->tokens;
        return SAE_OK;
    }
    if (sae__train_metric_is_diag((int)which)) { /* NaN or 0 until evaluated, never SAE_ESTATE */
        *v = t->metric[which];
        return SAE_OK;
    }
    if (!t->have_metrics)
        return sae__fail(SAE_ESTATE, "metric %s describes the last step's batch, and no step has "
                         "been taken since init", sae__train_metric_names[which]);
    *v = t->metric[which];
    return SAE_OK;
}

int sae_trainer_set_allreduce(sae_trainer *t, sae_allreduce_fn fn, void *user)
{
    SAE_CHECK_NULL(t);
    t->allreduce = fn;
    t->user = fn ? user : NULL;
    return SAE_OK;
}

/* ---- life cycle ---------------------------------------------------------------------------- */

static void free_scratch(sae_trainer *t)
{
    void *blocks[] = {t->xs,      t->xin,     t->err,     t->pre,     t->dense,
                      t->act_idx, t->act_val, t->act_ptr, t->aux_idx, t->aux_val,
                      t->aux_ptr};
    for (size_t i = 0; i < sizeof blocks / sizeof blocks[0]; i++)
        free(blocks[i]);
    t->xs = t->xin = t->err = t->pre = t->dense = t->act_val = t->aux_val = NULL;
    t->act_idx = t->aux_idx = NULL;
    t->act_ptr = t->aux_ptr = NULL;
    t->cap = t->act_cap = t->aux_cap = 0;
}

void sae_trainer_free(sae_trainer *t)
{
    if (t == NULL)
        return;
    free_scratch(t);
    free(t->buf);
    free(t->adam_m);
    free(t->adam_v);
    free(t->since_fired);
    free(t->gT);
    free(t->touched);
    free(t->heap);
    free(t->dead);
    free(t->dead_pre);
    free(t->tmp);
    free(t->colsum);
    sae__train_bf16_free(t->bf16);
    free(t->log_th);
    free(t->near_idx);
    free(t->near_ptr);
    free(t->near_val);
    free(t->lat_ptr);
    free(t->lat_tok);
    free(t->lat_val);
    free(t->group_end);
    free(t->mat_e);
    free(t->mat_s);
    sae__train_diag_free(t);
    free(t);
}

/* The trainer writes the model's float weights in place: a model switched to bfloat16 storage
 * (SAE_PARAM_BF16_WEIGHTS) has none until it is switched back. */
int sae__train_need_float_weights(const sae_trainer *t, const char *fn)
{
    if (t->m->W_enc16 != NULL)
        return sae__fail(SAE_ESTATE,
                         "%s: the model holds bfloat16 weights (SAE_PARAM_BF16_WEIGHTS = 1); "
                         "training needs float weights: set it to 0 first",
                         fn);
    return SAE_OK;
}

int sae_trainer_new(sae_trainer **out, sae_model *m)
{
    SAE_CHECK_NULL(out);
    *out = NULL;
    SAE_CHECK_NULL(m);
    if (m->arch != SAE_ARCH_RELU && m->arch != SAE_ARCH_JUMPRELU && !is_sparse_arch(m->arch))
        return sae__fail(SAE_EUNSUPPORTED, "training %s models is not supported (ReLU, TopK, "
                         "BatchTopK and JumpReLU train)", sae_arch_name(m->arch));
    if (m->normalize != SAE_NORMALIZE_NONE)
        return sae__fail(SAE_EUNSUPPORTED, "training a model with SAE_PARAM_NORMALIZE is not "
                         "supported (set it to SAE_NORMALIZE_NONE and let NORMALIZE_INPUT scale "
                         "the input)");
    sae_trainer *t = calloc(1, sizeof *t);
    if (t == NULL)
        return sae__fail(SAE_ENOMEM, "cannot allocate a trainer");
    t->m = m;
    t->sparse = is_sparse_arch(m->arch);
    t->tc = m->transcoder;
    t->jump = m->arch == SAE_ARCH_JUMPRELU;
    t->jump_sparse_below = 0.125; /* measured: tests/bench/bench_train, docs/training.md */
    t->jump_parallel_above = 33554432.0; /* 2^25: train_jumprelu.c */
    /* Unit-norm decoder rows for JumpReLU too, as Gemma Scope and dictionary_learning. */
    t->unit_dec = (t->sparse || t->jump) && !t->tc;
    t->out_scale = 1.0;
    sae__train_layout_of(m, &t->lay);
    set_defaults(t);
    sae__train_diag_reset(t);
    const size_t d_sae = m->d_sae, d_in = m->d_in, wide = d_in > m->d_out ? d_in : m->d_out;
    t->buf = sae__alloc(t->lay.count, sizeof(float), "training buffer");
    t->adam_m = t->buf ? sae__zalloc(t->lay.n_params, sizeof(float), "Adam moments") : NULL;
    t->adam_v = t->adam_m ? sae__zalloc(t->lay.n_params, sizeof(float), "Adam moments") : NULL;
    t->since_fired = t->adam_v ? sae__zalloc(d_sae, sizeof(uint64_t), "dead counters") : NULL;
    t->tmp = t->since_fired ? sae__alloc(wide, sizeof(float), "training scratch") : NULL;
    if (t->tmp && t->sparse) {
        t->gT = sae__zalloc(d_sae * d_in, sizeof(float), "encoder gradient");
        t->touched = t->gT ? sae__zalloc(d_sae, 1, "training scratch") : NULL;
        t->heap = t->touched ? sae__alloc(d_sae, sizeof *t->heap, "top-k heap") : NULL;
        t->dead = t->heap ? sae__alloc(d_sae, sizeof *t->dead, "dead latents") : NULL;
        t->dead_pre = t->dead ? sae__alloc(d_sae, sizeof(float), "dead latents") : NULL;
        if (t->dead_pre == NULL) {
            sae_trainer_free(t);
            return SAE_ENOMEM;
        }
    }
    if (t->tmp && !t->sparse)
        t->colsum = sae__alloc(d_sae, sizeof(double), "training scratch");
    bool extra = true;
    if (t->jump) { /* gT: the per-latent path's encoder gradient */
        t->log_th = sae__zalloc(d_sae, sizeof(float), "log-thresholds");
        t->gT = t->log_th ? sae__zalloc(d_sae * d_in, sizeof(float), "encoder gradient") : NULL;
        extra = t->gT != NULL;
    }
    if (m->arch == SAE_ARCH_BATCHTOPK) {
        t->mat_e = sae__alloc(m->d_out, sizeof(float), "training scratch");
        t->mat_s = t->mat_e ? sae__alloc(m->d_out, sizeof(float), "training scratch") : NULL;
        extra = t->mat_s != NULL;
    }
    if (t->tmp == NULL || (!t->sparse && t->colsum == NULL) || !extra) {
        sae_trainer_free(t);
        return SAE_ENOMEM;
    }
    *out = t;
    return SAE_OK;
}

/* Scratch for a batch of n tokens (all allocated at once so a failure leaves the old scratch). */
static int ensure_scratch(sae_trainer *t, size_t n)
{
    const sae_model *m = t->m;
    const size_t d_in = m->d_in, d_sae = m->d_sae, d_out = m->d_out;
    /* xs doubles as the AuxK residual [n][d_out] once the encoder input is in xin. */
    const size_t wide = d_in > d_out ? d_in : d_out;
    size_t k = m->k < d_sae ? m->k : d_sae;
    size_t auxk = (size_t)t->param[SAE_TRAIN_AUXK];
    if (auxk > d_sae)
        auxk = d_sae;
    size_t act = 0, aux = 0;
    if (t->sparse) {
        /* BatchTopK keeps k * n over the batch: no token has more than d_sae. */
        if (!sae__mul(n, k, &act))
            return sae__fail(SAE_EINVAL, "n = %zu tokens is too many", n);
        if (!sae__mul(n, auxk, &aux))
            return sae__fail(SAE_EINVAL, "n = %zu tokens is too many", n);
    }
    if (n <= t->cap && act <= t->act_cap && aux <= t->aux_cap)
        return SAE_OK;
    /* A step's scratch: [n][d_sae] twice and [n][wide] four times (widths fit an int each). */
    int rc = sae__check_tokens(n, 2 * d_sae + 4 * wide, "sae_trainer_step");
    if (rc != SAE_OK)
        return rc;
    sae_trainer s = {0};
    s.xs = sae__alloc(n * wide, sizeof(float), "training scratch");
    s.xin = sae__alloc(n * d_in, sizeof(float), "training scratch");
    s.err = sae__alloc(n * d_out, sizeof(float), "training scratch");
    s.pre = sae__alloc(n * d_sae, sizeof(float), "training scratch");
    bool ok = s.xs && s.xin && s.err && s.pre;
    if (ok) /* ReLU's dL/dpre, BatchTopK's selection, the dense AuxK codes */
        ok = (s.dense = sae__alloc(n * d_sae, sizeof(float), "training scratch")) != NULL;
    if (ok && t->sparse) {
        s.act_idx = sae__alloc(act, sizeof(uint32_t), "active latents");
        s.act_val = sae__alloc(act, sizeof(float), "active latents");
        s.act_ptr = sae__alloc(n + 1, sizeof(size_t), "active latents");
        s.aux_idx = sae__alloc(aux, sizeof(uint32_t), "AuxK latents");
        s.aux_val = sae__alloc(aux, sizeof(float), "AuxK latents");
        s.aux_ptr = sae__alloc(n + 1, sizeof(size_t), "AuxK latents");
        ok = s.act_idx && s.act_val && s.act_ptr && s.aux_idx && s.aux_val && s.aux_ptr;
    }
    if (!ok) {
        free_scratch(&s);
        return SAE_ENOMEM;
    }
    free_scratch(t);
    t->xs = s.xs, t->xin = s.xin, t->err = s.err, t->pre = s.pre, t->dense = s.dense;
    t->act_idx = s.act_idx, t->act_val = s.act_val, t->act_ptr = s.act_ptr;
    t->aux_idx = s.aux_idx, t->aux_val = s.aux_val, t->aux_ptr = s.aux_ptr;
    t->cap = n, t->act_cap = act, t->aux_cap = aux;
    return SAE_OK;
}

/* ---- initialization ------------------------------------------------------------------------ */

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* A standard normal by Box-Muller: the same numbers on every machine with IEEE doubles. */
static double normal(uint64_t *s)
{
    double u1 = ((double)(splitmix64(s) >> 11) + 1.0) * 0x1.0p-53;
    double u2 = (double)(splitmix64(s) >> 11) * 0x1.0p-53;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* The geometric median of n points xs [n][d] (minimizer of the summed distances) by Weiszfeld's
 * iteration from the mean, as the geom_median package OpenAI's init_from_data_ calls: weights
 * 1/max(distance, 1e-8), at most 100 iterations, stopping when the objective improves by less
 * than a relative 1e-7. In double: the objective is a sum of n terms. */
static int geometric_median(const float *xs, size_t n, size_t d, double *y)
{
    double *num = sae__alloc(d, sizeof(double), "geometric median");
    if (num == NULL)
        return SAE_ENOMEM;
    double prev = INFINITY;
    for (int it = 0; it < 100; it++) {
        double den = 0.0, obj = 0.0;
        memset(num, 0, d * sizeof(double));
        for (size_t t = 0; t < n; t++) {
            const float *row = xs + t * d;
            double dist = 0.0;
            for (size_t j = 0; j < d; j++)
                dist += ((double)row[j] - y[j]) * ((double)row[j] - y[j]);
            dist = sqrt(dist);
            obj += dist;
            double w = 1.0 / (dist > 1e-8 ? dist : 1e-8);
            den += w;
            for (size_t j = 0; j < d; j++)
                num[j] += w * row[j];
        }
        if (prev - obj <= 1e-7 * obj)
            break;
        prev = obj;
        for (size_t j = 0; j < d; j++)
            y[j] = num[j] / den;
    }
    free(num);
    return SAE_OK;
}

static void reset_state(sae_trainer *t)
{
    t->step = t->tokens = 0;
    t->theta = 0.0;
    t->have_metrics = false;
    memset(t->metric, 0, sizeof t->metric);
    sae__train_diag_reset(t);
    memset(t->adam_m, 0, t->lay.n_params * sizeof(float));
    memset(t->adam_v, 0, t->lay.n_params * sizeof(float));
    memset(t->since_fired, 0, t->m->d_sae * sizeof(uint64_t));
}

/* Anthropic's (and SAELens' expected_average_only_in) normalization: the scale that makes the
 * sample's mean norm sqrt(d), kept only when usable as a float scale (a normal float: a sample of
 * norms near FLT_MAX would give a subnormal one, which sae_model_set_param refuses). */
static double norm_scale(const float *v, size_t n, size_t d, double fallback)
{
    double norms = 0.0;
    for (size_t i = 0; i < n; i++)
        norms += sae__snrm2(d, v + i * d);
    norms /= (double)n;
    double s = norms > 0.0 ? sqrt((double)d) / norms : 1.0;
    return isnormal((float)s) ? s : fallback;
}

/* Per-coordinate mean of scale * v [n][d] into mean, and the mean per-token squared deviation. */
static double mean_and_var(const float *v, size_t n, size_t d, float scale, double *mean)
{
    for (size_t j = 0; j < d; j++)
        mean[j] = 0.0;
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < d; j++)
            mean[j] += scale * v[i * d + j];
    for (size_t j = 0; j < d; j++)
        mean[j] /= (double)n;
    double var = 0.0;
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < d; j++) {
            double dv = (double)(scale * v[i * d + j]) - mean[j];
            var += dv * dv;
        }
    return var / (double)n;
}

/* Whether y holds the same values as x [n][d] (an SAE's target). */
static bool same_values(const float *x, const float *y, size_t count)
{
    return x == y || memcmp(x, y, count * sizeof(float)) == 0;
}

/* Checks a batch's arguments for init and step: x [n][d_in], and y [n][d_out] for a transcoder
 * or an SAE's y = x (y NULL: the SAE entry points, which a transcoder cannot use). */
static int check_pair(const sae_trainer *t, const float *x, const float *y, size_t n, bool to,
                      const char *fn)
{
    const sae_model *m = t->m;
    /* sparsify's skip-connection SAE (a transcoder with d_out = d_in subtracting b_dec from its
     * input) has no recipe in sparsify's trainer or SAELens': its encoder input and skip would
     * both move with b_dec. */
    if (t->tc && m->apply_b_dec)
        return sae__fail(SAE_EUNSUPPORTED, "%s: training a transcoder with "
                         "APPLY_B_DEC_TO_INPUT = 1 is not supported (set it to 0)", fn);
    if (!to && t->tc)
        return sae__fail(SAE_EINVAL, "%s: the model is a transcoder, which learns y from x: "
                         "call %s_to with its target y [n][%zu]", fn, fn, m->d_out);
    SAE_CHECK_NULL(x);
    if (to)
        SAE_CHECK_NULL(y);
    int rc = sae__check_finite(x, n * m->d_in, m->d_in, "x");
    if (rc != SAE_OK)
        return rc;
    if (to && t->tc)
        return sae__check_finite(y, n * m->d_out, m->d_out, "y");
    if (to && !same_values(x, y, n * m->d_in))
        return sae__fail(SAE_EINVAL, "%s_to: the model is an SAE, whose target is its input: y "
                         "must hold x (make a transcoder with sae_model_new_transcoder to learn "
                         "another target)", fn);
    return SAE_OK;
}

static int init_pair(sae_trainer *t, const float *x, const float *y, size_t n, bool to,
                     const char *fn)
{
    SAE_CHECK_NULL(t);
    if (n == 0)
        return sae__fail(SAE_EINVAL, "%s: the sample is empty (n = 0)", fn);
    int rc = sae__train_need_float_weights(t, fn);
    if (rc != SAE_OK)
        return rc;
    sae_model *m = t->m;
    const size_t d_in = m->d_in, d_sae = m->d_sae, d_out = m->d_out;
    if ((rc = sae__check_tokens(n, d_in > d_out ? d_in : d_out, fn)) != SAE_OK)
        return rc;
    if ((rc = check_pair(t, x, y, n, to, fn)) != SAE_OK)
        return rc;
    float *xs = sae__alloc(n * d_in, sizeof(float), "init sample");
    double *mean = sae__zalloc(d_in > d_out ? d_in : d_out, sizeof(double), "init sample");
    float *dir = sae__alloc(d_in, sizeof(float), "init scratch");
    double *mx = sae__alloc(d_in, sizeof(double), "init sample");
    if (xs == NULL || mean == NULL || dir == NULL || mx == NULL) {
        free(xs);
        free(mean);
        free(dir);
        free(mx);
        return SAE_ENOMEM;
    }

    const bool normalize = t->param[SAE_TRAIN_NORMALIZE_INPUT] != 0.0;
    float fscale = (float)(normalize ? norm_scale(x, n, d_in, m->input_scale) : m->input_scale);
    for (size_t i = 0; i < n * d_in; i++)
        xs[i] = fscale * x[i];
    /* The target's scale and statistics: an SAE's is xs, a transcoder's c y. */
    const double c = t->tc && normalize ? norm_scale(y, n, d_out, 1.0) : 1.0;
    const float *target = t->tc ? y : xs;
    /* TopK's MSE normalizer: OpenAI's mse_scale = 1 / mean((x - mean x)^2), per token here (for
     * a transcoder sparsify's FVU denominator, the variance of y, in c y's units). b_dec is in
     * the target's own units: y's mean or median, unscaled. */
    const double var = mean_and_var(target, n, d_out, 1.0f, mean) * c * c;
    if (t->tc)
        (void)mean_and_var(xs, n, d_in, 1.0f, mx);
    int how = (int)t->param[SAE_TRAIN_B_DEC_INIT];
    if (how == 2 && (rc = geometric_median(target, n, d_out, mean)) != SAE_OK) {
        free(xs);
        free(mean);
        free(dir);
        free(mx);
        return rc;
    }
    /* Nothing has changed until here; from here on nothing fails. */
    m->input_scale = fscale;
    for (size_t j = 0; j < d_out; j++)
        m->b_dec[j] = how == 0 ? 0.0f : (float)mean[j];
    uint64_t seed = (uint64_t)t->param[SAE_TRAIN_SEED];
    const double norm = t->param[SAE_TRAIN_DECODER_INIT_NORM];
    for (size_t i = 0; i < d_sae; i++) {
        double ss;
        do {
            ss = 0.0;
            for (size_t j = 0; j < d_in; j++) {
                double g = normal(&seed);
                dir[j] = (float)g;
                ss += g * g;
            }
        } while (ss == 0.0);
        float f = (float)(norm / sqrt(ss));
        for (size_t j = 0; j < d_in; j++)
            m->W_enc[j * d_sae + i] = f * dir[j];
        if (!t->tc)
            for (size_t j = 0; j < d_in; j++)
                m->W_dec[i * d_in + j] = f * dir[j];
        m->b_enc[i] = 0.0f;
    }
    if (t->tc) {
        /* sparsify's transcoder init: W_dec and W_skip zero (SAELens's SkipTranscoder starts
         * W_skip at zero too), and b_enc = -mean(x_s) @ W_enc, which centres the
         * pre-activations as an SAE's subtraction of b_dec would. */
        memset(m->W_dec, 0, d_sae * d_out * sizeof(float));
        if (m->skip)
            memset(m->W_skip, 0, d_in * d_out * sizeof(float));
        for (size_t j = 0; j < d_in; j++)
            sae__saxpy(d_sae, (float)-mx[j], m->W_enc + j * d_sae, m->b_enc);
    }
    sae__model_weights_changed(m);
    if (m->arch == SAE_ARCH_BATCHTOPK)
        m->batch_threshold = 0.0f;
    if (t->jump)
        sae__jumprelu_init(t);
    t->out_scale = c;
    t->mse_norm = var > 0.0 ? var : 1.0;
    t->aux_norm = t->mse_norm;
    reset_state(t);
    t->initialized = true;
    free(xs);
    free(mean);
    free(dir);
    free(mx);
    return SAE_OK;
}

int sae_trainer_init(sae_trainer *t, const float *x, size_t n)
{
    return init_pair(t, x, NULL, n, false, "sae_trainer_init");
}

int sae_trainer_init_to(sae_trainer *t, const float *x, const float *y, size_t n)
{
    return init_pair(t, x, y, n, true, "sae_trainer_init");
}

/* ---- the forward and backward passes ------------------------------------------------------- */

/* One token's xs = s x and xin = xs - a b_dec. The restrict-qualified arguments and the fixed
 * inner count let -O2 vectorize it (through t-> it could not tell the rows from the model). */
static void scale_row(const float *restrict x, const float *restrict b_dec, float *restrict xs,
                      float *restrict xin, size_t count, float s, float a)
{
    size_t j = 0;
    for (; j + 8 <= count; j += 8)
        for (size_t q = 0; q < 8; q++) {
            const float v = s * x[j + q];
            xs[j + q] = v;
            xin[j + q] = v - a * b_dec[j + q];
        }
    for (; j < count; j++) {
        const float v = s * x[j];
        xs[j] = v;
        xin[j] = v - a * b_dec[j];
    }
}

void sae__train_encode_rows(sae_trainer *t, size_t i0, size_t rows)
{
    const sae_model *m = t->m;
    const size_t d_in = m->d_in, d_sae = m->d_sae;
    for (size_t r = 0; r < rows; r++)
        memcpy(t->pre + r * d_sae, m->b_enc, d_sae * sizeof(float));
    sae__sgemm(false, false, rows, d_sae, d_in, 1.0f, t->xin + i0 * d_in, d_in, m->W_enc, d_sae,
               1.0f, t->pre, d_sae);
}

/* xs = scale * x; xin = xs - apply * b_dec (the encoder's input); pre = xin @ W_enc + b_enc
 * (JumpReLU's pass encodes itself, a block of tokens at a time: train_jumprelu.c). */
static void encode_batch(sae_trainer *t, const float *x, size_t n)
{
    const sae_model *m = t->m;
    const size_t d_in = m->d_in;
    const float s = m->input_scale, a = m->apply_b_dec ? 1.0f : 0.0f;
    for (size_t i = 0; i < n; i++)
        scale_row(x + i * d_in, m->b_dec, t->xs + i * d_in, t->xin + i * d_in, d_in, s, a);
    if (!t->jump)
        sae__train_encode_rows(t, 0, n);
}

/* Statistics every architecture reports: sums of c (tgt - b_dec) and its square, for the FVU
 * (tgt is x_s for an SAE, c = 1; y for a transcoder). */
static void input_stats(sae_trainer *t, const float *tgt, size_t n)
{
    const sae_model *m = t->m;
    const size_t d_out = m->d_out;
    const float c = (float)t->out_scale;
    float *sum_dx = t->buf + t->lay.sum_dx;
    double xx = 0.0;
    for (size_t i = 0; i < n; i++) {
        for (size_t j = 0; j < d_out; j++) {
            float d = tgt[i * d_out + j] - m->b_dec[j];
            if (t->tc)
                d *= c;
            sum_dx[j] += d;
            xx += (double)d * d;
        }
    }
    t->buf[t->lay.stats + SAE__STAT_XX] = (float)xx;
    t->buf[t->lay.stats + SAE__STAT_TOKENS] = (float)n;
}

/* The part of the error E = y_hat - tgt the codes do not make: b_dec - tgt, plus a transcoder's
 * skip term x @ W_skip (raw x, as the model computes it). */
void sae__train_error_base(sae_trainer *t, const float *x, const float *tgt, size_t n)
{
    const sae_model *m = t->m;
    const size_t d_in = m->d_in, d_out = m->d_out;
    float *E = t->err;
    if (m->skip) {
        sae__sgemm(false, false, n, d_out, d_in, 1.0f, x, d_in, m->W_skip, d_out, 0.0f, E, d_out);
        for (size_t i = 0; i < n; i++)
            for (size_t j = 0; j < d_out; j++)
                E[i * d_out + j] += m->b_dec[j] - tgt[i * d_out + j];
        return;
    }
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < d_out; j++)
            E[i * d_out + j] = m->b_dec[j] - tgt[i * d_out + j];
}

/* W_skip's gradient: x_s^T @ G, with G [n][d_out] the gradient with respect to the normalized
 * output (W_skip' maps x_s to it; the encoder input xin is x_s for a transcoder). */
void sae__train_skip_gradient(sae_trainer *t, const float *G, size_t n)
{
    const sae_model *m = t->m;
    if (m->skip)
        sae__sgemm(true, false, m->d_in, m->d_out, n, 1.0f, t->xin, m->d_in, G, m->d_out, 0.0f,
                   t->buf + t->lay.W_skip, m->d_out);
}

/* ReLU: dense, every matrix product one SGEMM. Per token the loss is
 * ||x_hat_s - x_s||^2 + lambda * sum_i f_i ||W_dec[i]||; a transcoder's is the same in its
 * normalized units, ||c (y_hat - y)||^2 + lambda * sum_i f_i ||c W_dec[i]||. */
/* ReLU's passes over the [n][d_sae] codes run over threads by ranges of latents, each latent's
 * sums over the tokens in token order (the same sums as one thread makes). */
typedef struct {
    sae_trainer *t;
    float *f, *G;
    size_t n;
    float c, lam;
    double *l0; /* [chunks] */
} relu_job;

/* f = relu(pre) and its sums: L0, per-latent sums and firing counts. */
static void relu_codes_range(void *ctx, size_t k0, size_t k1, size_t worker)
{
    relu_job *j = ctx;
    sae_trainer *t = j->t;
    const size_t d_sae = t->m->d_sae;
    float *fires = t->buf + t->lay.fires;
    double *colsum = t->colsum, l0 = 0.0;
    for (size_t k = k0; k < k1; k++)
        colsum[k] = 0.0;
    for (size_t i = 0; i < j->n; i++) {
        float *fr = j->f + i * d_sae;
        for (size_t k = k0; k < k1; k++)
            fr[k] = fr[k] > 0.0f ? fr[k] : 0.0f;
        for (size_t k = k0; k < k1; k++) {
            if (fr[k] > 0.0f) {
                colsum[k] += fr[k];
                l0 += 1.0;
                fires[k] += 1.0f;
            }
        }
    }
    j->l0[worker] = l0;
}

/* G = dL/df masked by f > 0 into dL/dpre, with the L1 term; b_enc's gradient sums it. */
static void relu_grad_range(void *ctx, size_t k0, size_t k1, size_t worker)
{
    (void)worker;
    relu_job *j = ctx;
    sae_trainer *t = j->t;
    const size_t d_sae = t->m->d_sae;
    const float *dec_norm = t->m->dec_norm;
    float *g_benc = t->buf + t->lay.b_enc;
    for (size_t i = 0; i < j->n; i++) {
        float *gr = j->G + i * d_sae;
        const float *fr = j->f + i * d_sae;
        for (size_t k = k0; k < k1; k++) {
            gr[k] = fr[k] > 0.0f ? gr[k] + j->lam * dec_norm[k] : 0.0f;
            g_benc[k] += gr[k];
        }
    }
}

static void relu_pass(sae_trainer *t, const float *x, const float *tgt, size_t n, double lambda)
{
    sae_model *m = t->m;
    const size_t d_in = m->d_out, d_sae = m->d_sae; /* the output's width: d_in for an SAE */
    const float c = (float)t->out_scale;
    float *buf = t->buf, *f = t->pre, *E = t->err, *G = t->dense;
    const sae__train_layout *L = &t->lay;
    const size_t threads = sae__model_threads(m), grain = sae__grain(n);
    const size_t chunks = sae__parallel_chunks(threads, d_sae, grain);
    double l0s[64] = {0}; /* sae__parallel_chunks makes at most 64 */
    relu_job job = {t, f, G, n, c, (float)lambda * c, l0s};
    sae__parallel_for(threads, d_sae, grain, relu_codes_range, &job);
    double sse = 0.0, l1 = 0.0, l0 = 0.0;
    for (size_t w = 0; w < chunks; w++)
        l0 += l0s[w]; /* whole numbers: exact in any order */
    /* The L1 sum by latent, sum_k ||W_dec'[k]|| sum_t f_tk: the same whatever the threads. */
    for (size_t k = 0; k < d_sae; k++)
        l1 += t->colsum[k] * m->dec_norm[k] * c;
    /* E = c (f @ W_dec + b_dec [+ x @ W_skip] - tgt) */
    sae__train_error_base(t, x, tgt, n);
    sae__sgemm(false, false, n, d_in, d_sae, 1.0f, f, d_sae, m->W_dec, d_in, 1.0f, E, d_in);
    if (t->tc)
        sae__sscal(n * d_in, c, E);
    float *sum_err = buf + L->sum_err;
    const double *colsum = t->colsum;
    for (size_t i = 0; i < n; i++) {
        for (size_t j = 0; j < d_in; j++) {
            float e = E[i * d_in + j];
            sse += (double)e * e;
            sum_err[j] += e;
        }
    }
    /* dL/dx_hat = 2 E */
    sae__sscal(n * d_in, 2.0f, E);
    /* G = dL/df = 2E @ W_dec'^T + lambda * ||W_dec'[i]||, masked by f > 0 into dL/dpre */
    sae__sgemm(false, true, n, d_sae, d_in, c, E, d_in, m->W_dec, d_in, 0.0f, G, d_sae);
    sae__parallel_for(threads, d_sae, grain, relu_grad_range, &job);
    float *g_bdec = buf + L->b_dec;
    for (size_t i = 0; i < n; i++) {
        for (size_t j = 0; j < d_in; j++)
            g_bdec[j] += E[i * d_in + j];
    }
    /* dW_dec' = f^T @ 2E + lambda * (sum_t f_ti) * W_dec[i] / ||W_dec[i]|| (the same direction
     * in either units) */
    sae__sgemm(true, false, d_sae, d_in, n, 1.0f, f, d_sae, E, d_in, 0.0f, buf + L->W_dec, d_in);
    if (lambda != 0.0) {
        for (size_t k = 0; k < d_sae; k++) {
            if (colsum[k] == 0.0 || m->dec_norm[k] == 0.0f)
                continue;
            sae__saxpy(d_in, (float)(lambda * colsum[k] / m->dec_norm[k]), m->W_dec + k * d_in,
                       buf + L->W_dec + k * d_in);
        }
    }
    /* dW_enc = xin^T @ G */
    sae__sgemm(true, false, m->d_in, d_sae, n, 1.0f, t->xin, m->d_in, G, d_sae, 0.0f,
               buf + L->W_enc, d_sae);
    sae__train_skip_gradient(t, E, n);
    float *st = buf + L->stats;
    st[SAE__STAT_SSE] = (float)sse;
    st[SAE__STAT_LOSS] = (float)(sse + lambda * l1);
    st[SAE__STAT_L0] = (float)l0;
}

/* TopK: per token the K largest pre-activations (ties: lower index), kept when positive. */
static void select_topk(sae_trainer *t, size_t n)
{
    const size_t d_sae = t->m->d_sae;
    const size_t k = t->m->k < d_sae ? t->m->k : d_sae;
    size_t used = 0;
    for (size_t i = 0; i < n; i++) {
        t->act_ptr[i] = used;
        size_t kept = sae__topk_select(t->pre + i * d_sae, d_sae, k, t->heap);
        for (size_t j = 0; j < kept && t->heap[j].value > 0.0f; j++) {
            t->act_idx[used] = t->heap[j].index;
            t->act_val[used++] = t->heap[j].value;
        }
    }
    t->act_ptr[n] = used;
}

/* AuxK: per token the AUXK largest pre-activations among the dead latents, kept when positive
 * (OpenAI: relu(topk(pre masked to dead latents))). */
static void select_auxk(sae_trainer *t, size_t n, size_t n_dead, size_t auxk)
{
    const size_t d_sae = t->m->d_sae;
    size_t used = 0;
    for (size_t i = 0; i < n; i++) {
        t->aux_ptr[i] = used;
        const float *row = t->pre + i * d_sae;
        if (auxk >= n_dead) { /* every dead latent is in: no selection, no sort */
            for (size_t j = 0; j < n_dead; j++) {
                if (row[t->dead[j]] > 0.0f) {
                    t->aux_idx[used] = t->dead[j];
                    t->aux_val[used++] = row[t->dead[j]];
                }
            }
            continue;
        }
        for (size_t j = 0; j < n_dead; j++)
            t->dead_pre[j] = row[t->dead[j]];
        size_t kept = sae__topk_select(t->dead_pre, n_dead, auxk, t->heap);
        for (size_t j = 0; j < kept && t->heap[j].value > 0.0f; j++) {
            t->aux_idx[used] = t->dead[t->heap[j].index];
            t->aux_val[used++] = t->heap[j].value;
        }
    }
    t->aux_ptr[n] = used;
}

/* Adds one latent's share of a token's gradient: the decoder row gets f * g, and the latent's
 * pre-activation gets dpre = g . W_dec[j] (the activation is positive, so its ReLU passes it),
 * which goes to b_enc and, as dpre * xin, to the encoder column (kept transposed in gT). */
void sae__train_backprop_latent(sae_trainer *t, uint32_t j, float f, const float *g,
                                const float *xin)
{
    const size_t d_in = t->m->d_in, d_out = t->m->d_out;
    const float *w = t->m->W_dec + (size_t)j * d_out;
    sae__axpy(d_out, f, g, t->buf + t->lay.W_dec + (size_t)j * d_out);
    float dpre = sae__dot(d_out, g, w);
    if (t->tc) /* g . W_dec'[j] = c g . W_dec[j] */
        dpre *= (float)t->out_scale;
    t->buf[t->lay.b_enc + j] += dpre;
    float *col = t->gT + (size_t)j * d_in;
    if (t->touched[j]) {
        sae__axpy(d_in, dpre, xin, col);
    } else {
        /* The column's first share is stored, not added: gT is not kept zeroed between steps
         * (a pass of its own at large batches). 0 + keeps the sums' rounding of -0. */
        for (size_t r = 0; r < d_in; r++)
            col[r] = 0.0f + dpre * xin[r];
        t->touched[j] = 1;
    }
}

/* Moving the encoder gradient from gT [d_sae][d_in] into W_enc's layout [d_in][d_sae], whole (zeros
 * where no column was touched): one write of the section instead of zeroing it at the start of
 * the step and then writing a column at a time, which misses the cache and the TLB on every
 * element. Tiles of UNT_J latents by UNT_R rows keep the gT lines (one per latent) and the pages
 * of both layouts a tile touches in cache and TLB; blocks of latents split over the threads. */
enum { UNT_J = 256, UNT_R = 16 };

typedef struct {
    sae_trainer *t;
    float *g_enc;
} untranspose_job;

static void untranspose_range(void *ctx, size_t b0, size_t b1, size_t worker)
{
    (void)worker;
    const untranspose_job *job = ctx;
    const size_t d_in = job->t->m->d_in, d_sae = job->t->m->d_sae;
    const float *gT = job->t->gT;
    const unsigned char *touched = job->t->touched;
    const size_t j0 = b0 * UNT_J, j1 = b1 * UNT_J < d_sae ? b1 * UNT_J : d_sae;
    for (size_t jb = j0; jb < j1; jb += UNT_J) {
        const size_t je = j1 - jb < UNT_J ? j1 : jb + UNT_J;
        for (size_t r0 = 0; r0 < d_in; r0 += UNT_R) {
            const size_t r1 = d_in - r0 < UNT_R ? d_in : r0 + UNT_R;
            for (size_t r = r0; r < r1; r++) {
                float *row = job->g_enc + r * d_sae;
                for (size_t j = jb; j < je; j++)
                    row[j] = touched == NULL || touched[j] ? gT[j * d_in + r] : 0.0f;
            }
        }
    }
}

void sae__train_untranspose(sae_trainer *t, float *g_enc)
{
    const size_t d_in = t->m->d_in, d_sae = t->m->d_sae;
    untranspose_job job = {t, g_enc};
    sae__parallel_for(sae__model_threads(t->m), (d_sae + UNT_J - 1) / UNT_J,
                      sae__grain(UNT_J * d_in), untranspose_range, &job);
    if (t->touched != NULL)
        memset(t->touched, 0, d_sae);
    else
        memset(t->gT, 0, d_sae * d_in * sizeof(float));
}

/* TopK and BatchTopK: only the active (and AuxK) latents' rows and columns get gradients. Per
 * token the loss is ||e||^2 / v + AUXK_COEFF * ||e_aux + e||^2 / v_aux, with e = x_hat_s - x_s
 * and e_aux the dead latents' reconstruction (their target is the residual -e, held fixed). */
static void sparse_pass(sae_trainer *t, const float *x, const float *tgt, size_t n)
{
    sae_model *m = t->m;
    const size_t d_in = m->d_in, d_out = m->d_out, d_sae = m->d_sae;
    /* A transcoder's codes reach its normalized output through W_dec' = c W_dec. */
    const float c = (float)t->out_scale;
    const sae__train_layout *L = &t->lay;
    float *buf = t->buf;
    float *st = buf + L->stats, *fires = buf + L->fires, *sum_err = buf + L->sum_err;

    if (m->arch == SAE_ARCH_TOPK) {
        select_topk(t, n);
    } else {
        size_t k = m->k < d_sae ? m->k : d_sae;
        float cut = sae__train_select_batchtopk(t, n);
        if (t->act_ptr[n] > 0 && k > 0) {
            st[SAE__STAT_MIN] = cut;
            st[SAE__STAT_MIN_COUNT] = 1.0f;
        }
    }
    size_t n_dead = 0;
    size_t auxk = (size_t)t->param[SAE_TRAIN_AUXK];
    const double coeff = t->param[SAE_TRAIN_AUXK_COEFF];
    if (auxk > 0 && coeff > 0.0) {
        const uint64_t dead_after = (uint64_t)t->param[SAE_TRAIN_DEAD_TOKENS];
        for (size_t j = 0; j < d_sae; j++)
            if (t->since_fired[j] >= dead_after)
                t->dead[n_dead++] = (uint32_t)j;
    }
    if (auxk > n_dead)
        auxk = n_dead;
    if (auxk > 0)
        select_auxk(t, n, n_dead, auxk);

    const float g_main = (float)(2.0 / t->mse_norm);
    const float g_aux = (float)(2.0 * coeff / t->aux_norm);
    /* Many AuxK latents per token (OpenAI's 256 against a few thousand latents) are cheaper as
     * dense GEMMs over a [n][d_sae] code matrix than as per-latent vector operations. */
    const bool aux_dense = auxk > 0 && 16 * auxk >= d_sae;
    double sse = 0.0, aux = 0.0, mat_loss = 0.0, sse_first = 0.0;
    float *g_bdec = buf + L->b_dec, *d = t->tmp;
    sae__train_error_base(t, x, tgt, n);
    for (size_t i = 0; i < n; i++) {
        float *e = t->err + i * d_out;
        for (size_t a = t->act_ptr[i]; a < t->act_ptr[i + 1]; a++) {
            sae__axpy(d_out, t->act_val[a], m->W_dec + (size_t)t->act_idx[a] * d_out, e);
            fires[t->act_idx[a]] += 1.0f;
        }
        if (t->tc)
            sae__sscal(d_out, c, e);
        sse += sae__dot(d_out, e, e);
        sae__axpy(d_out, 1.0f, e, sum_err);
    }
    /* Every token joins the AuxK term once any latent is dead, even with no positive dead
     * pre-activation (then e_aux = 0), as OpenAI's normalized_mse over the batch does. OpenAI
     * decodes the AuxK latents with pre_bias added, so b_dec gets this gradient too. */
    float *FA = t->dense, *D = t->xs, *GA = t->pre; /* xs and pre are not needed any more */
    if (aux_dense) {
        memset(FA, 0, n * d_sae * sizeof(float));
        for (size_t i = 0; i < n; i++)
            for (size_t a = t->aux_ptr[i]; a < t->aux_ptr[i + 1]; a++)
                FA[i * d_sae + t->aux_idx[a]] = t->aux_val[a];
        memcpy(D, t->err, n * d_out * sizeof(float));
        sae__sgemm(false, false, n, d_out, d_sae, c, FA, d_sae, m->W_dec, d_out, 1.0f, D, d_out);
        for (size_t i = 0; i < n; i++) {
            float *di = D + i * d_out;
            aux += sae__dot(d_out, di, di);
            for (size_t j = 0; j < d_out; j++)
                di[j] *= g_aux;
            sae__axpy(d_out, 1.0f, di, g_bdec);
        }
        sae__sgemm(true, false, d_sae, d_out, n, 1.0f, FA, d_sae, D, d_out, 1.0f, buf + L->W_dec,
                   d_out);
        sae__sgemm(false, true, n, d_sae, d_out, c, D, d_out, m->W_dec, d_out, 0.0f, GA, d_sae);
        float *g_benc = buf + L->b_enc;
        for (size_t i = 0; i < n; i++)
            for (size_t j = 0; j < d_sae; j++) {
                float g = FA[i * d_sae + j] > 0.0f ? GA[i * d_sae + j] : 0.0f;
                GA[i * d_sae + j] = g;
                g_benc[j] += g;
            }
    }
    for (size_t i = 0; i < n; i++) {
        float *e = t->err + i * d_out;
        const float *xin = t->xin + i * d_in;
        const bool aux_sparse = auxk > 0 && !aux_dense;
        if (aux_sparse) {
            memcpy(d, e, d_out * sizeof(float));
            for (size_t a = t->aux_ptr[i]; a < t->aux_ptr[i + 1]; a++)
                sae__axpy(d_out, c * t->aux_val[a], m->W_dec + (size_t)t->aux_idx[a] * d_out, d);
            aux += sae__dot(d_out, d, d);
            for (size_t j = 0; j < d_out; j++)
                d[j] *= g_aux;
            sae__axpy(d_out, 1.0f, d, g_bdec);
        }
        if (t->n_groups > 0) { /* Matryoshka: the nested prefix losses */
            mat_loss += sae__matryoshka_token(t, i, e, xin, g_main, &sse_first);
        } else {
            for (size_t j = 0; j < d_out; j++)
                e[j] *= g_main;
            for (size_t a = t->act_ptr[i]; a < t->act_ptr[i + 1]; a++)
                sae__train_backprop_latent(t, t->act_idx[a], t->act_val[a], e, xin);
        }
        sae__axpy(d_out, 1.0f, e, g_bdec);
        if (aux_sparse)
            for (size_t a = t->aux_ptr[i]; a < t->aux_ptr[i + 1]; a++)
                sae__train_backprop_latent(t, t->aux_idx[a], t->aux_val[a], d, xin);
    }
    /* Encoder columns back into W_enc's [d_in][d_sae] layout. */
    float *g_enc = buf + L->W_enc;
    sae__train_untranspose(t, g_enc);
    if (aux_dense)
        sae__sgemm(true, false, d_in, d_sae, n, 1.0f, t->xin, d_in, GA, d_sae, 1.0f, g_enc, d_sae);
    /* The main loss reaches W_skip; the AuxK term does not (its target, the residual, is held
     * fixed, and the dead latents decode without the skip, as sparsify's decode). */
    sae__train_skip_gradient(t, t->err, n);
    st[SAE__STAT_SSE] = (float)sse;
    st[SAE__STAT_LOSS] = (float)(t->n_groups > 0 ? mat_loss : sse / t->mse_norm);
    st[SAE__STAT_SSE_PREFIX] = (float)(t->n_groups > 0 ? sse_first : sse);
    st[SAE__STAT_AUX] = (float)aux;
    st[SAE__STAT_L0] = (float)t->act_ptr[n];
}

/* ---- the optimizer's passes ---------------------------------------------------------------- */

/* At Gemma size (75M parameters, 302 MB per array) a step's time outside the products is passes
 * over memory: the passes below read the gradient sums once for their norm and finiteness, then
 * read weights, gradient and moments once to check the step and once more to write it. Scaling
 * (1/N, clipping), the decoder rows' projection, their renormalization and their norms happen on
 * the way, row by row in cache, instead of as passes of their own; and two cores share each. */

enum {
    SUMSQ_BLOCK = 1 << 16, /* gradient elements per partial sum: the norm's order is fixed */
    FLAT_ROW = 1 << 12     /* elements per unit of work in the flat sections */
};

typedef struct {
    const float *g;
    size_t n;
    float scale;
    double *partial; /* [blocks] */
    int *finite;     /* [blocks] */
} sumsq_job;

static void sumsq_range(void *ctx, size_t b, size_t e, size_t worker)
{
    (void)worker;
    sumsq_job *j = ctx;
    for (size_t k = b; k < e; k++) {
        const size_t i0 = k * SUMSQ_BLOCK, len = j->n - i0 < SUMSQ_BLOCK ? j->n - i0 : SUMSQ_BLOCK;
        j->partial[k] = sae__adam_sumsq(j->g + i0, len, j->scale, &j->finite[k]);
    }
}

/* One section's Adam step, as rows of `width` elements (the last may be shorter). The decoder's
 * rows (dec) get the gradient scaled into a scratch row and, with unit-norm rows, its component
 * along the row removed (OpenAI's unit_norm_decoder_grad_adjustment_); after the update the row
 * is renormalized and its norm stored, as sae__model_weights_changed would. */
typedef struct {
    sae_trainer *t;
    float *p;
    const float *g;
    float *m, *v;
    size_t n, width;
    bool dec, write;
    sae__adam adam;
    float *scratch; /* [chunks][width] when dec */
    int *what;      /* [chunks]: the check's first failure in the chunk, 0 if none */
    size_t *bad;    /* [chunks]: its index in the section */
} adam_job;

static void adam_range(void *ctx, size_t r0, size_t r1, size_t worker)
{
    adam_job *j = ctx;
    sae_model *m = j->t->m;
    for (size_t r = r0; r < r1; r++) {
        const size_t i0 = r * j->width, len = j->n - i0 < j->width ? j->n - i0 : j->width;
        float *p = j->p + i0;
        const float *g = j->g + i0;
        sae__adam a = j->adam;
        if (j->dec) {
            float *s = j->scratch + worker * j->width;
            sae__adam_scaled(s, g, len, &a);
            if (j->t->unit_dec) {
                float ww = sae__sdot(len, p, p);
                if (ww > 0.0f)
                    sae__saxpy(len, -sae__sdot(len, s, p) / ww, p, s);
            }
            a.scale = a.clip = 1.0f;
            g = s;
        }
        if (!j->write) {
            size_t i;
            int what = sae__adam_check(p, g, j->m + i0, j->v + i0, len, &a, &i);
            if (what != 0) {
                j->what[worker] = what;
                j->bad[worker] = i0 + i;
                return;
            }
            continue;
        }
        sae__adam_update(p, g, j->m + i0, j->v + i0, len, &a);
        if (!j->dec)
            continue;
        if (j->t->unit_dec) {
            float nrm = sae__snrm2(len, p);
            if (nrm > 0.0f && isfinite(1.0f / nrm)) {
                sae__sscal(len, 1.0f / nrm, p);
            } else if (nrm > 0.0f) {
                /* A norm below 1 / FLT_MAX has no float reciprocal: divide. */
                for (size_t c = 0; c < len; c++)
                    p[c] /= nrm;
            }
        }
        m->dec_norm[r] = sae__dec_row_norm(m, r);
    }
}

/* The chunks adam_section splits a section of n elements in rows of width into. */
static size_t adam_chunks(const sae_trainer *t, size_t n, size_t width)
{
    return sae__parallel_chunks(sae__model_threads(t->m), (n + width - 1) / width,
                                sae__grain(width));
}

/* Checks (write false) or applies one section's step over threads; on a failed check returns
 * its kind (sae__adam_check's) with *bad the first failing index, else 0. */
static int adam_section(sae_trainer *t, adam_job *j, size_t *bad)
{
    const size_t rows = (j->n + j->width - 1) / j->width;
    const size_t chunks = adam_chunks(t, j->n, j->width);
    int what[64] = {0}; /* sae__parallel_chunks makes at most 64 */
    size_t at[64];
    j->what = what;
    j->bad = at;
    sae__parallel_for(sae__model_threads(t->m), rows, sae__grain(j->width), adam_range, j);
    for (size_t w = 0; w < chunks; w++) {
        if (what[w] != 0) {
            *bad = at[w];
            return what[w];
        }
    }
    return 0;
}

/* ---- the step ------------------------------------------------------------------------------ */

static double schedule_lr(const sae_trainer *t)
{
    double s = (double)t->step, lr = t->param[SAE_TRAIN_LR];
    double warm = sae__train_param_value(t, SAE_TRAIN_WARMUP_STEPS);
    double total = t->param[SAE_TRAIN_TOTAL_STEPS];
    double decay = sae__train_param_value(t, SAE_TRAIN_LR_DECAY_STEPS);
    if (warm > 0.0 && s < warm)
        lr *= (s + 1.0) / warm;
    if (total > 0.0 && decay > 0.0 && s >= total - decay) {
        /* Linear to zero at TOTAL_STEPS; steps beyond it keep the last rate. */
        double left = total - s;
        lr *= (left >= 1.0 ? left : 1.0) / decay;
    }
    return lr;
}

/* ReLU's L1 coefficient, or JumpReLU's L0 coefficient, after the warm-up. */
static double schedule_l1(const sae_trainer *t)
{
    double warm = sae__train_param_value(t, SAE_TRAIN_L1_WARMUP_STEPS), s = (double)t->step;
    double c = t->param[t->jump ? SAE_TRAIN_L0_COEFF : SAE_TRAIN_L1_COEFF];
    return warm > 0.0 && s + 1.0 < warm ? c * (s + 1.0) / warm : c;
}

/* Everything after the gradient sums are global: the same on every process. The gradient is
 * prepared in the step's buffer, then every value the step would write is checked before any is
 * written: a step that would leave a weight, an Adam moment or the BatchTopK threshold not
 * finite fails with SAE_ERANGE and changes nothing. */
static int apply_step(sae_trainer *t, double lr, double lambda)
{
    sae_model *m = t->m;
    const size_t d_in = m->d_in, d_sae = m->d_sae, d_out = m->d_out;
    const sae__train_layout *L = &t->lay;
    float *buf = t->buf, *st = buf + L->stats;
    const double N = round((double)st[SAE__STAT_TOKENS]);
    float *g = buf; /* the gradient sections are contiguous from 0 to n_params */
    /* The gradient is the sums times 1/N (and the clipping factor): Adam scales as it reads. */
    const float inv_n = (float)(1.0 / N);
    const size_t blocks = (L->n_params + SUMSQ_BLOCK - 1) / SUMSQ_BLOCK;
    const size_t dec_chunks = adam_chunks(t, d_out * d_sae, d_out);
    double *partial = sae__alloc(blocks ? blocks : 1, sizeof(double), "step scratch");
    int *finite = sae__alloc(blocks ? blocks : 1, sizeof(int), "step scratch");
    float *scratch = sae__alloc(dec_chunks * d_out, sizeof(float), "step scratch");
    if (partial == NULL || finite == NULL || scratch == NULL) {
        free(partial);
        free(finite);
        free(scratch);
        return SAE_ENOMEM;
    }
    sumsq_job sj = {g, L->n_params, inv_n, partial, finite};
    sae__parallel_for(sae__model_threads(m), blocks, sae__grain(SUMSQ_BLOCK), sumsq_range,
                      &sj);
    double gnorm = 0.0;
    bool all_finite = true;
    for (size_t k = 0; k < blocks; k++) {
        gnorm += partial[k];
        all_finite &= finite[k] != 0;
    }
    free(partial);
    free(finite);
    if (!all_finite) {
        free(scratch);
        return sae__fail(SAE_ERANGE,
                         "sae_trainer_step: the gradient is not finite at step %llu (learning "
                         "rate too high, or activations too large?)",
                         (unsigned long long)t->step);
    }
    gnorm = sqrt(gnorm);
    double clip = t->param[SAE_TRAIN_GRAD_CLIP];
    float clip_by = 1.0f;
    if (clip > 0.0 && gnorm > clip) /* torch's clip_grad_norm_ */
        clip_by = (float)(clip / (gnorm + 1e-6));
    /* A transcoder's gradient is that of its normalized parameters (W_dec' = c W_dec, ...): Adam
     * steps those, and the change reaches the model's own divided by the same factor (the
     * learning rate for W_dec and b_dec is lr / c, for W_skip lr * INPUT_SCALE / c). */
    const double oc = t->out_scale, s_in = m->input_scale;
    const struct {
        float *p;
        size_t at, n, cols;
        const char *name;
        double lr;
    } part[6] = {{m->W_enc, L->W_enc, d_in * d_sae, d_sae, "W_enc", lr},
                 {m->W_dec, L->W_dec, d_out * d_sae, d_out, "W_dec", t->tc ? lr / oc : lr},
                 {m->b_enc, L->b_enc, d_sae, 0, "b_enc", lr},
                 {m->b_dec, L->b_dec, d_out, 0, "b_dec", t->tc ? lr / oc : lr},
                 {m->W_skip, L->W_skip, L->log_th - L->W_skip, d_out, "W_skip", lr * s_in / oc},
                 {t->log_th, L->log_th, L->n_params - L->log_th, 0, "log_threshold", lr}};
    /* Empty sections (no W_skip, no log-thresholds) are skipped. */
    const size_t n_parts = 6;
    adam_job jobs[6];
    for (size_t q = 0; q < n_parts; q++) {
        const bool dec = part[q].p == m->W_dec;
        jobs[q] = (adam_job){t, part[q].p, g + part[q].at, t->adam_m + part[q].at,
                             t->adam_v + part[q].at, part[q].n, dec ? d_out : FLAT_ROW, dec, false,
                             {part[q].lr, t->param[SAE_TRAIN_BETA1], t->param[SAE_TRAIN_BETA2],
                              t->param[SAE_TRAIN_ADAM_EPS], t->step + 1, inv_n, clip_by, 0.0, 0.0},
                             scratch, NULL, NULL};
        sae__adam_prepare(&jobs[q].adam);
    }
    for (size_t q = 0; q < n_parts; q++) {
        if (part[q].n == 0)
            continue;
        size_t i;
        int what = adam_section(t, &jobs[q], &i);
        if (what == 0)
            continue;
        free(scratch);
        const char *of = what == 1 ? "the Adam first moment of " : what == 2 ? "the Adam second "
                                                                              "moment of " : "";
        char where[48];
        if (part[q].cols)
            snprintf(where, sizeof where, "[%zu][%zu]", i / part[q].cols, i % part[q].cols);
        else
            snprintf(where, sizeof where, "[%zu]", i);
        return sae__fail(SAE_ERANGE,
                         "sae_trainer_step: step %llu would make %s%s%s not finite (learning "
                         "rate %g too high, or activations too large?); the model and trainer "
                         "are unchanged",
                         (unsigned long long)t->step, of, part[q].name, where, lr);
    }
    double theta = t->theta;
    if (m->arch == SAE_ARCH_BATCHTOPK && st[SAE__STAT_MIN_COUNT] > 0.0f) {
        /* SAELens: theta <- (1 - r) theta + r * min kept activation (mean over processes). */
        double r = t->param[SAE_TRAIN_THRESHOLD_LR];
        double kept_min = (double)st[SAE__STAT_MIN] / round((double)st[SAE__STAT_MIN_COUNT]);
        theta = (1.0 - r) * t->theta + r * kept_min;
        if (!isfinite((float)theta)) {
            free(scratch);
            return sae__fail(SAE_ERANGE, "sae_trainer_step: step %llu would make the BatchTopK "
                             "threshold %g, not a finite float; the model and trainer are "
                             "unchanged", (unsigned long long)t->step, theta);
        }
    }

    /* Nothing has changed until here; from here on nothing fails. */
    for (size_t q = 0; q < n_parts; q++) {
        if (part[q].n == 0)
            continue;
        size_t i;
        jobs[q].write = true;
        (void)adam_section(t, &jobs[q], &i);
    }
    free(scratch);
    if (t->jump)
        sae__jumprelu_sync(t);
    if (m->mag_scale != NULL) /* the decoder norms are done; the rest of the model's caches */
        sae__model_weights_changed(m);

    /* Dead-latent counters, from the global firing counts. */
    const uint64_t n_tok = (uint64_t)N;
    const uint64_t dead_after = (uint64_t)t->param[SAE_TRAIN_DEAD_TOKENS];
    size_t dead = 0;
    for (size_t j = 0; j < d_sae; j++) {
        uint64_t c = buf[L->fires + j] > 0.0f ? 0 : t->since_fired[j] + n_tok;
        t->since_fired[j] = c < COUNTER_MAX ? c : COUNTER_MAX;
        dead += t->since_fired[j] >= dead_after;
    }
    if (m->arch == SAE_ARCH_BATCHTOPK && st[SAE__STAT_MIN_COUNT] > 0.0f) {
        t->theta = theta;
        m->batch_threshold = (float)theta;
    }

    /* Metrics of this batch, then the AuxK normalizer for the next step. */
    const float *sum_dx = buf + L->sum_dx, *sum_err = buf + L->sum_err;
    double dx2 = 0.0, de2 = 0.0;
    for (size_t j = 0; j < d_out; j++) {
        dx2 += (double)sum_dx[j] * sum_dx[j];
        de2 += (double)sum_err[j] * sum_err[j];
    }
    /* The error is in x_s's units for an SAE, c y's for a transcoder. */
    const double sse = st[SAE__STAT_SSE], s = t->tc ? t->out_scale : (double)m->input_scale;
    const double var_sum = st[SAE__STAT_XX] - dx2 / N;
    const double aux_loss = t->sparse ? st[SAE__STAT_AUX] / (t->aux_norm * N) : 0.0;
    t->metric[SAE_METRIC_LOSS] =
        st[SAE__STAT_LOSS] / N + t->param[SAE_TRAIN_AUXK_COEFF] * aux_loss;
    t->metric[SAE_METRIC_MSE] = sse / (s * s * N);
    t->metric[SAE_METRIC_FVU] = var_sum > 0.0 ? sse / var_sum : NAN;
    t->metric[SAE_METRIC_L0] = st[SAE__STAT_L0] / N;
    t->metric[SAE_METRIC_DEAD_FRACTION] = (double)dead / (double)d_sae;
    t->metric[SAE_METRIC_AUXK_LOSS] = aux_loss;
    t->metric[SAE_METRIC_LR] = lr;
    t->metric[SAE_METRIC_GRAD_NORM] = gnorm;
    t->metric[SAE_METRIC_SPARSITY_LOSS] = t->jump ? lambda * st[SAE__STAT_L0] / N : 0.0;
    double th = 0.0;
    for (size_t j = 0; t->jump && j < d_sae; j++)
        th += m->threshold[j];
    t->metric[SAE_METRIC_THRESHOLD_MEAN] = th / (double)d_sae;
    const double sse_first = t->n_groups > 0 ? st[SAE__STAT_SSE_PREFIX] : sse;
    t->metric[SAE_METRIC_PREFIX_FVU] = var_sum > 0.0 ? sse_first / var_sum : NAN;
    double residual_var = (sse - de2 / N) / N;
    if (residual_var > 0.0 && isfinite(residual_var))
        t->aux_norm = residual_var;
    t->have_metrics = true;
    t->step++;
    t->tokens += n_tok;
    t->metric[SAE_METRIC_STEPS] = (double)t->step;
    t->metric[SAE_METRIC_TOKENS] = (double)t->tokens;
    sae__train_diagnose(t);
    return SAE_OK;
}

static int step_pair(sae_trainer *t, const float *x, const float *y, size_t n, bool to)
{
    SAE_CHECK_NULL(t);
    if (!to && t->tc)
        return check_pair(t, x, y, n, to, "sae_trainer_step");
    if (!t->initialized)
        return sae__fail(SAE_ESTATE,
                         "sae_trainer_step: call sae_trainer_init (or sae_trainer_load) first");
    if (sae__train_need_float_weights(t, "sae_trainer_step") != SAE_OK)
        return SAE_ESTATE;
    if (n == 0 && t->allreduce == NULL)
        return sae__fail(SAE_EINVAL, "sae_trainer_step: the batch is empty (n = 0)");
    const sae_model *m = t->m;
    int rc;
    if (n > 0) {
        size_t count;
        if (n > INT32_MAX || !sae__mul(n, m->d_in, &count) || !sae__mul(n, m->d_out, &count) ||
            n > (1u << 24))
            return sae__fail(SAE_EINVAL,
                             "sae_trainer_step: n = %zu tokens is too many (at most 2^24 a step)", n);
        if ((rc = check_pair(t, x, y, n, to, "sae_trainer_step")) != SAE_OK)
            return rc;
        if ((rc = ensure_scratch(t, n)) != SAE_OK ||
            (rc = sae__train_bf16_reserve(t, n)) != SAE_OK)
            return rc;
    }
    /* The model has no tokens at stake until here, and is changed only by apply_step. ReLU's
     * products write the weight gradients whole (beta = 0), and the sparse pass writes W_enc's
     * whole (sae__train_untranspose): zeroing them first would be a pass of its own. */
    const size_t written = n == 0 || t->jump ? 0 : t->sparse ? t->lay.W_dec : t->lay.b_enc;
    memset(t->buf + written, 0, (t->lay.count - written) * sizeof(float));
    const double lr = schedule_lr(t), lambda = t->sparse ? 0.0 : schedule_l1(t);
    if (n > 0) {
        encode_batch(t, x, n);
        const float *tgt = t->tc ? y : t->xs; /* an SAE's target is its scaled input */
        input_stats(t, tgt, n);
        if (t->sparse)
            sparse_pass(t, x, tgt, n);
        else if (t->jump)
            sae__jumprelu_pass(t, x, tgt, n, lambda);
        else
            relu_pass(t, x, tgt, n, lambda);
        if (m->apply_b_dec) /* b_dec also enters through the encoder input xs - b_dec */
            sae__sgemv(false, m->d_in, m->d_sae, -1.0f, m->W_enc, m->d_sae, t->buf + t->lay.b_enc,
                       1, 1.0f, t->buf + t->lay.b_dec, 1);
        if ((rc = sae__train_bf16_status(t)) != SAE_OK)
            return rc;
    }
    if (t->allreduce != NULL && (rc = t->allreduce(t->buf, t->lay.count, t->user)) != 0)
        return sae__fail(SAE_ECALLBACK, "sae_trainer_step: the allreduce callback returned %d",
                         rc);
    double tokens = (double)t->buf[t->lay.stats + SAE__STAT_TOKENS];
    if (!(tokens >= 0.5))
        return sae__fail(SAE_EINVAL, "sae_trainer_step: no process had any tokens in this step");
    return apply_step(t, lr, lambda);
}

int sae_trainer_step(sae_trainer *t, const float *x, size_t n)
{
    return step_pair(t, x, NULL, n, false);
}

int sae_trainer_step_to(sae_trainer *t, const float *x, const float *y, size_t n)
{
    return step_pair(t, x, y, n, true);
}

