/* api.c: see api.h. */
#define _POSIX_C_SOURCE 200809L
#include "api.h"

#include "feature_cards.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int fail(api_err *e, int status, const char *fmt, ...)
{
    e->status = status;
    e->type = status == 404 ? "not_found_error" : status >= 500 ? "server_error"
                                                                : "invalid_request_error";
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return -1;
}

static char *print(cJSON *o)
{
    char *s = o ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    return s;
}

char *api_error_json(const char *message, const char *type)
{
    cJSON *o = cJSON_CreateObject(), *err = cJSON_AddObjectToObject(o, "error");
    cJSON_AddStringToObject(err, "message", message);
    cJSON_AddStringToObject(err, "type", type);
    cJSON_AddNullToObject(err, "param");
    cJSON_AddNullToObject(err, "code");
    return print(o);
}

/* cJSON keeps the last parse error in one process-wide slot that every parse writes: requests
 * are parsed one at a time */
static pthread_mutex_t parse_mu = PTHREAD_MUTEX_INITIALIZER;

/* The body as a JSON object, or NULL (400) */
static cJSON *parse_body(const char *body, size_t len, api_err *e)
{
    pthread_mutex_lock(&parse_mu);
    cJSON *root = cJSON_ParseWithLength(body, len);
    const char *at = root ? NULL : cJSON_GetErrorPtr();
    pthread_mutex_unlock(&parse_mu);
    if (!root) {
        const long off = at && at >= body && at <= body + len ? (long)(at - body) : -1;
        fail(e, 400, "malformed JSON in the request body (near byte %ld)", off);
        return NULL;
    }
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        fail(e, 400, "the request body must be a JSON object");
        return NULL;
    }
    return root;
}

/* An optional integer field in [lo, hi]: 1 present, 0 absent (or null), -1 refused. */
static int get_int(const cJSON *o, const char *name, double lo, double hi, long long *v,
                   api_err *e)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, name);
    if (!x || cJSON_IsNull(x))
        return 0;
    if (!cJSON_IsNumber(x) || floor(x->valuedouble) != x->valuedouble)
        return fail(e, 400, "\"%s\" must be an integer", name);
    if (x->valuedouble < lo || x->valuedouble > hi)
        return fail(e, 400, "\"%s\" is %.17g; it must be in [%.17g, %.17g]", name,
                    x->valuedouble, lo, hi);
    *v = (long long)x->valuedouble;
    return 1;
}

static int get_num(const cJSON *o, const char *name, double lo, double hi, double *v, api_err *e)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, name);
    if (!x || cJSON_IsNull(x))
        return 0;
    if (!cJSON_IsNumber(x) || !isfinite(x->valuedouble))
        return fail(e, 400, "\"%s\" must be a number", name);
    if (x->valuedouble < lo || x->valuedouble > hi)
        return fail(e, 400, "\"%s\" is %g; it must be in [%g, %g]", name, x->valuedouble, lo, hi);
    *v = x->valuedouble;
    return 1;
}

static int find_dict(const server *s, const char *hook)
{
    for (size_t i = 0; i < s->n_dicts; i++)
        if (!strcmp(s->dicts[i].hook, hook))
            return (int)i;
    return -1;
}

static void loaded_hooks(const server *s, char *buf, size_t cap)
{
    size_t n = 0;
    buf[0] = 0;
    for (size_t i = 0; i < s->n_dicts && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%s", i ? ", " : "", s->dicts[i].hook);
    if (!s->n_dicts)
        snprintf(buf, cap, "none");
}

/* steering: [{hook, feature, op: clamp|scale|add, value}] into one plan per dictionary */
static int parse_steering(server *s, const cJSON *root, job *j, api_err *e)
{
    const cJSON *st = cJSON_GetObjectItemCaseSensitive(root, "steering");
    if (!st || cJSON_IsNull(st))
        return 0;
    if (!cJSON_IsArray(st))
        return fail(e, 400, "\"steering\" must be a list of {hook, feature, op, value}");
    if (cJSON_GetArraySize(st) == 0)
        return 0;
    if (!(j->plans = calloc(s->n_dicts + 1, sizeof *j->plans)))
        return fail(e, 500, "out of memory");
    int i = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, st) {
        if (!cJSON_IsObject(it))
            return fail(e, 400, "steering[%d] must be an object {hook, feature, op, value}", i);
        const cJSON *hook = cJSON_GetObjectItemCaseSensitive(it, "hook");
        const cJSON *feat = cJSON_GetObjectItemCaseSensitive(it, "feature");
        const cJSON *op = cJSON_GetObjectItemCaseSensitive(it, "op");
        const cJSON *val = cJSON_GetObjectItemCaseSensitive(it, "value");
        if (!cJSON_IsString(hook))
            return fail(e, 400, "steering[%d].hook must be a string", i);
        const int di = find_dict(s, hook->valuestring);
        if (di < 0) {
            char hooks[256];
            loaded_hooks(s, hooks, sizeof hooks);
            return fail(e, 400, "steering[%d]: unknown hook \"%s\" (loaded: %s)", i,
                        hook->valuestring, hooks);
        }
        const size_t d_sae = sae_model_d_sae(s->dicts[di].m);
        if (!cJSON_IsNumber(feat) || floor(feat->valuedouble) != feat->valuedouble)
            return fail(e, 400, "steering[%d].feature must be an integer", i);
        if (feat->valuedouble < 0 || feat->valuedouble >= (double)d_sae)
            return fail(e, 400, "steering[%d]: feature %.17g is out of range: %s has %zu "
                                "features (0..%zu)", i, feat->valuedouble, hook->valuestring,
                        d_sae, d_sae - 1);
        if (!cJSON_IsString(op) || (strcmp(op->valuestring, "clamp") &&
                                    strcmp(op->valuestring, "scale") &&
                                    strcmp(op->valuestring, "add")))
            return fail(e, 400, "steering[%d].op must be \"clamp\", \"scale\" or \"add\"", i);
        if (!cJSON_IsNumber(val) || !isfinite(val->valuedouble))
            return fail(e, 400, "steering[%d].value must be a finite number", i);
        if (!j->plans[di] && sae_steer_new(&j->plans[di], s->dicts[di].m) != SAE_OK)
            return fail(e, 500, "sae_steer_new: %s", sae_last_error());
        const uint32_t f = (uint32_t)feat->valuedouble;
        const float v = (float)val->valuedouble;
        const int rc = op->valuestring[0] == 'c'   ? sae_steer_clamp(j->plans[di], f, v)
                       : op->valuestring[0] == 's' ? sae_steer_scale(j->plans[di], f, v)
                                                   : sae_steer_add(j->plans[di], f, v);
        if (rc != SAE_OK)
            return fail(e, 400, "steering[%d]: %s", i, sae_last_error());
        i++;
    }
    return 0;
}

static int tokenize(server *s, const char *text, bool special, job *j, api_err *e)
{
    const int len = (int)strlen(text);
    int cap = len + 8;
    if (!(j->prompt = malloc(sizeof(llama_token) * (size_t)cap)))
        return fail(e, 500, "out of memory");
    int n = llama_tokenize(s->vocab, text, len, j->prompt, cap, true, special);
    if (n < 0) {
        cap = -n;
        llama_token *p = realloc(j->prompt, sizeof(llama_token) * (size_t)cap);
        if (!p)
            return fail(e, 500, "out of memory");
        j->prompt = p;
        n = llama_tokenize(s->vocab, text, len, j->prompt, cap, true, special);
    }
    if (n < 0)
        return fail(e, 400, "the prompt cannot be tokenized");
    j->n_prompt = n;
    return 0;
}

/* The last step of reading a request: the prompt's length is checked, and the job's time starts. */
static int admit(const server *s, job *j, api_err *e)
{
    if (j->n_prompt < 1)
        return fail(e, 400, "the prompt is empty");
    if (j->n_prompt > s->max_prompt) {
        fail(e, 400, "the prompt has %d tokens; this server takes at most %d", j->n_prompt,
             s->max_prompt);
        return -1;
    }
    j->deadline = s->timeout > 0 ? engine_now() + s->timeout : 0;
    return 0;
}

/* "content": a string, or OpenAI's list of parts ({"type": "text", "text"}) */
static char *message_text(const cJSON *c, int i, api_err *e)
{
    if (cJSON_IsString(c))
        return strdup(c->valuestring);
    if (!cJSON_IsArray(c)) {
        fail(e, 400, "messages[%d].content must be a string or a list of text parts", i);
        return NULL;
    }
    size_t n = 0;
    const cJSON *p;
    cJSON_ArrayForEach(p, c) {
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(p, "text");
        const cJSON *ty = cJSON_GetObjectItemCaseSensitive(p, "type");
        if (!cJSON_IsString(t) || !cJSON_IsString(ty) || strcmp(ty->valuestring, "text")) {
            fail(e, 400, "messages[%d].content: only text parts are supported", i);
            return NULL;
        }
        n += strlen(t->valuestring);
    }
    char *s = malloc(n + 1), *w = s;
    if (!s) {
        fail(e, 500, "out of memory");
        return NULL;
    }
    cJSON_ArrayForEach(p, c) {
        const char *t = cJSON_GetObjectItemCaseSensitive(p, "text")->valuestring;
        memcpy(w, t, strlen(t));
        w += strlen(t);
    }
    *w = 0;
    return s;
}

/* The chat as one prompt: the model's chat template (or --chat-template) through
 * llama_chat_apply_template; a model without one gets the messages' contents joined by
 * newlines (small story models such as stories260K have no template). */
static int chat_prompt(server *s, const cJSON *msgs, job *j, api_err *e)
{
    if (!cJSON_IsArray(msgs) || cJSON_GetArraySize(msgs) == 0)
        return fail(e, 400, "\"messages\" must be a non-empty list of {role, content}");
    const int n = cJSON_GetArraySize(msgs);
    llama_chat_message *m = calloc((size_t)n, sizeof *m);
    char **txt = calloc((size_t)n, sizeof *txt);
    char *buf = NULL;
    int rc = -1, i = 0;
    size_t total = 0;
    if (!m || !txt) {
        fail(e, 500, "out of memory");
        goto out;
    }
    const cJSON *it;
    cJSON_ArrayForEach(it, msgs) {
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(it, "role");
        if (!cJSON_IsObject(it) || !cJSON_IsString(role)) {
            fail(e, 400, "messages[%d] must be an object with a string \"role\"", i);
            goto out;
        }
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(it, "content");
        if (!(txt[i] = c && !cJSON_IsNull(c) ? message_text(c, i, e) : strdup("")))
            goto out;
        m[i].role = role->valuestring;
        m[i].content = txt[i];
        total += strlen(txt[i]) + strlen(role->valuestring) + 16;
        i++;
    }
    const char *tmpl = s->chat_template ? s->chat_template
                                        : llama_model_chat_template(s->model, NULL);
    if (tmpl) {
        int cap = (int)(total * 2 + 1024);
        if (!(buf = malloc((size_t)cap))) {
            fail(e, 500, "out of memory");
            goto out;
        }
        int k = llama_chat_apply_template(tmpl, m, (size_t)n, true, buf, cap);
        if (k >= cap) {
            char *b = realloc(buf, (size_t)k + 1);
            if (!b) {
                fail(e, 500, "out of memory");
                goto out;
            }
            buf = b;
            cap = k + 1;
            k = llama_chat_apply_template(tmpl, m, (size_t)n, true, buf, cap);
        }
        if (k < 0) {
            fail(e, 500, "the chat template cannot be applied");
            goto out;
        }
        buf[k] = 0;
        rc = tokenize(s, buf, true, j, e);
    } else {
        if (!(buf = malloc(total + 1))) {
            fail(e, 500, "out of memory");
            goto out;
        }
        size_t w = 0;
        for (int k = 0; k < n; k++)
            w += (size_t)sprintf(buf + w, "%s%s", k ? "\n" : "", txt[k]);
        rc = tokenize(s, buf, false, j, e);
    }
out:
    if (txt)
        for (int k = 0; k < n; k++)
            free(txt[k]);
    free(txt);
    free(m);
    free(buf);
    return rc;
}

/* "prompt": a string, a list of one string, or a list of token ids */
static int completion_prompt(server *s, const cJSON *p, job *j, api_err *e)
{
    if (cJSON_IsArray(p) && cJSON_GetArraySize(p) == 1 &&
        cJSON_IsString(cJSON_GetArrayItem(p, 0)))
        p = cJSON_GetArrayItem(p, 0);
    if (cJSON_IsString(p))
        return tokenize(s, p->valuestring, false, j, e);
    if (!cJSON_IsArray(p) || cJSON_GetArraySize(p) == 0)
        return fail(e, 400, "\"prompt\" must be a string, a list of one string, or a list of "
                            "token ids");
    const int n = cJSON_GetArraySize(p), nv = llama_vocab_n_tokens(s->vocab);
    if (n > s->max_prompt)
        return fail(e, 400, "the prompt has %d tokens; this server takes at most %d", n,
                    s->max_prompt);
    if (!(j->prompt = malloc(sizeof(llama_token) * (size_t)n)))
        return fail(e, 500, "out of memory");
    const cJSON *t;
    int i = 0;
    cJSON_ArrayForEach(t, p) {
        if (!cJSON_IsNumber(t) || floor(t->valuedouble) != t->valuedouble ||
            t->valuedouble < 0 || t->valuedouble >= nv)
            return fail(e, 400, "prompt[%d] is not a token id (0..%d)", i, nv - 1);
        j->prompt[i++] = (llama_token)t->valuedouble;
    }
    j->n_prompt = n;
    return 0;
}

static int parse_stop(const cJSON *root, job *j, api_err *e)
{
    const cJSON *st = cJSON_GetObjectItemCaseSensitive(root, "stop");
    if (!st || cJSON_IsNull(st))
        return 0;
    const int n = cJSON_IsString(st) ? 1 : cJSON_IsArray(st) ? cJSON_GetArraySize(st) : -1;
    if (n < 0 || n > 4)
        return fail(e, 400, "\"stop\" must be a string or a list of up to 4 strings");
    if (!(j->stop = calloc((size_t)n + 1, sizeof *j->stop)))
        return fail(e, 500, "out of memory");
    for (int i = 0; i < n; i++) {
        const cJSON *x = cJSON_IsString(st) ? st : cJSON_GetArrayItem(st, i);
        if (!cJSON_IsString(x) || !x->valuestring[0])
            return fail(e, 400, "\"stop\" must hold non-empty strings");
        if (!(j->stop[i] = strdup(x->valuestring)))
            return fail(e, 500, "out of memory");
        j->n_stop = i + 1;
    }
    return 0;
}

int api_parse_generate(server *s, const char *body, size_t len, bool chat, job *j, gen_opts *o,
                       api_err *e)
{
    memset(o, 0, sizeof *o);
    o->chat = chat;
    cJSON *root = parse_body(body, len, e);
    if (!root)
        return -1;
    int rc = -1;
    long long v;
    double x;
    j->kind = JOB_GENERATE;
    const cJSON *stream = cJSON_GetObjectItemCaseSensitive(root, "stream");
    if (stream && !cJSON_IsNull(stream) && !cJSON_IsBool(stream)) {
        fail(e, 400, "\"stream\" must be true or false");
        goto out;
    }
    o->stream = cJSON_IsTrue(stream);
    if (get_int(root, "n", 1, 1, &v, e) < 0)
        goto out;
    j->max_tokens = chat ? s->max_tokens : (16 < s->max_tokens ? 16 : s->max_tokens);
    int r = get_int(root, "max_tokens", 1, s->max_tokens, &v, e);
    if (r < 0 || (r == 0 && chat && (r = get_int(root, "max_completion_tokens", 1,
                                                 s->max_tokens, &v, e)) < 0))
        goto out;
    if (r > 0)
        j->max_tokens = (int)v;
    j->temperature = 1;
    if ((r = get_num(root, "temperature", 0, 2, &x, e)) < 0)
        goto out;
    if (r > 0)
        j->temperature = (float)x;
    j->top_p = 1;
    if ((r = get_num(root, "top_p", 0, 1, &x, e)) < 0)
        goto out;
    if (r > 0) {
        if (x <= 0) {
            fail(e, 400, "\"top_p\" must be in (0, 1]");
            goto out;
        }
        j->top_p = (float)x;
    }
    if ((r = get_int(root, "seed", -9007199254740991.0, 9007199254740991.0, &v, e)) < 0)
        goto out;
    /* no seed: the time and a request counter, so that concurrent requests differ */
    j->seed = r > 0 ? (uint32_t)v
                    : (uint32_t)time(NULL) ^
                          (uint32_t)atomic_fetch_add(&s->next_id, 1) * 2654435761u;
    if (parse_stop(root, j, e) || parse_steering(s, root, j, e))
        goto out;
    if (chat) {
        if (chat_prompt(s, cJSON_GetObjectItemCaseSensitive(root, "messages"), j, e))
            goto out;
    } else {
        const cJSON *p = cJSON_GetObjectItemCaseSensitive(root, "prompt");
        if (!p) {
            fail(e, 400, "\"prompt\" is required");
            goto out;
        }
        if (completion_prompt(s, p, j, e))
            goto out;
    }
    if (admit(s, j, e))
        goto out;
    rc = 0;
out:
    cJSON_Delete(root);
    return rc;
}

static void add_usage(cJSON *o, const job *j)
{
    cJSON *u = cJSON_AddObjectToObject(o, "usage");
    cJSON_AddNumberToObject(u, "prompt_tokens", j->n_prompt);
    cJSON_AddNumberToObject(u, "completion_tokens", j->n_gen);
    cJSON_AddNumberToObject(u, "total_tokens", j->n_prompt + j->n_gen);
}

static cJSON *head(const server *s, const gen_opts *o, const char *id, long created, bool chunk)
{
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "id", id);
    cJSON_AddStringToObject(r, "object", !o->chat ? "text_completion"
                                         : chunk  ? "chat.completion.chunk"
                                                  : "chat.completion");
    cJSON_AddNumberToObject(r, "created", (double)created);
    cJSON_AddStringToObject(r, "model", s->model_name);
    cJSON_AddStringToObject(r, "system_fingerprint", "libsae-sae-server");
    return r;
}

/* text may hold bytes cJSON would print as they are; it holds no NUL (pieces come from
 * llama_token_to_piece into a NUL-terminated buffer) */
static cJSON *string_n(const char *t, size_t n)
{
    char *c = malloc(n + 1);
    if (!c)
        return NULL;
    memcpy(c, t, n);
    c[n] = 0;
    cJSON *s = cJSON_CreateString(c);
    free(c);
    return s;
}

char *api_generate_json(const server *s, const job *j, const gen_opts *o, const char *id,
                        long created)
{
    cJSON *r = head(s, o, id, created, false);
    cJSON *ch = cJSON_AddArrayToObject(r, "choices"), *c = cJSON_CreateObject();
    cJSON_AddItemToArray(ch, c);
    cJSON_AddNumberToObject(c, "index", 0);
    if (o->chat) {
        cJSON *m = cJSON_AddObjectToObject(c, "message");
        cJSON_AddStringToObject(m, "role", "assistant");
        cJSON_AddItemToObject(m, "content", string_n(j->text ? j->text : "", j->len));
    } else {
        cJSON_AddItemToObject(c, "text", string_n(j->text ? j->text : "", j->len));
    }
    cJSON_AddNullToObject(c, "logprobs");
    cJSON_AddStringToObject(c, "finish_reason", j->finish ? j->finish : "stop");
    add_usage(r, j);
    return print(r);
}

char *api_chunk_json(const server *s, const gen_opts *o, const char *id, long created,
                     const char *delta, size_t n, bool role, const char *finish)
{
    cJSON *r = head(s, o, id, created, true);
    cJSON *ch = cJSON_AddArrayToObject(r, "choices"), *c = cJSON_CreateObject();
    cJSON_AddItemToArray(ch, c);
    cJSON_AddNumberToObject(c, "index", 0);
    if (o->chat) {
        cJSON *d = cJSON_AddObjectToObject(c, "delta");
        if (role)
            cJSON_AddStringToObject(d, "role", "assistant");
        if (role || n)
            cJSON_AddItemToObject(d, "content", string_n(delta, n));
    } else {
        cJSON_AddItemToObject(c, "text", string_n(delta, n));
    }
    cJSON_AddNullToObject(c, "logprobs");
    if (finish)
        cJSON_AddStringToObject(c, "finish_reason", finish);
    else
        cJSON_AddNullToObject(c, "finish_reason");
    return print(r);
}

void feat_opts_clear(feat_opts *o)
{
    free(o->sel_dict);
    free(o->sel_feature);
    o->sel_dict = NULL;
    o->sel_feature = NULL;
    o->n_sel = 0;
}

int api_parse_features(server *s, const char *body, size_t len, job *j, feat_opts *o,
                       api_err *e)
{
    memset(o, 0, sizeof *o);
    cJSON *root = parse_body(body, len, e);
    if (!root)
        return -1;
    int rc = -1;
    long long v;
    j->kind = JOB_FEATURES;
    if (!s->n_dicts) {
        fail(e, 400, "no dictionary is loaded (start the server with --sae HOOK=PATH)");
        goto out;
    }
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(root, "text");
    if (!t)
        t = cJSON_GetObjectItemCaseSensitive(root, "prompt");
    if (!cJSON_IsString(t)) {
        fail(e, 400, "\"text\" (a string) is required");
        goto out;
    }
    o->top_k = 5;
    const int r = get_int(root, "top_k", 1, s->features_top_k_max, &v, e);
    if (r < 0)
        goto out;
    if (r > 0)
        o->top_k = (int)v;
    const cJSON *sel = cJSON_GetObjectItemCaseSensitive(root, "features");
    if (sel && !cJSON_IsNull(sel)) {
        if (!cJSON_IsArray(sel) || cJSON_GetArraySize(sel) > 64) {
            fail(e, 400, "\"features\" must be a list of up to 64 {hook, feature}");
            goto out;
        }
        const size_t n = (size_t)cJSON_GetArraySize(sel);
        o->sel_dict = calloc(n + 1, sizeof *o->sel_dict);
        o->sel_feature = calloc(n + 1, sizeof *o->sel_feature);
        if (!o->sel_dict || !o->sel_feature) {
            fail(e, 500, "out of memory");
            goto out;
        }
        const cJSON *it;
        cJSON_ArrayForEach(it, sel) {
            const size_t i = o->n_sel;
            const cJSON *h = cJSON_GetObjectItemCaseSensitive(it, "hook");
            const cJSON *f = cJSON_GetObjectItemCaseSensitive(it, "feature");
            const int di = cJSON_IsString(h) ? find_dict(s, h->valuestring) : -1;
            if (di < 0) {
                fail(e, 400, "features[%zu]: unknown hook %s%s%s", i, cJSON_IsString(h) ? "\"" : "",
                     cJSON_IsString(h) ? h->valuestring : "(not a string)",
                     cJSON_IsString(h) ? "\"" : "");
                goto out;
            }
            const double d_sae = (double)sae_model_d_sae(s->dicts[di].m);
            if (!cJSON_IsNumber(f) || floor(f->valuedouble) != f->valuedouble ||
                f->valuedouble < 0 || f->valuedouble >= d_sae) {
                fail(e, 400, "features[%zu]: feature out of range: %s has %.0f features", i,
                     s->dicts[di].hook, d_sae);
                goto out;
            }
            o->sel_dict[i] = (size_t)di;
            o->sel_feature[i] = (uint32_t)f->valuedouble;
            o->n_sel++;
        }
    }
    if (tokenize(s, t->valuestring, false, j, e) || admit(s, j, e))
        goto out;
    rc = 0;
out:
    cJSON_Delete(root);
    return rc;
}

char *api_features_json(const server *s, const job *j, const feat_opts *o, api_err *e)
{
    const size_t n = (size_t)j->n_prompt, k = (size_t)o->top_k;
    uint32_t *idx = malloc(n * k * sizeof *idx), *cnt = malloc(n * sizeof *cnt);
    float *val = malloc(n * k * sizeof *val), *selv = calloc(n * o->n_sel + 1, sizeof *selv);
    cJSON *r = NULL, *toks = NULL;
    float *dense = NULL;
    if (!idx || !cnt || !val || !selv) {
        fail(e, 500, "out of memory");
        goto out;
    }
    r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "object", "features");
    cJSON_AddStringToObject(r, "model", s->model_name);
    cJSON_AddNumberToObject(r, "top_k", (double)k);
    cJSON *hooks = cJSON_AddArrayToObject(r, "hooks");
    for (size_t di = 0; di < s->n_dicts; di++)
        cJSON_AddItemToArray(hooks, cJSON_CreateString(s->dicts[di].hook));
    toks = cJSON_AddArrayToObject(r, "tokens");
    for (size_t i = 0; i < n; i++) {
        cJSON *t = cJSON_CreateObject();
        char piece[256];
        const int pk = llama_token_to_piece(s->vocab, j->prompt[i], piece,
                                            (int32_t)sizeof piece - 1, 0, true);
        piece[pk < 0 ? 0 : pk] = 0;
        cJSON_AddNumberToObject(t, "id", j->prompt[i]);
        cJSON_AddStringToObject(t, "text", piece);
        cJSON_AddObjectToObject(t, "features");
        if (o->n_sel)
            cJSON_AddArrayToObject(t, "values");
        cJSON_AddItemToArray(toks, t);
    }
    for (size_t di = 0; di < s->n_dicts; di++) {
        const sae_model *m = s->dicts[di].m;
        if (sae_encode_sparse(m, j->acts[di], n, k, idx, val, cnt) != SAE_OK) {
            fail(e, 500, "sae_encode_sparse at %s: %s", s->dicts[di].hook, sae_last_error());
            goto out;
        }
        for (size_t i = 0; i < n; i++) {
            cJSON *arr = cJSON_AddArrayToObject(
                cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(toks, (int)i), "features"),
                s->dicts[di].hook);
            for (uint32_t q = 0; q < cnt[i]; q++) {
                cJSON *f = cJSON_CreateObject();
                cJSON_AddNumberToObject(f, "id", idx[i * k + q]);
                cJSON_AddNumberToObject(f, "value", val[i * k + q]);
                cJSON_AddItemToArray(arr, f);
            }
        }
        bool wanted = false;
        for (size_t q = 0; q < o->n_sel; q++)
            wanted |= o->sel_dict[q] == di;
        if (!wanted)
            continue;
        /* the selected features' values: one token at a time, so the dense codes never
         * take more than one row of d_sae floats */
        const size_t d_sae = sae_model_d_sae(m), d = sae_model_d_in(m);
        if (!(dense = malloc(d_sae * sizeof *dense))) {
            fail(e, 500, "out of memory");
            goto out;
        }
        for (size_t i = 0; i < n; i++) {
            if (sae_encode(m, j->acts[di] + i * d, 1, dense) != SAE_OK) {
                fail(e, 500, "sae_encode at %s: %s", s->dicts[di].hook, sae_last_error());
                goto out;
            }
            for (size_t q = 0; q < o->n_sel; q++)
                if (o->sel_dict[q] == di)
                    selv[i * o->n_sel + q] = dense[o->sel_feature[q]];
        }
        free(dense);
        dense = NULL;
    }
    for (size_t i = 0; i < n && o->n_sel; i++) {
        cJSON *arr = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(toks, (int)i), "values");
        for (size_t q = 0; q < o->n_sel; q++)
            cJSON_AddItemToArray(arr, cJSON_CreateNumber(selv[i * o->n_sel + q]));
    }
    free(idx);
    free(cnt);
    free(val);
    free(selv);
    return print(r);
out:
    cJSON_Delete(r);
    free(dense);
    free(idx);
    free(cnt);
    free(val);
    free(selv);
    return NULL;
}

char *api_models_json(const server *s)
{
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "object", "list");
    cJSON *d = cJSON_AddArrayToObject(r, "data"), *m = cJSON_CreateObject();
    cJSON_AddItemToArray(d, m);
    cJSON_AddStringToObject(m, "id", s->model_name);
    cJSON_AddStringToObject(m, "object", "model");
    cJSON_AddNumberToObject(m, "created", 0);
    cJSON_AddStringToObject(m, "owned_by", "sae-server");
    return print(r);
}

char *api_dicts_json(const server *s)
{
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "object", "list");
    cJSON *d = cJSON_AddArrayToObject(r, "data");
    for (size_t i = 0; i < s->n_dicts; i++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "hook", s->dicts[i].hook);
        cJSON_AddStringToObject(o, "path", s->dicts[i].path);
        cJSON_AddNumberToObject(o, "d_in", (double)sae_model_d_in(s->dicts[i].m));
        cJSON_AddNumberToObject(o, "d_sae", (double)sae_model_d_sae(s->dicts[i].m));
        cJSON_AddBoolToObject(o, "transcoder", sae_model_is_transcoder(s->dicts[i].m));
        cJSON_AddBoolToObject(o, "stats", s->dicts[i].cards != NULL);
        cJSON_AddItemToArray(d, o);
    }
    return print(r);
}

char *api_card_json(const server *s, const char *hook, const char *id, api_err *e)
{
    const int di = find_dict(s, hook);
    if (di < 0) {
        char hooks[256];
        loaded_hooks(s, hooks, sizeof hooks);
        fail(e, 404, "unknown hook \"%s\" (loaded: %s)", hook, hooks);
        return NULL;
    }
    char *end;
    const unsigned long long f = strtoull(id, &end, 10);
    if (!*id || *end || id[0] == '-' || id[0] == '+') {
        fail(e, 400, "\"%s\" is not a feature id", id);
        return NULL;
    }
    const size_t d_sae = sae_model_d_sae(s->dicts[di].m);
    if (f >= d_sae) {
        fail(e, 404, "feature %s is out of range: %s has %zu features", id, hook, d_sae);
        return NULL;
    }
    if (!s->dicts[di].cards) {
        fail(e, 404, "no statistics loaded for %s (start the server with --stats %s=PATH)", hook,
             hook);
        return NULL;
    }
    char err[512];
    cJSON *c = feature_cards_card(s->dicts[di].cards, (uint32_t)f, err, sizeof err);
    if (!c) {
        fail(e, 500, "%s", err);
        e->type = "server_error";
        return NULL;
    }
    return print(c);
}
