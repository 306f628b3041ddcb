/* Gemma Scope's params.npz: a zip archive (np.savez: stored members, ZIP64 extra fields; or
 * np.savez_compressed: deflated) of .npy members W_enc [d_in][d_sae], W_dec [d_sae][d_in],
 * b_enc [d_sae], b_dec [d_in], threshold [d_sae] (Gemma Scope 2 spells w_enc, w_dec). The model
 * is JumpReLU with no b_dec subtraction, as in DeepMind's tutorial and SAELens' Gemma loader.
 * libzip reads the archive; each member's .npy header goes through npy.c's parser. */
#include "formats.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zip.h>

/* DEFLATE cannot expand data more than 1032:1; a member claiming more is lying, and its claim
 * must not become an allocation. */
#define MAX_DEFLATE_RATIO 1032u

typedef struct {
    zip_t *za;
    const char *path;
    size_t file_size;
} npz;

/* Reads exactly n bytes of the member, or fails naming it. */
static int read_exact(zip_file_t *zf, const char *path, const char *member, void *dst, size_t n)
{
    unsigned char *p = dst;
    while (n > 0) {
        zip_uint64_t want = n < (1u << 30) ? n : (1u << 30);
        zip_int64_t got = zip_fread(zf, p, want);
        if (got < 0)
            return sae__fail(SAE_EFORMAT, "%s: member '%s': %s", path, member,
                             zip_file_strerror(zf));
        if (got == 0)
            return sae__fail(SAE_EFORMAT, "%s: member '%s' ends early (truncated)", path,
                             member);
        p += got;
        n -= (size_t)got;
    }
    return SAE_OK;
}

/* A member's size and method, checked against the archive before anything is allocated. */
int sae__zip_member_stat(struct zip *za, zip_uint64_t index, const char *member, const char *path,
                         size_t file_size, zip_uint64_t *size)
{
    zip_stat_t zs;
    zip_stat_init(&zs);
    if (zip_stat_index(za, index, 0, &zs) != 0)
        return sae__fail(SAE_EFORMAT, "%s: member '%s': %s", path, member,
                         zip_strerror(za));
    zip_uint64_t need = ZIP_STAT_SIZE | ZIP_STAT_COMP_SIZE | ZIP_STAT_COMP_METHOD;
    if ((zs.valid & need) != need)
        return sae__fail(SAE_EFORMAT, "%s: member '%s' has no recorded size", path, member);
    if ((zs.valid & ZIP_STAT_ENCRYPTION_METHOD) && zs.encryption_method != ZIP_EM_NONE)
        return sae__fail(SAE_EUNSUPPORTED, "%s: member '%s' is encrypted", path, member);
    if (zs.comp_size > file_size)
        return sae__fail(SAE_EFORMAT,
                         "%s: member '%s' claims %llu compressed bytes in a file of %zu",
                         path, member, (unsigned long long)zs.comp_size, file_size);
    if (zs.comp_method == ZIP_CM_STORE) {
        if (zs.size != zs.comp_size)
            return sae__fail(SAE_EFORMAT,
                             "%s: stored member '%s' claims %llu bytes but holds %llu", path,
                             member, (unsigned long long)zs.size,
                             (unsigned long long)zs.comp_size);
    } else if (zs.comp_method == ZIP_CM_DEFLATE) {
        if (zs.size / MAX_DEFLATE_RATIO > zs.comp_size + 1)
            return sae__fail(SAE_EFORMAT,
                             "%s: deflated member '%s' claims %llu bytes from %llu: more than "
                             "deflate can expand to",
                             path, member, (unsigned long long)zs.size,
                             (unsigned long long)zs.comp_size);
    } else {
        return sae__fail(SAE_EUNSUPPORTED,
                         "%s: member '%s' uses compression method %d (stored or deflate only)",
                         path, member, (int)zs.comp_method);
    }
    if (zs.size > SIZE_MAX)
        return sae__fail(SAE_EFORMAT, "%s: member '%s' is too large", path, member);
    *size = zs.size;
    return SAE_OK;
}

static int member_stat(const npz *z, zip_int64_t index, const char *member, zip_uint64_t *size)
{
    return sae__zip_member_stat(z->za, (zip_uint64_t)index, member, z->path, z->file_size, size);
}

/* An open member with its .npy header read and checked against the member's size. */
typedef struct {
    zip_file_t *zf;
    char name[64];
    sae__npy_header h;
} member;

static int member_open(const npz *z, zip_int64_t index, const char *name, member *mb)
{
    mb->zf = NULL;
    snprintf(mb->name, sizeof mb->name, "%s", name);
    zip_uint64_t size = 0;
    int rc = member_stat(z, index, name, &size);
    if (rc != SAE_OK)
        return rc;
    mb->zf = zip_fopen_index(z->za, (zip_uint64_t)index, 0);
    if (mb->zf == NULL)
        return sae__fail(SAE_EFORMAT, "%s: cannot read member '%s': %s", z->path, name,
                         zip_strerror(z->za));
    char where[512];
    snprintf(where, sizeof where, "%s: member '%s'", z->path, name);
    unsigned char pre[12];
    size_t avail = size < 10 ? (size_t)size : 10;
    if ((rc = read_exact(mb->zf, z->path, name, pre, avail)) != SAE_OK)
        return rc;
    if (avail == 10 && (pre[6] == 2 || pre[6] == 3) && size >= 12) {
        if ((rc = read_exact(mb->zf, z->path, name, pre + 10, 2)) != SAE_OK)
            return rc;
        avail = 12;
    }
    if ((rc = sae__npy_prefix(pre, avail, where, &mb->h)) != SAE_OK)
        return rc;
    if (mb->h.dict_len > SAE__NPY_MAX_HEADER || mb->h.prefix + mb->h.dict_len > size)
        return sae__fail(SAE_EFORMAT, "%s: .npy header length %zu does not fit the member (%llu "
                                      "bytes)",
                         where, mb->h.dict_len, (unsigned long long)size);
    char *dict = malloc(mb->h.dict_len + 1);
    if (dict == NULL)
        return sae__fail(SAE_ENOMEM, "%s: out of memory", where);
    if ((rc = read_exact(mb->zf, z->path, name, dict, mb->h.dict_len)) == SAE_OK) {
        dict[mb->h.dict_len] = '\0';
        if (strlen(dict) != mb->h.dict_len)
            rc = sae__fail(SAE_EFORMAT, "%s: NUL byte in the .npy header", where);
        else
            rc = sae__npy_dict(dict, where, &mb->h);
    }
    free(dict);
    if (rc != SAE_OK)
        return rc;
    size_t total;
    if (!sae__add(mb->h.prefix + mb->h.dict_len, mb->h.data_bytes, &total) || total != size)
        return sae__fail(SAE_EFORMAT,
                         "%s: shape (%zu, %zu) of %s needs %zu bytes after the header, but the "
                         "member has %llu",
                         where, mb->h.rows, mb->h.cols, sae__dtype_name(mb->h.dtype),
                         mb->h.data_bytes,
                         (unsigned long long)(size - mb->h.prefix - mb->h.dict_len));
    return SAE_OK;
}

static void member_close(member *mb)
{
    if (mb->zf != NULL)
        zip_fclose(mb->zf);
    mb->zf = NULL;
}

/* The member's data, converted to float into dst (count values) and checked finite a
 * cache-sized part at a time, then the end of the member, which is where libzip checks the CRC.
 * Exactly the bytes the .npy header declares are read, plus one to see that nothing follows:
 * neither libzip's declared size nor the deflate stream decides how much is decompressed. */
static int member_read(const npz *z, member *mb, float *dst)
{
    size_t count = mb->h.rows * mb->h.cols, esize = sae__dtype_size(mb->h.dtype);
    unsigned char buf[1 << 16];
    size_t per = sizeof buf / esize;
    int rc = SAE_OK;
    for (size_t i = 0; i < count && rc == SAE_OK; i += per) {
        size_t n = count - i < per ? count - i : per;
        if (mb->h.dtype == SAE__F32 && !mb->h.big_endian) {
            rc = read_exact(mb->zf, z->path, mb->name, dst + i, n * sizeof(float));
        } else if ((rc = read_exact(mb->zf, z->path, mb->name, buf, n * esize)) == SAE_OK) {
            sae__npy_to_float(&mb->h, buf, n, dst + i);
        }
        /* Column-major data is checked as it is read; positions are reported once it is
         * reordered, so the finiteness check below waits for that. */
        if (mb->h.fortran)
            continue;
        /* As sae_model_set_tensor demands of the caller's weights. */
        if (rc == SAE_OK && sae__check_finite(dst + i, n, mb->h.cols, mb->name) != SAE_OK) {
            size_t j = i;
            while (j < i + n && isfinite(dst[j]))
                j++;
            if (mb->h.ndim == 2)
                rc = sae__fail(SAE_EFORMAT,
                               "%s: member '%s'[%zu][%zu] is %g: weights must be finite",
                               z->path, mb->name, j / mb->h.cols, j % mb->h.cols,
                               (double)dst[j < i + n ? j : i]);
            else
                rc = sae__fail(SAE_EFORMAT, "%s: member '%s'[%zu] is %g: weights must be finite",
                               z->path, mb->name, j, (double)dst[j < i + n ? j : i]);
        }
    }
    if (rc == SAE_OK && mb->h.fortran) {
        /* np.savez(W_enc=W_dec.T) stores a transposed view as a Fortran-ordered member:
         * numpy reads it as the same matrix, so it is reordered here to row-major. */
        float *tmp = sae__alloc(count, sizeof(float), mb->name);
        if (tmp == NULL)
            return SAE_ENOMEM;
        sae__npy_fortran_to_c(dst, tmp, mb->h.rows, mb->h.cols);
        free(tmp);
        for (size_t j = 0; j < count && rc == SAE_OK; j++)
            if (!isfinite(dst[j]))
                rc = sae__fail(SAE_EFORMAT,
                               "%s: member '%s'[%zu][%zu] is %g: weights must be finite",
                               z->path, mb->name, j / mb->h.cols, j % mb->h.cols, (double)dst[j]);
    }
    if (rc != SAE_OK)
        return rc;
    unsigned char extra;
    zip_int64_t got = zip_fread(mb->zf, &extra, 1);
    if (got != 0)
        return sae__fail(SAE_EFORMAT, "%s: member '%s': %s", z->path, mb->name,
                         got < 0 ? zip_file_strerror(mb->zf) : "data past the array");
    return SAE_OK;
}

/* Finds the first of the names that is a member; NULL name when none is. */
static zip_int64_t locate(const npz *z, const char *const *names, size_t n, const char **name)
{
    for (size_t i = 0; i < n; i++) {
        zip_int64_t index = zip_name_locate(z->za, names[i], ZIP_FL_ENC_RAW);
        if (index >= 0) {
            *name = names[i];
            return index;
        }
    }
    *name = NULL;
    return -1;
}

/* Members SAELens refuses or drops: a feature scale other than ones, a skip connection. */
static int check_extras(const npz *z, size_t d_sae)
{
    const char *name;
    static const char *const skip[] = {"affine_skip_connection.npy", "W_skip.npy", "w_skip.npy"};
    if (locate(z, skip, 3, &name) >= 0)
        return sae__fail(SAE_EUNSUPPORTED,
                         "%s: member '%s': a skip connection (a transcoder), not supported",
                         z->path, name);
    static const char *const scale[] = {"scaling_factor.npy"};
    zip_int64_t index = locate(z, scale, 1, &name);
    if (index < 0)
        return SAE_OK;
    member mb;
    int rc = member_open(z, index, name, &mb);
    float *v = NULL;
    if (rc == SAE_OK && (mb.h.ndim != 1 || mb.h.rows != d_sae))
        rc = sae__fail(SAE_EFORMAT, "%s: member '%s' has shape (%zu, %zu), expected (%zu,)",
                       z->path, name, mb.h.rows, mb.h.cols, d_sae);
    if (rc == SAE_OK && (v = sae__alloc(d_sae, sizeof(float), "scaling_factor")) == NULL)
        rc = SAE_ENOMEM;
    if (rc == SAE_OK)
        rc = member_read(z, &mb, v);
    for (size_t i = 0; rc == SAE_OK && i < d_sae; i++)
        if (v[i] != 1.0f)
            rc = sae__fail(SAE_EUNSUPPORTED,
                           "%s: member 'scaling_factor' is not all ones (a feature scale, not "
                           "supported)",
                           z->path);
    free(v);
    member_close(&mb);
    return rc;
}

static int load_members(const npz *z, sae_model **out)
{
    static const struct {
        sae_tensor t;
        const char *names[2];
    } members[] = {{SAE_W_ENC, {"W_enc.npy", "w_enc.npy"}},
                   {SAE_W_DEC, {"W_dec.npy", "w_dec.npy"}},
                   {SAE_B_ENC, {"b_enc.npy", NULL}},
                   {SAE_B_DEC, {"b_dec.npy", NULL}},
                   {SAE_THRESHOLD, {"threshold.npy", NULL}}};
    enum { N = sizeof members / sizeof members[0] };
    member mb[N];
    for (size_t i = 0; i < N; i++)
        mb[i].zf = NULL;
    const char *name;
    zip_int64_t index = locate(z, members[0].names, 2, &name);
    if (index < 0)
        return sae__fail(SAE_EFORMAT,
                         "%s: a zip archive without member W_enc.npy: not a Gemma Scope "
                         "params.npz",
                         z->path);
    int rc = member_open(z, index, name, &mb[0]);
    if (rc == SAE_OK && (mb[0].h.ndim != 2 || mb[0].h.rows == 0 || mb[0].h.cols == 0))
        rc = sae__fail(SAE_EFORMAT, "%s: member '%s' is not a non-empty matrix", z->path, name);
    size_t d_in = mb[0].h.rows, d_sae = mb[0].h.cols;
    if (rc == SAE_OK)
        rc = check_extras(z, d_sae);
    /* Every member is found and its .npy header checked against the shapes and against its
     * size in the archive before anything is allocated or decompressed: a small archive whose
     * first member inflates to hundreds of MB is refused for a later member's fault at no
     * cost. */
    for (size_t i = 1; i < N && rc == SAE_OK; i++) {
        index = locate(z, members[i].names, members[i].names[1] ? 2 : 1, &name);
        if (index < 0) {
            rc = sae__fail(SAE_EFORMAT, "%s: member '%s' is missing", z->path,
                           members[i].names[0]);
            break;
        }
        if ((rc = member_open(z, index, name, &mb[i])) != SAE_OK)
            break;
        sae_tensor t = members[i].t;
        size_t d0 = t == SAE_B_DEC ? d_in : d_sae;
        size_t d1 = t == SAE_W_DEC ? d_in : 0;
        const sae__npy_header *h = &mb[i].h;
        if (h->ndim != (d1 ? 2u : 1u) || h->rows != d0 || (d1 && h->cols != d1)) {
            if (d1)
                rc = sae__fail(SAE_EFORMAT,
                               "%s: member '%s' has shape (%zu, %zu), expected (%zu, %zu)",
                               z->path, name, h->rows, h->ndim == 2 ? h->cols : 0, d0, d1);
            else
                rc = sae__fail(SAE_EFORMAT, "%s: member '%s' has %zu-D shape (%zu, ...), "
                                            "expected (%zu,)",
                               z->path, name, h->ndim, h->rows, d0);
        }
    }
    sae_model *m = NULL;
    const sae__shape shape = {SAE_ARCH_JUMPRELU, d_in, d_sae, d_in, false, false};
    if (rc == SAE_OK && (rc = sae__model_alloc(&m, &shape)) != SAE_OK)
        rc = sae__wrap(rc, "%s: ", z->path);
    if (rc == SAE_OK) {
        m->format = "gemma-scope";
        m->apply_b_dec = 0; /* Gemma Scope encodes the raw input */
    }
    for (size_t i = 0; i < N && rc == SAE_OK; i++) {
        sae_tensor t = members[i].t;
        if ((rc = sae__model_own_tensor_uninit(m, t)) == SAE_OK) {
            rc = member_read(z, &mb[i], *sae__model_tensor_slot(m, t));
            if (mb[i].h.dtype != SAE__F32)
                m->dtype = mb[i].h.dtype;
        }
        member_close(&mb[i]);
    }
    for (size_t i = 0; i < N; i++)
        member_close(&mb[i]);
    if (rc != SAE_OK) {
        sae_model_free(m);
        return rc;
    }
    sae__model_weights_changed(m);
    *out = m;
    return SAE_OK;
}

int sae__npz_load(const unsigned char *data, size_t size, const char *path, sae_model **out)
{
    *out = NULL;
    zip_error_t ze;
    zip_error_init(&ze);
    zip_source_t *src = zip_source_buffer_create(data, size, 0, &ze);
    if (src == NULL) {
        int rc = sae__fail(SAE_ENOMEM, "%s: %s", path, zip_error_strerror(&ze));
        zip_error_fini(&ze);
        return rc;
    }
    /* ZIP_CHECKCONS: the central directory and local headers must agree. */
    zip_t *za = zip_open_from_source(src, ZIP_RDONLY | ZIP_CHECKCONS, &ze);
    if (za == NULL) {
        /* libzip refuses two members of one name (with ZIP_CHECKCONS), where Python's zipfile
         * and so np.load would read the last: say so plainly. */
        int rc = zip_error_code_zip(&ze) == ZIP_ER_EXISTS
                     ? sae__fail(SAE_EFORMAT, "%s: two members of the zip archive have the same "
                                              "name",
                                 path)
                     : sae__fail(SAE_EFORMAT, "%s: not a readable zip archive: %s", path,
                                 zip_error_strerror(&ze));
        zip_source_free(src);
        zip_error_fini(&ze);
        return rc;
    }
    zip_error_fini(&ze);
    npz z = {za, path, size};
    int rc = load_members(&z, out);
    zip_discard(za);
    return rc;
}
