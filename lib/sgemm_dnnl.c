/* float32 weight products of a few tokens through oneDNN's sgemm.
 *
 * With few tokens a product reads every weight once and does little with it, so its time is the
 * time to stream the weights from memory. OpenBLAS's SGEMM (SkylakeX kernels) first copies the
 * weights into packed panels, which reads them, writes them and reads them again: on the 2-core
 * AVX-512 Xeon of docs/performance.md, 2304 x 16384 weights, two tokens took 16-21 ms against
 * 3.7-4.5 ms for one token's SGEMV. oneDNN's sgemm (dnnl_sgemm, the same library torch uses, and
 * libsae's already for bfloat16 products) reads the weights where they are at this size: 6.7-8.5
 * ms for two tokens, about half OpenBLAS's time from 2 to 24 tokens for the encoder's shape, and up
 * to a few hundred tokens for the decoder's (16384 x 2304), where its long sums favour it.
 *
 * Taken only where that was measured: a CPU on which oneDNN runs its AVX-512 kernels (capped to
 * AVX2, oneDNN lost to OpenBLAS's Haswell kernels at 2, 8, 16 and 32 tokens), weights of 4M
 * elements or more (below that both take microseconds, and an OpenMP team's start-up costs more
 * than it saves), and 2 to SMALL_MAX tokens (LARGE_MAX when the sum is at least twice the output
 * width). One token stays on SGEMV, which oneDNN did not beat. SAE_SGEMM=blas keeps every product
 * on BLAS; SAE_SGEMM=onednn sends every float product of 2 or more tokens here whatever its size,
 * for the tests. */
#include "internal.h"

#ifdef SAE_HAVE_DNNL

#include <oneapi/dnnl/dnnl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* libgomp's, which libdnnl links: declared here so that no OpenMP flags are needed. */
extern int omp_get_max_threads(void);
extern void omp_set_num_threads(int);

enum { SMALL_MAX = 24, LARGE_MAX = 256 };
#define MIN_WEIGHTS ((size_t)1 << 22)

typedef enum { CHOICE_NEVER, CHOICE_MEASURED, CHOICE_ALWAYS } choice;

static pthread_once_t once = PTHREAD_ONCE_INIT;
static choice mode = CHOICE_NEVER;

static void init(void)
{
    const char *want = getenv("SAE_SGEMM");
    if (want != NULL && strcmp(want, "blas") == 0)
        return;
    /* bf16_dnnl.c applies SAE_BF16_ISA's cap, which oneDNN takes only before its first use. */
    (void)sae__bf16_isa();
    if (want != NULL && strcmp(want, "onednn") == 0) {
        mode = CHOICE_ALWAYS;
        return;
    }
    const unsigned isa = (unsigned)dnnl_get_effective_cpu_isa();
    const unsigned avx512 = (unsigned)dnnl_cpu_isa_avx512_core;
    if ((isa & avx512) == avx512)
        mode = CHOICE_MEASURED;
}

bool sae__sgemm_dnnl_wanted(size_t n, size_t K, size_t N)
{
    pthread_once(&once, init);
    if (mode == CHOICE_NEVER || n < 2)
        return false;
    if (mode == CHOICE_ALWAYS)
        return true;
    if (K * N < MIN_WEIGHTS)
        return false;
    return n <= (K >= 2 * N ? LARGE_MAX : SMALL_MAX);
}

bool sae__sgemm_dnnl(size_t n, size_t K, size_t N, const float *A, const float *W, float beta,
                     float *C, size_t threads)
{
    const int saved_threads = omp_get_max_threads();
    omp_set_num_threads(threads > 1024 ? 1024 : (int)threads);
    const dnnl_status_t s =
        dnnl_sgemm('N', 'N', (dnnl_dim_t)n, (dnnl_dim_t)N, (dnnl_dim_t)K, 1.0f, A, (dnnl_dim_t)K,
                   W, (dnnl_dim_t)N, beta, C, (dnnl_dim_t)N);
    omp_set_num_threads(saved_threads);
    return s == dnnl_success;
}

#else

bool sae__sgemm_dnnl_wanted(size_t n, size_t K, size_t N)
{
    (void)n, (void)K, (void)N;
    return false;
}

bool sae__sgemm_dnnl(size_t n, size_t K, size_t N, const float *A, const float *W, float beta,
                     float *C, size_t threads)
{
    (void)n, (void)K, (void)N, (void)A, (void)W, (void)beta, (void)C, (void)threads;
    return false;
}

#endif
