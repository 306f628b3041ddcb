/* Helpers the training suites share (test_train*.c, test_bf16.c): structured data, a gradient
 * capture and a threaded all-reduce standing in for MPI, and small getters that fail the test. */
#ifndef SAE_TRAINUTIL_H
#define SAE_TRAINUTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "sae.h"

/* Data with structure: a nonzero mean and a slope across dimensions, so codes are not all alike.
 * n tokens of d floats; caller frees. */
float *tu_train_data(size_t n, size_t d, uint64_t seed);

/* Steps from..to-1, step s on 32 tokens of tu_train_data(32, d, 1000 + s). */
void tu_run_steps(sae_trainer *t, size_t d, size_t from, size_t to);

/* An all-reduce that keeps a copy of the last buffer it was given and counts its calls. */
typedef struct {
    float *copy;
    size_t count;
    int calls;
} tu_capture;
int tu_capture_allreduce(float *buf, size_t count, void *user);

/* Two "processes" as threads: each adds its buffer into a shared sum of count floats, waits for
 * the others, and copies the sum back. tu_group_new makes the group for `threads` threads. */
typedef struct tu_group tu_group;
tu_group *tu_group_new(size_t count, unsigned threads);
void tu_group_free(tu_group *g);
int tu_thread_allreduce(float *buf, size_t count, void *user);

/* A trainer metric; fails the test when it cannot be read. */
double tu_metric(const sae_trainer *t, sae_train_metric which);
/* A model tensor of count floats widened to float64; caller frees. */
double *tu_dup_tensor(const sae_model *m, sae_tensor t, size_t count);
/* Mean over true directions (n_true rows of d) of the best cosine with a decoder row of Wd (s rows
 * of d): how well a dictionary recovered planted features. */
double tu_mmcs(const float *truth, size_t n_true, const float *Wd, size_t s, size_t d);
/* The float64 reference of one token's AuxK error (OpenAI 2024): the auxk largest
 * pre-activations pre [s] among dead latents, rectified, decoded without bias through Wd [s][d]
 * and added to the residual e [d] (overwritten); returns the sum of squares of the result. */
double tu_auxk_sq(double *e, const double *pre, const bool *dead, size_t auxk, const double *Wd,
                  size_t s, size_t d);

#endif
