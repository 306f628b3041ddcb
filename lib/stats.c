/* Feature statistics: per-feature firing counts, sums, maxima and top-N examples, accumulated
 * over batches of codes in bounded memory and mergeable across threads or processes.
 *
 * Each feature's top examples live in a min-heap of top_n (value, id) entries whose root is the
 * weakest kept, so a new example costs one comparison unless it beats the root. "Stronger" is a
 * total order (larger value, then smaller id), so the kept set does not depend on the order in
 * which tokens arrive or accumulators merge. */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct sae_stats {
    size_t d_sae, top_n;
    uint64_t tokens;
    uint64_t *count; /* [d_sae] */
    double *sum;     /* [d_sae]: double, so billions of tokens still sum to float precision */
    float *max;      /* [d_sae] */
    uint32_t *heap_size;  /* [d_sae] */
    float *heap_val;      /* [d_sae][top_n] */
    uint64_t *heap_id;    /* [d_sae][top_n] */
};

int sae_stats_new(sae_stats **out, size_t d_sae, size_t top_n)
{
    SAE_CHECK_NULL(out);
    *out = NULL;
    if (d_sae == 0)
        return sae__fail(SAE_EINVAL, "%s: d_sae must be at least 1", __func__);
    if (d_sae > UINT32_MAX)
        return sae__fail(SAE_EINVAL, "%s: d_sae = %zu is more features than a uint32_t index",
                         __func__, d_sae);
    if (top_n > UINT32_MAX)
        return sae__fail(SAE_EINVAL, "%s: top_n = %zu is too many", __func__, top_n);
    /* Every block is counted before any is made: each may fit alone while together they
     * would not, and zeroing them touches every page. */
    enum { PER_FEATURE = sizeof(uint64_t) + sizeof(double) + sizeof(float) + sizeof(uint32_t),
           PER_EXAMPLE = sizeof(float) + sizeof(uint64_t) };
    size_t bytes, features;
    if (!sae__mul(d_sae, top_n, &bytes) || !sae__mul(bytes, PER_EXAMPLE, &bytes) ||
        !sae__mul(d_sae, PER_FEATURE, &features) || !sae__add(bytes, features, &bytes))
        return sae__fail(SAE_ENOMEM, "%s: %zu features x %zu examples do not fit in memory",
                         __func__, d_sae, top_n);
    if (sae__check_fits_memory(bytes, "feature statistics") != SAE_OK)
        return SAE_ENOMEM;
    sae_stats *st = sae__zalloc(1, sizeof *st, "feature statistics");
    if (st == NULL)
        return SAE_ENOMEM;
    st->d_sae = d_sae;
    st->top_n = top_n;
    st->count = sae__zalloc(d_sae, sizeof *st->count, "feature statistics");
    st->sum = sae__zalloc(d_sae, sizeof *st->sum, "feature statistics");
    st->max = sae__zalloc(d_sae, sizeof *st->max, "feature statistics");
    st->heap_size = sae__zalloc(d_sae, sizeof *st->heap_size, "feature statistics");
    if (top_n > 0) {
        st->heap_val = sae__alloc(d_sae * top_n, sizeof *st->heap_val, "top examples");
        st->heap_id = sae__alloc(d_sae * top_n, sizeof *st->heap_id, "top examples");
    }
    if (st->count == NULL || st->sum == NULL || st->max == NULL || st->heap_size == NULL ||
        (top_n > 0 && (st->heap_val == NULL || st->heap_id == NULL))) {
        sae_stats_free(st);
        return SAE_ENOMEM;
    }
    *out = st;
    return SAE_OK;
}

void sae_stats_free(sae_stats *st)
{
    if (st == NULL)
        return;
    free(st->count);
    free(st->sum);
    free(st->max);
    free(st->heap_size);
    free(st->heap_val);
    free(st->heap_id);
    free(st);
}

size_t sae_stats_d_sae(const sae_stats *st) { return st ? st->d_sae : 0; }
size_t sae_stats_top_n(const sae_stats *st) { return st ? st->top_n : 0; }
uint64_t sae_stats_tokens(const sae_stats *st) { return st ? st->tokens : 0; }
float sae__stats_feature_max(const sae_stats *st, uint32_t feature) { return st->max[feature]; }

/* a is weaker than b: smaller value, or equal value and larger id. */
static inline bool weaker(float va, uint64_t ia, float vb, uint64_t ib)
{
    return va < vb || (va == vb && ia > ib);
}

static void heap_push(sae_stats *st, size_t feature, float v, uint64_t id)
{
    float *val = st->heap_val + feature * st->top_n;
    uint64_t *ids = st->heap_id + feature * st->top_n;
    size_t size = st->heap_size[feature], i;
    if (size < st->top_n) {
        /* Sift the new entry up from the end. */
        for (i = size; i > 0; ) {
            size_t parent = (i - 1) / 2;
            if (!weaker(v, id, val[parent], ids[parent]))
                break;
            val[i] = val[parent];
            ids[i] = ids[parent];
            i = parent;
        }
        val[i] = v;
        ids[i] = id;
        st->heap_size[feature] = (uint32_t)(size + 1);
        return;
    }
    if (!weaker(val[0], ids[0], v, id))
        return; /* no stronger than the weakest kept */
    /* Replace the root and sift it down. */
    for (i = 0;;) {
        size_t l = 2 * i + 1, r = l + 1, w = i;
        float wv = v;
        uint64_t wi = id;
        if (l < size && weaker(val[l], ids[l], wv, wi)) {
            w = l;
            wv = val[l];
            wi = ids[l];
        }
        if (r < size && weaker(val[r], ids[r], wv, wi))
            w = r;
        if (w == i)
            break;
        val[i] = val[w];
        ids[i] = ids[w];
        i = w;
    }
    val[i] = v;
    ids[i] = id;
}

static inline void observe(sae_stats *st, size_t feature, float v, uint64_t id)
{
    st->count[feature]++;
    st->sum[feature] += v;
    if (v > st->max[feature])
        st->max[feature] = v;
    if (st->top_n > 0)
        heap_push(st, feature, v, id);
}

int sae_stats_update(sae_stats *st, const float *f, size_t n, const uint64_t *ids)
{
    SAE_CHECK_NULL(st);
    if (n == 0)
        return SAE_OK;
    SAE_CHECK_NULL(f);
    int rc = sae__check_tokens(n, st->d_sae, __func__);
    if (rc != SAE_OK)
        return rc;
    rc = sae__check_finite(f, n * st->d_sae, st->d_sae, "f");
    if (rc != SAE_OK)
        return rc;
    for (size_t t = 0; t < n; t++) {
        const float *row = f + t * st->d_sae;
        const uint64_t id = ids ? ids[t] : st->tokens + t;
        for (size_t i = 0; i < st->d_sae; i++)
            if (row[i] > 0.0f)
                observe(st, i, row[i], id);
    }
    st->tokens += n;
    return SAE_OK;
}

int sae_stats_update_sparse(sae_stats *st, const uint32_t *idx, const float *val,
                            const uint32_t *count, size_t k, size_t n, const uint64_t *ids)
{
    SAE_CHECK_NULL(st);
    if (k == 0)
        return sae__fail(SAE_EINVAL, "%s: k must be at least 1", __func__);
    if (n == 0)
        return SAE_OK;
    SAE_CHECK_NULL(idx);
    SAE_CHECK_NULL(val);
    SAE_CHECK_NULL(count);
    size_t slots;
    if (!sae__mul(n, k, &slots) || !sae__mul(slots, sizeof(float), &slots))
        return sae__fail(SAE_EINVAL, "%s: n * k = %zu * %zu is too many", __func__, n, k);
    /* Validate everything first so a bad token leaves the statistics untouched. seen[i] holds
     * the last token (plus one) that named feature i, to catch repeats in one pass. */
    uint32_t *seen = sae__zalloc(st->d_sae, sizeof *seen, "statistics scratch");
    if (seen == NULL)
        return SAE_ENOMEM;
    int rc = SAE_OK;
    for (size_t t = 0; t < n && rc == SAE_OK; t++) {
        if (count[t] > k) {
            rc = sae__fail(SAE_EINVAL, "%s: count[%zu] = %u is more than k = %zu", __func__, t,
                           count[t], k);
            break;
        }
        /* Tokens past 2^32 - 1 restart the stamps; clearing keeps them distinct. */
        const uint32_t stamp = (uint32_t)(t % UINT32_MAX) + 1;
        if (stamp == 1 && t > 0)
            memset(seen, 0, st->d_sae * sizeof *seen);
        for (size_t j = 0; j < count[t]; j++) {
            const uint32_t i = idx[t * k + j];
            const float v = val[t * k + j];
            if (i >= st->d_sae) {
                rc = sae__fail(SAE_ERANGE, "%s: idx[%zu][%zu] = %u is not a feature (d_sae = %zu)",
                               __func__, t, j, i, st->d_sae);
                break;
            }
            if (!isfinite(v)) {
                rc = sae__fail(SAE_EINVAL, "%s: val[%zu][%zu] = %g is not finite", __func__, t, j,
                               (double)v);
                break;
            }
            if (seen[i] == stamp) {
                rc = sae__fail(SAE_EINVAL, "%s: token %zu names feature %u twice", __func__, t, i);
                break;
            }
            seen[i] = stamp;
        }
    }
    free(seen);
    if (rc != SAE_OK)
        return rc;
    for (size_t t = 0; t < n; t++) {
        const uint64_t id = ids ? ids[t] : st->tokens + t;
        for (size_t j = 0; j < count[t]; j++)
            if (val[t * k + j] > 0.0f)
                observe(st, idx[t * k + j], val[t * k + j], id);
    }
    st->tokens += n;
    return SAE_OK;
}

int sae_stats_merge(sae_stats *dst, const sae_stats *src)
{
    SAE_CHECK_NULL(dst);
    SAE_CHECK_NULL(src);
    if (dst == src)
        return sae__fail(SAE_EINVAL, "%s: cannot merge statistics into themselves", __func__);
    if (dst->d_sae != src->d_sae || dst->top_n != src->top_n)
        return sae__fail(SAE_EINVAL,
                         "%s: shapes differ: dst has d_sae = %zu, top_n = %zu; src has d_sae = "
                         "%zu, top_n = %zu",
                         __func__, dst->d_sae, dst->top_n, src->d_sae, src->top_n);
    for (size_t i = 0; i < dst->d_sae; i++) {
        dst->count[i] += src->count[i];
        dst->sum[i] += src->sum[i];
        if (src->max[i] > dst->max[i])
            dst->max[i] = src->max[i];
        for (size_t j = 0; j < src->heap_size[i]; j++)
            heap_push(dst, i, src->heap_val[i * src->top_n + j], src->heap_id[i * src->top_n + j]);
    }
    dst->tokens += src->tokens;
    return SAE_OK;
}

int sae_stats_counts(const sae_stats *st, uint64_t *count)
{
    SAE_CHECK_NULL(st);
    SAE_CHECK_NULL(count);
    memcpy(count, st->count, st->d_sae * sizeof *count);
    return SAE_OK;
}

int sae_stats_sums(const sae_stats *st, double *sum)
{
    SAE_CHECK_NULL(st);
    SAE_CHECK_NULL(sum);
    memcpy(sum, st->sum, st->d_sae * sizeof *sum);
    return SAE_OK;
}

int sae_stats_max(const sae_stats *st, float *max)
{
    SAE_CHECK_NULL(st);
    SAE_CHECK_NULL(max);
    memcpy(max, st->max, st->d_sae * sizeof *max);
    return SAE_OK;
}

typedef struct {
    float value;
    uint64_t id;
} example;

static int stronger_first(const void *pa, const void *pb)
{
    const example *a = pa, *b = pb;
    if (a->value != b->value)
        return a->value > b->value ? -1 : 1;
    return a->id < b->id ? -1 : a->id > b->id;
}

int sae_stats_top(const sae_stats *st, uint32_t feature, float *val, uint64_t *id, size_t *count)
{
    SAE_CHECK_NULL(st);
    SAE_CHECK_NULL(count);
    if (feature >= st->d_sae)
        return sae__fail(SAE_ERANGE, "%s: feature %u is out of range (d_sae = %zu)", __func__,
                         feature, st->d_sae);
    const size_t size = st->heap_size[feature];
    if (size > 0) {
        example *sorted = sae__alloc(size, sizeof *sorted, "top examples");
        if (sorted == NULL)
            return SAE_ENOMEM;
        for (size_t j = 0; j < size; j++)
            sorted[j] = (example){st->heap_val[feature * st->top_n + j],
                                  st->heap_id[feature * st->top_n + j]};
        qsort(sorted, size, sizeof *sorted, stronger_first);
        for (size_t j = 0; j < size; j++) {
            if (val)
                val[j] = sorted[j].value;
            if (id)
                id[j] = sorted[j].id;
        }
        free(sorted);
    }
    *count = size;
    return SAE_OK;
}
