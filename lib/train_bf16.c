/* Mixed-precision training (SAE_TRAIN_BF16): every matrix product of a training step takes its
 * two operands rounded to bfloat16 (to nearest, ties to even) and accumulates in float32, as
 * torch's bf16 autocast does for sparsify's and SAELens's trainers; the weights, their gradients,
 * Adam's moments and every elementwise step stay float32 (the master copy). The weights change
 * every step, so they are rounded afresh for each product.
 *
 * On a CPU with bfloat16 matrix instructions the products run in oneDNN's matmul (bf16_dnnl.c
 * describes the path), else in SGEMM on float copies holding the rounded values: the same
 * arithmetic (a product of two bfloat16 values is exact in float32), so the option means the same
 * thing everywhere and is only faster where the silicon is.
 *
 * The operands' copies are reserved before the step's passes (sae__train_bf16_reserve), so a
 * product never allocates; oneDNN's own scratchpad may still fail to allocate, and that failure
 * is kept and returned by the step before anything is written (sae__train_bf16_status). */
#define SAE_TRAIN_BF16_C /* sae__sgemm is SGEMM here (train_internal.h) */
#include "train_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SMALL_MACS 33554432.0 /* 2^25 */

struct sae__train_bf16 {
    bool matrix;   /* oneDNN on AMX / AVX512-BF16; else SGEMM on rounded floats */
    double small;  /* products of at most this many multiply-adds take SGEMM */
    size_t cap;    /* elements in each of a and b */
    float *a, *b;  /* the operands' copies: float, or bfloat16 in the same space (matrix) */
    int failed;    /* the first product's error of this step, SAE_OK if none */
    char why[256]; /* its message */
};

static inline uint16_t narrow1(float v)
{
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float round1(float v)
{
    uint32_t u = (uint32_t)narrow1(v) << 16;
    float r;
    memcpy(&r, &u, sizeof r);
    return r;
}

typedef struct {
    const float *src;
    size_t ld, cols;
    void *dst;
    bool half; /* dst is uint16_t, else float */
} copy_job;

static void copy_range(void *arg, size_t begin, size_t end, size_t worker)
{
    (void)worker;
    const copy_job *job = arg;
    for (size_t r = begin; r < end; r++) {
        const float *s = job->src + r * job->ld;
        if (job->half) {
            uint16_t *d = (uint16_t *)job->dst + r * job->cols;
            for (size_t c = 0; c < job->cols; c++)
                d[c] = narrow1(s[c]);
        } else {
            float *d = (float *)job->dst + r * job->cols;
            for (size_t c = 0; c < job->cols; c++)
                d[c] = round1(s[c]);
        }
    }
}

/* dst [rows][cols] (contiguous) = the rounding of src [rows][cols] (row stride ld): bfloat16
 * values if half, else floats holding them. */
static void round_copy(const float *src, size_t rows, size_t cols, size_t ld, void *dst,
                       bool half, size_t threads)
{
    copy_job job = {src, ld, cols, dst, half};
    sae__parallel_for(threads, rows, sae__grain(cols), copy_range, &job);
}

int sae__train_bf16_set(sae_trainer *t, double v)
{
    if ((v == 1.0) == (t->bf16 != NULL))
        return SAE_OK;
    if (v == 0.0) {
        sae__train_bf16_free(t->bf16);
        t->bf16 = NULL;
        return SAE_OK;
    }
    struct sae__train_bf16 *b = calloc(1, sizeof *b);
    if (b == NULL)
        return sae__fail(SAE_ENOMEM, "out of memory (bfloat16 training state)");
    b->matrix = sae__bf16_isa() != SAE_BF16_PATH_WIDEN;
    b->small = SMALL_MACS;
    t->bf16 = b;
    return SAE_OK;
}

void sae__train_bf16_set_small(sae_trainer *t, double macs)
{
    if (t->bf16 != NULL)
        t->bf16->small = macs;
}

void sae__train_bf16_free(struct sae__train_bf16 *b)
{
    if (b == NULL)
        return;
    free(b->a);
    free(b->b);
    free(b);
}

static size_t max3(size_t a, size_t b, size_t c)
{
    size_t ab = a > b ? a : b;
    return ab > c ? ab : c;
}

int sae__train_bf16_reserve(sae_trainer *t, size_t n)
{
    struct sae__train_bf16 *b = t->bf16;
    if (b == NULL)
        return SAE_OK;
    b->failed = SAE_OK;
    const sae_model *m = t->m;
    /* Every operand is a batch ([n][d_in], [n][d_sae], [n][d_out]) or a weight matrix. */
    size_t batch, weights;
    if (!sae__mul(n, max3(m->d_in, m->d_sae, m->d_out), &batch) ||
        !sae__mul(m->d_sae, m->d_in > m->d_out ? m->d_in : m->d_out, &weights))
        return sae__fail(SAE_ENOMEM, "bfloat16 training copies of %zu tokens overflow", n);
    size_t need = batch > weights ? batch : weights;
    if (m->skip && m->d_in * m->d_out > need)
        need = m->d_in * m->d_out;
    if (need <= b->cap)
        return SAE_OK;
    float *a = sae__alloc(need, sizeof(float), "bfloat16 training copies");
    float *c = a != NULL ? sae__alloc(need, sizeof(float), "bfloat16 training copies") : NULL;
    if (c == NULL) {
        free(a);
        return SAE_ENOMEM;
    }
    free(b->a);
    free(b->b);
    b->a = a;
    b->b = c;
    b->cap = need;
    return SAE_OK;
}

int sae__train_bf16_status(const sae_trainer *t)
{
    const struct sae__train_bf16 *b = t->bf16;
    if (b == NULL || b->failed == SAE_OK)
        return SAE_OK;
    return sae__fail(b->failed, "sae_trainer_step: a bfloat16 product failed: %s", b->why);
}

void sae__train_gemm(const sae_trainer *t, bool ta, bool tb, size_t M, size_t N, size_t K,
                     float alpha, const float *A, size_t lda, const float *B, size_t ldb,
                     float beta, float *C, size_t ldc)
{
    struct sae__train_bf16 *b = t->bf16;
    if (b == NULL) {
        sae__sgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    if (b->failed != SAE_OK)
        return; /* the step returns the first failure; nothing after it matters */
    const size_t threads = sae__model_threads(t->m);
    /* Stored shapes: A is [M][K], or [K][M] when transposed; B [K][N], or [N][K]. */
    const size_t a_rows = ta ? K : M, a_cols = ta ? M : K;
    const size_t b_rows = tb ? N : K, b_cols = tb ? K : N;
    /* A small product costs oneDNN more in setting up and in waking its OpenMP team than in
     * arithmetic (a stories260K step, 64 x 512, 256 tokens: 88 ms against 4 ms), so below
     * SMALL_MACS multiply-adds SGEMM takes the rounded values: the same arithmetic. */
    const bool matrix = b->matrix && (double)M * (double)N * (double)K > b->small;
    round_copy(A, a_rows, a_cols, lda, b->a, matrix, threads);
    round_copy(B, b_rows, b_cols, ldb, b->b, matrix, threads);
    if (!matrix) {
        sae__sgemm(ta, tb, M, N, K, alpha, b->a, a_cols, b->b, b_cols, beta, C, ldc);
        return;
    }
    int rc = sae__bf16_dnnl_gemm(ta, tb, M, N, K, alpha, (const uint16_t *)(void *)b->a,
                                 (const uint16_t *)(void *)b->b, beta, C, ldc, threads);
    if (rc != SAE_OK) {
        b->failed = rc;
        snprintf(b->why, sizeof b->why, "%s", sae_last_error());
    }
}
