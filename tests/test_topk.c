/* The k-largest selection (lib/topk.c) against a stable sort: every k on both sides of the
 * sorted-array / heap switch, lengths around the block and screen widths, ties, negative values,
 * infinities and NaN. The selection has several floors (block maxima, the kept set's weakest,
 * the screen), and each is a place where an entry that belongs could be turned away. */
#include "internal.h"
#include "testutil.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Strongest first, ties by lower index; NaN after everything (never selected over a number). */
static int by_rank(const void *pa, const void *pb)
{
    const sae__scored *a = pa, *b = pb;
    bool na = isnan(a->value), nb = isnan(b->value);
    if (na != nb)
        return na ? 1 : -1;
    if (!na && a->value != b->value)
        return a->value > b->value ? -1 : 1;
    return a->index < b->index ? -1 : 1;
}

static void check_against_sort(const float *v, size_t len, size_t k, const char *what)
{
    sae__scored *want = tu_malloc((len + 1) * sizeof *want);
    sae__scored *got = tu_malloc((k + 1) * sizeof *got);
    for (size_t i = 0; i < len; i++)
        want[i] = (sae__scored){v[i], (uint32_t)i};
    qsort(want, len, sizeof *want, by_rank);
    size_t kept = sae__topk_select(v, len, k, got);
    size_t expect = k < len ? k : len;
    ck_assert_msg(kept == expect, "%s: len %zu k %zu kept %zu", what, len, k, kept);
    for (size_t j = 0; j < kept; j++) {
        if (isnan(want[j].value)) /* only when fewer than k numbers: any NaN may fill in */
            break;
        ck_assert_msg(got[j].index == want[j].index && got[j].value == want[j].value,
                      "%s: len %zu k %zu rank %zu: got %u (%g), want %u (%g)", what, len, k, j,
                      got[j].index, (double)got[j].value, want[j].index, (double)want[j].value);
    }
    free(want);
    free(got);
}

static const size_t lengths[] = {1, 2, 7, 15, 16, 17, 33, 64, 100, 512, 1000, 4100};
static const size_t ks[] = {1, 2, 3, 8, 16, 31, 32, 63, 64, 65, 100, 128, 300, 5000};
#define N_LENGTHS (sizeof lengths / sizeof lengths[0])

START_TEST(random_values_match_a_stable_sort)
{
    size_t len = lengths[_i];
    tu_rng r = {(uint64_t)len};
    float *v = tu_malloc(len * sizeof *v);
    for (size_t rep = 0; rep < 4; rep++) {
        for (size_t i = 0; i < len; i++)
            v[i] = tu_normal(&r);
        for (size_t j = 0; j < sizeof ks / sizeof ks[0]; j++)
            check_against_sort(v, len, ks[j], "normal");
    }
    free(v);
}
END_TEST

START_TEST(ties_go_to_the_lower_index)
{
    size_t len = lengths[_i];
    tu_rng r = {(uint64_t)len + 99};
    float *v = tu_malloc(len * sizeof *v);
    for (size_t levels = 1; levels <= 5; levels += 2) {
        for (size_t i = 0; i < len; i++)
            v[i] = (float)(tu_next(&r) % levels) - 1.0f; /* -1, 0, 1, 2, 3: many equal values */
        for (size_t j = 0; j < sizeof ks / sizeof ks[0]; j++)
            check_against_sort(v, len, ks[j], "ties");
    }
    free(v);
}
END_TEST

/* Orders that defeat each floor: rising values make every entry a winner, falling values put
 * the answer at the front, and a lone spike sits in the last, partial screen block. */
START_TEST(adversarial_orders_match_a_stable_sort)
{
    size_t len = lengths[_i];
    float *v = tu_malloc(len * sizeof *v);
    for (size_t j = 0; j < sizeof ks / sizeof ks[0]; j++) {
        for (size_t i = 0; i < len; i++)
            v[i] = (float)i;
        check_against_sort(v, len, ks[j], "rising");
        for (size_t i = 0; i < len; i++)
            v[i] = -(float)i;
        check_against_sort(v, len, ks[j], "falling");
        for (size_t i = 0; i < len; i++)
            v[i] = -1.0f;
        v[len - 1] = 5.0f;
        check_against_sort(v, len, ks[j], "last spike");
    }
    free(v);
}
END_TEST

START_TEST(infinities_and_nan_are_ranked_like_numbers_or_left_out)
{
    size_t len = lengths[_i];
    tu_rng r = {(uint64_t)len + 7};
    float *v = tu_malloc(len * sizeof *v);
    for (size_t j = 0; j < sizeof ks / sizeof ks[0]; j++) {
        for (size_t i = 0; i < len; i++)
            v[i] = tu_normal(&r);
        v[len / 2] = INFINITY;
        v[len / 3] = -INFINITY;
        check_against_sort(v, len, ks[j], "+-inf");
        for (size_t i = 0; i < len; i++)
            v[i] = i % 3 == 0 ? -INFINITY : tu_normal(&r);
        check_against_sort(v, len, ks[j], "many -inf");
        for (size_t i = 0; i < len; i++)
            v[i] = -INFINITY;
        check_against_sort(v, len, ks[j], "all -inf");
        /* NaN is never chosen over a number (it compares false with everything). */
        for (size_t i = 0; i < len; i++)
            v[i] = i % 5 == 1 ? NAN : tu_normal(&r);
        size_t numbers = 0;
        for (size_t i = 0; i < len; i++)
            numbers += isnan(v[i]) ? 0u : 1u;
        check_against_sort(v, len, ks[j] < numbers ? ks[j] : numbers, "nan");
    }
    free(v);
}
END_TEST

START_TEST(k_zero_and_empty_input_select_nothing)
{
    float v[3] = {1, 2, 3};
    sae__scored out[3];
    ck_assert_uint_eq(sae__topk_select(v, 3, 0, out), 0);
    ck_assert_uint_eq(sae__topk_select(v, 0, 5, out), 0);
}
END_TEST

static Suite *topk_suite(void)
{
    Suite *s = suite_create("topk");
    TCase *tc = tcase_create("topk");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, random_values_match_a_stable_sort, 0, (int)N_LENGTHS);
    tcase_add_loop_test(tc, ties_go_to_the_lower_index, 0, (int)N_LENGTHS);
    tcase_add_loop_test(tc, adversarial_orders_match_a_stable_sort, 0, (int)N_LENGTHS);
    tcase_add_loop_test(tc, infinities_and_nan_are_ranked_like_numbers_or_left_out, 0,
                        (int)N_LENGTHS);
    tcase_add_test(tc, k_zero_and_empty_input_select_nothing);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(topk_suite)
