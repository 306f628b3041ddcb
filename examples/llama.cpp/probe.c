/*
 * probe.c: read (and optionally modify) the residual stream of a llama.cpp
 * model from outside, through llama.cpp's public eval callback only.
 *
 * llama.cpp names the output of transformer block il "l_out-<il>" (after the
 * block's FFN residual add and after any control vector).  That is the
 * residual stream ENTERING block il+1, i.e. SAELens blocks.<il>.hook_resid_post
 * == blocks.<il+1>.hook_resid_pre.  So "--layer L" (the residual stream
 * entering layer L, L >= 1) observes the tensor "l_out-<L-1>".
 *
 * The callback copies the rows of that tensor for every ubatch to a host
 * buffer, hands them to a hook that may modify them in place, and, when the
 * hook says so, writes them back before any later node of the graph runs.
 * libsae's steering (encode, clamp, decode) lives in the hook adapter
 * sae_llama_hook.{h,c}, which sae-llama-cpp, -capture and -evaluate use.  This
 * program keeps its own raw callback on purpose: it is llama.cpp alone (no
 * libsae linked), the independent check of llama.cpp against reference.json
 * (check-reference.py), and the smallest example of the cb_eval mechanism.
 *
 * Built-in demonstration edits (no libsae needed):
 *   --add DIM:VALUE       add VALUE to component DIM of every row (callback)
 *   --cvec-add DIM:VALUE  the same edit through llama_set_adapter_cvec
 *   --scale F             multiply every row by F (callback)
 *
 * Output is plain text, or one JSON object with --json (for the checks).
 * Only llama.h / ggml.h / ggml-backend.h public API is used.
 */
#define _POSIX_C_SOURCE 200809L
#include "llama.h"
#include "ggml.h"
#include "ggml-backend.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ------------------------------------------------------------------------ */
/* The hook: everything a steering library needs, with no llama/ggml types.  */

/* rows: n_tokens x n_embd floats, row-major, for consecutive positions
 * pos0 .. pos0+n_tokens-1 of sequence 0.  Return 1 if the rows were modified
 * (they are then written back into the graph), 0 if not, -1 to abort decode. */
typedef int (*resid_hook_fn)(void *user, int layer, float *rows, int n_tokens,
                             int n_embd, int pos0);

typedef struct {
    /* configuration */
    int layer;              /* residual stream entering this block (>= 1) */
    char tname[64];         /* "l_out-<layer-1>" */
    int n_embd;
    resid_hook_fn hook;     /* may be NULL */
    void *hook_user;
    bool capture;           /* keep a copy of every row seen (after the hook) */
    bool capture_pre;       /* ... or before the hook */

    /* per-decode state, set by the caller before llama_decode */
    int pos_next;

    /* results */
    float *rows;            /* scratch, n_tokens x n_embd */
    size_t rows_cap;
    float *cap;             /* captured rows, indexed by position */
    int cap_n;              /* positions 0..cap_n-1 valid */
    int cap_alloc;
    long n_calls;
    long n_modified;
    double cb_seconds;      /* time spent inside the callback (incl. hook) */
    int error;
} probe_t;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void tensor_rows_get(const struct ggml_tensor *t, float *dst, int n_tok, int n_embd) {
    const size_t row_bytes = (size_t)n_embd * sizeof(float);
    if (t->nb[1] == row_bytes) {
        ggml_backend_tensor_get(t, dst, 0, row_bytes * (size_t)n_tok);
    } else {
        for (int r = 0; r < n_tok; r++)
            ggml_backend_tensor_get(t, dst + (size_t)r * n_embd, (size_t)r * t->nb[1], row_bytes);
    }
}

static void tensor_rows_set(struct ggml_tensor *t, const float *src, int n_tok, int n_embd) {
    const size_t row_bytes = (size_t)n_embd * sizeof(float);
    if (t->nb[1] == row_bytes) {
        ggml_backend_tensor_set(t, src, 0, row_bytes * (size_t)n_tok);
    } else {
        for (int r = 0; r < n_tok; r++)
            ggml_backend_tensor_set(t, src + (size_t)r * n_embd, (size_t)r * t->nb[1], row_bytes);
    }
}

static void capture_rows(probe_t *p, const float *rows, int n_tok, int pos0) {
    int need = pos0 + n_tok;
    if (need > p->cap_alloc) {
        int na = p->cap_alloc ? p->cap_alloc : 64;
        while (na < need) na *= 2;
        float *nc = realloc(p->cap, (size_t)na * p->n_embd * sizeof(float));
        if (!nc) { p->error = 1; return; }
        p->cap = nc;
        p->cap_alloc = na;
    }
    memcpy(p->cap + (size_t)pos0 * p->n_embd, rows, (size_t)n_tok * p->n_embd * sizeof(float));
    if (need > p->cap_n) p->cap_n = need;
}

/* The ggml_backend_sched_eval_callback given to llama.cpp as cb_eval.
 * ask == true: "do you want to see this node?"  Say yes only for our one
 * tensor: every observed node costs a graph split and a synchronisation.
 * ask == false: the node has been computed and no later node has run yet. */
static bool probe_cb_eval(struct ggml_tensor *t, bool ask, void *user_data) {
    probe_t *p = user_data;
    const bool match = strcmp(t->name, p->tname) == 0;
    if (ask) return match;
    if (!match) return true;

    const double t0 = now_s();
    if (t->type != GGML_TYPE_F32 || t->ne[0] != p->n_embd || t->ne[2] != 1 || t->ne[3] != 1) {
        fprintf(stderr, "probe: unexpected %s: type %d ne [%" PRId64 ",%" PRId64 ",%" PRId64 ",%" PRId64 "]\n",
                t->name, (int)t->type, t->ne[0], t->ne[1], t->ne[2], t->ne[3]);
        p->error = 1;
        return true;
    }
    const int n_tok = (int)t->ne[1]; /* tokens of this ubatch */
    const size_t n = (size_t)n_tok * p->n_embd;
    if (n > p->rows_cap) {
        float *nr = realloc(p->rows, n * sizeof(float));
        if (!nr) { p->error = 1; return false; }
        p->rows = nr;
        p->rows_cap = n;
    }
    tensor_rows_get(t, p->rows, n_tok, p->n_embd);
    const int pos0 = p->pos_next;
    p->pos_next += n_tok;
    p->n_calls++;

    if (p->capture && p->capture_pre) capture_rows(p, p->rows, n_tok, pos0);
    if (p->hook) {
        int rc = p->hook(p->hook_user, p->layer, p->rows, n_tok, p->n_embd, pos0);
        if (rc < 0) { p->cb_seconds += now_s() - t0; return false; } /* cancels the graph */
        if (rc > 0) {
            tensor_rows_set(t, p->rows, n_tok, p->n_embd);
            p->n_modified++;
        }
    }
    if (p->capture && !p->capture_pre) capture_rows(p, p->rows, n_tok, pos0);
    p->cb_seconds += now_s() - t0;
    return true;
}

/* ------------------------------------------------------------------------ */
/* Demonstration hook: fixed edits of the residual stream.                   */

typedef struct {
    int add_dim;
    float add_val;
    bool do_add;
    float scale;
    bool do_scale;
} demo_edit_t;

static int demo_hook(void *user, int layer, float *rows, int n_tokens, int n_embd, int pos0) {
    (void)layer; (void)pos0;
    demo_edit_t *e = user;
    if (!e->do_add && !e->do_scale) return 0;
    for (int r = 0; r < n_tokens; r++) {
        float *x = rows + (size_t)r * n_embd;
        if (e->do_scale)
            for (int j = 0; j < n_embd; j++) x[j] *= e->scale;
        if (e->do_add) x[e->add_dim] += e->add_val;
    }
    return 1;
}

/* ------------------------------------------------------------------------ */

static bool verbose = false;

static void log_cb(enum ggml_log_level level, const char *text, void *user) {
    (void)user;
    if (verbose || level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static bool no_progress(float progress, void *user) {
    (void)progress; (void)user;
    return true;
}

static void usage(const char *argv0) {
    fprintf(stderr,
        "usage: %s -m MODEL.gguf [options]\n"
        "  -p TEXT           prompt text (tokenized by llama.cpp, BOS added)\n"
        "  -t IDS            prompt as token ids, comma separated (e.g. 1,403,407)\n"
        "  -n N              tokens to generate greedily (default 32)\n"
        "  --layer L         residual stream entering block L, L >= 1 (tensor l_out-<L-1>; default 2)\n"
        "  --dump-resid K    print the residual rows of the first K positions\n"
        "  --dump-logits K   print the logits of the first K prompt positions\n"
        "  --add DIM:VALUE   add VALUE to component DIM at --layer, in the callback\n"
        "  --scale F         multiply the residual at --layer by F, in the callback\n"
        "  --cvec-add DIM:VALUE  add through llama_set_adapter_cvec instead\n"
        "  --threads N       (default 1)\n"
        "  --ubatch N        physical batch size (the prompt then reaches the callback in pieces)\n"
        "  --kv-f16          F16 KV cache (llama.cpp's default; here F32)\n"
        "  --no-callback     do not install cb_eval (to time llama.cpp alone)\n"
        "  --fa              flash attention as llama.cpp's default (auto); here off, for exact F32\n"
        "  --json            one JSON object on stdout\n"
        "  -v                llama.cpp logs\n", argv0);
}

static void json_str(FILE *f, const char *s, size_t n) {
    fputc('"', f);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c == '\n') fputs("\\n", f);
        else if (c == '\t') fputs("\\t", f);
        else if (c == '\r') fputs("\\r", f);
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

static void print_floats(FILE *f, const float *x, int n, bool json) {
    for (int j = 0; j < n; j++) {
        if (json) fprintf(f, "%s%.9g", j ? "," : "", (double)x[j]);
        else fprintf(f, "%s%.6f", j ? " " : "", (double)x[j]);
    }
}

static int parse_dim_val(const char *s, int *dim, float *val) {
    char *end;
    long d = strtol(s, &end, 10);
    if (*end != ':') return -1;
    *dim = (int)d;
    *val = strtof(end + 1, &end);
    return *end ? -1 : 0;
}

int main(int argc, char **argv) {
    const char *model_path = NULL, *prompt = NULL, *ids = NULL;
    int n_gen = 32, layer = 2, dump_resid = 0, dump_logits = 0, n_threads = 1, n_ubatch = 0;
    bool json = false, kv_f16 = false, flash_attn = false, no_callback = false;
    demo_edit_t edit = {0};
    bool cvec = false;
    int cvec_dim = 0;
    float cvec_val = 0;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDV() do { if (!v) { usage(argv[0]); return 2; } i++; } while (0)
        if (!strcmp(a, "-m")) { NEEDV(); model_path = v; }
        else if (!strcmp(a, "-p")) { NEEDV(); prompt = v; }
        else if (!strcmp(a, "-t")) { NEEDV(); ids = v; }
        else if (!strcmp(a, "-n")) { NEEDV(); n_gen = atoi(v); }
        else if (!strcmp(a, "--layer")) { NEEDV(); layer = atoi(v); }
        else if (!strcmp(a, "--dump-resid")) { NEEDV(); dump_resid = atoi(v); }
        else if (!strcmp(a, "--dump-logits")) { NEEDV(); dump_logits = atoi(v); }
        else if (!strcmp(a, "--threads")) { NEEDV(); n_threads = atoi(v); }
        else if (!strcmp(a, "--ubatch")) { NEEDV(); n_ubatch = atoi(v); }
        else if (!strcmp(a, "--add")) {
            NEEDV();
            if (parse_dim_val(v, &edit.add_dim, &edit.add_val)) { usage(argv[0]); return 2; }
            edit.do_add = true;
        } else if (!strcmp(a, "--scale")) { NEEDV(); edit.scale = strtof(v, NULL); edit.do_scale = true; }
        else if (!strcmp(a, "--cvec-add")) {
            NEEDV();
            if (parse_dim_val(v, &cvec_dim, &cvec_val)) { usage(argv[0]); return 2; }
            cvec = true;
        } else if (!strcmp(a, "--json")) json = true;
        else if (!strcmp(a, "--kv-f16")) kv_f16 = true;
        else if (!strcmp(a, "--fa")) flash_attn = true;
        else if (!strcmp(a, "--no-callback")) no_callback = true;
        else if (!strcmp(a, "-v")) verbose = true;
        else { usage(argv[0]); return 2; }
#undef NEEDV
    }
    if (!model_path || (prompt && ids)) { usage(argv[0]); return 2; }
    if (no_callback && (dump_resid || edit.do_add || edit.do_scale)) {
        fprintf(stderr, "probe: --no-callback excludes --dump-resid, --add and --scale\n");
        return 2;
    }

    llama_log_set(log_cb, NULL);
    llama_backend_init();

    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    if (!verbose) mp.progress_callback = no_progress;
    struct llama_model *model = llama_model_load_from_file(model_path, mp);
    if (!model) { fprintf(stderr, "probe: cannot load %s\n", model_path); return 1; }
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    const int n_embd = llama_model_n_embd(model);
    const int n_layer = llama_model_n_layer(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    if (layer < 1 || layer > n_layer) {
        fprintf(stderr, "probe: --layer must be in 1..%d (residual stream entering that block;"
                        " %d = after the last block)\n", n_layer, n_layer);
        return 2;
    }
    if (layer == n_layer)
        fprintf(stderr, "probe: note: l_out-%d of the last block only holds the rows that produce logits\n",
                n_layer - 1);
    if ((edit.do_add && (edit.add_dim < 0 || edit.add_dim >= n_embd)) ||
        (cvec && (cvec_dim < 0 || cvec_dim >= n_embd))) {
        fprintf(stderr, "probe: DIM must be in 0..%d\n", n_embd - 1);
        return 2;
    }

    /* prompt tokens */
    int cap_tok = 1024;
    llama_token *toks = malloc(sizeof(llama_token) * (size_t)(cap_tok + n_gen + 8));
    int n_prompt = 0;
    if (ids) {
        const char *s = ids;
        while (*s && n_prompt < cap_tok) {
            char *end;
            toks[n_prompt++] = (llama_token)strtol(s, &end, 10);
            s = *end ? end + 1 : end;
        }
    } else {
        const char *text = prompt ? prompt : "";
        n_prompt = llama_tokenize(vocab, text, (int32_t)strlen(text), toks, cap_tok, true, false);
        if (n_prompt < 0) { fprintf(stderr, "probe: prompt too long\n"); return 1; }
        if (n_prompt == 0) toks[n_prompt++] = llama_vocab_bos(vocab);
    }

    probe_t pr = {0};
    pr.layer = layer;
    snprintf(pr.tname, sizeof pr.tname, "l_out-%d", layer - 1);
    pr.n_embd = n_embd;
    pr.capture = dump_resid > 0;
    pr.capture_pre = false;
    if (edit.do_add || edit.do_scale) { pr.hook = demo_hook; pr.hook_user = &edit; }

    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)(n_prompt + n_gen + 1);
    cp.n_batch = cp.n_ctx;
    cp.n_ubatch = n_ubatch > 0 ? (uint32_t)n_ubatch : cp.n_ctx;
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    cp.no_perf = false;
    /* Exact F32 by default.  llama.cpp's defaults (flash attention "auto",
     * which the CPU backend turns on, and an F16 KV cache) round attention
     * through F16: on stories260K that moves the residual stream entering
     * block 2 by ~1.4e-4 and the logits by ~6e-4 from an F32 engine, even
     * at position 0.  --fa / --kv-f16 restore those defaults. */
    if (!kv_f16) { cp.type_k = GGML_TYPE_F32; cp.type_v = GGML_TYPE_F32; }
    if (!flash_attn) cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    if (!no_callback) {
        cp.cb_eval = probe_cb_eval;
        cp.cb_eval_user_data = &pr;
    }
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "probe: cannot create context\n"); return 1; }

    if (cvec) {
        /* buffer layout: n_embd floats per layer, layer 1 at offset 0; the
         * vector for layer il is added to l_out-il, i.e. to the residual
         * stream entering block il+1 == our --layer L uses il = L-1. */
        const int il = layer - 1;
        if (il < 1) {
            fprintf(stderr, "probe: llama_set_adapter_cvec cannot steer layer 0's output (--layer 1)\n");
            return 2;
        }
        size_t len = (size_t)n_embd * (size_t)(n_layer - 1);
        float *buf = calloc(len, sizeof(float));
        buf[(size_t)n_embd * (il - 1) + cvec_dim] = cvec_val;
        if (llama_set_adapter_cvec(ctx, buf, len, n_embd, il, il) != 0) {
            fprintf(stderr, "probe: llama_set_adapter_cvec failed\n");
            return 1;
        }
        free(buf);
    }

    struct llama_sampler *smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(smpl, llama_sampler_init_greedy());

    /* prompt: one batch, logits for every position if asked for */
    struct llama_batch batch = llama_batch_init(n_prompt, 0, 1);
    for (int i = 0; i < n_prompt; i++) {
        batch.token[i] = toks[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = (i == n_prompt - 1) || (i < dump_logits);
    }
    batch.n_tokens = n_prompt;
    if (dump_logits > n_prompt) dump_logits = n_prompt;

    float *logits_dump = NULL;
    double t_dec = 0;
    pr.pos_next = 0;
    double t0 = now_s();
    if (llama_decode(ctx, batch) != 0 || pr.error) { fprintf(stderr, "probe: decode failed\n"); return 1; }
    double t_prompt = now_s() - t0;
    if (dump_logits > 0) {
        logits_dump = malloc(sizeof(float) * (size_t)dump_logits * n_vocab);
        for (int i = 0; i < dump_logits; i++)
            memcpy(logits_dump + (size_t)i * n_vocab, llama_get_logits_ith(ctx, i), sizeof(float) * n_vocab);
    }
    llama_batch_free(batch);

    /* greedy generation, one token at a time; no early stop (matches reference.json) */
    int n_tok = n_prompt;
    for (int g = 0; g < n_gen; g++) {
        llama_token next = llama_sampler_sample(smpl, ctx, -1);
        toks[n_tok++] = next;
        if (g == n_gen - 1) break;
        pr.pos_next = n_tok - 1;
        t0 = now_s();
        if (llama_decode(ctx, llama_batch_get_one(&toks[n_tok - 1], 1)) != 0 || pr.error) {
            fprintf(stderr, "probe: decode failed at step %d\n", g);
            return 1;
        }
        t_dec += now_s() - t0;
    }

    /* text: as llama2.c prints it.  llama_detokenize(remove_special=true)
     * drops a leading BOS but then KEEPS the space prefix of the next piece
     * (" Once upon"); llama2.c drops that space.  So skip the BOS ourselves
     * and let llama_detokenize strip the SentencePiece space prefix. */
    int text_cap = 16 * n_tok + 64;
    char *text = malloc((size_t)text_cap);
    const int skip = (n_tok > 0 && toks[0] == llama_vocab_bos(vocab)) ? 1 : 0;
    int text_n = llama_detokenize(vocab, toks + skip, n_tok - skip, text, text_cap, false, false);
    if (text_n < 0) text_n = 0;

    if (dump_resid > pr.cap_n) dump_resid = pr.cap_n;
    const int n_steps = n_gen > 1 ? n_gen - 1 : 0;
    if (json) {
        printf("{\"model\":");
        json_str(stdout, model_path, strlen(model_path));
        printf(",\"n_embd\":%d,\"n_layer\":%d,\"layer\":%d,\"tensor\":\"%s\"", n_embd, n_layer, layer, pr.tname);
        printf(",\"prompt_tokens\":[");
        for (int i = 0; i < n_prompt; i++) printf("%s%d", i ? "," : "", toks[i]);
        printf("],\"tokens\":[");
        for (int i = 0; i < n_tok; i++) printf("%s%d", i ? "," : "", toks[i]);
        printf("],\"text\":");
        json_str(stdout, text, (size_t)text_n);
        printf(",\"resid\":[");
        for (int i = 0; i < dump_resid; i++) {
            printf("%s[", i ? "," : "");
            print_floats(stdout, pr.cap + (size_t)i * n_embd, n_embd, true);
            printf("]");
        }
        printf("],\"logits\":[");
        for (int i = 0; i < dump_logits; i++) {
            printf("%s[", i ? "," : "");
            print_floats(stdout, logits_dump + (size_t)i * n_vocab, n_vocab, true);
            printf("]");
        }
        printf("],\"callback_calls\":%ld,\"callback_modified\":%ld,\"callback_seconds\":%.6f"
               ",\"prompt_seconds\":%.6f,\"gen_steps\":%d,\"gen_seconds\":%.6f}\n",
               pr.n_calls, pr.n_modified, pr.cb_seconds, t_prompt, n_steps, t_dec);
    } else {
        printf("model %s: n_embd %d, n_layer %d; observing %s = residual stream entering block %d\n",
               model_path, n_embd, n_layer, pr.tname, layer);
        printf("prompt tokens:");
        for (int i = 0; i < n_prompt; i++) printf(" %d", toks[i]);
        printf("\ntokens:");
        for (int i = 0; i < n_tok; i++) printf(" %d", toks[i]);
        printf("\ntext: %.*s\n", text_n, text);
        for (int i = 0; i < dump_resid; i++) {
            printf("resid[%d] (token %d): ", i, toks[i]);
            print_floats(stdout, pr.cap + (size_t)i * n_embd, n_embd, false);
            printf("\n");
        }
        for (int i = 0; i < dump_logits; i++) {
            printf("logits[%d]: ", i);
            print_floats(stdout, logits_dump + (size_t)i * n_vocab, n_vocab < 8 ? n_vocab : 8, false);
            printf(" ...\n");
        }
        printf("callback: %ld calls, %ld modified, %.3f ms total; prompt %.3f ms; %d steps %.3f ms (%.3f ms/token)\n",
               pr.n_calls, pr.n_modified, 1e3 * pr.cb_seconds, 1e3 * t_prompt, n_steps, 1e3 * t_dec,
               n_steps ? 1e3 * t_dec / n_steps : 0.0);
    }

    free(text);
    free(logits_dump);
    free(toks);
    free(pr.rows);
    free(pr.cap);
    llama_sampler_free(smpl);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
