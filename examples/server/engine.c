/* engine.c: see engine.h. */
#define _POSIX_C_SOURCE 200809L
#include "engine.h"

#include "sae_llama_hook.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    struct engine *e;
    size_t di;
} reader_ctx;

struct engine {
    struct llama_model *model;
    const struct llama_vocab *vocab;
    struct llama_context *ctx;
    sae_llama_hooks *hooks;
    sae_llama_entry *ent;
    const sae_steer **seq_plans;   /* [n_dicts][slots] */
    reader_ctx *rctx;
    llama_token bos;
    size_t n_dicts, d;
    engine_params p;
    int n_batch;
    bool all_logits;               /* a hook in the last block after attention */
    struct llama_batch batch;
    int *batch_idx;                /* [slots] the batch row whose logits the slot samples */

    pthread_t thr;
    bool started;
    pthread_mutex_t mu;
    pthread_cond_t work, progress;
    job *qhead, *qtail;
    int qlen;
    bool stopping;
    job **slot;                    /* [slots] */
    bool *prefilled;
    int *n_past;
    llama_token *last;

    uint64_t steps, tokens;
    double decode_s, hook_s, libsae_s;
};

double engine_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void engine_lock(engine *e) { pthread_mutex_lock(&e->mu); }
void engine_unlock(engine *e) { pthread_mutex_unlock(&e->mu); }

void job_clear(job *j, size_t n_dicts)
{
    free(j->prompt);
    for (int i = 0; i < j->n_stop; i++)
        free(j->stop[i]);
    free(j->stop);
    if (j->plans)
        for (size_t i = 0; i < n_dicts; i++)
            sae_steer_free(j->plans[i]);
    free(j->plans);
    free(j->text);
    if (j->acts)
        for (size_t i = 0; i < n_dicts; i++)
            free(j->acts[i]);
    free(j->acts);
    j->prompt = NULL;
    j->stop = NULL;
    j->plans = NULL;
    j->text = NULL;
    j->acts = NULL;
}

/* sae_llama_reader: a features job's rows, as llama.cpp computed them (before any plan). Runs on
 * the worker thread inside llama_decode, so the slots are the worker's to read. */
static int read_rows(void *user, const sae_llama_rows *r)
{
    const reader_ctx *rc = user;
    engine *e = rc->e;
    for (size_t i = 0; i < r->n; i++) {
        const llama_seq_id s = r->seq[i];
        if (s < 0 || s >= e->p.slots)
            continue;
        job *j = e->slot[s];
        if (!j || j->kind != JOB_FEATURES || e->prefilled[s] || r->pos[i] < 0 ||
            r->pos[i] >= j->n_prompt)
            continue;
        memcpy(j->acts[rc->di] + (size_t)r->pos[i] * e->d, r->x + i * e->d, e->d * sizeof(float));
    }
    return 0;
}

/* Ends the job in slot s (worker, under the lock). */
static void finish(engine *e, int s, job_status st, const char *reason)
{
    job *j = e->slot[s];
    j->status = st;
    if (reason)
        j->finish = reason;
    j->stable = j->len;
    j->done = true;
    j->t_done = engine_now();
    if (j->smpl)
        llama_sampler_free(j->smpl);
    j->smpl = NULL;
    e->slot[s] = NULL;
    for (size_t di = 0; di < e->n_dicts; di++)
        e->seq_plans[di * (size_t)e->p.slots + (size_t)s] = NULL;
    llama_memory_seq_rm(llama_get_memory(e->ctx), s, -1, -1);
    pthread_cond_broadcast(&e->progress);
}

/* How many trailing bytes of text[0..len) must wait: the longest suffix that begins a stop
 * string, and an incomplete UTF-8 sequence (a client must never get half a character). */
static size_t held_back(const job *j)
{
    size_t hold = 0;
    for (int k = 0; k < j->n_stop; k++) {
        const size_t sl = strlen(j->stop[k]);
        for (size_t m = sl - 1 < j->len ? sl - 1 : j->len; m > hold; m--)
            if (!memcmp(j->text + j->len - m, j->stop[k], m)) {
                hold = m;
                break;
            }
    }
    size_t st = j->len - hold, i = st, cont = 0;
    while (cont < 3 && i > 0 && ((unsigned char)j->text[i - 1] & 0xC0) == 0x80) {
        i--;
        cont++;
    }
    if (i > 0) {
        const unsigned char c = (unsigned char)j->text[i - 1];
        const size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
        if ((c & 0x80) && cont + 1 < need)
            st = i - 1;
    }
    return j->len - st;
}

/* Appends a sampled token's text; returns true if a stop string ended the job's text. */
static bool append_piece(engine *e, job *j, llama_token t)
{
    char buf[256];
    const int k = llama_token_to_piece(e->vocab, t, buf, (int32_t)sizeof buf, 0, false);
    if (k <= 0)
        return false;
    if (j->len + (size_t)k + 1 > j->cap) {
        size_t cap = j->cap ? j->cap * 2 : 256;
        while (cap < j->len + (size_t)k + 1)
            cap *= 2;
        char *p = realloc(j->text, cap);
        if (!p)
            return false;
        j->text = p;
        j->cap = cap;
    }
    const size_t old = j->len;
    memcpy(j->text + j->len, buf, (size_t)k);
    j->len += (size_t)k;
    j->text[j->len] = 0;
    size_t maxs = 0;
    for (int s = 0; s < j->n_stop; s++)
        if (strlen(j->stop[s]) > maxs)
            maxs = strlen(j->stop[s]);
    const size_t from = old + 1 > maxs ? old + 1 - maxs : 0;
    size_t cut = (size_t)-1;
    for (int s = 0; s < j->n_stop; s++) {
        const char *p = strstr(j->text + from, j->stop[s]);
        if (p && (size_t)(p - j->text) < cut)
            cut = (size_t)(p - j->text);
    }
    if (cut != (size_t)-1) {
        j->len = cut;
        j->text[cut] = 0;
        return true;
    }
    j->stable = j->len - held_back(j);
    return false;
}

static struct llama_sampler *make_sampler(const job *j)
{
    struct llama_sampler *c = llama_sampler_chain_init(llama_sampler_chain_default_params());
    if (!c)
        return NULL;
    if (j->temperature <= 0) {
        llama_sampler_chain_add(c, llama_sampler_init_greedy());
    } else {
        if (j->top_p < 1)
            llama_sampler_chain_add(c, llama_sampler_init_top_p(j->top_p, 1));
        llama_sampler_chain_add(c, llama_sampler_init_temp(j->temperature));
        llama_sampler_chain_add(c, llama_sampler_init_dist(j->seed));
    }
    return c;
}

static void batch_add(struct llama_batch *b, llama_token t, llama_pos pos, llama_seq_id s,
                      bool logits)
{
    const int i = b->n_tokens++;
    b->token[i] = t;
    b->pos[i] = pos;
    b->n_seq_id[i] = 1;
    b->seq_id[i][0] = s;
    b->logits[i] = logits;
}

static void *worker(void *arg)
{
    engine *e = arg;
    const int S = e->p.slots;
    pthread_mutex_lock(&e->mu);
    for (;;) {
        for (int s = 0; s < S && e->qhead; s++) {
            if (e->slot[s])
                continue;
            job *j = e->qhead;
            e->qhead = j->next;
            if (!e->qhead)
                e->qtail = NULL;
            e->qlen--;
            j->slot = s;
            j->t_admit = engine_now();
            e->slot[s] = j;
            e->prefilled[s] = false;
            e->n_past[s] = 0;
            for (size_t di = 0; di < e->n_dicts; di++)
                e->seq_plans[di * (size_t)S + (size_t)s] = j->plans ? j->plans[di] : NULL;
            if (j->kind == JOB_GENERATE && !(j->smpl = make_sampler(j))) {
                snprintf(j->err, sizeof j->err, "cannot create a sampler");
                finish(e, s, JOB_FAILED, NULL);
            }
        }
        const double now = engine_now();
        int active = 0;
        for (int s = 0; s < S; s++) {
            job *j = e->slot[s];
            if (!j)
                continue;
            if (j->cancel)
                finish(e, s, JOB_CANCELLED, NULL);
            else if (j->deadline > 0 && now > j->deadline)
                finish(e, s, JOB_TIMEOUT, NULL);
            else
                active++;
        }
        if (!active) {
            if (e->stopping && !e->qhead)
                break;
            if (!e->qhead)
                pthread_cond_wait(&e->work, &e->mu);
            continue;
        }
        pthread_mutex_unlock(&e->mu);

        /* the slots are only changed by this thread: reading them unlocked is safe */
        struct llama_batch *b = &e->batch;
        b->n_tokens = 0;
        for (int s = 0; s < S; s++) {
            job *j = e->slot[s];
            e->batch_idx[s] = -1;
            if (!j)
                continue;
            if (!e->prefilled[s]) {
                if (b->n_tokens + j->n_prompt > e->n_batch)
                    continue;  /* next step */
                for (int i = 0; i < j->n_prompt; i++)
                    batch_add(b, j->prompt[i], i, s, e->all_logits || i == j->n_prompt - 1);
                e->n_past[s] = j->n_prompt;
            } else {
                if (b->n_tokens + 1 > e->n_batch)
                    continue;
                batch_add(b, e->last[s], e->n_past[s]++, s, true);
            }
            e->batch_idx[s] = b->n_tokens - 1;
        }
        const double t0 = engine_now();
        int rc;
        const char *why = "llama_decode failed";
        if (e->hooks) {
            rc = sae_llama_decode(e->hooks, e->ctx, *b);
            if (rc)
                why = sae_llama_hooks_error(e->hooks);
        } else {
            rc = llama_decode(e->ctx, *b);
        }
        const double dt = engine_now() - t0;

        pthread_mutex_lock(&e->mu);
        e->steps++;
        e->tokens += (uint64_t)b->n_tokens;
        e->decode_s += dt;
        if (e->hooks)   /* the hooks' counters belong to this thread: copied for readers */
            sae_llama_hooks_times(e->hooks, &e->hook_s, &e->libsae_s);
        for (int s = 0; s < S; s++) {
            job *j = e->slot[s];
            if (!j || e->batch_idx[s] < 0)
                continue;
            if (rc) {
                snprintf(j->err, sizeof j->err, "%s", why);
                finish(e, s, JOB_FAILED, NULL);
                continue;
            }
            const bool first = !e->prefilled[s];
            e->prefilled[s] = true;
            if (j->kind == JOB_FEATURES) {
                finish(e, s, JOB_OK, "stop");
                continue;
            }
            const llama_token t = llama_sampler_sample(j->smpl, e->ctx, e->batch_idx[s]);
            if (first)
                j->t_first = engine_now();
            j->n_gen++;
            if (llama_vocab_is_eog(e->vocab, t)) {
                finish(e, s, JOB_OK, "stop");
            } else if (append_piece(e, j, t)) {
                finish(e, s, JOB_OK, "stop");
            } else if (j->n_gen >= j->max_tokens || e->n_past[s] + 1 > e->p.n_ctx_seq) {
                finish(e, s, JOB_OK, "length");
            } else {
                e->last[s] = t;
            }
        }
        pthread_cond_broadcast(&e->progress);
    }
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

int engine_new(engine **out, struct llama_model *model, const engine_dict *dicts, size_t n_dicts,
               const engine_params *p, char *err, size_t errlen)
{
    *out = NULL;
    if (p->slots < 1 || p->n_ctx_seq < 2 || p->threads < 1 || p->queue_max < 0) {
        snprintf(err, errlen, "engine: slots, context and threads must be positive");
        return -1;
    }
    engine *e = calloc(1, sizeof *e);
    if (!e) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    e->model = model;
    e->vocab = llama_model_get_vocab(model);
    e->bos = llama_vocab_bos(e->vocab);
    e->p = *p;
    e->n_dicts = n_dicts;
    e->d = (size_t)llama_model_n_embd(model);
    const size_t S = (size_t)p->slots;
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->work, NULL);
    pthread_cond_init(&e->progress, NULL);
    e->slot = calloc(S, sizeof *e->slot);
    e->prefilled = calloc(S, sizeof *e->prefilled);
    e->n_past = calloc(S, sizeof *e->n_past);
    e->last = calloc(S, sizeof *e->last);
    e->batch_idx = calloc(S, sizeof *e->batch_idx);
    e->seq_plans = calloc(n_dicts * S + 1, sizeof *e->seq_plans);
    e->ent = calloc(n_dicts + 1, sizeof *e->ent);
    e->rctx = calloc(n_dicts + 1, sizeof *e->rctx);
    if (!e->slot || !e->prefilled || !e->n_past || !e->last || !e->batch_idx || !e->seq_plans ||
        !e->ent || !e->rctx) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    const int n_layer = llama_model_n_layer(model);
    for (size_t i = 0; i < n_dicts; i++) {
        int layer;
        sae_llama_point pt;
        if (sae_llama_hook_parse(dicts[i].hook, &layer, &pt, err, errlen) != 0)
            goto fail;
        /* llama.cpp cuts the last block's rows to the outputs after its attention */
        if (layer == n_layer - 1 && pt >= SAE_LLAMA_RESID_MID)
            e->all_logits = true;
        e->rctx[i] = (reader_ctx){.e = e, .di = i};
        e->ent[i] = (sae_llama_entry){
            .hook = dicts[i].hook, .dict = dicts[i].dict, .reader = read_rows,
            .user = &e->rctx[i], .keep = p->steer_bos ? NULL : &e->bos,
            .n_keep = !p->steer_bos && e->bos >= 0 ? 1 : 0,
            .seq_plans = e->seq_plans + i * S, .n_seq_plans = S};
    }
    if (n_dicts && sae_llama_hooks_new(&e->hooks, model, e->ent, n_dicts, err, errlen) != 0)
        goto fail;

    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)(S * (size_t)p->n_ctx_seq);
    /* one ubatch per step: a sequence's rows are never split across ubatches, so each reaches
     * the plan and the model in the same calls as when it runs alone */
    cp.n_batch = cp.n_ctx;
    cp.n_ubatch = cp.n_ctx;
    cp.n_seq_max = (uint32_t)S;
    cp.n_threads = p->threads;
    cp.n_threads_batch = p->threads;
    /* F32 KV and no flash attention, as sae-llama-cpp: attention not rounded through F16 */
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    if (e->hooks)
        sae_llama_hooks_params(e->hooks, &cp);
    /* one KV stream for all slots: a batch of several sequences is split "simple", in batch
     * order, with or without hooks */
    cp.kv_unified = true;
    e->ctx = llama_init_from_model(model, cp);
    if (!e->ctx) {
        snprintf(err, errlen, "cannot create a llama.cpp context of %u tokens", cp.n_ctx);
        goto fail;
    }
    e->n_batch = (int)cp.n_batch;
    e->batch = llama_batch_init(e->n_batch, 0, 1);
    if (pthread_create(&e->thr, NULL, worker, e) != 0) {
        snprintf(err, errlen, "cannot start the engine thread");
        goto fail;
    }
    e->started = true;
    *out = e;
    return 0;
fail:
    engine_free(e);
    return -1;
}

void engine_free(engine *e)
{
    if (!e)
        return;
    if (e->started) {
        pthread_mutex_lock(&e->mu);
        e->stopping = true;
        pthread_cond_broadcast(&e->work);
        pthread_mutex_unlock(&e->mu);
        pthread_join(e->thr, NULL);
    }
    if (e->batch.token)
        llama_batch_free(e->batch);
    if (e->ctx)
        llama_free(e->ctx);
    sae_llama_hooks_free(e->hooks);
    free(e->slot);
    free(e->prefilled);
    free(e->n_past);
    free(e->last);
    free(e->batch_idx);
    free(e->seq_plans);
    free(e->ent);
    free(e->rctx);
    pthread_cond_destroy(&e->work);
    pthread_cond_destroy(&e->progress);
    pthread_mutex_destroy(&e->mu);
    free(e);
}

int engine_submit(engine *e, job *j, char *err, size_t errlen)
{
    if (j->n_prompt < 1 || j->n_prompt >= e->p.n_ctx_seq) {
        snprintf(err, errlen, "the prompt has %d tokens; a sequence holds %d", j->n_prompt,
                 e->p.n_ctx_seq);
        return -3;
    }
    if (j->kind == JOB_FEATURES) {
        j->acts = calloc(e->n_dicts + 1, sizeof *j->acts);
        if (!j->acts) {
            snprintf(err, errlen, "out of memory");
            return -3;
        }
        for (size_t i = 0; i < e->n_dicts; i++)
            if (!(j->acts[i] = calloc((size_t)j->n_prompt * e->d, sizeof(float)))) {
                snprintf(err, errlen, "out of memory");
                return -3;
            }
    }
    j->done = false;
    j->cancel = false;
    j->next = NULL;
    j->slot = -1;
    pthread_mutex_lock(&e->mu);
    if (e->stopping || e->qlen >= e->p.queue_max) {
        const int rc = e->stopping ? -2 : -1;
        snprintf(err, errlen, "%s", e->stopping ? "the server is shutting down"
                                                : "too many requests are waiting");
        pthread_mutex_unlock(&e->mu);
        return rc;
    }
    if (e->qtail)
        e->qtail->next = j;
    else
        e->qhead = j;
    e->qtail = j;
    e->qlen++;
    pthread_cond_broadcast(&e->work);
    pthread_mutex_unlock(&e->mu);
    return 0;
}

static void deadline_in(struct timespec *ts, double seconds)
{
    clock_gettime(CLOCK_REALTIME, ts);
    const double t = (double)ts->tv_nsec * 1e-9 + seconds;
    ts->tv_sec += (time_t)t;
    ts->tv_nsec = (long)((t - (double)(time_t)t) * 1e9);
}

void engine_wait(engine *e, job *j, size_t seen, double timeout)
{
    struct timespec ts;
    deadline_in(&ts, timeout);
    pthread_mutex_lock(&e->mu);
    while (!j->done && j->stable <= seen)
        if (pthread_cond_timedwait(&e->progress, &e->mu, &ts) == ETIMEDOUT)
            break;
    pthread_mutex_unlock(&e->mu);
}

void engine_cancel(engine *e, job *j)
{
    pthread_mutex_lock(&e->mu);
    if (!j->done) {
        /* still queued: unlink it here; in a slot: the worker ends it before its next step */
        job **pp = &e->qhead, *prev = NULL;
        while (*pp && *pp != j) {
            prev = *pp;
            pp = &(*pp)->next;
        }
        if (*pp) {
            *pp = j->next;
            if (e->qtail == j)
                e->qtail = prev;
            e->qlen--;
            j->status = JOB_CANCELLED;
            j->done = true;
        } else {
            j->cancel = true;
            pthread_cond_broadcast(&e->work);
            while (!j->done)
                pthread_cond_wait(&e->progress, &e->mu);
        }
    }
    pthread_mutex_unlock(&e->mu);
}

void engine_stats(engine *e, uint64_t *steps, uint64_t *tokens, double *decode_s,
                  double *hook_s, double *libsae_s)
{
    pthread_mutex_lock(&e->mu);
    *steps = e->steps;
    *tokens = e->tokens;
    *decode_s = e->decode_s;
    *hook_s = e->hook_s;
    *libsae_s = e->libsae_s;
    pthread_mutex_unlock(&e->mu);
}
