/* The widening of F16, BF16 and F64 tensors to float alone (lib/dtype.c, lib/dtype_x86.c), on
 * every path this CPU runs, next to memcpy of the same number of floats: the speed a load could
 * reach if widening cost nothing more than copying. Links the static library for the per-path
 * entry points.
 *
 *     bench_widen [count]      (default 2304 * 16384, one W_enc of the load benchmark)
 *
 * Per dtype and path, two ways of calling it, each the best of 7 by thread CPU time (the machine
 * may be shared; the load average is printed): "whole", one call over the tensor into memory
 * already touched, and "parts", calls of 16384 values into one cache-resident buffer, as
 * sae__model_load_tensor converts a part and checks it before the next. GB/s count the bytes read
 * plus the bytes written. One line per measurement:
 *     DTYPE PATH whole_GBps parts_GBps
 * and first a line "memcpy F32 whole_GBps parts_GBps", then "cpu NAME" and "load L1 L5 L15". */
#define _POSIX_C_SOURCE 200809L
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

enum { PART = 1 << 14, REPS = 7 };

static volatile float sink;

/* Best seconds of REPS runs; path < 0 is memcpy of F32. */
static double best(int path, sae__dtype t, const unsigned char *src, size_t count, float *dst,
                   float *part, bool parts)
{
    double b = 1e30;
    size_t es = sae__dtype_size(t);
    for (int r = 0; r < REPS; r++) {
        double t0 = cpu_now();
        for (size_t i = 0; i < count; i += parts ? PART : count) {
            size_t n = parts && count - i > PART ? PART : count - i;
            float *out = parts ? part : dst + i;
            if (path < 0)
                memcpy(out, src + i * es, n * sizeof(float));
            else
                sae__to_float_on((sae__widen_path)path, t, src + i * es, n, out);
            sink = out[n - 1];
        }
        double s = cpu_now() - t0;
        if (s < b)
            b = s;
    }
    return b;
}

int main(int argc, char **argv)
{
    size_t count = argc > 1 ? (size_t)strtoull(argv[1], NULL, 10) : (size_t)2304 * 16384;
    if (count == 0) {
        fprintf(stderr, "bench_widen: count must be positive\n");
        return 1;
    }
    unsigned char *src = malloc(count * 8);
    float *dst = malloc(count * sizeof(float)), *part = malloc(PART * sizeof(float));
    if (src == NULL || dst == NULL || part == NULL) {
        fprintf(stderr, "bench_widen: out of memory for %zu values\n", count);
        return 1;
    }
    /* Finite values of every dtype (the bytes of small doubles read as halves and bfloat16s are
     * mostly finite too; the speed does not depend on the values, only NaN lanes take a branch). */
    for (size_t i = 0; i < count; i++) {
        double d = ((double)(i % 1000) - 500.0) * 1e-4;
        memcpy(src + 8 * i, &d, sizeof d);
    }
    memset(dst, 0, count * sizeof(float));
    memset(part, 0, PART * sizeof(float));

    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[256], cpu[256] = "unknown CPU";
    while (f != NULL && fgets(line, sizeof line, f) != NULL)
        if (strncmp(line, "model name", 10) == 0 && strchr(line, ':') != NULL) {
            snprintf(cpu, sizeof cpu, "%s", strchr(line, ':') + 2);
            cpu[strcspn(cpu, "\n")] = '\0';
            break;
        }
    if (f != NULL)
        fclose(f);
    printf("cpu %s\n", cpu);
    double load[3] = {0, 0, 0};
    if ((f = fopen("/proc/loadavg", "r")) != NULL) {
        if (fscanf(f, "%lf %lf %lf", &load[0], &load[1], &load[2]) != 3)
            load[0] = load[1] = load[2] = 0;
        fclose(f);
    }
    printf("load %.2f %.2f %.2f\n", load[0], load[1], load[2]);

    double bytes = (double)count * 8.0;
    printf("memcpy F32 %.2f %.2f\n", bytes / best(-1, SAE__F32, src, count, dst, part, false) / 1e9,
           bytes / best(-1, SAE__F32, src, count, dst, part, true) / 1e9);
    const sae__dtype types[] = {SAE__F16, SAE__BF16, SAE__F64};
    for (size_t k = 0; k < 3; k++) {
        bytes = (double)count * (double)(sae__dtype_size(types[k]) + sizeof(float));
        for (int p = 0; p < SAE__WIDEN_COUNT; p++) {
            if (!sae__widen_supported((sae__widen_path)p))
                continue;
            double whole = best(p, types[k], src, count, dst, part, false);
            double parts = best(p, types[k], src, count, dst, part, true);
            printf("%s %s %.2f %.2f\n", sae__dtype_name(types[k]),
                   sae__widen_path_name((sae__widen_path)p), bytes / whole / 1e9,
                   bytes / parts / 1e9);
        }
    }
    printf("chosen %s\n", sae__widen_path_name(sae__widen_chosen()));
    free(part);
    free(dst);
    free(src);
    return 0;
}
