/*
 * Feature cards for sae-server: what one dictionary feature does, from a statistics file that
 * a capture pass over a corpus wrote, the dictionary itself and the engine model's unembedding.
 *
 * A card is a JSON object: the feature's firing frequency, an activation histogram, its top
 * contexts with per-token values, the tokens its decoder row promotes and suppresses most (the
 * row through the model's final norm and unembedding) and its nearest features by decoder
 * cosine. The exact fields are documented in docs/server.md.
 */
#ifndef SAE_SERVER_FEATURES_H
#define SAE_SERVER_FEATURES_H

#include "llama.h"
#include "sae.h"

#include <cjson/cJSON.h>
#include <stddef.h>
#include <stdint.h>

typedef struct feature_cards feature_cards;

/* Opens the statistics file at stats_path, written for dictionary m (its d_sae must match) over
 * text tokenized by lm's vocabulary; gguf_path is the file lm was loaded from (its final norm and
 * unembedding are read from it). m and lm must outlive *out. Returns 0, or -1 with a message in
 * err (a missing, malformed or mismatched file). */
int feature_cards_open(feature_cards **out, const char *stats_path, const sae_model *m,
                       const struct llama_model *lm, const char *gguf_path, char *err,
                       size_t errlen);

/* The card of one feature as a new cJSON object the caller frees with cJSON_Delete, or NULL with
 * a message in err (feature >= d_sae, out of memory). Thread safe: any number of threads may ask
 * for cards of the same feature_cards at once. */
cJSON *feature_cards_card(const feature_cards *fc, uint32_t feature, char *err, size_t errlen);

void feature_cards_free(feature_cards *fc);

#endif
