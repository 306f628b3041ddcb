/* Trains a sparse autoencoder (or, with --target, a transcoder) on activations stored in .npy
 * files, which may be larger than memory: they are streamed in chunks, the chunks visited in a shuffled order each epoch and the
 * rows shuffled within each chunk. Prints a progress line, checkpoints atomically every N steps,
 * resumes from a checkpoint exactly where it stopped (optimizer state and data position), and on
 * Ctrl-C finishes the step, writes a final checkpoint and exits.
 *
 *   train [options] OUT.safetensors ACTS.npy [ACTS.npy ...]
 *     --arch topk|batchtopk|relu|jumprelu|matryoshka   architecture (topk); matryoshka is a
 *                                  BatchTopK model trained with nested group losses
 *     --groups A,B,...             Matryoshka group sizes, summing to d_sae (d_sae/32, /16, /8,
 *                                  /4 and the rest)
 *     --l0 X --bandwidth X         JumpReLU's L0 coefficient and kernel width (libsae's defaults)
 *     --latents N                  d_sae (8 * d_in)
 *     --k K                        active latents per token, TopK and BatchTopK (32, at most
 *                                  d_in / 4: d_in latents span the input whatever they learnt)
 *     --batch N                    tokens per step (1024)
 *     --steps N                    steps to train (default: passes over the data up to 2048
 *                                  tokens per latent, at most 20 passes, at least one)
 *     --heldout N                  rows at the end of the last ACTS.npy kept out of training for
 *                                  the held-out metrics (a tenth of the rows, at most 8192; 0: none)
 *     --lr X --l1 X --auxk N --dead-tokens N --seed N   training parameters (libsae's defaults;
 *                                  --l1-coeff is --l1, --dead-tokens a tenth of the run's tokens
 *                                  up to 10M)
 *     --chunk N                    rows per shuffled chunk (262144)
 *     --init-tokens N              rows of the init sample (32768)
 *     --checkpoint PATH            (OUT.safetensors.ckpt)
 *     --every N                    checkpoint every N steps (1000; 0 = only at the end)
 *     --resume                     continue from the checkpoint
 *     --target Y.npy               a transcoder: the target rows of the ACTS.npy in the same
 *                                  place (one --target per ACTS.npy, in order, with its row count:
 *                                  e.g. an MLP's output for its input, sae-llama collect --mlp)
 *     --skip                       the transcoder has an affine skip W_skip
 *
 * The data order depends only on the seed, the files and --chunk, so a resumed run sees the same
 * batches as an uninterrupted one and ends with the same weights. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "sae.h"

/* ---- the shuffled stream of rows ----------------------------------------------------------- */

typedef struct {
    sae_npy **files;
    size_t n_files, cols, rows, chunk;
    size_t n_chunks;
    size_t *chunk_file, *chunk_first, *chunk_rows; /* chunk i: rows [first, first+rows) of file */
    size_t *order;                                  /* this epoch's chunk order */
    uint64_t seed, epoch;
    size_t at_chunk;  /* position in order */
    float *buf;       /* the current chunk, rows shuffled */
    size_t buf_rows, at_row;
} stream;

static uint64_t mix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void shuffle_indices(size_t *v, size_t n, uint64_t seed)
{
    for (size_t i = 0; i < n; i++)
        v[i] = i;
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)(mix(&seed) % i);
        size_t tmp = v[i - 1];
        v[i - 1] = v[j];
        v[j] = tmp;
    }
}

static void start_epoch(stream *s, uint64_t epoch)
{
    s->epoch = epoch;
    shuffle_indices(s->order, s->n_chunks, s->seed ^ (0x5eed0000ull + epoch * 0x9e3779b97f4a7c15ull));
    s->at_chunk = 0;
    s->buf_rows = s->at_row = 0;
}

/* Reads chunk order[at_chunk] and shuffles its rows. */
static int load_chunk(stream *s)
{
    size_t c = s->order[s->at_chunk], rows = s->chunk_rows[c];
    float *raw = malloc(rows * s->cols * sizeof(float));
    size_t *perm = malloc(rows * sizeof(size_t));
    if (raw == NULL || perm == NULL) {
        free(raw);
        free(perm);
        fprintf(stderr, "out of memory reading a chunk of %zu rows\n", rows);
        return -1;
    }
    if (sae_npy_read(s->files[s->chunk_file[c]], s->chunk_first[c], rows, raw) != SAE_OK) {
        fprintf(stderr, "reading activations: %s\n", sae_last_error());
        free(raw);
        free(perm);
        return -1;
    }
    shuffle_indices(perm, rows, s->seed ^ (s->epoch * 0x100000001b3ull) ^ ((uint64_t)c << 20));
    for (size_t r = 0; r < rows; r++)
        memcpy(s->buf + r * s->cols, raw + perm[r] * s->cols, s->cols * sizeof(float));
    free(raw);
    free(perm);
    s->buf_rows = rows;
    s->at_row = 0;
    return 0;
}

/* Copies the next n rows of the stream into dst, moving to the next chunk and epoch as needed. */
static int next_rows(stream *s, float *dst, size_t n)
{
    while (n > 0) {
        if (s->at_row == s->buf_rows) {
            if (s->buf_rows > 0 && ++s->at_chunk == s->n_chunks)
                start_epoch(s, s->epoch + 1);
            if (load_chunk(s) != 0)
                return -1;
        }
        size_t take = s->buf_rows - s->at_row < n ? s->buf_rows - s->at_row : n;
        memcpy(dst, s->buf + s->at_row * s->cols, take * s->cols * sizeof(float));
        dst += take * s->cols;
        s->at_row += take;
        n -= take;
    }
    return 0;
}

/* Positions the stream at row pos of the infinite sequence of epochs, reading only one chunk. */
static int seek_rows(stream *s, uint64_t pos)
{
    start_epoch(s, pos / s->rows);
    size_t off = (size_t)(pos % s->rows);
    while (off >= s->chunk_rows[s->order[s->at_chunk]]) {
        off -= s->chunk_rows[s->order[s->at_chunk]];
        s->at_chunk++;
    }
    if (load_chunk(s) != 0)
        return -1;
    s->at_row = off;
    return 0;
}

/* Streams the rows of the files but the last file's final `reserve` (the held-out slice). */
static int open_stream(stream *s, char **paths, size_t n_paths, size_t chunk, uint64_t seed,
                       size_t reserve)
{
    memset(s, 0, sizeof *s);
    s->files = calloc(n_paths, sizeof *s->files);
    s->n_files = n_paths;
    s->chunk = chunk;
    s->seed = seed;
    size_t max_chunks = 0;
    for (size_t i = 0; i < n_paths; i++) {
        if (sae_npy_open(&s->files[i], paths[i]) != SAE_OK) {
            fprintf(stderr, "%s\n", sae_last_error());
            return -1;
        }
        size_t cols = sae_npy_cols(s->files[i]), rows = sae_npy_rows(s->files[i]);
        if (i + 1 == n_paths)
            rows -= reserve < rows ? reserve : rows;
        if (i > 0 && cols != s->cols) {
            fprintf(stderr, "%s has %zu columns, %s has %zu\n", paths[i], cols, paths[0], s->cols);
            return -1;
        }
        s->cols = cols;
        s->rows += rows;
        max_chunks += (rows + chunk - 1) / chunk;
    }
    if (s->rows == 0) {
        fprintf(stderr, "the activation files have no rows\n");
        return -1;
    }
    s->chunk_file = malloc(max_chunks * sizeof(size_t));
    s->chunk_first = malloc(max_chunks * sizeof(size_t));
    s->chunk_rows = malloc(max_chunks * sizeof(size_t));
    s->order = malloc(max_chunks * sizeof(size_t));
    s->buf = malloc((chunk < s->rows ? chunk : s->rows) * s->cols * sizeof(float));
    if (!s->chunk_file || !s->chunk_first || !s->chunk_rows || !s->order || !s->buf) {
        fprintf(stderr, "out of memory\n");
        return -1;
    }
    for (size_t i = 0; i < n_paths; i++) {
        size_t rows = sae_npy_rows(s->files[i]);
        if (i + 1 == n_paths)
            rows -= reserve < rows ? reserve : rows;
        for (size_t first = 0; first < rows; first += chunk) {
            s->chunk_file[s->n_chunks] = i;
            s->chunk_first[s->n_chunks] = first;
            s->chunk_rows[s->n_chunks++] = rows - first < chunk ? rows - first : chunk;
        }
    }
    start_epoch(s, 0);
    return 0;
}

static void close_stream(stream *s)
{
    for (size_t i = 0; i < s->n_files; i++)
        sae_npy_close(s->files[i]);
    free(s->files);
    free(s->chunk_file);
    free(s->chunk_first);
    free(s->chunk_rows);
    free(s->order);
    free(s->buf);
}

/* Rows in all the files, and in the last one (which holds the held-out slice). */
static int count_rows(char **paths, size_t n_paths, size_t *total, size_t *last)
{
    *total = *last = 0;
    for (size_t i = 0; i < n_paths; i++) {
        sae_npy *f;
        if (sae_npy_open(&f, paths[i]) != SAE_OK) {
            fprintf(stderr, "%s\n", sae_last_error());
            return -1;
        }
        *last = sae_npy_rows(f);
        *total += *last;
        sae_npy_close(f);
    }
    return 0;
}

/* ---- the program --------------------------------------------------------------------------- */

/* The default run (docs/training.md, "Defaults for the run"), as python -m libsae train: passes
 * over the data until TOKENS_PER_LATENT * d_sae tokens, at most MAX_PASSES, at least one; the last
 * tenth of the rows, at most HELDOUT_MAX, held out. */
#define TOKENS_PER_LATENT 2048.0
#define MAX_PASSES 20.0
#define HELDOUT_MAX 8192

static volatile sig_atomic_t stop_requested = 0;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
    signal(SIGINT, SIG_DFL); /* a second Ctrl-C stops at once */
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void human(double v, char *out, size_t size)
{
    if (v >= 1e9)
        snprintf(out, size, "%.2fG", v / 1e9);
    else if (v >= 1e6)
        snprintf(out, size, "%.2fM", v / 1e6);
    else if (v >= 1e3)
        snprintf(out, size, "%.1fk", v / 1e3);
    else
        snprintf(out, size, "%.0f", v);
}

static void duration(double s, char *out, size_t size)
{
    if (!isfinite(s) || s < 0)
        snprintf(out, size, "?");
    else if (s >= 3600)
        snprintf(out, size, "%dh%02dm", (int)(s / 3600), (int)fmod(s / 60, 60));
    else if (s >= 60)
        snprintf(out, size, "%dm%02ds", (int)(s / 60), (int)fmod(s, 60));
    else
        snprintf(out, size, "%.0fs", s);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: train [--arch topk|batchtopk|relu|jumprelu|matryoshka] [--groups A,B,...]\n"
            "             [--latents N] [--k K] [--batch N] [--steps N] [--heldout N] [--lr X]\n"
            "             [--l1 X] [--l0 X] [--bandwidth X] [--auxk N] [--dead-tokens N]\n"
            "             [--seed N] [--chunk N]\n"
            "             [--init-tokens N] [--checkpoint PATH] [--every N] [--resume]\n"
            "             [--target Y.npy ... [--skip]] OUT.safetensors ACTS.npy [ACTS.npy ...]\n");
}

#define CHECK(call)                                                                                \
    do {                                                                                           \
        if ((call) != SAE_OK) {                                                                    \
            fprintf(stderr, "%s\n", sae_last_error());                                             \
            return 1;                                                                              \
        }                                                                                          \
    } while (0)

/* Matryoshka group sizes "A,B,..." into groups (at most cap); 0 on success. Empty text: the
 * doubling default d_sae/32, /16, /8, /4 and the rest, merged where d_sae is too small. */
static int parse_groups(const char *text, size_t d_sae, size_t *groups, size_t cap, size_t *n)
{
    *n = 0;
    if (text == NULL || *text == '\0') {
        size_t used = 0;
        for (size_t div = 32; div >= 4; div /= 2)
            if (d_sae / div > 0) {
                groups[(*n)++] = d_sae / div;
                used += d_sae / div;
            }
        groups[(*n)++] = d_sae - used;
        return 0;
    }
    const char *p = text;
    while (*p != '\0') {
        char *end;
        errno = 0;
        unsigned long long v = strtoull(p, &end, 10);
        if (end == p || errno != 0 || *p == '-' || *n == cap || (*end != ',' && *end != '\0'))
            return -1;
        groups[(*n)++] = (size_t)v;
        p = *end == ',' ? end + 1 : end;
    }
    return *n > 0 ? 0 : -1;
}

static int parse_size(const char *s, size_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (end == s || *end != '\0' || errno != 0 || s[0] == '-')
        return -1;
    *out = (size_t)v;
    return 0;
}

int main(int argc, char **argv)
{
    sae_arch arch = SAE_ARCH_TOPK;
    size_t latents = 0, k = 0, batch = 1024, steps = 0, chunk = 262144, init_tokens = 32768;
    size_t every = 1000, auxk = 0, dead_tokens = 0, seed = 0, heldout = SIZE_MAX;
    double lr = 0, l1 = -1, l0 = -1, bandwidth = 0;
    const char *ckpt = NULL, *groups_text = NULL;
    bool matryoshka = false;
    int resume = 0, skip = 0, i = 1;
    char **targets = calloc((size_t)argc, sizeof *targets);
    size_t n_targets = 0;
    if (targets == NULL)
        return 1;
    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
        const char *opt = argv[i];
        if (strcmp(opt, "--resume") == 0 || strcmp(opt, "--skip") == 0) {
            *(opt[2] == 'r' ? &resume : &skip) = 1;
            continue;
        }
        if (i + 1 >= argc) {
            usage();
            return 2;
        }
        const char *val = argv[++i];
        int bad = 0;
        if (strcmp(opt, "--arch") == 0 && strcmp(val, "matryoshka") == 0)
            arch = SAE_ARCH_BATCHTOPK, matryoshka = true;
        else if (strcmp(opt, "--arch") == 0)
            bad = sae_arch_from_name(val, &arch) != SAE_OK;
        else if (strcmp(opt, "--groups") == 0)
            groups_text = val;
        else if (strcmp(opt, "--l0") == 0 || strcmp(opt, "--l0-coeff") == 0)
            bad = !((l0 = atof(val)) >= 0);
        else if (strcmp(opt, "--bandwidth") == 0)
            bad = !((bandwidth = atof(val)) > 0);
        else if (strcmp(opt, "--latents") == 0)
            bad = parse_size(val, &latents);
        else if (strcmp(opt, "--k") == 0)
            bad = parse_size(val, &k) || k == 0;
        else if (strcmp(opt, "--batch") == 0)
            bad = parse_size(val, &batch) || batch == 0;
        else if (strcmp(opt, "--steps") == 0)
            bad = parse_size(val, &steps);
        else if (strcmp(opt, "--heldout") == 0)
            bad = parse_size(val, &heldout);
        else if (strcmp(opt, "--chunk") == 0)
            bad = parse_size(val, &chunk) || chunk == 0;
        else if (strcmp(opt, "--init-tokens") == 0)
            bad = parse_size(val, &init_tokens) || init_tokens == 0;
        else if (strcmp(opt, "--every") == 0)
            bad = parse_size(val, &every);
        else if (strcmp(opt, "--auxk") == 0)
            bad = parse_size(val, &auxk);
        else if (strcmp(opt, "--dead-tokens") == 0)
            bad = parse_size(val, &dead_tokens);
        else if (strcmp(opt, "--seed") == 0)
            bad = parse_size(val, &seed);
        else if (strcmp(opt, "--lr") == 0)
            bad = !((lr = atof(val)) > 0);
        else if (strcmp(opt, "--l1") == 0 || strcmp(opt, "--l1-coeff") == 0)
            bad = !((l1 = atof(val)) >= 0);
        else if (strcmp(opt, "--checkpoint") == 0)
            ckpt = val;
        else if (strcmp(opt, "--target") == 0)
            targets[n_targets++] = (char *)val;
        else
            bad = 1;
        if (bad) {
            fprintf(stderr, "bad option %s %s\n", opt, val);
            usage();
            return 2;
        }
    }
    if (argc - i < 2) {
        usage();
        return 2;
    }
    const char *out = argv[i];
    char default_ckpt[4096];
    if (ckpt == NULL) {
        snprintf(default_ckpt, sizeof default_ckpt, "%s.ckpt", out);
        ckpt = default_ckpt;
    }

    stream s, ys;
    const size_t n_files = (size_t)(argc - i - 1);
    size_t total_rows, last_rows;
    if (count_rows(argv + i + 1, n_files, &total_rows, &last_rows) != 0)
        return 1;
    if (heldout == SIZE_MAX) {
        heldout = total_rows / 10 < HELDOUT_MAX ? total_rows / 10 : HELDOUT_MAX;
        if (heldout > last_rows || total_rows - heldout < batch)
            heldout = 0;
    } else if (heldout >= last_rows) {
        fprintf(stderr, "--heldout %zu: the last file has only %zu rows\n", heldout, last_rows);
        return 2;
    }
    if (open_stream(&s, argv + i + 1, n_files, chunk, seed, heldout) != 0)
        return 1;
    const bool tc = n_targets > 0;
    if (skip && !tc) {
        fprintf(stderr, "--skip is for a transcoder: give its targets with --target\n");
        return 2;
    }
    /* The targets' stream has the same chunks and seed, so it yields the matching rows. */
    if (tc && n_targets != n_files) {
        fprintf(stderr, "%zu --target files for %zu activation files\n", n_targets, n_files);
        return 2;
    }
    if (tc && open_stream(&ys, targets, n_targets, chunk, seed, heldout) != 0)
        return 1;
    for (size_t f = 0; tc && f < n_files; f++)
        if (sae_npy_rows(ys.files[f]) != sae_npy_rows(s.files[f]) ||
            sae_npy_cols(ys.files[f]) != ys.cols) {
            fprintf(stderr, "%s has %zu rows, %s has %zu\n", targets[f],
                    sae_npy_rows(ys.files[f]), argv[(size_t)i + 1 + f], sae_npy_rows(s.files[f]));
            return 1;
        }
    const size_t d_in = s.cols, d_out = tc ? ys.cols : s.cols;
    if (latents == 0)
        latents = 8 * d_in;
    if (k == 0) /* OpenAI's 32 (d_in 768), at most d_in / 4 */
        k = d_in / 4 < 32 ? (d_in / 4 > 0 ? d_in / 4 : 1) : 32;
    double passes = TOKENS_PER_LATENT * (double)latents / (double)s.rows;
    passes = passes < 1.0 ? 1.0 : passes > MAX_PASSES ? MAX_PASSES : passes;
    const bool planned = steps == 0;
    if (planned)
        steps = (size_t)ceil(passes * (double)s.rows / (double)batch);
    if (dead_tokens == 0) { /* a latent silent for a tenth of the run is dead (OpenAI: 10M) */
        double tenth = floor((double)steps * (double)batch / 10.0);
        dead_tokens = tenth < 1.0 ? 1 : tenth > 1e7 ? 10000000 : (size_t)tenth;
    }

    sae_model *m;
    sae_trainer *t;
    if (tc)
        CHECK(sae_model_new_transcoder(&m, arch, d_in, latents, d_out, skip));
    else
        CHECK(sae_model_new(&m, arch, d_in, latents));
    if (arch == SAE_ARCH_TOPK || arch == SAE_ARCH_BATCHTOPK)
        CHECK(sae_model_set_param(m, SAE_PARAM_K, (double)k));
    CHECK(sae_trainer_new(&t, m));
    if (groups_text != NULL && !matryoshka) {
        fprintf(stderr, "--groups is for --arch matryoshka\n");
        return 2;
    }
    if (matryoshka) {
        size_t groups[64], n_groups;
        if (parse_groups(groups_text, latents, groups, 64, &n_groups) != 0) {
            fprintf(stderr, "bad --groups %s (at most 64 sizes, summing to %zu)\n", groups_text,
                    latents);
            return 2;
        }
        CHECK(sae_trainer_set_groups(t, groups, n_groups));
    }
    if (l0 >= 0)
        CHECK(sae_trainer_set_param(t, SAE_TRAIN_L0_COEFF, l0));
    if (bandwidth > 0)
        CHECK(sae_trainer_set_param(t, SAE_TRAIN_JUMPRELU_BANDWIDTH, bandwidth));
    CHECK(sae_trainer_set_param(t, SAE_TRAIN_TOTAL_STEPS, (double)steps));
    CHECK(sae_trainer_set_param(t, SAE_TRAIN_SEED, (double)seed));
    if (lr > 0)
        CHECK(sae_trainer_set_param(t, SAE_TRAIN_LR, lr));
    if (l1 >= 0)
        CHECK(sae_trainer_set_param(t, SAE_TRAIN_L1_COEFF, l1));
    if (auxk > 0)
        CHECK(sae_trainer_set_param(t, SAE_TRAIN_AUXK, (double)auxk));
    CHECK(sae_trainer_set_param(t, SAE_TRAIN_DEAD_TOKENS, (double)dead_tokens));

    size_t most = batch > init_tokens ? batch : init_tokens;
    most = most > heldout ? most : heldout;
    float *x = malloc(most * d_in * sizeof(float));
    float *y = tc ? malloc(most * d_out * sizeof(float)) : NULL;
    if (x == NULL || (tc && y == NULL)) {
        fprintf(stderr, "out of memory for a batch of %zu rows\n", batch);
        return 1;
    }
    double done;
    struct stat sb;
    if (resume && stat(ckpt, &sb) == 0) {
        CHECK(sae_trainer_load(t, ckpt));
        CHECK(sae_trainer_set_param(t, SAE_TRAIN_TOTAL_STEPS, (double)steps));
        CHECK(sae_trainer_get_metric(t, SAE_METRIC_STEPS, &done));
        fprintf(stderr, "resuming %s at step %.0f\n", ckpt, done);
    } else {
        if (resume)
            fprintf(stderr, "no checkpoint at %s: starting afresh\n", ckpt);
        size_t n = init_tokens < s.rows ? init_tokens : s.rows;
        if (next_rows(&s, x, n) != 0 || (tc && next_rows(&ys, y, n) != 0))
            return 1;
        CHECK(tc ? sae_trainer_init_to(t, x, y, n) : sae_trainer_init(t, x, n));
        done = 0;
    }
    if (heldout > 0) { /* the last file's final rows, which the streams leave out */
        const size_t first = last_rows - heldout;
        if (sae_npy_read(s.files[n_files - 1], first, heldout, x) != SAE_OK ||
            (tc && sae_npy_read(ys.files[n_files - 1], first, heldout, y) != SAE_OK)) {
            fprintf(stderr, "reading the held-out rows: %s\n", sae_last_error());
            return 1;
        }
        CHECK(sae_trainer_set_heldout(t, x, tc ? y : NULL, heldout));
    }
    /* The stream position follows from the step count alone. */
    if (seek_rows(&s, (uint64_t)done * batch) != 0 ||
        (tc && seek_rows(&ys, (uint64_t)done * batch) != 0))
        return 1;

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    const double run_passes = (double)steps * (double)batch / (double)s.rows;
    if (tc)
        fprintf(stderr, "%s %s %zu -> %zu -> %zu on %zu pairs (%zu files), ",
                sae_arch_name(arch), skip ? "skip transcoder" : "transcoder", d_in, latents,
                d_out, s.rows, s.n_files);
    else
        fprintf(stderr, "%s SAE %zu -> %zu on %zu rows (%zu files), ", matryoshka ? "matryoshka" : sae_arch_name(arch),
                d_in, latents, s.rows, s.n_files);
    fprintf(stderr, "%zu steps of %zu = %.3g passes (%s); ", steps, batch, run_passes,
            planned ? "default: up to 2048 tokens per latent, at most 20 passes" : "--steps");
    if (heldout > 0)
        fprintf(stderr, "held out: the last %zu rows of %s\n", heldout, argv[argc - 1]);
    else
        fprintf(stderr, "nothing held out\n");
    const double start = now();
    double last_print = 0;
    size_t step = (size_t)done, first_step = step;
    int rc = 0;
    unsigned warned = 0;
    while (step < steps && !stop_requested) {
        if (next_rows(&s, x, batch) != 0 || (tc && next_rows(&ys, y, batch) != 0)) {
            rc = 1;
            break;
        }
        if ((tc ? sae_trainer_step_to(t, x, y, batch) : sae_trainer_step(t, x, batch)) != SAE_OK) {
            fprintf(stderr, "step %zu: %s\n", step, sae_last_error());
            rc = 1;
            break;
        }
        step++;
        double bits;
        sae_trainer_get_metric(t, SAE_METRIC_WARNINGS, &bits);
        if ((unsigned)bits & ~warned) { /* each warning once, when it first holds */
            warned |= (unsigned)bits;
            fprintf(stderr, "warning at step %zu: %s\n", step, sae_trainer_warning(t));
        }
        double elapsed = now() - start;
        if (elapsed - last_print >= 1.0 || step == steps) {
            last_print = elapsed;
            double loss, fvu, l0, dead, held;
            sae_trainer_get_metric(t, SAE_METRIC_HELDOUT_FVU, &held);
            sae_trainer_get_metric(t, SAE_METRIC_LOSS, &loss);
            sae_trainer_get_metric(t, SAE_METRIC_FVU, &fvu);
            sae_trainer_get_metric(t, SAE_METRIC_L0, &l0);
            sae_trainer_get_metric(t, SAE_METRIC_DEAD_FRACTION, &dead);
            double rate = (double)((step - first_step) * batch) / elapsed;
            char tok[16], tps[16], left[16];
            human((double)step * (double)batch, tok, sizeof tok);
            human(rate, tps, sizeof tps);
            duration((double)((steps - step) * batch) / rate, left, sizeof left);
            char held_s[32] = "";
            if (!isnan(held))
                snprintf(held_s, sizeof held_s, " (held-out %.4f)", held);
            fprintf(stderr,
                    "step %zu/%zu  pass %.1f/%.3g  tokens %s  %s tok/s  loss %.4f  fvu %.4f%s  "
                    "l0 %.1f  dead %.1f%%  left %s\n",
                    step, steps, (double)step * (double)batch / (double)s.rows, run_passes, tok,
                    tps, loss, fvu, held_s, l0, 100 * dead, left);
        }
        if (every > 0 && step % every == 0 && step < steps) {
            if (sae_trainer_save(t, ckpt) != SAE_OK) {
                fprintf(stderr, "checkpoint: %s\n", sae_last_error());
                rc = 1;
                break;
            }
        }
    }
    /* Final checkpoint (also after Ctrl-C or an error, so nothing trained is lost), and the model. */
    if (sae_trainer_save(t, ckpt) != SAE_OK) {
        fprintf(stderr, "checkpoint: %s\n", sae_last_error());
        rc = 1;
    }
    if (stop_requested) {
        fprintf(stderr, "stopped at step %zu; checkpoint %s (continue with --resume)\n", step, ckpt);
    } else if (rc == 0) {
        if (sae_model_save(m, out) != SAE_OK) {
            fprintf(stderr, "saving %s: %s\n", out, sae_last_error());
            rc = 1;
        } else {
            fprintf(stderr, "wrote %s\n", out);
        }
        const char *warning = sae_trainer_warning(t);
        if (warning != NULL)
            fprintf(stderr, "warning: %s\n", warning);
    }
    free(x);
    free(y);
    free(targets);
    sae_trainer_free(t);
    sae_model_free(m);
    close_stream(&s);
    if (tc)
        close_stream(&ys);
    return rc == 0 && stop_requested ? 130 : rc; /* 128 + SIGINT, as a shell reports it */
}
