/*
 * sae-llama-evaluate: a dictionary spliced into llama.cpp's forward pass, scored as SAELens's
 * evals.py scores it (evalcore.h gives every definition).
 *
 *   sae-llama-evaluate -m MODEL.gguf --dict DICT --hook blocks.L.hook_X --capture DIR
 *                      [--max-tokens N] [--threads N]
 *
 * The tokens are a capture's windows (DIR/index.json, its shards' tokens and positions; a window
 * starts where the position is 0), so that libsae's engine (sae-engine-hooks evaluate) scores the
 * same tokens. Each window runs three times, in three contexts with their own hooks
 * (sae_llama_hook): clean (a reader takes the dictionary's input and target), spliced (an SAE's
 * rows replaced by sae_reconstruct; a transcoder reading hook_mlp_in replaces hook_mlp_out by its
 * prediction; special tokens' rows left alone) and zero-ablated (the written hook zeroed).
 * F32 KV cache, no flash attention. Prints one JSON object.
 */
#define _POSIX_C_SOURCE 200809L
#include "capture_io.h"
#include "evalcore.h"
#include "sae_llama_hook.h"

#include "ggml.h"
#include "llama.h"
#include "sae.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float *x, *y;
    size_t d, cap;
} grab_t;

static int grab(void *user, const sae_llama_rows *r)
{
    grab_t *g = user;
    if (r->row0 + r->n > g->cap)
        return 1;
    memcpy(g->x + r->row0 * g->d, r->x, r->n * g->d * sizeof(float));
    memcpy(g->y + r->row0 * g->d, r->y ? r->y : r->x, r->n * g->d * sizeof(float));
    return 0;
}

int main(int argc, char **argv)
{
    const char *model_path = NULL, *dict_path = NULL, *hook = NULL, *cap_dir = NULL;
    long long max_tokens = 0;
    int threads = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) { fprintf(stderr, "sae-llama-evaluate: %s needs a value\n", a); return 2; }
        i++;
        if (!strcmp(a, "-m")) model_path = v;
        else if (!strcmp(a, "--dict")) dict_path = v;
        else if (!strcmp(a, "--hook")) hook = v;
        else if (!strcmp(a, "--capture")) cap_dir = v;
        else if (!strcmp(a, "--max-tokens")) max_tokens = atoll(v);
        else if (!strcmp(a, "--threads")) threads = atoi(v);
        else { fprintf(stderr, "sae-llama-evaluate: unknown option %s\n", a); return 2; }
    }
    if (!model_path || !dict_path || !hook || !cap_dir || max_tokens < 0 || threads < 0) {
        fprintf(stderr, "usage: sae-llama-evaluate -m MODEL.gguf --dict DICT --hook "
                        "blocks.L.hook_X --capture DIR [--max-tokens N] [--threads N]\n");
        return 2;
    }
    char err[1024];
    int L;
    sae_llama_point pt;
    if (sae_llama_hook_parse(hook, &L, &pt, err, sizeof err) != 0) {
        fprintf(stderr, "sae-llama-evaluate: %s\n", err);
        return 2;
    }
    sae_model *dict;
    if (sae_model_load(&dict, dict_path) != SAE_OK) {
        fprintf(stderr, "sae-llama-evaluate: %s\n", sae_last_error());
        return 1;
    }
    const bool tc = sae_model_is_transcoder(dict);
    cio_index ix;
    if (cio_index_load(cap_dir, &ix, err, sizeof err) != 0) {
        fprintf(stderr, "sae-llama-evaluate: %s\n", err);
        return 1;
    }
    struct llama_model *model = sae_llama_load_model(model_path, false);
    if (!model) {
        fprintf(stderr, "sae-llama-evaluate: cannot load the model %s\n", model_path);
        return 1;
    }
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    const int V = llama_vocab_n_tokens(vocab);
    const size_t d = (size_t)llama_model_n_embd(model);
    /* the special tokens (SAELens: the tokenizer's *_token_id): control and unknown tokens */
    llama_token special[64];
    size_t n_special = 0;
    for (llama_token t = 0; t < V && n_special < 64; t++)
        if (llama_vocab_get_attr(vocab, t) & (LLAMA_TOKEN_ATTR_CONTROL | LLAMA_TOKEN_ATTR_UNKNOWN))
            special[n_special++] = t;

    /* the three hook tables */
    char out_hook[64];
    snprintf(out_hook, sizeof out_hook, "blocks.%d.hook_mlp_out", L);
    const char *zero_at = tc ? out_hook : hook;
    size_t win_cap = 0;
    for (int s = 0; s < ix.n_shards; s++)
        if ((size_t)ix.tokens[s] > win_cap) win_cap = (size_t)ix.tokens[s];
    grab_t g = {.d = d};
    sae_llama_entry e_clean = {.hook = hook, .dict = dict, .reader = grab, .user = &g};
    sae_llama_entry e_splice = {.hook = hook, .dict = dict, .edit = SAE_LLAMA_SPLICE,
                                .keep = special, .n_keep = n_special};
    sae_llama_entry e_zero = {.hook = zero_at, .edit = SAE_LLAMA_ZERO};
    const sae_llama_entry *tabs[3] = {&e_clean, &e_splice, &e_zero};
    sae_llama_hooks *hk[3] = {0};
    struct llama_context *ctx[3] = {0};
    int n_ctx = llama_model_n_ctx_train(model);
    for (int k = 0; k < 3; k++) {
        if (sae_llama_hooks_new(&hk[k], model, tabs[k], 1, err, sizeof err) != 0) {
            fprintf(stderr, "sae-llama-evaluate: %s\n", err);
            return 2;
        }
        struct llama_context_params cp = llama_context_default_params();
        cp.n_ctx = (uint32_t)n_ctx;
        cp.n_batch = cp.n_ctx;
        cp.n_ubatch = cp.n_ctx < 512 ? cp.n_ctx : 512;
        cp.type_k = GGML_TYPE_F32;
        cp.type_v = GGML_TYPE_F32;
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
        if (threads) { cp.n_threads = threads; cp.n_threads_batch = threads; }
        sae_llama_hooks_params(hk[k], &cp);
        if (!(ctx[k] = llama_init_from_model(model, cp))) {
            fprintf(stderr, "sae-llama-evaluate: cannot create a context\n");
            return 1;
        }
    }
    evalcore *ev = evalcore_new(dict, (size_t)V);
    float *logits[3];
    for (int k = 0; k < 3; k++)
        logits[k] = malloc(sizeof(float) * (size_t)n_ctx * (size_t)V);
    g.cap = (size_t)n_ctx;
    g.x = malloc(sizeof(float) * g.cap * d);
    g.y = malloc(sizeof(float) * g.cap * d);
    unsigned char *spec = malloc((size_t)n_ctx);
    struct llama_batch batch = llama_batch_init(n_ctx, 0, 1);
    if (!ev || !logits[0] || !logits[1] || !logits[2] || !g.x || !g.y || !spec)
        return 1;

    long long done = 0;
    for (int s = 0; s < ix.n_shards && (!max_tokens || done < max_tokens); s++) {
        char path[4096];
        int32_t *tok, *pos;
        size_t nt, np;
        snprintf(path, sizeof path, "%s/%s.tokens.npy", cap_dir, ix.shards[s]);
        if (cio_npy_read_i32(path, &tok, &nt, err, sizeof err) != 0) {
            fprintf(stderr, "sae-llama-evaluate: %s\n", err);
            return 1;
        }
        snprintf(path, sizeof path, "%s/%s.positions.npy", cap_dir, ix.shards[s]);
        if (cio_npy_read_i32(path, &pos, &np, err, sizeof err) != 0 || np != nt) {
            fprintf(stderr, "sae-llama-evaluate: %s\n", err);
            return 1;
        }
        for (size_t w0 = 0; w0 < nt && (!max_tokens || done < max_tokens);) {
            size_t n = 1;
            while (w0 + n < nt && pos[w0 + n] != 0)
                n++;
            if (max_tokens && done + (long long)n > max_tokens)
                n = (size_t)(max_tokens - done);
            if (n > (size_t)n_ctx) {
                fprintf(stderr, "sae-llama-evaluate: a window of %zu tokens is longer than the "
                                "model's context %d\n", n, n_ctx);
                return 1;
            }
            batch.n_tokens = 0;
            for (size_t i = 0; i < n; i++) {
                const int b = batch.n_tokens++;
                batch.token[b] = tok[w0 + i];
                batch.pos[b] = (llama_pos)i;
                batch.n_seq_id[b] = 1;
                batch.seq_id[b][0] = 0;
                batch.logits[b] = 1;
                spec[i] = 0;
                for (size_t k = 0; k < n_special; k++)
                    if (tok[w0 + i] == special[k]) spec[i] = 1;
            }
            for (int k = 0; k < 3; k++) {
                llama_memory_clear(llama_get_memory(ctx[k]), true);
                if (sae_llama_decode(hk[k], ctx[k], batch) != 0) {
                    fprintf(stderr, "sae-llama-evaluate: %s\n", sae_llama_hooks_error(hk[k]));
                    return 1;
                }
                for (size_t i = 0; i < n; i++)
                    memcpy(logits[k] + i * (size_t)V, llama_get_logits_ith(ctx[k], (int32_t)i),
                           sizeof(float) * (size_t)V);
            }
            evalcore_logits(ev, logits[0], logits[1], logits[2], tok + w0, spec, n);
            if (evalcore_rows(ev, g.x, g.y, spec, n) != SAE_OK) {
                fprintf(stderr, "sae-llama-evaluate: %s\n", sae_last_error());
                return 1;
            }
            done += (long long)n;
            w0 += n;
        }
        free(tok);
        free(pos);
    }
    if (done == 0) {
        fprintf(stderr, "sae-llama-evaluate: the capture %s holds no tokens\n", cap_dir);
        return 1;
    }
    char extra[512];
    int o = snprintf(extra, sizeof extra, "\"engine\":\"llama.cpp\",\"hook\":\"%s\",\"transcoder\":%s,"
                     "\"special\":[", hook, tc ? "true" : "false");
    for (size_t k = 0; k < n_special && o < 400; k++)
        o += snprintf(extra + o, sizeof extra - (size_t)o, "%s%d", k ? "," : "", special[k]);
    snprintf(extra + o, sizeof extra - (size_t)o, "]");
    evalcore_print_json(ev, stdout, extra);
    for (int k = 0; k < 3; k++) {
        llama_free(ctx[k]);
        sae_llama_hooks_free(hk[k]);
        free(logits[k]);
    }
    llama_batch_free(batch);
    evalcore_free(ev);
    free(g.x); free(g.y); free(spec);
    cio_index_free(&ix);
    llama_model_free(model);
    sae_model_free(dict);
    return 0;
}
