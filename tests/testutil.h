/* Shared helpers for the Check suites: deterministic random data, float64 reference math written
 * as plain loops, temporary files, and the main() every suite uses. */
#ifndef SAE_TESTUTIL_H
#define SAE_TESTUTIL_H

#include <check.h>
#include <stddef.h>
#include <stdint.h>

#include "sae.h"

/* Asserts that a libsae call returned want, printing sae_last_error() when it did not. */
#define ck_assert_sae(call, want)                                                                  \
    do {                                                                                           \
        int rc_ = (call);                                                                          \
        ck_assert_msg(rc_ == (want), "%s returned %d (%s), expected %d; last error: %s", #call,    \
                      rc_, sae_strerror(rc_), (int)(want), sae_last_error());                      \
    } while (0)
#define ck_assert_ok(call) ck_assert_sae(call, SAE_OK)

/* A splitmix64 stream: the same seed gives the same numbers on every machine. */
typedef struct {
    uint64_t state;
} tu_rng;
uint64_t tu_next(tu_rng *r);
float tu_uniform(tu_rng *r, float lo, float hi);
float tu_normal(tu_rng *r);
void tu_fill(tu_rng *r, float *v, size_t n, float lo, float hi);
/* malloc that fails the test instead of returning NULL. */
void *tu_malloc(size_t bytes);

/* A model with random weights; JumpReLU thresholds in [0, 0.5). */
sae_model *tu_random_model(sae_arch arch, size_t d_in, size_t d_sae, uint64_t seed);

/* A transcoder (with or without a skip connection) or an SAE with random weights. */
typedef enum { TU_SAE = 0, TU_TRANSCODER = 1, TU_SKIP = 2 } tu_kind;
sae_model *tu_random_kind(sae_arch arch, tu_kind kind, size_t d_in, size_t d_sae, size_t d_out,
                          uint64_t seed);

/* A model's tensors and parameters copied out, for the reference loops (absent tensors NULL). */
typedef struct {
    sae_arch arch;
    size_t d_in, d_sae, d_out, k;
    int apply_b_dec, normalize, transcoder;
    double scale, batch_threshold;
    float *W_enc, *W_dec, *b_enc, *b_dec, *threshold, *r_mag, *b_mag, *W_skip;
} tu_weights;
void tu_weights_get(const sae_model *m, tu_weights *w);
void tu_weights_free(tu_weights *w);

/* The contract's math in float64 loops: pre-activations and codes of one token. */
void tu_ref_preact(const tu_weights *w, const float *x, double *pre);
void tu_ref_encode(const tu_weights *w, const float *x, double *f);
void tu_ref_decode(const tu_weights *w, const double *f, double *x_hat);
/* A token's normalization: x_n = (x - mu) * a, an SAE's output denormalized v * b + mu. */
void tu_ref_norm(const tu_weights *w, const float *x, double *mu, double *a, double *b);
/* The model's whole output for one token: an SAE's denormalized x_hat, a transcoder's y_hat with
 * its skip term. */
void tu_ref_output(const tu_weights *w, const float *x, double *out);

/* |got - want| <= tol * max(1, max|want|) for every element, else fails naming the element. */
void tu_assert_close(const float *got, const double *want, size_t n, double tol, const char *what);

/* A fresh path under the test's temporary folder ($SAE_TEST_TMPDIR or /tmp). Caller frees. */
char *tu_tmp_path(const char *name);
/* Writes bytes to path (replacing it). */
void tu_write_file(const char *path, const void *data, size_t size);
/* Reads a whole file; caller frees. */
unsigned char *tu_read_file(const char *path, size_t *size);
/* dir/name in a fresh string; caller frees. */
char *tu_path_in(const char *dir, const char *name);
/* Path of a file in the shared data folder; caller frees. */
char *tu_data_path(const char *rel);

/* Runs one suite in fork mode and returns the process exit code. */
int tu_run_suite(Suite *s);
#define TU_MAIN(suite_fn)                                                                          \
    int main(void) { return tu_run_suite(suite_fn()); }

#endif
