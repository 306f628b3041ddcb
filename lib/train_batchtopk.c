/* BatchTopK's selection in a training step (BatchTopK and Matryoshka BatchTopK models): the
 * k * n largest positive pre-activations of the whole batch of n tokens, ties to the lower flat
 * index, as SAELens's and dictionary_learning's topk over the flattened batch.
 *
 * The cut (the (k n)-th largest positive value) is found exactly without sorting or
 * partitioning the batch: positive floats order as their bit patterns do, so one counting pass
 * over the batch by the top 11 bits (sign, exponent, 2 mantissa bits) finds the bucket that
 * holds the cut and how many values lie above it, and only that bucket's values (a small
 * fraction) are gathered and selected among. Partitioning all positive values instead was most
 * of a Matryoshka step at 64 -> 512 (its branches mispredict on every other value). */
#include "train_internal.h"

#include <string.h>

/* 2^11 counters (16 KB on the stack); +inf's key, the largest a positive value has. */
enum { KEY_SHIFT = 21, KEYS = 1 << (32 - KEY_SHIFT), KEY_INF = 0x7F800000 >> KEY_SHIFT };
enum { SCREEN = 16 };

/* v's bucket: its top 11 bits. Positive values (finite or +inf) have keys 0 to KEY_INF in their
 * order, with key 0 shared by +0 and the smallest positive subnormals; negative ones have keys
 * from KEYS / 2, and the NaNs arithmetic makes keys above KEY_INF. */
static inline size_t key_of(float v)
{
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u >> KEY_SHIFT;
}

/* The k-th largest (1-based) of v[0..len), rearranging v: quickselect with a
 * median-of-three pivot, deterministic for given data. */
static float kth_largest(float *v, size_t len, size_t k)
{
    size_t lo = 0, hi = len - 1, want = k - 1;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        float a = v[lo], b = v[mid], c = v[hi];
        float pivot = (a > b) ? ((b > c) ? b : (a > c ? c : a)) : ((a > c) ? a : (b > c ? c : b));
        size_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] > pivot)
                i++;
            while (v[j] < pivot)
                j--;
            if (i <= j) {
                float tmp = v[i];
                v[i] = v[j];
                v[j] = tmp;
                i++;
                if (j == 0)
                    break;
                j--;
            }
        }
        if (want <= j)
            hi = j;
        else if (want >= i)
            lo = i;
        else
            return v[want];
    }
    return v[want];
}

/* Whether any of v[0..SCREEN) is at least cut (counted in lanes, so that -O2 vectorizes it). */
static bool reaches(const float *restrict v, float cut)
{
    int lane[SCREEN] = {0};
    for (size_t q = 0; q < SCREEN; q++)
        lane[q] = v[q] >= cut;
    int any = 0;
    for (size_t q = 0; q < SCREEN; q++)
        any |= lane[q];
    return any != 0;
}

/* The cut: with want = min(keep, how many of v[0..count) are positive), the want-th largest
 * positive value (0 when want is 0), and *above = how many values exceed it. scratch has room
 * for count floats. */
static float batch_cut(const float *v, size_t count, size_t keep, float *scratch, size_t *want,
                       size_t *above)
{
    size_t hist[KEYS] = {0}, positive = 0;
    for (size_t i = 0; i < count; i++) {
        hist[key_of(v[i])]++;
        positive += v[i] > 0.0f;
    }
    *want = keep < positive ? keep : positive;
    *above = 0;
    if (*want == 0)
        return 0.0f;
    /* From the largest key down to the one that holds the want-th largest. */
    size_t b = KEY_INF, higher = 0;
    while (b > 0 && higher + hist[b] < *want)
        higher += hist[b--];
    size_t m = 0;
    for (size_t i = 0; i < count; i++)
        if (key_of(v[i]) == b && v[i] > 0.0f)
            scratch[m++] = v[i];
    size_t rank = *want - higher;
    if (rank > m) /* only if signalling NaNs (key KEY_INF) were counted above: none arise */
        rank = m;
    const float cut = kth_largest(scratch, m, rank);
    size_t over = 0;
    for (size_t j = 0; j < m; j++) /* kth_largest reordered them, the same values */
        over += scratch[j] > cut;
    *above = higher + over;
    return cut;
}

float sae__train_select_batchtopk(sae_trainer *t, size_t n)
{
    const size_t d_sae = t->m->d_sae;
    const size_t k = t->m->k < d_sae ? t->m->k : d_sae;
    size_t want, above;
    const float cut = batch_cut(t->pre, n * d_sae, k * n, t->dense, &want, &above);
    size_t ties = want - above;
    size_t used = 0;
    for (size_t i = 0; i < n; i++) {
        t->act_ptr[i] = used;
        const float *row = t->pre + i * d_sae;
        for (size_t j0 = 0; j0 < d_sae && want > 0; j0 += SCREEN) {
            const size_t j1 = j0 + SCREEN <= d_sae ? j0 + SCREEN : d_sae;
            /* Few values reach the cut: a block of SCREEN is screened with compares the
             * compiler vectorizes, and looked at value by value only if one does. */
            if (j1 - j0 == SCREEN && !reaches(row + j0, cut))
                continue;
            for (size_t j = j0; j < j1; j++) {
                /* the cut is positive: a value equal to it is too */
                bool take = row[j] > cut || (row[j] == cut && ties > 0);
                if (!take)
                    continue;
                if (row[j] == cut)
                    ties--;
                t->act_idx[used] = (uint32_t)j;
                t->act_val[used++] = row[j];
            }
        }
    }
    t->act_ptr[n] = used;
    return cut;
}
