/* circuit-tracer's per-layer transcoders (safety-research/circuit-tracer,
 * transcoder/single_layer_transcoder.py: load_relu_transcoder and SingleLayerTranscoder.
 * to_safetensors; transcoder/activation_functions.py): layer_<l>.safetensors, one per layer,
 * with no cfg.json beside it. Its tensors and math:
 *   W_enc [d_sae][d_in]     pre = x @ W_enc^T + b_enc        (F.linear; no b_dec subtraction)
 *   W_dec [d_sae][d_out]    today; [d_out][d_sae] in the June 2025 release, whose loader
 *                           transposed it: both are read, told apart by b_enc and b_dec's sizes
 *   W_skip [d_out][d_in]    y += x @ W_skip^T
 *   activation_function.threshold [d_sae]: JumpReLU f = pre * (pre > threshold), else ReLU
 * Its JumpReLU keeps pre where pre > threshold with no ReLU: libsae's max(pre, 0) * (pre >
 * threshold) is the same function exactly when no threshold is negative (pre > t >= 0 implies
 * pre > 0), so a negative threshold is refused. Its TopK (x * gate of the k largest, no ReLU)
 * keeps negative values when fewer than k are positive, which libsae's TopK never does: such a
 * file (a `k` or `log_thresholds` entry, which its own loader rejects too) is refused by name. */
#include "formats.h"

#include <string.h>

bool sae__circuit_tracer_like(const sae__safetensors *st)
{
    if (sae__st_find(st, "activation_function.threshold") != NULL)
        return true;
    const sae__st_tensor *we = sae__st_find(st, "W_enc"), *be = sae__st_find(st, "b_enc");
    /* SAELens stores W_enc [d_in][d_sae]; circuit-tracer the transpose. A square W_enc cannot
     * tell them apart and stays SAELens's. */
    return we != NULL && be != NULL && we->ndim == 2 && be->ndim == 1 &&
           we->shape[0] == be->shape[0] && we->shape[1] != be->shape[0];
}

int sae__circuit_tracer_load(const sae__safetensors *st, sae__map *map, sae_model **out)
{
    *out = NULL;
    static const char *const topk[] = {"k", "activation_function.k", "top_k", "log_thresholds"};
    for (size_t i = 0; i < sizeof topk / sizeof topk[0]; i++)
        if (sae__st_find(st, topk[i]) != NULL)
            return sae__fail(SAE_EUNSUPPORTED,
                             "%s: circuit-tracer transcoder with '%s': its TopK keeps negative "
                             "values (no ReLU) and its loader rejects the entry; libsae's TopK "
                             "rectifies, so it is not run",
                             st->path, topk[i]);
    const sae__st_tensor *we = sae__st_find(st, "W_enc"), *wd = sae__st_find(st, "W_dec");
    const sae__st_tensor *be = sae__st_find(st, "b_enc"), *bd = sae__st_find(st, "b_dec");
    if (we == NULL || wd == NULL || be == NULL || bd == NULL || we->ndim != 2 || wd->ndim != 2 ||
        be->ndim != 1 || bd->ndim != 1)
        return sae__fail(SAE_EFORMAT,
                         "%s: a circuit-tracer transcoder needs 2-D W_enc and W_dec and 1-D "
                         "b_enc and b_dec",
                         st->path);
    const size_t d_sae = be->shape[0], d_out = bd->shape[0], d_in = we->shape[1];
    unsigned transpose = 1u << SAE_W_ENC | 1u << SAE_W_SKIP;
    if (wd->shape[0] == d_out && wd->shape[1] == d_sae && d_out != d_sae)
        transpose |= 1u << SAE_W_DEC; /* the June 2025 release's [d_out][d_sae] */
    else if (d_out == d_sae)
        return sae__fail(SAE_EUNSUPPORTED,
                         "%s: circuit-tracer W_dec is square (%zu x %zu): the release it comes "
                         "from ([d_sae][d_out] or [d_out][d_sae]) cannot be told",
                         st->path, d_sae, d_out);
    const bool jump = sae__st_find(st, "activation_function.threshold") != NULL;
    const sae__shape shape = {jump ? SAE_ARCH_JUMPRELU : SAE_ARCH_RELU, d_in, d_sae, d_out, true,
                              sae__st_find(st, "W_skip") != NULL};
    const char *names[SAE__TENSOR_END] = {NULL};
    names[SAE_W_ENC] = "W_enc";
    names[SAE_W_DEC] = "W_dec";
    names[SAE_B_ENC] = "b_enc";
    names[SAE_B_DEC] = "b_dec";
    names[SAE_THRESHOLD] = "activation_function.threshold";
    names[SAE_W_SKIP] = "W_skip";
    sae_model *m;
    int rc = sae__model_from_st(st, map, &shape, names, transpose, "circuit-tracer", &m);
    if (rc != SAE_OK)
        return rc;
    m->apply_b_dec = 0;
    for (size_t i = 0; jump && i < d_sae; i++)
        if (m->threshold[i] < 0.0f) {
            rc = sae__fail(SAE_EUNSUPPORTED,
                           "%s: activation_function.threshold[%zu] = %g is negative: "
                           "circuit-tracer's JumpReLU then keeps negative values, which "
                           "libsae's (rectifying) JumpReLU does not",
                           st->path, i, (double)m->threshold[i]);
            sae_model_free(m);
            return rc;
        }
    *out = m;
    return SAE_OK;
}
