/*
 * sae-server-cards: the feature cards of examples/server/feature_cards.c, printed; the driver of
 * tests/server/test_cards.py.
 *
 *   sae-server-cards -m MODEL.gguf --sae PATH --stats STATS.json [--gguf PATH] [--threads T]
 *                    FEATURE...
 *
 * --gguf gives feature_cards_open another file for the unembedding (a damaged one, in tests).
 * Prints each feature's card as one line of JSON. With --threads T, T threads then build every
 * listed card at once, over and over, and each must print the same as the first time
 * (feature_cards.h promises that cards may be asked for from any number of threads).
 * Exit: 0, 1 an error (the message is printed, as the server would put it in its response),
 * 2 bad usage.
 */
#define _POSIX_C_SOURCE 200809L
#include "feature_cards.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const feature_cards *fc;
    const uint32_t *features;
    char **expect;
    int n, bad;
} job;

static void *worker(void *arg)
{
    job *j = arg;
    char err[512];
    for (int rep = 0; rep < 4; rep++)
        for (int i = 0; i < j->n; i++) {
            cJSON *c = feature_cards_card(j->fc, j->features[i], err, sizeof err);
            char *s = c ? cJSON_PrintUnformatted(c) : NULL;
            if (!s || strcmp(s, j->expect[i]) != 0)
                j->bad++;
            free(s);
            cJSON_Delete(c);
        }
    return NULL;
}

static void quiet_log(enum ggml_log_level level, const char *text, void *user)
{
    (void)user;
    if (level >= GGML_LOG_LEVEL_ERROR)
        fputs(text, stderr);
}

int main(int argc, char **argv)
{
    const char *model_path = NULL, *sae_path = NULL, *stats_path = NULL, *gguf_path = NULL;
    int threads = 0, n = 0;
    uint32_t *features = calloc((size_t)argc, sizeof *features);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-m") && i + 1 < argc) model_path = argv[++i];
        else if (!strcmp(argv[i], "--sae") && i + 1 < argc) sae_path = argv[++i];
        else if (!strcmp(argv[i], "--stats") && i + 1 < argc) stats_path = argv[++i];
        else if (!strcmp(argv[i], "--gguf") && i + 1 < argc) gguf_path = argv[++i];
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else {
            char *end;
            const unsigned long f = strtoul(argv[i], &end, 10);
            if (*end || end == argv[i] || f > UINT32_MAX) {
                fprintf(stderr, "usage: sae-server-cards -m MODEL.gguf --sae PATH --stats FILE "
                                "[--gguf PATH] [--threads T] FEATURE...\n");
                return 2;
            }
            features[n++] = (uint32_t)f;
        }
    }
    if (!model_path || !sae_path || !stats_path || threads < 0 || threads > 64)
        return 2;
    llama_log_set(quiet_log, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.vocab_only = true;
    struct llama_model *lm = llama_model_load_from_file(model_path, mp);
    if (!lm) {
        fprintf(stderr, "sae-server-cards: cannot load %s\n", model_path);
        return 1;
    }
    sae_model *m;
    if (sae_model_load(&m, sae_path) != SAE_OK) {
        fprintf(stderr, "sae-server-cards: %s\n", sae_last_error());
        return 1;
    }
    feature_cards *fc;
    char err[512];
    if (feature_cards_open(&fc, stats_path, m, lm, gguf_path ? gguf_path : model_path, err,
                           sizeof err) != 0) {
        /* everything freed, so that a leak checker sees only what feature_cards_open left */
        fprintf(stderr, "sae-server-cards: %s\n", err);
        sae_model_free(m);
        llama_model_free(lm);
        llama_backend_free();
        free(features);
        return 1;
    }
    char **expect = calloc((size_t)n + 1, sizeof *expect);
    int status = 0;
    for (int i = 0; i < n; i++) {
        cJSON *c = feature_cards_card(fc, features[i], err, sizeof err);
        if (!c) {
            fprintf(stderr, "sae-server-cards: %s\n", err);
            status = 1;
            break;
        }
        expect[i] = cJSON_PrintUnformatted(c);
        cJSON_Delete(c);
        puts(expect[i]);
    }
    if (status == 0 && threads > 0) {
        pthread_t tid[64];
        job jobs[64];
        for (int t = 0; t < threads; t++) {
            jobs[t] = (job){.fc = fc, .features = features, .expect = expect, .n = n};
            pthread_create(&tid[t], NULL, worker, &jobs[t]);
        }
        int bad = 0;
        for (int t = 0; t < threads; t++) {
            pthread_join(tid[t], NULL);
            bad += jobs[t].bad;
        }
        if (bad) {
            fprintf(stderr, "sae-server-cards: %d cards built on %d threads differ from the "
                            "first\n", bad, threads);
            status = 1;
        }
    }
    for (int i = 0; i < n; i++)
        free(expect[i]);
    free(expect);
    free(features);
    feature_cards_free(fc);
    sae_model_free(m);
    llama_model_free(lm);
    llama_backend_free();
    return status;
}
