/*
 * sae-engine-hooks: the reference for sae-llama-capture and sae-llama-evaluate, on libsae's own
 * engine (examples/llama) through its TransformerLens hook points (llama_state_set_point_hook).
 *
 *   sae-engine-hooks check-capture MODEL.bin DIR
 *       runs every window of the capture DIR (its tokens and positions) through the engine and
 *       compares every hook file of every shard with the engine's vectors at that hook point;
 *       prints {"hooks": {name: {"max_abs":..,"max_ref":..,"rel":..}}, "tokens": N}
 *   sae-engine-hooks evaluate MODEL.bin --dict DICT --hook blocks.L.hook_X --capture DIR
 *                    [--max-tokens N]
 *       the numbers of sae-llama-evaluate (evalcore.c, the same code) from the engine's three
 *       runs of each window: clean, spliced, zero-ablated.
 */
#include "capture_io.h"
#include "engine.h"
#include "evalcore.h"
#include "sae.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int mode;              /* 0 record all points, 1 evaluate-clean, 2 splice, 3 zero */
    int n_layers, dim;
    float *rec;            /* mode 0: [POINTS][n_layers][cap][dim] */
    size_t cap;
    /* evaluate */
    const sae_model *dict;
    int tc, layer;
    llama_hook_point point, out_point;
    float *x, *y;          /* [cap][dim] the dictionary's input and target (clean run) */
    float *saved;          /* transcoder: this position's MLP input */
    const unsigned char *special;
    int error;
} hk_t;

static void point_hook(llama_hook_point p, int layer, int pos, float *v, int dim, void *user)
{
    hk_t *h = user;
    if ((size_t)pos >= h->cap) { h->error = 1; return; }
    const size_t D = (size_t)dim;
    if (h->mode == 0) {
        memcpy(h->rec + (((size_t)p * (size_t)h->n_layers + (size_t)layer) * h->cap + (size_t)pos) * D,
               v, D * sizeof *v);
        return;
    }
    if (layer != h->layer)
        return;
    if (h->mode == 1) {
        if (p == h->point) memcpy(h->x + (size_t)pos * D, v, D * sizeof *v);
        if (p == h->out_point) memcpy(h->y + (size_t)pos * D, v, D * sizeof *v);
    } else if (h->mode == 2) {
        if (h->tc && p == h->point)
            memcpy(h->saved, v, D * sizeof *v);
        if (p == h->out_point && !h->special[pos]) {
            if (sae_reconstruct(h->dict, h->tc ? h->saved : v, 1, v) != SAE_OK) h->error = 1;
        }
    } else if (h->mode == 3 && p == h->out_point) {
        memset(v, 0, D * sizeof *v);
    }
}

static int die(const char *what, const char *why)
{
    fprintf(stderr, "sae-engine-hooks: %s: %s\n", what, why);
    return 1;
}

/* the windows of shard s: tokens and positions */
static int load_shard(const char *dir, const char *name, int32_t **tok, int32_t **pos, size_t *n)
{
    char path[4096], err[512];
    size_t np;
    snprintf(path, sizeof path, "%s/%s.tokens.npy", dir, name);
    if (cio_npy_read_i32(path, tok, n, err, sizeof err) != 0)
        return die("capture", err);
    snprintf(path, sizeof path, "%s/%s.positions.npy", dir, name);
    if (cio_npy_read_i32(path, pos, &np, err, sizeof err) != 0 || np != *n)
        return die("capture", err);
    return 0;
}

static int check_capture(const char *model_path, const char *dir)
{
    char err[512];
    cio_index ix;
    if (cio_index_load(dir, &ix, err, sizeof err) != 0)
        return die("capture", err);
    llama_model *m;
    llama_state *st;
    if (llama_model_load(model_path, &m) != LLAMA_OK || llama_state_create(m, &st) != LLAMA_OK)
        return die("engine", llama_last_error());
    const llama_config *cfg = llama_model_config(m);
    hk_t h = {.mode = 0, .n_layers = cfg->n_layers, .dim = cfg->dim, .cap = (size_t)cfg->seq_len};
    const size_t D = (size_t)cfg->dim;
    h.rec = malloc(sizeof(float) * LLAMA_HOOK_POINTS * (size_t)cfg->n_layers * h.cap * D);
    double *mabs = calloc((size_t)ix.n_hooks, sizeof *mabs), *mref = calloc((size_t)ix.n_hooks, sizeof *mref);
    int *hl = malloc(sizeof *hl * (size_t)ix.n_hooks);
    llama_hook_point *hp = malloc(sizeof *hp * (size_t)ix.n_hooks);
    float *rows = malloc(sizeof(float) * h.cap * D);
    if (!h.rec || !mabs || !mref || !hl || !hp || !rows)
        return die("memory", "out of memory");
    for (int k = 0; k < ix.n_hooks; k++)
        if (llama_hook_point_parse(ix.hooks[k], &hp[k], &hl[k]) != LLAMA_OK)
            return die(ix.hooks[k], "not an engine hook point");
    llama_state_set_point_hook(st, point_hook, &h);
    long long total = 0;
    for (int s = 0; s < ix.n_shards; s++) {
        int32_t *tok, *pos;
        size_t nt;
        if (load_shard(dir, ix.shards[s], &tok, &pos, &nt))
            return 1;
        sae_npy *files[256];
        for (int k = 0; k < ix.n_hooks && k < 256; k++) {
            char path[4096];
            snprintf(path, sizeof path, "%s/%s.%s.npy", dir, ix.shards[s], ix.hooks[k]);
            if (sae_npy_open(&files[k], path) != SAE_OK || sae_npy_rows(files[k]) != nt ||
                sae_npy_cols(files[k]) != D)
                return die(path, sae_last_error());
        }
        for (size_t w0 = 0; w0 < nt;) {
            size_t n = 1;
            while (w0 + n < nt && pos[w0 + n] != 0)
                n++;
            for (size_t i = 0; i < n; i++)
                if (llama_forward(st, tok[w0 + i], (int)i) != LLAMA_OK || h.error)
                    return die("forward", llama_last_error());
            for (int k = 0; k < ix.n_hooks; k++) {
                if (sae_npy_read(files[k], w0, n, rows) != SAE_OK)
                    return die("read", sae_last_error());
                const float *ref = h.rec + (((size_t)hp[k] * (size_t)h.n_layers + (size_t)hl[k]) * h.cap) * D;
                for (size_t i = 0; i < n * D; i++) {
                    const double a = fabs((double)rows[i] - (double)ref[i]);
                    if (a > mabs[k] || isnan(a)) mabs[k] = isnan(a) ? INFINITY : a;
                    if (fabs((double)ref[i]) > mref[k]) mref[k] = fabs((double)ref[i]);
                }
            }
            total += (long long)n;
            w0 += n;
        }
        for (int k = 0; k < ix.n_hooks; k++)
            sae_npy_close(files[k]);
        free(tok);
        free(pos);
    }
    printf("{\"tokens\":%lld,\"hooks\":{", total);
    for (int k = 0; k < ix.n_hooks; k++)
        printf("%s\"%s\":{\"max_abs\":%.6g,\"max_ref\":%.6g,\"rel\":%.6g}", k ? "," : "",
               ix.hooks[k], mabs[k], mref[k], mref[k] > 0 ? mabs[k] / mref[k] : mabs[k]);
    printf("}}\n");
    free(h.rec); free(mabs); free(mref); free(hl); free(hp); free(rows);
    cio_index_free(&ix);
    llama_state_free(st);
    llama_model_free(m);
    return 0;
}

static int evaluate(const char *model_path, int argc, char **argv)
{
    const char *dict_path = NULL, *hook = NULL, *dir = NULL;
    long long max_tokens = 0;
    for (int i = 0; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--dict")) dict_path = argv[i + 1];
        else if (!strcmp(argv[i], "--hook")) hook = argv[i + 1];
        else if (!strcmp(argv[i], "--capture")) dir = argv[i + 1];
        else if (!strcmp(argv[i], "--max-tokens")) max_tokens = atoll(argv[i + 1]);
        else return die(argv[i], "unknown option");
    }
    if (!dict_path || !hook || !dir)
        return die("usage", "evaluate MODEL.bin --dict D --hook H --capture DIR [--max-tokens N]");
    char err[512];
    cio_index ix;
    if (cio_index_load(dir, &ix, err, sizeof err) != 0)
        return die("capture", err);
    sae_model *dict;
    if (sae_model_load(&dict, dict_path) != SAE_OK)
        return die(dict_path, sae_last_error());
    llama_model *m;
    llama_state *st;
    if (llama_model_load(model_path, &m) != LLAMA_OK || llama_state_create(m, &st) != LLAMA_OK)
        return die("engine", llama_last_error());
    const llama_config *cfg = llama_model_config(m);
    const size_t D = (size_t)cfg->dim, V = (size_t)cfg->vocab_size, cap = (size_t)cfg->seq_len;
    hk_t h = {.n_layers = cfg->n_layers, .dim = cfg->dim, .cap = cap, .dict = dict,
              .tc = sae_model_is_transcoder(dict)};
    if (llama_hook_point_parse(hook, &h.point, &h.layer) != LLAMA_OK)
        return die(hook, "not a hook point");
    h.out_point = h.tc ? LLAMA_HOOK_MLP_OUT : h.point;
    h.x = malloc(sizeof(float) * cap * D);
    h.y = malloc(sizeof(float) * cap * D);
    h.saved = malloc(sizeof(float) * D);
    unsigned char *spec = malloc(cap);
    float *logits[3];
    for (int k = 0; k < 3; k++)
        logits[k] = malloc(sizeof(float) * cap * V);
    evalcore *ev = evalcore_new(dict, V);
    if (!h.x || !h.y || !h.saved || !spec || !logits[0] || !logits[1] || !logits[2] || !ev)
        return die("memory", "out of memory");
    h.special = spec;
    llama_state_set_point_hook(st, point_hook, &h);
    long long done = 0;
    for (int s = 0; s < ix.n_shards && (!max_tokens || done < max_tokens); s++) {
        int32_t *tok, *pos;
        size_t nt;
        if (load_shard(dir, ix.shards[s], &tok, &pos, &nt))
            return 1;
        for (size_t w0 = 0; w0 < nt && (!max_tokens || done < max_tokens);) {
            size_t n = 1;
            while (w0 + n < nt && pos[w0 + n] != 0)
                n++;
            if (max_tokens && done + (long long)n > max_tokens)
                n = (size_t)(max_tokens - done);
            for (size_t i = 0; i < n; i++)   /* llama2.c's special ids: unk 0, BOS 1, EOS 2 */
                spec[i] = tok[w0 + i] == LLAMA_TOKEN_UNK || tok[w0 + i] == LLAMA_TOKEN_BOS ||
                          tok[w0 + i] == LLAMA_TOKEN_EOS;
            for (int k = 0; k < 3; k++) {
                h.mode = k + 1;
                for (size_t i = 0; i < n; i++) {
                    if (llama_forward(st, tok[w0 + i], (int)i) != LLAMA_OK || h.error)
                        return die("forward", h.error ? sae_last_error() : llama_last_error());
                    memcpy(logits[k] + i * V, llama_logits(st), sizeof(float) * V);
                }
            }
            evalcore_logits(ev, logits[0], logits[1], logits[2], tok + w0, spec, n);
            if (evalcore_rows(ev, h.x, h.tc ? h.y : h.x, spec, n) != SAE_OK)
                return die("libsae", sae_last_error());
            done += (long long)n;
            w0 += n;
        }
        free(tok);
        free(pos);
    }
    if (done == 0)
        return die(dir, "no tokens");
    char extra[256];
    snprintf(extra, sizeof extra, "\"engine\":\"examples/llama\",\"hook\":\"%s\",\"transcoder\":%s,"
             "\"special\":[%d,%d,%d]", hook, h.tc ? "true" : "false", LLAMA_TOKEN_UNK,
             LLAMA_TOKEN_BOS, LLAMA_TOKEN_EOS);
    evalcore_print_json(ev, stdout, extra);
    evalcore_free(ev);
    for (int k = 0; k < 3; k++) free(logits[k]);
    free(h.x); free(h.y); free(h.saved); free(spec);
    cio_index_free(&ix);
    llama_state_free(st);
    llama_model_free(m);
    sae_model_free(dict);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 4 && !strcmp(argv[1], "check-capture"))
        return check_capture(argv[2], argv[3]);
    if (argc >= 3 && !strcmp(argv[1], "evaluate"))
        return evaluate(argv[2], argc - 3, argv + 3);
    fprintf(stderr, "usage: sae-engine-hooks check-capture MODEL.bin DIR\n"
                    "       sae-engine-hooks evaluate MODEL.bin --dict D --hook H --capture DIR "
                    "[--max-tokens N]\n");
    return 2;
}
