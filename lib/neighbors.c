/* Nearest features by decoder direction: cosine similarity of W_dec rows, one GEMV. */
#include "internal.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>

int sae_feature_neighbors(const sae_model *m, uint32_t feature, size_t k, uint32_t *idx,
                          float *cos)
{
    SAE_CHECK_NULL(m);
    if (feature >= m->d_sae)
        return sae__fail(SAE_ERANGE, "%s: feature %u is out of range (the model has d_sae = %zu)",
                         __func__, feature, m->d_sae);
    if (k > m->d_sae - 1)
        return sae__fail(SAE_ERANGE, "%s: k = %zu, but the model has only %zu other features",
                         __func__, k, m->d_sae - 1);
    if (k == 0)
        return SAE_OK;
    SAE_CHECK_NULL(idx);
    float *sim = sae__alloc(m->d_sae, sizeof *sim, "neighbour scratch");
    sae__scored *heap = sae__alloc(k, sizeof *heap, "neighbour heap");
    if (sim == NULL || heap == NULL) {
        free(sim);
        free(heap);
        return SAE_ENOMEM;
    }
    const size_t d_in = m->d_in;
    const float *dir = m->W_dec + (size_t)feature * d_in;
    cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)m->d_sae, (int)d_in, 1.0f, m->W_dec, (int)d_in,
                dir, 1, 0.0f, sim, 1);
    const double norm_f = m->dec_norm[feature];
    for (size_t i = 0; i < m->d_sae; i++) {
        const double norm_i = m->dec_norm[i];
        double dot = sim[i];
        if (norm_i == 0.0 || norm_f == 0.0) {
            sim[i] = 0.0f;
            continue;
        }
        if (!isfinite(dot)) { /* huge weights overflowed the float dot product */
            dot = 0.0;
            for (size_t j = 0; j < d_in; j++)
                dot += (double)m->W_dec[i * d_in + j] * dir[j];
        }
        sim[i] = (float)(dot / (norm_i * norm_f));
    }
    /* Below every cosine, so the feature itself is never among k <= d_sae - 1 selected. */
    sim[feature] = -INFINITY;
    size_t kept = sae__topk_select(sim, m->d_sae, k, heap);
    for (size_t j = 0; j < kept; j++) {
        idx[j] = heap[j].index;
        if (cos)
            cos[j] = heap[j].value;
    }
    free(sim);
    free(heap);
    return SAE_OK;
}
