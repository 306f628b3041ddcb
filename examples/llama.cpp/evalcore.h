/*
 * evalcore: the numbers sae-llama-evaluate (llama.cpp) and sae-engine-hooks evaluate (libsae's
 * own engine) report, computed by the same code from the same arrays, as SAELens's evals.py
 * defines them (sae_lens/evals.py, get_recons_loss / get_downstream_reconstruction_metrics /
 * get_sparsity_and_variance_metrics, with exclude_special_tokens):
 *   - a token is counted when it is not special (BOS, EOS, unknown); the spliced run leaves the
 *     special tokens' rows as they were, the zero-ablated run zeroes every row;
 *   - CE loss: per position t < n-1 of a window, -log softmax(logits_t)[token_{t+1}], counted
 *     when token_t is; the mean over counted positions (clean, spliced, zero-ablated);
 *   - CE loss recovered (ce_loss_score) = (ablated - spliced) / (ablated - clean);
 *   - KL: per position, sum_v p_clean (log p_clean - log p_new), mean over counted positions
 *     (kl_div_with_sae, kl_div_with_ablation), kl_div_score = (abl - sae) / abl;
 *   - L0: mean over counted tokens of the number of features > 0;
 *   - dead features: features > 0 on none of the counted tokens (feature_density == 0);
 *   - FVU = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 over counted tokens (y = x for an SAE, the
 *     MLP output for a transcoder), which is 1 - the explained variance evals.py intends;
 *     saelens_explained_variance is evals.py's formula as written at the commit read
 *     (1 - mean ||y - y_hat||^2 / (mean ||y||^2 - mean(y^2 over all elements)^2)), reported
 *     beside it because it is not 1 - FVU.
 */
#ifndef EVALCORE_H
#define EVALCORE_H

#include "sae.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef struct evalcore evalcore;

evalcore *evalcore_new(const sae_model *dict, size_t vocab);
void evalcore_free(evalcore *e);
/* One window: logits [n][vocab] of the clean, spliced and zero-ablated runs; tokens [n];
 * special[n] 1 for a token not counted. */
void evalcore_logits(evalcore *e, const float *clean, const float *spliced, const float *zero,
                     const int32_t *tok, const unsigned char *special, size_t n);
/* One window's rows at the hook in the clean run: x [n][d_in] the dictionary's input, y [n][d_out]
 * its target (x for an SAE). Returns 0 or a libsae error code. */
int evalcore_rows(evalcore *e, const float *x, const float *y, const unsigned char *special,
                  size_t n);
/* Prints the results as one JSON object. */
void evalcore_print_json(const evalcore *e, FILE *f, const char *extra);

#endif
