/* CBLAS with size_t sizes. CBLAS takes every size as int, so a product or vector of 2^31 floats
 * or more (n * d_in of a large batch, the parameter count of a large model) cannot be passed in
 * one call: a cast would go negative and BLAS would silently do nothing. These wrappers split the
 * work into calls whose size arguments are all at most `limit` (INT_MAX outside the tests) and
 * combine the pieces: GEMM rows and columns into blocks of C, its inner dimension into slices
 * accumulated with beta = 1, level-1 vectors into chunks. When every size fits, which is every
 * ordinary call, they make the one CBLAS call straight through. */
#include "internal.h"

#include <cblas.h>
#include <limits.h>
#include <math.h>

static size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

void sae__sgemm_limit(bool trans_a, bool trans_b, size_t M, size_t N, size_t K, float alpha,
                      const float *A, size_t lda, const float *B, size_t ldb, float beta, float *C,
                      size_t ldc, size_t limit)
{
    const enum CBLAS_TRANSPOSE ta = trans_a ? CblasTrans : CblasNoTrans;
    const enum CBLAS_TRANSPOSE tb = trans_b ? CblasTrans : CblasNoTrans;
    if (M <= limit && N <= limit && K <= limit) {
        cblas_sgemm(CblasRowMajor, ta, tb, (int)M, (int)N, (int)K, alpha, A, (int)lda, B, (int)ldb,
                    beta, C, (int)ldc);
        return;
    }
    /* op(A) is [M][K]: row i of it starts at A + i * lda untransposed, at A + i transposed, and
     * column k at A + k, or A + k * lda; op(B) is [K][N] likewise. */
    for (size_t i = 0; i < M; i += limit) {
        const size_t rows = min_size(M - i, limit);
        for (size_t j = 0; j < N; j += limit) {
            const size_t cols = min_size(N - j, limit);
            /* At least one slice even when K = 0, where C = beta C. */
            size_t k = 0;
            do {
                const size_t depth = min_size(K - k, limit);
                const float *a = trans_a ? A + k * lda + i : A + i * lda + k;
                const float *b = trans_b ? B + j * ldb + k : B + k * ldb + j;
                /* The first slice applies beta; the later ones add to what it left. */
                cblas_sgemm(CblasRowMajor, ta, tb, (int)rows, (int)cols, (int)depth, alpha, a,
                            (int)lda, b, (int)ldb, k == 0 ? beta : 1.0f, C + i * ldc + j,
                            (int)ldc);
                k += depth;
            } while (k < K);
        }
    }
}

void sae__sgemm(bool trans_a, bool trans_b, size_t M, size_t N, size_t K, float alpha,
                const float *A, size_t lda, const float *B, size_t ldb, float beta, float *C,
                size_t ldc)
{
    sae__sgemm_limit(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, INT_MAX);
}

void sae__sgemv_limit(bool trans, size_t M, size_t N, float alpha, const float *A, size_t lda,
                      const float *x, size_t incx, float beta, float *y, size_t incy, size_t limit)
{
    const enum CBLAS_TRANSPOSE ta = trans ? CblasTrans : CblasNoTrans;
    if (M <= limit && N <= limit) {
        cblas_sgemv(CblasRowMajor, ta, (int)M, (int)N, alpha, A, (int)lda, x, (int)incx, beta, y,
                    (int)incy);
        return;
    }
    /* y has M entries untransposed (one per row of A), N transposed; the other dimension is the
     * sum, sliced with beta = 1 after the first slice. */
    const size_t out = trans ? N : M, sum = trans ? M : N;
    for (size_t o = 0; o < out; o += limit) {
        const size_t width = min_size(out - o, limit);
        size_t s = 0;
        do {
            const size_t depth = min_size(sum - s, limit);
            const float *a = trans ? A + s * lda + o : A + o * lda + s;
            cblas_sgemv(CblasRowMajor, ta, (int)(trans ? depth : width),
                        (int)(trans ? width : depth), alpha, a, (int)lda, x + s * incx, (int)incx,
                        s == 0 ? beta : 1.0f, y + o * incy, (int)incy);
            s += depth;
        } while (s < sum);
    }
}

void sae__sgemv(bool trans, size_t M, size_t N, float alpha, const float *A, size_t lda,
                const float *x, size_t incx, float beta, float *y, size_t incy)
{
    sae__sgemv_limit(trans, M, N, alpha, A, lda, x, incx, beta, y, incy, INT_MAX);
}

void sae__sger_limit(size_t M, size_t N, float alpha, const float *x, size_t incx, const float *y,
                     size_t incy, float *A, size_t lda, size_t limit)
{
    for (size_t i = 0; i < M; i += limit) {
        const size_t rows = min_size(M - i, limit);
        for (size_t j = 0; j < N; j += limit)
            cblas_sger(CblasRowMajor, (int)rows, (int)min_size(N - j, limit), alpha, x + i * incx,
                       (int)incx, y + j * incy, (int)incy, A + i * lda + j, (int)lda);
    }
}

void sae__sger(size_t M, size_t N, float alpha, const float *x, size_t incx, const float *y,
               size_t incy, float *A, size_t lda)
{
    sae__sger_limit(M, N, alpha, x, incx, y, incy, A, lda, INT_MAX);
}

void sae__saxpy_limit(size_t n, float a, const float *x, float *y, size_t limit)
{
    for (size_t i = 0; i < n; i += limit)
        cblas_saxpy((int)min_size(n - i, limit), a, x + i, 1, y + i, 1);
}

void sae__saxpy(size_t n, float a, const float *x, float *y)
{
    if (n <= INT_MAX)
        cblas_saxpy((int)n, a, x, 1, y, 1);
    else
        sae__saxpy_limit(n, a, x, y, INT_MAX);
}

void sae__sscal_limit(size_t n, float a, float *x, size_t limit)
{
    for (size_t i = 0; i < n; i += limit)
        cblas_sscal((int)min_size(n - i, limit), a, x + i, 1);
}

void sae__sscal(size_t n, float a, float *x)
{
    if (n <= INT_MAX)
        cblas_sscal((int)n, a, x, 1);
    else
        sae__sscal_limit(n, a, x, INT_MAX);
}

float sae__sdot_limit(size_t n, const float *x, const float *y, size_t limit)
{
    if (n <= limit)
        return cblas_sdot((int)n, x, 1, y, 1);
    /* The chunks' dots summed in double: one rounding to float at the end, as one call would. */
    double sum = 0.0;
    for (size_t i = 0; i < n; i += limit)
        sum += (double)cblas_sdot((int)min_size(n - i, limit), x + i, 1, y + i, 1);
    return (float)sum;
}

float sae__sdot(size_t n, const float *x, const float *y)
{
    return sae__sdot_limit(n, x, y, INT_MAX);
}

float sae__snrm2_limit(size_t n, const float *x, size_t limit)
{
    if (n <= limit)
        return cblas_snrm2((int)n, x, 1);
    /* The norm of the chunks' norms, kept as scale * sqrt(ssq) with scale the largest so far
     * (LAPACK's slassq), so that squares of norms near FLT_MAX, or tiny ones, neither overflow
     * nor vanish. */
    double scale = 0.0, ssq = 1.0;
    for (size_t i = 0; i < n; i += limit) {
        const double r = cblas_snrm2((int)min_size(n - i, limit), x + i, 1);
        if (isnan(r) || isinf(r))
            return (float)r;
        if (r > scale) {
            ssq = 1.0 + ssq * (scale / r) * (scale / r);
            scale = r;
        } else if (r > 0.0) {
            ssq += (r / scale) * (r / scale);
        }
    }
    return (float)(scale * sqrt(ssq));
}

float sae__snrm2(size_t n, const float *x) { return sae__snrm2_limit(n, x, INT_MAX); }
