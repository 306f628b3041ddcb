/* Codes back to activations: dense codes by one GEMM, or, when they are sparse (as SAE codes
 * are), by adding only the rows of W_dec in use; sparse codes likewise; and the round trip.
 * Token loops run across the model's threads, one token per thread. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

/* Values scanned at once for nonzeros: a fixed count the compiler vectorizes. */
#define SCREEN 16

static void unscale(const sae_model *m, float *x_hat, size_t n)
{
    if (sae__output_scale(m) != 1.0f)
        sae__sscal(n * m->d_out, 1.0f / sae__output_scale(m), x_hat);
}

void sae__decode_token(const sae_model *m, const uint32_t *idx, const float *val, size_t count,
                       float *x_hat)
{
    memcpy(x_hat, m->b_dec, m->d_out * sizeof(float));
    sae__dec_rows_add(m, idx, val, count, x_hat);
    unscale(m, x_hat, 1);
}

/* One token of dense codes, adding the rows of its nonzero codes in index order. */
static void decode_row_sparse(const sae_model *m, const float *f, float *x_hat)
{
    const size_t d_sae = m->d_sae, d_out = m->d_out;
    memcpy(x_hat, m->b_dec, d_out * sizeof(float));
    for (size_t i = 0; i < d_sae;) {
        size_t end = i + SCREEN <= d_sae ? i + SCREEN : d_sae;
        if (end - i == SCREEN) {
            int any = 0;
            for (size_t j = 0; j < SCREEN; j++)
                any |= f[i + j] != 0.0f;
            if (!any) {
                i = end;
                continue;
            }
        }
        for (; i < end; i++)
            if (f[i] != 0.0f)
                sae__dec_row_axpy(m, i, 0, d_out, f[i], x_hat);
    }
    unscale(m, x_hat, 1);
}

typedef struct {
    const sae_model *m;
    const float *f;
    float *x_hat;
    size_t *nonzeros;   /* per worker */
    uint32_t *bad;      /* per worker: a NaN or infinity seen, or NULL not to look */
    uint32_t *count;    /* per token, or NULL */
    uint32_t *idx;      /* extracted pairs, stride per token */
    float *val;
    size_t stride;
} dense_job;

static size_t count_row(const float *f, size_t len)
{
    size_t nonzeros = 0, i = 0;
    for (; i + SCREEN <= len; i += SCREEN) {
        unsigned block = 0;
        for (size_t j = 0; j < SCREEN; j++)
            block += f[i + j] != 0.0f;
        nonzeros += block;
    }
    for (; i < len; i++)
        nonzeros += f[i] != 0.0f;
    return nonzeros;
}

/* count_row, and whether any value is a NaN or an infinity (all exponent bits set), in the same
 * read of the row. */
static size_t count_row_checked(const float *f, size_t len, uint32_t *bad)
{
    size_t nonzeros = 0, i = 0;
    uint32_t seen = 0;
    for (; i + SCREEN <= len; i += SCREEN) {
        unsigned block = 0;
        for (size_t j = 0; j < SCREEN; j++) {
            uint32_t bits;
            memcpy(&bits, f + i + j, sizeof bits);
            block += f[i + j] != 0.0f;
            seen |= (bits & 0x7f800000u) == 0x7f800000u;
        }
        nonzeros += block;
    }
    for (; i < len; i++) {
        uint32_t bits;
        memcpy(&bits, f + i, sizeof bits);
        nonzeros += f[i] != 0.0f;
        seen |= (bits & 0x7f800000u) == 0x7f800000u;
    }
    *bad |= seen;
    return nonzeros;
}

static void count_range(void *arg, size_t begin, size_t end, size_t worker)
{
    const dense_job *job = arg;
    const size_t d_sae = job->m->d_sae;
    size_t nonzeros = 0;
    uint32_t bad = 0;
    for (size_t t = begin; t < end; t++) {
        size_t c = job->bad ? count_row_checked(job->f + t * d_sae, d_sae, &bad)
                            : count_row(job->f + t * d_sae, d_sae);
        if (job->count)
            job->count[t] = (uint32_t)c;
        nonzeros += c;
    }
    job->nonzeros[worker] = nonzeros;
    if (job->bad)
        job->bad[worker] = bad;
}

static void sparse_rows_range(void *arg, size_t begin, size_t end, size_t worker)
{
    (void)worker;
    const dense_job *job = arg;
    for (size_t t = begin; t < end; t++)
        decode_row_sparse(job->m, job->f + t * job->m->d_sae, job->x_hat + t * job->m->d_out);
}

static void extract_range(void *arg, size_t begin, size_t end, size_t worker)
{
    (void)worker;
    const dense_job *job = arg;
    const size_t d_sae = job->m->d_sae;
    for (size_t t = begin; t < end; t++) {
        const float *f = job->f + t * d_sae;
        uint32_t *idx = job->idx + t * job->stride;
        float *val = job->val + t * job->stride;
        for (size_t i = 0, j = 0; i < d_sae; i++)
            if (f[i] != 0.0f) {
                idx[j] = (uint32_t)i;
                val[j++] = f[i];
            }
    }
}

static void decode_pairs(const sae_model *m, const uint32_t *idx, const float *val,
                         const uint32_t *count, size_t stride, size_t n, float *x_hat);

/* what: the name to refuse f by if it holds a NaN or an infinity, or NULL when f is known finite.
 * The check rides on the count of nonzeros, which reads f anyway: a separate pass over f (64 MB
 * at 1024 tokens of 16384 codes) cost some 2% of the dense decode's time. */
static int decode_dense(const sae_model *m, const float *f, size_t n, float *x_hat,
                        const char *what)
{
    const size_t d_out = m->d_out, d_sae = m->d_sae;
    const size_t threads = n > 1 ? sae__model_threads(m) : 1;
    size_t nonzeros[64] = {0};
    uint32_t bad[64] = {0};
    /* Per-token counts let many sparse tokens share rows of W_dec (decode_pairs); without the
     * memory they decode token by token. Plain malloc: its failure is no error. */
    dense_job job = {m,    f,    x_hat, nonzeros, what ? bad : NULL,
                     n > 1 ? malloc(n * sizeof(uint32_t)) : NULL, NULL, NULL, 0};
    sae__parallel_for(threads, n, sae__grain(d_sae), count_range, &job);
    size_t total = 0;
    uint32_t any_bad = 0;
    for (size_t w = 0; w < 64; w++) {
        total += nonzeros[w];
        any_bad |= bad[w];
    }
    if (any_bad) { /* the check again, for its message naming the first bad value */
        free(job.count);
        int rc = sae__check_finite(f, n * d_sae, d_sae, what);
        return rc != SAE_OK ? rc : sae__fail(SAE_EINVAL, "%s: values must be finite", what);
    }
    /* Adding a row of W_dec per nonzero moves d_out floats from memory for 2 d_out flops, where the
     * GEMM does 2 d_out flops per code at compute speed, some 16 times faster once n is large;
     * for a few tokens the GEMM is bound by reading W_dec whole instead. */
    if (total <= n * d_sae / 16 || total <= d_sae / 2) {
        if (job.count != NULL && total >= d_sae) {
            for (size_t t = 0; t < n; t++)
                job.stride = job.count[t] > job.stride ? job.count[t] : job.stride;
            size_t slots = n * job.stride; /* <= total * n / ... fits: at most n * d_sae */
            job.idx = malloc(slots * sizeof(uint32_t));
            job.val = malloc(slots * sizeof(float));
        }
        if (job.idx != NULL && job.val != NULL) {
            sae__parallel_for(threads, n, sae__grain(d_sae), extract_range, &job);
            decode_pairs(m, job.idx, job.val, job.count, job.stride, n, x_hat);
        } else {
            sae__parallel_for(threads, n, sae__grain(total / n * d_out + d_sae), sparse_rows_range,
                              &job);
        }
        free(job.count);
        free(job.idx);
        free(job.val);
        return SAE_OK;
    }
    free(job.count);
    for (size_t t = 0; t < n; t++)
        memcpy(x_hat + t * d_out, m->b_dec, d_out * sizeof(float));
    int rc = sae__weights_product(m, SAE_W_DEC, f, n, x_hat, 1.0f);
    unscale(m, x_hat, n);
    return rc;
}

int sae__decode_dense(const sae_model *m, const float *f, size_t n, float *x_hat)
{
    return decode_dense(m, f, n, x_hat, NULL);
}

static int check_sizes(const sae_model *m, size_t n, size_t width)
{
    size_t widest = sae__model_width(m);
    return sae__check_tokens(n, width > widest ? width : widest, "sae_decode");
}

int sae_decode(const sae_model *m, const float *f, size_t n, float *x_hat)
{
    SAE_CHECK_NULL(m);
    if (n == 0)
        return SAE_OK;
    SAE_CHECK_NULL(f);
    SAE_CHECK_NULL(x_hat);
    int rc = check_sizes(m, n, m->d_sae);
    if (rc != SAE_OK)
        return rc;
    return decode_dense(m, f, n, x_hat, "f");
}

/* ---- the sparse engine: token pairs (feature, value) to rows ---------------------------------- */

/* Token t's pairs are idx/val[t * stride .. + count[t]]. */
typedef struct {
    const sae_model *m;
    const uint32_t *idx, *count;
    const float *val;
    size_t stride, n;
    float *x_hat;
    const uint32_t *start; /* feature-major: [d_sae + 1] offsets into tok/tval */
    const uint32_t *tok;
    const float *tval;
} pairs_job;

static void token_major_range(void *arg, size_t begin, size_t end, size_t worker)
{
    (void)worker;
    const pairs_job *job = arg;
    const size_t stride = job->stride, d_out = job->m->d_out;
    for (size_t t = begin; t < end; t++)
        sae__decode_token(job->m, job->idx + t * stride, job->val + t * stride, job->count[t],
                          job->x_hat + t * d_out);
}

/* Columns [16 begin, 16 end) of every token: each feature's row slice is read once and added to
 * every token using the feature, while the tokens' slices stay in cache. */
static void feature_major_range(void *arg, size_t begin, size_t end, size_t worker)
{
    (void)worker;
    const pairs_job *job = arg;
    const sae_model *m = job->m;
    const size_t d_out = m->d_out, c0 = begin * SCREEN, c1 = end * SCREEN < d_out ? end * SCREEN : d_out;
    const size_t width = c1 - c0;
    for (size_t t = 0; t < job->n; t++)
        memcpy(job->x_hat + t * d_out + c0, m->b_dec + c0, (c1 - c0) * sizeof(float));
    for (size_t f = 0; f < m->d_sae; f++)
        for (uint32_t e = job->start[f]; e < job->start[f + 1]; e++)
            sae__dec_row_axpy(m, f, c0, width, job->tval[e],
                              job->x_hat + (size_t)job->tok[e] * d_out + c0);
    if (sae__output_scale(m) != 1.0f)
        for (size_t t = 0; t < job->n; t++)
            sae__sscal(width, 1.0f / sae__output_scale(m), job->x_hat + t * d_out + c0);
}

/* Sorts the pairs by feature (a counting sort: stable, so a token's repeated feature keeps its
 * slot order) and runs the columns across threads. False when the scratch cannot be had. */
static bool feature_major(pairs_job *job, size_t pairs, size_t threads)
{
    const size_t d_sae = job->m->d_sae;
    /* Plain malloc: failing here is no error (the token-major path needs no scratch), and must
     * not leave a message behind a successful call. */
    uint32_t *start = calloc(d_sae + 1, sizeof *start);
    uint32_t *tok = malloc(pairs * sizeof *tok);
    float *tval = malloc(pairs * sizeof *tval);
    bool ok = start != NULL && tok != NULL && tval != NULL;
    if (ok) {
        for (size_t t = 0; t < job->n; t++)
            for (size_t j = 0; j < job->count[t]; j++)
                start[job->idx[t * job->stride + j] + 1]++;
        for (size_t f = 0; f < d_sae; f++)
            start[f + 1] += start[f];
        for (size_t t = 0; t < job->n; t++)
            for (size_t j = 0; j < job->count[t]; j++) {
                uint32_t at = start[job->idx[t * job->stride + j]]++;
                tok[at] = (uint32_t)t;
                tval[at] = job->val[t * job->stride + j];
            }
        /* Each feature's start moved to the next one's: shift back. */
        memmove(start + 1, start, d_sae * sizeof *start);
        start[0] = 0;
        job->start = start;
        job->tok = tok;
        job->tval = tval;
        const size_t groups = (job->m->d_out + SCREEN - 1) / SCREEN;
        sae__parallel_for(threads, groups, sae__grain(pairs * SCREEN), feature_major_range, job);
    }
    free(start);
    free(tok);
    free(tval);
    return ok;
}

/* Tokens per feature-major pass: their x_hat rows (16 MiB) stay in the last-level cache. */
static size_t pass_tokens(size_t d_out)
{
    size_t tokens = ((size_t)16 << 20) / (d_out * sizeof(float));
    return tokens < 64 ? 64 : tokens;
}

/* x_hat [n][d_out] from the pairs of n tokens, indices already checked. Few pairs per feature:
 * token by token across threads. Many (each row of W_dec used by several tokens): feature by
 * feature, reading each row once per pass instead of once per token, columns across threads.
 * Either way each output element is summed by one thread in an order fixed by the data alone. */
static void decode_pairs(const sae_model *m, const uint32_t *idx, const float *val,
                         const uint32_t *count, size_t stride, size_t n, float *x_hat)
{
    const size_t threads = sae__model_threads(m), d_out = m->d_out, pass = pass_tokens(d_out);
    for (size_t first = 0; first < n; first += pass) {
        const size_t rows = n - first < pass ? n - first : pass;
        pairs_job job = {m, idx + first * stride, count + first, val + first * stride, stride,
                         rows, x_hat + first * d_out, NULL, NULL, NULL};
        size_t pairs = 0;
        for (size_t t = 0; t < rows; t++)
            pairs += job.count[t];
        if (pairs >= m->d_sae && pairs <= UINT32_MAX && feature_major(&job, pairs, threads))
            continue;
        sae__parallel_for(rows > 1 ? threads : 1, rows, sae__grain((pairs / rows + 1) * d_out),
                          token_major_range, &job);
    }
}

int sae_decode_sparse(const sae_model *m, const uint32_t *idx, const float *val,
                      const uint32_t *count, size_t k, size_t n, float *x_hat)
{
    SAE_CHECK_NULL(m);
    if (k == 0)
        return sae__fail(SAE_EINVAL, "k must be at least 1");
    if (n == 0)
        return SAE_OK;
    SAE_CHECK_NULL(idx);
    SAE_CHECK_NULL(val);
    SAE_CHECK_NULL(count);
    SAE_CHECK_NULL(x_hat);
    int rc = check_sizes(m, n, k);
    if (rc != SAE_OK)
        return rc;
    /* Validate everything before writing anything, so a bad token leaves x_hat untouched. */
    for (size_t t = 0; t < n; t++) {
        if (count[t] > k)
            return sae__fail(SAE_EINVAL, "count[%zu] = %u is more than k = %zu", t, count[t], k);
        for (size_t j = 0; j < count[t]; j++) {
            if (idx[t * k + j] >= m->d_sae)
                return sae__fail(SAE_ERANGE, "idx[%zu][%zu] = %u is not a feature (d_sae = %zu)",
                                 t, j, idx[t * k + j], m->d_sae);
        }
        if ((rc = sae__check_finite(val + t * k, count[t], 1, "val")) != SAE_OK)
            return sae__wrap(rc, "token %zu: ", t);
    }
    decode_pairs(m, idx, val, count, k, n, x_hat);
    return SAE_OK;
}

typedef struct {
    const sae_model *m;
    const float *raw;
    float *x_hat;
    sae__scored *heaps;
    uint32_t *idx, *count; /* count: select only, into [rows][kept_max] for decode_pairs */
    float *val;
    size_t kept_max;
} topk_job;

/* TopK: K rows of W_dec per token instead of a dense GEMM over mostly zeros; each token decoded
 * as soon as selected, or (count set) only selected, for decode_pairs to share rows. */
static void topk_range(void *arg, size_t begin, size_t end, size_t worker)
{
    const topk_job *job = arg;
    const size_t K = job->kept_max;
    sae__scored *heap = job->heaps + worker * K;
    for (size_t r = begin; r < end; r++) {
        size_t kept = sae__select_codes(job->m, job->raw + r * job->m->d_sae, K, heap);
        size_t slot = job->count ? r : worker;
        uint32_t *idx = job->idx + slot * K;
        float *val = job->val + slot * K;
        for (size_t j = 0; j < kept; j++) {
            idx[j] = heap[j].index;
            val[j] = heap[j].value;
        }
        if (job->count)
            job->count[r] = (uint32_t)kept;
        else
            sae__decode_token(job->m, idx, val, kept, job->x_hat + r * job->m->d_out);
    }
}

/* ---- from decoded codes to the model's output -------------------------------------------------- */

int sae__finish_alloc(const sae_model *m, size_t rows, sae__finish *fin)
{
    *fin = (sae__finish){0};
    if (m->normalize != SAE_NORMALIZE_NONE &&
        (fin->norms = sae__alloc(rows, sizeof *fin->norms, "token normalizations")) == NULL)
        return SAE_ENOMEM;
    if (m->skip && (fin->skip = sae__alloc(rows * m->d_out, sizeof(float), "skip scratch")) == NULL)
        return SAE_ENOMEM;
    return SAE_OK;
}

void sae__finish_free(sae__finish *fin)
{
    free(fin->norms);
    free(fin->skip);
    *fin = (sae__finish){0};
}

int sae__finish_prepare(const sae_model *m, const float *x, size_t rows, sae__finish *fin)
{
    if (m->skip) /* y_hat's skip term reads the raw x, before normalization */
        sae__sgemm(false, false, rows, m->d_out, m->d_in, 1.0f, x, m->d_in, m->W_skip, m->d_out,
                   0.0f, fin->skip, m->d_out);
    return SAE_OK;
}

void sae__finish_apply(const sae_model *m, const sae__finish *fin, size_t rows, float *out)
{
    const size_t d_out = m->d_out;
    if (fin->skip != NULL)
        for (size_t t = 0; t < rows; t++)
            sae__axpy(d_out, 1.0f, fin->skip + t * d_out, out + t * d_out);
    /* An SAE's output goes back to the token's own scale: a transcoder's never does. */
    if (fin->norms != NULL && !m->transcoder)
        for (size_t t = 0; t < rows; t++) {
            const sae__token_norm tn = fin->norms[t];
            float *o = out + t * d_out;
            for (size_t j = 0; j < d_out; j++)
                o[j] = o[j] * tn.b + tn.mu;
        }
}

int sae_reconstruct(const sae_model *m, const float *x, size_t n, float *x_hat)
{
    SAE_CHECK_NULL(m);
    if (n == 0)
        return SAE_OK;
    SAE_CHECK_NULL(x);
    SAE_CHECK_NULL(x_hat);
    int rc = check_sizes(m, n, m->d_sae);
    if (rc == SAE_OK)
        rc = sae__check_finite(x, n * m->d_in, m->d_in, "x");
    if (rc != SAE_OK)
        return rc;

    const bool topk = !sae__codes_independent(m);
    const size_t block = sae__block_tokens(m->d_sae, n);
    const size_t kept_max = m->k < m->d_sae ? m->k : m->d_sae;
    const size_t threads = n > 1 ? sae__model_threads(m) : 1, grain = sae__grain(m->d_sae);
    const size_t chunks = sae__parallel_chunks(threads, block, grain);
    float *raw = sae__alloc(block * m->d_sae, sizeof(float), "reconstruct scratch");
    float *xs = sae__encoder_reads_x(m)
                    ? NULL
                    : sae__alloc(block * m->d_in, sizeof(float), "reconstruct scratch");
    topk_job job = {m, raw, NULL, NULL, NULL, NULL, NULL, kept_max};
    sae__finish fin = {0};
    /* Enough tokens that rows of W_dec are shared: select all, then decode_pairs. */
    const bool share = topk && block * kept_max >= m->d_sae;
    const size_t slots = share ? block : chunks;
    if (topk) {
        job.heaps = sae__alloc(chunks * kept_max, sizeof *job.heaps, "top-k heaps");
        job.idx = sae__alloc(slots * kept_max, sizeof *job.idx, "top-k indices");
        job.val = sae__alloc(slots * kept_max, sizeof *job.val, "top-k values");
        if (share)
            job.count = sae__alloc(block, sizeof *job.count, "top-k counts");
    }
    if (sae__finish_alloc(m, block, &fin) != SAE_OK || raw == NULL ||
        (xs == NULL && !sae__encoder_reads_x(m)) ||
        (topk && (job.heaps == NULL || job.idx == NULL || job.val == NULL)) ||
        (share && job.count == NULL)) {
        rc = SAE_ENOMEM;
        goto done;
    }
    /* Each block's x is fully read (by the GEMM, the skip product and the normalization) before
     * its x_hat rows are written, so x_hat may alias x. */
    for (size_t first = 0; first < n && rc == SAE_OK; first += block) {
        size_t rows = n - first < block ? n - first : block;
        const float *xb = x + first * m->d_in;
        float *out = x_hat + first * m->d_out;
        if ((rc = sae__encoder_product(m, xb, rows, xs, raw, fin.norms)) != SAE_OK ||
            (rc = sae__finish_prepare(m, xb, rows, &fin)) != SAE_OK)
            break;
        if (topk) {
            job.x_hat = out;
            sae__parallel_for(threads, rows, grain, topk_range, &job);
            if (share)
                decode_pairs(m, job.idx, job.val, job.count, kept_max, rows, job.x_hat);
        } else if ((rc = sae__activate_rows(m, raw, rows)) == SAE_OK) {
            rc = sae__decode_dense(m, raw, rows, out);
        }
        if (rc == SAE_OK)
            sae__finish_apply(m, &fin, rows, out);
    }
done:
    sae__finish_free(&fin);
    free(raw);
    free(xs);
    free(job.heaps);
    free(job.idx);
    free(job.val);
    free(job.count);
    return rc;
}
