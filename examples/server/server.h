/*
 * sae-server's shared state: the model, the dictionaries at their hooks, the engine and the
 * limits, as main.c sets them up; api.c (request and response JSON) and http.c (libmicrohttpd,
 * routes, streaming, logging) read it.
 */
#ifndef SAE_SERVER_H
#define SAE_SERVER_H

#include "engine.h"
#include "llama.h"
#include "sae.h"

#include <cjson/cJSON.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>

struct feature_cards;

typedef struct {
    char *hook;                    /* "blocks.L.hook_X" */
    char *path;
    sae_model *m;
    struct feature_cards *cards;   /* from --stats, or NULL */
} srv_dict;

typedef struct {
    struct llama_model *model;
    const struct llama_vocab *vocab;
    const char *model_path;
    char model_name[256];          /* what responses name as "model" */
    const char *chat_template;     /* llama.cpp template name or text; NULL = the model's */
    srv_dict *dicts;
    size_t n_dicts;
    engine *eng;
    /* limits */
    int n_ctx_seq;                 /* tokens per sequence */
    int max_tokens;                /* the most a request may ask to generate */
    int max_prompt;                /* the longest prompt, in tokens */
    size_t max_body;               /* request body bytes */
    double timeout;                /* seconds per request (queue wait + generation) */
    int features_top_k_max;
    /* GET / */
    const unsigned char *page;
    size_t page_len;
    /* requests being handled (graceful shutdown waits for 0) */
    atomic_int inflight;
    atomic_ulong next_id;
} server;

#endif
