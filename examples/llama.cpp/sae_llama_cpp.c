/*
 * sae-llama-cpp: libsae inside an unmodified llama.cpp, through its public eval callback.
 *
 *   sae-llama-cpp -m MODEL.gguf --sae SAE.safetensors [--layer L] (-p TEXT | -t IDS) [-n N]
 *                 [--features K] [--clamp F:V] [--scale F:A] [--add F:C] [--via ...]
 *                 [--compare] [--bench R] [--json]
 *
 * The SAE reads the residual stream ENTERING block L (SAELens blocks.L.hook_resid_pre), which
 * llama.cpp's graph names "l_out-<L-1>" (the output of block L-1, after its FFN residual add and
 * after any control vector). The hook adapter sae_llama_hook.{h,c} installs cb_eval with one
 * entry (that hook, the SAE, the steering plan or none, a reader): cb_eval asks for that one
 * tensor; when it has been computed (and before any later node runs) the adapter copies its rows
 * out, applies the steering plan (sae_steer_apply) and writes the rows back; the reader here
 * records each token's top SAE features (sae_encode_sparse) and the rows, before the plan.
 * Everything it needs is in llama.h, ggml-backend.h and sae.h.
 *
 * A plan of add ops only is a constant vector, so it can also go through llama.cpp's own
 * control-vector machinery instead of the callback:
 *   --via cvec       sae_steer_vector fills llama_set_adapter_cvec's buffer (layer L-1);
 *   --via cvec-file  sae_steer_write_cvec writes a control-vector GGUF that is loaded with
 *                    llama.cpp's own common_control_vector_load, as --control-vector does.
 *
 * --compare runs the prompt twice, without and with the plan, prints both texts and measures
 * the effect: how many tokens differ, and how strongly each plan feature fires on each
 * generated text (read back through the same SAE with no plan, so every path is measured the
 * same way). --bench R times R greedy generations per mode and reports the callback's cost per
 * token against llama.cpp's own step time. --json prints one JSON object (for the checks).
 */
#define _POSIX_C_SOURCE 200809L
#include "cvec_file.h"
#include "plan.h"
#include "sae_llama_hook.h"

#include "ggml.h"
#include "llama.h"
#include "sae.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ======================================================================================== */
/* What this program keeps of the rows sae_llama_hook hands its reader: the adapter finds the
 * hook's tensor in the graph, copies its rows out, applies the steering plan and writes the rows
 * back (sae_llama_hook.c); the reader records each token's top features and, if asked, the rows
 * themselves, both as llama.cpp computed them (before the plan), by position. */

typedef struct {
    char hook[48];              /* "blocks.L.hook_resid_pre" */
    char name[48];              /* its graph tensor, "l_out-<L-1>" */
    const sae_model *sae;
    size_t top_k;               /* > 0: record each token's top_k features (before the plan) */
    bool capture;               /* keep each row as llama.cpp handed it over (before the plan) */
    size_t d;
    /* results */
    float *cap;                 /* captured rows by position */
    uint32_t *fidx, *fcnt;      /* top features by position: [pos][top_k], [pos] */
    float *fval;
    int n_pos, pos_alloc;
    long n_calls, n_written;
    double t_sae;               /* seconds inside libsae in the reader (the adapter counts its own) */
} sae_record;

static int record_reserve(sae_record *h, int need)
{
    if (need <= h->pos_alloc)
        return 0;
    int na = h->pos_alloc ? h->pos_alloc : 64;
    while (na < need)
        na *= 2;
    const size_t k = h->top_k ? h->top_k : 1, d = h->d;
    float *cap = h->capture ? realloc(h->cap, (size_t)na * d * sizeof *cap) : h->cap;
    if (h->capture && cap)
        h->cap = cap;
    uint32_t *fi = realloc(h->fidx, (size_t)na * k * sizeof *fi);
    if (fi)
        h->fidx = fi;
    float *fv = realloc(h->fval, (size_t)na * k * sizeof *fv);
    if (fv)
        h->fval = fv;
    uint32_t *fc = realloc(h->fcnt, (size_t)na * sizeof *fc);
    if (fc)
        h->fcnt = fc;
    if ((h->capture && !cap) || !fi || !fv || !fc)
        return -1;
    h->pos_alloc = na;
    return 0;
}

/* sae_llama_reader: rows->x are the rows as llama.cpp computed them, rows->out what the plan
 * wrote back (NULL when there is no plan in the callback). Non-zero cancels the decode. */
static int record_rows(void *user, const sae_llama_rows *rows)
{
    sae_record *h = user;
    const size_t n = rows->n, d = rows->d;
    h->n_calls++;
    if (rows->out)
        h->n_written++;
    if (!h->capture && !h->top_k)
        return 0;
    int hi = 0;
    for (size_t i = 0; i < n; i++)
        if (rows->pos[i] < 0)
            return -1;
        else if (rows->pos[i] + 1 > hi)
            hi = rows->pos[i] + 1;
    if (record_reserve(h, hi) != 0)
        return -1;
    if (hi > h->n_pos)
        h->n_pos = hi;
    if (h->capture)
        for (size_t i = 0; i < n; i++)
            memcpy(h->cap + (size_t)rows->pos[i] * d, rows->x + i * d, d * sizeof(float));
    if (!h->top_k)
        return 0;
    /* one sae_encode_sparse call for the ubatch when its positions follow each other (one
     * sequence), one per row otherwise */
    bool run = true;
    for (size_t i = 1; i < n; i++)
        run = run && rows->pos[i] == rows->pos[0] + (llama_pos)i;
    const double s0 = now_s();
    int rc = SAE_OK;
    for (size_t i = 0; i < n && rc == SAE_OK; i += run ? n : 1) {
        const size_t p = (size_t)rows->pos[i], m = run ? n : 1;
        rc = sae_encode_sparse(h->sae, rows->x + i * d, m, h->top_k, h->fidx + p * h->top_k,
                               h->fval + p * h->top_k, h->fcnt + p);
    }
    h->t_sae += now_s() - s0;
    if (rc != SAE_OK) {
        fprintf(stderr, "sae-llama-cpp: libsae: %s\n", sae_last_error());
        return -1;
    }
    return 0;
}
/* ======================================================================================== */

typedef enum { VIA_CALLBACK, VIA_CVEC, VIA_CVEC_FILE } via_t;
static const char *via_name[] = {"callback", "cvec", "cvec-file"};

typedef struct {
    const char *model_path, *sae_path, *prompt, *ids, *stats_path, *cvec_out, *find;
    int layer, n_gen, n_threads, n_ubatch, top_k, dump_resid, bench;
    bool json, compare, kv_f16, flash_attn, verbose;
    via_t via;
} opts_t;

typedef struct {
    llama_token *toks;
    int n_prompt, n_tok;
    double t_prompt, t_gen;   /* llama_decode time of the prompt and of the generation steps */
    double cb_gen, sae_gen;   /* time in the callback and in libsae during the generation steps */
    int n_steps;
    sae_record h;             /* the reader's record (rows, features, calls) */
} run_t;

static void run_free(run_t *r)
{
    free(r->toks);
    free(r->h.cap);
    free(r->h.fidx);
    free(r->h.fval);
    free(r->h.fcnt);
    memset(r, 0, sizeof *r);
}

/* llama_decode through the hooks, or alone when there are none */
static int decode(sae_llama_hooks *hooks, struct llama_context *ctx, struct llama_batch b)
{
    return hooks ? sae_llama_decode(hooks, ctx, b) : (llama_decode(ctx, b) != 0 ? -1 : 0);
}

/* One greedy generation in a fresh context. install_cb: the hook at blocks.L.hook_resid_pre
 * through sae_llama_hook, or no cb_eval at all. The plan goes through the callback (via ==
 * VIA_CALLBACK) or as a control vector; top_k and capture are what the reader records. */
static int run_once(const opts_t *o, struct llama_model *model, const sae_model *sae,
                    const llama_token *prompt, int n_prompt, int n_gen, bool install_cb,
                    const sae_steer *plan, via_t via, size_t top_k, bool capture, run_t *r)
{
    memset(r, 0, sizeof *r);
    const int n_embd = llama_model_n_embd(model), n_layer = llama_model_n_layer(model);
    r->toks = malloc(sizeof(llama_token) * (size_t)(n_prompt + n_gen + 1));
    if (!r->toks)
        return -1;
    memcpy(r->toks, prompt, sizeof(llama_token) * (size_t)n_prompt);
    r->n_prompt = n_prompt;

    sae_record *h = &r->h;
    snprintf(h->hook, sizeof h->hook, "blocks.%d.hook_resid_pre", o->layer);
    sae_llama_tensor_name(o->layer, SAE_LLAMA_RESID_PRE, h->name, sizeof h->name);
    h->sae = sae;
    h->top_k = top_k;
    h->capture = capture;
    h->d = (size_t)n_embd;
    sae_llama_hooks *hooks = NULL;
    if (install_cb) {
        const sae_llama_entry e = {.hook = h->hook, .dict = sae,
                                   .plan = via == VIA_CALLBACK ? plan : NULL,
                                   .reader = record_rows, .user = h};
        char err[512];
        if (sae_llama_hooks_new(&hooks, model, &e, 1, err, sizeof err) != 0) {
            fprintf(stderr, "sae-llama-cpp: %s\n", err);
            return -1;
        }
    }

    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)(n_prompt + n_gen + 1);
    cp.n_batch = cp.n_ctx;
    cp.n_ubatch = o->n_ubatch > 0 ? (uint32_t)o->n_ubatch : cp.n_ctx;
    cp.n_threads = o->n_threads;
    cp.n_threads_batch = o->n_threads;
    /* llama.cpp's defaults (flash attention "auto" = on for CPU, F16 KV cache) round attention
     * through F16: the stream then differs from an F32 engine by ~1e-3. Off by default here. */
    if (!o->kv_f16) { cp.type_k = GGML_TYPE_F32; cp.type_v = GGML_TYPE_F32; }
    if (!o->flash_attn) cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    if (hooks) {
        sae_llama_hooks_params(hooks, &cp);
        /* kv_unified, which the adapter sets so that several sequences reach the callback in
         * batch order, is not needed for one sequence (n_seq_max 1: one KV stream, llama.cpp
         * splits the batch "simple" either way) and costs every llama_decode a pass over
         * LLAMA_MAX_SEQ^2 sequence pairs (~80 us a step here, a third of stories260K's step) */
        cp.kv_unified = false;
    }
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "sae-llama-cpp: cannot create a context\n");
        sae_llama_hooks_free(hooks);
        return -1;
    }

    int rc = 0;
    const int il = o->layer - 1;  /* the block whose output is the stream entering block L */
    if (plan && via == VIA_CVEC) {
        /* llama_set_adapter_cvec's buffer: n_embd floats per layer 1..n_layer-1, layer 1 first */
        const size_t len = (size_t)n_embd * (size_t)(n_layer - 1);
        float *buf = calloc(len, sizeof *buf);
        if (!buf || sae_steer_vector(plan, buf + (size_t)n_embd * (size_t)(il - 1)) != SAE_OK) {
            fprintf(stderr, "sae-llama-cpp: sae_steer_vector: %s\n", sae_last_error());
            rc = -1;
        } else if (llama_set_adapter_cvec(ctx, buf, len, n_embd, il, il) != 0) {
            fprintf(stderr, "sae-llama-cpp: llama_set_adapter_cvec failed\n");
            rc = -1;
        }
        free(buf);
    } else if (plan && via == VIA_CVEC_FILE) {
        char tmp[4096];
        const char *path = o->cvec_out;
        if (!path) {
            const char *td = getenv("TMPDIR");
            snprintf(tmp, sizeof tmp, "%s/sae-llama-cpp-%ld.gguf", td && *td ? td : "/tmp",
                     (long)getpid());
            path = tmp;
        }
        if (sae_steer_write_cvec(plan, path, (size_t)il, (size_t)n_layer, "llama") != SAE_OK) {
            fprintf(stderr, "sae-llama-cpp: sae_steer_write_cvec: %s\n", sae_last_error());
            rc = -1;
        } else if (llcpp_control_vector_apply(ctx, model, path, 1.0f, 0, 0) != 0) {
            /* layer range 0, 0: llama.cpp's defaults 1..n_layer, as a bare --control-vector */
            fprintf(stderr, "sae-llama-cpp: llama.cpp refused the control vector %s\n", path);
            rc = -1;
        }
        if (!o->cvec_out)
            remove(path);
    }

    struct llama_sampler *smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(smpl, llama_sampler_init_greedy());
    int n = n_prompt;
    if (rc == 0) {
        /* the batches carry no positions: sae_llama_decode takes them from the KV memory, as
         * llama_decode does, and hands them to the reader */
        double t0 = now_s();
        rc = decode(hooks, ctx, llama_batch_get_one(r->toks, n_prompt));
        r->t_prompt = now_s() - t0;
        double cb0 = 0, sae0 = 0;
        sae_llama_hooks_times(hooks, &cb0, &sae0);
        sae0 += h->t_sae;
        /* greedy, no early stop at BOS/EOS (as reference.json and the engine check) */
        for (int g = 0; rc == 0 && g < n_gen; g++) {
            r->toks[n++] = llama_sampler_sample(smpl, ctx, -1);
            if (g == n_gen - 1)
                break;
            t0 = now_s();
            rc = decode(hooks, ctx, llama_batch_get_one(&r->toks[n - 1], 1));
            r->t_gen += now_s() - t0;
            r->n_steps++;
        }
        double cb1 = 0, sae1 = 0;
        sae_llama_hooks_times(hooks, &cb1, &sae1);
        r->cb_gen = cb1 - cb0;
        r->sae_gen = sae1 + h->t_sae - sae0;
        if (rc)
            fprintf(stderr, "sae-llama-cpp: llama_decode failed%s%s\n", hooks ? ": " : "",
                    hooks ? sae_llama_hooks_error(hooks) : "");
    }
    r->n_tok = n;
    llama_sampler_free(smpl);
    llama_free(ctx);
    sae_llama_hooks_free(hooks);
    return rc;
}

/* ---- text ------------------------------------------------------------------------------- */

/* As llama2.c prints it: without BOS, and without the SentencePiece space after it. */
static char *detok(const struct llama_vocab *vocab, const llama_token *t, int n, int *len)
{
    const int skip = n > 0 && t[0] == llama_vocab_bos(vocab);
    int cap = 16 * n + 64;
    char *s = malloc((size_t)cap);
    if (!s)
        return NULL;
    int k = llama_detokenize(vocab, t + skip, n - skip, s, cap, false, false);
    *len = k < 0 ? 0 : k;
    s[*len] = 0;
    return s;
}

static void piece(const struct llama_vocab *vocab, llama_token t, char *buf, size_t cap)
{
    int k = llama_token_to_piece(vocab, t, buf, (int32_t)cap - 1, 0, true);
    buf[k < 0 ? 0 : k] = 0;
    for (char *p = buf; *p; p++)
        if (*p == '\n') *p = ' ';
}

static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c == '\n') fputs("\\n", f);
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

static void json_tokens(FILE *f, const llama_token *t, int n)
{
    fputc('[', f);
    for (int i = 0; i < n; i++)
        fprintf(f, "%s%d", i ? "," : "", t[i]);
    fputc(']', f);
}

static void usage(void)
{
    fprintf(stderr,
        "usage: sae-llama-cpp -m MODEL.gguf --sae SAE.safetensors [options]\n"
        "  -p TEXT | -t IDS   prompt as text (BOS added) or comma-separated token ids\n"
        "  -n N               tokens to generate greedily (32)\n"
        "  --layer L          the SAE reads the stream entering block L (tensor l_out-<L-1>; 2)\n"
        "  --features K       print each token's top K features (before the plan)\n"
        "  --clamp F:V        clamp feature F to V (V may be Mx: M times its max, needs --stats)\n"
        "  --scale F:A        multiply feature F by A\n"
        "  --add F:C          add C * W_dec[F] (add-only plans may use --via cvec / cvec-file)\n"
        "  --via callback|cvec|cvec-file   how the plan reaches llama.cpp (callback)\n"
        "  --cvec-out PATH    keep the control-vector GGUF of --via cvec-file here\n"
        "  --stats TSV        feature maxima and top tokens (sae-train-resid --features)\n"
        "  --find-feature W   print the feature whose strongest examples are the token W (--stats)\n"
        "  --compare          unsteered and steered side by side, with the measured effect\n"
        "  --bench R          time R generations per mode: the callback's cost per token\n"
        "  --dump-resid K     (--json) the first K rows as llama.cpp handed them to the callback\n"
        "  --threads N (1)  --ubatch N  --kv-f16  --fa  --json  -v\n");
}

/* Two texts in two columns of `width` characters, wrapped at spaces (newlines kept). */
static const char *wrap_line(const char *s, int width, int *len)
{
    int n = 0, cut = -1;
    while (s[n] && s[n] != '\n' && n < width) {
        if (s[n] == ' ')
            cut = n;
        n++;
    }
    if (s[n] && s[n] != '\n' && n == width && cut > 0)
        n = cut;
    *len = n;
    s += n;
    if (*s == '\n' || *s == ' ')
        s++;
    return s;
}

static void side_by_side(const char *a, const char *b, int width)
{
    printf("%-*s | %s\n", width, "unsteered", "steered");
    for (int i = 0; i < width; i++) putchar('-');
    printf("-+-");
    for (int i = 0; i < width; i++) putchar('-');
    putchar('\n');
    while (*a || *b) {
        int la = 0, lb = 0;
        const char *pa = a, *pb = b;
        if (*a) a = wrap_line(a, width, &la);
        if (*b) b = wrap_line(b, width, &lb);
        printf("%-*.*s | %.*s\n", width, la, pa, lb, pb);
    }
}

/* ---- measurement --------------------------------------------------------------------------- */

/* Reads tokens[0..n) once through a plain context and returns the SAE's dense codes of the rows
 * in [from, n) for the given features: codes[(pos - from) * n_feat + j]. */
static float *read_codes(const opts_t *o, struct llama_model *model, const sae_model *sae,
                         const llama_token *tokens, int n, int from, const plan_op *ops, int n_ops)
{
    run_t r;
    float *codes = NULL, *f = NULL;
    const size_t d_sae = sae_model_d_sae(sae), d = sae_model_d_in(sae);
    if (run_once(o, model, sae, tokens, n, 0, true, NULL, VIA_CALLBACK, 0, true, &r) != 0)
        goto out;
    codes = malloc(sizeof *codes * (size_t)(n - from) * (size_t)(n_ops ? n_ops : 1));
    f = malloc(sizeof *f * d_sae);
    if (!codes || !f)
        goto out;
    for (int p = from; p < n; p++) {
        if (sae_encode(sae, r.h.cap + (size_t)p * d, 1, f) != SAE_OK) {
            free(codes);
            codes = NULL;
            goto out;
        }
        for (int j = 0; j < n_ops; j++)
            codes[(size_t)(p - from) * (size_t)n_ops + (size_t)j] = f[ops[j].feature];
    }
out:
    free(f);
    run_free(&r);
    return codes;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* ---- main ---------------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
    opts_t o = {.layer = 2, .n_gen = 32, .n_threads = 1};
    plan_op ops[PLAN_MAX_OPS];
    int n_ops = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDV() do { if (!v) { usage(); return 2; } i++; } while (0)
        if (!strcmp(a, "-m")) { NEEDV(); o.model_path = v; }
        else if (!strcmp(a, "--sae")) { NEEDV(); o.sae_path = v; }
        else if (!strcmp(a, "-p")) { NEEDV(); o.prompt = v; }
        else if (!strcmp(a, "-t")) { NEEDV(); o.ids = v; }
        else if (!strcmp(a, "-n")) { NEEDV(); o.n_gen = atoi(v); }
        else if (!strcmp(a, "--layer")) { NEEDV(); o.layer = atoi(v); }
        else if (!strcmp(a, "--features")) { NEEDV(); o.top_k = atoi(v); }
        else if (!strcmp(a, "--dump-resid")) { NEEDV(); o.dump_resid = atoi(v); }
        else if (!strcmp(a, "--threads")) { NEEDV(); o.n_threads = atoi(v); }
        else if (!strcmp(a, "--ubatch")) { NEEDV(); o.n_ubatch = atoi(v); }
        else if (!strcmp(a, "--stats")) { NEEDV(); o.stats_path = v; }
        else if (!strcmp(a, "--find-feature")) { NEEDV(); o.find = v; }
        else if (!strcmp(a, "--cvec-out")) { NEEDV(); o.cvec_out = v; }
        else if (!strcmp(a, "--bench")) { NEEDV(); o.bench = atoi(v); }
        else if (!strcmp(a, "--clamp") || !strcmp(a, "--scale") || !strcmp(a, "--add")) {
            NEEDV();
            if (n_ops == PLAN_MAX_OPS || plan_parse_op(a[2], v, &ops[n_ops]) != 0) {
                fprintf(stderr, "sae-llama-cpp: %s wants FEATURE:VALUE, got \"%s\"\n", a, v);
                return 2;
            }
            n_ops++;
        } else if (!strcmp(a, "--via")) {
            NEEDV();
            if (!strcmp(v, "callback")) o.via = VIA_CALLBACK;
            else if (!strcmp(v, "cvec")) o.via = VIA_CVEC;
            else if (!strcmp(v, "cvec-file")) o.via = VIA_CVEC_FILE;
            else { usage(); return 2; }
        }
        else if (!strcmp(a, "--json")) o.json = true;
        else if (!strcmp(a, "--compare")) o.compare = true;
        else if (!strcmp(a, "--kv-f16")) o.kv_f16 = true;
        else if (!strcmp(a, "--fa")) o.flash_attn = true;
        else if (!strcmp(a, "-v")) o.verbose = true;
        else { usage(); return 2; }
#undef NEEDV
    }
    if (!o.model_path || !o.sae_path || (o.prompt && o.ids) || o.n_gen < 0 || o.top_k < 0 ||
        o.n_threads < 1 || o.bench < 0 || o.dump_resid < 0) {
        usage();
        return 2;
    }

    sae_model *sae;
    if (sae_model_load(&sae, o.sae_path) != SAE_OK) {
        fprintf(stderr, "sae-llama-cpp: %s\n", sae_last_error());
        return 1;
    }
    const size_t d_sae = sae_model_d_sae(sae);

    struct llama_model *model = sae_llama_load_model(o.model_path, o.verbose);
    if (!model) {
        fprintf(stderr, "sae-llama-cpp: cannot load %s\n", o.model_path);
        return 1;
    }
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    const int n_embd = llama_model_n_embd(model), n_layer = llama_model_n_layer(model);
    if ((size_t)n_embd != sae_model_d_in(sae)) {
        fprintf(stderr, "sae-llama-cpp: the model's n_embd is %d, the SAE's d_in %zu\n", n_embd,
                sae_model_d_in(sae));
        return 1;
    }
    /* l_out of the last block keeps only the rows that make logits, so L stops at n_layer - 1 */
    if (o.layer < 1 || o.layer > n_layer - 1) {
        fprintf(stderr, "sae-llama-cpp: --layer must be in 1..%d (the stream entering that block)\n",
                n_layer - 1);
        return 2;
    }

    /* the plan */
    sae_steer *plan = NULL;
    float *mx = NULL;
    char plan_desc[1024];
    int *ftok = NULL, *fn_of = NULL;
    if (o.stats_path) {
        ftok = malloc(sizeof *ftok * d_sae);
        fn_of = malloc(sizeof *fn_of * d_sae);
        if (!ftok || !fn_of || !(mx = plan_load_max(o.stats_path, d_sae)) ||
            plan_load_tokens(o.stats_path, d_sae, ftok, fn_of) != 0)
            return 1;
    }
    if (o.find) {
        /* the token W (exactly, or with SentencePiece's leading space) */
        long best = -1;
        for (size_t i = 0; ftok && i < d_sae; i++) {
            char pc[128];
            if (ftok[i] < 0)
                continue;
            piece(vocab, ftok[i], pc, sizeof pc);
            if (strcmp(pc, o.find) != 0 && !(pc[0] == ' ' && strcmp(pc + 1, o.find) == 0))
                continue;
            if (best < 0 || fn_of[i] > fn_of[best] || (fn_of[i] == fn_of[best] && mx[i] > mx[best]))
                best = (long)i;
        }
        if (!ftok) {
            fprintf(stderr, "sae-llama-cpp: --find-feature needs --stats\n");
            return 2;
        }
        if (best < 0) {
            fprintf(stderr, "sae-llama-cpp: no feature's strongest examples are \"%s\"\n", o.find);
            return 1;
        }
        fprintf(stderr, "sae-llama-cpp: feature %ld: %d of its top examples are \"%s\" (max %g)\n",
                best, fn_of[best], o.find, (double)mx[best]);
        printf("%ld\n", best);
        return 0;
    }
    if (plan_build(sae, ops, n_ops, mx, &plan, plan_desc, sizeof plan_desc) != 0)
        return 2;
    if (o.via != VIA_CALLBACK) {
        if (!plan) {
            fprintf(stderr, "sae-llama-cpp: --via %s needs a plan of --add ops\n", via_name[o.via]);
            return 2;
        }
        for (size_t j = 0; j < sae_steer_count(plan); j++) {
            sae_steer_op kind;
            sae_steer_get_op(plan, j, NULL, &kind, NULL);
            if (kind != SAE_STEER_ADD) {
                fprintf(stderr, "sae-llama-cpp: --via %s takes add ops only: clamp and scale depend"
                                " on each token's activations, which a constant vector cannot\n",
                        via_name[o.via]);
                return 2;
            }
        }
        if (o.layer < 2) {
            fprintf(stderr, "sae-llama-cpp: control vectors start at block 1's output, so --via %s"
                            " needs --layer >= 2\n", via_name[o.via]);
            return 2;
        }
    }

    /* the prompt */
    int cap = 4096, n_prompt = 0;
    llama_token *prompt = malloc(sizeof *prompt * (size_t)cap);
    if (o.ids) {
        const char *s = o.ids;
        while (*s && n_prompt < cap) {
            char *end;
            long t = strtol(s, &end, 10);
            if (end == s || t < 0 || t >= llama_vocab_n_tokens(vocab)) {
                fprintf(stderr, "sae-llama-cpp: bad token id list \"%s\"\n", o.ids);
                return 2;
            }
            prompt[n_prompt++] = (llama_token)t;
            s = *end ? end + 1 : end;
        }
    } else {
        const char *text = o.prompt ? o.prompt : "";
        n_prompt = llama_tokenize(vocab, text, (int32_t)strlen(text), prompt, cap, true, false);
        if (n_prompt < 0) {
            fprintf(stderr, "sae-llama-cpp: prompt too long\n");
            return 2;
        }
    }
    if (n_prompt == 0)
        prompt[n_prompt++] = llama_vocab_bos(vocab);

    /* ---- --bench: the callback's cost per generated token --------------------------------- */
    if (o.bench) {
        struct { const char *name; bool cb; size_t k; const sae_steer *p; } modes[] = {
            {"llama.cpp alone (no cb_eval)", false, 0, NULL},
            {"cb_eval: copy the rows out only", true, 0, NULL},
            {"cb_eval + sae_encode_sparse (top 8)", true, 8, NULL},
            {"cb_eval + sae_steer_apply + write back", true, 0, plan},
        };
        const int n_modes = plan ? 4 : 3;
        printf("bench: %s, SAE %s %zu x %zu at l_out-%d (stream entering block %d), %d threads, "
               "%d prompt + %d generated tokens, %d runs per mode (median)%s%s\n",
               o.model_path, sae_arch_name(sae_model_arch(sae)), sae_model_d_in(sae), d_sae,
               o.layer - 1, o.layer, o.n_threads, n_prompt, o.n_gen, o.bench,
               plan ? "; plan: " : "", plan_desc);
        printf("%-40s %12s %12s %12s %10s   %7s\n", "mode (per generated token)", "llama_decode",
               "in callback", "in libsae", "libsae %", "vs alone");
        /* modes interleaved run by run, so that a change in the machine's load hits them all */
        const int R = o.bench;
        double *st = calloc((size_t)(4 * R), sizeof *st), *cb = calloc((size_t)(4 * R), sizeof *cb),
               *sa = calloc((size_t)(4 * R), sizeof *sa);
        if (!st || !cb || !sa)
            return 1;
        for (int rep = 0; rep < R; rep++) {
            for (int m = 0; m < n_modes; m++) {
                run_t r;
                if (run_once(&o, model, sae, prompt, n_prompt, o.n_gen, modes[m].cb, modes[m].p,
                             VIA_CALLBACK, modes[m].k, false, &r) != 0)
                    return 1;
                /* generation steps only (one token each), not the prompt */
                const double steps = r.n_steps ? r.n_steps : 1;
                st[m * R + rep] = 1e6 * r.t_gen / steps;
                cb[m * R + rep] = 1e6 * r.cb_gen / steps;
                sa[m * R + rep] = 1e6 * r.sae_gen / steps;
                run_free(&r);
            }
        }
        double base = 0;
        for (int m = 0; m < n_modes; m++) {
            const double s = median(st + m * R, R), c = median(cb + m * R, R),
                         a = median(sa + m * R, R);
            if (m == 0) base = s;
            printf("%-40s %12.1f %12.1f %12.1f %9.1f%%   %+7.1f\n", modes[m].name, s, c, a,
                   100.0 * a / s, s - base);
        }
        free(st); free(cb); free(sa);
        return 0;
    }

    /* ---- one steered (or plain) generation ------------------------------------------------ */
    run_t r;
    if (run_once(&o, model, sae, prompt, n_prompt, o.n_gen, true, plan, o.via, (size_t)o.top_k,
                 o.dump_resid > 0, &r) != 0)
        return 1;
    int text_n;
    char *text = detok(vocab, r.toks, r.n_tok, &text_n);

    run_t base = {0};
    char *base_text = NULL;
    float *codes_base = NULL, *codes_steer = NULL;
    if (o.compare) {
        if (run_once(&o, model, sae, prompt, n_prompt, o.n_gen, true, NULL, VIA_CALLBACK, 0,
                     false, &base) != 0)
            return 1;
        base_text = detok(vocab, base.toks, base.n_tok, &text_n);
        if (n_ops) {
            codes_base = read_codes(&o, model, sae, base.toks, base.n_tok, n_prompt, ops, n_ops);
            codes_steer = read_codes(&o, model, sae, r.toks, r.n_tok, n_prompt, ops, n_ops);
            if (!codes_base || !codes_steer)
                return 1;
        }
    }
    int differ = 0, first_diff = -1;
    if (o.compare)
        for (int i = n_prompt; i < r.n_tok; i++)
            if (r.toks[i] != base.toks[i]) {
                differ++;
                if (first_diff < 0) first_diff = i - n_prompt;
            }
    const int n_new = r.n_tok - n_prompt;

    if (o.json) {
        printf("{\"model\":");
        json_str(stdout, o.model_path);
        printf(",\"sae\":");
        json_str(stdout, o.sae_path);
        printf(",\"layer\":%d,\"tensor\":\"%s\",\"via\":\"%s\",\"plan\":", o.layer, r.h.name,
               via_name[o.via]);
        json_str(stdout, plan_desc);
        printf(",\"prompt_tokens\":");
        json_tokens(stdout, r.toks, n_prompt);
        printf(",\"tokens\":");
        json_tokens(stdout, r.toks, r.n_tok);
        printf(",\"text\":");
        json_str(stdout, text);
        if (o.compare) {
            printf(",\"base_tokens\":");
            json_tokens(stdout, base.toks, base.n_tok);
            printf(",\"base_text\":");
            json_str(stdout, base_text);
            printf(",\"tokens_differing\":%d", differ);
        }
        printf(",\"features\":[");
        for (int p = 0; o.top_k && p < r.h.n_pos; p++) {
            printf("%s[", p ? "," : "");
            for (uint32_t j = 0; j < r.h.fcnt[p]; j++)
                printf("%s[%u,%.9g]", j ? "," : "", r.h.fidx[(size_t)p * (size_t)o.top_k + j],
                       (double)r.h.fval[(size_t)p * (size_t)o.top_k + j]);
            printf("]");
        }
        printf("],\"resid\":[");
        const int nd = o.dump_resid < r.h.n_pos ? o.dump_resid : r.h.n_pos;
        for (int p = 0; p < nd; p++) {
            printf("%s[", p ? "," : "");
            for (int j = 0; j < n_embd; j++)
                printf("%s%.9g", j ? "," : "", (double)r.h.cap[(size_t)p * (size_t)n_embd + (size_t)j]);
            printf("]");
        }
        printf("],\"callback_calls\":%ld,\"callback_writes\":%ld}\n", r.h.n_calls, r.h.n_written);
    } else {
        printf("model %s (n_embd %d, %d blocks); SAE %s %s %zu x %zu reading %s = the stream "
               "entering block %d\n", o.model_path, n_embd, n_layer, o.sae_path,
               sae_arch_name(sae_model_arch(sae)), sae_model_d_in(sae), d_sae, r.h.name, o.layer);
        if (o.top_k) {
            printf("\ntop %d features of each token at block %d (before the plan):\n", o.top_k, o.layer);
            for (int p = 0; p < r.h.n_pos && p < r.n_tok; p++) {
                char pc[64];
                piece(vocab, r.toks[p], pc, sizeof pc);
                printf("%4d %-12.12s", p, pc);
                for (uint32_t j = 0; j < r.h.fcnt[p]; j++)
                    printf(" %4u:%-6.2f", r.h.fidx[(size_t)p * (size_t)o.top_k + j],
                           (double)r.h.fval[(size_t)p * (size_t)o.top_k + j]);
                printf("\n");
            }
        }
        if (o.compare) {
            printf("\nprompt: %d tokens, then %d generated greedily\n", n_prompt, n_new);
            printf("plan: %s, through %s\n\n", n_ops ? plan_desc : "none", via_name[o.via]);
            side_by_side(base_text, text, 52);
            printf("\neffect: %d of %d generated tokens differ", differ, n_new);
            if (first_diff >= 0) printf(", from generated token %d on", first_diff);
            printf("\n");
            for (int j = 0; j < n_ops; j++) {
                /* the feature as the SAE reads each text with no plan: does the steered text
                 * itself carry more of it? */
                double sb = 0, ss = 0;
                int fb = 0, fs = 0;
                for (int p = 0; p < n_new; p++) {
                    float vb = codes_base[(size_t)p * (size_t)n_ops + (size_t)j];
                    float vs = codes_steer[(size_t)p * (size_t)n_ops + (size_t)j];
                    sb += vb; ss += vs;
                    fb += vb > 0; fs += vs > 0;
                }
                printf("feature %lu on the generated text, read back unsteered: fires on %d/%d "
                       "tokens (mean %.3f) unsteered, %d/%d (mean %.3f) steered", ops[j].feature,
                       fb, n_new, n_new ? sb / n_new : 0.0, fs, n_new, n_new ? ss / n_new : 0.0);
                if (mx) printf("; max over the training data %.3f", (double)mx[ops[j].feature]);
                printf("\n");
                if (ftok && ftok[ops[j].feature] >= 0) {
                    /* the token the feature stands for, counted in each text */
                    const llama_token ft = ftok[ops[j].feature];
                    int cb = 0, cs = 0;
                    for (int p = n_prompt; p < r.n_tok; p++) {
                        cb += base.toks[p] == ft;
                        cs += r.toks[p] == ft;
                    }
                    char pc[128];
                    piece(vocab, ft, pc, sizeof pc);
                    printf("feature %lu's token \"%s\" (the token of %d of its strongest examples):"
                           " %d times in the unsteered text, %d times in the steered text\n",
                           ops[j].feature, pc, fn_of[ops[j].feature], cb, cs);
                }
            }
        } else {
            printf("\n%s\n", text);
        }
    }
    free(text);
    free(base_text);
    free(codes_base);
    free(codes_steer);
    run_free(&r);
    run_free(&base);
    free(prompt);
    free(mx);
    free(ftok);
    free(fn_of);
    sae_steer_free(plan);
    llama_model_free(model);
    llama_backend_free();
    sae_model_free(sae);
    return 0;
}
