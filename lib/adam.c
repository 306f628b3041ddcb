/* The Adam optimizer over flat float arrays, in torch.optim.Adam's arithmetic, so that a run
 * compares with the Python trainers (SAELens, sparsify, OpenAI's sparse_autoencoder all use it). */
#include "train_internal.h"

#include <float.h>
#include <math.h>

/* The step's constants, in float as the update uses them. */
typedef struct {
    float step_size, inv_bc2_sqrt, b1, b2, c1, c2, eps, scale, clip;
} consts;

/* The bias corrections in double: 1 - 0.999^t loses most of its digits in float early on. */
void sae__adam_prepare(sae__adam *a)
{
    a->bias1 = 1.0 - pow(a->beta1, (double)a->step);
    a->bias2 = 1.0 - pow(a->beta2, (double)a->step);
}

static consts consts_of(const sae__adam *a)
{
    /* Neither is ever 0 once set: step >= 1 and beta < 1. */
    const double bc1 = a->bias1 != 0.0 ? a->bias1 : 1.0 - pow(a->beta1, (double)a->step);
    const double bc2 = a->bias2 != 0.0 ? a->bias2 : 1.0 - pow(a->beta2, (double)a->step);
    consts c = {(float)(a->lr / bc1),        (float)(1.0 / sqrt(bc2)),  (float)a->beta1,
                (float)a->beta2,             (float)(1.0 - a->beta1),   (float)(1.0 - a->beta2),
                (float)a->eps,               a->scale,                  a->clip};
    return c;
}

/* One element's new moment estimates and parameter. sae__adam_check and sae__adam_update both
 * compute through this one function, so the values the check approves are the values written. */
static inline void moments1(const consts *c, float g0, float m, float v, float *m1, float *v1)
{
    /* Two roundings, as the two scaling passes over the buffer this replaces made (times 1 is
     * exact, so without clipping g is g0 * scale). */
    const float g = g0 * c->scale * c->clip;
    *m1 = c->b1 * m + c->c1 * g;
    *v1 = c->b2 * v + c->c2 * g * g;
}

static inline void step1(const consts *c, float p, float g0, float m, float v, float *p1, float *m1,
                         float *v1)
{
    float mi, vi;
    moments1(c, g0, m, v, &mi, &vi);
    *m1 = mi;
    *v1 = vi;
    *p1 = p - c->step_size * mi / (sqrtf(vi) * c->inv_bc2_sqrt + c->eps);
}

/* The loops below work in groups of 8 elements with a fixed inner count, so that -O2 turns them
 * into vector instructions (sqrtf and division included: adam.c is compiled with
 * -fno-math-errno, see lib/CMakeLists.txt). */
enum { LANES = 8 };

void sae__adam_update(float *restrict p, const float *restrict g, float *restrict m,
                      float *restrict v, size_t n, const sae__adam *a)
{
    const consts c = consts_of(a);
    size_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (size_t q = 0; q < LANES; q++)
            step1(&c, p[i + q], g[i + q], m[i + q], v[i + q], &p[i + q], &m[i + q], &v[i + q]);
    for (; i < n; i++)
        step1(&c, p[i], g[i], m[i], v[i], &p[i], &m[i], &v[i]);
}

/* Whether x is finite, as a compare the compiler can vectorize (false for NaN and infinities);
 * an int, not a bool, so that lanes combine with & and the loop stays branch-free. */
static inline int finite1(float x) { return fabsf(x) <= FLT_MAX; }

/* Elements checked between tests of the flags: the loop runs without an exit inside. */
enum { CHECK_BLOCK = 1024 };

/* The largest |m1| for which the parameter's new value is sure to be finite when |p| <= FLT_MAX / 2
 * and 0 <= v1 <= FLT_MAX; 0 when no bound holds (eps = 0: the divisor may be 0). With v1 >= 0
 * the divisor sqrt(v1) / sqrt(1 - b2^t) + eps is at least eps, so |step_size * m1 / divisor| is
 * at most about step_size |m1| / eps: this bound keeps it below FLT_MAX / 8 (and step_size * m1
 * finite), with room for every rounding. */
static float sure_bound(const consts *c)
{
    if (!(c->eps > 0.0f))
        return 0.0f;
    double k = (double)FLT_MAX / 8.0 * (c->eps < 1.0f ? (double)c->eps : 1.0);
    if (c->step_size > 0.0f)
        k /= (double)c->step_size;
    return k >= (double)FLT_MAX ? FLT_MAX : (float)k;
}

int sae__adam_check(const float *p, const float *g, const float *m, const float *v, size_t n,
                    const sae__adam *a, size_t *bad)
{
    const consts c = consts_of(a);
    const float sure = sure_bound(&c), p_max = FLT_MAX / 2;
    for (size_t i0 = 0; i0 < n; i0 += CHECK_BLOCK) {
        const size_t i1 = n - i0 < CHECK_BLOCK ? n : i0 + CHECK_BLOCK;
        size_t i = i0;
        if (sure > 0.0f) {
            /* Bounds that imply the exact test without its square root and division; a block
             * they do not clear takes the exact test below. */
            int fast[LANES] = {1, 1, 1, 1, 1, 1, 1, 1};
            for (; i + LANES <= i1; i += LANES)
                for (size_t q = 0; q < LANES; q++) {
                    float m1, v1;
                    moments1(&c, g[i + q], m[i + q], v[i + q], &m1, &v1);
                    fast[q] &= (fabsf(m1) <= sure) & (v1 >= 0.0f) & (v1 <= FLT_MAX) &
                               (fabsf(p[i + q]) <= p_max);
                }
            int all = 1;
            for (size_t q = 0; q < LANES; q++)
                all &= fast[q];
            for (; i < i1; i++) {
                float m1, v1;
                moments1(&c, g[i], m[i], v[i], &m1, &v1);
                all &= (fabsf(m1) <= sure) & (v1 >= 0.0f) & (v1 <= FLT_MAX) &
                       (fabsf(p[i]) <= p_max);
            }
            if (all)
                continue;
            i = i0;
        }
        int ok[LANES] = {1, 1, 1, 1, 1, 1, 1, 1};
        for (; i + LANES <= i1; i += LANES)
            for (size_t q = 0; q < LANES; q++) {
                float p1, m1, v1;
                step1(&c, p[i + q], g[i + q], m[i + q], v[i + q], &p1, &m1, &v1);
                ok[q] &= finite1(p1) & finite1(m1) & finite1(v1);
            }
        int all = 1;
        for (size_t q = 0; q < LANES; q++)
            all &= ok[q];
        for (; i < i1; i++) {
            float p1, m1, v1;
            step1(&c, p[i], g[i], m[i], v[i], &p1, &m1, &v1);
            all &= finite1(p1) & finite1(m1) & finite1(v1);
        }
        if (all)
            continue;
        for (i = i0; i < i1; i++) {
            float p1, m1, v1;
            step1(&c, p[i], g[i], m[i], v[i], &p1, &m1, &v1);
            *bad = i;
            if (!finite1(m1))
                return 1;
            if (!finite1(v1))
                return 2;
            if (!finite1(p1))
                return 3;
        }
    }
    return 0;
}

double sae__adam_sumsq(const float *g, size_t n, float scale, int *finite)
{
    /* Squares of floats never overflow a double, nor do 2^64 of them: the sum is finite exactly
     * when every g is (a NaN stays NaN, an infinity times scale > 0 stays infinite). */
    /* Eight sums in named variables, not an array: GCC kept an array's lanes in memory, each add
     * waiting on the previous store (three cycles an element). */
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0, s4 = 0.0, s5 = 0.0, s6 = 0.0, s7 = 0.0;
    size_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        const double a0 = (double)(g[i] * scale), a1 = (double)(g[i + 1] * scale);
        const double a2 = (double)(g[i + 2] * scale), a3 = (double)(g[i + 3] * scale);
        const double a4 = (double)(g[i + 4] * scale), a5 = (double)(g[i + 5] * scale);
        const double a6 = (double)(g[i + 6] * scale), a7 = (double)(g[i + 7] * scale);
        s0 += a0 * a0;
        s1 += a1 * a1;
        s2 += a2 * a2;
        s3 += a3 * a3;
        s4 += a4 * a4;
        s5 += a5 * a5;
        s6 += a6 * a6;
        s7 += a7 * a7;
    }
    for (; i < n; i++) {
        const double a = (double)(g[i] * scale);
        s0 += a * a;
    }
    const double sum = ((s0 + s4) + (s1 + s5)) + ((s2 + s6) + (s3 + s7));
    *finite = isfinite(sum);
    return sum;
}

void sae__adam_scaled(float *restrict dst, const float *restrict g, size_t n, const sae__adam *a)
{
    const consts c = consts_of(a);
    size_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (size_t q = 0; q < LANES; q++)
            dst[i + q] = g[i + q] * c.scale * c.clip;
    for (; i < n; i++)
        dst[i] = g[i] * c.scale * c.clip;
}
