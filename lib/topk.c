/* Selecting the k largest of d_sae pre-activations: a k-entry min-heap whose root is the weakest
 * entry kept. Scanning in index order, a candidate enters only when strictly larger than the
 * root, which both rejects most candidates with one comparison and makes ties go to the lower
 * index. */
#include "internal.h"

#include <string.h>

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

size_t sae__topk_select(const float *v, size_t len, size_t k, sae__scored *heap)
{
    size_t size = k < len ? k : len;
    if (size == 0)
        return 0;
    for (size_t i = 0; i < size; i++)
        heap[i] = (sae__scored){v[i], (uint32_t)i};
    for (size_t i = size / 2; i-- > 0;)
        sift_down(heap, size, i);
    for (size_t i = size; i < len; i++) {
        if (v[i] > heap[0].value) {
            heap[0] = (sae__scored){v[i], (uint32_t)i};
            sift_down(heap, size, 0);
        }
    }
    /* Heap sort in place: repeatedly move the weakest to the end, leaving strongest first. */
    for (size_t end = size; end-- > 1;) {
        sae__scored tmp = heap[0];
        heap[0] = heap[end];
        heap[end] = tmp;
        sift_down(heap, end, 0);
    }
    return size;
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

/* Strongest first, by heap sort: repeatedly move the weakest to the end. */
static void sort_heap(sae__scored *heap, size_t size)
{
    for (size_t end = size; end-- > 1;) {
        sae__scored tmp = heap[0];
        heap[0] = heap[end];
        heap[end] = tmp;
        sift_down(heap, end, 0);
    }
}

/* A feature's code from its biased pre-activation v = raw + b_enc: the activation of every
 * architecture but TopK, whose selection is the caller's and whose activation is a ReLU. */
static inline float code_of(sae_arch arch, float v, float threshold, float theta)
{
    switch (arch) {
    case SAE_ARCH_JUMPRELU: return (v > threshold && v > 0.0f) ? v : 0.0f;
    case SAE_ARCH_BATCHTOPK: return (v > theta && v > 0.0f) ? v : 0.0f;
    default: return v > 0.0f ? v : 0.0f;
    }
}

/* Values are screened SCREEN at a time: a fixed count the compiler turns into vector compares,
 * so the common case (nothing in the block beats the weakest kept) costs a fraction of a cycle
 * per feature. Every activation is at most v, so "no v beats the floor" rules the block out. */
#define SCREEN 16

static inline size_t select_arch(sae_arch arch, const sae_model *m, const float *raw, size_t k,
                                 sae__scored *heap)
{
    const size_t len = m->d_sae;
    const float *bias = m->b_enc, *thr = m->threshold;
    const float theta = m->batch_threshold;
    size_t size = 0;
    float floor = 0.0f; /* a code enters only when larger: 0 until the heap is full */
    size_t i = 0;
    for (;;) {
        size_t end = i + SCREEN <= len ? i + SCREEN : len;
        if (end - i == SCREEN) {
            int any = 0;
            for (size_t j = 0; j < SCREEN; j++)
                any |= raw[i + j] + bias[i + j] > floor;
            if (!any) {
                i = end;
                continue;
            }
        }
        if (i == end)
            break;
        for (; i < end; i++) {
            float f = code_of(arch, raw[i] + bias[i], arch == SAE_ARCH_JUMPRELU ? thr[i] : 0.0f,
                              theta);
            if (!(f > floor))
                continue;
            if (size < k) {
                heap[size] = (sae__scored){f, (uint32_t)i};
                sift_up(heap, size++);
            } else {
                heap[0] = (sae__scored){f, (uint32_t)i};
                sift_down(heap, size, 0);
            }
            if (size == k)
                floor = heap[0].value;
        }
    }
    sort_heap(heap, size);
    return size;
}

size_t sae__select_codes(const sae_model *m, const float *raw, size_t k, sae__scored *heap)
{
    if (k == 0)
        return 0;
    switch (m->arch) {
    case SAE_ARCH_JUMPRELU: return select_arch(SAE_ARCH_JUMPRELU, m, raw, k, heap);
    case SAE_ARCH_BATCHTOPK: return select_arch(SAE_ARCH_BATCHTOPK, m, raw, k, heap);
    default: return select_arch(SAE_ARCH_RELU, m, raw, k, heap);
    }
}

void sae__activate_row(const sae_model *m, float *row, sae__scored *heap)
{
    const size_t len = m->d_sae;
    const float *bias = m->b_enc;
    if (m->arch == SAE_ARCH_TOPK) {
        size_t kept = sae__select_codes(m, row, m->k < len ? m->k : len, heap);
        memset(row, 0, len * sizeof *row);
        for (size_t j = 0; j < kept; j++)
            row[heap[j].index] = heap[j].value;
        return;
    }
    /* Fixed-size inner loops, so that -O2 vectorizes them too. */
    size_t i = 0;
    switch (m->arch) {
    case SAE_ARCH_JUMPRELU:
        for (; i + SCREEN <= len; i += SCREEN)
            for (size_t j = i; j < i + SCREEN; j++)
                row[j] = code_of(SAE_ARCH_JUMPRELU, row[j] + bias[j], m->threshold[j], 0.0f);
        for (; i < len; i++)
            row[i] = code_of(SAE_ARCH_JUMPRELU, row[i] + bias[i], m->threshold[i], 0.0f);
        break;
    case SAE_ARCH_BATCHTOPK:
        for (; i + SCREEN <= len; i += SCREEN)
            for (size_t j = i; j < i + SCREEN; j++)
                row[j] = code_of(SAE_ARCH_BATCHTOPK, row[j] + bias[j], 0.0f, m->batch_threshold);
        for (; i < len; i++)
            row[i] = code_of(SAE_ARCH_BATCHTOPK, row[i] + bias[i], 0.0f, m->batch_threshold);
        break;
    default:
        for (; i + SCREEN <= len; i += SCREEN)
            for (size_t j = i; j < i + SCREEN; j++)
                row[j] = code_of(SAE_ARCH_RELU, row[j] + bias[j], 0.0f, 0.0f);
        for (; i < len; i++)
            row[i] = code_of(SAE_ARCH_RELU, row[i] + bias[i], 0.0f, 0.0f);
        break;
    }
}
