/*
 * sae-train-capture: one dictionary per hook of a capture (sae-llama-capture's index.json and
 * shards), trained in one streaming pass over the shards with libsae's trainer.
 *
 *   sae-train-capture DIR -o OUTDIR [--hooks H,...] [--arch topk|batchtopk|relu] [--k 8]
 *                     [--latents 512] [--batch 256] [--lr X] [--l1 X] [--seed 1]
 *                     [--init-tokens 4096] [--keep-bos] [--check-in-memory]
 *
 * Every shard is read once: for each hook its rows (float32 or float16) are read, the BOS rows
 * (position 0) dropped unless --keep-bos, and appended to that hook's stream, from which
 * consecutive batches go to sae_trainer_step; memory is one shard and one batch per hook. The
 * trainer is initialized (sae_trainer_init) on the first --init-tokens rows. One epoch:
 * TOTAL_STEPS = rows / batch. Writes OUTDIR/<hook>.safetensors (sae_model_save).
 * --check-in-memory also trains each hook from all its rows loaded as one array, with the same
 * calls, and exits 1 unless the weights are bit-identical to the streamed ones.
 * Transcoders: the library's trainer refuses them (sae_trainer_new) on this branch.
 */
#define _POSIX_C_SOURCE 200809L
#include "capture_io.h"
#include "sae.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

typedef struct {
    const char *arch;
    size_t k, latents, batch, init;
    double lr, l1;
    unsigned seed;
} opts_t;

static int fail(const char *what)
{
    fprintf(stderr, "sae-train-capture: %s: %s\n", what, sae_last_error());
    return 1;
}

static int make(sae_model **m, sae_trainer **t, const opts_t *o, size_t d, size_t steps)
{
    sae_arch arch;
    if (sae_arch_from_name(o->arch, &arch) != SAE_OK || sae_model_new(m, arch, d, o->latents) != SAE_OK)
        return fail("model");
    if (arch != SAE_ARCH_RELU && sae_model_set_param(*m, SAE_PARAM_K, (double)o->k) != SAE_OK)
        return fail("--k");
    if (sae_trainer_new(t, *m) != SAE_OK)
        return fail("trainer");
    if (sae_trainer_set_param(*t, SAE_TRAIN_TOTAL_STEPS, (double)steps) != SAE_OK ||
        sae_trainer_set_param(*t, SAE_TRAIN_SEED, o->seed) != SAE_OK ||
        (o->lr > 0 && sae_trainer_set_param(*t, SAE_TRAIN_LR, o->lr) != SAE_OK) ||
        (o->l1 >= 0 && sae_trainer_set_param(*t, SAE_TRAIN_L1_COEFF, o->l1) != SAE_OK))
        return fail("trainer parameter");
    return 0;
}

/* rows of one hook of one shard, BOS rows dropped: malloc'd [*n][d] */
static float *shard_rows(const char *dir, const char *shard, const char *hook, size_t d,
                         bool keep_bos, size_t *n)
{
    char path[4096], err[512];
    int32_t *pos;
    size_t np;
    snprintf(path, sizeof path, "%s/%s.positions.npy", dir, shard);
    if (cio_npy_read_i32(path, &pos, &np, err, sizeof err) != 0) {
        fprintf(stderr, "sae-train-capture: %s\n", err);
        return NULL;
    }
    snprintf(path, sizeof path, "%s/%s.%s.npy", dir, shard, hook);
    sae_npy *a;
    if (sae_npy_open(&a, path) != SAE_OK) {
        fail(path);
        free(pos);
        return NULL;
    }
    float *x = malloc(sizeof *x * (np ? np : 1) * d);
    if (!x || sae_npy_rows(a) != np || sae_npy_cols(a) != d || sae_npy_read(a, 0, np, x) != SAE_OK) {
        fprintf(stderr, "sae-train-capture: %s: expected [%zu][%zu] (%s)\n", path, np, d,
                sae_last_error());
        free(x);
        free(pos);
        sae_npy_close(a);
        return NULL;
    }
    sae_npy_close(a);
    size_t m = 0;
    for (size_t i = 0; i < np; i++)
        if (keep_bos || pos[i] != 0) {
            if (m != i)
                memcpy(x + m * d, x + i * d, d * sizeof *x);
            m++;
        }
    free(pos);
    *n = m;
    return x;
}

int main(int argc, char **argv)
{
    const char *dir = NULL, *out = NULL, *hooks_arg = NULL;
    opts_t o = {.arch = "topk", .k = 8, .latents = 512, .batch = 256, .init = 4096, .lr = 0,
                .l1 = -1, .seed = 1};
    bool keep_bos = false, check = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (a[0] != '-') { dir = a; continue; }
        if (!strcmp(a, "--keep-bos")) { keep_bos = true; continue; }
        if (!strcmp(a, "--check-in-memory")) { check = true; continue; }
        if (!v) { fprintf(stderr, "sae-train-capture: %s needs a value\n", a); return 2; }
        i++;
        if (!strcmp(a, "-o")) out = v;
        else if (!strcmp(a, "--hooks")) hooks_arg = v;
        else if (!strcmp(a, "--arch")) o.arch = v;
        else if (!strcmp(a, "--k")) o.k = (size_t)atol(v);
        else if (!strcmp(a, "--latents")) o.latents = (size_t)atol(v);
        else if (!strcmp(a, "--batch")) o.batch = (size_t)atol(v);
        else if (!strcmp(a, "--init-tokens")) o.init = (size_t)atol(v);
        else if (!strcmp(a, "--lr")) o.lr = atof(v);
        else if (!strcmp(a, "--l1")) o.l1 = atof(v);
        else if (!strcmp(a, "--seed")) o.seed = (unsigned)atol(v);
        else { fprintf(stderr, "sae-train-capture: unknown option %s\n", a); return 2; }
    }
    if (!dir || !out || !o.batch || !o.latents || !o.init || !o.k) {
        fprintf(stderr, "usage: sae-train-capture DIR -o OUTDIR [--hooks H,...] [--arch topk] "
                        "[--k 8] [--latents 512] [--batch 256] [--lr X] [--l1 X] [--seed 1] "
                        "[--init-tokens 4096] [--keep-bos] [--check-in-memory]\n");
        return 2;
    }
    char err[512];
    cio_index ix;
    if (cio_index_load(dir, &ix, err, sizeof err) != 0) {
        fprintf(stderr, "sae-train-capture: %s\n", err);
        return 1;
    }
    if (!ix.complete)
        fprintf(stderr, "sae-train-capture: note: %s is not complete; training on its %d shards\n",
                dir, ix.n_shards);
    /* which hooks */
    int nh = 0;
    char *hooks[256];
    if (hooks_arg) {
        char *c = strdup(hooks_arg), *save = NULL;
        for (char *t = strtok_r(c, ",", &save); t && nh < 256; t = strtok_r(NULL, ",", &save)) {
            int found = 0;
            for (int k = 0; k < ix.n_hooks; k++) found |= !strcmp(ix.hooks[k], t);
            if (!found) {
                fprintf(stderr, "sae-train-capture: the capture has no hook %s\n", t);
                return 2;
            }
            hooks[nh++] = strdup(t);
        }
        free(c);
    } else {
        for (int k = 0; k < ix.n_hooks && k < 256; k++) hooks[nh++] = strdup(ix.hooks[k]);
    }
    const size_t d = ix.n_embd;
    /* rows per hook (the same for every hook): count the non-BOS positions */
    size_t rows = 0;
    for (int s = 0; s < ix.n_shards; s++) {
        char path[4096];
        int32_t *pos;
        size_t np;
        snprintf(path, sizeof path, "%s/%s.positions.npy", dir, ix.shards[s]);
        if (cio_npy_read_i32(path, &pos, &np, err, sizeof err) != 0) {
            fprintf(stderr, "sae-train-capture: %s\n", err);
            return 1;
        }
        for (size_t i = 0; i < np; i++) rows += keep_bos || pos[i] != 0;
        free(pos);
    }
    const size_t steps = rows / o.batch;
    if (steps == 0) {
        fprintf(stderr, "sae-train-capture: %zu rows is less than one batch of %zu\n", rows, o.batch);
        return 1;
    }
    if (mkdir(out, 0777) != 0 && errno != EEXIST) {
        fprintf(stderr, "sae-train-capture: %s: %s\n", out, strerror(errno));
        return 1;
    }

    sae_model **m = calloc((size_t)nh, sizeof *m);
    sae_trainer **t = calloc((size_t)nh, sizeof *t);
    float **carry = calloc((size_t)nh, sizeof *carry);
    size_t *carry_n = calloc((size_t)nh, sizeof *carry_n), *done = calloc((size_t)nh, sizeof *done);
    if (!m || !t || !carry || !carry_n || !done)
        return 1;
    for (int h = 0; h < nh; h++) {
        if (make(&m[h], &t[h], &o, d, steps))
            return 1;
        if (!(carry[h] = malloc(sizeof(float) * (o.batch + o.init) * d)))
            return 1;
    }
    /* one pass over the shards; each hook's stream: init sample first, then batches */
    const size_t init_n = o.init < rows ? o.init : rows;
    for (int s = 0; s < ix.n_shards; s++) {
        for (int h = 0; h < nh; h++) {
            size_t n;
            float *x = shard_rows(dir, ix.shards[s], hooks[h], d, keep_bos, &n);
            if (!x)
                return 1;
            size_t at = 0;
            while (at < n) {
                /* fill the carry up to the init sample (before init) or a batch */
                const size_t want = done[h] == 0 ? init_n : o.batch;
                size_t take = want - carry_n[h];
                if (take > n - at) take = n - at;
                memcpy(carry[h] + carry_n[h] * d, x + at * d, take * d * sizeof(float));
                carry_n[h] += take;
                at += take;
                if (carry_n[h] == want) {
                    if (done[h] == 0) {
                        /* the init sample; it is trained on afterwards like any rows */
                        if (sae_trainer_init(t[h], carry[h], init_n) != SAE_OK)
                            return fail("init");
                        done[h] = 1;
                        /* keep the sample in the stream: step on it batch by batch */
                        size_t off = 0;
                        while (carry_n[h] - off >= o.batch) {
                            if (sae_trainer_step(t[h], carry[h] + off * d, o.batch) != SAE_OK)
                                return fail("step");
                            off += o.batch;
                        }
                        memmove(carry[h], carry[h] + off * d, (carry_n[h] - off) * d * sizeof(float));
                        carry_n[h] -= off;
                    } else {
                        if (sae_trainer_step(t[h], carry[h], o.batch) != SAE_OK)
                            return fail("step");
                        carry_n[h] = 0;
                    }
                }
            }
            free(x);
        }
        fprintf(stderr, "\rsae-train-capture: shard %d/%d", s + 1, ix.n_shards);
    }
    fprintf(stderr, "\n");
    int status = 0;
    for (int h = 0; h < nh; h++) {
        if (done[h] == 0 && sae_trainer_init(t[h], carry[h], carry_n[h]) != SAE_OK)
            return fail("init");
        double fvu = 0, l0 = 0, dead = 0, st = 0;
        sae_trainer_get_metric(t[h], SAE_METRIC_FVU, &fvu);
        sae_trainer_get_metric(t[h], SAE_METRIC_L0, &l0);
        sae_trainer_get_metric(t[h], SAE_METRIC_DEAD_FRACTION, &dead);
        sae_trainer_get_metric(t[h], SAE_METRIC_STEPS, &st);
        char path[4096];
        snprintf(path, sizeof path, "%s/%s.safetensors", out, hooks[h]);
        if (sae_model_save(m[h], path) != SAE_OK)
            return fail(path);
        printf("%s: %s %zu x %zu, %.0f steps of %zu rows; last batch FVU %.4f L0 %.2f dead %.3f -> %s\n",
               hooks[h], o.arch, d, o.latents, st, o.batch, fvu, l0, dead, path);
        if (!check)
            continue;
        /* the same training from all the rows in memory */
        float *all = malloc(sizeof(float) * rows * d);
        size_t n_all = 0;
        if (!all)
            return 1;
        for (int s = 0; s < ix.n_shards; s++) {
            size_t n;
            float *x = shard_rows(dir, ix.shards[s], hooks[h], d, keep_bos, &n);
            if (!x)
                return 1;
            memcpy(all + n_all * d, x, n * d * sizeof(float));
            n_all += n;
            free(x);
        }
        sae_model *m2;
        sae_trainer *t2;
        if (make(&m2, &t2, &o, d, steps) || sae_trainer_init(t2, all, init_n) != SAE_OK)
            return fail("in-memory training");
        for (size_t b = 0; b + o.batch <= n_all; b += o.batch)
            if (sae_trainer_step(t2, all + b * d, o.batch) != SAE_OK)
                return fail("in-memory step");
        bool same = true;
        const sae_tensor ts[] = {SAE_W_ENC, SAE_W_DEC, SAE_B_ENC, SAE_B_DEC};
        const size_t sz[] = {d * o.latents, d * o.latents, o.latents, d};
        for (int k = 0; k < 4; k++) {
            float *a = malloc(sizeof(float) * sz[k]), *b = malloc(sizeof(float) * sz[k]);
            if (!a || !b) return 1;
            sae_model_get_tensor(m[h], ts[k], a);
            sae_model_get_tensor(m2, ts[k], b);
            same &= memcmp(a, b, sizeof(float) * sz[k]) == 0;
            free(a);
            free(b);
        }
        printf("%s: streamed from %d shards vs in memory (%zu rows): weights %s\n", hooks[h],
               ix.n_shards, n_all, same ? "bit-identical" : "DIFFER");
        if (!same)
            status = 1;
        sae_trainer_free(t2);
        sae_model_free(m2);
        free(all);
    }
    for (int h = 0; h < nh; h++) {
        sae_trainer_free(t[h]);
        sae_model_free(m[h]);
        free(carry[h]);
        free(hooks[h]);
    }
    free(m); free(t); free(carry); free(carry_n); free(done);
    cio_index_free(&ix);
    return status;
}
