/* F16, BF16 and F64 widened to float with AVX2 + F16C or AVX-512F: each function is compiled for
 * its instruction set alone (target attributes), so the library stays one binary for every
 * x86-64 CPU and dtype.c calls these only where __builtin_cpu_supports says they run.
 *
 * Every path gives the bits of the scalar conversion in dtype.c, which are numpy's:
 * - F16: vcvtph2ps is IEEE half to float (subnormals made normal, infinities kept), except that it
 *   quiets a signalling NaN (sets the top mantissa bit), where numpy (npy_halfbits_to_floatbits)
 *   and the scalar code keep the payload as it is. Lanes whose exponent is all ones (infinities
 *   and NaNs) are rebuilt with the scalar formula; no weight may be NaN, but a load that refuses
 *   one names the same value on every CPU.
 * - BF16: the 16 bits moved to the top of a float, no rounding.
 * - F64: vcvtpd2ps rounds under MXCSR (to nearest even by default), as the scalar cast (cvtsd2ss)
 *   and numpy's astype do; finite values beyond float's range become infinities in all three.
 * The last few values of a call (fewer than one vector) go through the scalar code. */
#include "internal.h"

#ifdef SAE__WIDEN_X86

#include <immintrin.h>

__attribute__((target("avx2,f16c"))) static void f16_avx2(const unsigned char *src, size_t n,
                                                           float *dst)
{
    const __m256i exponent = _mm256_set1_epi32(0x7c00);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(const void *)(src + 2 * i));
        __m256 f = _mm256_cvtph_ps(h);
        __m256i w = _mm256_cvtepu16_epi32(h);
        __m256i special = _mm256_cmpeq_epi32(_mm256_and_si256(w, exponent), exponent);
        if (!_mm256_testz_si256(special, special)) {
            __m256i sign = _mm256_slli_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x8000)), 16);
            __m256i payload = _mm256_slli_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x3ff)), 13);
            __m256i bits =
                _mm256_or_si256(_mm256_or_si256(sign, _mm256_set1_epi32(0x7f800000)), payload);
            f = _mm256_blendv_ps(f, _mm256_castsi256_ps(bits), _mm256_castsi256_ps(special));
        }
        _mm256_storeu_ps(dst + i, f);
    }
    sae__to_float_scalar(SAE__F16, src + 2 * i, n - i, dst + i);
}

__attribute__((target("avx2"))) static void bf16_avx2(const unsigned char *src, size_t n,
                                                      float *dst)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(const void *)(src + 2 * i));
        __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
        _mm256_storeu_si256((__m256i *)(void *)(dst + i), w);
    }
    sae__to_float_scalar(SAE__BF16, src + 2 * i, n - i, dst + i);
}

__attribute__((target("avx2"))) static void f64_avx2(const unsigned char *src, size_t n,
                                                     float *dst)
{
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        __m256d d = _mm256_loadu_pd((const double *)(const void *)(src + 8 * i));
        _mm_storeu_ps(dst + i, _mm256_cvtpd_ps(d));
    }
    sae__to_float_scalar(SAE__F64, src + 8 * i, n - i, dst + i);
}

void sae__to_float_avx2(sae__dtype t, const unsigned char *src, size_t count, float *dst)
{
    switch (t) {
    case SAE__F16: f16_avx2(src, count, dst); break;
    case SAE__BF16: bf16_avx2(src, count, dst); break;
    case SAE__F64: f64_avx2(src, count, dst); break;
    default: sae__to_float_scalar(t, src, count, dst); break;
    }
}

__attribute__((target("avx512f"))) static void f16_avx512(const unsigned char *src, size_t n,
                                                          float *dst)
{
    const __m512i exponent = _mm512_set1_epi32(0x7c00);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(const void *)(src + 2 * i));
        __m512 f = _mm512_cvtph_ps(h);
        __m512i w = _mm512_cvtepu16_epi32(h);
        __mmask16 special = _mm512_cmpeq_epi32_mask(_mm512_and_si512(w, exponent), exponent);
        if (special) {
            __m512i sign = _mm512_slli_epi32(_mm512_and_si512(w, _mm512_set1_epi32(0x8000)), 16);
            __m512i payload = _mm512_slli_epi32(_mm512_and_si512(w, _mm512_set1_epi32(0x3ff)), 13);
            __m512i bits =
                _mm512_or_si512(_mm512_or_si512(sign, _mm512_set1_epi32(0x7f800000)), payload);
            f = _mm512_mask_mov_ps(f, special, _mm512_castsi512_ps(bits));
        }
        _mm512_storeu_ps(dst + i, f);
    }
    sae__to_float_scalar(SAE__F16, src + 2 * i, n - i, dst + i);
}

__attribute__((target("avx512f"))) static void bf16_avx512(const unsigned char *src, size_t n,
                                                           float *dst)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(const void *)(src + 2 * i));
        _mm512_storeu_si512(dst + i, _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    sae__to_float_scalar(SAE__BF16, src + 2 * i, n - i, dst + i);
}

__attribute__((target("avx512f"))) static void f64_avx512(const unsigned char *src, size_t n,
                                                          float *dst)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm512_cvtpd_ps(_mm512_loadu_pd(src + 8 * i)));
    sae__to_float_scalar(SAE__F64, src + 8 * i, n - i, dst + i);
}

void sae__to_float_avx512(sae__dtype t, const unsigned char *src, size_t count, float *dst)
{
    switch (t) {
    case SAE__F16: f16_avx512(src, count, dst); break;
    case SAE__BF16: bf16_avx512(src, count, dst); break;
    case SAE__F64: f64_avx512(src, count, dst); break;
    default: sae__to_float_scalar(t, src, count, dst); break;
    }
}

#else
/* ISO C forbids an empty translation unit. */
typedef int sae__dtype_x86_unused;
#endif
