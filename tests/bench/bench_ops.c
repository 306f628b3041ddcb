/* libsae's side of docs/performance.md: every operation's time, the machine's bounds, time
 * against n and d_sae, and each operation's peak memory. tests/bench/run builds this and
 * tests/bench/perf.py drives it, times numpy and torch on the same data and writes the table.
 *
 *   bench_ops info                      BLAS name, version, configuration and threads; the
 *                                       bfloat16 product path (sae_model_bf16_path)
 *   bench_ops bounds DIR                SGEMM on the encode and decode shapes, memory read speed
 *   bench_ops time DIR OUT [n...]       every operation; writes outputs at n = 64 to OUT/ for the
 *                                       agreement check
 *   bench_ops kinds DIR OUT [n...]      the 0.2 kinds (transcoder, gated, GroupMax, LAYER_NORM),
 *                                       their encodes timed in turns with the ReLU SAE's
 *   bench_ops scale D_SAE [n...]        encode and sparse encode at one d_sae (random weights)
 *   bench_ops mem DIR OP ARCH N         the peak memory one call adds, in a fresh process
 *
 * DIR holds the model and tokens perf.py wrote as .npy files: W_enc [d_in][d_sae], W_dec, b_enc,
 * b_dec, threshold, x [>= 1024][d_in], and for the 0.2 kinds W_skip [d_in][d_in] (a transcoder's
 * skip connection; its W_dec and b_dec are the SAE's, d_out = d_in) and r_mag, b_mag (gated; b_enc
 * is the gate bias). Times are the best of several calls (see best_time);
 * output lines are "time OP ARCH N SECONDS", "bound NAME SECONDS BYTES_OR_FLOPS",
 * "mem OP ARCH N RSS_BEFORE_KB PEAK_RSS_DURING_KB". */
#define _GNU_SOURCE
#include <sae.h>

#include "bench_common.h"

#include <cblas.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

enum { K = 32, STEER_MANY = 16, TOP_N = 16, BATCH = 1024 };

static void die(const char *what)
{
    fprintf(stderr, "bench_ops: %s: %s\n", what, sae_last_error());
    exit(1);
}

#define CHECK(call)                                                                                \
    do {                                                                                           \
        if ((call) != SAE_OK)                                                                      \
            die(#call);                                                                            \
    } while (0)

/* Buffers of 4 MB or more are advised onto transparent huge pages, as numpy (1.22 on) advises
 * every array of that size, so that libsae's calls read and write memory of the same kind as the
 * numpy and torch peers' arrays: with 4 KB pages under the codes and x_hat of the dense decode
 * at n = 1024, the call took 4% more CPU time than with numpy's arrays (one thread, in turns). */
static void *xmalloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (p == NULL) {
        fprintf(stderr, "bench_ops: out of memory (%zu bytes)\n", bytes);
        exit(1);
    }
    if (bytes >= ((size_t)4 << 20)) {
        uintptr_t page = 4096, begin = ((uintptr_t)p + page - 1) & ~(page - 1);
        (void)madvise((void *)begin, (uintptr_t)p + bytes - begin, MADV_HUGEPAGE);
    }
    return p;
}

/* The best seconds per call: calls are repeated until at least 3 have run and 0.5 s has passed (at
 * most 200), and the fastest one is kept, the least disturbed by other processes. */
typedef int (*op_fn)(void *ctx);
static double best_time(op_fn fn, void *ctx)
{
    double best = 1e300, total = 0;
    int reps = 0;
    const int min_reps = 3;
    while (reps < 200 && (reps < min_reps || total < 0.5)) {
        double start = bench_now();
        if (fn(ctx) != SAE_OK)
            die("timed call");
        double t = bench_now() - start;
        total += t;
        reps++;
        if (t < best)
            best = t;
    }
    return best;
}

/* best_time for several calls at once, taking turns (one call of each per round, at least 5
 * rounds and 1 s per call on average, at most 200 rounds): on a shared machine the load then
 * weighs on each alike, so their ratios hold better than those of times taken one after another.
 * Each timed call follows an untimed one of the same operation, as the peers' repeated calls (and
 * best_time's) follow each other: the models' weights together exceed the last-level cache, so
 * without it a call would come right after another model's. (On the Xeon of docs/performance.md
 * this changed no row measurably: the one-token rows here stay some 25% above the first table's.) */
static void best_times_interleaved(op_fn const *fn, void *const *ctxs, size_t count, double *best)
{
    double total = 0;
    for (size_t i = 0; i < count; i++)
        best[i] = 1e300;
    for (int rounds = 0; rounds < 200 && (rounds < 5 || total < 1.0 * (double)count); rounds++)
        for (size_t i = 0; i < count; i++) {
            if (fn[i](ctxs[i]) != SAE_OK)
                die("warm-up call");
            double start = bench_now();
            if (fn[i](ctxs[i]) != SAE_OK)
                die("timed call");
            double t = bench_now() - start;
            total += t;
            if (t < best[i])
                best[i] = t;
        }
}

/* ---- data ------------------------------------------------------------------------------------ */

static float *read_npy(const char *dir, const char *name, size_t *rows, size_t *cols)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.npy", dir, name);
    sae_npy *a;
    CHECK(sae_npy_open(&a, path));
    *rows = sae_npy_rows(a);
    *cols = sae_npy_cols(a);
    float *v = xmalloc(*rows * *cols * sizeof(float));
    CHECK(sae_npy_read(a, 0, *rows, v));
    sae_npy_close(a);
    return v;
}

typedef struct {
    size_t d_in, d_sae, n_x;
    float *W_enc, *W_dec, *b_enc, *b_dec, *threshold, *x;
    float *W_skip, *r_mag, *b_mag; /* NULL when DIR lacks them (the 0.2 rows are then skipped) */
} data;

static float *read_npy_if(const char *dir, const char *name)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.npy", dir, name);
    if (access(path, R_OK) != 0)
        return NULL;
    size_t r, c;
    return read_npy(dir, name, &r, &c);
}

static void load_data(const char *dir, data *d)
{
    size_t r, c;
    d->W_enc = read_npy(dir, "W_enc", &d->d_in, &d->d_sae);
    d->W_dec = read_npy(dir, "W_dec", &r, &c);
    d->b_enc = read_npy(dir, "b_enc", &r, &c);
    d->b_dec = read_npy(dir, "b_dec", &r, &c);
    d->threshold = read_npy(dir, "threshold", &r, &c);
    d->x = read_npy(dir, "x", &d->n_x, &c);
    d->W_skip = read_npy_if(dir, "W_skip");
    d->r_mag = read_npy_if(dir, "r_mag");
    d->b_mag = read_npy_if(dir, "b_mag");
}

static const char *const arch_names[] = {NULL,       "relu",   "topk",    "batchtopk",
                                         "jumprelu", "gated", "groupmax"};

/* The benchmark's models: the same weights for every architecture; TopK and BatchTopK keep
 * K = 32, BatchTopK's threshold is JumpReLU's mean threshold; GroupMax has K = 32 groups of 512;
 * gated takes b_enc as its gate bias and r_mag, b_mag from DIR. */
static sae_model *make_model(const data *d, sae_arch arch)
{
    sae_model *m;
    CHECK(sae_model_new(&m, arch, d->d_in, d->d_sae));
    CHECK(sae_model_set_tensor(m, SAE_W_ENC, d->W_enc));
    CHECK(sae_model_set_tensor(m, SAE_W_DEC, d->W_dec));
    CHECK(sae_model_set_tensor(m, SAE_B_ENC, d->b_enc));
    CHECK(sae_model_set_tensor(m, SAE_B_DEC, d->b_dec));
    if (arch == SAE_ARCH_JUMPRELU)
        CHECK(sae_model_set_tensor(m, SAE_THRESHOLD, d->threshold));
    if (arch == SAE_ARCH_TOPK || arch == SAE_ARCH_BATCHTOPK || arch == SAE_ARCH_GROUPMAX)
        CHECK(sae_model_set_param(m, SAE_PARAM_K, K));
    if (arch == SAE_ARCH_GATED) {
        CHECK(sae_model_set_tensor(m, SAE_R_MAG, d->r_mag));
        CHECK(sae_model_set_tensor(m, SAE_B_MAG, d->b_mag));
    }
    if (arch == SAE_ARCH_BATCHTOPK) {
        double mean = 0;
        for (size_t i = 0; i < d->d_sae; i++)
            mean += d->threshold[i];
        CHECK(sae_model_set_param(m, SAE_PARAM_THRESHOLD, mean / (double)d->d_sae));
    }
    return m;
}

/* A ReLU transcoder of the SAE's size (d_out = d_in, Gemma-2-2B's MLP: 2304 -> 16384 -> 2304) on
 * the same W_enc, b_enc, W_dec, b_dec (b_dec is its output bias, not subtracted from x), with
 * W_skip when skip = 1. */
static sae_model *make_transcoder(const data *d, int skip)
{
    sae_model *m;
    CHECK(sae_model_new_transcoder(&m, SAE_ARCH_RELU, d->d_in, d->d_sae, d->d_in, skip));
    CHECK(sae_model_set_tensor(m, SAE_W_ENC, d->W_enc));
    CHECK(sae_model_set_tensor(m, SAE_W_DEC, d->W_dec));
    CHECK(sae_model_set_tensor(m, SAE_B_ENC, d->b_enc));
    CHECK(sae_model_set_tensor(m, SAE_B_DEC, d->b_dec));
    if (skip)
        CHECK(sae_model_set_tensor(m, SAE_W_SKIP, d->W_skip));
    return m;
}

/* ---- operations ------------------------------------------------------------------------------ */

typedef struct {
    sae_model *m;
    size_t n;
    const float *x;
    float *f, *x_hat, *val, *x_work;
    uint32_t *idx, *count;
    sae_steer *steer;
    sae_stats *stats;
    sae_trainer *trainer;
} ctx;

static int op_encode(void *p) { ctx *c = p; return sae_encode(c->m, c->x, c->n, c->f); }
static int op_encode_sparse(void *p)
{
    ctx *c = p;
    return sae_encode_sparse(c->m, c->x, c->n, K, c->idx, c->val, c->count);
}
static int op_decode(void *p) { ctx *c = p; return sae_decode(c->m, c->f, c->n, c->x_hat); }
static int op_decode_sparse(void *p)
{
    ctx *c = p;
    return sae_decode_sparse(c->m, c->idx, c->val, c->count, K, c->n, c->x_hat);
}
static int op_reconstruct(void *p) { ctx *c = p; return sae_reconstruct(c->m, c->x, c->n, c->x_hat); }
/* Repeated clamps of the same tokens stay bounded: each sets the features again. */
static int op_steer(void *p) { ctx *c = p; return sae_steer_apply(c->steer, c->x_work, c->n); }
static int op_stats(void *p) { ctx *c = p; return sae_stats_update(c->stats, c->f, c->n, NULL); }
static int op_stats_sparse(void *p)
{
    ctx *c = p;
    return sae_stats_update_sparse(c->stats, c->idx, c->val, c->count, K, c->n, NULL);
}
static int op_train(void *p) { ctx *c = p; return sae_trainer_step(c->trainer, c->x, c->n); }

/* The steered features: 1234 first, then 15 more spread over the dictionary. */
static uint32_t steer_feature(size_t j, size_t d_sae) { return (uint32_t)((1234 + 997 * j) % d_sae); }

static sae_steer *make_steer(const sae_model *m, size_t features)
{
    sae_steer *s;
    CHECK(sae_steer_new(&s, m));
    for (size_t j = 0; j < features; j++)
        CHECK(sae_steer_clamp(s, steer_feature(j, sae_model_d_sae(m)), 40.0f));
    return s;
}

static void write_out(const char *out, const char *name, const float *v, size_t rows, size_t cols)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.npy", out, name);
    CHECK(sae_npy_write(path, v, rows, cols));
}

/* BENCH_OPS_ONLY="encode steer1 ...": time only those operations (for working on one). */
static bool wanted(const char *op)
{
    const char *only = getenv("BENCH_OPS_ONLY");
    if (only == NULL || *only == '\0')
        return true;
    size_t len = strlen(op);
    for (const char *p = only; (p = strstr(p, op)) != NULL; p += len)
        if ((p == only || p[-1] == ' ') && (p[len] == ' ' || p[len] == '\0'))
            return true;
    return false;
}

static void print_time(const char *op, sae_arch arch, size_t n, double t)
{
    printf("time %s %s %zu %.9g\n", op, arch ? arch_names[arch] : "-", n, t);
    fflush(stdout);
}

/* Buffers for n tokens, and codes of the benchmark tokens from `codes` (dense f and sparse
 * idx/val/count), which decode and statistics read. */
static void prepare(ctx *c, sae_model *m, const data *d, size_t n, sae_model *codes)
{
    memset(c, 0, sizeof *c);
    c->m = m;
    c->n = n;
    c->x = d->x;
    c->f = xmalloc(n * d->d_sae * sizeof(float));
    c->x_hat = xmalloc(n * d->d_in * sizeof(float));
    c->x_work = xmalloc(n * d->d_in * sizeof(float));
    c->val = xmalloc(n * K * sizeof(float));
    c->idx = xmalloc(n * K * sizeof(uint32_t));
    c->count = xmalloc(n * sizeof(uint32_t));
    memcpy(c->x_work, d->x, n * d->d_in * sizeof(float));
    memset(c->x_hat, 0, n * d->d_in * sizeof(float));
    if (codes != NULL) {
        CHECK(sae_encode(codes, d->x, n, c->f));
        CHECK(sae_encode_sparse(codes, d->x, n, K, c->idx, c->val, c->count));
    } else {
        memset(c->f, 0, n * d->d_sae * sizeof(float));
    }
}

static void release(ctx *c)
{
    free(c->f);
    free(c->x_hat);
    free(c->x_work);
    free(c->val);
    free(c->idx);
    free(c->count);
}

/* Codes with about half the features nonzero, for dense decoding's GEMM path: |sin| of an index
 * hash, zero on odd hashes. */
static void half_dense_codes(float *f, size_t count)
{
    uint64_t s = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < count; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        f[i] = (s & 1) ? 0.0f : (float)(s >> 40) / (float)(1 << 24);
    }
}

static int cmd_time(const char *dir, const char *out, const size_t *ns, size_t n_ns)
{
    data d;
    load_data(dir, &d);
    sae_model *models[5] = {NULL};
    for (int a = SAE_ARCH_RELU; a <= SAE_ARCH_JUMPRELU; a++)
        models[a] = make_model(&d, (sae_arch)a);
    const sae_arch encode_archs[] = {SAE_ARCH_RELU, SAE_ARCH_JUMPRELU, SAE_ARCH_BATCHTOPK,
                                     SAE_ARCH_TOPK};
    const sae_arch two_archs[] = {SAE_ARCH_RELU, SAE_ARCH_TOPK};
    /* SAE_PARAM_BF16_WEIGHTS on copies: switching the float models back would keep the rounding. */
    sae_model *bf16[5] = {NULL};
    for (size_t a = 0; a < 2 && wanted("bf16"); a++) {
        bf16[two_archs[a]] = make_model(&d, two_archs[a]);
        CHECK(sae_model_set_param(bf16[two_archs[a]], SAE_PARAM_BF16_WEIGHTS, 1));
    }
    for (size_t in = 0; in < n_ns; in++) {
        const size_t n = ns[in];
        if (n > d.n_x) {
            fprintf(stderr, "bench_ops: only %zu tokens in x.npy\n", d.n_x);
            return 1;
        }
        ctx c;
        for (size_t a = 0; a < 4; a++) {
            prepare(&c, models[encode_archs[a]], &d, n, NULL);
            if (wanted("encode"))
                print_time("encode", encode_archs[a], n, best_time(op_encode, &c));
            if (n == 64) {
                char name[64];
                snprintf(name, sizeof name, "encode_%s", arch_names[encode_archs[a]]);
                write_out(out, name, c.f, n, d.d_sae);
            }
            release(&c);
        }
        for (size_t a = 0; a < 2; a++) {
            prepare(&c, models[two_archs[a]], &d, n, NULL);
            if (wanted("encode_sparse"))
                print_time("encode_sparse", two_archs[a], n, best_time(op_encode_sparse, &c));
            if (wanted("reconstruct"))
                print_time("reconstruct", two_archs[a], n, best_time(op_reconstruct, &c));
            if (n == 64) {
                char name[64];
                snprintf(name, sizeof name, "reconstruct_%s", arch_names[two_archs[a]]);
                write_out(out, name, c.x_hat, n, d.d_in);
            }
            release(&c);
        }
        /* Decoding the ReLU model's own (sparse) codes, and codes half nonzero. */
        prepare(&c, models[SAE_ARCH_RELU], &d, n, models[SAE_ARCH_RELU]);
        if (wanted("decode"))
            print_time("decode", SAE_ARCH_RELU, n, best_time(op_decode, &c));
        if (n == 64)
            write_out(out, "decode_relu", c.x_hat, n, d.d_in);
        CHECK(sae_stats_new(&c.stats, d.d_sae, TOP_N));
        if (wanted("stats"))
            print_time("stats", SAE_ARCH_RELU, n, best_time(op_stats, &c));
        sae_stats_free(c.stats);
        half_dense_codes(c.f, n * d.d_sae);
        if (wanted("decode_dense"))
            print_time("decode_dense", 0, n, best_time(op_decode, &c));
        release(&c);
        /* TopK codes, sparse. */
        prepare(&c, models[SAE_ARCH_TOPK], &d, n, models[SAE_ARCH_TOPK]);
        if (wanted("decode_sparse"))
            print_time("decode_sparse", SAE_ARCH_TOPK, n, best_time(op_decode_sparse, &c));
        if (n == 64) {
            write_out(out, "decode_sparse_topk", c.x_hat, n, d.d_in);
            float *fi = xmalloc(n * K * sizeof(float));
            for (size_t i = 0; i < n * K; i++)
                fi[i] = (float)c.idx[i];
            write_out(out, "sparse_idx_topk", fi, n, K);
            write_out(out, "sparse_val_topk", c.val, n, K);
            free(fi);
        }
        CHECK(sae_stats_new(&c.stats, d.d_sae, TOP_N));
        if (wanted("stats_sparse"))
            print_time("stats_sparse", SAE_ARCH_TOPK, n, best_time(op_stats_sparse, &c));
        sae_stats_free(c.stats);
        release(&c);
        /* Steering: one and 16 clamped features. */
        const sae_arch steer_archs[] = {SAE_ARCH_RELU, SAE_ARCH_JUMPRELU, SAE_ARCH_TOPK};
        for (size_t a = 0; a < 3; a++)
            for (size_t features = 1; features <= STEER_MANY; features += STEER_MANY - 1) {
                if (features == STEER_MANY && steer_archs[a] == SAE_ARCH_JUMPRELU)
                    continue; /* the same gathered path as ReLU */
                prepare(&c, models[steer_archs[a]], &d, n, NULL);
                c.steer = make_steer(c.m, features);
                if (n == 64) {
                    CHECK(sae_steer_apply(c.steer, c.x_work, n));
                    char name[64];
                    snprintf(name, sizeof name, "steer%zu_%s", features, arch_names[steer_archs[a]]);
                    write_out(out, name, c.x_work, n, d.d_in);
                    memcpy(c.x_work, d.x, n * d.d_in * sizeof(float));
                }
                if (wanted(features == 1 ? "steer1" : "steer16"))
                    print_time(features == 1 ? "steer1" : "steer16", steer_archs[a], n,
                               best_time(op_steer, &c));
                sae_steer_free(c.steer);
                release(&c);
            }
        /* bfloat16 weights: the single-token rows they are for, against the float32 peers. */
        if (bf16[SAE_ARCH_RELU] != NULL) {
            sae_model *relu = bf16[SAE_ARCH_RELU], *topk = bf16[SAE_ARCH_TOPK];
            prepare(&c, relu, &d, n, NULL);
            print_time("encode_bf16", SAE_ARCH_RELU, n, best_time(op_encode, &c));
            if (n == 64)
                write_out(out, "encode_bf16_relu", c.f, n, d.d_sae);
            release(&c);
            prepare(&c, topk, &d, n, models[SAE_ARCH_TOPK]); /* the float model's codes */
            print_time("decode_sparse_bf16", SAE_ARCH_TOPK, n, best_time(op_decode_sparse, &c));
            release(&c);
            prepare(&c, topk, &d, n, NULL);
            c.steer = make_steer(c.m, 1);
            if (n == 64) {
                CHECK(sae_steer_apply(c.steer, c.x_work, n));
                write_out(out, "steer1_bf16_topk", c.x_work, n, d.d_in);
                memcpy(c.x_work, d.x, n * d.d_in * sizeof(float));
            }
            print_time("steer1_bf16", SAE_ARCH_TOPK, n, best_time(op_steer, &c));
            sae_steer_free(c.steer);
            release(&c);
        }
        /* One training step on a model initialized from the first 1024 tokens. */
        const sae_arch train_archs[] = {SAE_ARCH_RELU, SAE_ARCH_TOPK};
        for (size_t a = 0; a < 2 && wanted("train"); a++) {
            sae_model *m;
            CHECK(sae_model_new(&m, train_archs[a], d.d_in, d.d_sae));
            if (train_archs[a] == SAE_ARCH_TOPK)
                CHECK(sae_model_set_param(m, SAE_PARAM_K, K));
            prepare(&c, m, &d, n, NULL);
            CHECK(sae_trainer_new(&c.trainer, m));
            CHECK(sae_trainer_set_param(c.trainer, SAE_TRAIN_B_DEC_INIT, 1)); /* the mean: fast */
            CHECK(sae_trainer_init(c.trainer, d.x, d.n_x < BATCH ? d.n_x : BATCH));
            print_time("train", train_archs[a], n, best_time(op_train, &c));
            sae_trainer_free(c.trainer);
            release(&c);
            sae_model_free(m);
        }
    }
    for (int a = SAE_ARCH_RELU; a <= SAE_ARCH_JUMPRELU; a++) {
        sae_model_free(models[a]);
        sae_model_free(bf16[a]);
    }
    return 0;
}

/* ---- the 0.2 kinds ------------------------------------------------------------------------------ */

/* Issue 14's rows, in a process of their own (six models of 302 MB): a transcoder without and
 * with its skip connection, gated and GroupMax SAEs and the ReLU SAE with LAYER_NORM inputs, each
 * encode timed in turns with the plain ReLU SAE's encode ("encode_ref"; lines "turns ..."), which
 * the goals compare them with, and then alone in repeated calls as the peers are timed (lines
 * "time ...": with six models' weights taking turns, little of any one stays in the last-level
 * cache between its calls, which repeated calls of one keep); then each transcoder's whole
 * prediction, and a one-feature clamp of the gated SAE. Outputs at n = 64 go to OUT for the
 * agreement check. */
static int cmd_kinds(const char *dir, const char *out, const size_t *ns, size_t n_ns)
{
    data d;
    load_data(dir, &d);
    if (d.W_skip == NULL || d.r_mag == NULL || d.b_mag == NULL) {
        fprintf(stderr, "bench_ops: %s lacks W_skip.npy, r_mag.npy or b_mag.npy\n", dir);
        return 1;
    }
    sae_model *ref = make_model(&d, SAE_ARCH_RELU), *tc = make_transcoder(&d, 0),
              *tc_skip = make_transcoder(&d, 1), *gated = make_model(&d, SAE_ARCH_GATED),
              *groupmax = make_model(&d, SAE_ARCH_GROUPMAX),
              *layer_norm = make_model(&d, SAE_ARCH_RELU);
    CHECK(sae_model_set_param(layer_norm, SAE_PARAM_NORMALIZE, SAE_NORMALIZE_LAYER_NORM));
    enum { ENCODES = 6, PREDICTIONS = 2 };
    const struct {
        const char *op;
        sae_model *m;
        sae_arch arch;
        const char *out; /* the output at n = 64, or NULL */
    } encodes[ENCODES] = {
        {"encode_ref", ref, SAE_ARCH_RELU, NULL},
        {"encode_transcoder", tc, SAE_ARCH_RELU, "encode_transcoder_relu"},
        {"encode_transcoder_skip", tc_skip, SAE_ARCH_RELU, NULL},
        {"encode", gated, SAE_ARCH_GATED, "encode_gated"},
        {"encode", groupmax, SAE_ARCH_GROUPMAX, "encode_groupmax"},
        {"encode_layernorm", layer_norm, SAE_ARCH_RELU, "encode_layernorm_relu"},
    }, predictions[PREDICTIONS] = {
        {"reconstruct_transcoder", tc, SAE_ARCH_RELU, "reconstruct_transcoder_relu"},
        {"reconstruct_transcoder_skip", tc_skip, SAE_ARCH_RELU, "reconstruct_transcoder_skip_relu"},
    };
    for (size_t in = 0; in < n_ns; in++) {
        const size_t n = ns[in];
        if (n > d.n_x) {
            fprintf(stderr, "bench_ops: only %zu tokens in x.npy\n", d.n_x);
            return 1;
        }
        ctx c[ENCODES];
        void *ctxs[ENCODES];
        op_fn fns[ENCODES];
        double best[ENCODES];
        for (size_t r = 0; r < ENCODES; r++) {
            prepare(&c[r], encodes[r].m, &d, n, NULL);
            ctxs[r] = &c[r];
            fns[r] = op_encode;
        }
        best_times_interleaved(fns, ctxs, ENCODES, best);
        for (size_t r = 0; r < ENCODES; r++) {
            printf("turns %s %s %zu %.9g\n", encodes[r].op, arch_names[encodes[r].arch], n,
                   best[r]);
            print_time(encodes[r].op, encodes[r].arch, n, best_time(op_encode, &c[r]));
            if (n == 64 && encodes[r].out != NULL)
                write_out(out, encodes[r].out, c[r].f, n, d.d_sae);
            release(&c[r]);
        }
        for (size_t r = 0; r < PREDICTIONS; r++) {
            prepare(&c[0], predictions[r].m, &d, n, NULL);
            print_time(predictions[r].op, predictions[r].arch, n, best_time(op_reconstruct, &c[0]));
            if (n == 64)
                write_out(out, predictions[r].out, c[0].x_hat, n, d.d_in);
            release(&c[0]);
        }
        prepare(&c[0], gated, &d, n, NULL);
        c[0].steer = make_steer(gated, 1);
        if (n == 64) {
            CHECK(sae_steer_apply(c[0].steer, c[0].x_work, n));
            write_out(out, "steer1_gated", c[0].x_work, n, d.d_in);
            memcpy(c[0].x_work, d.x, n * d.d_in * sizeof(float));
        }
        print_time("steer1", SAE_ARCH_GATED, n, best_time(op_steer, &c[0]));
        sae_steer_free(c[0].steer);
        release(&c[0]);
    }
    sae_model_free(ref);
    sae_model_free(tc);
    sae_model_free(tc_skip);
    sae_model_free(gated);
    sae_model_free(groupmax);
    sae_model_free(layer_norm);
    return 0;
}

/* ---- bounds ---------------------------------------------------------------------------------- */

typedef struct {
    const float *a, *b;
    float *c;
    int m, n, k;
} gemm_ctx;

static int op_sgemm(void *p)
{
    gemm_ctx *g = p;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, g->m, g->n, g->k, 1.0f, g->a, g->k,
                g->b, g->n, 0.0f, g->c, g->n);
    return SAE_OK;
}

static int op_sgemv(void *p)
{
    gemm_ctx *g = p;
    cblas_sgemv(CblasRowMajor, CblasTrans, g->k, g->n, 1.0f, g->b, g->n, g->a, 1, 0.0f, g->c, 1);
    return SAE_OK;
}

typedef struct {
    const void *buf;
    size_t bytes, threads;
    uint64_t sink;
} read_ctx;

static int op_read(void *p)
{
    read_ctx *r = p;
    r->sink ^= bench_read(r->buf, r->bytes, r->threads);
    return SAE_OK;
}

static int cmd_bounds(const char *dir)
{
    data d;
    load_data(dir, &d);
    float *c = xmalloc(BATCH * d.d_sae * sizeof(float));
    gemm_ctx enc = {d.x, d.W_enc, c, BATCH, (int)d.d_sae, (int)d.d_in};
    double t = best_time(op_sgemm, &enc);
    printf("bound sgemm_encode %.9g %.9g\n", t, 2.0 * BATCH * (double)d.d_in * (double)d.d_sae);
    fflush(stdout);
    half_dense_codes(c, BATCH * d.d_sae);
    float *x_hat = xmalloc(BATCH * d.d_in * sizeof(float));
    gemm_ctx dec = {c, d.W_dec, x_hat, BATCH, (int)d.d_in, (int)d.d_sae};
    t = best_time(op_sgemm, &dec);
    printf("bound sgemm_decode %.9g %.9g\n", t, 2.0 * BATCH * (double)d.d_in * (double)d.d_sae);
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    read_ctx r = {d.W_enc, d.d_in * d.d_sae * sizeof(float), cores < 1 ? 1 : cores > 64 ? 64 : (size_t)cores, 0};
    t = best_time(op_read, &r);
    printf("bound read %.9g %.9g\n", t, (double)r.bytes);
    read_ctx r1 = {d.W_enc, r.bytes, 1, 0};
    t = best_time(op_read, &r1);
    printf("bound read_1thread %.9g %.9g\n", t, (double)r.bytes);
    /* OpenBLAS streaming the same matrix (SGEMV, threaded): the bound takes the faster. */
    gemm_ctx gv = {d.x, d.W_enc, c, 1, (int)d.d_sae, (int)d.d_in};
    t = best_time(op_sgemv, &gv);
    printf("bound read_sgemv %.9g %.9g\n", t, (double)r.bytes);
    fprintf(stderr, "(checksum %llx)\n", (unsigned long long)(r.sink ^ r1.sink));
    free(c);
    free(x_hat);
    return 0;
}

/* ---- scaling with d_sae ------------------------------------------------------------------------ */

static void fill(float *v, size_t n, uint64_t seed, float lo, float hi)
{
    uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v[i] = lo + (hi - lo) * (float)(s >> 40) / (float)(1 << 24);
    }
}

static int cmd_scale(size_t d_sae, const size_t *ns, size_t n_ns)
{
    const size_t d_in = 2304;
    size_t n_max = 1;
    for (size_t i = 0; i < n_ns; i++)
        n_max = ns[i] > n_max ? ns[i] : n_max;
    data d = {d_in, d_sae, n_max, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    const float w = 1.7320508f / 48.0f; /* uniform with variance 1 / d_in */
    d.W_enc = xmalloc(d_in * d_sae * sizeof(float));
    d.W_dec = d.W_enc; /* only encoding is timed here */
    d.b_enc = xmalloc(d_sae * sizeof(float));
    d.b_dec = xmalloc(d_in * sizeof(float));
    d.threshold = xmalloc(d_sae * sizeof(float));
    d.x = xmalloc(n_max * d_in * sizeof(float));
    fill(d.W_enc, d_in * d_sae, 1, -w, w);
    fill(d.b_enc, d_sae, 2, -2.6f, -2.4f);
    fill(d.b_dec, d_in, 3, -0.1f, 0.1f);
    fill(d.threshold, d_sae, 4, 0.0f, 0.1f);
    fill(d.x, n_max * d_in, 5, -1.7320508f, 1.7320508f);
    sae_model *relu = make_model(&d, SAE_ARCH_RELU), *topk = make_model(&d, SAE_ARCH_TOPK);
    for (size_t i = 0; i < n_ns; i++) {
        ctx c;
        prepare(&c, relu, &d, ns[i], NULL);
        printf("time encode relu %zu %.9g %zu\n", ns[i], best_time(op_encode, &c), d_sae);
        c.m = topk;
        printf("time encode_sparse topk %zu %.9g %zu\n", ns[i], best_time(op_encode_sparse, &c),
               d_sae);
        fflush(stdout);
        release(&c);
    }
    sae_model_free(relu);
    sae_model_free(topk);
    return 0;
}

/* ---- peak memory ------------------------------------------------------------------------------ */

/* A line of /proc/self/status in kB ("VmRSS:", "VmHWM:"), or -1. */
static long status_kb(const char *key)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (f == NULL)
        return -1;
    char line[256];
    long kb = -1;
    size_t len = strlen(key);
    while (fgets(line, sizeof line, f))
        if (strncmp(line, key, len) == 0) {
            kb = strtol(line + len, NULL, 10);
            break;
        }
    fclose(f);
    return kb;
}

/* Resets the peak resident size (VmHWM) to the current one (Linux >= 4.0), so the peak of one call
 * can be read after it; false if the kernel refuses. */
static bool reset_peak(void)
{
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (f == NULL)
        return false;
    bool ok = fputs("5", f) >= 0;
    return fclose(f) == 0 && ok;
}

static int cmd_mem(const char *dir, const char *op, const char *arch_name, size_t n)
{
    data d;
    load_data(dir, &d);
    sae_arch arch;
    CHECK(sae_arch_from_name(arch_name, &arch));
    sae_model *m = NULL;
    ctx c;
    if (strcmp(op, "train") == 0) {
        CHECK(sae_model_new(&m, arch, d.d_in, d.d_sae));
        if (arch == SAE_ARCH_TOPK)
            CHECK(sae_model_set_param(m, SAE_PARAM_K, K));
        prepare(&c, m, &d, n, NULL);
    } else {
        m = make_model(&d, arch);
        prepare(&c, m, &d, n, m);
    }
    /* The weights as read from the files are no longer needed: the model holds its copy. */
    free(d.W_enc);
    free(d.W_dec);
    /* OpenBLAS allocates its buffers on first use: make that part of the baseline. */
    float one = 1.0f, out = 0.0f;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, 1, 1, 1, 1.0f, &one, 1, &one, 1, 0.0f,
                &out, 1);
    op_fn fn = NULL;
    if (strcmp(op, "encode") == 0)
        fn = op_encode;
    else if (strcmp(op, "encode_sparse") == 0)
        fn = op_encode_sparse;
    else if (strcmp(op, "decode") == 0)
        fn = op_decode;
    else if (strcmp(op, "decode_sparse") == 0)
        fn = op_decode_sparse;
    else if (strcmp(op, "reconstruct") == 0)
        fn = op_reconstruct;
    else if (strcmp(op, "steer1") == 0 || strcmp(op, "steer16") == 0) {
        c.steer = make_steer(m, op[5] == '1' && op[6] == '\0' ? 1 : STEER_MANY);
        fn = op_steer;
    } else if (strcmp(op, "stats") == 0 || strcmp(op, "stats_sparse") == 0) {
        CHECK(sae_stats_new(&c.stats, d.d_sae, TOP_N));
        fn = op[5] == '\0' ? op_stats : op_stats_sparse;
    } else if (strcmp(op, "train") == 0) {
        CHECK(sae_trainer_new(&c.trainer, m));
        CHECK(sae_trainer_set_param(c.trainer, SAE_TRAIN_B_DEC_INIT, 1));
        CHECK(sae_trainer_init(c.trainer, d.x, n));
        fn = op_train;
    } else {
        fprintf(stderr, "bench_ops: unknown operation %s\n", op);
        return 2;
    }
    long base = status_kb("VmRSS:");
    if (!reset_peak()) {
        fprintf(stderr, "bench_ops: cannot reset the peak RSS (/proc/self/clear_refs)\n");
        return 1;
    }
    CHECK(fn(&c));
    long peak = status_kb("VmHWM:");
    printf("mem %s %s %zu %ld %ld\n", op, arch_name, n, base, peak);
    return 0;
}

static int cmd_info(void)
{
#ifdef OPENBLAS_VERSION
    printf("blas %s\n", OPENBLAS_VERSION);
    printf("blas_config %s\n", openblas_get_config());
    printf("blas_core %s\n", openblas_get_corename());
    printf("blas_threads %d\n", openblas_get_num_threads());
    printf("blas_parallel %d\n", openblas_get_parallel());
#else
    printf("blas unknown CBLAS\n");
#endif
    printf("libsae %s\n", sae_version_string());
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    sae_model *m;
    CHECK(sae_model_new(&m, SAE_ARCH_RELU, 1, 1));
    double threads;
    CHECK(sae_model_get_param(m, SAE_PARAM_THREADS, &threads));
    printf("libsae_threads %g (0: all %ld cores)\n", threads, cores);
    CHECK(sae_model_set_param(m, SAE_PARAM_BF16_WEIGHTS, 1));
    printf("bf16_path %s\n", sae_bf16_path_name(sae_model_bf16_path(m)));
    sae_model_free(m);
    return 0;
}

static size_t parse_ns(int argc, char **argv, int first, size_t *ns)
{
    size_t count = 0;
    for (int i = first; i < argc && count < 16; i++)
        ns[count++] = strtoul(argv[i], NULL, 10);
    if (count == 0) {
        ns[0] = 1;
        ns[1] = 64;
        ns[2] = BATCH;
        count = 3;
    }
    return count;
}

int main(int argc, char **argv)
{
    size_t ns[16];
    if (argc >= 2 && strcmp(argv[1], "info") == 0)
        return cmd_info();
    if (argc == 3 && strcmp(argv[1], "bounds") == 0)
        return cmd_bounds(argv[2]);
    if (argc >= 4 && strcmp(argv[1], "time") == 0)
        return cmd_time(argv[2], argv[3], ns, parse_ns(argc, argv, 4, ns));
    if (argc >= 4 && strcmp(argv[1], "kinds") == 0)
        return cmd_kinds(argv[2], argv[3], ns, parse_ns(argc, argv, 4, ns));
    if (argc >= 3 && strcmp(argv[1], "scale") == 0)
        return cmd_scale(strtoul(argv[2], NULL, 10), ns, parse_ns(argc, argv, 3, ns));
    if (argc == 6 && strcmp(argv[1], "mem") == 0)
        return cmd_mem(argv[2], argv[3], argv[4], strtoul(argv[5], NULL, 10));
    fprintf(stderr, "usage: bench_ops info | bounds DIR | time DIR OUT [n...] | kinds DIR OUT [n...] "
                    "| scale D_SAE [n...] | mem DIR OP ARCH N\n");
    return 2;
}
