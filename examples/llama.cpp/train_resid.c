/*
 * sae-train-resid: train a small SAE on a residual-stream dataset with libsae's own trainer,
 * for the llama.cpp demo and cross-checks (examples/llama.cpp).
 *
 *   sae-train-resid [options] DATA_DIR OUT.safetensors
 *
 * DATA_DIR holds resid_*.npy (float32 [n][d_in]: the stream entering layer 2), positions.npy
 * and tokens.npy (int32 [n]), as ../shared/data/stories260K does. Rows at position 0 are
 * dropped: that row is the BOS token's, identical in every document and far larger than the
 * rest, and it would only teach the SAE one dead-giveaway feature.
 *
 *   --arch relu|topk     (relu: each feature depends on its own encoder column only, so a
 *                        clamp is continuous in the activations and cheap to apply)
 *   --latents N          d_sae (256)
 *   --k K                TopK's k (8)
 *   --steps N --batch N  Adam steps and tokens per step (3000, 256)
 *   --l1 X --lr X        ReLU's L1 coefficient and the learning rate (libsae's defaults)
 *   --seed N             seeds the decoder init and the data order (1)
 *   --features OUT.tsv   per feature: firing count over the data, max, and the token ids of
 *                        its 20 strongest examples (what the demo uses to pick a feature)
 *
 * The same options and data give the same file (libsae's trainer is deterministic for a given
 * CBLAS and thread count; the data order comes from --seed).
 */
#define _POSIX_C_SOURCE 200809L
#include "sae.h"

#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TOP_N 20

static int fail(const char *what)
{
    fprintf(stderr, "sae-train-resid: %s: %s\n", what, sae_last_error());
    return 1;
}

/* A 1-D little-endian int32 .npy (libsae's reader takes floats only). Returns a malloc'd array
 * and its length, or NULL with a message. */
static int32_t *read_npy_i32(const char *path, size_t *n_out)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "sae-train-resid: %s: %s\n", path, strerror(errno));
        return NULL;
    }
    unsigned char pre[10];
    int32_t *v = NULL;
    char hdr[1024];
    if (fread(pre, 1, 10, f) != 10 || memcmp(pre, "\x93NUMPY", 6) != 0 || pre[6] != 1)
        goto bad;
    size_t hlen = (size_t)pre[8] | (size_t)pre[9] << 8;
    if (hlen >= sizeof hdr || fread(hdr, 1, hlen, f) != hlen)
        goto bad;
    hdr[hlen] = 0;
    const char *shape = strstr(hdr, "'shape': (");
    if (!strstr(hdr, "'descr': '<i4'") || !strstr(hdr, "'fortran_order': False") || !shape)
        goto bad;
    char *end;
    errno = 0;
    unsigned long long n = strtoull(shape + 10, &end, 10);
    if (errno || end == shape + 10 || (*end != ',' && *end != ')') || (end[0] == ',' && end[1] != ')'))
        goto bad;
    v = malloc((n ? n : 1) * sizeof *v);
    if (!v || fread(v, sizeof *v, n, f) != n)
        goto bad;
    fclose(f);
    *n_out = n;
    return v;
bad:
    fprintf(stderr, "sae-train-resid: %s: not a 1-D little-endian int32 .npy of the stated length\n",
            path);
    free(v);
    fclose(f);
    return NULL;
}

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static int find_resid(const char *dir, char *out, size_t cap)
{
    DIR *d = opendir(dir);
    if (!d)
        return -1;
    struct dirent *e;
    int found = -1;
    while ((e = readdir(d)) != NULL) {
        size_t len = strlen(e->d_name);
        if (strncmp(e->d_name, "resid_", 6) == 0 && len > 4 && strcmp(e->d_name + len - 4, ".npy") == 0) {
            if ((size_t)snprintf(out, cap, "%s/%s", dir, e->d_name) < cap)
                found = 0;
            break;
        }
    }
    closedir(d);
    return found;
}

static double num(const char *opt, const char *s, double lo, double hi)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "sae-train-resid: %s needs a number in [%g, %g], got \"%s\"\n", opt, lo, hi, s);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    const char *dir = NULL, *out = NULL, *features = NULL;
    sae_arch arch = SAE_ARCH_RELU;
    size_t d_sae = 256, k = 8, steps = 3000, batch = 256;
    double l1 = -1, lr = -1;
    uint64_t seed = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int opt = a[0] == '-' && a[1] == '-';
        if (opt && !v) {
            fprintf(stderr, "sae-train-resid: %s needs a value\n", a);
            return 2;
        }
        if (!opt) {
            if (!dir) dir = a;
            else if (!out) out = a;
            else { fprintf(stderr, "sae-train-resid: unexpected argument %s\n", a); return 2; }
            continue;
        }
        i++;
        if (!strcmp(a, "--arch")) {
            if (sae_arch_from_name(v, &arch) != SAE_OK || (arch != SAE_ARCH_RELU && arch != SAE_ARCH_TOPK)) {
                fprintf(stderr, "sae-train-resid: --arch relu or topk\n");
                return 2;
            }
        } else if (!strcmp(a, "--latents")) d_sae = (size_t)num(a, v, 1, 1 << 20);
        else if (!strcmp(a, "--k")) k = (size_t)num(a, v, 1, 1 << 20);
        else if (!strcmp(a, "--steps")) steps = (size_t)num(a, v, 0, 1e9);
        else if (!strcmp(a, "--batch")) batch = (size_t)num(a, v, 1, 1 << 20);
        else if (!strcmp(a, "--l1")) l1 = num(a, v, 0, 1e6);
        else if (!strcmp(a, "--lr")) lr = num(a, v, 1e-12, 1);
        else if (!strcmp(a, "--seed")) seed = (uint64_t)num(a, v, 0, 9e15);
        else if (!strcmp(a, "--features")) features = v;
        else { fprintf(stderr, "sae-train-resid: unknown option %s\n", a); return 2; }
    }
    if (!dir || !out) {
        fprintf(stderr, "usage: sae-train-resid [--arch relu|topk] [--latents N] [--k K] [--steps N]"
                        " [--batch N] [--l1 X] [--lr X] [--seed N] [--features OUT.tsv] DATA_DIR OUT.safetensors\n");
        return 2;
    }

    char path[4096];
    if (find_resid(dir, path, sizeof path) != 0) {
        fprintf(stderr, "sae-train-resid: no resid_*.npy in %s\n", dir);
        return 1;
    }
    sae_npy *npy;
    if (sae_npy_open(&npy, path) != SAE_OK)
        return fail("opening the activations");
    const size_t n_all = sae_npy_rows(npy), d_in = sae_npy_cols(npy);
    float *all = malloc(n_all * d_in * sizeof *all);
    if (!all || sae_npy_read(npy, 0, n_all, all) != SAE_OK)
        return fail("reading the activations");
    sae_npy_close(npy);
    size_t n_pos, n_tok;
    char p2[4096];
    snprintf(p2, sizeof p2, "%s/positions.npy", dir);
    int32_t *pos = read_npy_i32(p2, &n_pos);
    snprintf(p2, sizeof p2, "%s/tokens.npy", dir);
    int32_t *tok = read_npy_i32(p2, &n_tok);
    if (!pos || !tok)
        return 1;
    if (n_pos != n_all || n_tok != n_all) {
        fprintf(stderr, "sae-train-resid: %s has %zu rows but positions.npy %zu, tokens.npy %zu\n",
                path, n_all, n_pos, n_tok);
        return 1;
    }

    /* keep rows at position > 0, compacted in place, with their tokens */
    size_t n = 0;
    for (size_t r = 0; r < n_all; r++) {
        if (pos[r] == 0)
            continue;
        memmove(all + n * d_in, all + r * d_in, d_in * sizeof *all);
        tok[n++] = tok[r];
    }
    if (n == 0) {
        fprintf(stderr, "sae-train-resid: no rows past position 0\n");
        return 1;
    }

    /* a fixed shuffled order, from the seed (Fisher-Yates) */
    size_t *order = malloc(n * sizeof *order);
    float *x = malloc(batch * d_in * sizeof *x);
    if (!order || !x)
        return fail("out of memory");
    for (size_t i = 0; i < n; i++)
        order[i] = i;
    uint64_t rs = seed;
    for (size_t i = n - 1; i > 0; i--) {
        size_t j = (size_t)(splitmix(&rs) % (i + 1));
        size_t t = order[i]; order[i] = order[j]; order[j] = t;
    }

    sae_model *m;
    sae_trainer *t;
    if (sae_model_new(&m, arch, d_in, d_sae) != SAE_OK)
        return fail("model");
    if (arch == SAE_ARCH_TOPK && sae_model_set_param(m, SAE_PARAM_K, (double)k) != SAE_OK)
        return fail("k");
    if (sae_trainer_new(&t, m) != SAE_OK ||
        sae_trainer_set_param(t, SAE_TRAIN_TOTAL_STEPS, (double)steps) != SAE_OK ||
        sae_trainer_set_param(t, SAE_TRAIN_SEED, (double)seed) != SAE_OK ||
        (l1 >= 0 && sae_trainer_set_param(t, SAE_TRAIN_L1_COEFF, l1) != SAE_OK) ||
        (lr > 0 && sae_trainer_set_param(t, SAE_TRAIN_LR, lr) != SAE_OK))
        return fail("trainer");
    /* dead latents here means "silent for a tenth of the run", not OpenAI's 10M tokens */
    if (arch == SAE_ARCH_TOPK &&
        sae_trainer_set_param(t, SAE_TRAIN_DEAD_TOKENS, (double)(steps * batch / 10 + 1)) != SAE_OK)
        return fail("trainer");
    if (sae_trainer_init(t, all, n < 32768 ? n : 32768) != SAE_OK)
        return fail("init");

    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    size_t at = 0;
    for (size_t s = 0; s < steps; s++) {
        for (size_t b = 0; b < batch; b++) {
            memcpy(x + b * d_in, all + order[at] * d_in, d_in * sizeof *x);
            at = at + 1 == n ? 0 : at + 1;
        }
        if (sae_trainer_step(t, x, batch) != SAE_OK)
            return fail("step");
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double fvu = 0, l0 = 0, dead = 0;
    if (steps) {
        sae_trainer_get_metric(t, SAE_METRIC_FVU, &fvu);
        sae_trainer_get_metric(t, SAE_METRIC_L0, &l0);
        sae_trainer_get_metric(t, SAE_METRIC_DEAD_FRACTION, &dead);
    }
    sae_trainer_free(t);
    if (sae_model_save(m, out) != SAE_OK)
        return fail("save");

    /* the whole dataset through the finished model: FVU, L0 and per-feature statistics */
    sae_stats *st;
    const size_t kk = d_sae < 64 ? d_sae : 64;
    uint32_t *idx = malloc(n * kk * sizeof *idx), *cnt = malloc(n * sizeof *cnt);
    float *val = malloc(n * kk * sizeof *val);
    if (!idx || !cnt || !val || sae_stats_new(&st, d_sae, TOP_N) != SAE_OK)
        return fail("out of memory");
    const sae_eval_metric which[2] = {SAE_EVAL_FVU, SAE_EVAL_L0};
    double whole[2];
    if (sae_encode_sparse(m, all, n, kk, idx, val, cnt) != SAE_OK ||
        sae_stats_update_sparse(st, idx, val, cnt, kk, n, NULL) != SAE_OK ||
        sae_evaluate(m, all, n, which, 2, whole) != SAE_OK)
        return fail("encode");
    uint64_t *count = malloc(d_sae * sizeof *count);
    size_t alive = 0;
    if (!count || sae_stats_counts(st, count) != SAE_OK)
        return fail("stats");
    for (size_t i = 0; i < d_sae; i++)
        alive += count[i] > 0;
    printf("sae-train-resid: %s %zu x %zu on %zu rows of %s (position 0 dropped), %zu steps of %zu"
           " in %.1f s; last batch FVU %.3f L0 %.1f dead %.2f; whole data FVU %.4f, L0 %.2f, %zu of"
           " %zu features fire -> %s\n",
           sae_arch_name(arch), d_in, d_sae, n, path, steps, batch,
           (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec), fvu, l0,
           dead, whole[0], whole[1], alive, d_sae, out);

    if (features) {
        FILE *f = fopen(features, "w");
        if (!f) {
            fprintf(stderr, "sae-train-resid: %s: %s\n", features, strerror(errno));
            return 1;
        }
        float *mx = malloc(d_sae * sizeof *mx);
        if (!mx || sae_stats_max(st, mx) != SAE_OK)
            return fail("stats");
        fprintf(f, "# feature\tcount\tmax\ttop%d_token_ids (of %zu rows)\n", TOP_N, n);
        for (uint32_t i = 0; i < d_sae; i++) {
            float tv[TOP_N];
            uint64_t tid[TOP_N];
            size_t got;
            if (sae_stats_top(st, i, tv, tid, &got) != SAE_OK)
                return fail("stats");
            fprintf(f, "%u\t%llu\t%.6g\t", i, (unsigned long long)count[i], (double)mx[i]);
            for (size_t j = 0; j < got; j++)
                fprintf(f, "%s%d", j ? "," : "", tok[tid[j]]);
            fputc('\n', f);
        }
        free(mx);
        if (fclose(f) != 0) {
            fprintf(stderr, "sae-train-resid: writing %s failed\n", features);
            return 1;
        }
    }
    sae_stats_free(st);
    sae_model_free(m);
    free(count); free(idx); free(cnt); free(val);
    free(order); free(x); free(all); free(pos); free(tok);
    return 0;
}
