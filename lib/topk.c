/* Selecting the k largest of d_sae pre-activations in one pass. The entries kept so far live in
 * a "kept set" whose weakest value is the floor a candidate must strictly beat; scanning in index
 * order, strictness makes ties go to the lower index. Most candidates lose, so the scan screens
 * SCREEN values at a time against the floor with compares the compiler vectorizes, and only a
 * block holding a winner is looked at value by value.
 *
 * Up to SORTED_MAX_K entries are kept as an array sorted strongest first: a winner is put in
 * place by shifting the weaker ones down one slot. A winner usually lands near the bottom, so
 * the shift is short and its loop predictable, where a heap's sift branches unpredictably at
 * every level (it was 40% of a TopK training step at K = 16). Larger k keep a min-heap, whose
 * O(log k) insertion wins once an average shift of k/2 entries costs more. */
#include "internal.h"

#include <math.h>
#include <string.h>

#define SCREEN 16
enum { SORTED_MAX_K = 64 };

typedef struct {
    sae__scored *e;
    size_t size, k;
    float floor; /* a candidate must be larger: -inf, or 0 for codes, until the set is full */
} kept_set;

/* a ranks below b: smaller value, or equal value and higher index. */
static inline bool weaker(sae__scored a, sae__scored b)
{
    return a.value < b.value || (a.value == b.value && a.index > b.index);
}

static void sift_down(sae__scored *heap, size_t size, size_t i)
{
    for (;;) {
        size_t weakest = i, l = 2 * i + 1, r = l + 1;
        if (l < size && weaker(heap[l], heap[weakest]))
            weakest = l;
        if (r < size && weaker(heap[r], heap[weakest]))
            weakest = r;
        if (weakest == i)
            return;
        sae__scored tmp = heap[i];
        heap[i] = heap[weakest];
        heap[weakest] = tmp;
        i = weakest;
    }
}

static void sift_up(sae__scored *heap, size_t i)
{
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!weaker(heap[i], heap[parent]))
            return;
        sae__scored tmp = heap[i];
        heap[i] = heap[parent];
        heap[parent] = tmp;
        i = parent;
    }
}

/* Offers value (at index, larger than every index offered before) once it beats the floor. */
static inline void kept_offer(kept_set *s, float value, uint32_t index)
{
    sae__scored *e = s->e;
    if (s->k <= SORTED_MAX_K) {
        /* Growing: a new slot at the end; full: the weakest entry drops out. Equal values stay
         * ahead of the newcomer, whose index is higher. */
        size_t j = s->size < s->k ? s->size++ : s->k - 1;
        while (j > 0 && e[j - 1].value < value) {
            e[j] = e[j - 1];
            j--;
        }
        e[j] = (sae__scored){value, index};
        if (s->size == s->k)
            s->floor = e[s->k - 1].value;
        return;
    }
    if (s->size < s->k) {
        e[s->size] = (sae__scored){value, index};
        sift_up(e, s->size++);
    } else {
        e[0] = (sae__scored){value, index};
        sift_down(e, s->size, 0);
    }
    if (s->size == s->k)
        s->floor = e[0].value;
}

/* Strongest first: a heap is sorted by repeatedly moving its weakest entry to the end. */
static size_t kept_finish(kept_set *s)
{
    if (s->k > SORTED_MAX_K)
        for (size_t end = s->size; end-- > 1;) {
            sae__scored tmp = s->e[0];
            s->e[0] = s->e[end];
            s->e[end] = tmp;
            sift_down(s->e, end, 0);
        }
    return s->size;
}

/* Whether any of v[0..SCREEN) beats the floor: a fixed count, so -O2 vectorizes it. */
static inline bool screen_any(const float *v, float floor)
{
    int any = 0;
    for (size_t j = 0; j < SCREEN; j++)
        any |= v[j] > floor;
    return any != 0;
}

/* The smallest of the maxima of k equal blocks of v: k distinct entries are at least this large,
 * so nothing smaller is among the k largest. A floor from the start, where filling the set from
 * the first k entries would let nearly every early entry in. -inf if a block is all -inf or NaN. */
static float least_block_max(const float *v, size_t len, size_t k)
{
    const size_t width = len / k;
    float least = INFINITY;
    for (size_t b = 0; b < k; b++) {
        const float *p = v + b * width;
        float lane[8];
        size_t j = 0;
        for (size_t q = 0; q < 8; q++)
            lane[q] = -INFINITY;
        for (; j + 8 <= width; j += 8) /* eight independent maxima: -O2 vectorizes them */
            for (size_t q = 0; q < 8; q++)
                lane[q] = p[j + q] > lane[q] ? p[j + q] : lane[q];
        for (; j < width; j++)
            lane[0] = p[j] > lane[0] ? p[j] : lane[0];
        float most = -INFINITY;
        for (size_t q = 0; q < 8; q++)
            most = lane[q] > most ? lane[q] : most;
        least = most < least ? most : least;
    }
    return least;
}

size_t sae__topk_select(const float *v, size_t len, size_t k, sae__scored *out)
{
    kept_set s = {out, 0, k < len ? k : len, -INFINITY};
    if (s.k == 0)
        return 0;
    float least = least_block_max(v, len, s.k);
    if (least > -INFINITY)
        s.floor = nextafterf(least, -INFINITY); /* v > floor: v >= least */
    for (size_t i = 0; i < len;) {
        size_t end = i + SCREEN <= len ? i + SCREEN : len;
        if (end - i == SCREEN && !screen_any(v + i, s.floor)) {
            i = end;
            continue;
        }
        for (; i < end; i++)
            if (v[i] > s.floor)
                kept_offer(&s, v[i], (uint32_t)i);
    }
    /* Short only when fewer than k values beat -inf: -inf entries are the weakest, and rank
     * among themselves by index. NaN is never kept. */
    for (size_t i = 0; i < len && s.size < s.k; i++)
        if (v[i] == -INFINITY)
            kept_offer(&s, v[i], (uint32_t)i);
    return kept_finish(&s);
}

/* sae__code_of for feature i of m, the architecture known when the caller is compiled. */
static inline float code_at(sae_arch arch, const sae_model *m, const float *raw, size_t i)
{
    return sae__code_of(arch, raw[i], m->b_enc[i], arch == SAE_ARCH_JUMPRELU ? m->threshold[i] : 0,
                        m->batch_threshold, arch == SAE_ARCH_GATED ? m->mag_scale[i] : 0,
                        arch == SAE_ARCH_GATED ? m->b_mag[i] : 0);
}

/* Gated: a code is no function of raw + b_gate alone, so each block's codes are made first and
 * screened against the floor. */
static size_t select_gated(const sae_model *m, const float *raw, size_t k, sae__scored *out)
{
    const size_t len = m->d_sae;
    kept_set s = {out, 0, k, 0.0f};
    float code[SCREEN];
    for (size_t i = 0; i < len; i += SCREEN) {
        size_t count = len - i < SCREEN ? len - i : SCREEN;
        for (size_t j = 0; j < count; j++)
            code[j] = code_at(SAE_ARCH_GATED, m, raw, i + j);
        if (count == SCREEN && !screen_any(code, s.floor))
            continue;
        for (size_t j = 0; j < count; j++)
            if (code[j] > s.floor)
                kept_offer(&s, code[j], (uint32_t)(i + j));
    }
    return kept_finish(&s);
}

/* GroupMax: each group's winner, the largest rectified pre-activation (the first of equals, as
 * torch.max), competes for the k slots; winners come in index order, as kept_offer needs. */
static size_t select_groupmax(const sae_model *m, const float *raw, size_t k, sae__scored *out)
{
    const size_t groups = m->k, width = m->d_sae / groups;
    kept_set s = {out, 0, k < groups ? k : groups, 0.0f};
    for (size_t g = 0; g < groups; g++) {
        const size_t first = g * width;
        size_t best = first;
        float most = code_at(SAE_ARCH_RELU, m, raw, first);
        for (size_t i = first + 1; i < first + width; i++) {
            float v = code_at(SAE_ARCH_RELU, m, raw, i);
            if (v > most) {
                most = v;
                best = i;
            }
        }
        if (most > s.floor)
            kept_offer(&s, most, (uint32_t)best);
    }
    return kept_finish(&s);
}

static inline size_t select_arch(sae_arch arch, const sae_model *m, const float *raw, size_t k,
                                 sae__scored *out)
{
    const size_t len = m->d_sae;
    const float *bias = m->b_enc, *thr = m->threshold;
    const float theta = m->batch_threshold;
    /* Codes enter only when positive: the floor starts at 0, and every code is at most its
     * biased pre-activation, so a block whose raw + bias all stay under the floor is out. */
    kept_set s = {out, 0, k, 0.0f};
    float biased[SCREEN];
    for (size_t i = 0; i < len; i += SCREEN) {
        size_t count = len - i < SCREEN ? len - i : SCREEN;
        if (count == SCREEN) {
            for (size_t j = 0; j < SCREEN; j++)
                biased[j] = raw[i + j] + bias[i + j];
            if (!screen_any(biased, s.floor))
                continue;
        } else {
            for (size_t j = 0; j < count; j++)
                biased[j] = raw[i + j] + bias[i + j];
        }
        for (size_t j = 0; j < count; j++) {
            float f = sae__code_of(arch, biased[j], 0.0f,
                                   arch == SAE_ARCH_JUMPRELU ? thr[i + j] : 0.0f, theta, 0, 0);
            if (f > s.floor)
                kept_offer(&s, f, (uint32_t)(i + j));
        }
    }
    return kept_finish(&s);
}

size_t sae__select_codes(const sae_model *m, const float *raw, size_t k, sae__scored *out)
{
    if (k == 0)
        return 0;
    switch (m->arch) {
    case SAE_ARCH_JUMPRELU: return select_arch(SAE_ARCH_JUMPRELU, m, raw, k, out);
    case SAE_ARCH_BATCHTOPK: return select_arch(SAE_ARCH_BATCHTOPK, m, raw, k, out);
    case SAE_ARCH_GATED: return select_gated(m, raw, k, out);
    case SAE_ARCH_GROUPMAX: return select_groupmax(m, raw, k, out);
    default: return select_arch(SAE_ARCH_RELU, m, raw, k, out);
    }
}

/* Codes [0, count) of a block in place. The restrict-qualified pointers (a row of codes never
 * overlaps the model's vectors) and the fixed count let -O2 make vector compares and blends of
 * sae__code_of: written through code_at on the row itself, with the model's vectors possibly
 * aliasing it, the loop stayed scalar, one unpredictable branch per code (a fifth of an AMX
 * encode's time at n = 1024). */
static inline void activate_block(sae_arch arch, size_t count, float *restrict row,
                                  const float *restrict bias, const float *restrict thr,
                                  float theta, const float *restrict scale,
                                  const float *restrict b_mag)
{
    for (size_t j = 0; j < count; j++)
        row[j] = sae__code_of(arch, row[j], bias[j], arch == SAE_ARCH_JUMPRELU ? thr[j] : 0.0f,
                              theta, arch == SAE_ARCH_GATED ? scale[j] : 0.0f,
                              arch == SAE_ARCH_GATED ? b_mag[j] : 0.0f);
}

static inline void activate_arch(sae_arch arch, const sae_model *m, float *row)
{
    const size_t len = m->d_sae;
    const float *thr = m->threshold, *scale = m->mag_scale, *b_mag = m->b_mag;
    size_t i = 0;
    const bool jump = arch == SAE_ARCH_JUMPRELU, gated = arch == SAE_ARCH_GATED;
    for (; i + SCREEN <= len; i += SCREEN)
        activate_block(arch, SCREEN, row + i, m->b_enc + i, jump ? thr + i : NULL,
                       m->batch_threshold, gated ? scale + i : NULL, gated ? b_mag + i : NULL);
    activate_block(arch, len - i, row + i, m->b_enc + i, jump ? thr + i : NULL, m->batch_threshold,
                   gated ? scale + i : NULL, gated ? b_mag + i : NULL);
}

void sae__activate_row(const sae_model *m, float *row, sae__scored *out)
{
    const size_t len = m->d_sae;
    if (m->arch == SAE_ARCH_TOPK || m->arch == SAE_ARCH_GROUPMAX) {
        size_t kept = sae__select_codes(m, row, m->k < len ? m->k : len, out);
        memset(row, 0, len * sizeof *row);
        for (size_t j = 0; j < kept; j++)
            row[out[j].index] = out[j].value;
        return;
    }
    switch (m->arch) {
    case SAE_ARCH_JUMPRELU: activate_arch(SAE_ARCH_JUMPRELU, m, row); break;
    case SAE_ARCH_BATCHTOPK: activate_arch(SAE_ARCH_BATCHTOPK, m, row); break;
    case SAE_ARCH_GATED: activate_arch(SAE_ARCH_GATED, m, row); break;
    default: activate_arch(SAE_ARCH_RELU, m, row); break;
    }
}
