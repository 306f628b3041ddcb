/* Matryoshka BatchTopK training (Bussmann et al. 2025; dictionary_learning's
 * MatryoshkaBatchTopKTrainer, SAELens's matryoshka_batchtopk): a BatchTopK model whose latents
 * are split into consecutive groups, trained to reconstruct from every prefix of groups. With
 * G groups ending at widths w_0 < ... < w_{G-1} = d_sae, per token
 *   e_g  = b_dec + sum_{active i < w_g} f_i W_dec[i] - x_s        (prefix g's error)
 *   loss = (1/G) sum_g ||e_g||^2 / v  +  AUXK_COEFF * AuxK(e_{G-1})
 * (v the init sample's variance, as TopK's loss; equal weights, dictionary_learning's default
 * group_weights, whose mean over groups this is). The codes are BatchTopK's, selected once; only
 * the losses nest. A latent of group h reaches every prefix from h on, so its gradient is that
 * of the suffix sum S_h = (2 / (G v)) sum_{g >= h} e_g: walking the groups from the widest down,
 * each prefix error is the wider one minus its group's decoded codes, and S grows by one term.
 * Inference is BatchTopK's threshold form (the model's SAE_PARAM_THRESHOLD), as both peers save
 * it. */
#include "train_internal.h"

#include <stdlib.h>
#include <string.h>

double sae__matryoshka_token(sae_trainer *t, size_t i, float *e, const float *xin, float g_main,
                             double *sse_first)
{
    const sae_model *m = t->m;
    const size_t d_out = m->d_out, G = t->n_groups, first = t->act_ptr[i];
    const float c = (float)t->out_scale, w = g_main / (float)G;
    float *pe = t->mat_e, *S = t->mat_s;
    memcpy(pe, e, d_out * sizeof(float));
    memset(S, 0, d_out * sizeof(float));
    double loss = 0.0;
    /* BatchTopK lists a token's latents in increasing index: walk them backwards. */
    size_t a = t->act_ptr[i + 1];
    for (size_t g = G; g-- > 0;) {
        const size_t start = g > 0 ? t->group_end[g - 1] : 0;
        const double sq = sae__dot(d_out, pe, pe);
        loss += sq;
        if (g == 0)
            *sse_first += sq;
        sae__axpy(d_out, w, pe, S); /* S = S_g */
        for (; a > first && t->act_idx[a - 1] >= start; a--) {
            const uint32_t j = t->act_idx[a - 1];
            const float f = t->act_val[a - 1];
            sae__train_backprop_latent(t, j, f, S, xin);
            sae__axpy(d_out, -c * f, m->W_dec + (size_t)j * d_out, pe);
        }
    }
    memcpy(e, S, d_out * sizeof(float)); /* S_0: what b_dec and W_skip receive */
    return loss / ((double)G * t->mse_norm);
}

int sae__matryoshka_set(sae_trainer *t, const size_t *sizes, size_t n, const char *fn)
{
    const sae_model *m = t->m;
    if (n == 0) {
        free(t->group_end);
        t->group_end = NULL;
        t->n_groups = 0;
        return SAE_OK;
    }
    if (m->arch != SAE_ARCH_BATCHTOPK)
        return sae__fail(SAE_EUNSUPPORTED, "%s: Matryoshka groups apply to BatchTopK models, not "
                         "%s", fn, sae_arch_name(m->arch));
    SAE_CHECK_NULL(sizes);
    size_t sum = 0;
    for (size_t g = 0; g < n; g++) {
        if (sizes[g] == 0 || sizes[g] > m->d_sae - sum)
            return sae__fail(SAE_EINVAL, "%s: group sizes must be positive and sum to d_sae = "
                             "%zu (group %zu is %zu, after %zu)", fn, m->d_sae, g, sizes[g], sum);
        sum += sizes[g];
    }
    if (sum != m->d_sae)
        return sae__fail(SAE_EINVAL, "%s: group sizes sum to %zu, not d_sae = %zu", fn, sum,
                         m->d_sae);
    size_t *end = sae__alloc(n, sizeof(size_t), "Matryoshka groups");
    if (end == NULL)
        return SAE_ENOMEM;
    for (size_t g = 0, at = 0; g < n; g++)
        end[g] = at += sizes[g];
    free(t->group_end);
    t->group_end = end;
    t->n_groups = n;
    return SAE_OK;
}

int sae_trainer_set_groups(sae_trainer *t, const size_t *sizes, size_t n)
{
    SAE_CHECK_NULL(t);
    return sae__matryoshka_set(t, sizes, n, "sae_trainer_set_groups");
}

int sae_trainer_get_groups(const sae_trainer *t, size_t *sizes, size_t cap, size_t *n)
{
    SAE_CHECK_NULL(t);
    SAE_CHECK_NULL(n);
    *n = t->n_groups;
    if (t->n_groups == 0 || sizes == NULL) /* NULL sizes: the count alone */
        return SAE_OK;
    if (cap < t->n_groups)
        return sae__fail(SAE_EINVAL, "sae_trainer_get_groups: the trainer has %zu groups, the "
                         "array room for %zu", t->n_groups, cap);
    for (size_t g = 0; g < t->n_groups; g++)
        sizes[g] = t->group_end[g] - (g > 0 ? t->group_end[g - 1] : 0);
    return SAE_OK;
}
