/* http.c: see http.h. */
#define _POSIX_C_SOURCE 200809L
#include "http.h"

#include "api.h"

#include <arpa/inet.h>
#include <microhttpd.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* One request: its body, what it became, and, when streamed, what is left to send. */
typedef struct {
    server *s;
    char method[16];
    char url[256];
    double t0;
    char *body;
    size_t len, cap;
    bool too_big;
    int status;
    bool has_job;
    job j;
    gen_opts go;
    char id[48];
    long created;
    /* streaming */
    size_t sent;          /* bytes of j.text already sent */
    bool role_sent, end_sent;
    char *out;
    size_t out_len, out_off, out_cap;
} req;

static enum MHD_Result send_body(struct MHD_Connection *c, req *q, int status, char *body,
                                 const char *type)
{
    if (!body)
        return MHD_NO;
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    q->status = status;
    const enum MHD_Result rc = MHD_queue_response(c, (unsigned)status, r);
    MHD_destroy_response(r);
    return rc;
}

static enum MHD_Result send_json(struct MHD_Connection *c, req *q, int status, char *json)
{
    return send_body(c, q, status, json, "application/json");
}

static enum MHD_Result send_error(struct MHD_Connection *c, req *q, int status, const char *msg,
                                  const char *type)
{
    return send_json(c, q, status, api_error_json(msg, type));
}

static enum MHD_Result send_api_err(struct MHD_Connection *c, req *q, const api_err *e)
{
    return send_error(c, q, e->status, e->message, e->type);
}

/* Waits a little for the job (for new text, or until_done for its end). Ends it when its
 * deadline passed while it still waited for a slot: a job in a slot is ended by the engine. */
static void wait_step(server *s, req *q, bool until_done)
{
    engine_wait(s->eng, &q->j, until_done ? (size_t)-1 : q->sent, 0.5);
    engine_lock(s->eng);
    const bool late = !q->j.done && q->j.deadline > 0 && engine_now() > q->j.deadline + 0.5;
    engine_unlock(s->eng);
    if (late) {
        engine_cancel(s->eng, &q->j);
        engine_lock(s->eng);
        if (q->j.status == JOB_CANCELLED)   /* not if it ended on its own meanwhile */
            q->j.status = JOB_TIMEOUT;
        engine_unlock(s->eng);
    }
}

static bool job_done(server *s, job *j)
{
    engine_lock(s->eng);
    const bool d = j->done;
    engine_unlock(s->eng);
    return d;
}

static int job_http_status(const job *j, const char **type, const char **msg)
{
    switch (j->status) {
    case JOB_OK:
        return 200;
    case JOB_TIMEOUT:
        *type = "timeout";
        *msg = "the request took longer than the server's --timeout";
        return 504;
    case JOB_CANCELLED:
        *type = "server_error";
        *msg = "the request was cancelled";
        return 500;
    default:
        *type = "server_error";
        *msg = j->err[0] ? j->err : "generation failed";
        return 500;
    }
}

static enum MHD_Result submit(struct MHD_Connection *c, req *q)
{
    char err[256];
    const int rc = engine_submit(q->s->eng, &q->j, err, sizeof err);
    if (rc != 0) {
        job_clear(&q->j, q->s->n_dicts);
        q->has_job = false;
        return rc == -1   ? send_error(c, q, 429, err, "rate_limit_error")
               : rc == -2 ? send_error(c, q, 503, err, "server_error")
                          : send_error(c, q, 400, err, "invalid_request_error");
    }
    q->has_job = true;
    return MHD_YES;
}

static void out_append(req *q, const char *a, const char *b, const char *z)
{
    const size_t la = strlen(a), lb = b ? strlen(b) : 0, lz = strlen(z);
    const size_t need = q->out_len + la + lb + lz + 1;
    if (need > q->out_cap) {
        char *p = realloc(q->out, need * 2);
        if (!p)
            return;
        q->out = p;
        q->out_cap = need * 2;
    }
    memcpy(q->out + q->out_len, a, la);
    if (lb)
        memcpy(q->out + q->out_len + la, b, lb);
    memcpy(q->out + q->out_len + la + lb, z, lz);
    q->out_len += la + lb + lz;
}

static void sse(req *q, char *json)
{
    if (json)
        out_append(q, "data: ", json, "\n\n");
    free(json);
}

/* The next events of a stream into q->out: new text, or the end. */
static void stream_fill(req *q)
{
    server *s = q->s;
    q->out_len = q->out_off = 0;
    if (q->go.chat && !q->role_sent) {
        q->role_sent = true;
        sse(q, api_chunk_json(s, &q->go, q->id, q->created, "", 0, true, NULL));
        return;
    }
    engine_lock(s->eng);
    const bool done = q->j.done;
    const size_t stable = q->j.stable;
    char *delta = NULL;
    if (stable > q->sent && (delta = malloc(stable - q->sent + 1)))
        memcpy(delta, q->j.text + q->sent, stable - q->sent);
    engine_unlock(s->eng);
    if (delta) {
        sse(q, api_chunk_json(s, &q->go, q->id, q->created, delta, stable - q->sent, false, NULL));
        free(delta);
        q->sent = stable;
        return;
    }
    if (!done) {
        wait_step(s, q, false);
        return;
    }
    const char *type = NULL, *msg = NULL;
    if (job_http_status(&q->j, &type, &msg) == 200) {
        sse(q, api_chunk_json(s, &q->go, q->id, q->created, "", 0, false, q->j.finish));
    } else {
        /* the status line went out with the first byte: the error travels as an event */
        sse(q, api_error_json(msg, type));
    }
    out_append(q, "data: [DONE]", NULL, "\n\n");
    q->end_sent = true;
}

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    (void)pos;
    req *q = cls;
    while (q->out_off == q->out_len) {
        if (q->end_sent)
            return MHD_CONTENT_READER_END_OF_STREAM;
        stream_fill(q);
    }
    size_t n = q->out_len - q->out_off;
    if (n > max)
        n = max;
    memcpy(buf, q->out + q->out_off, n);
    q->out_off += n;
    return (ssize_t)n;
}

static enum MHD_Result generate(struct MHD_Connection *c, req *q, bool chat)
{
    server *s = q->s;
    api_err e;
    if (api_parse_generate(s, q->body, q->len, chat, &q->j, &q->go, &e) != 0) {
        job_clear(&q->j, s->n_dicts);
        return send_api_err(c, q, &e);
    }
    snprintf(q->id, sizeof q->id, "%s-%lu", chat ? "chatcmpl" : "cmpl",
             (unsigned long)atomic_fetch_add(&s->next_id, 1));
    q->created = (long)time(NULL);
    const enum MHD_Result rc = submit(c, q);
    if (!q->has_job)
        return rc;
    if (q->go.stream) {
        q->status = 200;
        struct MHD_Response *r =
            MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, stream_read, q, NULL);
        if (!r)
            return MHD_NO;
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
        MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        const enum MHD_Result ok = MHD_queue_response(c, MHD_HTTP_OK, r);
        MHD_destroy_response(r);
        return ok;
    }
    while (!job_done(s, &q->j))
        wait_step(s, q, true);
    const char *type = NULL, *msg = NULL;
    const int st = job_http_status(&q->j, &type, &msg);
    if (st != 200)
        return send_error(c, q, st, msg, type);
    return send_json(c, q, 200, api_generate_json(s, &q->j, &q->go, q->id, q->created));
}

static enum MHD_Result features(struct MHD_Connection *c, req *q)
{
    server *s = q->s;
    api_err e;
    feat_opts o;
    if (api_parse_features(s, q->body, q->len, &q->j, &o, &e) != 0) {
        feat_opts_clear(&o);
        job_clear(&q->j, s->n_dicts);
        return send_api_err(c, q, &e);
    }
    enum MHD_Result rc = submit(c, q);
    if (q->has_job) {
        while (!job_done(s, &q->j))
            wait_step(s, q, true);
        const char *type = NULL, *msg = NULL;
        const int st = job_http_status(&q->j, &type, &msg);
        if (st != 200) {
            rc = send_error(c, q, st, msg, type);
        } else {
            char *body = api_features_json(s, &q->j, &o, &e);
            rc = body ? send_json(c, q, 200, body) : send_api_err(c, q, &e);
        }
    }
    feat_opts_clear(&o);
    return rc;
}

static enum MHD_Result route(struct MHD_Connection *c, req *q)
{
    server *s = q->s;
    const char *u = q->url;
    const bool get = !strcmp(q->method, "GET") || !strcmp(q->method, "HEAD");
    const bool post = !strcmp(q->method, "POST");
    if (q->too_big) {
        char m[128];
        snprintf(m, sizeof m, "the request body is larger than %zu bytes", s->max_body);
        return send_error(c, q, 413, m, "invalid_request_error");
    }
    if (!strcmp(u, "/v1/completions") || !strcmp(u, "/v1/chat/completions") ||
        (!strcmp(u, "/v1/features") && post)) {
        if (!post)
            return send_error(c, q, 405, "use POST", "invalid_request_error");
        if (!strcmp(u, "/v1/features"))
            return features(c, q);
        return generate(c, q, !strcmp(u, "/v1/chat/completions"));
    }
    if (!get)
        return send_error(c, q, strncmp(u, "/v1/", 4) && strcmp(u, "/") && strcmp(u, "/health")
                                    ? 404 : 405,
                          "no such route for this method", "invalid_request_error");
    if (!strcmp(u, "/")) {
        char *p = malloc(s->page_len + 1);
        if (!p)
            return MHD_NO;
        memcpy(p, s->page, s->page_len);
        p[s->page_len] = 0;
        return send_body(c, q, 200, p, "text/html; charset=utf-8");
    }
    if (!strcmp(u, "/health")) {
        uint64_t steps, toks;
        double dec, hook, lib;
        engine_stats(s->eng, &steps, &toks, &dec, &hook, &lib);
        char *b = malloc(256);
        if (b)
            snprintf(b, 256, "{\"status\":\"ok\",\"decode_steps\":%llu,\"decoded_tokens\":%llu,"
                     "\"decode_seconds\":%.6f,\"hook_seconds\":%.6f,\"libsae_seconds\":%.6f}",
                     (unsigned long long)steps, (unsigned long long)toks, dec, hook, lib);
        return send_json(c, q, 200, b);
    }
    if (!strcmp(u, "/v1/models"))
        return send_json(c, q, 200, api_models_json(s));
    if (!strcmp(u, "/v1/features"))
        return send_json(c, q, 200, api_dicts_json(s));
    if (!strncmp(u, "/v1/features/", 13)) {
        char hook[256];
        const char *rest = u + 13, *slash = strrchr(rest, '/');
        if (!slash || slash == rest || (size_t)(slash - rest) >= sizeof hook)
            return send_error(c, q, 404, "expected /v1/features/{hook}/{id}", "not_found_error");
        memcpy(hook, rest, (size_t)(slash - rest));
        hook[slash - rest] = 0;
        api_err e;
        char *card = api_card_json(s, hook, slash + 1, &e);
        return card ? send_json(c, q, 200, card) : send_api_err(c, q, &e);
    }
    return send_error(c, q, 404, "no such route", "not_found_error");
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version,
                                  const char *upload, size_t *upload_size, void **con_cls)
{
    (void)version;
    server *s = cls;
    req *q = *con_cls;
    if (!q) {
        if (!(q = calloc(1, sizeof *q)))
            return MHD_NO;
        q->s = s;
        q->t0 = engine_now();
        snprintf(q->method, sizeof q->method, "%s", method);
        snprintf(q->url, sizeof q->url, "%s", url);
        atomic_fetch_add(&s->inflight, 1);
        *con_cls = q;
        return MHD_YES;
    }
    if (*upload_size) {
        if (!q->too_big && q->len + *upload_size > s->max_body) {
            q->too_big = true;
            free(q->body);
            q->body = NULL;
            q->len = q->cap = 0;
        }
        if (!q->too_big) {
            if (q->len + *upload_size + 1 > q->cap) {
                size_t cap = (q->len + *upload_size + 1) * 2;
                char *b = realloc(q->body, cap);
                if (!b)
                    return MHD_NO;
                q->body = b;
                q->cap = cap;
            }
            memcpy(q->body + q->len, upload, *upload_size);
            q->len += *upload_size;
            q->body[q->len] = 0;
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (!q->body && !(q->body = calloc(1, 1)))
        return MHD_NO;
    return route(c, q);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    server *s = cls;
    req *q = *con_cls;
    if (!q)
        return;
    *con_cls = NULL;
    if (q->has_job)
        engine_cancel(s->eng, &q->j);   /* a no-op unless the client went away mid-stream */
    char addr[INET6_ADDRSTRLEN] = "-";
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    if (ci && ci->client_addr) {
        const struct sockaddr *sa = ci->client_addr;
        if (sa->sa_family == AF_INET)
            inet_ntop(AF_INET, &((const struct sockaddr_in *)(const void *)sa)->sin_addr, addr,
                      sizeof addr);
        else if (sa->sa_family == AF_INET6)
            inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr, addr,
                      sizeof addr);
    }
    char ts[32];
    const time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%SZ", &tm);
    static const char *toe_name[] = {"ok", "error", "timeout", "shutdown", "read-error",
                                     "client-abort"};
    fprintf(stderr, "%s %s %s %s %d %.1fms prompt=%d gen=%d%s%s%s\n", ts, addr, q->method, q->url,
            q->status, 1e3 * (engine_now() - q->t0), q->has_job ? q->j.n_prompt : 0,
            q->has_job ? q->j.n_gen : 0, toe != MHD_REQUEST_TERMINATED_COMPLETED_OK ? " end=" : "",
            toe != MHD_REQUEST_TERMINATED_COMPLETED_OK && (unsigned)toe < 6 ? toe_name[toe] : "",
            q->has_job && q->j.finish ? (q->j.finish[0] == 's' ? " finish=stop" : " finish=length")
                                      : "");
    if (q->has_job)
        job_clear(&q->j, s->n_dicts);
    free(q->body);
    free(q->out);
    free(q);
    atomic_fetch_sub(&s->inflight, 1);
}

struct MHD_Daemon *http_start(server *s, const char *host, int port, int max_connections,
                              int *bound_port, char *err, size_t errlen)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE}, *ai = NULL;
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    const int g = getaddrinfo(host, ps, &hints, &ai);
    if (g != 0 || !ai) {
        snprintf(err, errlen, "--host %s: %s", host, gai_strerror(g));
        return NULL;
    }
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD |
                     MHD_USE_ITC | MHD_USE_ERROR_LOG;
    if (ai->ai_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    struct MHD_Daemon *d = MHD_start_daemon(
        flags, (uint16_t)port, NULL, NULL, on_request, s,
        MHD_OPTION_SOCK_ADDR, ai->ai_addr,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)max_connections,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)(s->timeout > 0 ? s->timeout + 30 : 600),
        MHD_OPTION_END);
    freeaddrinfo(ai);
    if (!d) {
        snprintf(err, errlen, "cannot listen on %s:%d", host, port);
        return NULL;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
    *bound_port = di ? (int)di->port : port;
    return d;
}

void http_stop(struct MHD_Daemon *d, server *s, double grace)
{
    const MHD_socket fd = MHD_quiesce_daemon(d);
    if (fd != MHD_INVALID_SOCKET)
        close(fd);
    const double end = engine_now() + grace;
    while (atomic_load(&s->inflight) > 0 && engine_now() < end) {
        struct timespec ts = {0, 20000000};
        nanosleep(&ts, NULL);
    }
    MHD_stop_daemon(d);
}
