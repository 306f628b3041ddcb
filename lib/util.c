/* Overflow-checked allocation and argument checks used by every entry point. */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* 64 bytes: a cache line, and enough for any SIMD load BLAS may do on our scratch. */
enum { ALIGNMENT = 64 };

void *sae__alloc(size_t count, size_t size, const char *what)
{
    size_t bytes;
    if (!sae__mul(count, size, &bytes)) {
        sae__fail(SAE_ENOMEM, "%s: %zu x %zu bytes overflows", what, count, size);
        return NULL;
    }
    /* aligned_alloc wants a multiple of the alignment, and a nonzero size. */
    size_t rounded = bytes == 0 ? ALIGNMENT : bytes;
    if (!sae__add(rounded, ALIGNMENT - 1, &rounded)) {
        sae__fail(SAE_ENOMEM, "%s: %zu bytes overflows", what, bytes);
        return NULL;
    }
    rounded -= rounded % ALIGNMENT;
    void *p = aligned_alloc(ALIGNMENT, rounded);
    if (p == NULL)
        sae__fail(SAE_ENOMEM, "%s: cannot allocate %zu bytes", what, bytes);
    return p;
}

void *sae__zalloc(size_t count, size_t size, const char *what)
{
    void *p = sae__alloc(count, size, what);
    if (p != NULL)
        memset(p, 0, count * size);
    return p;
}

int sae__check_finite(const float *v, size_t count, size_t cols, const char *what)
{
    /* Summing first keeps the common all-finite case one branch-free pass. */
    float sum = 0.0f;
    for (size_t i = 0; i < count; i++)
        sum += v[i] * 0.0f;
    if (sum == 0.0f)
        return SAE_OK;
    for (size_t i = 0; i < count; i++) {
        if (!isfinite(v[i])) {
            if (cols > 1)
                return sae__fail(SAE_EINVAL, "%s[%zu][%zu] is %g: values must be finite", what,
                                 i / cols, i % cols, (double)v[i]);
            return sae__fail(SAE_EINVAL, "%s[%zu] is %g: values must be finite", what, i,
                             (double)v[i]);
        }
    }
    return SAE_OK;
}
