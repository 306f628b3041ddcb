/* Where the B operand of OpenBLAS's SGEMM (or the matrix of its SGEMV) sits relative to a 64-byte
 * boundary, and what that does to the time of libsae's float products: the measurement behind
 * W_SHIFT_FLOATS in lib/model.c. Shapes: the encoder's at 64 tokens (64 x 2304 @ 2304 x 16384,
 * the default), the decoder's (1024 x 16384 @ 16384 x 2304), or one token (n = 1: SGEMV over
 * W_enc, as sae_encode runs it). Thread CPU time, one OpenBLAS thread, so that other jobs on a
 * shared machine change the figures less than wall-clock time would; best of `reps` turns, the
 * offsets taking turns. A and C are placed at each of a few offsets too. The buffers are advised
 * onto transparent huge pages, as libsae's weights are (tensor_alloc in lib/model.c).
 *
 *   cc -O2 tests/bench/bf16_align.c -o /tmp/bf16_align $(pkg-config --cflags --libs openblas)
 *   OPENBLAS_NUM_THREADS=1 /tmp/bf16_align [reps [n K N]]
 *   e.g. the decoder: /tmp/bf16_align 3 1024 16384 2304; one token: /tmp/bf16_align 20 1 2304 16384 */
#define _DEFAULT_SOURCE
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static double cpu_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static char *huge_alloc(size_t bytes)
{
    const size_t huge = (size_t)2 << 20;
    bytes = (bytes + huge - 1) / huge * huge;
    char *p = aligned_alloc(huge, bytes);
    if (p != NULL)
        (void)madvise(p, bytes, MADV_HUGEPAGE);
    return p;
}

int main(int argc, char **argv)
{
    const int reps = argc > 1 ? atoi(argv[1]) : 5;
    const size_t n = argc > 4 ? strtoul(argv[2], NULL, 10) : 64;
    const size_t K = argc > 4 ? strtoul(argv[3], NULL, 10) : 2304;
    const size_t N = argc > 4 ? strtoul(argv[4], NULL, 10) : 16384;
    const size_t pad = 4096;
    if (reps < 1 || n < 1 || K < 1 || N < 1)
        return 2;
    char *wb = huge_alloc(K * N * sizeof(float) + pad);
    char *ab = huge_alloc(n * K * sizeof(float) + pad);
    char *cb = huge_alloc(n * N * sizeof(float) + pad);
    if (wb == NULL || ab == NULL || cb == NULL)
        return 1;
    for (size_t i = 0; i < (K * N * sizeof(float) + pad) / sizeof(float); i++)
        ((float *)(void *)wb)[i] = (float)(i % 13) / 13.0f;
    for (size_t i = 0; i < (n * K * sizeof(float) + pad) / sizeof(float); i++)
        ((float *)(void *)ab)[i] = (float)(i % 7) / 7.0f;
    for (size_t i = 0; i < (n * N * sizeof(float) + pad) / sizeof(float); i++)
        ((float *)(void *)cb)[i] = 0.0f;
    const int w_offs[] = {0, 16, 32, 48}, ac_offs[][2] = {{16, 16}, {0, 16}, {16, 0}, {0, 0}};
    printf("%zu x %zu @ %zu x %zu (%s): ms of thread CPU time, best of %d; rows: A, C offsets; "
           "columns: W offset mod 64\n", n, K, K, N, n == 1 ? "SGEMV" : "SGEMM", reps);
    printf("%-12s", "A, C");
    for (int w = 0; w < 4; w++)
        printf(" %8d", w_offs[w]);
    printf("\n");
    for (int p = 0; p < 4; p++) {
        double best[4] = {1e9, 1e9, 1e9, 1e9};
        const float *A = (const float *)(void *)(ab + ac_offs[p][0]);
        float *C = (float *)(void *)(cb + ac_offs[p][1]);
        for (int r = 0; r < reps; r++)
            for (int w = 0; w < 4; w++) {
                const float *W = (const float *)(void *)(wb + w_offs[w]);
                double t = cpu_now();
                if (n == 1)
                    cblas_sgemv(CblasRowMajor, CblasTrans, (int)K, (int)N, 1.0f, W, (int)N, A, 1,
                                0.0f, C, 1);
                else
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)N, (int)K,
                                1.0f, A, (int)K, W, (int)N, 0.0f, C, (int)N);
                t = cpu_now() - t;
                best[w] = t < best[w] ? t : best[w];
            }
        printf("%3d, %-7d", ac_offs[p][0], ac_offs[p][1]);
        for (int w = 0; w < 4; w++)
            printf(" %8.2f", best[w] * 1e3);
        printf("\n");
    }
    free(wb);
    free(ab);
    free(cb);
    return 0;
}
