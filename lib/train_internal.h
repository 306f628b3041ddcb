/* The trainer's private parts, shared by train.c (the trainer object, parameters, init and the
 * step) and train_checkpoint.c (the checkpoint file). */
#ifndef SAE_TRAIN_INTERNAL_H
#define SAE_TRAIN_INTERNAL_H

#include "internal.h"

#define N_PARAMS (SAE_TRAIN_B_DEC_INIT + 1)
#define N_METRICS (SAE_METRIC_GRAD_NORM + 1)
#define TRAIN_FORMAT_VERSION "1"
/* Dead-latent counters saturate here so that they travel exactly as two float halves. */
#define COUNTER_MAX (((uint64_t)1 << 48) - 1)
#define WHOLE_MAX 9007199254740992.0 /* 2^53: the largest run of whole numbers a double holds */

typedef enum { K_POS, K_NONNEG, K_WHOLE, K_WHOLE_POS, K_UNIT_OPEN, K_UNIT, K_ENUM } param_kind;

typedef struct {
    const char *name;
    param_kind kind;
    double max; /* K_ENUM: the largest value */
} sae__train_param_info;
extern const sae__train_param_info sae__train_params[N_PARAMS];
extern const char *const sae__train_metric_names[N_METRICS];

struct sae_trainer {
    sae_model *m;
    bool sparse;   /* TopK and BatchTopK: sparse backward pass, AuxK */
    bool unit_dec; /* SAEs of those: unit-norm decoder rows (sparsify leaves transcoders' free) */
    bool tc;       /* a transcoder: the target is y, not x */
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
};

/* Checks a parameter value against its kind's range, as floats where the step uses floats. */
int sae__train_check_param(sae_train_param p, double v);
/* SAE_ESTATE, naming fn, when the model holds bfloat16 weights (training writes float ones). */
int sae__train_need_float_weights(const sae_trainer *t, const char *fn);

#endif /* SAE_TRAIN_INTERNAL_H */
