#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

uint64_t tu_next(tu_rng *r)
{
    uint64_t z = (r->state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

float tu_uniform(tu_rng *r, float lo, float hi)
{
    double u = (double)(tu_next(r) >> 11) * 0x1.0p-53;
    return (float)(lo + (hi - lo) * u);
}

float tu_normal(tu_rng *r)
{
    double u1 = ((double)(tu_next(r) >> 11) + 1.0) * 0x1.0p-53;
    double u2 = (double)(tu_next(r) >> 11) * 0x1.0p-53;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

void tu_fill(tu_rng *r, float *v, size_t n, float lo, float hi)
{
    for (size_t i = 0; i < n; i++)
        v[i] = tu_uniform(r, lo, hi);
}

void *tu_malloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    ck_assert_msg(p != NULL, "out of memory allocating %zu bytes", bytes);
    return p;
}

sae_model *tu_random_model(sae_arch arch, size_t d_in, size_t d_sae, uint64_t seed)
{
    sae_model *m = NULL;
    ck_assert_ok(sae_model_new(&m, arch, d_in, d_sae));
    tu_rng r = {seed};
    float *buf = tu_malloc(d_in * d_sae * sizeof(float));
    float scale = 1.0f / sqrtf((float)d_in);
    tu_fill(&r, buf, d_in * d_sae, -scale, scale);
    ck_assert_ok(sae_model_set_tensor(m, SAE_W_ENC, buf));
    tu_fill(&r, buf, d_in * d_sae, -scale, scale);
    ck_assert_ok(sae_model_set_tensor(m, SAE_W_DEC, buf));
    tu_fill(&r, buf, d_sae, -0.2f, 0.2f);
    ck_assert_ok(sae_model_set_tensor(m, SAE_B_ENC, buf));
    tu_fill(&r, buf, d_in, -0.5f, 0.5f);
    ck_assert_ok(sae_model_set_tensor(m, SAE_B_DEC, buf));
    if (arch == SAE_ARCH_JUMPRELU) {
        tu_fill(&r, buf, d_sae, 0.0f, 0.5f);
        ck_assert_ok(sae_model_set_tensor(m, SAE_THRESHOLD, buf));
    }
    free(buf);
    return m;
}

void tu_weights_get(const sae_model *m, tu_weights *w)
{
    memset(w, 0, sizeof *w);
    w->arch = sae_model_arch(m);
    w->d_in = sae_model_d_in(m);
    w->d_sae = sae_model_d_sae(m);
    double v;
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, &v));
    w->apply_b_dec = (int)v;
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_INPUT_SCALE, &w->scale));
    if (w->arch == SAE_ARCH_TOPK || w->arch == SAE_ARCH_BATCHTOPK) {
        ck_assert_ok(sae_model_get_param(m, SAE_PARAM_K, &v));
        w->k = (size_t)v;
    }
    if (w->arch == SAE_ARCH_BATCHTOPK)
        ck_assert_ok(sae_model_get_param(m, SAE_PARAM_THRESHOLD, &w->batch_threshold));
    w->W_enc = tu_malloc(w->d_in * w->d_sae * sizeof(float));
    w->W_dec = tu_malloc(w->d_in * w->d_sae * sizeof(float));
    w->b_enc = tu_malloc(w->d_sae * sizeof(float));
    w->b_dec = tu_malloc(w->d_in * sizeof(float));
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_ENC, w->W_enc));
    ck_assert_ok(sae_model_get_tensor(m, SAE_W_DEC, w->W_dec));
    ck_assert_ok(sae_model_get_tensor(m, SAE_B_ENC, w->b_enc));
    ck_assert_ok(sae_model_get_tensor(m, SAE_B_DEC, w->b_dec));
    if (w->arch == SAE_ARCH_JUMPRELU) {
        w->threshold = tu_malloc(w->d_sae * sizeof(float));
        ck_assert_ok(sae_model_get_tensor(m, SAE_THRESHOLD, w->threshold));
    }
}

void tu_weights_free(tu_weights *w)
{
    free(w->W_enc);
    free(w->W_dec);
    free(w->b_enc);
    free(w->b_dec);
    free(w->threshold);
    memset(w, 0, sizeof *w);
}

void tu_ref_preact(const tu_weights *w, const float *x, double *pre)
{
    for (size_t i = 0; i < w->d_sae; i++) {
        double acc = w->b_enc[i];
        for (size_t j = 0; j < w->d_in; j++) {
            double xs = w->scale * x[j] - (w->apply_b_dec ? w->b_dec[j] : 0.0);
            acc += xs * w->W_enc[j * w->d_sae + i];
        }
        pre[i] = acc;
    }
}

void tu_ref_encode(const tu_weights *w, const float *x, double *f)
{
    double *pre = tu_malloc(w->d_sae * sizeof(double));
    tu_ref_preact(w, x, pre);
    for (size_t i = 0; i < w->d_sae; i++) {
        double p = pre[i], relu = p > 0 ? p : 0;
        switch (w->arch) {
        case SAE_ARCH_RELU: f[i] = relu; break;
        case SAE_ARCH_JUMPRELU: f[i] = p > w->threshold[i] ? relu : 0; break;
        case SAE_ARCH_BATCHTOPK: f[i] = (p > w->batch_threshold && p > 0) ? p : 0; break;
        case SAE_ARCH_TOPK: {
            /* Rank of i: how many entries beat it (larger, or equal with a lower index). */
            size_t beaten_by = 0;
            for (size_t j = 0; j < w->d_sae; j++)
                if (pre[j] > p || (pre[j] == p && j < i))
                    beaten_by++;
            f[i] = beaten_by < w->k ? relu : 0;
            break;
        }
        }
    }
    free(pre);
}

void tu_ref_decode(const tu_weights *w, const double *f, double *x_hat)
{
    for (size_t j = 0; j < w->d_in; j++) {
        double acc = w->b_dec[j];
        for (size_t i = 0; i < w->d_sae; i++)
            acc += f[i] * w->W_dec[i * w->d_in + j];
        x_hat[j] = acc / w->scale;
    }
}

void tu_assert_close(const float *got, const double *want, size_t n, double tol, const char *what)
{
    double largest = 1.0;
    for (size_t i = 0; i < n; i++)
        if (fabs(want[i]) > largest)
            largest = fabs(want[i]);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(fabs((double)got[i] - want[i]) <= tol * largest,
                      "%s[%zu] = %.9g, expected %.9g (tolerance %g)", what, i, (double)got[i],
                      want[i], tol * largest);
}

char *tu_tmp_path(const char *name)
{
    const char *dir = getenv("SAE_TEST_TMPDIR");
    if (dir == NULL || *dir == '\0')
        dir = "/tmp";
    size_t len = strlen(dir) + strlen(name) + 32;
    char *path = tu_malloc(len);
    snprintf(path, len, "%s/%ld-%s", dir, (long)getpid(), name);
    return path;
}

void tu_write_file(const char *path, const void *data, size_t size)
{
    FILE *fp = fopen(path, "wb");
    ck_assert_msg(fp != NULL, "cannot create %s", path);
    ck_assert_uint_eq(fwrite(data, 1, size, fp), size);
    ck_assert_int_eq(fclose(fp), 0);
}

unsigned char *tu_read_file(const char *path, size_t *size)
{
    FILE *fp = fopen(path, "rb");
    ck_assert_msg(fp != NULL, "cannot open %s", path);
    fseek(fp, 0, SEEK_END);
    long len = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    unsigned char *buf = tu_malloc((size_t)len + 1);
    ck_assert_uint_eq(fread(buf, 1, (size_t)len, fp), (size_t)len);
    fclose(fp);
    *size = (size_t)len;
    return buf;
}

char *tu_data_path(const char *rel)
{
    const char *dir = getenv("SAE_DATA_DIR");
    if (dir == NULL || *dir == '\0')
        dir = SAE_DATA_DIR;
    size_t len = strlen(dir) + strlen(rel) + 2;
    char *path = tu_malloc(len);
    snprintf(path, len, "%s/%s", dir, rel);
    return path;
}

int tu_run_suite(Suite *s)
{
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
