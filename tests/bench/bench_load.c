/* Loading time of SAE files: for each path, the best of several sae_model_load calls, and the
 * best load followed by a first one-token encode (which touches every page of W_enc, so the
 * memory-mapped loads pay their page faults there), and the process's peak resident memory so far
 * (VmHWM, which exec resets, unlike getrusage's ru_maxrss: run one path per process to get that
 * path's), and the least process CPU time of a load (kernel time of its page faults included; on a
 * shared machine it moves less than the wall time). Prints one line per path:
 *     PATH load_ms load_and_first_encode_ms format dtype peak_mb load_cpu_ms
 * tests/bench/load writes the files, times numpy reading the same arrays, and prints both. */
#define _POSIX_C_SOURCE 199309L /* clock_gettime */
#include <sae.h>

#include "bench_common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* VmHWM of /proc/self/status in MB, or -1 where there is none. */
static double peak_mb(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    double kb = -1;
    while (f != NULL && fgets(line, sizeof line, f) != NULL)
        if (strncmp(line, "VmHWM:", 6) == 0)
            kb = strtod(line + 6, NULL);
    if (f != NULL)
        fclose(f);
    return kb < 0 ? -1 : kb / 1e3;
}

int main(int argc, char **argv)
{
    int reps = 5;
    for (int a = 1; a < argc; a++) {
        double best_load = 1e30, best_first = 1e30, best_cpu = 1e30;
        const char *format = "?", *dtype = "?";
        for (int r = 0; r < reps; r++) {
            sae_model *m;
            double c0 = cpu_now(), t0 = bench_now();
            if (sae_model_load(&m, argv[a]) != SAE_OK) {
                fprintf(stderr, "%s: %s\n", argv[a], sae_last_error());
                return 1;
            }
            double t1 = bench_now(), c1 = cpu_now();
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
            if (c1 - c0 < best_cpu)
                best_cpu = c1 - c0;
            if (t1 - t0 < best_load)
                best_load = t1 - t0;
            if (t2 - t0 < best_first)
                best_first = t2 - t0;
        }
        printf("%s %.3f %.3f %s %s %.0f %.3f\n", argv[a], 1e3 * best_load, 1e3 * best_first,
               format, dtype, peak_mb(), 1e3 * best_cpu);
    }
    return 0;
}
