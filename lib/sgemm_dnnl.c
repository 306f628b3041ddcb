/* float32 weight products of a few tokens through oneDNN.
 *
 * With few tokens a product reads every weight once and does little with each, so its time is
 * the time to stream the weights from memory. OpenBLAS's SGEMM (SkylakeX kernels) first copies
 * the weights into packed panels, which reads them, writes them and reads them again: on the
 * 2-core AVX-512 Xeon of docs/performance.md, over 2304 x 16384 weights, two tokens took 18-21 ms
 * against 3.7-4.5 ms for one token's SGEMV. oneDNN, the library torch uses and libsae already
 * uses for bfloat16 products, reads them where they are. Measured there, idle, each routine
 * timed in turns with OpenBLAS (ms, OpenBLAS / oneDNN):
 *   encoder's shape, 2304 x 16384, oneDNN's matmul (brgemm kernels): n = 2 18.5 / 10.0,
 *   8 21.0 / 11.1, 16 22.2 / 12.1, 64 30.6 / 21.0, 256 66.4 / 59.6, 1024 214 / 222;
 *   decoder's shape, 16384 x 2304 (a long sum into a narrow output), where the matmul lost to
 *   OpenBLAS at 64 tokens, oneDNN's sgemm: n = 8 20.1 / 13.3, 64 31.1 / 16.1, 256 61.6 / 51.8.
 * So from 2 to SMALL_MAX tokens over weights of 4M elements or more, on a CPU where oneDNN runs
 * its AVX-512 kernels, the product goes to the matmul, or to the sgemm when the sum is at least
 * twice the output width. Capped to AVX2, oneDNN's sgemm lost to OpenBLAS's Haswell kernels at 2,
 * 8, 16 and 32 tokens, so other CPUs keep BLAS; below 4M weights both take microseconds and an
 * OpenMP team's start costs more than it saves; one token stays on SGEMV. SAE_SGEMM=blas keeps
 * every product on BLAS; SAE_SGEMM=onednn sends every float product of 2 or more tokens here
 * whatever its size, for the tests. */
#include "internal.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#ifdef SAE_HAVE_DNNL
#include <oneapi/dnnl/dnnl.h>
#endif

enum { SMALL_MAX = 256 };
#define MIN_WEIGHTS ((size_t)1 << 22)

typedef enum { CHOICE_NEVER, CHOICE_MEASURED, CHOICE_ALWAYS } choice;

static pthread_once_t once = PTHREAD_ONCE_INIT;
static choice mode = CHOICE_NEVER;

static void init(void)
{
#ifdef SAE_HAVE_DNNL
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
#endif
}

bool sae__sgemm_dnnl_wanted(size_t n, size_t K, size_t N)
{
    pthread_once(&once, init);
    if (mode == CHOICE_NEVER || n < 2)
        return false;
    if (mode == CHOICE_ALWAYS)
        return true;
    return K * N >= MIN_WEIGHTS && n <= SMALL_MAX;
}

bool sae__sgemm_dnnl(size_t n, size_t K, size_t N, const float *A, const float *W, float beta,
                     float *C, size_t threads)
{
    const int rc = K < 2 * N ? sae__f32_dnnl_matmul(n, K, N, A, W, beta, C, threads)
                             : sae__f32_dnnl_sgemm(n, K, N, A, W, beta, C, threads);
    return rc == SAE_OK;
}
