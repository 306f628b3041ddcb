/* Activations to codes: the pre-activation GEMM, each architecture's activation, dense and
 * sparse output. */
#include "internal.h"

#include <cblas.h>
#include <stdlib.h>
#include <string.h>

/* Scratch for [block][d_sae] pre-activations: about 64 MiB, but never fewer than 32 tokens,
 * below which the GEMM would reread W_enc too often. */
size_t sae__block_tokens(size_t d_sae, size_t n)
{
    size_t block = ((size_t)16 << 20) / d_sae;
    if (block < 32)
        block = 32;
    return block < n ? block : n;
}

/* Whether the encoder can read x as it is, with no scaled or shifted copy. */
static bool input_is_raw(const sae_model *m) { return m->input_scale == 1.0f && !m->apply_b_dec; }

void sae__preact(const sae_model *m, const float *x, size_t n, float *xs, float *pre)
{
    const size_t d_in = m->d_in, d_sae = m->d_sae;
    const float *in = x;
    if (!input_is_raw(m)) {
        for (size_t t = 0; t < n; t++) {
            const float *row = x + t * d_in;
            float *out = xs + t * d_in;
            for (size_t j = 0; j < d_in; j++)
                out[j] = m->input_scale * row[j] - (m->apply_b_dec ? m->b_dec[j] : 0.0f);
        }
        in = xs;
    }
    for (size_t t = 0; t < n; t++)
        memcpy(pre + t * d_sae, m->b_enc, d_sae * sizeof(float));
    if (n == 1)
        cblas_sgemv(CblasRowMajor, CblasTrans, (int)d_in, (int)d_sae, 1.0f, m->W_enc, (int)d_sae,
                    in, 1, 1.0f, pre, 1);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)d_sae, (int)d_in,
                    1.0f, in, (int)d_in, m->W_enc, (int)d_sae, 1.0f, pre, (int)d_sae);
}

void sae__activate_inplace(const sae_model *m, float *pre, size_t n)
{
    const size_t d_sae = m->d_sae;
    switch (m->arch) {
    case SAE_ARCH_RELU:
    case SAE_ARCH_TOPK: /* TopK's selection happens after, on the rectified values */
        for (size_t i = 0; i < n * d_sae; i++)
            pre[i] = pre[i] > 0.0f ? pre[i] : 0.0f;
        break;
    case SAE_ARCH_JUMPRELU:
        for (size_t t = 0; t < n; t++) {
            float *row = pre + t * d_sae;
            for (size_t i = 0; i < d_sae; i++)
                row[i] = (row[i] > m->threshold[i] && row[i] > 0.0f) ? row[i] : 0.0f;
        }
        break;
    case SAE_ARCH_BATCHTOPK: {
        const float theta = m->batch_threshold;
        for (size_t i = 0; i < n * d_sae; i++)
            pre[i] = (pre[i] > theta && pre[i] > 0.0f) ? pre[i] : 0.0f;
        break;
    }
    }
}

static int check_encode_args(const char *fn, const sae_model *m, const float *x, size_t n,
                             const void *out)
{
    SAE_CHECK_NULL_IN(fn, m);
    if (n == 0)
        return SAE_OK;
    SAE_CHECK_NULL_IN(fn, x);
    SAE_CHECK_NULL_IN(fn, out);
    size_t count;
    if (!sae__mul(n, m->d_in, &count) || !sae__mul(n, m->d_sae, &count) ||
        !sae__mul(count, sizeof(float), &count) || n > INT32_MAX)
        return sae__fail(SAE_EINVAL, "n = %zu tokens is too many", n);
    return sae__check_finite(x, n * m->d_in, m->d_in, "x");
}

int sae_encode(const sae_model *m, const float *x, size_t n, float *f)
{
    int rc = check_encode_args(__func__, m, x, n, f);
    if (rc != SAE_OK || n == 0)
        return rc;
    float *xs = NULL;
    sae__scored *heap = NULL;
    if (!input_is_raw(m) && (xs = sae__alloc(n * m->d_in, sizeof(float), "encode scratch")) == NULL)
        return SAE_ENOMEM;
    if (m->arch == SAE_ARCH_TOPK &&
        (heap = sae__alloc(m->k < m->d_sae ? m->k : m->d_sae, sizeof *heap, "top-k heap")) == NULL) {
        free(xs);
        return SAE_ENOMEM;
    }
    sae__preact(m, x, n, xs, f);
    if (m->arch == SAE_ARCH_TOPK) {
        for (size_t t = 0; t < n; t++)
            sae__topk_dense(f + t * m->d_sae, m->d_sae, m->k, heap);
    } else {
        sae__activate_inplace(m, f, n);
    }
    free(xs);
    free(heap);
    return SAE_OK;
}

int sae_encode_sparse(const sae_model *m, const float *x, size_t n, size_t k, uint32_t *idx,
                      float *val, uint32_t *count)
{
    int rc = check_encode_args(__func__, m, x, n, idx);
    if (rc != SAE_OK)
        return rc;
    if (k == 0)
        return sae__fail(SAE_EINVAL, "k must be at least 1");
    if (n == 0)
        return SAE_OK;
    SAE_CHECK_NULL(val);
    SAE_CHECK_NULL(count);
    size_t slots;
    if (!sae__mul(n, k, &slots) || !sae__mul(slots, sizeof(float), &slots))
        return sae__fail(SAE_EINVAL, "n * k = %zu * %zu overflows", n, k);

    /* A TopK token has at most K nonzeros, so selecting more than K is wasted work. */
    size_t select = k;
    if (m->arch == SAE_ARCH_TOPK && m->k < select)
        select = m->k;
    if (select > m->d_sae)
        select = m->d_sae;
    const size_t block = sae__block_tokens(m->d_sae, n);
    float *pre = sae__alloc(block * m->d_sae, sizeof(float), "encode scratch");
    float *xs = input_is_raw(m) ? NULL : sae__alloc(block * m->d_in, sizeof(float), "encode scratch");
    sae__scored *heap = sae__alloc(select, sizeof *heap, "top-k heap");
    if (pre == NULL || heap == NULL || (xs == NULL && !input_is_raw(m))) {
        free(pre);
        free(xs);
        free(heap);
        return SAE_ENOMEM;
    }
    for (size_t first = 0; first < n; first += block) {
        size_t rows = n - first < block ? n - first : block;
        sae__preact(m, x + first * m->d_in, rows, xs, pre);
        if (m->arch != SAE_ARCH_TOPK)
            sae__activate_inplace(m, pre, rows);
        for (size_t r = 0; r < rows; r++) {
            size_t t = first + r;
            size_t kept = sae__topk_select(pre + r * m->d_sae, m->d_sae, select, heap);
            uint32_t nonzero = 0;
            for (size_t j = 0; j < kept && heap[j].value > 0.0f; j++) {
                idx[t * k + j] = heap[j].index;
                val[t * k + j] = heap[j].value;
                nonzero++;
            }
            for (size_t j = nonzero; j < k; j++) {
                idx[t * k + j] = 0;
                val[t * k + j] = 0.0f;
            }
            count[t] = nonzero;
        }
    }
    free(pre);
    free(xs);
    free(heap);
    return SAE_OK;
}
