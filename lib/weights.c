/* Every read of W_enc and W_dec outside training, for either storage: float, or bfloat16
 * (SAE_PARAM_BF16_WEIGHTS) with the conversion both ways. Switching a model's storage is the
 * model's own business (sae__model_set_bf16 in model.c).
 *
 * bfloat16 is the top half of a float: widening is a 16-bit shift and exact, narrowing rounds to
 * nearest even. A single token's encode or decode is bound by reading the weights from memory, so
 * half the bytes is close to half the time; there the weights are widened in registers as they
 * stream past (direct_range). Many tokens make the product compute-bound: on a CPU with bfloat16
 * matrix instructions (AMX, AVX512-BF16) oneDNN's matmul takes it (bf16_dnnl.c, activations
 * rounded to bfloat16); elsewhere a column panel of the weights is widened into scratch and
 * handed to SGEMM, so the conversion is paid once per panel for every token. */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef SAE__WIDEN_X86
#include <immintrin.h>
#endif

/* Up to DIRECT_MAX_TOKENS tokens, the product widens the weights in registers as it streams
 * them; BLOCK is the stack buffer of the row-at-a-time reductions (norms, dot products). */
enum { BLOCK = 512, DIRECT_MAX_TOKENS = 6 };
/* Scratch for one widened panel of the many-token product. */
#define PANEL_BYTES ((size_t)16 << 20)

typedef union {
    uint32_t u;
    float f;
} bits;

static inline float widen1(uint16_t h)
{
    bits b = {(uint32_t)h << 16};
    return b.f;
}

/* Fixed counts of 8, so that -O2 turns the loops into vector instructions. */
static void widen(const uint16_t *restrict src, float *restrict dst, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (size_t q = 0; q < 8; q++)
            dst[i + q] = widen1(src[i + q]);
    for (; i < n; i++)
        dst[i] = widen1(src[i]);
}

/* y[0..n) += sum over r < 4 of a[r] * rows[r][0..n): four rows per pass over y, which halves the
 * loads and stores of y against one row at a time, the limit once the rows stream from memory. */
static void rows4_base(size_t n, const float a[4], const uint16_t *restrict r0,
                       const uint16_t *restrict r1, const uint16_t *restrict r2,
                       const uint16_t *restrict r3, float *restrict y)
{
    const float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (size_t q = 0; q < 8; q++)
            y[i + q] += (a0 * widen1(r0[i + q]) + a1 * widen1(r1[i + q])) +
                        (a2 * widen1(r2[i + q]) + a3 * widen1(r3[i + q]));
    for (; i < n; i++)
        y[i] += (a0 * widen1(r0[i]) + a1 * widen1(r1[i])) +
                (a2 * widen1(r2[i]) + a3 * widen1(r3[i]));
}

static void row_base(size_t n, float a, const uint16_t *restrict r, float *restrict y)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (size_t q = 0; q < 8; q++)
            y[i + q] += a * widen1(r[i + q]);
    for (; i < n; i++)
        y[i] += a * widen1(r[i]);
}

typedef void rows4_fn(size_t, const float[4], const uint16_t *restrict, const uint16_t *restrict,
                      const uint16_t *restrict, const uint16_t *restrict, float *restrict);
typedef void row_fn(size_t, float, const uint16_t *restrict, float *restrict);

#ifdef SAE__WIDEN_X86
/* The same kernels for AVX2, chosen at run time with the path sae__to_float takes (dtype.c: the
 * best this CPU runs; SAE_DTYPE_ISA caps it): compiled for x86-64's baseline, the loops above
 * widen and add 4 floats per instruction, which left a one-token sparse decode at 7.3 us where
 * these take 4.1 (bench_ops decode_sparse_bf16, n = 1). Eight lanes a step, one zero-extending
 * load each; the operations in the baseline's order and weights.c compiled without FMA
 * contraction (AVX-512 CPUs have FMA), so both give the same bits on every CPU (test_bf16 checks
 * them). */
__attribute__((target("avx2"))) static inline __m256 widen8(const uint16_t *p)
{
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const void *)p)), 16));
}

__attribute__((target("avx2"))) static void rows4_avx2(size_t n, const float a[4],
                                                       const uint16_t *restrict r0,
                                                       const uint16_t *restrict r1,
                                                       const uint16_t *restrict r2,
                                                       const uint16_t *restrict r3,
                                                       float *restrict y)
{
    const __m256 a0 = _mm256_set1_ps(a[0]), a1 = _mm256_set1_ps(a[1]);
    const __m256 a2 = _mm256_set1_ps(a[2]), a3 = _mm256_set1_ps(a[3]);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 s01 = _mm256_add_ps(_mm256_mul_ps(a0, widen8(r0 + i)),
                                         _mm256_mul_ps(a1, widen8(r1 + i)));
        const __m256 s23 = _mm256_add_ps(_mm256_mul_ps(a2, widen8(r2 + i)),
                                         _mm256_mul_ps(a3, widen8(r3 + i)));
        _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_add_ps(s01, s23)));
    }
    rows4_base(n - i, a, r0 + i, r1 + i, r2 + i, r3 + i, y + i);
}

__attribute__((target("avx2"))) static void row_avx2(size_t n, float a,
                                                     const uint16_t *restrict r,
                                                     float *restrict y)
{
    const __m256 av = _mm256_set1_ps(a);
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i,
                         _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_mul_ps(av, widen8(r + i))));
    row_base(n - i, a, r + i, y + i);
}
#define ON_X86(f, fallback) f
#else
#define ON_X86(f, fallback) fallback
#endif

static const struct {
    rows4_fn *rows4;
    row_fn *row;
} row_kernels[SAE__WIDEN_COUNT] = {
    [SAE__WIDEN_SCALAR] = {rows4_base, row_base},
    [SAE__WIDEN_AVX2] = {ON_X86(rows4_avx2, rows4_base), ON_X86(row_avx2, row_base)},
    /* AVX2's eight lanes; sixteen are untried. */
    [SAE__WIDEN_AVX512] = {ON_X86(rows4_avx2, rows4_base), ON_X86(row_avx2, row_base)},
};

static void add_rows4(size_t n, const float a[4], const uint16_t *r0, const uint16_t *r1,
                      const uint16_t *r2, const uint16_t *r3, float *y)
{
    row_kernels[sae__widen_chosen()].rows4(n, a, r0, r1, r2, r3, y);
}

static void add_row(size_t n, float a, const uint16_t *r, float *y)
{
    row_kernels[sae__widen_chosen()].row(n, a, r, y);
}

void sae__bf16_add_rows_on(sae__widen_path p, size_t n, const float a[4], const uint16_t *rows[4],
                           float *y)
{
    row_kernels[p].rows4(n, a, rows[0], rows[1], rows[2], rows[3], y);
}

void sae__bf16_add_row_on(sae__widen_path p, size_t n, float a, const uint16_t *row, float *y)
{
    row_kernels[p].row(n, a, row, y);
}

/* Round to nearest, ties to even; the caller has checked that v is finite and in range. */
static inline uint16_t narrow1(float v)
{
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Whether every value rounds to a finite bfloat16: magnitude bits up to 0x7f7f7fff, the largest
 * float below the tie that rounds to infinity (NaN and infinity lie above). */
static bool fits_bf16(const float *v, size_t n, size_t *bad)
{
    for (size_t i = 0; i < n; i++) {
        bits b = {.f = v[i]};
        if ((b.u & 0x7fffffffu) > 0x7f7f7fffu) {
            *bad = i;
            return false;
        }
    }
    return true;
}

int sae__bf16_narrow(const float *src, uint16_t *dst, size_t n, size_t cols, const char *what)
{
    size_t bad;
    if (!fits_bf16(src, n, &bad))
        return sae__fail(SAE_ERANGE,
                         "%s[%zu][%zu] = %g does not fit in bfloat16 (largest finite: 3.39e38)",
                         what, bad / cols, bad % cols, (double)src[bad]);
    for (size_t i = 0; i < n; i++)
        dst[i] = narrow1(src[i]);
    return SAE_OK;
}

void sae__bf16_widen(const uint16_t *src, float *dst, size_t n) { widen(src, dst, n); }

float sae__dec_row_norm(const sae_model *m, size_t feature)
{
    const size_t d_out = m->d_out;
    if (m->W_dec16 == NULL)
        return sae__snrm2(d_out, m->W_dec + feature * d_out);
    double sum = 0.0; /* squares of values up to 3.4e38 overflow float, never double */
    float buf[BLOCK];
    for (size_t c = 0; c < d_out; c += BLOCK) {
        size_t w = d_out - c < BLOCK ? d_out - c : BLOCK;
        widen(m->W_dec16 + feature * d_out + c, buf, w);
        for (size_t j = 0; j < w; j++)
            sum += (double)buf[j] * buf[j];
    }
    return (float)sqrt(sum);
}

/* ---- reads of single rows and elements --------------------------------------------------- */

void sae__dec_row_axpy(const sae_model *m, size_t feature, size_t c0, size_t width, float a,
                       float *y)
{
    if (m->W_dec16 == NULL)
        sae__saxpy(width, a, m->W_dec + feature * m->d_out + c0, y);
    else
        add_row(width, a, m->W_dec16 + feature * m->d_out + c0, y);
}

void sae__dec_rows_add(const sae_model *m, const uint32_t *idx, const float *val, size_t count,
                       float *y)
{
    const size_t d_out = m->d_out;
    size_t j = 0;
    if (m->W_dec16 != NULL)
        for (; j + 4 <= count; j += 4) {
            const uint16_t *W = m->W_dec16;
            add_rows4(d_out, val + j, W + idx[j] * d_out, W + idx[j + 1] * d_out,
                      W + idx[j + 2] * d_out, W + idx[j + 3] * d_out, y);
        }
    for (; j < count; j++)
        sae__dec_row_axpy(m, idx[j], 0, d_out, val[j], y);
}

void sae__dec_row(const sae_model *m, size_t feature, float *dst)
{
    if (m->W_dec16 == NULL)
        memcpy(dst, m->W_dec + feature * m->d_out, m->d_out * sizeof *dst);
    else
        widen(m->W_dec16 + feature * m->d_out, dst, m->d_out);
}

void sae__dec_dots(const sae_model *m, const float *v, float *out)
{
    const size_t d_out = m->d_out;
    if (m->W_dec16 == NULL) {
        sae__sgemv(false, m->d_sae, d_out, 1.0f, m->W_dec, d_out, v, 1, 0.0f, out, 1);
        return;
    }
    float buf[BLOCK];
    for (size_t i = 0; i < m->d_sae; i++) {
        float dot = 0.0f;
        for (size_t c = 0; c < d_out; c += BLOCK) {
            size_t w = d_out - c < BLOCK ? d_out - c : BLOCK;
            widen(m->W_dec16 + i * d_out + c, buf, w);
            dot += sae__dot(w, buf, v + c);
        }
        out[i] = dot;
    }
}

float sae__enc_at(const sae_model *m, size_t row, size_t feature)
{
    size_t at = row * m->d_sae + feature;
    return m->W_enc16 == NULL ? m->W_enc[at] : widen1(m->W_enc16[at]);
}

/* ---- products with a whole weight matrix -------------------------------------------------- */

typedef struct {
    const uint16_t *W;
    size_t K, N, n;
    const float *A;
    float *C;
    const uint32_t *rows; /* the rows of W some token's coefficient is nonzero for */
    size_t n_rows;
} product_job;

/* Columns [COLUMNS begin, COLUMNS end) of C += A @ W for a few tokens. Each thread streams whole
 * stretches of the rows it needs (rows no token uses, as with sparse codes, are never read), four
 * rows at a time; the tokens' columns stay in cache meanwhile. */
enum { COLUMNS = 64 };

static void direct_range(void *arg, size_t begin, size_t end, size_t worker)
{
    (void)worker;
    const product_job *job = arg;
    const size_t K = job->K, N = job->N, n = job->n;
    const size_t c0 = begin * COLUMNS, width = (end * COLUMNS < N ? end * COLUMNS : N) - c0;
    size_t r = 0;
    for (; r + 4 <= job->n_rows; r += 4) {
        const uint32_t *k = job->rows + r;
        for (size_t t = 0; t < n; t++) {
            const float *a = job->A + t * K;
            const float coeff[4] = {a[k[0]], a[k[1]], a[k[2]], a[k[3]]};
            add_rows4(width, coeff, job->W + k[0] * N + c0, job->W + k[1] * N + c0,
                      job->W + k[2] * N + c0, job->W + k[3] * N + c0, job->C + t * N + c0);
        }
    }
    for (; r < job->n_rows; r++)
        for (size_t t = 0; t < n; t++)
            add_row(width, job->A[t * K + job->rows[r]], job->W + job->rows[r] * N + c0,
                    job->C + t * N + c0);
}

typedef struct {
    const uint16_t *W;
    size_t K, N, c0, width;
    float *panel;
} widen_job;

static void widen_range(void *arg, size_t begin, size_t end, size_t worker)
{
    (void)worker;
    const widen_job *job = arg;
    for (size_t k = begin; k < end; k++)
        widen(job->W + k * job->N + job->c0, job->panel + k * job->width, job->width);
}

int sae__bf16_gemm_panels(const sae_model *m, const uint16_t *W, size_t K, size_t N,
                          const float *A, size_t n, float *C, size_t panel_cols)
{
    size_t cols = panel_cols < N ? panel_cols : N;
    float *panel = sae__alloc(K * cols, sizeof *panel, "bfloat16 panel");
    if (panel == NULL)
        return SAE_ENOMEM;
    const size_t threads = sae__model_threads(m);
    for (size_t c0 = 0; c0 < N; c0 += cols) {
        const size_t width = N - c0 < cols ? N - c0 : cols;
        widen_job wj = {W, K, N, c0, width, panel};
        sae__parallel_for(threads, K, sae__grain(width), widen_range, &wj);
        sae__sgemm(false, false, n, width, K, 1.0f, A, K, panel, width, 1.0f, C + c0, N);
    }
    free(panel);
    return SAE_OK;
}

int sae__weights_product(const sae_model *m, sae_tensor t, const float *A, size_t n, float *C,
                         float beta)
{
    const bool enc = t == SAE_W_ENC;
    const size_t K = enc ? m->d_in : m->d_sae, N = enc ? m->d_sae : m->d_out;
    const float *W = enc ? m->W_enc : m->W_dec;
    const uint16_t *W16 = enc ? m->W_enc16 : m->W_dec16;
    const struct sae__bf16_packed *P = enc ? m->W_enc16p : m->W_dec16p;
    if (W16 == NULL) {
        if (n == 1)
            sae__sgemv(true, K, N, 1.0f, W, N, A, 1, beta, C, 1);
        else if (!sae__sgemm_dnnl_wanted(n, K, N) ||
                 !sae__sgemm_dnnl(n, K, N, A, W, beta, C, sae__model_threads(m)))
            sae__sgemm(false, false, n, N, K, 1.0f, A, K, W, N, beta, C, N);
        return SAE_OK;
    }
    const bool matrix = sae__bf16_isa() != SAE_BF16_PATH_WIDEN;
    if (n <= DIRECT_MAX_TOKENS) {
        uint32_t *rows = sae__alloc(K, sizeof *rows, "bfloat16 product");
        if (rows == NULL)
            return SAE_ENOMEM;
        size_t n_rows = 0;
        for (size_t k = 0; k < K; k++) {
            bool used = false;
            for (size_t t = 0; t < n; t++)
                used |= A[t * K + k] != 0.0f;
            rows[n_rows] = (uint32_t)k;
            n_rows += used;
        }
        /* The widening kernel's time grows with tokens x rows used; oneDNN's, from a few tokens
         * on, is one pass over the weights at memory speed. Measured on the 2-core Xeon of
         * docs/performance.md, both on AMX and capped to AVX512-BF16 (2304 x 16384, dense
         * tokens): 2.3 ms per token's pass against 5.2 ms for oneDNN at 1 to 6 tokens, so the
         * kernel keeps up to two passes' work. */
        if (!matrix || n * n_rows <= 2 * K) {
            if (beta == 0.0f)
                memset(C, 0, n * N * sizeof *C);
            product_job job = {W16, K, N, n, A, C, rows, n_rows};
            sae__parallel_for(sae__model_threads(m), (N + COLUMNS - 1) / COLUMNS,
                              sae__grain(n_rows * COLUMNS * n), direct_range, &job);
            free(rows);
            return SAE_OK;
        }
        free(rows);
    }
    if (matrix) {
        int rc = sae__bf16_dnnl_product(W16, P, K, N, A, n, C, beta, sae__model_threads(m));
        if (rc != SAE_EUNSUPPORTED) /* refused: C is untouched, and the widening path runs */
            return rc;
    }
    if (beta == 0.0f)
        memset(C, 0, n * N * sizeof *C);
    size_t cols = PANEL_BYTES / sizeof(float) / K;
    cols = cols < 64 ? 64 : cols / 64 * 64;
    return sae__bf16_gemm_panels(m, W16, K, N, A, n, C, cols);
}

void sae__bf16_repack(sae_model *m, sae_tensor t)
{
    const bool enc = t == SAE_W_ENC;
    struct sae__bf16_packed **slot = enc ? &m->W_enc16p : &m->W_dec16p;
    const uint16_t *W16 = enc ? m->W_enc16 : m->W_dec16;
    sae__bf16_packed_free(*slot);
    *slot = W16 == NULL ? NULL
                        : sae__bf16_pack(W16, enc ? m->d_in : m->d_sae,
                                         enc ? m->d_sae : m->d_out, sae__model_threads(m));
}

sae_bf16_path sae_model_bf16_path(const sae_model *m)
{
    if (m == NULL || m->W_enc16 == NULL)
        return SAE_BF16_PATH_FLOAT;
    return sae__bf16_isa();
}
