/* sae_llama_hook.c: see sae_llama_hook.h. */
#define _POSIX_C_SOURCE 200809L
#include "sae_llama_hook.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *point_names[SAE_LLAMA_POINTS] = {
    "hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_in", "hook_mlp_out",
    "hook_resid_post"};

const char *sae_llama_point_name(sae_llama_point p)
{
    return (int)p >= 0 && p < SAE_LLAMA_POINTS ? point_names[p] : NULL;
}

static void msg(char *err, size_t cap, const char *fmt, ...)
{
    if (!err || !cap)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, cap, fmt, ap);
    va_end(ap);
}

int sae_llama_hook_parse(const char *name, int *layer, sae_llama_point *p, char *err, size_t cap)
{
    if (!name || strncmp(name, "blocks.", 7) != 0) {
        msg(err, cap, "hook \"%s\": expected blocks.L.hook_NAME", name ? name : "(null)");
        return -1;
    }
    const char *s = name + 7;
    char *end;
    long L = strtol(s, &end, 10);
    if (end == s || *end != '.' || L < 0 || L > 1000000) {
        msg(err, cap, "hook \"%s\": expected blocks.L.hook_NAME with L a layer number", name);
        return -1;
    }
    for (int i = 0; i < SAE_LLAMA_POINTS; i++)
        if (!strcmp(end + 1, point_names[i])) {
            *layer = (int)L;
            *p = (sae_llama_point)i;
            return 0;
        }
    msg(err, cap, "hook \"%s\": no hook point \"%s\" (known: hook_resid_pre, hook_attn_out, "
                  "hook_resid_mid, hook_mlp_in, hook_mlp_out, hook_resid_post)", name, end + 1);
    return -1;
}

/* The graph tensor of (layer, point), its layer in the graph and its stage in the block. */
static void tensor_of(int layer, sae_llama_point p, char *buf, size_t cap, int *tl, int *stage)
{
    static const char *stem[] = {NULL, "attn_out", "ffn_inp", "ffn_norm", "ffn_out", "l_out"};
    if (p == SAE_LLAMA_RESID_PRE && layer == 0) {
        snprintf(buf, cap, "inp_embd");
        *tl = -1;
        *stage = 5;
    } else if (p == SAE_LLAMA_RESID_PRE) {
        snprintf(buf, cap, "l_out-%d", layer - 1);
        *tl = layer - 1;
        *stage = 5;
    } else {
        snprintf(buf, cap, "%s-%d", stem[p], layer);
        *tl = layer;
        *stage = (int)p;
    }
}

void sae_llama_tensor_name(int layer, sae_llama_point p, char *buf, size_t cap)
{
    int tl, st;
    tensor_of(layer, p, buf, cap, &tl, &st);
}

typedef struct {
    char name[48];
    char ffn_inp[48];  /* for ffn_out-L: the residual sum of the same name is not ours */
    int key;           /* order in the forward pass */
    bool cut;          /* the last block after attention: rows cut to the outputs */
    bool is_mlp_out;
} watch_t;

typedef struct {
    sae_llama_entry e;
    int layer;
    sae_llama_point point;
    int src, dst;      /* watch indices: what it reads, where it writes (== src for an SAE) */
    bool transcoder;
    float *xbuf;       /* transcoders: the input hook's rows of the current ubatch */
    size_t xcap;
    size_t x_row0;     /* which ubatch xbuf holds */
    bool x_valid;
    size_t seen;       /* rows seen in this decode */
} entry_t;

struct sae_llama_hooks {
    entry_t *ent;
    size_t n_ent;
    watch_t *w;
    size_t n_w;
    int w_embd;        /* the watch of blocks.0.hook_resid_pre, or -1 */
    size_t d;
    /* per decode */
    struct llama_batch batch;
    llama_pos *pos;          /* [n_tokens] */
    llama_seq_id *seq;
    llama_token *tok;
    size_t pos_cap;
    bool in_decode, ub_started;
    int last_key;
    size_t row0, ub_n;
    /* scratch */
    float *rows, *keep;
    size_t rows_cap, keep_cap;
    int error;
    char err[512];
    double t_cb, t_sae;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int add_watch(sae_llama_hooks *h, int layer, sae_llama_point p, int n_layer)
{
    char name[48];
    int tl, stage;
    tensor_of(layer, p, name, sizeof name, &tl, &stage);
    for (size_t i = 0; i < h->n_w; i++)
        if (!strcmp(h->w[i].name, name))
            return (int)i;
    watch_t *w = realloc(h->w, (h->n_w + 1) * sizeof *w);
    if (!w)
        return -1;
    h->w = w;
    watch_t *x = &w[h->n_w];
    memset(x, 0, sizeof *x);
    snprintf(x->name, sizeof x->name, "%s", name);
    x->key = (tl + 1) * 8 + stage;
    x->cut = tl == n_layer - 1 && stage >= 2;
    x->is_mlp_out = stage == 4;
    if (x->is_mlp_out)
        snprintf(x->ffn_inp, sizeof x->ffn_inp, "ffn_inp-%d", tl);
    if (tl == -1)
        h->w_embd = (int)h->n_w;
    return (int)h->n_w++;
}

int sae_llama_hooks_new(sae_llama_hooks **out, const struct llama_model *model,
                        const sae_llama_entry *entries, size_t n, char *err, size_t err_cap)
{
    *out = NULL;
    if (!model || (!entries && n)) {
        msg(err, err_cap, "sae_llama_hooks_new: NULL model or entries");
        return -1;
    }
    sae_llama_hooks *h = calloc(1, sizeof *h);
    if (!h || (n && !(h->ent = calloc(n, sizeof *h->ent)))) {
        free(h);
        msg(err, err_cap, "out of memory");
        return -1;
    }
    const int n_layer = llama_model_n_layer(model);
    h->w_embd = -1;
    h->d = (size_t)llama_model_n_embd(model);
    h->n_ent = n;
    for (size_t i = 0; i < n; i++) {
        entry_t *e = &h->ent[i];
        e->e = entries[i];
        const sae_model *m = e->e.dict;
        if (sae_llama_hook_parse(e->e.hook, &e->layer, &e->point, err, err_cap) != 0)
            goto fail;
        if (e->layer >= n_layer) {
            msg(err, err_cap, "hook \"%s\": layer %d is out of range: the model has %d blocks "
                              "(0..%d)", e->e.hook, e->layer, n_layer, n_layer - 1);
            goto fail;
        }
        if (m && sae_model_d_in(m) != h->d) {
            msg(err, err_cap, "hook \"%s\": the dictionary's d_in is %zu, the model's n_embd %zu",
                e->e.hook, sae_model_d_in(m), h->d);
            goto fail;
        }
        if (m && sae_model_d_out(m) != h->d) {
            msg(err, err_cap, "hook \"%s\": the dictionary's d_out is %zu, the model's n_embd %zu",
                e->e.hook, sae_model_d_out(m), h->d);
            goto fail;
        }
        if ((e->e.edit == SAE_LLAMA_SPLICE || e->e.plan || e->e.seq_plans) && !m) {
            msg(err, err_cap, "hook \"%s\": splicing or steering needs a dictionary", e->e.hook);
            goto fail;
        }
        if (e->e.edit != SAE_LLAMA_READ && e->e.edit != SAE_LLAMA_SPLICE &&
            e->e.edit != SAE_LLAMA_ZERO) {
            msg(err, err_cap, "hook \"%s\": unknown edit %d", e->e.hook, (int)e->e.edit);
            goto fail;
        }
        e->transcoder = m && sae_model_is_transcoder(m);
        if ((e->src = add_watch(h, e->layer, e->point, n_layer)) < 0)
            goto oom;
        e->dst = e->src;
        if (e->transcoder) {
            int ol = e->layer;
            sae_llama_point op = SAE_LLAMA_MLP_OUT;
            if (e->e.out_hook &&
                sae_llama_hook_parse(e->e.out_hook, &ol, &op, err, err_cap) != 0)
                goto fail;
            if (!e->e.out_hook && e->point != SAE_LLAMA_MLP_IN) {
                msg(err, err_cap, "hook \"%s\": a transcoder reads hook_mlp_in (or give its "
                                  "output hook)", e->e.hook);
                goto fail;
            }
            if (ol >= n_layer) {
                msg(err, err_cap, "output hook \"%s\": layer %d is out of range (0..%d)",
                    e->e.out_hook, ol, n_layer - 1);
                goto fail;
            }
            if ((e->dst = add_watch(h, ol, op, n_layer)) < 0)
                goto oom;
            if (h->w[e->dst].key <= h->w[e->src].key) {
                msg(err, err_cap, "transcoder at \"%s\": its output hook must come later in the "
                                  "forward pass than its input hook", e->e.hook);
                goto fail;
            }
        } else if (e->e.out_hook) {
            msg(err, err_cap, "hook \"%s\": out_hook is for transcoders only", e->e.hook);
            goto fail;
        }
    }
    *out = h;
    return 0;
oom:
    msg(err, err_cap, "out of memory");
fail:
    sae_llama_hooks_free(h);
    return -1;
}

void sae_llama_hooks_free(sae_llama_hooks *h)
{
    if (!h)
        return;
    for (size_t i = 0; i < h->n_ent; i++)
        free(h->ent[i].xbuf);
    free(h->ent);
    free(h->w);
    free(h->pos);
    free(h->seq);
    free(h->tok);
    free(h->rows);
    free(h->keep);
    free(h);
}

const char *sae_llama_hooks_error(const sae_llama_hooks *h)
{
    return h ? h->err : "";
}

void sae_llama_hooks_times(const sae_llama_hooks *h, double *in_callback, double *in_libsae)
{
    if (in_callback) *in_callback = h ? h->t_cb : 0;
    if (in_libsae) *in_libsae = h ? h->t_sae : 0;
}

static bool fail_cb(sae_llama_hooks *h, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(h->err, sizeof h->err, fmt, ap);
    va_end(ap);
    h->error = 1;
    return false;
}

static int grow(float **p, size_t *cap, size_t need)
{
    if (need <= *cap)
        return 0;
    float *q = realloc(*p, need * sizeof *q);
    if (!q)
        return -1;
    *p = q;
    *cap = need;
    return 0;
}

/* rows of the entry's keep tokens go back to what they were (orig) */
static void restore_kept(const sae_llama_hooks *h, const entry_t *e, float *rows, const float *orig,
                         size_t n)
{
    if (!e->e.n_keep || e->e.edit == SAE_LLAMA_ZERO)
        return;
    for (size_t r = 0; r < n; r++)
        for (size_t k = 0; k < e->e.n_keep; k++)
            if (h->tok[h->row0 + r] == e->e.keep[k]) {
                memcpy(rows + r * h->d, orig + r * h->d, h->d * sizeof(float));
                break;
            }
}

/* The entry's plan(s) on n rows: y = x steered (y may be x). With per-sequence plans, each run
 * of rows of one sequence gets that sequence's plan, so a sequence is steered as it would be
 * alone in the batch (the same libsae call on the same rows). */
static int apply_plans(const sae_llama_hooks *h, const entry_t *e, const float *x, float *y,
                       size_t n)
{
    const size_t d = h->d;
    if (!e->e.seq_plans)
        return e->transcoder ? sae_steer_apply_to(e->e.plan, x, y, n)
                             : sae_steer_apply(e->e.plan, y, n);
    const llama_seq_id *seq = h->seq + h->row0;
    for (size_t a = 0, b; a < n; a = b) {
        for (b = a + 1; b < n && seq[b] == seq[a]; b++)
            ;
        const sae_steer *p = seq[a] >= 0 && (size_t)seq[a] < e->e.n_seq_plans
                                 ? e->e.seq_plans[seq[a]] : NULL;
        if (!p)
            p = e->e.plan;
        if (!p)
            continue;
        const int rc = e->transcoder ? sae_steer_apply_to(p, x + a * d, y + a * d, b - a)
                                     : sae_steer_apply(p, y + a * d, b - a);
        if (rc != SAE_OK)
            return rc;
    }
    return SAE_OK;
}

/* Whether any of the ubatch's n rows is steered: without a plan the rows are left alone (no
 * copy, no write back), as for an entry without plans. */
static bool steers(const sae_llama_hooks *h, const entry_t *e, size_t n)
{
    if (e->e.plan)
        return true;
    if (!e->e.seq_plans)
        return false;
    const llama_seq_id *seq = h->seq + h->row0;
    for (size_t r = 0; r < n; r++)
        if (seq[r] >= 0 && (size_t)seq[r] < e->e.n_seq_plans && e->e.seq_plans[seq[r]])
            return true;
    return false;
}

static bool sae_llama_cb(struct ggml_tensor *t, bool ask, void *user)
{
    sae_llama_hooks *h = user;
    int wi = -1;
    for (size_t i = 0; i < h->n_w; i++)
        if (!strcmp(t->name, h->w[i].name)) {
            wi = (int)i;
            break;
        }
    /* "inp_embd" names llama.cpp's input for embeddings given by the caller; the token
     * embeddings block 0 reads are an unnamed get_rows of token_embd.weight by inp_tokens */
    if (wi < 0 && h->w_embd >= 0 && t->op == GGML_OP_GET_ROWS && t->src[0] && t->src[1] &&
        !strcmp(t->src[0]->name, "token_embd.weight") && !strcmp(t->src[1]->name, "inp_tokens"))
        wi = h->w_embd;
    if (wi >= 0 && h->w[wi].is_mlp_out) {
        /* "ffn_out-L" also names the MLP output + residual sum when a control vector sits at L
         * (then l_out-L is the vector's add): that one adds ffn_inp-L and is not the MLP's */
        for (int s = 0; s < GGML_MAX_SRC; s++)
            if (t->src[s] && !strcmp(t->src[s]->name, h->w[wi].ffn_inp))
                wi = -1;
    }
    if (wi < 0)
        return !ask;
    if (ask)
        return true;
    if (h->error || !h->in_decode)
        return h->in_decode ? false : true;

    const double t0 = now_s();
    const watch_t *w = &h->w[wi];
    const size_t d = h->d, n = (size_t)t->ne[1];
    if (t->type != GGML_TYPE_F32 || (size_t)t->ne[0] != d || t->ne[2] != 1 || t->ne[3] != 1 ||
        !ggml_is_contiguous(t))
        return fail_cb(h, "%s is not F32 [n][%zu] contiguous rows", t->name, d);
    /* a new ubatch starts when the forward pass goes back to an earlier hook */
    if (!h->ub_started) {
        h->ub_started = true;
        h->row0 = 0;
        h->ub_n = n;
    } else if (w->key <= h->last_key) {
        h->row0 += h->ub_n;
        h->ub_n = n;
    }
    h->last_key = w->key;
    if (n != h->ub_n || h->row0 + n > (size_t)h->batch.n_tokens)
        return fail_cb(h, "%s has %zu rows where the ubatch has %zu%s", t->name, n, h->ub_n,
                       w->cut ? ": the last block's rows are cut to the outputs; set "
                                "batch.logits on every token" : "");
    if (grow(&h->rows, &h->rows_cap, n * d) || grow(&h->keep, &h->keep_cap, n * d))
        return fail_cb(h, "out of memory");
    ggml_backend_tensor_get(t, h->rows, 0, n * d * sizeof(float));
    float *rows = h->rows;
    bool modified = false;
    sae_llama_rows r = {.n = n, .d = d, .pos = h->pos + h->row0, .seq = h->seq + h->row0,
                        .row0 = h->row0};
    int rc = SAE_OK;

    for (size_t i = 0; i < h->n_ent && rc == SAE_OK; i++) {
        entry_t *e = &h->ent[i];
        if (e->src != wi)
            continue;
        if (e->transcoder) {
            if (grow(&e->xbuf, &e->xcap, n * d))
                return fail_cb(h, "out of memory");
            memcpy(e->xbuf, rows, n * d * sizeof(float));
            e->x_row0 = h->row0;
            e->x_valid = true;
            continue;
        }
        const bool steer = steers(h, e, n);
        const bool edit = steer || e->e.edit != SAE_LLAMA_READ;
        if (edit)
            memcpy(h->keep, rows, n * d * sizeof(float));
        const double s0 = now_s();
        if (steer)
            rc = apply_plans(h, e, rows, rows, n);
        if (rc == SAE_OK && e->e.edit == SAE_LLAMA_SPLICE)
            rc = sae_reconstruct(e->e.dict, rows, n, rows);
        if (e->e.edit == SAE_LLAMA_ZERO)
            memset(rows, 0, n * d * sizeof(float));
        h->t_sae += now_s() - s0;
        if (rc != SAE_OK)
            return fail_cb(h, "libsae at %s: %s", e->e.hook, sae_last_error());
        if (edit)
            restore_kept(h, e, rows, h->keep, n);
        modified |= edit;
        e->seen += n;
        if (e->e.reader) {
            r.entry = i;
            r.layer = e->layer;
            r.point = e->point;
            r.x = edit ? h->keep : rows;
            r.y = NULL;
            r.out = edit ? rows : NULL;
            if (e->e.reader(e->e.user, &r) != 0)
                return fail_cb(h, "the reader of %s cancelled the decode", e->e.hook);
        }
    }
    for (size_t i = 0; i < h->n_ent; i++) {
        entry_t *e = &h->ent[i];
        if (!e->transcoder || e->dst != wi)
            continue;
        if (!e->x_valid || e->x_row0 != h->row0)
            return fail_cb(h, "transcoder at %s: its input rows were not seen in this ubatch",
                           e->e.hook);
        const bool steer = steers(h, e, n);
        const bool edit = steer || e->e.edit != SAE_LLAMA_READ;
        memcpy(h->keep, rows, n * d * sizeof(float));
        const double s0 = now_s();
        if (steer)
            rc = apply_plans(h, e, e->xbuf, rows, n);
        if (rc == SAE_OK && e->e.edit == SAE_LLAMA_SPLICE)
            rc = sae_reconstruct(e->e.dict, e->xbuf, n, rows);
        if (e->e.edit == SAE_LLAMA_ZERO)
            memset(rows, 0, n * d * sizeof(float));
        h->t_sae += now_s() - s0;
        if (rc != SAE_OK)
            return fail_cb(h, "libsae at %s: %s", e->e.hook, sae_last_error());
        if (edit)
            restore_kept(h, e, rows, h->keep, n);
        modified |= edit;
        e->seen += n;
        e->x_valid = false;
        if (e->e.reader) {
            r.entry = i;
            r.layer = e->layer;
            r.point = e->point;
            r.x = e->xbuf;
            r.y = h->keep;
            r.out = edit ? rows : NULL;
            if (e->e.reader(e->e.user, &r) != 0)
                return fail_cb(h, "the reader of %s cancelled the decode", e->e.hook);
        }
    }
    if (modified)
        ggml_backend_tensor_set(t, rows, 0, n * d * sizeof(float));
    h->t_cb += now_s() - t0;
    return true;
}

void sae_llama_hooks_params(sae_llama_hooks *h, struct llama_context_params *cp)
{
    cp->cb_eval = sae_llama_cb;
    cp->cb_eval_user_data = h;
    cp->kv_unified = true;
}

int sae_llama_decode(sae_llama_hooks *h, struct llama_context *ctx, struct llama_batch batch)
{
    h->err[0] = 0;
    h->error = 0;
    const size_t nt = batch.n_tokens > 0 ? (size_t)batch.n_tokens : 0;
    if (nt > h->pos_cap) {
        llama_pos *p = realloc(h->pos, nt * sizeof *p);
        if (p) h->pos = p;
        llama_seq_id *s = realloc(h->seq, nt * sizeof *s);
        if (s) h->seq = s;
        llama_token *tk = realloc(h->tok, nt * sizeof *tk);
        if (tk) h->tok = tk;
        if (!p || !s || !tk) {
            snprintf(h->err, sizeof h->err, "out of memory");
            return -1;
        }
        h->pos_cap = nt;
    }
    llama_pos p0 = 0;
    if (!batch.pos)
        p0 = llama_memory_seq_pos_max(llama_get_memory(ctx), 0) + 1;
    for (size_t i = 0; i < nt; i++) {
        h->pos[i] = batch.pos ? batch.pos[i] : p0 + (llama_pos)i;
        h->tok[i] = batch.token ? batch.token[i] : -1;
        h->seq[i] = batch.seq_id && batch.n_seq_id && batch.n_seq_id[i] > 0 ? batch.seq_id[i][0] : 0;
    }
    bool all_out = true;
    for (size_t i = 0; i < nt; i++)
        if (batch.logits ? !batch.logits[i] : i + 1 < nt)
            all_out = false;
    for (size_t i = 0; i < h->n_w; i++)
        if (h->w[i].cut && !all_out) {
            snprintf(h->err, sizeof h->err, "%s is in the last block after attention, where "
                     "llama.cpp keeps only the rows that make logits: set batch.logits on every "
                     "token", h->w[i].name);
            return -1;
        }
    for (size_t i = 0; i < h->n_ent; i++) {
        h->ent[i].seen = 0;
        h->ent[i].x_valid = false;
    }
    h->batch = batch;
    h->in_decode = true;
    h->ub_started = false;
    h->last_key = -1000;
    const int rc = llama_decode(ctx, batch);
    h->in_decode = false;
    if (h->error)
        return -1;
    if (rc != 0) {
        snprintf(h->err, sizeof h->err, "llama_decode returned %d", rc);
        return -1;
    }
    for (size_t i = 0; i < h->n_ent; i++)
        if (h->ent[i].seen != nt) {
            char tn[48];
            const entry_t *e = &h->ent[i];
            snprintf(tn, sizeof tn, "%s", h->w[e->dst].name);
            snprintf(h->err, sizeof h->err, "hook %s (graph tensor %s) saw %zu of %zu rows: this "
                     "model's graph fuses or lacks that tensor", e->e.hook, tn, e->seen, nt);
            return -1;
        }
    return 0;
}

static bool log_all;

static void log_cb(enum ggml_log_level level, const char *text, void *user)
{
    (void)user;
    if (log_all || level >= GGML_LOG_LEVEL_ERROR)
        fputs(text, stderr);
}

static bool no_progress(float p, void *user)
{
    (void)p; (void)user;
    return true;
}

struct llama_model *sae_llama_load_model(const char *path, bool verbose)
{
    log_all = verbose;
    llama_log_set(log_cb, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    if (!verbose)
        mp.progress_callback = no_progress;
    return llama_model_load_from_file(path, mp);
}
