/* Overflow-checked allocation and argument checks used by every entry point. */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sysinfo.h>

/* 64 bytes: a cache line, and enough for any SIMD load BLAS may do on our scratch. */
enum { ALIGNMENT = 64 };

int sae__check_fits_memory(size_t bytes, const char *what)
{
    /* Linux overcommits: a malloc far beyond the machine succeeds, and the process (the host
     * application, not just this call) is OOM-killed later, when the pages are touched. */
    struct sysinfo si;
    if (sysinfo(&si) != 0 || si.mem_unit == 0)
        return SAE_OK;
    uintmax_t physical = (uintmax_t)si.totalram * si.mem_unit;
    if ((uintmax_t)bytes > physical)
        return sae__fail(SAE_ENOMEM, "%s: %zu bytes is more than this machine's memory (%ju)",
                         what, bytes, physical);
    return SAE_OK;
}

void *sae__alloc(size_t count, size_t size, const char *what)
{
    size_t bytes;
    if (!sae__mul(count, size, &bytes)) {
        sae__fail(SAE_ENOMEM, "%s: %zu x %zu bytes overflows", what, count, size);
        return NULL;
    }
    if (sae__check_fits_memory(bytes, what) != SAE_OK)
        return NULL;
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

/* Exponent bits all ones marks NaN and infinity. Independent accumulators keep the common
 * all-finite case at memory speed: it runs on every steered token. */
static bool all_finite(const float *v, size_t count)
{
    uint32_t bad[4] = {0, 0, 0, 0};
    size_t i = 0;
    for (; i + 4 <= count; i += 4)
        for (size_t k = 0; k < 4; k++) {
            uint32_t bits;
            memcpy(&bits, v + i + k, sizeof bits);
            bad[k] |= (bits & 0x7f800000u) == 0x7f800000u;
        }
    for (; i < count; i++) {
        uint32_t bits;
        memcpy(&bits, v + i, sizeof bits);
        bad[0] |= (bits & 0x7f800000u) == 0x7f800000u;
    }
    return (bad[0] | bad[1] | bad[2] | bad[3]) == 0;
}

int sae__check_finite(const float *v, size_t count, size_t cols, const char *what)
{
    if (all_finite(v, count))
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

int sae__check_tokens(size_t n, size_t width, const char *fn)
{
    /* Token counts reach BLAS as ints, and every [n][width] buffer must be addressable. */
    size_t bytes;
    if (n > INT32_MAX || !sae__mul(n, width, &bytes) || !sae__mul(bytes, sizeof(float), &bytes))
        return sae__fail(SAE_EINVAL, "%s: n = %zu tokens of %zu values is too many", fn, n, width);
    return SAE_OK;
}
