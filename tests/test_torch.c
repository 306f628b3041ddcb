/* The .pt reader (lib/torch.c) against the fixtures tests/fixtures/torch/make.py wrote with
 * torch.save, pickle and zipfile: every tensor and scalar it recorded in expected.json, every
 * refusal (code and message) in refused.json, nothing run by the hostile pickles, and the
 * pickles and archives cut and damaged at every byte. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* memmem, strdup, usleep */
#endif
#include "formats.h"
#include "testutil.h"
#include "writers.h"

#include <cjson/cJSON.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zip.h>

/* What the hostile fixtures' payloads would create (make.py's PWNED). */
#define PWNED "/tmp/libsae-torch-fixture-pwned"

static char *fixture_path(const char *name)
{
    size_t len = strlen(SAE_TORCH_FIXTURES) + strlen(name) + 2;
    char *path = tu_malloc(len);
    snprintf(path, len, "%s/%s", SAE_TORCH_FIXTURES, name);
    return path;
}

static unsigned char *read_fixture(const char *name, size_t *size)
{
    char *path = fixture_path(name);
    unsigned char *data = tu_read_file(path, size);
    free(path);
    return data;
}

static cJSON *read_json(const char *name)
{
    size_t size;
    unsigned char *text = read_fixture(name, &size);
    text[size] = '\0';
    cJSON *j = cJSON_Parse((const char *)text);
    ck_assert_msg(j != NULL, "%s does not parse", name);
    free(text);
    return j;
}

static int dtype_of(const char *name)
{
    for (int t = 0; t < SAE__TORCH_DTYPE_COUNT; t++)
        if (strcmp(sae__torch_dtype_name((sae__torch_dtype)t), name) == 0)
            return t;
    ck_abort_msg("unknown dtype %s", name);
    return -1;
}

static void check_tensor(const char *file, const sae__torch_dict *d, const char *name,
                         const cJSON *want)
{
    const sae__torch_tensor *t = sae__torch_find(d, name);
    ck_assert_msg(t != NULL, "%s: no tensor '%s'", file, name);
    ck_assert_ptr_null(sae__torch_find_scalar(d, name));
    ck_assert_str_eq(t->name, name);
    ck_assert_int_eq(t->dtype, dtype_of(cJSON_GetObjectItem(want, "dtype")->valuestring));
    const cJSON *shape = cJSON_GetObjectItem(want, "shape");
    const cJSON *stride = cJSON_GetObjectItem(want, "stride");
    ck_assert_uint_eq(t->ndim, (size_t)cJSON_GetArraySize(shape));
    size_t count = 1;
    for (size_t i = 0; i < t->ndim; i++) {
        ck_assert_uint_eq(t->shape[i], (size_t)cJSON_GetArrayItem(shape, (int)i)->valuedouble);
        count *= t->shape[i];
        /* torch reports strides of size-1 and empty dimensions freely; they address nothing. */
        if (t->shape[i] > 1)
            ck_assert_uint_eq(t->stride[i],
                              (size_t)cJSON_GetArrayItem(stride, (int)i)->valuedouble);
    }
    ck_assert_uint_eq(t->count, count);
    if (count > 0)
        ck_assert_uint_eq(t->offset,
                          (size_t)cJSON_GetObjectItem(want, "offset")->valuedouble);
    ck_assert_int_eq(t->contiguous, cJSON_IsTrue(cJSON_GetObjectItem(want, "contiguous")));
    ck_assert_uint_lt(t->storage, d->n_storages);
    const cJSON *values = cJSON_GetObjectItem(want, "values");
    ck_assert_uint_eq(count, (size_t)cJSON_GetArraySize(values));
    float *got = tu_malloc((count ? count : 1) * sizeof(float));
    for (size_t i = 0; i < count; i++)
        got[i] = NAN;
    ck_assert_ok(sae__torch_tensor_to_float(d, t, got));
    size_t i = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, values) {
        float expect = (float)v->valuedouble; /* exact: make.py wrote float32 values */
        ck_assert_msg(got[i] == expect, "%s: %s[%zu] = %.9g, expected %.9g", file, name, i,
                      (double)got[i], (double)expect);
        i++;
    }
    free(got);
}

static void check_scalar(const char *file, const sae__torch_dict *d, const char *name,
                         const cJSON *want)
{
    const sae__torch_scalar *s = sae__torch_find_scalar(d, name);
    ck_assert_msg(s != NULL, "%s: no scalar '%s'", file, name);
    ck_assert_ptr_null(sae__torch_find(d, name));
    const char *kind = cJSON_GetObjectItem(want, "kind")->valuestring;
    const cJSON *value = cJSON_GetObjectItem(want, "value");
    double number = 0;
    if (strcmp(kind, "int") == 0) {
        ck_assert_int_eq(s->kind, SAE__TORCH_INT);
        long long expect = strtoll(cJSON_GetObjectItem(want, "text")->valuestring, NULL, 10);
        ck_assert_msg(s->i == expect, "%s: %s = %" PRId64 ", expected %lld", file, name, s->i,
                      expect);
        number = (double)expect;
    } else if (strcmp(kind, "bool") == 0) {
        ck_assert_int_eq(s->kind, SAE__TORCH_BOOLEAN);
        ck_assert_int_eq(s->i, (int64_t)value->valuedouble);
        number = value->valuedouble;
    } else if (strcmp(kind, "float") == 0) {
        ck_assert_int_eq(s->kind, SAE__TORCH_FLOAT);
        ck_assert_msg(s->f == value->valuedouble, "%s: %s = %.17g, expected %.17g", file, name,
                      s->f, value->valuedouble);
        number = value->valuedouble;
    } else {
        ck_assert_int_eq(s->kind, SAE__TORCH_STR);
        ck_assert_str_eq(s->s, value->valuestring);
        ck_assert_uint_eq(s->s_len, strlen(value->valuestring));
        double x;
        ck_assert_sae(sae__torch_number(d, name, &x), SAE_EFORMAT);
        ck_assert_ptr_nonnull(strstr(sae_last_error(), "a string"));
        return;
    }
    double x = -1;
    ck_assert_ok(sae__torch_number(d, name, &x));
    ck_assert(x == number);
}

/* Every valid fixture: exactly the tensors and scalars make.py recorded, with their values. */
START_TEST(test_valid_fixtures)
{
    cJSON *all = read_json("expected.json");
    const cJSON *file;
    int files = 0;
    cJSON_ArrayForEach(file, all) {
        size_t size;
        unsigned char *data = read_fixture(file->string, &size);
        sae__torch_dict *d = NULL;
        ck_assert_ok(sae__torch_open(data, size, file->string, &d));
        const cJSON *tensors = cJSON_GetObjectItem(file, "tensors");
        const cJSON *scalars = cJSON_GetObjectItem(file, "scalars");
        ck_assert_uint_eq(d->n_tensors, (size_t)cJSON_GetArraySize(tensors));
        ck_assert_uint_eq(d->n_scalars, (size_t)cJSON_GetArraySize(scalars));
        const cJSON *e;
        cJSON_ArrayForEach(e, tensors) check_tensor(file->string, d, e->string, e);
        cJSON_ArrayForEach(e, scalars) check_scalar(file->string, d, e->string, e);
        ck_assert_ptr_null(sae__torch_find(d, "no such name"));
        ck_assert_ptr_null(sae__torch_find_scalar(d, "no such name"));
        double x;
        ck_assert_sae(sae__torch_number(d, "no such name", &x), SAE_EFORMAT);
        ck_assert_ptr_nonnull(strstr(sae_last_error(), "no entry 'no such name'"));
        sae__torch_close(d);
        free(data);
        files++;
    }
    ck_assert_int_ge(files, 12);
    cJSON_Delete(all);
}
END_TEST

/* sae__torch_tensor_to_float_t against the row-major read, transposed here: every 2-D tensor of
 * every valid fixture (views, strided and offset ones, every dtype, a 1 x n and an n x 1), and
 * a tensor of another rank refused. */
START_TEST(test_transposed_reads)
{
    cJSON *all = read_json("expected.json");
    const cJSON *file;
    size_t checked = 0, strided = 0;
    cJSON_ArrayForEach(file, all) {
        size_t size;
        unsigned char *data = read_fixture(file->string, &size);
        sae__torch_dict *d = NULL;
        ck_assert_ok(sae__torch_open(data, size, file->string, &d));
        for (size_t i = 0; i < d->n_tensors; i++) {
            const sae__torch_tensor *t = &d->tensors[i];
            float *want = tu_malloc((t->count ? t->count : 1) * sizeof(float));
            float *got = tu_malloc((t->count ? t->count : 1) * sizeof(float));
            if (t->ndim != 2) {
                ck_assert_sae(sae__torch_tensor_to_float_t(d, t, got), SAE_EFORMAT);
                ck_assert_ptr_nonnull(strstr(sae_last_error(), "not 2"));
            } else {
                ck_assert_ok(sae__torch_tensor_to_float(d, t, want));
                ck_assert_ok(sae__torch_tensor_to_float_t(d, t, got));
                const size_t rows = t->shape[0], cols = t->shape[1];
                for (size_t r = 0; r < rows; r++)
                    for (size_t c = 0; c < cols; c++)
                        ck_assert_msg(memcmp(&got[c * rows + r], &want[r * cols + c],
                                             sizeof(float)) == 0,
                                      "%s: '%s'[%zu][%zu]", file->string, t->name, r, c);
                checked++;
                strided += !t->contiguous;
            }
            free(want);
            free(got);
        }
        sae__torch_close(d);
        free(data);
    }
    ck_assert_uint_ge(checked, 10);
    ck_assert_uint_ge(strided, 1);
    cJSON_Delete(all);
}
END_TEST

/* Things the fixtures show about layout, checked by hand on top of the values. */
START_TEST(test_layout)
{
    size_t size;
    unsigned char *data = read_fixture("views.pt", &size);
    sae__torch_dict *d;
    ck_assert_ok(sae__torch_open(data, size, "views.pt", &d));
    /* base, its transpose, a row, a column, a block and a strided slice: one storage. */
    const char *views[] = {"base", "T", "row", "col", "block", "every5"};
    for (size_t i = 0; i < 6; i++)
        ck_assert_uint_eq(sae__torch_find(d, views[i])->storage,
                          sae__torch_find(d, "base")->storage);
    ck_assert_uint_eq(d->n_storages, 3); /* base's, w's, the expanded vector's */
    const sae__torch_tensor *t = sae__torch_find(d, "T");
    ck_assert(!t->contiguous);
    ck_assert_uint_eq(t->stride[0], 1);
    ck_assert_uint_eq(t->stride[1], 6);
    ck_assert_uint_eq(sae__torch_find(d, "row")->offset, 12);
    ck_assert(sae__torch_find(d, "row")->contiguous);
    ck_assert_uint_eq(sae__torch_find(d, "expanded")->stride[1], 0);
    sae__torch_close(d);
    free(data);

    /* The module's state dict, in the order of the pickle, with the int64 counter. */
    data = read_fixture("module.pt", &size);
    ck_assert_ok(sae__torch_open(data, size, "module.pt", &d));
    ck_assert_str_eq(d->stem, "module");
    const char *order[] = {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                           "1.running_var", "1.num_batches_tracked", "3.weight", "3.bias"};
    ck_assert_uint_eq(d->n_tensors, 9);
    for (size_t i = 0; i < 9; i++)
        ck_assert_str_eq(d->tensors[i].name, order[i]);
    ck_assert_int_eq(sae__torch_find(d, "1.num_batches_tracked")->dtype, SAE__TORCH_I64);
    ck_assert_uint_eq(sae__torch_find(d, "1.num_batches_tracked")->ndim, 0);
    double x;
    ck_assert_ok(sae__torch_number(d, "1.num_batches_tracked", &x));
    ck_assert(x == 0);
    ck_assert_sae(sae__torch_number(d, "0.weight", &x), SAE_EFORMAT);
    ck_assert_ptr_nonnull(strstr(sae_last_error(), "12 elements"));
    sae__torch_close(d);
    free(data);

    /* Tied parameters: two names, one storage. */
    data = read_fixture("params.pt", &size);
    ck_assert_ok(sae__torch_open(data, size, "params.pt", &d));
    ck_assert_uint_eq(sae__torch_find(d, "weight")->storage, sae__torch_find(d, "tied")->storage);
    ck_assert_uint_eq(d->n_storages, 2);
    sae__torch_close(d);
    free(data);

    /* The checkpoint: nested names, int keys, skipped values. */
    data = read_fixture("checkpoint.pt", &size);
    ck_assert_ok(sae__torch_open(data, size, "checkpoint.pt", &d));
    ck_assert_ptr_nonnull(sae__torch_find(d, "state_dict.W_enc"));
    ck_assert_ptr_nonnull(sae__torch_find(d, "optimizer.state.0.step"));
    ck_assert_ok(sae__torch_number(d, "activation.k", &x));
    ck_assert(x == 16);
    ck_assert_ok(sae__torch_number(d, "optimizer.state.0.step", &x));
    ck_assert(x == 3);
    const char *skipped[] = {"none", "list", "tuple", "bytes", "optimizer.param_groups"};
    for (size_t i = 0; i < 5; i++) {
        ck_assert_ptr_null(sae__torch_find(d, skipped[i]));
        ck_assert_ptr_null(sae__torch_find_scalar(d, skipped[i]));
    }
    sae__torch_close(d);
    free(data);
}
END_TEST

/* Every refused fixture: its code, and a message naming the file and what was refused. */
START_TEST(test_refused_fixtures)
{
    cJSON *all = read_json("refused.json");
    const cJSON *c;
    int cases = 0;
    cJSON_ArrayForEach(c, all) {
        const char *file = cJSON_GetObjectItem(c, "file")->valuestring;
        const char *code = cJSON_GetObjectItem(c, "code")->valuestring;
        int want = strcmp(code, "EFORMAT") == 0 ? SAE_EFORMAT : SAE_EUNSUPPORTED;
        ck_assert(strcmp(code, "EFORMAT") == 0 || strcmp(code, "EUNSUPPORTED") == 0);
        size_t size;
        unsigned char *data = read_fixture(file, &size);
        sae__torch_dict *d = (sae__torch_dict *)0x1;
        int rc = sae__torch_open(data, size, file, &d);
        ck_assert_msg(rc == want, "%s: returned %d (%s), expected %s", file, rc,
                      sae_last_error(), code);
        ck_assert_ptr_null(d);
        const char *msg = sae_last_error();
        ck_assert_msg(strncmp(msg, file, strlen(file)) == 0, "%s: message '%s' does not name it",
                      file, msg);
        const cJSON *w;
        cJSON_ArrayForEach(w, cJSON_GetObjectItem(c, "words"))
            ck_assert_msg(strstr(msg, w->valuestring) != NULL, "%s: message '%s' lacks '%s'",
                          file, msg, w->valuestring);
        free(data);
        cases++;
    }
    ck_assert_int_ge(cases, 45);
    cJSON_Delete(all);
}
END_TEST

/* The payloads (os.system, eval, exec, Popen, each creating PWNED under pickle.load; make.py
 * checked that they do) leave no trace here. */
START_TEST(test_nothing_runs)
{
    unlink(PWNED);
    const char *files[] = {"evil_system.pt", "evil_eval.pt", "evil_exec.pt", "evil_popen.pt",
                           "evil_os_system.pt"};
    for (size_t i = 0; i < 5; i++) {
        size_t size;
        unsigned char *data = read_fixture(files[i], &size);
        /* The payload sits in the archive as plain text: the test is of the real thing. */
        ck_assert_ptr_nonnull(memmem(data, size, PWNED, strlen(PWNED)));
        sae__torch_dict *d;
        ck_assert_sae(sae__torch_open(data, size, files[i], &d), SAE_EUNSUPPORTED);
        free(data);
    }
    usleep(200 * 1000); /* time for a spawned process to have done its work */
    ck_assert_msg(access(PWNED, F_OK) != 0, "%s exists: a payload ran", PWNED);
}
END_TEST

/* A flipped byte in a storage member: the archive opens (storages are read later), and reading
 * the tensor fails on libzip's CRC check. */
START_TEST(test_crc)
{
    size_t size;
    unsigned char *data = read_fixture("crc.pt", &size);
    sae__torch_dict *d;
    ck_assert_ok(sae__torch_open(data, size, "crc.pt", &d));
    float v[10];
    ck_assert_sae(sae__torch_tensor_to_float(d, sae__torch_find(d, "t"), v), SAE_EFORMAT);
    ck_assert_ptr_nonnull(strstr(sae_last_error(), "CRC"));
    sae__torch_close(d);
    free(data);
}
END_TEST

/* ---- damaged variants --------------------------------------------------------------------- */

typedef struct {
    size_t n;
    char *names[32];
    tw_buf bufs[32];
} members;

static void unzip_all(const unsigned char *data, size_t size, members *ms)
{
    zip_error_t ze;
    zip_error_init(&ze);
    zip_source_t *src = zip_source_buffer_create(data, size, 0, &ze);
    zip_t *za = zip_open_from_source(src, ZIP_RDONLY, &ze);
    ck_assert_ptr_nonnull(za);
    ms->n = (size_t)zip_get_num_entries(za, 0);
    ck_assert_uint_le(ms->n, 32);
    for (size_t i = 0; i < ms->n; i++) {
        ms->names[i] = strdup(zip_get_name(za, i, 0));
        memset(&ms->bufs[i], 0, sizeof ms->bufs[i]);
        zip_file_t *zf = zip_fopen_index(za, i, 0);
        unsigned char buf[4096];
        zip_int64_t got;
        while ((got = zip_fread(zf, buf, sizeof buf)) > 0)
            tw_put(&ms->bufs[i], buf, (size_t)got);
        ck_assert_int_eq(got, 0);
        zip_fclose(zf);
    }
    zip_discard(za);
    zip_error_fini(&ze);
}

static void free_members(members *ms)
{
    for (size_t i = 0; i < ms->n; i++) {
        free(ms->names[i]);
        tw_free(&ms->bufs[i]);
    }
}

static size_t find_member(const members *ms, const char *suffix)
{
    for (size_t i = 0; i < ms->n; i++) {
        size_t l = strlen(ms->names[i]), s = strlen(suffix);
        if (l >= s && strcmp(ms->names[i] + l - s, suffix) == 0)
            return i;
    }
    ck_abort_msg("no member %s", suffix);
    return 0;
}

/* Opens data; when it opens, reads every tensor (which must then work or fail cleanly). */
static int try_open(const unsigned char *data, size_t size)
{
    sae__torch_dict *d = NULL;
    int rc = sae__torch_open(data, size, "damaged.pt", &d);
    if (rc != SAE_OK) {
        ck_assert_ptr_null(d);
        ck_assert_msg(rc == SAE_EFORMAT || rc == SAE_EUNSUPPORTED, "returned %d: %s", rc,
                      sae_last_error());
        ck_assert_ptr_nonnull(strstr(sae_last_error(), "damaged.pt"));
        return rc;
    }
    for (size_t i = 0; i < d->n_tensors; i++) {
        float *v = tu_malloc((d->tensors[i].count ? d->tensors[i].count : 1) * sizeof(float));
        int r = sae__torch_tensor_to_float(d, &d->tensors[i], v);
        ck_assert(r == SAE_OK || r == SAE_EFORMAT);
        free(v);
    }
    sae__torch_close(d);
    return rc;
}

/* The pickle of each valid fixture cut at every byte and each byte replaced (0, 0xff, flipped
 * top bit), re-wrapped with its storages: refused or read, never a crash or a read outside. */
START_TEST(test_damaged_pickles)
{
    const char *files[] = {"proto2.pt", "proto4.pt", "module.pt", "views.pt", "checkpoint.pt"};
    size_t opened = 0, refused = 0;
    for (size_t f = 0; f < 5; f++) {
        size_t size;
        unsigned char *data = read_fixture(files[f], &size);
        members ms;
        unzip_all(data, size, &ms);
        free(data);
        size_t p = find_member(&ms, "/data.pkl");
        tw_buf orig = ms.bufs[p];
        unsigned char *pkl = tu_malloc(orig.size);
        memcpy(pkl, orig.data, orig.size);
        for (size_t pos = 0; pos <= orig.size; pos++) {
            for (int variant = 0; variant < 4; variant++) {
                if (pos == orig.size && variant > 0)
                    break;
                tw_buf cut = {0};
                if (variant == 0) {
                    tw_put(&cut, pkl, pos); /* truncated */
                } else {
                    tw_put(&cut, pkl, orig.size);
                    static const unsigned char fixed[] = {0, 0, 0xff};
                    cut.data[pos] = variant < 3 ? fixed[variant] : (unsigned char)(pkl[pos] ^ 0x80);
                }
                ms.bufs[p] = cut;
                tw_buf z = {0};
                tw_zip(&z, (const char *const *)ms.names, ms.bufs, ms.n, false);
                if (try_open(z.data, z.size) == SAE_OK)
                    opened++;
                else
                    refused++;
                tw_free(&z);
                tw_free(&cut);
            }
        }
        /* The whole pickle, re-wrapped: opens. */
        ms.bufs[p] = orig;
        tw_buf z = {0};
        tw_zip(&z, (const char *const *)ms.names, ms.bufs, ms.n, true);
        ck_assert_int_eq(try_open(z.data, z.size), SAE_OK);
        tw_free(&z);
        /* And with ZIP64 extra fields, as large files have. */
        tw_zip64(&z, (const char *const *)ms.names, ms.bufs, ms.n);
        ck_assert_int_eq(try_open(z.data, z.size), SAE_OK);
        tw_free(&z);
        free(pkl);
        free_members(&ms);
    }
    /* Truncations never open; some changed bytes do (a changed value, say). */
    ck_assert_uint_gt(refused, opened);
}
END_TEST

/* The archives themselves cut at every byte, and each byte flipped. */
START_TEST(test_damaged_archives)
{
    const char *files[] = {"proto2.pt", "deflated.pt", "torch2.pt"};
    for (size_t f = 0; f < 3; f++) {
        size_t size;
        unsigned char *data = read_fixture(files[f], &size);
        for (size_t cut = 0; cut < size; cut++)
            ck_assert_int_ne(try_open(data, cut), SAE_OK);
        for (size_t pos = 0; pos < size; pos++) {
            data[pos] ^= 0x21;
            (void)try_open(data, size);
            data[pos] ^= 0x21;
        }
        ck_assert_int_eq(try_open(data, size), SAE_OK);
        free(data);
    }
}
END_TEST

/* Raw pickles wrapped in an archive with storage 0 (ten F32 values 0..9). */
static int open_pickle(const char *pkl, size_t len, sae__torch_dict **d)
{
    const char *names[] = {"archive/data.pkl", "archive/data/0"};
    tw_buf ms[2] = {{0}, {0}};
    tw_put(&ms[0], pkl, len);
    for (int i = 0; i < 10; i++) {
        float v = (float)i;
        tw_put(&ms[1], &v, sizeof v);
    }
    tw_buf z = {0};
    tw_zip(&z, names, ms, 2, false);
    *d = NULL;
    int rc = sae__torch_open(z.data, z.size, "raw.pt", d);
    tw_free(&z);
    tw_free(&ms[0]);
    tw_free(&ms[1]);
    return rc;
}
#define OPEN_PICKLE(lit, d) open_pickle(lit, sizeof(lit) - 1, d)

/* Pickles torch never writes but the machine must take in its stride: empty SETITEMS and
 * APPENDS (a fuzzer's find: memcpy from a NULL item array), DICT and LIST from marks, POP,
 * DUP, BINSTRING, LONG1 of every width, negative BININT. */
START_TEST(test_pickle_ops)
{
    sae__torch_dict *d;
    ck_assert_ok(OPEN_PICKLE("\x80\x02}(u](e0(d0(l0.", &d));
    ck_assert_uint_eq(d->n_scalars + d->n_tensors, 0);
    sae__torch_close(d);
    ck_assert_ok(OPEN_PICKLE("\x80\x02("
                             "X\x01\x00\x00\x00" "a" "J\xfe\xff\xff\xff"
                             "X\x01\x00\x00\x00" "b" "\x8a\x01\xff"
                             "X\x01\x00\x00\x00" "c" "\x8a\x00"
                             "X\x01\x00\x00\x00" "d" "\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80"
                             "T\x01\x00\x00\x00" "e" "K\x01"
                             "U\x01" "f" "G?\xf8\x00\x00\x00\x00\x00\x00"
                             "N0" "K\x05" "2"
                             "\x8c\x01" "g" "M\x34\x12"
                             "d.",
                             &d));
    /* The DUP'd 5 is a key (int keys are named in decimal) and its value. */
    const char *names[] = {"a", "b", "c", "d", "e", "f", "5", "g"};
    const double want[] = {-2, -1, 0, -9223372036854775808.0, 1, 1.5, 5, 0x1234};
    ck_assert_uint_eq(d->n_scalars, 8);
    for (int i = 0; i < 8; i++) {
        double x;
        ck_assert_ok(sae__torch_number(d, names[i], &x));
        ck_assert_msg(x == want[i], "%s = %g, expected %g", names[i], x, want[i]);
    }
    ck_assert_int_eq(sae__torch_find_scalar(d, "d")->i, INT64_MIN);
    ck_assert_int_eq(sae__torch_find_scalar(d, "e")->kind, SAE__TORCH_INT);
    sae__torch_close(d);
    /* DICT of an odd number of items. */
    ck_assert_sae(OPEN_PICKLE("\x80\x02(K\x01" "d.", &d), SAE_EFORMAT);
    ck_assert_ptr_nonnull(strstr(sae_last_error(), "odd number"));
}
END_TEST

/* Storage bytes of every dtype, converted: F16/BF16/F64 as sae__to_float, integers exactly. */
START_TEST(test_dtypes)
{
    ck_assert_uint_eq(sae__torch_dtype_size(SAE__TORCH_BF16), 2);
    ck_assert_uint_eq(sae__torch_dtype_size(SAE__TORCH_I64), 8);
    ck_assert_uint_eq(sae__torch_dtype_size(SAE__TORCH_DTYPE_COUNT), 0);
    ck_assert_str_eq(sae__torch_dtype_name(SAE__TORCH_BOOL), "BOOL");
    ck_assert_str_eq(sae__torch_dtype_name(SAE__TORCH_DTYPE_COUNT), "?");
    size_t size;
    unsigned char *data = read_fixture("dtypes.pt", &size);
    sae__torch_dict *d;
    ck_assert_ok(sae__torch_open(data, size, "dtypes.pt", &d));
    float v[6];
    ck_assert_ok(sae__torch_tensor_to_float(d, sae__torch_find(d, "i64"), v));
    for (int i = 0; i < 6; i++)
        ck_assert(v[i] == (float)(i - 2));
    ck_assert_ok(sae__torch_tensor_to_float(d, sae__torch_find(d, "i32"), v));
    ck_assert(v[0] == 7 && v[1] == -9);
    ck_assert_ok(sae__torch_tensor_to_float(d, sae__torch_find(d, "u8"), v));
    ck_assert(v[0] == 0 && v[1] == 200 && v[2] == 255);
    ck_assert_ok(sae__torch_tensor_to_float(d, sae__torch_find(d, "flags"), v));
    ck_assert(v[0] == 1 && v[1] == 0 && v[2] == 1);
    double x;
    ck_assert_ok(sae__torch_number(d, "k", &x));
    ck_assert(x == 32);
    ck_assert_ok(sae__torch_number(d, "scalar", &x));
    ck_assert(x == 2.5);
    const sae__torch_tensor *e = sae__torch_find(d, "empty");
    ck_assert_uint_eq(e->count, 0);
    ck_assert_ok(sae__torch_tensor_to_float(d, e, v));
    sae__torch_close(d);
    sae__torch_close(NULL);
    free(data);
}
END_TEST

static Suite *torch_suite(void)
{
    Suite *s = suite_create("torch");
    TCase *tc = tcase_create("torch");
    tcase_set_timeout(tc, 240);
    tcase_add_test(tc, test_valid_fixtures);
    tcase_add_test(tc, test_layout);
    tcase_add_test(tc, test_refused_fixtures);
    tcase_add_test(tc, test_nothing_runs);
    tcase_add_test(tc, test_crc);
    tcase_add_test(tc, test_dtypes);
    tcase_add_test(tc, test_pickle_ops);
    tcase_add_test(tc, test_damaged_pickles);
    tcase_add_test(tc, test_damaged_archives);
    tcase_add_test(tc, test_transposed_reads);
    suite_add_tcase(s, tc);
    return s;
}

TU_MAIN(torch_suite)
