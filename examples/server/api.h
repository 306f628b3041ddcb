/*
 * sae-server's JSON: OpenAI completion and chat requests (with the `steering` extension) turned
 * into engine jobs, /v1/features requests, and every response body, as cJSON prints them.
 * Every returned string is malloc'd; the caller frees it.
 */
#ifndef SAE_SERVER_API_H
#define SAE_SERVER_API_H

#include "server.h"

#include <stdbool.h>
#include <stddef.h>

/* A request the server refuses: HTTP status, message, OpenAI's error type. */
typedef struct {
    int status;
    const char *type;
    char message[512];
} api_err;

/* {"error": {"message", "type", "param": null, "code": null}} */
char *api_error_json(const char *message, const char *type);

typedef struct {
    bool chat;
    bool stream;
} gen_opts;

/* Fills j (kind, prompt, sampling, stop, plans, deadline) from a completion (chat false) or
 * chat completion request. Returns 0, or -1 with e set; j is then cleared by the caller
 * (job_clear). */
int api_parse_generate(server *s, const char *body, size_t len, bool chat, job *j, gen_opts *o,
                       api_err *e);
/* The whole (non-streamed) response of a finished job. */
char *api_generate_json(const server *s, const job *j, const gen_opts *o, const char *id,
                        long created);
/* One streamed chunk: delta text (n bytes), and/or the role (chat's first chunk), and/or the
 * finish reason (NULL while running). */
char *api_chunk_json(const server *s, const gen_opts *o, const char *id, long created,
                     const char *delta, size_t n, bool role, const char *finish);

typedef struct {
    int top_k;
    size_t n_sel;          /* features whose value every token reports, in order */
    size_t *sel_dict;
    uint32_t *sel_feature;
} feat_opts;

/* POST /v1/features: {"text", "top_k", "features": [{"hook", "feature"}]}. */
int api_parse_features(server *s, const char *body, size_t len, job *j, feat_opts *o,
                       api_err *e);
char *api_features_json(const server *s, const job *j, const feat_opts *o, api_err *e);
void feat_opts_clear(feat_opts *o);

/* GET /v1/models and GET /v1/features (the loaded dictionaries). */
char *api_models_json(const server *s);
char *api_dicts_json(const server *s);
/* GET /v1/features/{hook}/{id}: the feature's card. */
char *api_card_json(const server *s, const char *hook, const char *id, api_err *e);

#endif
