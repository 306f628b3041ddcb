/*
 * sae-llama-capture: a GGUF model over a text corpus, the activations of several hooks and
 * layers in one pass, as sharded .npy files with their tokens, document ids and positions.
 *
 *   sae-llama-capture -m MODEL.gguf --hooks blocks.1.hook_resid_pre,blocks.3.hook_mlp_out,...
 *       --corpus FILE [--jsonl [--field text]] -o DIR [--ctx N] [--shard-tokens T]
 *       [--dtype f32|f16] [--max-tokens N] [--parallel B] [--threads N] [--no-progress]
 *       [--kv-f16] [--fa] [--baseline]
 *
 * The corpus: plain text, one document a line, or JSON lines with a string field (--field,
 * "text"). Each document is tokenized with BOS in front (llama.cpp's tokenizer, add_special) and
 * the documents are concatenated; the stream is cut into windows of --ctx tokens (the model's
 * training context by default), each starting with BOS (a window that does not start at a
 * document gets one in front). Windows are decoded --parallel at a time as sequences of one
 * batch. The activations go through sae_llama_hook's readers into shard buffers; a shard holds
 * whole windows, at most --shard-tokens tokens (at least one window), and is written as
 *   DIR/shard-NNNNN.<hook>.npy   float32 (sae_npy_write) or float16 [tokens][n_embd]
 *   DIR/shard-NNNNN.tokens.npy (<i4), .doc_ids.npy (<i8), .positions.npy (<i4)
 * every file atomically, then DIR/index.json (atomically) lists it. Memory is one shard. A run
 * on a DIR whose index.json has the same settings resumes after its last complete shard (the
 * windows are recomputed, the complete shards skipped); other settings are refused.
 * --baseline decodes the same windows with no callback and writes nothing: llama.cpp's own
 * prompt processing, to compare throughput with.
 * Exit: 0 done, 1 an error (a message says which), 2 bad usage.
 */
#define _POSIX_C_SOURCE 200809L
#include "capture_io.h"
#include "sae_llama_hook.h"

#include "ggml.h"
#include "llama.h"
#include "sae.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* An error message for the caller, cut short if it has to be (a long path in it). */
__attribute__((format(printf, 3, 4))) static void set_err(char *err, size_t cap, const char *fmt,
                                                          ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, cap, fmt, ap);
    va_end(ap);
}

#define MAX_HOOKS 256

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct {
    int n_hooks;
    char *hooks[MAX_HOOKS];
    size_t d;
    bool f16;
    size_t cap_tok;        /* shard capacity in tokens */
    void *act[MAX_HOOKS];  /* [cap_tok][d] float or uint16 */
    size_t batch_base;     /* shard row of the current batch's first token */
} shard_buf;

typedef struct {
    shard_buf *sb;
    int hook;
} reader_ctx;

static int reader(void *user, const sae_llama_rows *r)
{
    reader_ctx *rc = user;
    shard_buf *sb = rc->sb;
    const size_t at = sb->batch_base + r->row0;
    if (at + r->n > sb->cap_tok)
        return 1;
    if (sb->f16) {
        uint16_t *dst = (uint16_t *)sb->act[rc->hook] + at * sb->d;
        for (size_t i = 0; i < r->n * sb->d; i++)
            dst[i] = cio_f16(r->x[i]);
    } else {
        memcpy((float *)sb->act[rc->hook] + at * sb->d, r->x, r->n * sb->d * sizeof(float));
    }
    return 0;
}

/* ---- windows --------------------------------------------------------------------------- */

typedef struct {
    cio_corpus *corpus;
    const struct llama_vocab *vocab;
    llama_token bos;
    int ctx;
    llama_token *doc;     /* the current document's tokens (BOS first) */
    int doc_n, doc_at, doc_cap;
    int64_t doc_id;
    bool eof;
    char err[512];
    int bad;
} windower;

/* The next window into tok/docid (ctx entries); returns its length, 0 at the end, -1 on error. */
static int next_window(windower *w, llama_token *tok, int64_t *docid)
{
    int n = 0;
    while (n < w->ctx) {
        if (w->doc_at == w->doc_n) {
            if (w->eof)
                break;
            int64_t id;
            int bad;
            const char *text = cio_corpus_next(w->corpus, &id, &bad, w->err, sizeof w->err);
            if (!text) {
                if (bad) { w->bad = 1; return -1; }
                w->eof = true;
                break;
            }
            const int32_t len = (int32_t)strlen(text);
            int need = len + 2;
            if (need > w->doc_cap) {
                llama_token *p = realloc(w->doc, sizeof *p * (size_t)need);
                if (!p) { set_err(w->err, sizeof w->err, "out of memory"); return -1; }
                w->doc = p;
                w->doc_cap = need;
            }
            int k = llama_tokenize(w->vocab, text, len, w->doc, w->doc_cap, true, false);
            if (k < 0) { set_err(w->err, sizeof w->err, "document %lld: tokenizer failed",
                                  (long long)id); return -1; }
            w->doc_n = k;
            w->doc_at = 0;
            w->doc_id = id;
            continue;
        }
        if (n == 0 && w->doc[w->doc_at] != w->bos) {
            tok[0] = w->bos;   /* every window starts with BOS */
            docid[0] = w->doc_id;
            n = 1;
            continue;
        }
        tok[n] = w->doc[w->doc_at++];
        docid[n] = w->doc_id;
        n++;
    }
    return n == 1 ? 0 : n;   /* a lone BOS is no window */
}

/* ---- index ------------------------------------------------------------------------------ */

static int write_text_atomic(const char *path, const char *text, char *err, size_t cap)
{
    char tmp[4096];
    int len = snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    if (len < 0 || (size_t)len >= sizeof tmp) {
        set_err(err, cap, "%s: the path is too long", path);
        return -1;
    }
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        set_err(err, cap, "%s: %s", tmp, strerror(errno));
        return -1;
    }
    const size_t n = strlen(text);
    if (fwrite(text, 1, n, f) != n || fflush(f) != 0 || fsync(fileno(f)) != 0) {
        set_err(err, cap, "writing %s: %s", path, strerror(errno));
        fclose(f);
        unlink(tmp);
        return -1;
    }
    if (fclose(f) != 0 || rename(tmp, path) != 0) {
        set_err(err, cap, "writing %s: %s", path, strerror(errno));
        unlink(tmp);
        return -1;
    }
    return 0;
}

static char *read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = n >= 0 ? malloc((size_t)n + 1) : NULL;
    if (s && fread(s, 1, (size_t)n, f) != (size_t)n) { free(s); s = NULL; }
    if (s) s[n] = 0;
    fclose(f);
    return s;
}

/* the settings that must match for a resume */
static cJSON *settings_json(const char *model, const char *corpus, bool jsonl, const char *field,
                            int ctx, long long shard_tokens, const char *dtype, long long max_tok,
                            int n_hooks, char **hooks, size_t d, int n_layer, bool f32kv)
{
    cJSON *s = cJSON_CreateObject();
    struct stat st;
    cJSON_AddStringToObject(s, "model", model);
    cJSON_AddNumberToObject(s, "model_bytes", stat(model, &st) == 0 ? (double)st.st_size : -1);
    cJSON_AddStringToObject(s, "corpus", corpus);
    cJSON_AddNumberToObject(s, "corpus_bytes", stat(corpus, &st) == 0 ? (double)st.st_size : -1);
    cJSON_AddStringToObject(s, "corpus_format", jsonl ? "jsonl" : "text");
    if (jsonl) cJSON_AddStringToObject(s, "field", field);
    cJSON_AddNumberToObject(s, "ctx", ctx);
    cJSON_AddNumberToObject(s, "shard_tokens", (double)shard_tokens);
    cJSON_AddStringToObject(s, "dtype", dtype);
    cJSON_AddNumberToObject(s, "max_tokens", (double)max_tok);
    cJSON_AddNumberToObject(s, "n_embd", (double)d);
    cJSON_AddNumberToObject(s, "n_layer", n_layer);
    cJSON_AddBoolToObject(s, "f32_kv_no_flash_attn", f32kv);
    cJSON *h = cJSON_AddArrayToObject(s, "hooks");
    for (int i = 0; i < n_hooks; i++)
        cJSON_AddItemToArray(h, cJSON_CreateString(hooks[i]));
    return s;
}

static void usage(void)
{
    fprintf(stderr,
        "usage: sae-llama-capture -m MODEL.gguf --hooks H[,H...] --corpus FILE -o DIR [options]\n"
        "  --hooks H,...       blocks.L.hook_{resid_pre,attn_out,resid_mid,mlp_in,mlp_out,resid_post}\n"
        "  --corpus FILE       one document a line; --jsonl: JSON lines, --field NAME (text)\n"
        "  -o DIR              shards and index.json (resumes a capture with the same settings)\n"
        "  --ctx N             window length with BOS (the model's training context)\n"
        "  --shard-tokens T    tokens per shard, at most (65536)\n"
        "  --dtype f32|f16     activation files (f32)\n"
        "  --max-tokens N      stop after N tokens (all)\n"
        "  --parallel B        windows per batch, as B sequences (enough for 512 tokens)\n"
        "  --threads N         llama.cpp threads (all cores)\n"
        "  --kv-f16, --fa      llama.cpp's default F16 KV cache / flash attention (off: F32)\n"
        "  --baseline          decode the windows with no callback, write nothing, report tok/s\n"
        "  --no-progress       no progress bar\n");
}

int main(int argc, char **argv)
{
    const char *model_path = NULL, *hooks_arg = NULL, *corpus_path = NULL, *out_dir = NULL,
               *field = "text", *dtype = "f32";
    int ctx = 0, parallel = 0, threads = 0;
    long long shard_tokens = 65536, max_tokens = 0;
    bool jsonl = false, kv_f16 = false, fa = false, progress = true, baseline = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
#define NEEDV() do { if (i + 1 >= argc) { usage(); return 2; } } while (0)
        if (!strcmp(a, "-m")) { NEEDV(); model_path = argv[++i]; }
        else if (!strcmp(a, "--hooks")) { NEEDV(); hooks_arg = argv[++i]; }
        else if (!strcmp(a, "--corpus")) { NEEDV(); corpus_path = argv[++i]; }
        else if (!strcmp(a, "-o")) { NEEDV(); out_dir = argv[++i]; }
        else if (!strcmp(a, "--field")) { NEEDV(); field = argv[++i]; }
        else if (!strcmp(a, "--dtype")) { NEEDV(); dtype = argv[++i]; }
        else if (!strcmp(a, "--ctx")) { NEEDV(); ctx = atoi(argv[++i]); }
        else if (!strcmp(a, "--parallel")) { NEEDV(); parallel = atoi(argv[++i]); }
        else if (!strcmp(a, "--threads")) { NEEDV(); threads = atoi(argv[++i]); }
        else if (!strcmp(a, "--shard-tokens")) { NEEDV(); shard_tokens = atoll(argv[++i]); }
        else if (!strcmp(a, "--max-tokens")) { NEEDV(); max_tokens = atoll(argv[++i]); }
        else if (!strcmp(a, "--jsonl")) jsonl = true;
        else if (!strcmp(a, "--kv-f16")) kv_f16 = true;
        else if (!strcmp(a, "--fa")) fa = true;
        else if (!strcmp(a, "--baseline")) baseline = true;
        else if (!strcmp(a, "--no-progress")) progress = false;
        else { fprintf(stderr, "sae-llama-capture: unknown option %s\n", a); usage(); return 2; }
#undef NEEDV
    }
    if (!model_path || !corpus_path || (!baseline && (!out_dir || !hooks_arg)) || ctx < 0 ||
        parallel < 0 || threads < 0 || shard_tokens < 1 || max_tokens < 0 ||
        (strcmp(dtype, "f32") && strcmp(dtype, "f16"))) {
        usage();
        return 2;
    }
    if (!isatty(2))
        progress = false;
    signal(SIGXFSZ, SIG_IGN);
    const char *ka = getenv("SAE_CAPTURE_TEST_KILL_AT_SHARD");
    const int kill_at = ka && *ka ? atoi(ka) : -1;   /* a file-size limit: write() fails with EFBIG, we report it */

    char err[1024];
    /* hooks */
    shard_buf sb = {.f16 = !strcmp(dtype, "f16")};
    if (hooks_arg) {
        char *copy = strdup(hooks_arg), *save = NULL;
        for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
            if (sb.n_hooks == MAX_HOOKS) { fprintf(stderr, "sae-llama-capture: too many hooks\n"); return 2; }
            for (int j = 0; j < sb.n_hooks; j++)
                if (!strcmp(sb.hooks[j], t)) {
                    fprintf(stderr, "sae-llama-capture: hook %s given twice\n", t);
                    return 2;
                }
            int L;
            sae_llama_point p;
            if (sae_llama_hook_parse(t, &L, &p, err, sizeof err) != 0) {
                fprintf(stderr, "sae-llama-capture: %s\n", err);
                return 2;
            }
            sb.hooks[sb.n_hooks++] = strdup(t);
        }
        free(copy);
    }

    struct stat mst;
    if (stat(model_path, &mst) != 0 || !S_ISREG(mst.st_mode)) {
        fprintf(stderr, "sae-llama-capture: model %s: %s\n", model_path,
                errno ? strerror(errno) : "not a regular file");
        return 1;
    }
    struct llama_model *model = sae_llama_load_model(model_path, false);
    if (!model) {
        fprintf(stderr, "sae-llama-capture: cannot load the model %s\n", model_path);
        return 1;
    }
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    const int n_layer = llama_model_n_layer(model);
    sb.d = (size_t)llama_model_n_embd(model);
    if (!ctx)
        ctx = llama_model_n_ctx_train(model);
    if (ctx < 2) {
        fprintf(stderr, "sae-llama-capture: --ctx must be at least 2\n");
        return 2;
    }
    if (!parallel)
        parallel = ctx >= 512 ? 1 : (512 + ctx - 1) / ctx;

    /* the hook table: one reader per hook */
    sae_llama_entry *ent = calloc((size_t)sb.n_hooks + 1, sizeof *ent);
    reader_ctx *rctx = calloc((size_t)sb.n_hooks + 1, sizeof *rctx);
    if (!ent || !rctx) return 1;
    for (int i = 0; i < sb.n_hooks; i++) {
        rctx[i] = (reader_ctx){&sb, i};
        ent[i] = (sae_llama_entry){.hook = sb.hooks[i], .reader = reader, .user = &rctx[i]};
    }
    sae_llama_hooks *hk = NULL;
    if (!baseline && sae_llama_hooks_new(&hk, model, ent, (size_t)sb.n_hooks, err, sizeof err)) {
        fprintf(stderr, "sae-llama-capture: %s\n", err);
        return 2;
    }
    /* hooks after the last block's attention need every token's output row */
    bool all_logits = false;
    for (int i = 0; i < sb.n_hooks; i++) {
        int L;
        sae_llama_point p;
        sae_llama_hook_parse(sb.hooks[i], &L, &p, err, sizeof err);
        if (L == n_layer - 1 && p >= SAE_LLAMA_RESID_MID)
            all_logits = true;
    }

    /* the output directory and a previous run */
    cJSON *settings = settings_json(model_path, corpus_path, jsonl, field, ctx, shard_tokens, dtype,
                                    max_tokens, sb.n_hooks, sb.hooks, sb.d, n_layer, !kv_f16 && !fa);
    cJSON *shards = cJSON_CreateArray();
    long long done_tokens = 0, done_windows = 0;
    int n_done = 0;
    char path[4096];
    if (!baseline) {
        if (mkdir(out_dir, 0777) != 0 && errno != EEXIST) {
            fprintf(stderr, "sae-llama-capture: %s: %s\n", out_dir, strerror(errno));
            return 1;
        }
        snprintf(path, sizeof path, "%s/index.json", out_dir);
        char *old = read_file(path);
        if (old) {
            cJSON *o = cJSON_Parse(old);
            free(old);
            cJSON *os = o ? cJSON_GetObjectItemCaseSensitive(o, "settings") : NULL;
            if (!os || !cJSON_Compare(os, settings, true)) {
                fprintf(stderr, "sae-llama-capture: %s holds a capture with other settings (or a "
                                "damaged index.json); use another directory\n", out_dir);
                return 1;
            }
            cJSON *sh = cJSON_GetObjectItemCaseSensitive(o, "shards");
            cJSON *c = cJSON_GetObjectItemCaseSensitive(o, "complete");
            if (cJSON_IsTrue(c)) {
                fprintf(stderr, "sae-llama-capture: %s is complete already, nothing to do\n", out_dir);
                return 0;
            }
            cJSON *s;
            cJSON_ArrayForEach(s, sh) {
                done_tokens += (long long)cJSON_GetNumberValue(cJSON_GetObjectItem(s, "tokens"));
                done_windows += (long long)cJSON_GetNumberValue(cJSON_GetObjectItem(s, "windows"));
                n_done++;
            }
            cJSON_Delete(shards);
            shards = cJSON_DetachItemFromObject(o, "shards");
            cJSON_Delete(o);
            fprintf(stderr, "sae-llama-capture: resuming %s after %d complete shards (%lld tokens)\n",
                    out_dir, n_done, done_tokens);
        }
        /* temporaries of a killed run */
        DIR *dd = opendir(out_dir);
        struct dirent *de;
        while (dd && (de = readdir(dd)))
            if (strstr(de->d_name, ".tmp.")) {
                snprintf(path, sizeof path, "%s/%s", out_dir, de->d_name);
                unlink(path);
            }
        if (dd) closedir(dd);
    }

    cio_corpus *corpus;
    if (cio_corpus_open(&corpus, corpus_path, jsonl, field, err, sizeof err) != 0) {
        fprintf(stderr, "sae-llama-capture: %s\n", err);
        return 1;
    }
    struct stat cst;
    stat(corpus_path, &cst);
    windower win = {.corpus = corpus, .vocab = vocab, .bos = llama_vocab_bos(vocab), .ctx = ctx};

    /* the context: parallel windows as sequences of one batch */
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)(ctx * parallel);
    cp.n_batch = cp.n_ctx;
    cp.n_ubatch = cp.n_ctx < 512 ? cp.n_ctx : 512;
    cp.n_seq_max = (uint32_t)parallel;
    cp.kv_unified = true;
    if (threads) { cp.n_threads = threads; cp.n_threads_batch = threads; }
    if (!kv_f16) { cp.type_k = GGML_TYPE_F32; cp.type_v = GGML_TYPE_F32; }
    if (!fa) cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    if (hk) sae_llama_hooks_params(hk, &cp);
    struct llama_context *lctx = llama_init_from_model(model, cp);
    if (!lctx) {
        fprintf(stderr, "sae-llama-capture: cannot create a llama.cpp context\n");
        return 1;
    }

    /* shard buffers */
    sb.cap_tok = (size_t)(shard_tokens < ctx ? ctx : shard_tokens);
    const size_t es = sb.f16 ? 2 : 4;
    for (int i = 0; i < sb.n_hooks; i++)
        if (!(sb.act[i] = malloc(sb.cap_tok * sb.d * es))) {
            fprintf(stderr, "sae-llama-capture: out of memory for a shard of %zu tokens\n", sb.cap_tok);
            return 1;
        }
    int32_t *s_tok = malloc(sb.cap_tok * sizeof *s_tok), *s_pos = malloc(sb.cap_tok * sizeof *s_pos);
    int64_t *s_doc = malloc(sb.cap_tok * sizeof *s_doc);
    struct llama_batch batch = llama_batch_init(ctx * parallel, 0, 1);
    llama_token *wt = malloc(sizeof *wt * (size_t)ctx * (size_t)(parallel + 1));
    int64_t *wd = malloc(sizeof *wd * (size_t)ctx * (size_t)(parallel + 1));
    int *wlen = malloc(sizeof *wlen * (size_t)(parallel + 1));
    if (!s_tok || !s_pos || !s_doc || !wt || !wd || !wlen)
        return 1;

    /* skip the windows of the complete shards */
    for (long long w = 0; w < done_windows; w++) {
        int n = next_window(&win, wt, wd);
        if (n <= 0) {
            fprintf(stderr, "sae-llama-capture: the corpus has fewer windows than the index lists\n");
            return 1;
        }
    }

    long long total = done_tokens, run_tokens = 0;
    int shard = n_done;
    size_t s_n = 0;          /* tokens in the current shard */
    long long s_windows = 0;
    llama_token *pend_tok = malloc(sizeof *pend_tok * (size_t)ctx);
    int64_t *pend_doc = malloc(sizeof *pend_doc * (size_t)ctx);
    int pend_n = 0;          /* a window read that did not fit the shard: it opens the next */
    bool eof = false;
    const double t_start = now_s();
    double t_decode = 0;
    int status = 0;
    if (!pend_tok || !pend_doc)
        return 1;
    for (;;) {
        /* a batch of up to `parallel` windows, all in the current shard */
        int nw = 0;
        size_t in_batch = 0;
        while (nw < parallel && !eof) {
            llama_token *t = wt + (size_t)nw * (size_t)ctx;
            int64_t *dd = wd + (size_t)nw * (size_t)ctx;
            int n;
            if (pend_n) {
                n = pend_n;
                memcpy(t, pend_tok, sizeof *t * (size_t)n);
                memcpy(dd, pend_doc, sizeof *dd * (size_t)n);
                pend_n = 0;
            } else {
                n = next_window(&win, t, dd);
                if (n < 0) {
                    fprintf(stderr, "\nsae-llama-capture: corpus %s: %s\n", corpus_path, win.err);
                    return 1;
                }
                if (max_tokens && total + (long long)in_batch + n >= max_tokens) {
                    n = (int)(max_tokens - total - (long long)in_batch);
                    eof = true;   /* nothing after this window */
                    if (n < 2)
                        break;
                }
                if (n == 0) {
                    eof = true;
                    break;
                }
            }
            if (s_n + in_batch + (size_t)n > sb.cap_tok) {
                memcpy(pend_tok, t, sizeof *t * (size_t)n);
                memcpy(pend_doc, dd, sizeof *dd * (size_t)n);
                pend_n = n;
                break;
            }
            wlen[nw++] = n;
            in_batch += (size_t)n;
        }
        if (nw > 0) {
            /* decode nw windows as sequences 0..nw-1 */
            batch.n_tokens = 0;
            for (int w = 0; w < nw; w++)
                for (int i = 0; i < wlen[w]; i++) {
                    const int b = batch.n_tokens++;
                    batch.token[b] = wt[(size_t)w * (size_t)ctx + (size_t)i];
                    batch.pos[b] = i;
                    batch.n_seq_id[b] = 1;
                    batch.seq_id[b][0] = w;
                    batch.logits[b] = all_logits || i == wlen[w] - 1;
                    s_tok[s_n + (size_t)b] = batch.token[b];
                    s_pos[s_n + (size_t)b] = i;
                    s_doc[s_n + (size_t)b] = wd[(size_t)w * (size_t)ctx + (size_t)i];
                }
            llama_memory_clear(llama_get_memory(lctx), true);
            sb.batch_base = s_n;
            const double t0 = now_s();
            int rc = hk ? sae_llama_decode(hk, lctx, batch) : llama_decode(lctx, batch);
            t_decode += now_s() - t0;
            if (rc != 0) {
                fprintf(stderr, "\nsae-llama-capture: %s\n",
                        hk ? sae_llama_hooks_error(hk) : "llama_decode failed");
                return 1;
            }
            s_n += (size_t)batch.n_tokens;
            s_windows += nw;
            total += batch.n_tokens;
            run_tokens += batch.n_tokens;
        }
        const bool finished = eof && !pend_n;
        const bool flush = s_n > 0 && (finished || pend_n || s_n == sb.cap_tok);
        if (flush && !baseline) {
            char name[64];
            snprintf(name, sizeof name, "shard-%05d", shard);
            for (int i = 0; i < sb.n_hooks; i++) {
                snprintf(path, sizeof path, "%s/%s.%s.npy", out_dir, name, sb.hooks[i]);
                int rc;
                if (sb.f16)
                    rc = cio_npy_write(path, "<f2", sb.act[i], s_n, sb.d, err, sizeof err);
                else if ((rc = sae_npy_write(path, sb.act[i], s_n, sb.d)) != SAE_OK)
                    set_err(err, sizeof err, "%s", sae_last_error());
                if (rc != 0) {
                    fprintf(stderr, "\nsae-llama-capture: %s\n", err);
                    return 1;
                }
            }
            /* for the resume test: die like a kill would, the shard's activations written, its
             * tokens and the index not yet */
            if (kill_at >= 0 && shard == kill_at)
                raise(SIGKILL);
            static const char *what[] = {"tokens", "positions", "doc_ids"};
            for (int k = 0; k < 3; k++) {
                snprintf(path, sizeof path, "%s/%s.%s.npy", out_dir, name, what[k]);
                if (cio_npy_write(path, k == 2 ? "<i8" : "<i4",
                                  k == 0 ? (void *)s_tok : k == 1 ? (void *)s_pos : (void *)s_doc,
                                  s_n, 0, err, sizeof err) != 0) {
                    fprintf(stderr, "\nsae-llama-capture: %s\n", err);
                    return 1;
                }
            }
            cJSON *sh = cJSON_CreateObject();
            cJSON_AddStringToObject(sh, "name", name);
            cJSON_AddNumberToObject(sh, "tokens", (double)s_n);
            cJSON_AddNumberToObject(sh, "windows", (double)s_windows);
            cJSON_AddNumberToObject(sh, "first_token", (double)(total - (long long)s_n));
            cJSON_AddItemToArray(shards, sh);
            cJSON *idx = cJSON_CreateObject();
            cJSON_AddStringToObject(idx, "format", "libsae-capture-1");
            cJSON_AddItemReferenceToObject(idx, "settings", settings);
            cJSON_AddItemReferenceToObject(idx, "shards", shards);
            cJSON_AddNumberToObject(idx, "tokens", (double)total);
            cJSON_AddBoolToObject(idx, "complete", finished);
            cJSON_AddStringToObject(idx, "files",
                                    "<shard>.<hook>.npy [tokens][n_embd] activations; "
                                    "<shard>.tokens.npy, .positions.npy (int32), .doc_ids.npy (int64)");
            char *txt = cJSON_Print(idx);
            cJSON_Delete(idx);
            snprintf(path, sizeof path, "%s/index.json", out_dir);
            if (!txt || write_text_atomic(path, txt, err, sizeof err) != 0) {
                fprintf(stderr, "\nsae-llama-capture: %s\n", err);
                return 1;
            }
            free(txt);
            shard++;
            s_n = 0;
            s_windows = 0;
        } else if (flush) {
            s_n = 0;
        }
        if (progress) {
            const double el = now_s() - t_start;
            const double frac = cst.st_size > 0 ? (double)cio_corpus_tell(corpus) / (double)cst.st_size : 1;
            char bar[31];
            const int fill = (int)(30 * (frac > 1 ? 1 : frac));
            for (int i = 0; i < 30; i++) bar[i] = i < fill ? '#' : '.';
            bar[30] = 0;
            fprintf(stderr, "\rcapture [%s] %3.0f%% of the corpus, %lld tokens, %d shards, %.0f tok/s  ",
                    bar, 100 * frac, total, shard, el > 0 ? (double)run_tokens / el : 0.0);
        }
        if (finished)
            break;
    }
    if (progress)
        fputc('\n', stderr);
    const double el = now_s() - t_start;
    if (total == 0) {
        fprintf(stderr, "sae-llama-capture: the corpus %s gives no tokens\n", corpus_path);
        status = 1;
    } else {
        double tcb = 0, tsae = 0;
        sae_llama_hooks_times(hk, &tcb, &tsae);
        printf("%s: %lld tokens in %d shards, %.2f s (%.0f tok/s; llama_decode %.2f s, %.0f tok/s; "
               "in callback %.2f s)\n", baseline ? "baseline (no callback)" : "capture", run_tokens,
               shard, el, (double)run_tokens / el, t_decode, (double)run_tokens / t_decode, tcb);
    }
    llama_batch_free(batch);
    llama_free(lctx);
    sae_llama_hooks_free(hk);
    llama_model_free(model);
    cio_corpus_close(corpus);
    cJSON_Delete(settings);
    cJSON_Delete(shards);
    return status;
}
