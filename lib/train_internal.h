/* The trainer's private parts, shared by train.c (the trainer object, parameters, init and the
 * step), train_checkpoint.c (the checkpoint file), train_jumprelu.c (JumpReLU's pass) and
 * train_matryoshka.c (Matryoshka's nested losses). */
#ifndef SAE_TRAIN_INTERNAL_H
#define SAE_TRAIN_INTERNAL_H

#include "internal.h"

/* ---- training (train.c, adam.c) ------------------------------------------------------------ */

/* One Adam step over a flat array, computed as torch.optim.Adam does (no weight decay):
 * m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps),
 * with t = step (1 for the first step). p, g, m and v are separate arrays (restrict). The g Adam
 * sees is the array's times scale, then times clip, each product rounded to float (scale = clip
 * = 1: the array as it is), so the step reads the gradient sums without a pass scaling them. */
typedef struct {
    double lr, beta1, beta2, eps;
    uint64_t step;
    float scale, clip;
    /* 1 - beta^step, or 0 until sae__adam_prepare sets them: a step's sections call the update a
     * row at a time, and the two pow() calls per call were 2% of a small model's step. */
    double bias1, bias2;
} sae__adam;
/* Sets a's bias corrections for its step (the same values every call would compute). */
void sae__adam_prepare(sae__adam *a);
void sae__adam_update(float *p, const float *g, float *m, float *v, size_t n, const sae__adam *a);
/* Whether sae__adam_update with the same arguments would leave every p, m and v finite, reading
 * only: 0 if so; else 1 (first moment), 2 (second moment) or 3 (the parameter) for the first
 * element i that would not be, with *bad = i. The update computes exactly what this checks. */
int sae__adam_check(const float *p, const float *g, const float *m, const float *v, size_t n,
                    const sae__adam *a, size_t *bad);
/* The sum of the squares of g[i] * scale (rounded to float, squared in double) over [0, n), in
 * an order fixed by n alone; *finite = 1 if every g[i] is finite, else 0 (scale > 0). */
double sae__adam_sumsq(const float *g, size_t n, float scale, int *finite);
/* dst = the gradient g as sae__adam_update with a would see it (scale, then clip). */
void sae__adam_scaled(float *dst, const float *g, size_t n, const sae__adam *a);

/* The per-step buffer handed to the allreduce callback: offsets (in floats) of its sections. The
 * gradient sections are sums over the process's tokens of the per-token loss's gradient, in the
 * model's layouts; fires[i] counts tokens where latent i fired; stats are sums indexed by
 * SAE__STAT_*; sum_dx = sum of (x_s - b_dec), sum_err = sum of (x_hat_s - x_s) [d_out]. A
 * transcoder's sections are those of its normalized parameters and target (train.c): W_dec
 * [d_sae][d_out], b_dec [d_out], then W_skip [d_in][d_out] when it has one (an SAE's W_skip
 * section is empty), and sum_dx, sum_err over c (y - b_dec), c (y_hat - y). A JumpReLU model's
 * parameters end with log_th [d_sae], the gradient of its log-thresholds (empty otherwise). */
enum {
    SAE__STAT_TOKENS = 0, /* tokens in the batch */
    SAE__STAT_SSE,        /* sum of squared error, scaled units */
    SAE__STAT_LOSS,       /* sum of per-token main loss (MSE term, plus L1 for ReLU) */
    SAE__STAT_AUX,        /* sum of squared AuxK error, before normalization */
    SAE__STAT_L0,         /* nonzero codes */
    SAE__STAT_XX,         /* sum of ||x_s - b_dec||^2 */
    SAE__STAT_MIN,        /* BatchTopK: smallest kept activation */
    SAE__STAT_MIN_COUNT,  /* BatchTopK: processes that kept any */
    SAE__STAT_SSE_PREFIX, /* Matryoshka: sum of squared error of the first group alone */
    SAE__STAT_COUNT
};
typedef struct {
    size_t W_enc, W_dec, b_enc, b_dec, W_skip, log_th, n_params, fires, stats, sum_dx, sum_err,
        count;
} sae__train_layout;
void sae__train_layout_of(const sae_model *m, sae__train_layout *l);

#define N_PARAMS (SAE_TRAIN_BF16 + 1)
#define N_METRICS (SAE_METRIC_WARNINGS + 1)
#define TRAIN_FORMAT_VERSION "1"
/* Dead-latent counters saturate here so that they travel exactly as two float halves. */
#define COUNTER_MAX (((uint64_t)1 << 48) - 1)
#define WHOLE_MAX 9007199254740992.0 /* 2^53: the largest run of whole numbers a double holds */

/* K_RUN: a run setting, a whole number from 0 to max (as K_ENUM) that says how this process
 * computes (SAE_TRAIN_BF16), not what the run trains, like the model's SAE_PARAM_THREADS.
 * Checkpoints neither store nor restore run settings, so a checkpoint resumes on a machine that
 * computes otherwise, and their format predates them. */
typedef enum {
    K_POS, K_NONNEG, K_WHOLE, K_WHOLE_POS, K_UNIT_OPEN, K_UNIT, K_ENUM, K_RUN
} param_kind;

typedef struct {
    const char *name;
    param_kind kind;
    double max; /* K_ENUM, K_RUN: the largest value */
} sae__train_param_info;
extern const sae__train_param_info sae__train_params[N_PARAMS];
extern const char *const sae__train_metric_names[N_METRICS];

struct sae_trainer {
    sae_model *m;
    bool sparse;   /* TopK and BatchTopK: sparse backward pass, AuxK */
    bool unit_dec; /* SAEs of those: unit-norm decoder rows (sparsify leaves transcoders' free) */
    bool tc;       /* a transcoder: the target is y, not x */
    bool jump;     /* JumpReLU: dense pass with the L0 penalty, trained log-thresholds */
    double param[N_PARAMS];
    bool param_set[N_PARAMS]; /* for the defaults derived from TOTAL_STEPS */
    sae_allreduce_fn allreduce;
    void *user;
    sae__train_layout lay;

    /* Training state: everything a checkpoint holds besides the weights. */
    bool initialized, have_metrics;
    uint64_t step, tokens;
    double mse_norm; /* per-token variance of the init sample: TopK's MSE normalizer */
    double aux_norm; /* per-token variance of the previous step's residual: AuxK's normalizer */
    double theta;    /* BatchTopK's running threshold */
    /* Transcoders: y's scale, c = sqrt(d_out) / mean ||y|| of the init sample (1 without
     * NORMALIZE_INPUT). The losses and the gradient are those of the normalized parameters
     * W_dec' = c W_dec, b_dec' = c b_dec, W_skip' = (c / INPUT_SCALE) W_skip, which map the scaled
     * input to c y: the recipe's units whatever the caller's, as an SAE's x_s. */
    double out_scale;
    float *adam_m, *adam_v;
    float *log_th; /* JumpReLU: [d_sae] log-thresholds, the master copy (the model's threshold
                      is expf of it after every step) */
    double jump_sparse_below; /* JumpReLU: per-token sparse products when fewer than this
                                 fraction of codes fired or sit near their thresholds */
    double jump_parallel_above; /* JumpReLU: its per-latent path splits across threads above
                                   this many element operations (a step's), else runs on the
                                   calling thread */
    bool jump_portable; /* JumpReLU: the portable kernels even where AVX-512's run (tests) */
    uint32_t *near_idx;      /* JumpReLU's per-latent path: each token's listed latents */
    size_t *near_ptr, near_cap, near_ptr_cap;
    float *near_val;         /* their pre-activations (near_cap of them too) */
    size_t *lat_ptr;         /* the lists by latent: latent k's from lat_ptr[k] to [k + 1] */
    uint32_t *lat_tok;       /* the tokens, increasing within a latent */
    float *lat_val;          /* their pre-activations */
    size_t lat_cap;
    /* Matryoshka (a BatchTopK model with groups set): group g is latents [group_end[g-1],
     * group_end[g]); n_groups = 0 without groups. */
    size_t *group_end, n_groups;
    float *mat_e, *mat_s; /* [d_out] scratch: a prefix's error and the suffix gradient sum */
    uint64_t *since_fired; /* tokens since each latent last fired */
    double metric[N_METRICS];

    /* Per-step buffer and scratch, sized for cap tokens. */
    float *buf;
    size_t cap, act_cap, aux_cap;
    float *xs, *xin, *err, *pre, *dense, *tmp;
    uint32_t *act_idx, *aux_idx, *dead;
    float *act_val, *aux_val, *dead_pre;
    size_t *act_ptr, *aux_ptr;
    float *gT;               /* [d_sae][d_in] W_enc gradient, transposed so rows are contiguous */
    unsigned char *touched;  /* rows of gT written this step */
    double *colsum;          /* ReLU: per-latent sum of codes over the batch */
    sae__scored *heap;
    struct sae__train_bf16 *bf16; /* SAE_TRAIN_BF16 (train_bf16.c); NULL when off */

    /* Diagnostics (train_diag.c): the held-out tokens (copies), and how many consecutive steps
     * each warning's condition has held. Not part of a checkpoint. */
    float *heldout_x, *heldout_y;
    size_t heldout_n;
    uint64_t fvu_high_run, l0_high_run;
    char warning[640];
};

/* The latent j's share of a token's gradient g (with respect to the normalized output) when it
 * fired with activation f (train.c): W_dec row, b_enc and the encoder column (in gT). */
void sae__train_backprop_latent(sae_trainer *t, uint32_t j, float f, const float *g,
                                const float *xin);
/* Writes the W_enc gradient section g_enc [d_in][d_sae] whole from gT's rows and clears their
 * marks: with t->touched, the marked rows (their first share was stored, so gT's other rows hold
 * stale values) and zeros for the others; without (NULL), every row, and gT is zeroed after.
 * Threaded (train.c). */
void sae__train_untranspose(sae_trainer *t, float *g_enc);

/* t->pre's rows [0, rows) = t->xin's rows [i0, i0 + rows) @ W_enc + b_enc (train.c: the whole
 * batch for every architecture but JumpReLU, whose pass encodes a block of tokens at a time). */
void sae__train_encode_rows(sae_trainer *t, size_t i0, size_t rows);

/* The part of the error the codes do not make, b_dec - tgt [+ x @ W_skip] (unscaled),
 * into t->err [n][d_out]; and W_skip's gradient from G [n][d_out], the gradient with respect to
 * the normalized output (train.c). */
void sae__train_error_base(sae_trainer *t, const float *x, const float *tgt, size_t n);
void sae__train_skip_gradient(sae_trainer *t, const float *G, size_t n);

/* BatchTopK: the k * n largest positive pre-activations of the batch (t->pre [n][d_sae]; ties
 * to the lower flat index) into act_idx / act_val / act_ptr, using t->dense as scratch
 * (train_batchtopk.c). Returns the smallest kept value, or 0 if none was kept. */
float sae__train_select_batchtopk(sae_trainer *t, size_t n);

/* JumpReLU's pass over n tokens (train_jumprelu.c): xin holds the encoder's input, and the pass
 * encodes it into pre itself (a block of tokens at a time); fills the gradient sections (log_th
 * included), firing counts, SSE, LOSS and L0. lambda is the L0 coefficient after its warm-up. */
void sae__jumprelu_pass(sae_trainer *t, const float *x, const float *tgt, size_t n, double lambda);
/* Sets the log-thresholds to log(JUMPRELU_INIT_THRESHOLD) and the model's threshold to match. */
void sae__jumprelu_init(sae_trainer *t);
/* The model's threshold = expf(log_th), after a step or a load. */
void sae__jumprelu_sync(sae_trainer *t);

/* Matryoshka: the main loss's gradient for token i (train_matryoshka.c). e [d_out] holds the
 * token's full error c (y_hat - tgt) on entry, and g_main / n_groups times the sum of its
 * prefix errors (the gradient reaching b_dec and W_skip) on return; the active latents' rows
 * and columns get their prefix-sum gradients. Returns the token's loss, the mean over prefixes
 * of ||e_g||^2 / mse_norm, and adds ||e_0||^2 to *sse_first. */
double sae__matryoshka_token(sae_trainer *t, size_t i, float *e, const float *xin, float g_main,
                             double *sse_first);

/* Sets the groups (n = 0: none), checking the sizes against the model; fn names the caller. */
int sae__matryoshka_set(sae_trainer *t, const size_t *sizes, size_t n, const char *fn);

/* Whether p is a parameter of this build (enum values reserved for other recipes are not). */
bool sae__train_param_known(int p);
/* Whether p's default follows TOTAL_STEPS until set (a checkpoint stores it only when set). */
bool sae__train_param_derived(int p);
/* The value of p in force, including the defaults derived from TOTAL_STEPS. */
double sae__train_param_value(const sae_trainer *t, sae_train_param p);

/* Diagnostics (train_diag.c), after each successful step: the held-out evaluation when due and
 * the warnings. */
void sae__train_diagnose(sae_trainer *t);
/* Frees the held-out copies. */
void sae__train_diag_free(sae_trainer *t);
/* Fresh diagnostics (init, load): held-out metrics NaN, no warnings. */
void sae__train_diag_reset(sae_trainer *t);
/* The metrics train_diag.c keeps: readable before any step, not saved in checkpoints. */
static inline bool sae__train_metric_is_diag(int k)
{
    return k >= SAE_METRIC_HELDOUT_FVU && k <= SAE_METRIC_WARNINGS;
}

/* Checks a parameter value against its kind's range, as floats where the step uses floats. */
int sae__train_check_param(sae_train_param p, double v);
/* SAE_ESTATE, naming fn, when the model holds bfloat16 weights (training writes float ones). */
int sae__train_need_float_weights(const sae_trainer *t, const char *fn);

/* ---- mixed precision (train_bf16.c): SAE_TRAIN_BF16 ---------------------------------------- */

/* Applies SAE_TRAIN_BF16 = v, 0 or 1 (sae__train_check_param validated it): SAE_ENOMEM. */
int sae__train_bf16_set(sae_trainer *t, double v);
void sae__train_bf16_free(struct sae__train_bf16 *b);
/* For the tests: products of at most macs multiply-adds take SGEMM (2^25 unless set; 0 sends
 * every product to oneDNN where the CPU allows). */
void sae__train_bf16_set_small(sae_trainer *t, double macs);
/* Before a step's passes: the operands' copies for n tokens (SAE_ENOMEM), and no failure yet. */
int sae__train_bf16_reserve(sae_trainer *t, size_t n);
/* After them: the first product's failure (oneDNN's scratchpad), set as the last error. */
int sae__train_bf16_status(const sae_trainer *t);
/* Every product of a step: sae__sgemm's arguments, computed in t's precision. */
void sae__train_gemm(const sae_trainer *t, bool ta, bool tb, size_t M, size_t N, size_t K,
                     float alpha, const float *A, size_t lda, const float *B, size_t ldb,
                     float beta, float *C, size_t ldc);
/* Every product of a training step, in every architecture's file, runs in the trainer's
 * precision: the trainer t is in scope at each call site. train_bf16.c itself calls SGEMM. */
#ifndef SAE_TRAIN_BF16_C
#define sae__sgemm(...) sae__train_gemm(t, __VA_ARGS__)
#endif

#endif /* SAE_TRAIN_INTERNAL_H */
