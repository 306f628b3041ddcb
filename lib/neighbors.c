/* Nearest features by decoder direction: cosine similarity of W_dec rows, one GEMV (or its
 * bfloat16 counterpart). */
#include "internal.h"

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
    const size_t d_out = m->d_out;
    float *sim = sae__alloc(m->d_sae, sizeof *sim, "neighbour scratch");
    float *dir = sae__alloc(2 * d_out, sizeof *dir, "neighbour scratch"), *row = dir + d_out;
    sae__scored *heap = sae__alloc(k, sizeof *heap, "neighbour heap");
    if (sim == NULL || dir == NULL || heap == NULL) {
        free(sim);
        free(dir);
        free(heap);
        return SAE_ENOMEM;
    }
    sae__dec_row(m, feature, dir);
    sae__dec_dots(m, dir, sim);
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
            sae__dec_row(m, i, row);
            for (size_t j = 0; j < d_out; j++)
                dot += (double)row[j] * dir[j];
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
    free(dir);
    free(heap);
    return SAE_OK;
}
