/* collect - sample stories from the model (or read a text file) and save the residual stream
 * entering one layer for every token: the data an SAE trains on. */
#define _XOPEN_SOURCE 700

#include "sae_llama.h"

#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char usage[] =
    "usage: sae-llama collect MODEL_DIR RUN_DIR [options]\n"
    "  MODEL_DIR holds a llama2.c model.bin and tok512.bin (or tokenizer.bin)\n"
    "  --layer L          residual stream entering layer L (default 2)\n"
    "  --stories N        stories to sample (default 400)\n"
    "  --tokens T         positions per story, BOS included (default 256)\n"
    "  --temperature T    sampling temperature (default 1)\n"
    "  --seed S           story i is sampled with seed S + i (default 0)\n"
    "  --text FILE        read stories from FILE (one a line, \\n for a newline) instead\n"
    "  --mlp              block L's MLP instead: its normalized input (blocks.L.hook_mlp_in) to\n"
    "                     acts.npy and its output (blocks.L.hook_mlp_out) to targets.npy, the\n"
    "                     pairs (x, y) a transcoder trains on\n";

/* Growing arrays of rows (targets: --mlp only). */
typedef struct {
    float *acts, *targets;
    int32_t *tokens;
    size_t n, cap, dim;
    bool pairs;
} rows;

/* --mlp: the hook copies block `layer`'s MLP input and output of the story being run into the
 * rows that follow r->n, by position. */
typedef struct {
    rows *r;
    int layer;
    bool active; /* only while a story's rows are being written, not while it is sampled */
} mlp_capture;

static void capture_mlp(llama_hook_point point, int layer, int pos, float *v, int dim, void *user)
{
    const mlp_capture *c = user;
    if (!c->active || layer != c->layer ||
        (point != LLAMA_HOOK_MLP_IN && point != LLAMA_HOOK_MLP_OUT))
        return;
    float *dst = point == LLAMA_HOOK_MLP_IN ? c->r->acts : c->r->targets;
    memcpy(dst + (c->r->n + (size_t)pos) * c->r->dim, v, (size_t)dim * sizeof *v);
}

static int rows_reserve(rows *r, size_t more)
{
    if (r->n + more <= r->cap)
        return 0;
    size_t cap = r->cap ? r->cap : 4096;
    while (cap < r->n + more)
        cap *= 2;
    float *a = realloc(r->acts, cap * r->dim * sizeof *a);
    if (a)
        r->acts = a;
    float *y = r->pairs ? realloc(r->targets, cap * r->dim * sizeof *y) : NULL;
    if (y)
        r->targets = y;
    int32_t *t = realloc(r->tokens, cap * sizeof *t);
    if (t)
        r->tokens = t;
    if (!a || !t || (r->pairs && !y))
        return -1;
    r->cap = cap;
    return 0;
}

/* One line of stories.txt: backslash and newline escaped so that a story is one line. */
static void write_story_line(FILE *f, const char *text)
{
    for (const char *p = text; *p; p++) {
        if (*p == '\n')
            fputs("\\n", f);
        else if (*p == '\\')
            fputs("\\\\", f);
        else
            fputc(*p, f);
    }
    fputc('\n', f);
}

/* The inverse, in place. */
static void unescape_line(char *s)
{
    char *o = s;
    for (char *p = s; *p; p++) {
        if (*p == '\\' && p[1] == 'n') {
            *o++ = '\n';
            p++;
        } else if (*p == '\\' && p[1] == '\\') {
            *o++ = '\\';
            p++;
        } else if (*p != '\n' && *p != '\r') {
            *o++ = *p;
        }
    }
    *o = '\0';
}

int cmd_collect(int argc, char **argv)
{
    double layer = 2, n_stories = 400, n_tokens = 256, temperature = 1, seed = 0, mlp = 0;
    const char *text_path = NULL, *pos[2];
    const option opts[] = {
        {"layer", &layer, NULL, 0, 1000, 1},
        {"stories", &n_stories, NULL, 1, 1e7, 1},
        {"tokens", &n_tokens, NULL, 2, 1e6, 1},
        {"temperature", &temperature, NULL, 0, 100, 0},
        {"seed", &seed, NULL, 0, 1e15, 1},
        {"text", NULL, &text_path, 0, 0, 0},
        {"mlp", &mlp, NULL, 0, 1, OPTION_FLAG},
        {NULL, NULL, NULL, 0, 0, 0},
    };
    if (parse_options(argc, argv, opts, pos, 2, 2) < 0) {
        fputs(usage, stderr);
        return 2;
    }
    const char *model_dir = pos[0], *run = pos[1];

    llama_model *model = NULL;
    llama_tokenizer *tok = NULL;
    llama_state *state = NULL;
    llama_sampler *smp = NULL;
    FILE *text_in = NULL, *stories_out = NULL;
    int *ids = NULL;
    char *text = NULL, *line = NULL;
    size_t line_cap = 0, text_cap = 0;
    rows r = {0};
    int rc = 1;

    if (open_llama("collect", model_dir, &model, &tok))
        return 1;
    const llama_config *cfg = llama_model_config(model);
    r.pairs = mlp != 0;
    mlp_capture capture = {&r, (int)layer, false};
    if (r.pairs && (int)layer >= cfg->n_layers) {
        fail_msg("collect", "--layer %d --mlp: the model has blocks 0..%d", (int)layer,
                 cfg->n_layers - 1);
        goto done;
    }
    if ((int)layer > cfg->n_layers) {
        fail_msg("collect", "--layer %d: the model has layers 0..%d (%d = after the last)",
                 (int)layer, cfg->n_layers - 1, cfg->n_layers);
        goto done;
    }
    int max_pos = (int)n_tokens < cfg->seq_len ? (int)n_tokens : cfg->seq_len;
    r.dim = (size_t)cfg->dim;
    ids = malloc((size_t)cfg->seq_len * sizeof *ids);
    if (!ids || llama_state_create(model, &state) ||
        (r.pairs && llama_state_set_point_hook(state, capture_mlp, &capture))) {
        fail_llama("collect", "creating the inference state");
        goto done;
    }
    if (make_dir(run))
        goto done;
    if (text_path && !(text_in = fopen(text_path, "r"))) {
        fail_msg("collect", "cannot open %s: %s", text_path, strerror(errno));
        goto done;
    }
    const char *stories_path = path_in(run, "stories.txt");
    if (!(stories_out = fopen(stories_path, "w"))) {
        fail_msg("collect", "cannot write %s: %s", stories_path, strerror(errno));
        goto done;
    }

    double t0 = seconds_now();
    size_t done_stories = 0;
    for (size_t i = 0; i < (size_t)n_stories; i++) {
        int n = 0;
        if (text_in) {
            if (getline(&line, &line_cap, text_in) < 0)
                break;
            unescape_line(line);
            size_t need = strlen(line) + 3;
            int *buf = need > (size_t)cfg->seq_len ? malloc(need * sizeof *buf) : ids;
            if (!buf || llama_tokenize(tok, line, 1, 0, buf, (int)need, &n)) {
                fail_llama("collect", "tokenizing a story");
                goto done;
            }
            if (n > max_pos)
                n = max_pos;
            if (buf != ids) {
                memcpy(ids, buf, (size_t)n * sizeof *ids);
                free(buf);
            }
        } else {
            int bos = LLAMA_TOKEN_BOS;
            llama_sampler_free(smp);
            smp = NULL;
            if (llama_sampler_create(cfg->vocab_size, (float)temperature, 0.0f,
                                     (uint64_t)seed + i, &smp) ||
                llama_generate(state, smp, &bos, 1, max_pos - 1, ids, cfg->seq_len, &n)) {
                fail_llama("collect", "sampling a story");
                goto done;
            }
        }
        if (n < 2) /* a BOS alone has nothing to learn from */
            continue;
        if (rows_reserve(&r, (size_t)n)) {
            fail_msg("collect", "out of memory after %zu tokens", r.n);
            goto done;
        }
        /* the residual stream of the whole story, as the model used it */
        capture.active = true;
        int forward_rc = llama_forward_tokens(state, ids, n, 0, (int)layer,
                                              r.pairs ? NULL : r.acts + r.n * r.dim);
        capture.active = false;
        if (forward_rc) {
            fail_llama("collect", "running a story");
            goto done;
        }
        for (int j = 0; j < n; j++)
            r.tokens[r.n + (size_t)j] = ids[j];
        r.n += (size_t)n;

        size_t len;
        llama_detokenize(tok, ids, n, NULL, 0, &len);
        if (len + 1 > text_cap) {
            free(text);
            text_cap = 2 * len + 1;
            text = malloc(text_cap);
        }
        if (!text || llama_detokenize(tok, ids, n, text, text_cap, NULL)) {
            fail_llama("collect", "decoding a story");
            goto done;
        }
        write_story_line(stories_out, text);
        done_stories++;
    }
    double secs = seconds_now() - t0;
    if (r.n == 0) {
        fail_msg("collect", "no stories (is %s empty?)", text_path ? text_path : "--stories");
        goto done;
    }

    int sae_rc = sae_npy_write(path_in(run, "acts.npy"), r.acts, r.n, r.dim);
    if (sae_rc == SAE_OK && r.pairs)
        sae_rc = sae_npy_write(path_in(run, "targets.npy"), r.targets, r.n, r.dim);
    if (sae_rc != SAE_OK) {
        fail_sae("collect", "writing acts.npy", sae_rc);
        goto done;
    }
    char abs_model[PATH_MAX];
    if (!realpath(model_dir, abs_model))
        snprintf(abs_model, sizeof abs_model, "%s", model_dir);
    if (npy_write_i32(path_in(run, "tokens.npy"), r.tokens, r.n) ||
        corpus_write_info(run, abs_model, (int)layer))
        goto done;
    if (fclose(stories_out)) {
        stories_out = NULL;
        fail_msg("collect", "error writing %s", stories_path);
        goto done;
    }
    stories_out = NULL;
    printf("collect: %zu stories, %zu tokens (%zu without BOS), %s %d (width %zu), %.1f s\n",
           done_stories, r.n, r.n - done_stories,
           r.pairs ? "MLP input and output of block" : "residual stream entering layer",
           (int)layer, r.dim, secs);
    printf("collect: wrote %s/acts.npy, %stokens.npy, stories.txt\n", run,
           r.pairs ? "targets.npy, " : "");
    rc = 0;
done:
    if (stories_out)
        fclose(stories_out);
    if (text_in)
        fclose(text_in);
    free(line);
    free(text);
    free(ids);
    free(r.acts);
    free(r.targets);
    free(r.tokens);
    llama_sampler_free(smp);
    llama_state_free(state);
    llama_tokenizer_free(tok);
    llama_model_free(model);
    return rc;
}
