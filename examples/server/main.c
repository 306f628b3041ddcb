/*
 * sae-server: a GGUF model on llama.cpp with libsae dictionaries at its hook points, served over
 * HTTP: OpenAI's /v1/completions and /v1/chat/completions with a per-request `steering` list,
 * /v1/features (each token's top features), feature cards and a page. docs/server.md.
 *
 *   sae-server -m MODEL.gguf --sae blocks.2.hook_resid_pre=SAE.safetensors [--stats HOOK=PATH]
 *
 * Threads: libmicrohttpd's (one per connection) parse requests and wait on their jobs; one
 * engine thread owns the llama.cpp context; the main thread waits for SIGTERM / SIGINT and then
 * shuts down gracefully (no new connections, requests in flight finish).
 */
#define _POSIX_C_SOURCE 200809L
#include "engine.h"
#include "http.h"
#include "server.h"

#include "feature_cards.h"
#include "sae_llama_hook.h"

#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern const unsigned char sae_server_page[];
extern const size_t sae_server_page_len;

static void usage(void)
{
    fprintf(stderr,
        "usage: sae-server -m MODEL.gguf [--sae HOOK=PATH]... [--stats HOOK=PATH]... [options]\n"
        "  --sae HOOK=PATH        a dictionary at a hook (blocks.L.hook_resid_pre, ...);\n"
        "                         repeatable\n"
        "  --stats HOOK=PATH      feature statistics for that hook's cards; repeatable\n"
        "  --host ADDR            listen address (127.0.0.1)\n"
        "  --port N               port (8080; 0 = any free port, printed)\n"
        "  --parallel N           sequences decoded together in one batch (4)\n"
        "  --ctx N                tokens per sequence, prompt + generation (512 or the model's\n"
        "                         training context if smaller; at most that)\n"
        "  --max-tokens N         the most tokens a request may generate (256)\n"
        "  --max-prompt N         the longest prompt in tokens (ctx - 1)\n"
        "  --max-body BYTES       the largest request body (1048576)\n"
        "  --timeout S            seconds per request, queue and generation (60; 0 = none;\n"
        "                         fractions allowed)\n"
        "  --max-connections N    open connections (64)\n"
        "  --queue N              requests waiting for a sequence before 429 (64)\n"
        "  --threads N            llama.cpp threads (half the CPUs, at most 8)\n"
        "  --chat-template NAME   llama.cpp template name or text (the model's; none: the\n"
        "                         messages' contents joined by newlines)\n"
        "  --model-name NAME      the \"model\" responses report (the file's base name)\n"
        "  --steer-bos            plans steer the BOS token's row too (left alone by default,\n"
        "                         as SAEs are trained without it)\n"
        "  -v                     llama.cpp's log\n");
}

static bool verbose;

static int int_arg(const char *opt, const char *v, long lo, long hi, int *out)
{
    char *end;
    errno = 0;
    const long x = strtol(v, &end, 10);
    if (errno || end == v || *end || x < lo || x > hi) {
        fprintf(stderr, "sae-server: %s %s: expected an integer in [%ld, %ld]\n", opt, v, lo, hi);
        return -1;
    }
    *out = (int)x;
    return 0;
}

static int num_arg(const char *opt, const char *v, double lo, double hi, double *out)
{
    char *end;
    const double x = strtod(v, &end);
    if (end == v || *end || !(x >= lo && x <= hi)) {
        fprintf(stderr, "sae-server: %s %s: expected a number in [%g, %g]\n", opt, v, lo, hi);
        return -1;
    }
    *out = x;
    return 0;
}

typedef struct {
    char *hook, *path;
} pair;

static int split_pair(const char *opt, const char *v, pair *p)
{
    const char *eq = strchr(v, '=');
    if (!eq || eq == v || !eq[1]) {
        fprintf(stderr, "sae-server: %s %s: expected HOOK=PATH\n", opt, v);
        return -1;
    }
    p->hook = strndup(v, (size_t)(eq - v));
    p->path = strdup(eq + 1);
    return p->hook && p->path ? 0 : -1;
}

int main(int argc, char **argv)
{
    const char *model_path = NULL, *host = "127.0.0.1", *name = NULL, *tmpl = NULL;
    int port = 8080, parallel = 4, ctx = 0, max_tokens = 256, max_prompt = 0;
    double timeout = 60;
    int max_conn = 64, queue = 64, threads = 0, max_body = 1 << 20;
    pair saes[64], stats[64];
    int n_sae = 0, n_stats = 0;
    bool steer_bos = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = 0;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage();
            return 0;
        } else if (!strcmp(a, "-v")) {
            verbose = true;
            continue;
        } else if (!strcmp(a, "--steer-bos")) {
            steer_bos = true;
            continue;
        }
        if (!v) {
            fprintf(stderr, "sae-server: %s needs a value\n", a);
            usage();
            return 2;
        }
        i++;
        if (!strcmp(a, "-m") || !strcmp(a, "--model")) model_path = v;
        else if (!strcmp(a, "--sae")) bad = n_sae >= 64 || split_pair(a, v, &saes[n_sae++]);
        else if (!strcmp(a, "--stats")) bad = n_stats >= 64 || split_pair(a, v, &stats[n_stats++]);
        else if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--port")) bad = int_arg(a, v, 0, 65535, &port);
        else if (!strcmp(a, "--parallel")) bad = int_arg(a, v, 1, 64, &parallel);
        else if (!strcmp(a, "--ctx")) bad = int_arg(a, v, 8, 1 << 20, &ctx);
        else if (!strcmp(a, "--max-tokens")) bad = int_arg(a, v, 1, 1 << 20, &max_tokens);
        else if (!strcmp(a, "--max-prompt")) bad = int_arg(a, v, 1, 1 << 20, &max_prompt);
        else if (!strcmp(a, "--max-body")) bad = int_arg(a, v, 1024, INT_MAX, &max_body);
        else if (!strcmp(a, "--timeout")) bad = num_arg(a, v, 0, 86400, &timeout);
        else if (!strcmp(a, "--max-connections")) bad = int_arg(a, v, 1, 10000, &max_conn);
        else if (!strcmp(a, "--queue")) bad = int_arg(a, v, 0, 100000, &queue);
        else if (!strcmp(a, "--threads")) bad = int_arg(a, v, 1, 512, &threads);
        else if (!strcmp(a, "--chat-template")) tmpl = v;
        else if (!strcmp(a, "--model-name")) name = v;
        else {
            fprintf(stderr, "sae-server: unknown option %s\n", a);
            usage();
            return 2;
        }
        if (bad)
            return 2;
    }
    if (!model_path) {
        usage();
        return 2;
    }
    if (!threads) {
        /* half the CPUs, at most 8: ggml's OpenMP barriers spin, and a thread that must wait for
         * a descheduled sibling costs a whole scheduler slice (a shared machine) */
        const long nc = sysconf(_SC_NPROCESSORS_ONLN);
        threads = nc > 1 ? (int)(nc / 2 < 8 ? nc / 2 : 8) : 1;
    }
    /* SIGTERM and SIGINT are taken by sigwait in this thread only: every thread started below
     * inherits the blocked mask */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    static server s;
    s.model_path = model_path;
    if (!(s.model = sae_llama_load_model(model_path, verbose))) {
        fprintf(stderr, "sae-server: cannot load %s\n", model_path);
        return 1;
    }
    s.vocab = llama_model_get_vocab(s.model);
    const int n_train = llama_model_n_ctx_train(s.model);
    if (!ctx)
        ctx = n_train > 0 && n_train < 512 ? n_train : 512;
    if (n_train > 0 && ctx > n_train) {
        fprintf(stderr, "sae-server: --ctx %d is more than the model's training context %d\n",
                ctx, n_train);
        return 2;
    }
    if (name) {
        snprintf(s.model_name, sizeof s.model_name, "%s", name);
    } else {
        const char *b = strrchr(model_path, '/');
        snprintf(s.model_name, sizeof s.model_name, "%s", b ? b + 1 : model_path);
        char *dot = strrchr(s.model_name, '.');
        if (dot && !strcmp(dot, ".gguf"))
            *dot = 0;
    }
    if (tmpl) {
        const llama_chat_message probe = {"user", "x"};
        char buf[8];
        if (llama_chat_apply_template(tmpl, &probe, 1, true, buf, sizeof buf) < 0) {
            fprintf(stderr, "sae-server: --chat-template %s: llama.cpp does not know it\n", tmpl);
            return 2;
        }
    }
    s.chat_template = tmpl;
    s.n_ctx_seq = ctx;
    s.max_tokens = max_tokens;
    s.max_prompt = max_prompt > 0 && max_prompt < ctx ? max_prompt : ctx - 1;
    s.max_body = (size_t)max_body;
    s.timeout = timeout;
    s.features_top_k_max = 64;
    s.page = sae_server_page;
    s.page_len = sae_server_page_len;
    atomic_init(&s.inflight, 0);
    atomic_init(&s.next_id, 1);

    s.dicts = calloc((size_t)n_sae + 1, sizeof *s.dicts);
    engine_dict *ed = calloc((size_t)n_sae + 1, sizeof *ed);
    if (!s.dicts || !ed)
        return 1;
    for (int i = 0; i < n_sae; i++) {
        for (int k = 0; k < i; k++)
            if (!strcmp(saes[k].hook, saes[i].hook)) {
                fprintf(stderr, "sae-server: two dictionaries at %s\n", saes[i].hook);
                return 2;
            }
        srv_dict *d = &s.dicts[s.n_dicts];
        d->hook = saes[i].hook;
        d->path = saes[i].path;
        if (sae_model_load(&d->m, d->path) != SAE_OK) {
            fprintf(stderr, "sae-server: --sae %s=%s: %s\n", d->hook, d->path, sae_last_error());
            return 1;
        }
        ed[s.n_dicts] = (engine_dict){.hook = d->hook, .dict = d->m};
        s.n_dicts++;
    }
    for (int i = 0; i < n_stats; i++) {
        srv_dict *d = NULL;
        for (size_t k = 0; k < s.n_dicts; k++)
            if (!strcmp(s.dicts[k].hook, stats[i].hook))
                d = &s.dicts[k];
        if (!d) {
            fprintf(stderr, "sae-server: --stats %s: no --sae at that hook\n", stats[i].hook);
            return 2;
        }
        char err[512];
        if (feature_cards_open(&d->cards, stats[i].path, d->m, s.model, model_path, err,
                               sizeof err) != 0) {
            fprintf(stderr, "sae-server: --stats %s=%s: %s\n", stats[i].hook, stats[i].path, err);
            return 1;
        }
    }

    char err[512];
    const engine_params ep = {.slots = parallel, .n_ctx_seq = ctx, .threads = threads,
                              .queue_max = queue, .steer_bos = steer_bos};
    if (engine_new(&s.eng, s.model, ed, s.n_dicts, &ep, err, sizeof err) != 0) {
        fprintf(stderr, "sae-server: %s\n", err);
        return 1;
    }
    int bound = 0;
    struct MHD_Daemon *d = http_start(&s, host, port, max_conn, &bound, err, sizeof err);
    if (!d) {
        fprintf(stderr, "sae-server: %s\n", err);
        engine_free(s.eng);
        return 1;
    }
    printf("sae-server: listening on http://%s%s%s:%d/ (model %s, %zu dictionar%s, %d parallel "
           "sequences of %d tokens)\n", strchr(host, ':') ? "[" : "", host,
           strchr(host, ':') ? "]" : "", bound, s.model_name, s.n_dicts,
           s.n_dicts == 1 ? "y" : "ies", parallel, ctx);
    fflush(stdout);

    int sig = 0;
    sigwait(&sigs, &sig);
    fprintf(stderr, "sae-server: %s: finishing %d request%s in flight\n",
            sig == SIGTERM ? "SIGTERM" : "SIGINT", atomic_load(&s.inflight),
            atomic_load(&s.inflight) == 1 ? "" : "s");
    /* the requests in flight get their own timeout and a little more to drain */
    http_stop(d, &s, timeout > 0 ? timeout + 5.0 : 3600.0);
    engine_free(s.eng);
    for (size_t i = 0; i < s.n_dicts; i++) {
        feature_cards_free(s.dicts[i].cards);
        sae_model_free(s.dicts[i].m);
        free(s.dicts[i].hook);
        free(s.dicts[i].path);
    }
    for (int i = 0; i < n_stats; i++) {
        free(stats[i].hook);
        free(stats[i].path);
    }
    free(s.dicts);
    free(ed);
    llama_model_free(s.model);
    llama_backend_free();
    fprintf(stderr, "sae-server: stopped\n");
    return 0;
}
