/* plan.h: a libsae steering plan from command-line ops, shared by sae-llama-cpp (llama.cpp) and
 * sae-engine-ref (libsae's own example engine) so both build exactly the same plan. */
#ifndef SAE_LLCPP_PLAN_H
#define SAE_LLCPP_PLAN_H

#include "sae.h"

#include <stdbool.h>
#include <stddef.h>

typedef struct {
    char kind;             /* 'c' clamp, 's' scale, 'a' add */
    unsigned long feature;
    float value;
    bool relative;         /* clamp to value x the feature's max over the data (needs maxima) */
} plan_op;

#define PLAN_MAX_OPS 64

/* Parses "F:V" (or "F:Mx" for a relative clamp) for --clamp/--scale/--add. 0 or -1. */
int plan_parse_op(char kind, const char *s, plan_op *op);

/* Each feature's max over the data, from a sae-train-resid --features TSV with d_sae lines.
 * NULL (with a message on stderr) if the file does not fit the SAE. */
float *plan_load_max(const char *path, size_t d_sae);

/* Each feature's token: the token id most common among its strongest examples in the same TSV
 * (ties: the stronger example's), and how many of those examples it covers (0 if the feature
 * never fired). tok and n_of hold d_sae entries. 0, or -1 with a message on stderr. */
int plan_load_tokens(const char *path, size_t d_sae, int *tok, int *n_of);

/* A plan holding ops[0..n) (NULL *out when n == 0) and a one-line description in desc.
 * max may be NULL when no op is relative. 0, or -1 with a message on stderr. */
int plan_build(const sae_model *sae, const plan_op *ops, int n, const float *max,
               sae_steer **out, char *desc, size_t desc_cap);

#endif
