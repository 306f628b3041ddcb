/* Tensor element types found in published SAE files, converted to float as numpy would: the
 * portable scalar conversion, which is the reference every vector path (dtype_x86.c) matches bit
 * for bit, and the choice of path, made once per process from what the CPU runs. */
#include "internal.h"

#include <pthread.h>
#ifdef SAE__WIDEN_X86
#include <cpuid.h>
#endif
#include <stdlib.h>
#include <string.h>

size_t sae__dtype_size(sae__dtype t)
{
    static const size_t sizes[SAE__DTYPE_COUNT] = {4, 2, 2, 8};
    return (unsigned)t < SAE__DTYPE_COUNT ? sizes[t] : 0;
}

const char *sae__dtype_name(sae__dtype t)
{
    static const char *const names[SAE__DTYPE_COUNT] = {"F32", "F16", "BF16", "F64"};
    return (unsigned)t < SAE__DTYPE_COUNT ? names[t] : "?";
}

static float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13); /* infinity or NaN, payload kept */
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else {
        /* Subnormal half: every one is a normal float, found by shifting the mantissa up. */
        exponent = 113;
        while (!(mantissa & 0x400u)) {
            mantissa <<= 1;
            exponent--;
        }
        bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

void sae__to_float_scalar(sae__dtype t, const unsigned char *src, size_t count, float *dst)
{
    switch (t) {
    case SAE__F32:
        memcpy(dst, src, count * sizeof(float));
        break;
    case SAE__F16:
        for (size_t i = 0; i < count; i++)
            dst[i] = half_to_float((uint16_t)(src[2 * i] | src[2 * i + 1] << 8));
        break;
    case SAE__BF16:
        for (size_t i = 0; i < count; i++) {
            uint32_t bits = (uint32_t)src[2 * i] << 16 | (uint32_t)src[2 * i + 1] << 24;
            memcpy(&dst[i], &bits, sizeof bits);
        }
        break;
    case SAE__F64:
        for (size_t i = 0; i < count; i++) {
            double d;
            memcpy(&d, src + 8 * i, sizeof d);
            dst[i] = (float)d; /* round to nearest even, as numpy's astype */
        }
        break;
    default:
        break;
    }
}

const char *sae__widen_path_name(sae__widen_path p)
{
    static const char *const names[SAE__WIDEN_COUNT] = {"scalar", "avx2", "avx512"};
    return (unsigned)p < SAE__WIDEN_COUNT ? names[p] : "?";
}

bool sae__widen_supported(sae__widen_path p)
{
    switch (p) {
    case SAE__WIDEN_SCALAR:
        return true;
#ifdef SAE__WIDEN_X86
    /* libgcc's and compiler-rt's answers include the OS's consent (XCR0) to the wider registers. */
    case SAE__WIDEN_AVX2: {
        /* clang's builtin does not know "f16c": CPUID leaf 1 says it (ECX bit 29). */
        unsigned a, b, c, d;
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __get_cpuid(1, &a, &b, &c, &d) &&
               (c & bit_F16C) != 0;
    }
    case SAE__WIDEN_AVX512:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f");
#endif
    default:
        return false;
    }
}

static pthread_once_t chosen_once = PTHREAD_ONCE_INIT;
static sae__widen_path chosen = SAE__WIDEN_SCALAR;

/* SAE_DTYPE_ISA caps the path: "none" (or "scalar") keeps the portable loops, "avx2" stops short
 * of AVX-512; unset, "avx512" or anything else: the best this CPU runs. */
static void choose(void)
{
    const char *cap = getenv("SAE_DTYPE_ISA");
    sae__widen_path best = SAE__WIDEN_AVX512;
    if (cap != NULL && (strcmp(cap, "none") == 0 || strcmp(cap, "scalar") == 0))
        best = SAE__WIDEN_SCALAR;
    else if (cap != NULL && strcmp(cap, "avx2") == 0)
        best = SAE__WIDEN_AVX2;
    while (best > SAE__WIDEN_SCALAR && !sae__widen_supported(best))
        best = (sae__widen_path)(best - 1);
    chosen = best;
}

sae__widen_path sae__widen_chosen(void)
{
    pthread_once(&chosen_once, choose);
    return chosen;
}

void sae__to_float_on(sae__widen_path p, sae__dtype t, const unsigned char *src, size_t count,
                      float *dst)
{
    switch (p) {
#ifdef SAE__WIDEN_X86
    case SAE__WIDEN_AVX2:
        sae__to_float_avx2(t, src, count, dst);
        break;
    case SAE__WIDEN_AVX512:
        sae__to_float_avx512(t, src, count, dst);
        break;
#endif
    default:
        sae__to_float_scalar(t, src, count, dst);
        break;
    }
}

void sae__to_float(sae__dtype t, const unsigned char *src, size_t count, float *dst)
{
    sae__to_float_on(sae__widen_chosen(), t, src, count, dst);
}
