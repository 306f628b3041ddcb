/* F16, BF16 and F64 widened to float on every path this CPU runs (lib/dtype.c, lib/dtype_x86.c):
 * each path bit for bit against the scalar code, and the scalar code against numpy's values.
 * A path the CPU lacks is named on stderr as not tested. */
#include "testutil.h"
#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Runs the loop test for path p only when the CPU has it; says so otherwise. */
static bool path_runs(int p)
{
    if (sae__widen_supported((sae__widen_path)p))
        return true;
    fprintf(stderr, "dtype widening: path %s not tested: this CPU or build lacks it\n",
            sae__widen_path_name((sae__widen_path)p));
    return false;
}

static uint32_t bits_of(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* FNV-1a over the little-endian bytes of n floats. */
static uint64_t fnv(const float *v, size_t n)
{
    uint64_t h = 0xcbf29ce484222325u;
    for (size_t i = 0; i < n; i++) {
        uint32_t u = bits_of(v[i]);
        for (int b = 0; b < 4; b++) {
            h ^= (u >> (8 * b)) & 0xffu;
            h *= 0x100000001b3u;
        }
    }
    return h;
}

/* Every 16-bit pattern, little-endian, in order. */
static unsigned char *all_patterns(void)
{
    unsigned char *b = tu_malloc(2 * 65536);
    for (uint32_t i = 0; i < 65536; i++) {
        b[2 * i] = (unsigned char)(i & 0xffu);
        b[2 * i + 1] = (unsigned char)(i >> 8);
    }
    return b;
}

START_TEST(scalar_half_matches_numpy_on_every_pattern)
{
    unsigned char *b = all_patterns();
    float *f = tu_malloc(65536 * sizeof(float));
    sae__to_float_scalar(SAE__F16, b, 65536, f);
    /* numpy 1.24: np.arange(65536).astype('<u2').view('<f2').astype('<f4'), hashed as fnv()
     * hashes; NaN payloads are kept as they are (0x7c01 -> 0x7f802000, not quieted). */
    ck_assert_uint_eq(fnv(f, 65536), 0xb0659868ec053145u);
    const struct {
        uint16_t h;
        uint32_t f;
    } nan[] = {{0x7c01, 0x7f802000}, {0xfc01, 0xff802000}, {0x7dff, 0x7fbfe000},
               {0x7e01, 0x7fc02000}, {0x0001, 0x33800000}};
    for (size_t i = 0; i < sizeof nan / sizeof nan[0]; i++)
        ck_assert_uint_eq(bits_of(f[nan[i].h]), nan[i].f);
    free(f);
    free(b);
}
END_TEST

START_TEST(scalar_f64_rounds_as_numpy)
{
    /* numpy 1.24's np.array([v], '<f8').astype('<f4'). */
    const struct {
        double d;
        uint32_t f;
    } cases[] = {
        {0.0, 0x0},
        {-0.0, 0x80000000},
        {(double)INFINITY, 0x7f800000},
        {-(double)INFINITY, 0xff800000},
        {0x1.fffffep127, 0x7f7fffff},            /* FLT_MAX */
        {0x1.ffffffp127, 0x7f800000},            /* FLT_MAX + half an ulp: a tie, to even: inf */
        {0x1.fffffefffffffp127, 0x7f7fffff},     /* just below that tie */
        {0x1p-149, 0x1},                         /* the smallest float subnormal */
        {0x1p-150, 0x0},                         /* half of it: a tie, to even: zero */
        {0x1.0000000000001p-150, 0x1},           /* just above that tie */
        {0x1.8p-149, 0x2},                       /* 1.5 of the smallest: a tie, to even */
        {0x0.0000000000001p-1022, 0x0},          /* the smallest double */
        {0x1.000001p0, 0x3f800000},              /* 1 + 2^-24: a tie, to even */
        {0x1.000003p0, 0x3f800002},              /* 1 + 3 * 2^-24: a tie, to even (up) */
        {-0x1.000001p0, 0xbf800000},
        {1e300, 0x7f800000},
        {-1e300, 0xff800000},
        {0.1, 0x3dcccccd},
        {0x1.fffffcp-127, 0x7fffff},             /* the largest float subnormal */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        float f;
        sae__to_float_scalar(SAE__F64, (const unsigned char *)&cases[i].d, 1, &f);
        ck_assert_msg(bits_of(f) == cases[i].f, "%a gave 0x%08x, numpy 0x%08x", cases[i].d,
                      bits_of(f), cases[i].f);
    }
}
END_TEST

START_TEST(half_and_bfloat_every_pattern_on_each_path)
{
    if (!path_runs(_i))
        return;
    unsigned char *b = all_patterns();
    float *want = tu_malloc(65536 * sizeof(float)), *got = tu_malloc(65536 * sizeof(float));
    const sae__dtype types[] = {SAE__F16, SAE__BF16};
    for (size_t k = 0; k < 2; k++) {
        sae__to_float_scalar(types[k], b, 65536, want);
        memset(got, 0x5a, 65536 * sizeof(float));
        sae__to_float_on((sae__widen_path)_i, types[k], b, 65536, got);
        for (uint32_t i = 0; i < 65536; i++)
            ck_assert_msg(bits_of(got[i]) == bits_of(want[i]),
                          "%s 0x%04x on %s: 0x%08x, scalar 0x%08x", sae__dtype_name(types[k]), i,
                          sae__widen_path_name((sae__widen_path)_i), bits_of(got[i]),
                          bits_of(want[i]));
    }
    free(got);
    free(want);
    free(b);
}
END_TEST

/* Doubles that reach every rounding case: specials, random bit patterns (mostly beyond float's
 * range either way), random values in and near float's range (normals, subnormals, overflow),
 * and exact ties between two floats, which round to even. */
static double *f64_sample(size_t n)
{
    static const double special[] = {0.0,
                                     -0.0,
                                     (double)INFINITY,
                                     -(double)INFINITY,
                                     (double)NAN,
                                     0x1.fffffep127,
                                     0x1.ffffffp127,
                                     -0x1.ffffffp127,
                                     0x1.fffffefffffffp127,
                                     0x1p-149,
                                     0x1p-150,
                                     0x1.8p-149,
                                     0x1.000001p0,
                                     0x1.000003p0,
                                     0x1.fffffffffffffp1023,
                                     0x0.0000000000001p-1022};
    const size_t ns = sizeof special / sizeof special[0];
    double *d = tu_malloc(n * sizeof(double));
    tu_rng r = {42};
    for (size_t i = 0; i < n; i++) {
        uint64_t u = tu_next(&r);
        if (i < ns) {
            d[i] = special[i];
            continue;
        }
        switch (i % 4) {
        case 0: /* any bits, NaNs with payloads included */
            break;
        case 1: /* exponents of float's normals, subnormals and just past its largest */
        case 2:
            u = (u & 0x800fffffffffffffu) | (uint64_t)(1023 - 160 + tu_next(&r) % 292) << 52;
            if (i % 4 == 2) /* halfway between two floats (or two float subnormals) */
                u = (u & ~(uint64_t)0x1fffffff) | 0x10000000u;
            break;
        default: { /* halfway between two float subnormals: 2^e (1.m) keeps e + 149 bits of m */
            unsigned kept = (unsigned)(tu_next(&r) % 23);
            uint64_t low = ((uint64_t)1 << (52 - kept)) - 1;
            u = (u & 0x800fffffffffffffu & ~low) | (uint64_t)(1023 - 149 + kept) << 52 |
                (uint64_t)1 << (51 - kept);
            break;
        }
        }
        memcpy(&d[i], &u, sizeof u);
    }
    return d;
}

START_TEST(f64_sample_on_each_path)
{
    if (!path_runs(_i))
        return;
    const size_t n = (size_t)1 << 20;
    double *d = f64_sample(n);
    float *want = tu_malloc(n * sizeof(float)), *got = tu_malloc(n * sizeof(float));
    sae__to_float_scalar(SAE__F64, (const unsigned char *)d, n, want);
    sae__to_float_on((sae__widen_path)_i, SAE__F64, (const unsigned char *)d, n, got);
    size_t infinities = 0, subnormals = 0;
    for (size_t i = 0; i < n; i++) {
        ck_assert_msg(bits_of(got[i]) == bits_of(want[i]), "%a on %s: 0x%08x, scalar 0x%08x", d[i],
                      sae__widen_path_name((sae__widen_path)_i), bits_of(got[i]),
                      bits_of(want[i]));
        infinities += (bits_of(want[i]) & 0x7fffffffu) == 0x7f800000u;
        subnormals += (bits_of(want[i]) & 0x7f800000u) == 0 && (bits_of(want[i]) << 1) != 0;
    }
    /* The sample does reach overflow and float subnormals. */
    ck_assert_uint_gt(infinities, n / 100);
    ck_assert_uint_gt(subnormals, n / 100);
    free(got);
    free(want);
    free(d);
}
END_TEST

/* Short and odd counts from unaligned starts, so that every tail is reached; nothing is written
 * outside dst[0 .. count). */
START_TEST(tails_and_unaligned_starts_on_each_path)
{
    if (!path_runs(_i))
        return;
    enum { MAX = 70 };
    unsigned char src[8 * MAX + 8];
    double *d = f64_sample(MAX + 1);
    tu_rng r = {7};
    const sae__dtype types[] = {SAE__F32, SAE__F16, SAE__BF16, SAE__F64};
    for (size_t k = 0; k < 4; k++) {
        for (size_t off = 0; off <= 3; off++)
            for (size_t count = 0; count <= MAX; count++) {
                for (size_t j = 0; j < sizeof src; j++)
                    src[j] = (unsigned char)(tu_next(&r) & 0xffu);
                if (types[k] == SAE__F64) /* values that round, not only 0 and inf */
                    memcpy(src + off, d + (count % 2), count * sizeof(double));
                float want[MAX + 2], got[MAX + 2];
                memset(want, 0xa5, sizeof want);
                memset(got, 0xa5, sizeof got);
                sae__to_float_scalar(types[k], src + off, count, want + 1);
                sae__to_float_on((sae__widen_path)_i, types[k], src + off, count, got + 1);
                ck_assert_msg(memcmp(got, want, sizeof got) == 0,
                              "%s on %s: count %zu from byte offset %zu differs",
                              sae__dtype_name(types[k]), sae__widen_path_name((sae__widen_path)_i),
                              count, off);
            }
    }
    free(d);
}
END_TEST

/* sae__to_float takes the best path the CPU has, capped by SAE_DTYPE_ISA (ctest runs this suite
 * with none, avx2 and unset). */
START_TEST(chosen_path_follows_the_cpu_and_the_cap)
{
    const char *cap = getenv("SAE_DTYPE_ISA");
    int want = SAE__WIDEN_AVX512;
    if (cap != NULL && strcmp(cap, "none") == 0)
        want = SAE__WIDEN_SCALAR;
    else if (cap != NULL && strcmp(cap, "avx2") == 0)
        want = SAE__WIDEN_AVX2;
    while (want > SAE__WIDEN_SCALAR && !sae__widen_supported((sae__widen_path)want))
        want--;
    ck_assert_str_eq(sae__widen_path_name(sae__widen_chosen()),
                     sae__widen_path_name((sae__widen_path)want));
    fprintf(stderr, "dtype widening: sae__to_float takes the %s path (SAE_DTYPE_ISA=%s)\n",
            sae__widen_path_name(sae__widen_chosen()), cap ? cap : "unset");
    unsigned char *b = all_patterns();
    float *want_f = tu_malloc(65536 * sizeof(float)), *got = tu_malloc(65536 * sizeof(float));
    sae__to_float_scalar(SAE__F16, b, 65536, want_f);
    sae__to_float(SAE__F16, b, 65536, got);
    ck_assert_mem_eq(got, want_f, 65536 * sizeof(float));
    free(got);
    free(want_f);
    free(b);
}
END_TEST

static Suite *dtype_suite(void)
{
    Suite *s = suite_create("dtype");
    TCase *tc = tcase_create("widen");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, scalar_half_matches_numpy_on_every_pattern);
    tcase_add_test(tc, scalar_f64_rounds_as_numpy);
    tcase_add_loop_test(tc, half_and_bfloat_every_pattern_on_each_path, 0, SAE__WIDEN_COUNT);
    tcase_add_loop_test(tc, f64_sample_on_each_path, 0, SAE__WIDEN_COUNT);
    tcase_add_loop_test(tc, tails_and_unaligned_starts_on_each_path, 0, SAE__WIDEN_COUNT);
    tcase_add_test(tc, chosen_path_follows_the_cpu_and_the_cap);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(dtype_suite)
