#include "testutil.h"

#include <stdbool.h>

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

/* Random weights for every tensor m holds, at scales that keep codes O(1). */
static void fill_model(sae_model *m, uint64_t seed)
{
    const size_t d_in = sae_model_d_in(m), d_sae = sae_model_d_sae(m), d_out = sae_model_d_out(m);
    size_t most = d_in * d_sae > d_sae * d_out ? d_in * d_sae : d_sae * d_out;
    if (d_in * d_out > most)
        most = d_in * d_out;
    tu_rng r = {seed};
    float *buf = tu_malloc(most * sizeof(float));
    float scale = 1.0f / sqrtf((float)d_in);
    tu_fill(&r, buf, d_in * d_sae, -scale, scale);
    ck_assert_ok(sae_model_set_tensor(m, SAE_W_ENC, buf));
    tu_fill(&r, buf, d_sae * d_out, -scale, scale);
    ck_assert_ok(sae_model_set_tensor(m, SAE_W_DEC, buf));
    tu_fill(&r, buf, d_sae, -0.2f, 0.2f);
    ck_assert_ok(sae_model_set_tensor(m, SAE_B_ENC, buf));
    tu_fill(&r, buf, d_out, -0.5f, 0.5f);
    ck_assert_ok(sae_model_set_tensor(m, SAE_B_DEC, buf));
    if (sae_model_has_tensor(m, SAE_THRESHOLD)) {
        tu_fill(&r, buf, d_sae, 0.0f, 0.5f);
        ck_assert_ok(sae_model_set_tensor(m, SAE_THRESHOLD, buf));
    }
    if (sae_model_has_tensor(m, SAE_R_MAG)) {
        tu_fill(&r, buf, d_sae, -0.5f, 0.5f);
        ck_assert_ok(sae_model_set_tensor(m, SAE_R_MAG, buf));
        tu_fill(&r, buf, d_sae, -0.2f, 0.2f);
        ck_assert_ok(sae_model_set_tensor(m, SAE_B_MAG, buf));
    }
    if (sae_model_has_tensor(m, SAE_W_SKIP)) {
        tu_fill(&r, buf, d_in * d_out, -scale, scale);
        ck_assert_ok(sae_model_set_tensor(m, SAE_W_SKIP, buf));
    }
    free(buf);
}

sae_model *tu_random_model(sae_arch arch, size_t d_in, size_t d_sae, uint64_t seed)
{
    sae_model *m = NULL;
    ck_assert_ok(sae_model_new(&m, arch, d_in, d_sae));
    fill_model(m, seed);
    return m;
}

sae_model *tu_random_kind(sae_arch arch, tu_kind kind, size_t d_in, size_t d_sae, size_t d_out,
                          uint64_t seed)
{
    sae_model *m = NULL;
    if (kind == TU_SAE)
        ck_assert_ok(sae_model_new(&m, arch, d_in, d_sae));
    else
        ck_assert_ok(sae_model_new_transcoder(&m, arch, d_in, d_sae, d_out, kind == TU_SKIP));
    fill_model(m, seed);
    return m;
}

static float *get_tensor(const sae_model *m, sae_tensor t, size_t count)
{
    if (!sae_model_has_tensor(m, t))
        return NULL;
    float *v = tu_malloc(count * sizeof(float));
    ck_assert_ok(sae_model_get_tensor(m, t, v));
    return v;
}

void tu_weights_get(const sae_model *m, tu_weights *w)
{
    memset(w, 0, sizeof *w);
    w->arch = sae_model_arch(m);
    w->d_in = sae_model_d_in(m);
    w->d_sae = sae_model_d_sae(m);
    w->d_out = sae_model_d_out(m);
    w->transcoder = sae_model_is_transcoder(m);
    double v;
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_APPLY_B_DEC_TO_INPUT, &v));
    w->apply_b_dec = (int)v;
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_NORMALIZE, &v));
    w->normalize = (int)v;
    ck_assert_ok(sae_model_get_param(m, SAE_PARAM_INPUT_SCALE, &w->scale));
    if (w->arch == SAE_ARCH_TOPK || w->arch == SAE_ARCH_BATCHTOPK ||
        w->arch == SAE_ARCH_GROUPMAX) {
        ck_assert_ok(sae_model_get_param(m, SAE_PARAM_K, &v));
        w->k = (size_t)v;
    }
    if (w->arch == SAE_ARCH_BATCHTOPK)
        ck_assert_ok(sae_model_get_param(m, SAE_PARAM_THRESHOLD, &w->batch_threshold));
    w->W_enc = get_tensor(m, SAE_W_ENC, w->d_in * w->d_sae);
    w->W_dec = get_tensor(m, SAE_W_DEC, w->d_sae * w->d_out);
    w->b_enc = get_tensor(m, SAE_B_ENC, w->d_sae);
    w->b_dec = get_tensor(m, SAE_B_DEC, w->d_out);
    w->threshold = get_tensor(m, SAE_THRESHOLD, w->d_sae);
    w->r_mag = get_tensor(m, SAE_R_MAG, w->d_sae);
    w->b_mag = get_tensor(m, SAE_B_MAG, w->d_sae);
    w->W_skip = get_tensor(m, SAE_W_SKIP, w->d_in * w->d_out);
}

void tu_weights_free(tu_weights *w)
{
    free(w->W_enc);
    free(w->W_dec);
    free(w->b_enc);
    free(w->b_dec);
    free(w->threshold);
    free(w->r_mag);
    free(w->b_mag);
    free(w->W_skip);
    memset(w, 0, sizeof *w);
}

void tu_ref_norm(const tu_weights *w, const float *x, double *mu, double *a, double *b)
{
    const size_t d = w->d_in;
    *mu = 0, *a = 1, *b = 1;
    if (w->normalize == SAE_NORMALIZE_LAYER_NORM) {
        double sum = 0, sq = 0;
        for (size_t j = 0; j < d; j++)
            sum += x[j];
        *mu = sum / (double)d;
        for (size_t j = 0; j < d; j++)
            sq += (x[j] - *mu) * (x[j] - *mu);
        double sigma = sqrt(sq / (double)(d - 1));
        *a = 1.0 / (sigma + 1e-5);
        *b = sigma;
    } else if (w->normalize == SAE_NORMALIZE_CONSTANT_NORM) {
        double sq = 0;
        for (size_t j = 0; j < d; j++)
            sq += (double)x[j] * x[j];
        *a = sqrt((double)d) / sqrt(sq);
        *b = 1.0 / *a;
    }
}

/* The encoder's input column product, without b_enc. */
static void ref_raw(const tu_weights *w, const float *x, double *raw)
{
    double mu, a, b;
    tu_ref_norm(w, x, &mu, &a, &b);
    for (size_t i = 0; i < w->d_sae; i++) {
        double acc = 0;
        for (size_t j = 0; j < w->d_in; j++) {
            double xs = w->scale * ((x[j] - mu) * a) - (w->apply_b_dec ? w->b_dec[j] : 0.0);
            acc += xs * w->W_enc[j * w->d_sae + i];
        }
        raw[i] = acc;
    }
}

void tu_ref_preact(const tu_weights *w, const float *x, double *pre)
{
    ref_raw(w, x, pre);
    for (size_t i = 0; i < w->d_sae; i++)
        pre[i] += w->b_enc[i];
}

void tu_ref_encode(const tu_weights *w, const float *x, double *f)
{
    double *raw = tu_malloc(w->d_sae * sizeof(double));
    double *pre = tu_malloc(w->d_sae * sizeof(double));
    ref_raw(w, x, raw);
    for (size_t i = 0; i < w->d_sae; i++)
        pre[i] = raw[i] + w->b_enc[i];
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
        case SAE_ARCH_GATED: {
            /* Written as the contract does: the magnitude path's own weights W_enc * exp(r). */
            double mag = w->b_mag[i];
            double mu, a, b;
            tu_ref_norm(w, x, &mu, &a, &b);
            for (size_t j = 0; j < w->d_in; j++) {
                double xs = w->scale * ((x[j] - mu) * a) - (w->apply_b_dec ? w->b_dec[j] : 0.0);
                mag += xs * (w->W_enc[j * w->d_sae + i] * exp(w->r_mag[i]));
            }
            f[i] = p > 0 ? (mag > 0 ? mag : 0) : 0;
            break;
        }
        case SAE_ARCH_GROUPMAX: {
            size_t width = w->d_sae / w->k, first = i / width * width;
            bool wins = true; /* largest of its group, the first of equals */
            for (size_t j = first; j < first + width; j++) {
                double q = pre[j] > 0 ? pre[j] : 0;
                if (q > relu || (q == relu && j < i))
                    wins = false;
            }
            f[i] = wins ? relu : 0;
            break;
        }
        }
    }
    free(raw);
    free(pre);
}

void tu_ref_decode(const tu_weights *w, const double *f, double *x_hat)
{
    for (size_t j = 0; j < w->d_out; j++) {
        double acc = w->b_dec[j];
        for (size_t i = 0; i < w->d_sae; i++)
            acc += f[i] * w->W_dec[i * w->d_out + j];
        x_hat[j] = w->transcoder ? acc : acc / w->scale;
    }
}

void tu_ref_output(const tu_weights *w, const float *x, double *out)
{
    double *f = tu_malloc(w->d_sae * sizeof(double));
    tu_ref_encode(w, x, f);
    tu_ref_decode(w, f, out);
    if (w->W_skip != NULL)
        for (size_t o = 0; o < w->d_out; o++)
            for (size_t j = 0; j < w->d_in; j++)
                out[o] += (double)x[j] * w->W_skip[j * w->d_out + o];
    if (!w->transcoder) {
        double mu, a, b;
        tu_ref_norm(w, x, &mu, &a, &b);
        for (size_t o = 0; o < w->d_out; o++)
            out[o] = out[o] * b + mu;
    }
    free(f);
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

char *tu_path_in(const char *dir, const char *name)
{
    size_t len = strlen(dir) + strlen(name) + 2;
    char *p = tu_malloc(len);
    snprintf(p, len, "%s/%s", dir, name);
    return p;
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
