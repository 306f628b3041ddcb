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

void sae__topk_dense(float *v, size_t len, size_t k, sae__scored *heap)
{
    size_t kept = sae__topk_select(v, len, k, heap);
    memset(v, 0, len * sizeof *v);
    for (size_t j = 0; j < kept; j++)
        v[heap[j].index] = heap[j].value > 0.0f ? heap[j].value : 0.0f;
}
