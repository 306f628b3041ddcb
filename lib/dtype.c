/* Tensor element types found in published SAE files, converted to float as numpy would. */
#include "internal.h"

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

void sae__to_float(sae__dtype t, const unsigned char *src, size_t count, float *dst)
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
