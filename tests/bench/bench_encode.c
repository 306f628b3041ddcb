/* Times libsae's encode, sparse encode and decode at one SAE shape, next to what the machine can
 * do: OpenBLAS's SGEMM on the same shape alone (the compute bound of a batch) and the memory
 * read bandwidth (the bound of a single token, which must stream all of W_enc).
 *
 *   bench_encode [d_in d_sae]      (default 2304 16384, a Gemma-2-2B SAE)
 *
 * Prints one line per measurement: "name n seconds_per_call"; tests/bench/encode adds numpy's
 * figures and prints the table. */
#define _POSIX_C_SOURCE 200809L
#include <sae.h>

#include "bench_common.h"

#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Best of 5 runs, each repeating the call until 0.2 s have passed. */
#define TIME_BEST(result, call)                                                                    \
    do {                                                                                           \
        double best_ = 1e30;                                                                       \
        for (int run_ = 0; run_ < 5; run_++) {                                                     \
            int reps_ = 0;                                                                         \
            double start_ = bench_now(), elapsed_;                                                       \
            do {                                                                                   \
                call;                                                                              \
                reps_++;                                                                           \
            } while ((elapsed_ = bench_now() - start_) < 0.2);                                           \
            if (elapsed_ / reps_ < best_)                                                          \
                best_ = elapsed_ / reps_;                                                          \
        }                                                                                          \
        (result) = best_;                                                                          \
    } while (0)

static void fill(float *v, size_t n, unsigned seed, float scale)
{
    uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v[i] = scale * ((float)(s >> 40) / (float)(1 << 24) - 0.5f);
    }
}

static void check(int rc)
{
    if (rc != SAE_OK) {
        fprintf(stderr, "bench_encode: %s\n", sae_last_error());
        exit(1);
    }
}

int main(int argc, char **argv)
{
    size_t d_in = 2304, d_sae = 16384;
    if (argc == 3) {
        d_in = strtoul(argv[1], NULL, 10);
        d_sae = strtoul(argv[2], NULL, 10);
    }
    const size_t batch = 1024, k = 32;
    float *w = malloc(d_in * d_sae * sizeof *w), *x = malloc(batch * d_in * sizeof *x);
    float *f = malloc(batch * d_sae * sizeof *f), *x_hat = malloc(batch * d_in * sizeof *x_hat);
    float *val = malloc(batch * k * sizeof *val);
    uint32_t *idx = malloc(batch * k * sizeof *idx), *count = malloc(batch * sizeof *count);
    if (!w || !x || !f || !x_hat || !val || !idx || !count)
        return 1;
    sae_model *relu, *topk;
    check(sae_model_new(&relu, SAE_ARCH_RELU, d_in, d_sae));
    check(sae_model_new(&topk, SAE_ARCH_TOPK, d_in, d_sae));
    fill(w, d_in * d_sae, 1, 0.05f);
    check(sae_model_set_tensor(relu, SAE_W_ENC, w));
    check(sae_model_set_tensor(topk, SAE_W_ENC, w));
    fill(w, d_in * d_sae, 2, 0.05f);
    check(sae_model_set_tensor(relu, SAE_W_DEC, w));
    check(sae_model_set_tensor(topk, SAE_W_DEC, w));
    fill(w, d_sae, 3, 0.1f);
    check(sae_model_set_tensor(relu, SAE_B_ENC, w));
    check(sae_model_set_tensor(topk, SAE_B_ENC, w));
    fill(x, batch * d_in, 4, 2.0f);
    check(sae_model_set_param(topk, SAE_PARAM_K, (double)k));

    double t;
    /* The bounds: SGEMM of the encode's shape alone, and reading memory. */
    TIME_BEST(t, cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)batch, (int)d_sae,
                             (int)d_in, 1.0f, x, (int)d_in, w, (int)d_sae, 0.0f, f, (int)d_sae));
    printf("sgemm %zu %.9g\n", batch, t);
    uint64_t sink = 0;
    TIME_BEST(t, sink ^= bench_read(w, d_in * d_sae * sizeof(float),
                                     (size_t)sysconf(_SC_NPROCESSORS_ONLN)));
    printf("read_w_enc 1 %.9g\n", t);
    const size_t ns[] = {1, batch};
    for (size_t i = 0; i < 2; i++) {
        size_t n = ns[i];
        TIME_BEST(t, check(sae_encode(relu, x, n, f)));
        printf("encode %zu %.9g\n", n, t);
        TIME_BEST(t, check(sae_encode_sparse(topk, x, n, k, idx, val, count)));
        printf("encode_sparse %zu %.9g\n", n, t);
        TIME_BEST(t, check(sae_decode(relu, f, n, x_hat)));
        printf("decode %zu %.9g\n", n, t);
        TIME_BEST(t, check(sae_decode_sparse(topk, idx, val, count, k, n, x_hat)));
        printf("decode_sparse %zu %.9g\n", n, t);
    }
    fprintf(stderr, "(checksum %llx)\n", (unsigned long long)sink);
    sae_model_free(relu);
    sae_model_free(topk);
    free(w);
    free(x);
    free(f);
    free(x_hat);
    free(val);
    free(idx);
    free(count);
    return 0;
}
