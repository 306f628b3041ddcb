/* The damaged-file corpus: every loader must refuse a malformed file with SAE_EFORMAT (or
 * SAE_EUNSUPPORTED where the file is valid but asks for something libsae does not do) and a
 * message naming the file, without a crash, a hang, a read outside the file or a huge
 * allocation. tests/run runs this suite under ASan + UBSan, which turn any of those into a
 * failure. Files: truncated at every offset, header lengths past the end and near 2^64, offsets
 * reversed / negative / fractional / past the end / overlapping, shapes that disagree with the
 * offsets or overflow, unknown dtypes, missing tensors, wrong JSON types in cfg.json, bad zip
 * archives and .npy members, garbage, and byte flips of every valid file. */
#include "formats.h"
#include "testutil.h"
#include "writers.h"

#include <locale.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* A folder the case's files go into; the weights file is rewritten for each case. */
typedef struct {
    char *dir;
    char *weights; /* dir/<weights name> */
    char *cfg;     /* dir/cfg.json */
} place;

static place make_place(const char *weights_name)
{
    place p;
    p.dir = tu_tmp_path("corrupt");
    ck_assert_int_eq(mkdir(p.dir, 0755), 0);
    size_t len = strlen(p.dir) + 64;
    p.weights = tu_malloc(len);
    p.cfg = tu_malloc(len);
    snprintf(p.weights, len, "%s/%s", p.dir, weights_name);
    snprintf(p.cfg, len, "%s/cfg.json", p.dir);
    /* SAELens weights load only with their cfg.json: the one the corpus's files (d_in 2,
     * d_sae 3) would have. A case that needs another writes its own over it. */
    if (strcmp(weights_name, "sae_weights.safetensors") == 0)
        tw_write_text(p.cfg, "{\"d_in\": 2, \"d_sae\": 3, \"architecture\": \"standard\"}");
    return p;
}

static void free_place(place *p)
{
    unlink(p->weights);
    unlink(p->cfg);
    ck_assert_int_eq(rmdir(p->dir), 0);
    free(p->dir);
    free(p->weights);
    free(p->cfg);
}

/* Loads the weights file; returns the code after checking the contract of a refusal. */
static int try_load(const place *p, const void *data, size_t size, const char *what)
{
    tw_write(p->weights, data, size);
    sae_model *m = (sae_model *)0x1;
    int rc = sae_model_load(&m, p->weights);
    if (rc == SAE_OK) {
        ck_assert_ptr_nonnull(m);
        /* A file that loads must also be usable. */
        size_t d_in = sae_model_d_in(m), d_sae = sae_model_d_sae(m);
        float *x = tu_malloc(d_in * sizeof(float)), *f = tu_malloc(d_sae * sizeof(float));
        for (size_t i = 0; i < d_in; i++)
            x[i] = 0.5f;
        int erc = sae_encode(m, x, 1, f);
        ck_assert_msg(erc == SAE_OK || erc == SAE_EINVAL, "%s: encode returned %d", what, erc);
        free(x);
        free(f);
        sae_model_free(m);
        return rc;
    }
    ck_assert_msg(rc == SAE_EFORMAT || rc == SAE_EUNSUPPORTED,
                  "%s: load returned %d (%s): %s", what, rc, sae_strerror(rc), sae_last_error());
    ck_assert_ptr_null(m);
    ck_assert_msg(strstr(sae_last_error(), p->dir) != NULL, "%s: message '%s' names no file",
                  what, sae_last_error());
    return rc;
}

static void must_refuse(const place *p, const void *data, size_t size, const char *what,
                        const char *needle)
{
    int rc = try_load(p, data, size, what);
    ck_assert_msg(rc != SAE_OK, "%s: a damaged file loaded", what);
    if (needle != NULL)
        ck_assert_msg(strstr(sae_last_error(), needle) != NULL, "%s: message '%s' lacks '%s'",
                      what, sae_last_error(), needle);
}

/* Every prefix of a valid file is refused (the full file loads). */
static void truncations(const place *p, const tw_buf *valid, const char *kind)
{
    ck_assert_int_eq(try_load(p, valid->data, valid->size, kind), SAE_OK);
    for (size_t cut = 0; cut < valid->size; cut++) {
        char what[64];
        snprintf(what, sizeof what, "%s cut at %zu of %zu", kind, cut, valid->size);
        must_refuse(p, valid->data, cut, what, NULL);
    }
}

/* Single-byte changes anywhere: loading must end in a model or a refusal, never a crash. */
static void byte_flips(const place *p, const tw_buf *valid, const char *kind, uint64_t seed)
{
    unsigned char *copy = tu_malloc(valid->size);
    tu_rng r = {seed};
    static const unsigned char values[] = {0x00, 0xff, 0x7f, 0x80, '9', '-', '"', '{', ']', ','};
    for (int i = 0; i < 400; i++) {
        memcpy(copy, valid->data, valid->size);
        size_t at = (size_t)(tu_next(&r) % valid->size);
        copy[at] = i % 2 ? values[tu_next(&r) % sizeof values] : (unsigned char)tu_next(&r);
        char what[64];
        snprintf(what, sizeof what, "%s with byte %zu changed", kind, at);
        try_load(p, copy, valid->size, what);
    }
    free(copy);
}

/* ---- valid files to damage ---------------------------------------------------------------- */

static const float W[12] = {0.5f, -0.25f, 0.75f, 1.0f, -1.0f, 0.125f,
                            0.5f, 0.25f,  -0.5f, 1.5f, 0.0f,  -0.75f};

static void saelens_file(tw_buf *out)
{
    tw_tensor t[5] = {{"W_dec", "F32", 2, {3, 2}, W},
                      {"W_enc", "F32", 2, {2, 3}, W},
                      {"b_dec", "F32", 1, {2, 0}, W},
                      {"b_enc", "F32", 1, {3, 0}, W},
                      {"threshold", "BF16", 1, {3, 0}, W}};
    tw_safetensors(out, t, 5, NULL);
}

/* saelens_file without its threshold: a standard SAE. */
static void saelens_plain_file(tw_buf *out)
{
    tw_tensor t[4] = {{"W_dec", "F32", 2, {3, 2}, W},
                      {"W_enc", "F32", 2, {2, 3}, W},
                      {"b_dec", "F32", 1, {2, 0}, W},
                      {"b_enc", "F32", 1, {3, 0}, W}};
    tw_safetensors(out, t, 4, NULL);
}

/* The cfg.json SAELens writes beside saelens_file's JumpReLU weights. */
static void jumprelu_cfg(const place *p)
{
    tw_write_text(p->cfg, "{\"d_in\": 2, \"d_sae\": 3, \"architecture\": \"jumprelu\"}");
}

static void sparsify_file(tw_buf *out)
{
    tw_tensor t[4] = {{"W_dec", "BF16", 2, {3, 2}, W},
                      {"b_dec", "BF16", 1, {2, 0}, W},
                      {"encoder.bias", "BF16", 1, {3, 0}, W},
                      {"encoder.weight", "BF16", 2, {3, 2}, W}};
    tw_safetensors(out, t, 4, "{\"format\":\"pt\"}");
}

static void own_file(tw_buf *out)
{
    sae_model *m = tu_random_model(SAE_ARCH_JUMPRELU, 2, 3, 1);
    char *path = tu_tmp_path("own.safetensors");
    ck_assert_ok(sae_model_save(m, path));
    size_t size;
    unsigned char *bytes = tu_read_file(path, &size);
    tw_put(out, bytes, size);
    free(bytes);
    unlink(path);
    free(path);
    sae_model_free(m);
}

static void npz_file(tw_buf *out, int layout, const char *descr)
{
    const char *names[5] = {"W_enc.npy", "W_dec.npy", "b_enc.npy", "b_dec.npy", "threshold.npy"};
    tw_buf m[5] = {{0}};
    size_t s23[2] = {2, 3}, s32[2] = {3, 2}, s3[1] = {3}, s2[1] = {2};
    tw_npy(&m[0], descr, 2, s23, W);
    tw_npy(&m[1], descr, 2, s32, W);
    tw_npy(&m[2], descr, 1, s3, W);
    tw_npy(&m[3], descr, 1, s2, W);
    tw_npy(&m[4], descr, 1, s3, W);
    if (layout == 2)
        tw_zip64(out, names, m, 5);
    else
        tw_zip(out, names, m, 5, layout == 1);
    for (int i = 0; i < 5; i++)
        tw_free(&m[i]);
}

/* ---- truncation and byte flips of each format --------------------------------------------- */

START_TEST(truncated_and_flipped_safetensors)
{
    tw_buf b = {0};
    place p = make_place("sae_weights.safetensors");
    jumprelu_cfg(&p);
    saelens_file(&b);
    truncations(&p, &b, "SAELens");
    byte_flips(&p, &b, "SAELens", 1);
    tw_free(&b);
    own_file(&b);
    truncations(&p, &b, "libsae");
    byte_flips(&p, &b, "libsae", 2);
    tw_free(&b);
    free_place(&p);
    p = make_place("sae.safetensors");
    tw_write_text(p.cfg, "{\"k\": 2, \"num_latents\": 3, \"d_in\": 2}");
    sparsify_file(&b);
    truncations(&p, &b, "sparsify");
    byte_flips(&p, &b, "sparsify", 3);
    tw_free(&b);
    free_place(&p);
}
END_TEST

START_TEST(truncated_and_flipped_npz)
{
    place p = make_place("params.npz");
    static const char *const kinds[] = {"stored npz", "deflated npz", "ZIP64 npz"};
    for (int layout = 0; layout < 3; layout++) {
        tw_buf b = {0};
        npz_file(&b, layout, layout == 1 ? "<f2" : "<f4");
        truncations(&p, &b, kinds[layout]);
        byte_flips(&p, &b, kinds[layout], 10 + (uint64_t)layout);
        tw_free(&b);
    }
    free_place(&p);
}
END_TEST

/* ---- safetensors headers ------------------------------------------------------------------ */

/* Header entries of the valid SAELens file, as text to edit: W_dec [3,2] at 0, W_enc [2,3] at
 * 24, b_dec [2] at 48, b_enc [3] at 56; 68 data bytes. */
#define E_WDEC "\"W_dec\":{\"dtype\":\"F32\",\"shape\":[3,2],\"data_offsets\":[0,24]}"
#define E_WENC "\"W_enc\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[24,48]}"
#define E_BDEC "\"b_dec\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[48,56]}"
#define E_BENC "\"b_enc\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[56,68]}"
#define REST "," E_WENC "," E_BDEC "," E_BENC "}"

START_TEST(safetensors_headers)
{
    static const struct {
        const char *header, *needle;
        size_t data;
    } cases[] = {
        {"{" E_WDEC REST, NULL, 68}, /* the valid one: must load (checked below) */
        {"{\"W_dec\":{\"dtype\":\"F32\",\"shape\":[3,2],\"data_offsets\":[24,0]}" REST, "reversed", 68},
        {"{\"W_dec\":{\"dtype\":\"F32\",\"shape\":[3,2],\"data_offsets\":[-24,0]}" REST, "data_offsets", 68},
        {"{\"W_dec\":{\"dtype\":\"F32\",\"shape\":[3,2],\"data_offsets\":[0,23.5]}" REST, "data_offsets", 68},
        {"{\"W_dec\":{\"dtype\":\"F32\",\"shape\":[3,2],\"data_offsets\":[0,1e300]}" REST, "data_offsets", 68},
        {"{\"W_dec\":{\"dtype\":\"F32\",\"shape\":[3,2],\"data_offsets\":[0,24,48]}" REST, "data_offsets", 68},
        {"{\"W_dec\":{\"dtype\":\"F32\",\"shape\":[3,2],\"data_offsets\":\"0-24\"}" REST, "data_offsets", 68},
        {"{\"W_dec\":{\"dtype\":\"F32\",\"shape\":[3,2]}" REST, "data_offsets", 68},
        {"{" E_WDEC "," E_WENC "," E_BDEC ",\"b_enc\":{\"dtype\":\"F32\",\"shape\":[236],\"data_offsets\":[56,1000]}}", "past the end", 68},
        {"{" E_WDEC REST "xyz", "JSON", 68},
        {"{" E_WDEC REST "\n\t ", NULL, 68}, /* whitespace after the object is fine */
        {"{" E_WDEC ",\"W_enc\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}," E_BDEC "," E_BENC "}", "contiguous", 68},
        {"{" E_WDEC REST, "not described", 72}, /* 4 stray bytes at the end */
        {"{\"W_dec\":{\"dtype\":\"F32\",\"shape\":[3,3],\"data_offsets\":[0,24]}" REST, "needs", 68},
        {"{\"W_dec\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],\"data_offsets\":[0,24]}" REST, "overflows", 68},
        {"{\"W_dec\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904],\"data_offsets\":[0,24]}" REST, "shape", 68},
        {"{\"W_dec\":{\"dtype\":\"F32\",\"shape\":[-3,2],\"data_offsets\":[0,24]}" REST, "shape", 68},
        {"{\"W_dec\":{\"dtype\":\"F32\",\"shape\":[1.5,4],\"data_offsets\":[0,24]}" REST, "shape", 68},
        {"{\"W_dec\":{\"dtype\":\"F32\",\"shape\":[\"3\",2],\"data_offsets\":[0,24]}" REST, "shape", 68},
        {"{\"W_dec\":{\"dtype\":\"F32\",\"shape\":6,\"data_offsets\":[0,24]}" REST, "shape", 68},
        {"{\"W_dec\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,6],\"data_offsets\":[0,24]}" REST, "dimensions", 68},
        {"{\"W_dec\":{\"dtype\":\"F7\",\"shape\":[3,2],\"data_offsets\":[0,24]}" REST, "F7", 68},
        {"{\"W_dec\":{\"dtype\":5,\"shape\":[3,2],\"data_offsets\":[0,24]}" REST, "dtype", 68},
        {"{\"W_dec\":{\"dtype\":\"I32\",\"shape\":[3,2],\"data_offsets\":[0,24]}" REST, "not a float", 68},
        {"{\"W_dec\":5" REST, "not an object", 68},
        {"{\"W_enc\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},\"b_dec\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[24,32]},\"b_enc\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[32,44]}}", "W_dec", 44},
        {"{" E_WDEC "," E_WDEC REST, "twice", 68},
        {"{\"__metadata__\":{},\"__metadata__\":{}," E_WDEC REST, "'__metadata__' appears twice", 68},
        {"{\"__metadata__\":{\"format\":\"pt\",\"format\":\"libsae\"}," E_WDEC REST, "'format' appears twice in '__metadata__'", 68},
        {"{\"W_dec\":{\"dtype\":\"F32\",\"dtype\":\"F16\",\"shape\":[3,2],\"data_offsets\":[0,24]}" REST, "'dtype' appears twice in 'W_dec'", 68},
        /* "W_enc\u0000x" is another name to Python; cJSON's C string would say "W_enc". */
        {"{" E_WDEC ",\"W_enc\\u0000x\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[24,48]}," E_BDEC "," E_BENC "}", "W_enc\\u0000x", 68},
        {"{\"__metadata__\":{\"format\":\"libsae\\u0000\"}," E_WDEC REST, "\\u0000", 68},
        {"{\"W_dec\":{\"dtype\":\"F32\",\"shape\":[3,02],\"data_offsets\":[0,24]}" REST, "'02'", 68},
        {"{\"W_dec\":{\"dtype\":\"F32\",\"shape\":[3,2],\"data_offsets\":[0,24.]}" REST, "'24.'", 68},
        {"{\"W_dec\":{\"dtype\":\"F32\",\"shape\":[3,2],\"data_offsets\":[0,18446744073709551640]}" REST, "data_offsets", 68},
        /* An empty tensor sharing its offset with a full one tiles in either order (the
         * reference reader sorts by (begin, end)). */
        {"{" E_WDEC ",\"pad\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}" REST, NULL, 68},
        {"{\"pad\":{\"dtype\":\"F32\",\"shape\":[0,5],\"data_offsets\":[0,0]}," E_WDEC REST, NULL, 68},
        {"{" E_WDEC ",\"pad\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[68,68]}" REST, NULL, 68},
        {"{" E_WDEC ",\"pad\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[69,69]}" REST, "past the end", 68},
        {"{\"__metadata__\":[1]," E_WDEC REST, "__metadata__", 68},
        {"{\"__metadata__\":{\"format\":7}," E_WDEC REST, "__metadata__", 68},
        {"{\"__metadata__\":{\"format\":\"libsae\"}," E_WDEC REST, "architecture", 68},
        {"{\"__metadata__\":{\"format\":\"libsae\",\"architecture\":\"crosscoder\"}," E_WDEC REST, "crosscoder", 68},
        {"{\"__metadata__\":{\"format\":\"libsae\",\"architecture\":\"relu\",\"d_in\":\"two\",\"d_sae\":\"3\"}," E_WDEC REST, "d_in", 68},
        {"{\"__metadata__\":{\"format\":\"libsae\",\"architecture\":\"relu\",\"d_in\":\"2\",\"d_sae\":\"0\"}," E_WDEC REST, "d_sae", 68},
        {"{" E_WDEC ",", "JSON", 68},
        {"{\"W_dec\" \"W_enc\"}", "JSON", 68},
        {"[1,2,3]                                              ", "JSON", 68},
        {"{}", "not an SAE", 0},
        {"{\"lm_head\":{\"dtype\":\"F32\",\"shape\":[17],\"data_offsets\":[0,68]}}", "lm_head", 68},
        {"{\"W_enc\":{\"dtype\":\"F32\",\"shape\":[17],\"data_offsets\":[0,68]}}", "W_enc", 68},
        {"{\"W_enc\":{\"dtype\":\"F32\",\"shape\":[17,0],\"data_offsets\":[0,0]},\"pad\":{\"dtype\":\"U8\",\"shape\":[68],\"data_offsets\":[0,68]}}", "W_enc", 68},
    };
    place p = make_place("sae_weights.safetensors");
    unsigned char data[72];
    memset(data, 0, sizeof data);
    memcpy(data, W, sizeof W);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        tw_buf b = {0};
        tw_safetensors_raw(&b, cases[i].header, data, cases[i].data);
        char what[32];
        snprintf(what, sizeof what, "header case %zu", i);
        if (cases[i].needle == NULL)
            ck_assert_int_eq(try_load(&p, b.data, b.size, what), SAE_OK);
        else
            must_refuse(&p, b.data, b.size, what, cases[i].needle);
        tw_free(&b);
    }
    free_place(&p);
}
END_TEST

START_TEST(safetensors_header_lengths)
{
    place p = make_place("sae_weights.safetensors");
    jumprelu_cfg(&p);
    tw_buf valid = {0};
    saelens_file(&valid);
    static const uint64_t lengths[] = {0,
                                       1,
                                       2,
                                       UINT64_MAX,
                                       UINT64_MAX - 7,
                                       UINT64_MAX - 8,
                                       (uint64_t)1 << 63,
                                       (uint64_t)1 << 32,
                                       100000001,
                                       0}; /* the last is replaced by size - 7: one past */
    for (size_t i = 0; i < sizeof lengths / sizeof lengths[0]; i++) {
        uint64_t n = i + 1 == sizeof lengths / sizeof lengths[0] ? valid.size - 7 : lengths[i];
        unsigned char *copy = tu_malloc(valid.size);
        memcpy(copy, valid.data, valid.size);
        for (int j = 0; j < 8; j++)
            copy[j] = (unsigned char)(n >> (8 * j));
        char what[64];
        snprintf(what, sizeof what, "header length %llu", (unsigned long long)n);
        must_refuse(&p, copy, valid.size, what, NULL);
        free(copy);
    }
    must_refuse(&p, "\x02\0\0\0\0\0\0", 7, "7 bytes", "too short");
    /* cJSON's nesting limit stops a deep header before the stack does. */
    tw_buf deep = {0};
    for (int i = 0; i < 100000; i++)
        tw_put(&deep, "[", 1);
    tw_buf b = {0};
    tw_safetensors_raw(&b, (const char *)deep.data, NULL, 0);
    must_refuse(&p, b.data, b.size, "deep header", "JSON");
    b.data[8] = '{';
    must_refuse(&p, b.data, b.size, "deep header in an object", "JSON");
    tw_free(&b);
    tw_free(&deep);
    tw_free(&valid);
    free_place(&p);
}
END_TEST

/* ---- cfg.json ------------------------------------------------------------------------------ */

START_TEST(saelens_cfg_wrong_types)
{
    static const struct {
        const char *cfg, *needle;
    } cases[] = {
        {"{\"d_in\": \"2\", \"d_sae\": 3}", "'d_in' must be a whole number, found a string"},
        {"{\"d_in\": -2, \"d_sae\": 3}", "'d_in'"},
        {"{\"d_in\": 2.5, \"d_sae\": 3}", "'d_in'"},
        {"{\"d_in\": 1e300, \"d_sae\": 3}", "'d_in'"},
        {"{\"d_in\": 2}", "d_sae"},
        {"{\"d_in\": 0, \"d_sae\": 3}", "d_in"},
        {"{\"d_in\": 2, \"d_sae\": 3, \"apply_b_dec_to_input\": \"yes\"}", "apply_b_dec_to_input"},
        {"{\"d_in\": 2, \"d_sae\": 3, \"apply_b_dec_to_input\": 1}", "apply_b_dec_to_input"},
        {"{\"d_in\": 2, \"d_sae\": 3, \"architecture\": 5}", "architecture"},
        {"{\"d_in\": 2, \"d_sae\": 3, \"normalize_activations\": 3}", "normalize_activations"},
        {"{\"d_in\": 2, \"d_sae\": 3, \"architecture\": \"topk\", \"k\": \"4\", \"meta\": {\"sae_lens_version\": \"6.0.0\"}}", "'k'"},
        {"{\"d_in\": 2, \"d_sae\": 3, \"architecture\": \"topk\", \"k\": -3, \"meta\": {\"sae_lens_version\": \"6.0.0\"}}", "'k'"},
        {"{\"d_in\": 2, \"d_sae\": 3, \"architecture\": \"topk\", \"k\": 1e30, \"meta\": {\"sae_lens_version\": \"6.0.0\"}}", "'k'"},
        {"{\"d_in\": 2, \"d_sae\": 3, \"architecture\": \"topk\", \"activation_fn_kwargs\": [4]}", "k"},
        {"{\"d_in\": 2, \"d_sae\": 3, \"activation_fn_str\": [\"topk\"]}", "activation_fn_str"},
        {"{\"d_in\": 2, \"d_sae\": 3, \"dtype\": 32}", "dtype"},
        {"{\"d_in\": 2, \"d_sae\": 3, \"reshape_activations\": false}", "reshape_activations"},
        {"{\"d_in\": 2, \"d_sae\": 3, \"rescale_acts_by_decoder_norm\": \"no\"}", "rescale_acts_by_decoder_norm"},
        {"{\"d_in\": 3, \"d_sae\": 3}", "W_enc"}, /* disagrees with the weights */
        {"{\"d_in\": 2, \"d_sae\": 3, \"architecture\": \"standard\"}", NULL}, /* loads */
        {"{\"d_in\": 2, \"d_sae\": 3, \"architecture\": \"jumprelu\"}", "threshold"}, /* none */
        {"[2, 3]", "object"},
        {"\"cfg\"", "object"},
        {"{\"d_in\": 2, \"d_sae\": 3", "JSON"},
        {"", "JSON"},
        /* Python's json keeps the last of a repeated key, cJSON the first: refused. */
        {"{\"d_in\": 2, \"d_sae\": 3, \"d_in\": \"x\"}", "'d_in' appears twice"},
        {"{\"d_in\": 2, \"d_sae\": 3, \"d_in\": 2}", "'d_in' appears twice"},
        {"{\"d_in\": 2, \"d_sae\": 3, \"meta\": {\"sae_lens_version\": \"6.0.0\", \"sae_lens_version\": \"5.0\"}}", "'sae_lens_version' appears twice in 'meta'"},
        {"{\"d_in\": 2, \"d_sae\": 3, \"x\": [1, {\"y\": [{\"z\": 1, \"z\": 1}]}]}", "'z' appears twice"},
        /* \u0000 would end cJSON's C string early: "jumprelu\u0000x" read as "jumprelu". */
        {"{\"d_in\": 2, \"d_sae\": 3, \"architecture\": \"jumprelu\\u0000x\"}", "\\u0000"},
        {"{\"d_in\": 2, \"d_sae\": 3, \"architecture\": \"jumprelu\", \"x\\u0000\": 1}", "\\u0000"},
        {"{\"d_in\": 2, \"d_sae\": 3, \"architecture\": \"standard\", \"x\": \"\\\\u0000\"}", NULL}, /* an escaped backslash, then text */
        /* Numbers Python's json refuses, which cJSON takes. */
        {"{\"d_in\": 02, \"d_sae\": 3}", "'02'"},
        {"{\"d_in\": 2., \"d_sae\": 3}", "'2.'"},
        {"{\"d_in\": 2, \"d_sae\": 3, \"l1\": -0.5e-3, \"lr\": 4E+2}", NULL},
        {"{\"d_in\": 1e999, \"d_sae\": 3}", "'d_in'"},
        {"{\"d_in\": 2, \"d_sae\": 1e999}", "'d_sae'"},
    };
    place p = make_place("sae_weights.safetensors");
    tw_buf b = {0};
    saelens_plain_file(&b);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        tw_write_text(p.cfg, cases[i].cfg);
        char what[48];
        snprintf(what, sizeof what, "SAELens cfg case %zu", i);
        if (cases[i].needle == NULL)
            ck_assert_int_eq(try_load(&p, b.data, b.size, what), SAE_OK);
        else
            must_refuse(&p, b.data, b.size, what, cases[i].needle);
    }
    /* A cfg.json too large to be one, and one with a NUL inside. */
    tw_buf big = {0};
    tw_put(&big, "{\"d_in\": 2, \"d_sae\": 3, \"pad\": \"", 33);
    for (int i = 0; i < (1 << 20); i++)
        tw_put(&big, "x", 1);
    tw_put(&big, "\"}", 2);
    tw_write(p.cfg, big.data, big.size);
    must_refuse(&p, b.data, b.size, "huge cfg", "larger than");
    tw_free(&big);
    tw_write(p.cfg, "{\"d_in\": 2,\0 \"d_sae\": 3}", 25);
    must_refuse(&p, b.data, b.size, "NUL in cfg", "JSON");
    tw_free(&b);
    free_place(&p);
}
END_TEST

START_TEST(sparsify_cfg_wrong_types)
{
    static const struct {
        const char *cfg, *needle;
    } cases[] = {
        {"{\"k\": true, \"num_latents\": 3, \"d_in\": 2}", "'k'"},
        {"{\"k\": 2, \"num_latents\": 3, \"d_in\": null}", "d_in"},
        {"{\"k\": 2, \"num_latents\": \"3\", \"d_in\": 2}", "num_latents"},
        {"{\"k\": 2, \"num_latents\": 3, \"d_in\": 2, \"activation\": 1}", "activation"},
        {"{\"k\": 2, \"num_latents\": 3, \"d_in\": 2, \"activation\": \"softmax\"}", "softmax"},
        {"{\"k\": 2, \"num_latents\": 3, \"d_in\": 2, \"transcode\": \"no\"}", "transcode"},
        {"{\"k\": 2, \"expansion_factor\": 9007199254740992, \"d_in\": 9007199254740992}", "overflows"},
        {"{\"k\": 2, \"num_latents\": 0, \"expansion_factor\": 0, \"d_in\": 2}", "expansion_factor"},
        {"{\"k\": 5000000000, \"num_latents\": 3, \"d_in\": 2}", "'k'"},
        {"{\"k\": 2, \"num_latents\": 3, \"d_in\": 2}", NULL},
    };
    place p = make_place("sae.safetensors");
    tw_buf b = {0};
    sparsify_file(&b);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        tw_write_text(p.cfg, cases[i].cfg);
        char what[48];
        snprintf(what, sizeof what, "sparsify cfg case %zu", i);
        if (cases[i].needle == NULL)
            ck_assert_int_eq(try_load(&p, b.data, b.size, what), SAE_OK);
        else
            must_refuse(&p, b.data, b.size, what, cases[i].needle);
    }
    tw_free(&b);
    free_place(&p);
}
END_TEST

/* ---- zip archives and .npy members -------------------------------------------------------- */

static void npz_with(tw_buf *out, const tw_buf *w_enc, bool deflate)
{
    const char *names[5] = {"W_enc.npy", "W_dec.npy", "b_enc.npy", "b_dec.npy", "threshold.npy"};
    tw_buf m[5] = {{0}};
    size_t s32[2] = {3, 2}, s3[1] = {3}, s2[1] = {2};
    tw_put(&m[0], w_enc->data, w_enc->size);
    tw_npy(&m[1], "<f4", 2, s32, W);
    tw_npy(&m[2], "<f4", 1, s3, W);
    tw_npy(&m[3], "<f4", 1, s2, W);
    tw_npy(&m[4], "<f4", 1, s3, W);
    tw_zip(out, names, m, 5, deflate);
    for (int i = 0; i < 5; i++)
        tw_free(&m[i]);
}

/* A W_enc.npy member with a literal header dict (padded as numpy pads) and data bytes. */
static void npy_raw(tw_buf *out, int major, const char *dict, size_t data_bytes)
{
    size_t len = strlen(dict), prefix = major == 1 ? 10 : 12;
    size_t total = (prefix + len + 1 + 63) / 64 * 64;
    unsigned char pre[12] = {0x93, 'N', 'U', 'M', 'P', 'Y', (unsigned char)major, 0};
    size_t hl = total - prefix;
    for (size_t i = 0; i < prefix - 8; i++)
        pre[8 + i] = (unsigned char)(hl >> (8 * i));
    tw_put(out, pre, prefix);
    tw_put(out, dict, len);
    for (size_t i = prefix + len; i + 1 < total; i++)
        tw_put(out, " ", 1);
    tw_put(out, "\n", 1);
    for (size_t i = 0; i < data_bytes; i++)
        tw_put(out, "\0", 1);
}

START_TEST(npz_members)
{
    static const struct {
        int major;
        const char *dict;
        size_t data;
        const char *needle;
    } cases[] = {
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 24, NULL},
        {2, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 24, NULL},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 20, "needs 24 bytes"},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 28, "needs 24 bytes"},
        {1, "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 3), }", 24, "'<i4'"},
        {1, "{'descr': '|V2', 'fortran_order': False, 'shape': (2, 3), }", 12, "|V2"},
        {1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", 24, NULL},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 1), }", 24, "dimensional"},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 1, 1), }", 24, "dimensions"},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (6,), }", 24, "not a non-empty matrix"},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 3), }", 0, "not a non-empty matrix"},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }", 24, "W_dec.npy"},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (65536, 65536), }", 24, "needs"},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }", 24, "overflows"},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (18446744073709551615, 2), }", 24, "overflows"},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }", 24, "whole numbers"},
        {1, "{'descr': '<f4', 'shape': (2, 3), }", 24, "fortran_order"},
        {9, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 24, "version"},
        /* ast.literal_eval keeps the last of a repeated key; numpy refuses other keys. */
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'shape': (3, 2), }", 24, "'shape' appears twice"},
        {1, "{'descr': '<f2', 'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 24, "'descr' appears twice"},
        {1, "{'descr': '<f4', 'fortran_order': False, \"fortran_order\": True, 'shape': (2, 3), }", 24, "twice"},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': 1, }", 24, "'x'"},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'descr2': 'x'}", 24, "'descr2'"},
        {1, "{'xdescr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}", 24, "'xdescr'"},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}", 24, NULL},
        {1, "{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (2,3,)}", 24, NULL},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), } x", 24, "after"},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (02, 3), }", 24, "whole numbers"},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (-2, 3), }", 24, "whole numbers"},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 0), }", 0, "not a non-empty matrix"},
        {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3) 'x', }", 24, "','"},
        {1, "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2, 3), }", 24, "not supported"},
    };
    place p = make_place("params.npz");
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        for (int deflate = 0; deflate < 2; deflate++) {
            tw_buf member = {0}, zip = {0};
            npy_raw(&member, cases[i].major, cases[i].dict, cases[i].data);
            npz_with(&zip, &member, deflate);
            char what[48];
            snprintf(what, sizeof what, "npy case %zu (%s)", i, deflate ? "deflated" : "stored");
            if (cases[i].needle == NULL)
                ck_assert_int_eq(try_load(&p, zip.data, zip.size, what), SAE_OK);
            else
                must_refuse(&p, zip.data, zip.size, what, cases[i].needle);
            tw_free(&member);
            tw_free(&zip);
        }
    }
    /* A member that is not .npy at all, and a header length past the member. */
    tw_buf member = {0}, zip = {0};
    tw_put(&member, "PK not numpy", 12);
    npz_with(&zip, &member, false);
    must_refuse(&p, zip.data, zip.size, "not npy", "magic");
    tw_free(&zip);
    tw_free(&member);
    unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, 0xff, 0xff};
    tw_put(&member, pre, 10);
    tw_put(&member, "{'descr'", 8);
    npz_with(&zip, &member, false);
    must_refuse(&p, zip.data, zip.size, "long npy header", "does not fit");
    tw_free(&zip);
    tw_free(&member);
    free_place(&p);
}
END_TEST

/* Little-endian field access for patching zip structures. */
static size_t find_sig(const tw_buf *b, uint32_t sig, size_t from)
{
    for (size_t i = from; i + 4 <= b->size; i++)
        if (b->data[i] == (sig & 0xff) && b->data[i + 1] == ((sig >> 8) & 0xff) &&
            b->data[i + 2] == ((sig >> 16) & 0xff) && b->data[i + 3] == (sig >> 24))
            return i;
    return SIZE_MAX;
}

static void put32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

START_TEST(bad_zip_archives)
{
    place p = make_place("params.npz");
    tw_buf b = {0};
    npz_file(&b, 0, "<f4");
    ck_assert_int_eq(try_load(&p, b.data, b.size, "valid stored npz"), SAE_OK);
    unsigned char *copy = tu_malloc(b.size);

    /* A changed data byte: the CRC no longer matches. */
    memcpy(copy, b.data, b.size);
    size_t local = find_sig(&b, 0x04034b50, 0);
    copy[local + 30 + 9 + 128 + 4] ^= 0x40; /* inside W_enc's float data */
    must_refuse(&p, copy, b.size, "CRC mismatch", NULL);

    /* Central directory sizes that lie: huge, or disagreeing with the local header. */
    size_t cd = find_sig(&b, 0x02014b50, 0);
    static const uint32_t sizes[] = {0xfffffff0u, 0x7fffffffu, 12, 0};
    for (size_t i = 0; i < 4; i++) {
        memcpy(copy, b.data, b.size);
        put32(copy + cd + 24, sizes[i]); /* uncompressed size */
        put32(copy + cd + 20, sizes[i]); /* compressed size */
        must_refuse(&p, copy, b.size, "lying sizes", NULL);
    }
    /* An unknown compression method. */
    memcpy(copy, b.data, b.size);
    copy[cd + 10] = 14; /* LZMA in the central directory */
    copy[local + 8] = 14;
    must_refuse(&p, copy, b.size, "method 14", NULL);
    /* The end record pointing outside the file. */
    size_t eocd = find_sig(&b, 0x06054b50, 0);
    memcpy(copy, b.data, b.size);
    put32(copy + eocd + 16, 0x7ffffff0u);
    must_refuse(&p, copy, b.size, "central directory offset", NULL);
    memcpy(copy, b.data, b.size);
    copy[eocd + 10] = 0xff; /* entry count */
    copy[eocd + 11] = 0xff;
    must_refuse(&p, copy, b.size, "entry count", NULL);
    free(copy);
    tw_free(&b);

    /* A deflated member claiming far more than deflate can make of it. */
    npz_file(&b, 1, "<f4");
    copy = tu_malloc(b.size);
    memcpy(copy, b.data, b.size);
    cd = find_sig(&b, 0x02014b50, 0);
    put32(copy + cd + 24, 0xfffffff0u);
    local = find_sig(&b, 0x04034b50, 0);
    put32(copy + local + 22, 0xfffffff0u);
    must_refuse(&p, copy, b.size, "deflate bomb claim", NULL);
    free(copy);
    tw_free(&b);

    /* Garbage after a zip signature, and an empty archive. */
    unsigned char junk[300];
    tu_rng r = {77};
    for (size_t i = 0; i < sizeof junk; i++)
        junk[i] = (unsigned char)tu_next(&r);
    memcpy(junk, "PK\3\4", 4);
    must_refuse(&p, junk, sizeof junk, "zip garbage", "zip");
    static const unsigned char empty[22] = {'P', 'K', 5, 6};
    must_refuse(&p, empty, sizeof empty, "empty zip", "W_enc.npy");
    free_place(&p);
}
END_TEST

START_TEST(garbage_files)
{
    place p = make_place("sae_weights.safetensors");
    tu_rng r = {1234};
    for (int i = 0; i < 300; i++) {
        size_t size = 1 + (size_t)(tu_next(&r) % 600);
        unsigned char *g = tu_malloc(size);
        for (size_t j = 0; j < size; j++)
            g[j] = (unsigned char)tu_next(&r);
        /* Some start like a safetensors header, some like a zip, some like JSON. */
        if (i % 4 == 1 && size >= 9) {
            uint64_t n = size - 8 - (tu_next(&r) % 4);
            for (int j = 0; j < 8; j++)
                g[j] = (unsigned char)(n >> (8 * j));
            g[8] = '{';
        } else if (i % 4 == 2 && size >= 4) {
            memcpy(g, "PK\3\4", 4);
        }
        char what[32];
        snprintf(what, sizeof what, "garbage %d", i);
        must_refuse(&p, g, size, what, NULL);
        free(g);
    }
    /* A file that is not regular. */
    sae_model *m;
    ck_assert_sae(sae_model_load(&m, "/dev/null"), SAE_EIO);
    free_place(&p);
}
END_TEST

/* The cfg readers straight from memory (what the fuzzer drives), including inputs that are not
 * NUL-terminated. */
START_TEST(cfg_readers_on_raw_bytes)
{
    sae__saelens_cfg c;
    sae__sparsify_cfg s;
    double scale;
    const char text[] = "{\"d_in\": 2, \"d_sae\": 3}XXXX"; /* the object is 23 bytes */
    ck_assert_ok(sae__saelens_cfg_parse(text, 23, "mem", &c));
    ck_assert_uint_eq(c.d_in, 2);
    ck_assert_uint_eq(c.d_sae, 3);
    ck_assert(c.apply_b_dec);
    ck_assert_int_eq(c.arch, SAE_ARCH_RELU);
    ck_assert_int_eq(sae__saelens_cfg_parse(text, 24, "mem", &c), SAE_EFORMAT); /* trailing X */
    ck_assert_int_eq(sae__saelens_cfg_parse(text, 22, "mem", &c), SAE_EFORMAT); /* no brace */
    ck_assert_int_eq(sae__sparsify_cfg_parse(text, 0, "mem", &s), SAE_EFORMAT);
    ck_assert_int_eq(sae__saelens_scaler_parse("{\"scaling_factor\": 1e999}", 25, "mem", &scale),
                     SAE_EFORMAT);
    ck_assert_ok(sae__saelens_scaler_parse("{}", 2, "mem", &scale));
    ck_assert_double_eq(scale, 0.0);
}
END_TEST

/* ---- libsae's own metadata --------------------------------------------------------------- */

/* A libsae file (d_in 2, d_sae 3, the valid SAELens tensors of the header cases) whose
 * __metadata__ holds format "libsae" and then meta (JSON members, without braces). */
static void own_raw(tw_buf *out, const char *meta, const unsigned char *data)
{
    char header[1024];
    snprintf(header, sizeof header, "{\"__metadata__\":{\"format\":\"libsae\",%s}," E_WDEC REST,
             meta);
    tw_safetensors_raw(out, header, data, 68);
}

static const unsigned char *w_bytes(void)
{
    static unsigned char data[72];
    memset(data, 0, sizeof data);
    memcpy(data, W, sizeof W);
    return data;
}

#define OWN_BASE "\"architecture\":\"relu\",\"d_in\":\"2\",\"d_sae\":\"3\",\"apply_b_dec_to_input\":\"1\""

typedef struct {
    const char *meta;
    int code;
    const char *needle;
} meta_case;

static void own_cases(const meta_case *cases, size_t n, const char *kind)
{
    place p = make_place("model.safetensors");
    for (size_t i = 0; i < n; i++) {
        tw_buf b = {0};
        own_raw(&b, cases[i].meta, w_bytes());
        char what[64];
        snprintf(what, sizeof what, "%s case %zu", kind, i);
        int rc = try_load(&p, b.data, b.size, what);
        ck_assert_msg(rc == cases[i].code, "%s: load returned %d, want %d (%s)", what, rc,
                      cases[i].code, sae_last_error());
        if (cases[i].needle != NULL)
            ck_assert_msg(strstr(sae_last_error(), cases[i].needle) != NULL,
                          "%s: message '%s' lacks '%s'", what, sae_last_error(), cases[i].needle);
        tw_free(&b);
    }
    free_place(&p);
}

START_TEST(own_format_version_from_the_future_is_refused)
{
    static const meta_case cases[] = {
        {"\"format_version\":\"1\"," OWN_BASE ",\"input_scale\":\"1\"", SAE_OK, NULL},
        /* Absent: every libsae wrote "1", so a file without it is no newer format. */
        {OWN_BASE ",\"input_scale\":\"1\"", SAE_OK, NULL},
        {"\"format_version\":\"999\"," OWN_BASE ",\"input_scale\":\"1\"", SAE_EUNSUPPORTED,
         "format_version 999 is not supported: this library reads format_version 1"},
        /* Version 2 (libsae 0.2) is read; 3 is the future. */
        {"\"format_version\":\"2\"," OWN_BASE ",\"input_scale\":\"1\"", SAE_OK, NULL},
        {"\"format_version\":\"3\"," OWN_BASE ",\"input_scale\":\"1\"", SAE_EUNSUPPORTED,
         "format_version 3 is not supported: this library reads format_version 1 to 2"},
        /* A version 1 file holds none of version 2's additions. */
        {"\"format_version\":\"1\",\"kind\":\"transcoder\",\"d_out\":\"2\"," OWN_BASE
         ",\"input_scale\":\"1\"", SAE_EFORMAT, "format_version 1 file has no 'kind'"},
        {"\"format_version\":\"0\"," OWN_BASE ",\"input_scale\":\"1\"", SAE_EUNSUPPORTED, "0"},
        {"\"format_version\":\"1.0\"," OWN_BASE ",\"input_scale\":\"1\"", SAE_EFORMAT, "format_version"},
        {"\"format_version\":\"01\"," OWN_BASE ",\"input_scale\":\"1\"", SAE_EFORMAT, "format_version"},
        {"\"format_version\":\" 1\"," OWN_BASE ",\"input_scale\":\"1\"", SAE_EFORMAT, "format_version"},
        {"\"format_version\":\"one\"," OWN_BASE ",\"input_scale\":\"1\"", SAE_EFORMAT, "format_version"},
    };
    own_cases(cases, sizeof cases / sizeof cases[0], "format_version");
}
END_TEST

/* Metadata numbers are what libsae writes ("%zu", "%.9g"), read as Python's int()/float() of
 * that text would; strtod's extras (hex, inf, spaces, '+') are refused. */
START_TEST(metadata_numbers_are_plain_decimal)
{
#define WITH_D_IN(v) "\"architecture\":\"relu\",\"d_in\":\"" v "\",\"d_sae\":\"3\",\"apply_b_dec_to_input\":\"1\",\"input_scale\":\"1\""
#define WITH_SCALE(v) OWN_BASE ",\"input_scale\":\"" v "\""
#define TOPK_K(v) "\"architecture\":\"topk\",\"d_in\":\"2\",\"d_sae\":\"3\",\"apply_b_dec_to_input\":\"1\",\"input_scale\":\"1\",\"k\":\"" v "\""
    static const meta_case cases[] = {
        {WITH_D_IN("2"), SAE_OK, NULL},
        {WITH_D_IN("0x2"), SAE_EFORMAT, "['d_in'] = '0x2'"},
        {WITH_D_IN(" 2"), SAE_EFORMAT, "'d_in'"},
        {WITH_D_IN("2 "), SAE_EFORMAT, "'d_in'"},
        {WITH_D_IN("+2"), SAE_EFORMAT, "'d_in'"},
        {WITH_D_IN("2.0"), SAE_EFORMAT, "'d_in'"},
        {WITH_D_IN("2e0"), SAE_EFORMAT, "'d_in'"},
        {WITH_D_IN("02"), SAE_EFORMAT, "'d_in'"},
        {WITH_D_IN("-2"), SAE_EFORMAT, "'d_in'"},
        {WITH_D_IN(""), SAE_EFORMAT, "'d_in'"},
        {WITH_D_IN("4294967298"), SAE_EFORMAT, "'d_in'"},
        {WITH_D_IN("18446744073709551618"), SAE_EFORMAT, "'d_in'"},
        {WITH_SCALE("5e-1"), SAE_OK, NULL},
        {WITH_SCALE("0.5"), SAE_OK, NULL},
        {WITH_SCALE("1.17549435e-38"), SAE_OK, NULL},
        {WITH_SCALE("0x1p-1"), SAE_EFORMAT, "'input_scale'"},
        {WITH_SCALE("inf"), SAE_EFORMAT, "'input_scale'"},
        {WITH_SCALE("nan"), SAE_EFORMAT, "'input_scale'"},
        {WITH_SCALE("-nan"), SAE_EFORMAT, "'input_scale'"},
        {WITH_SCALE(" 1"), SAE_EFORMAT, "'input_scale'"},
        {WITH_SCALE("1."), SAE_EFORMAT, "'input_scale'"},
        {WITH_SCALE(".5"), SAE_EFORMAT, "'input_scale'"},
        {WITH_SCALE("+1"), SAE_EFORMAT, "'input_scale'"},
        {WITH_SCALE("1e"), SAE_EFORMAT, "'input_scale'"},
        {WITH_SCALE("0,5"), SAE_EFORMAT, "'input_scale'"},
        {WITH_SCALE("1e999"), SAE_EFORMAT, "'input_scale'"},
        {"\"architecture\":\"relu\",\"d_in\":\"2\",\"d_sae\":\"3\",\"apply_b_dec_to_input\":\"1.0\",\"input_scale\":\"1\"", SAE_EFORMAT, "'apply_b_dec_to_input'"},
        {TOPK_K("2"), SAE_OK, NULL},
        {TOPK_K("2.0"), SAE_EFORMAT, "'k'"},
        {TOPK_K("2e0"), SAE_EFORMAT, "'k'"},
    };
    own_cases(cases, sizeof cases / sizeof cases[0], "metadata number");
    /* The parse does not depend on the host's locale (a decimal comma). */
    if (setlocale(LC_NUMERIC, "de_DE.UTF-8") != NULL || setlocale(LC_NUMERIC, "fr_FR.UTF-8") != NULL) {
        place p = make_place("model.safetensors");
        tw_buf b = {0};
        own_raw(&b, WITH_SCALE("0.75"), w_bytes());
        tw_write(p.weights, b.data, b.size);
        sae_model *m;
        ck_assert_ok(sae_model_load(&m, p.weights));
        double v;
        ck_assert_ok(sae_model_get_param(m, SAE_PARAM_INPUT_SCALE, &v));
        ck_assert_double_eq(v, 0.75);
        sae_model_free(m);
        tw_free(&b);
        free_place(&p);
        setlocale(LC_NUMERIC, "C");
    }
#undef WITH_D_IN
#undef WITH_SCALE
#undef TOPK_K
}
END_TEST

/* ---- floats that are finite as doubles but not as floats ---------------------------------- */

START_TEST(file_floats_beyond_float_range_are_refused)
{
    static const meta_case cases[] = {
        {OWN_BASE ",\"input_scale\":\"1e-46\"", SAE_EFORMAT, "__metadata__['input_scale']"},
        {OWN_BASE ",\"input_scale\":\"1e-40\"", SAE_EFORMAT, "__metadata__['input_scale']"},
        {OWN_BASE ",\"input_scale\":\"1e39\"", SAE_EFORMAT, "__metadata__['input_scale']"},
        {OWN_BASE ",\"input_scale\":\"3.5e38\"", SAE_EFORMAT, "__metadata__['input_scale']"},
        {"\"architecture\":\"batchtopk\",\"d_in\":\"2\",\"d_sae\":\"3\",\"apply_b_dec_to_input\":\"1\",\"input_scale\":\"1\",\"k\":\"2\",\"batch_threshold\":\"1e39\"", SAE_EFORMAT, "__metadata__['batch_threshold']"},
        {"\"architecture\":\"batchtopk\",\"d_in\":\"2\",\"d_sae\":\"3\",\"apply_b_dec_to_input\":\"1\",\"input_scale\":\"1\",\"k\":\"2\",\"batch_threshold\":\"0.25\"", SAE_OK, NULL},
    };
    own_cases(cases, sizeof cases / sizeof cases[0], "libsae float");

    /* SAELens' activation_scaler.json becomes INPUT_SCALE. */
    place p = make_place("sae_weights.safetensors");
    tw_buf b = {0};
    saelens_file(&b);
    tw_write_text(p.cfg, "{\"d_in\": 2, \"d_sae\": 3, \"architecture\": \"jumprelu\", "
                         "\"normalize_activations\": \"expected_average_only_in\"}");
    size_t len = strlen(p.dir) + 32;
    char *scaler = tu_malloc(len);
    snprintf(scaler, len, "%s/activation_scaler.json", p.dir);
    static const char *const factors[] = {"1e-46", "1e-40", "1e39", "3.5e38", "0", "-2"};
    for (size_t i = 0; i < sizeof factors / sizeof factors[0]; i++) {
        char text[64];
        snprintf(text, sizeof text, "{\"scaling_factor\": %s}", factors[i]);
        tw_write_text(scaler, text);
        char what[48];
        snprintf(what, sizeof what, "scaling_factor %s", factors[i]);
        must_refuse(&p, b.data, b.size, what, "activation_scaler.json: scaling_factor");
    }
    tw_write_text(scaler, "{\"scaling_factor\": 0.25}");
    ck_assert_int_eq(try_load(&p, b.data, b.size, "scaling_factor 0.25"), SAE_OK);
    unlink(scaler);
    free(scaler);
    tw_free(&b);

    /* A BatchTopK checkpoint's float64 topk_threshold of 1e39 is inf as a float. */
    tw_write_text(p.cfg, "{\"d_in\": 2, \"d_sae\": 3, \"architecture\": \"batchtopk\", \"k\": 2, "
                         "\"meta\": {\"sae_lens_version\": \"6.5.0\"}}");
    unsigned char data[76];
    memcpy(data, w_bytes(), 68);
    double big = 1e39;
    memcpy(data + 68, &big, 8);
    tw_safetensors_raw(&b,
                       "{" E_WDEC "," E_WENC "," E_BDEC "," E_BENC
                       ",\"topk_threshold\":{\"dtype\":\"F64\",\"shape\":[],\"data_offsets\":[68,76]}}",
                       data, 76);
    must_refuse(&p, b.data, b.size, "topk_threshold 1e39", "tensor 'topk_threshold'");
    big = 0.5;
    memcpy(b.data + b.size - 8, &big, 8);
    ck_assert_int_eq(try_load(&p, b.data, b.size, "topk_threshold 0.5"), SAE_OK);
    tw_free(&b);
    free_place(&p);
}
END_TEST

/* ---- NaN and infinity in the weights ------------------------------------------------------ */

/* A safetensors header for W_dec [3,2], W_enc [2,3], b_dec [2], b_enc [3] (names given, so the
 * sparsify spelling fits too) in dtype of esize bytes, packed; pad spaces shift the data start
 * (and so whether F32 data is aligned for use in place). */
static void weights_header(char *buf, size_t size, const char *dtype, size_t e, const char *meta,
                           const char *const names[4], int pad)
{
    size_t n[4] = {6, 6, 2, 3};
    /* nn.Linear keeps sparsify's encoder.weight as [d_sae][d_in]. */
    const char *shape[4] = {"[3,2]", strcmp(names[1], "W_enc") == 0 ? "[2,3]" : "[3,2]", "[2]",
                            "[3]"};
    int used = snprintf(buf, size, "{%s", meta ? meta : "");
    size_t at = 0;
    for (int i = 0; i < 4; i++) {
        used += snprintf(buf + used, size - (size_t)used,
                         "%s\"%s\":{\"dtype\":\"%s\",\"shape\":%s,\"data_offsets\":[%zu,%zu]}",
                         i || meta ? "," : "", names[i], dtype, shape[i], at, at + n[i] * e);
        at += n[i] * e;
    }
    used += snprintf(buf + used, size - (size_t)used, "}%*s", pad, "");
    ck_assert_int_lt(used, (int)size);
}

START_TEST(nonfinite_weights_are_refused_by_every_reader)
{
    static const struct {
        const char *dtype;
        size_t esize;
        unsigned char bad[8]; /* little-endian bytes of the value planted */
        const char *shows;    /* how the message prints it */
    } types[] = {
        {"F32", 4, {0x00, 0x00, 0xc0, 0x7f}, "nan"},
        {"F32", 4, {0x00, 0x00, 0x80, 0xff}, "-inf"},
        {"F16", 2, {0x00, 0x7c}, "inf"},
        {"BF16", 2, {0xc0, 0x7f}, "nan"},
        /* Finite as a double, infinite once converted to float. */
        {"F64", 8, {0x9c, 0x75, 0x00, 0x88, 0x3c, 0xe4, 0x37, 0x7e}, "inf"}, /* 1e300 */
    };
    static const char *const saelens_names[4] = {"W_dec", "W_enc", "b_dec", "b_enc"};
    static const char *const sparsify_names[4] = {"W_dec", "encoder.weight", "b_dec",
                                                  "encoder.bias"};
    /* Element 5 of W_enc ([1][2]; sparsify's encoder.weight [3][2]: [2][1]) or 1 of b_enc. */
    static const struct {
        int tensor;
        size_t element;
        const char *saelens, *sparsify;
    } spots[] = {{1, 5, "tensor 'W_enc'[1][2] is ", "tensor 'encoder.weight'[2][1] is "},
                 {0, 3, "tensor 'W_dec'[1][1] is ", "tensor 'W_dec'[1][1] is "},
                 {3, 1, "tensor 'b_enc'[1] is ", "tensor 'encoder.bias'[1] is "}};
    static const size_t first[4] = {0, 6, 12, 14}; /* element where each tensor starts */
    for (int reader = 0; reader < 3; reader++) {
        place p = make_place(reader == 1 ? "sae.safetensors" : "sae_weights.safetensors");
        if (reader == 1)
            tw_write_text(p.cfg, "{\"k\": 2, \"num_latents\": 3, \"d_in\": 2}");
        for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
            for (size_t s = 0; s < sizeof spots / sizeof spots[0]; s++) {
                for (int pad = 0; pad < 2; pad++) {
                    char header[1024];
                    weights_header(header, sizeof header, types[t].dtype, types[t].esize,
                                   reader == 2 ? "\"__metadata__\":{\"format\":\"libsae\","
                                                 "\"format_version\":\"1\"," OWN_BASE
                                                 ",\"input_scale\":\"1\"}"
                                               : NULL,
                                   reader == 1 ? sparsify_names : saelens_names, pad);
                    unsigned char data[17 * 8] = {0};
                    size_t at = (first[spots[s].tensor] + spots[s].element) * types[t].esize;
                    memcpy(data + at, types[t].bad, types[t].esize);
                    tw_buf b = {0};
                    tw_safetensors_raw(&b, header, data, 17 * types[t].esize);
                    char what[96], needle[96];
                    snprintf(what, sizeof what, "reader %d, %s %s pad %d", reader,
                             types[t].dtype, types[t].shows, pad);
                    snprintf(needle, sizeof needle, "%s%s: weights must be finite",
                             reader == 1 ? spots[s].sparsify : spots[s].saelens, types[t].shows);
                    int rc = try_load(&p, b.data, b.size, what);
                    ck_assert_msg(rc == SAE_EFORMAT, "%s: returned %d", what, rc);
                    ck_assert_msg(strstr(sae_last_error(), needle) != NULL,
                                  "%s: message '%s' lacks '%s'", what, sae_last_error(), needle);
                    /* The same file without the bad value loads. */
                    memset(b.data + b.size - 17 * types[t].esize + at, 0, types[t].esize);
                    ck_assert_int_eq(try_load(&p, b.data, b.size, what), SAE_OK);
                    tw_free(&b);
                }
            }
        }
        free_place(&p);
    }
    /* A JumpReLU threshold of +inf (a feature that can never fire) is refused as well. */
    place p = make_place("sae_weights.safetensors");
    jumprelu_cfg(&p);
    float th[3] = {0.5f, INFINITY, 0.25f};
    tw_tensor jt[5] = {{"W_dec", "F32", 2, {3, 2}, W},
                       {"W_enc", "F32", 2, {2, 3}, W},
                       {"b_dec", "F32", 1, {2, 0}, W},
                       {"b_enc", "F32", 1, {3, 0}, W},
                       {"threshold", "F16", 1, {3, 0}, th}};
    tw_buf b = {0};
    tw_safetensors(&b, jt, 5, NULL);
    must_refuse(&p, b.data, b.size, "threshold inf", "tensor 'threshold'[1] is inf");
    tw_free(&b);
    free_place(&p);

    /* Gemma Scope: each member, every dtype. */
    p = make_place("params.npz");
    static const char *const descrs[] = {"<f4", "<f2", "<f8"};
    for (size_t d = 0; d < 3; d++) {
        for (int member = 0; member < 5; member++) {
            const char *names[5] = {"W_enc.npy", "W_dec.npy", "b_enc.npy", "b_dec.npy",
                                    "threshold.npy"};
            size_t shapes[5][2] = {{2, 3}, {3, 2}, {3, 0}, {2, 0}, {3, 0}};
            float v[5][6];
            for (int i = 0; i < 5; i++)
                memcpy(v[i], W, sizeof v[i]);
            v[member][member % 2 ? 1 : 2] = member % 2 ? NAN : -INFINITY;
            tw_buf m[5] = {{0}}, zip = {0};
            for (int i = 0; i < 5; i++)
                tw_npy(&m[i], descrs[d], shapes[i][1] ? 2 : 1, shapes[i], v[i]);
            tw_zip(&zip, names, m, 5, d == 1);
            char what[64], needle[96];
            snprintf(what, sizeof what, "npz %s member %d", descrs[d], member);
            if (shapes[member][1])
                snprintf(needle, sizeof needle, "member '%s'[0][%d] is %s", names[member],
                         member % 2 ? 1 : 2, member % 2 ? "nan" : "-inf");
            else
                snprintf(needle, sizeof needle, "member '%s'[%d] is %s", names[member],
                         member % 2 ? 1 : 2, member % 2 ? "nan" : "-inf");
            must_refuse(&p, zip.data, zip.size, what, needle);
            for (int i = 0; i < 5; i++)
                tw_free(&m[i]);
            tw_free(&zip);
        }
    }
    free_place(&p);
}
END_TEST

/* ---- zip archives that inflate before they are refused ------------------------------------ */

static long max_rss_kb(void)
{
    struct rusage ru;
    ck_assert_int_eq(getrusage(RUSAGE_SELF, &ru), 0);
    return ru.ru_maxrss;
}

/* A 64 MiB W_enc.npy of zeros deflates to about 64 KB; with a W_dec.npy of the wrong shape the
 * archive must be refused before W_enc is allocated or inflated. The archive is built in a child
 * process so that building it does not raise this process's peak memory. */
START_TEST(npz_bomb_is_refused_before_inflating)
{
    place p = make_place("params.npz");
    enum { ROWS = 4096, COLS = 4096 };
    pid_t child = fork();
    ck_assert_int_ge(child, 0);
    if (child == 0) {
        tw_buf header = {0};
        npy_raw(&header, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4096, 4096), }", 0);
        size_t bytes = header.size + (size_t)ROWS * COLS * sizeof(float);
        unsigned char *big = calloc(1, bytes); /* untouched zero pages */
        if (big == NULL)
            _exit(1);
        memcpy(big, header.data, header.size);
        const char *names[5] = {"W_enc.npy", "W_dec.npy", "b_enc.npy", "b_dec.npy",
                                "threshold.npy"};
        tw_buf m[5] = {{big, bytes, bytes}, {0}, {0}, {0}, {0}};
        size_t s23[2] = {3, 2}, s1[1] = {1};
        float zero[6] = {0};
        tw_npy(&m[1], "<f4", 2, s23, zero); /* should be (4096, 4096) */
        for (int i = 2; i < 5; i++)
            tw_npy(&m[i], "<f4", 1, s1, zero);
        tw_buf zip = {0};
        tw_zip(&zip, names, m, 5, true);
        tw_write(p.weights, zip.data, zip.size);
        _exit(zip.size < 1000000 ? 0 : 2);
    }
    int status;
    ck_assert_int_eq(waitpid(child, &status, 0), child);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    long before = max_rss_kb();
    sae_model *m;
    ck_assert_sae(sae_model_load(&m, p.weights), SAE_EFORMAT);
    ck_assert_msg(strstr(sae_last_error(), "W_dec.npy") != NULL, "%s", sae_last_error());
    long grew = max_rss_kb() - before;
    ck_assert_msg(grew < 16 * 1024, "refusing the archive raised peak memory by %ld KiB", grew);
    free_place(&p);
}
END_TEST

/* Python's zipfile (and so np.load) reads the last of two members of one name. */
START_TEST(npz_member_named_twice_is_refused)
{
    place p = make_place("params.npz");
    const char *names[6] = {"W_enc.npy", "W_dec.npy", "b_enc.npy", "b_dec.npy",
                            "threshold.npy", "W_enc.npy"};
    tw_buf m[6] = {{0}};
    size_t s23[2] = {2, 3}, s32[2] = {3, 2}, s3[1] = {3}, s2[1] = {2};
    tw_npy(&m[0], "<f4", 2, s23, W);
    tw_npy(&m[1], "<f4", 2, s32, W);
    tw_npy(&m[2], "<f4", 1, s3, W);
    tw_npy(&m[3], "<f4", 1, s2, W);
    tw_npy(&m[4], "<f4", 1, s3, W);
    tw_npy(&m[5], "<f4", 2, s23, W + 1);
    tw_buf zip = {0};
    tw_zip64(&zip, names, m, 5);
    ck_assert_int_eq(try_load(&p, zip.data, zip.size, "five members"), SAE_OK);
    tw_free(&zip);
    tw_zip64(&zip, names, m, 6);
    must_refuse(&p, zip.data, zip.size, "W_enc.npy twice", "same name");
    for (int i = 0; i < 6; i++)
        tw_free(&m[i]);
    tw_free(&zip);
    free_place(&p);
}
END_TEST

/* The .npy header of an activations file goes through the same dict parser. */
START_TEST(npy_header_with_repeated_key_is_refused)
{
    char *path = tu_tmp_path("dup.npy");
    static const struct {
        const char *dict;
        int code;
    } cases[] = {
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", SAE_OK},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'shape': (1, 6), }", SAE_EFORMAT},
        {"{'descr': '<f8', 'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", SAE_EFORMAT},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (6), }", SAE_EFORMAT},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (6,), 'extra': 0}", SAE_EFORMAT},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        tw_buf b = {0};
        npy_raw(&b, 1, cases[i].dict, 24);
        tw_write(path, b.data, b.size);
        sae_npy *a = NULL;
        int rc = sae_npy_open(&a, path);
        ck_assert_msg(rc == cases[i].code, "case %zu: %d (%s)", i, rc, sae_last_error());
        if (rc != SAE_OK)
            ck_assert_msg(strstr(sae_last_error(), path) != NULL, "%s", sae_last_error());
        sae_npy_close(a);
        tw_free(&b);
    }
    unlink(path);
    free(path);
}
END_TEST

static Suite *corrupt_suite(void)
{
    Suite *s = suite_create("corrupt");
    TCase *tc = tcase_create("corpus");
    tcase_set_timeout(tc, 240);
    tcase_add_test(tc, truncated_and_flipped_safetensors);
    tcase_add_test(tc, truncated_and_flipped_npz);
    tcase_add_test(tc, safetensors_headers);
    tcase_add_test(tc, safetensors_header_lengths);
    tcase_add_test(tc, saelens_cfg_wrong_types);
    tcase_add_test(tc, sparsify_cfg_wrong_types);
    tcase_add_test(tc, npz_members);
    tcase_add_test(tc, bad_zip_archives);
    tcase_add_test(tc, garbage_files);
    tcase_add_test(tc, cfg_readers_on_raw_bytes);
    tcase_add_test(tc, own_format_version_from_the_future_is_refused);
    tcase_add_test(tc, metadata_numbers_are_plain_decimal);
    tcase_add_test(tc, file_floats_beyond_float_range_are_refused);
    tcase_add_test(tc, nonfinite_weights_are_refused_by_every_reader);
    tcase_add_test(tc, npz_bomb_is_refused_before_inflating);
    tcase_add_test(tc, npz_member_named_twice_is_refused);
    tcase_add_test(tc, npy_header_with_repeated_key_is_refused);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(corrupt_suite)
