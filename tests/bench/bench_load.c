/* Loading time of SAE files: for each path, the best of several sae_model_load calls, and the
 * best load followed by a first one-token encode (which touches every page of W_enc, so the
 * memory-mapped loads pay their page faults there). Prints one line per path:
 *     PATH load_ms load_and_first_encode_ms format dtype
 * tests/bench/load writes the files, times numpy reading the same arrays, and prints both. */
#define _POSIX_C_SOURCE 199309L /* clock_gettime */
#include <sae.h>

#include "bench_common.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv)
{
    int reps = 5;
    for (int a = 1; a < argc; a++) {
        double best_load = 1e30, best_first = 1e30;
        const char *format = "?", *dtype = "?";
        for (int r = 0; r < reps; r++) {
            sae_model *m;
            double t0 = bench_now();
            if (sae_model_load(&m, argv[a]) != SAE_OK) {
                fprintf(stderr, "%s: %s\n", argv[a], sae_last_error());
                return 1;
            }
            double t1 = bench_now();
            size_t d_in = sae_model_d_in(m), d_sae = sae_model_d_sae(m);
            float *x = calloc(d_in, sizeof(float)), *f = malloc(d_sae * sizeof(float));
            if (x == NULL || f == NULL || sae_encode(m, x, 1, f) != SAE_OK) {
                fprintf(stderr, "%s: encode failed: %s\n", argv[a], sae_last_error());
                return 1;
            }
            double t2 = bench_now();
            format = sae_model_format(m);
            dtype = sae_model_dtype(m);
            free(x);
            free(f);
            sae_model_free(m);
            if (t1 - t0 < best_load)
                best_load = t1 - t0;
            if (t2 - t0 < best_first)
                best_first = t2 - t0;
        }
        printf("%s %.3f %.3f %s %s\n", argv[a], 1e3 * best_load, 1e3 * best_first, format, dtype);
    }
    return 0;
}
