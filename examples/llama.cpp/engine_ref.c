/*
 * sae-engine-ref: the same SAE reading and steering as sae-llama-cpp, on libsae's own example
 * engine (examples/llama, linked as the llama_engine static library) instead of llama.cpp. The
 * cross-checks compare the two token for token and row for row.
 *
 *   sae-engine-ref MODEL.bin TOKENIZER.bin --sae SAE.safetensors -t IDS [-n N] [--layer L]
 *                  [--clamp F:V] [--scale F:A] [--add F:C] [--stats TSV] [--features K]
 *                  [--dump-resid K]
 *
 * The engine's hook sees the stream entering block L once per token, in place: it records the
 * row as it arrives (and its top K features), then applies the plan with sae_steer_apply.
 * Generation is greedy with no early stop at BOS (as reference.json and sae-llama-cpp). Prints
 * one JSON object: tokens, text, features, resid.
 *
 * engine.h and llama.h name their types and functions alike (llama_model, llama_tokenize...),
 * so this is its own program rather than a mode of sae-llama-cpp.
 */
#include "engine.h"
#include "plan.h"
#include "sae.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const sae_model *sae;
    const sae_steer *plan;
    size_t top_k;
    int dim, cap_pos;
    float *rows;          /* [cap_pos][dim], before the plan */
    uint32_t *fidx, *fcnt;
    float *fval;
    int n_pos, error;
} hook_t;

static void hook(int layer, int pos, float *x, int dim, void *user)
{
    (void)layer;
    hook_t *h = user;
    if (h->error || pos >= h->cap_pos) {
        h->error = 1;
        return;
    }
    memcpy(h->rows + (size_t)pos * (size_t)dim, x, sizeof *x * (size_t)dim);
    if (pos + 1 > h->n_pos)
        h->n_pos = pos + 1;
    if (h->top_k && sae_encode_sparse(h->sae, x, 1, h->top_k, h->fidx + (size_t)pos * h->top_k,
                                      h->fval + (size_t)pos * h->top_k, h->fcnt + pos) != SAE_OK)
        h->error = 1;
    if (h->plan && sae_steer_apply(h->plan, x, 1) != SAE_OK)
        h->error = 1;
    if (h->error)
        fprintf(stderr, "sae-engine-ref: libsae at position %d: %s\n", pos, sae_last_error());
}

static void json_str(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c == '\n') fputs("\\n", stdout);
        else if (c < 0x20) printf("\\u%04x", c);
        else putchar(c);
    }
    putchar('"');
}

static int die(const char *what)
{
    fprintf(stderr, "sae-engine-ref: %s: %s\n", what, llama_last_error());
    return 1;
}

int main(int argc, char **argv)
{
    const char *model_path = NULL, *tok_path = NULL, *sae_path = NULL, *ids = NULL, *stats = NULL;
    int n_gen = 32, layer = 2, top_k = 0, dump_resid = 0, n_ops = 0;
    plan_op ops[PLAN_MAX_OPS];
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (a[0] != '-') {
            if (!model_path) model_path = a;
            else if (!tok_path) tok_path = a;
            else { fprintf(stderr, "sae-engine-ref: unexpected %s\n", a); return 2; }
            continue;
        }
        if (!v) { fprintf(stderr, "sae-engine-ref: %s needs a value\n", a); return 2; }
        i++;
        if (!strcmp(a, "--sae")) sae_path = v;
        else if (!strcmp(a, "-t")) ids = v;
        else if (!strcmp(a, "-n")) n_gen = atoi(v);
        else if (!strcmp(a, "--layer")) layer = atoi(v);
        else if (!strcmp(a, "--features")) top_k = atoi(v);
        else if (!strcmp(a, "--dump-resid")) dump_resid = atoi(v);
        else if (!strcmp(a, "--stats")) stats = v;
        else if (!strcmp(a, "--clamp") || !strcmp(a, "--scale") || !strcmp(a, "--add")) {
            if (n_ops == PLAN_MAX_OPS || plan_parse_op(a[2], v, &ops[n_ops]) != 0) {
                fprintf(stderr, "sae-engine-ref: %s wants FEATURE:VALUE, got \"%s\"\n", a, v);
                return 2;
            }
            n_ops++;
        } else { fprintf(stderr, "sae-engine-ref: unknown option %s\n", a); return 2; }
    }
    if (!model_path || !tok_path || !sae_path || !ids || n_gen < 0 || top_k < 0 || dump_resid < 0) {
        fprintf(stderr, "usage: sae-engine-ref MODEL.bin TOKENIZER.bin --sae SAE -t IDS [-n N] "
                        "[--layer L] [--clamp F:V] [--scale F:A] [--add F:C] [--stats TSV] "
                        "[--features K] [--dump-resid K]\n");
        return 2;
    }

    sae_model *sae;
    if (sae_model_load(&sae, sae_path) != SAE_OK) {
        fprintf(stderr, "sae-engine-ref: %s\n", sae_last_error());
        return 1;
    }
    llama_model *m;
    llama_tokenizer *tk;
    llama_state *st;
    if (llama_model_load(model_path, &m) != LLAMA_OK)
        return die("model");
    const llama_config *cfg = llama_model_config(m);
    if (llama_tokenizer_load(tok_path, cfg->vocab_size, &tk) != LLAMA_OK)
        return die("tokenizer");
    if (llama_state_create(m, &st) != LLAMA_OK)
        return die("state");
    if ((size_t)cfg->dim != sae_model_d_in(sae) || layer < 1 || layer >= cfg->n_layers) {
        fprintf(stderr, "sae-engine-ref: the model (dim %d, %d layers) does not fit an SAE of d_in"
                        " %zu at layer %d\n", cfg->dim, cfg->n_layers, sae_model_d_in(sae), layer);
        return 2;
    }

    float *mx = NULL;
    sae_steer *plan;
    char desc[1024];
    if (stats && !(mx = plan_load_max(stats, sae_model_d_sae(sae))))
        return 1;
    if (plan_build(sae, ops, n_ops, mx, &plan, desc, sizeof desc) != 0)
        return 2;

    int *toks = malloc(sizeof *toks * (size_t)(cfg->seq_len + 1));
    int n_prompt = 0;
    for (const char *s = ids; *s && n_prompt < cfg->seq_len;) {
        char *end;
        errno = 0;
        long t = strtol(s, &end, 10);
        if (errno || end == s || t < 0 || t >= cfg->vocab_size) {
            fprintf(stderr, "sae-engine-ref: bad token id list \"%s\"\n", ids);
            return 2;
        }
        toks[n_prompt++] = (int)t;
        s = *end ? end + 1 : end;
    }
    if (n_prompt == 0 || n_prompt + n_gen > cfg->seq_len) {
        fprintf(stderr, "sae-engine-ref: need 1..%d prompt + generated tokens\n", cfg->seq_len);
        return 2;
    }

    hook_t h = {.sae = sae, .plan = plan, .top_k = (size_t)top_k, .dim = cfg->dim,
                .cap_pos = n_prompt + n_gen};
    const size_t kk = top_k ? (size_t)top_k : 1;
    h.rows = malloc(sizeof *h.rows * (size_t)h.cap_pos * (size_t)cfg->dim);
    h.fidx = malloc(sizeof *h.fidx * (size_t)h.cap_pos * kk);
    h.fval = malloc(sizeof *h.fval * (size_t)h.cap_pos * kk);
    h.fcnt = malloc(sizeof *h.fcnt * (size_t)h.cap_pos);
    llama_sampler *smp;
    if (!toks || !h.rows || !h.fidx || !h.fval || !h.fcnt ||
        llama_sampler_create(cfg->vocab_size, 0.0f, 0.0f, 1, &smp) != LLAMA_OK ||
        llama_state_set_hook(st, layer, hook, &h) != LLAMA_OK)
        return die("setup");

    /* greedy: every position through the hook, one token at a time; no early stop */
    int n = 0;
    for (; n < n_prompt; n++)
        if (llama_forward(st, toks[n], n) != LLAMA_OK || h.error)
            return die("forward");
    for (int g = 0; g < n_gen; g++) {
        int next = llama_sample(smp, llama_logits(st), cfg->vocab_size);
        if (next < 0)
            return die("sample");
        toks[n] = next;
        if (g < n_gen - 1 && (llama_forward(st, next, n) != LLAMA_OK || h.error))
            return die("forward");
        n++;
    }

    size_t tlen;
    char text[65536];
    llama_detokenize(tk, toks, n, text, sizeof text, &tlen);

    printf("{\"engine\":\"examples/llama\",\"layer\":%d,\"plan\":", layer);
    json_str(desc);
    printf(",\"tokens\":[");
    for (int i = 0; i < n; i++)
        printf("%s%d", i ? "," : "", toks[i]);
    printf("],\"text\":");
    json_str(text);
    printf(",\"features\":[");
    for (int p = 0; top_k && p < h.n_pos; p++) {
        printf("%s[", p ? "," : "");
        for (uint32_t j = 0; j < h.fcnt[p]; j++)
            printf("%s[%u,%.9g]", j ? "," : "", h.fidx[(size_t)p * kk + j],
                   (double)h.fval[(size_t)p * kk + j]);
        printf("]");
    }
    printf("],\"resid\":[");
    for (int p = 0; p < dump_resid && p < h.n_pos; p++) {
        printf("%s[", p ? "," : "");
        for (int j = 0; j < cfg->dim; j++)
            printf("%s%.9g", j ? "," : "", (double)h.rows[(size_t)p * (size_t)cfg->dim + (size_t)j]);
        printf("]");
    }
    printf("]}\n");

    free(toks); free(h.rows); free(h.fidx); free(h.fval); free(h.fcnt); free(mx);
    llama_sampler_free(smp);
    sae_steer_free(plan);
    llama_state_free(st);
    llama_tokenizer_free(tk);
    llama_model_free(m);
    sae_model_free(sae);
    return 0;
}
