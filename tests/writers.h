/* Writers of other tools' file layouts, for the format tests, the damaged-file corpus and the
 * fuzzers' seeds. They build files byte by byte (not through libsae), so a reader bug cannot
 * hide behind a matching writer bug. No Check dependency: failures abort. */
#ifndef SAE_TEST_WRITERS_H
#define SAE_TEST_WRITERS_H

#include <stdbool.h>
#include <stddef.h>

/* A growable byte buffer. */
typedef struct {
    unsigned char *data;
    size_t size, cap;
} tw_buf;
void tw_put(tw_buf *b, const void *data, size_t size);
void tw_printf(tw_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void tw_free(tw_buf *b);

/* One tensor: float data converted on write to dtype "F32", "F16", "BF16" or "F64". For F16 and
 * BF16 the values must be exactly representable (tw_quantize makes them so; infinities and NaN
 * are, for the tests of their refusal); F64 writes the double of each float. ndim 0 is a
 * scalar. */
typedef struct {
    const char *name;
    const char *dtype;
    size_t ndim;
    size_t shape[2];
    const float *data;
} tw_tensor;

/* Rounds v to a value exactly representable in F16 and BF16 alike (a multiple of 1/64 with
 * |v| < 4): test weights made of these mean the same in every dtype. */
float tw_quantize(float v);
/* Fills v[0..n) with deterministic values in (-scale, scale), quantized. */
void tw_fill(unsigned long long seed, float *v, size_t n, float scale);

/* safetensors.torch.save_file's layout: the 8-byte header length, the JSON header (tensors in
 * the order given, __metadata__ first when meta_json is not NULL, e.g. "{\"format\":\"pt\"}"),
 * spaces to an 8-byte boundary, then the data back to back. */
void tw_safetensors(tw_buf *out, const tw_tensor *t, size_t n, const char *meta_json);
/* A safetensors file from a literal header and raw data: for building damaged files. */
void tw_safetensors_raw(tw_buf *out, const char *header, const void *data, size_t data_size);

/* A .npy (version 1.0) array as np.save writes it: descr "<f4", "<f2" or "<f8". */
void tw_npy(tw_buf *out, const char *descr, size_t ndim, const size_t *shape, const float *data);

/* A zip archive of members (name, bytes), stored or deflated, as np.savez / savez_compressed
 * (without ZIP64 extras: libzip writes them only past 4 GiB). */
void tw_zip(tw_buf *out, const char *const *names, const tw_buf *members, size_t n, bool deflate);
/* The same members in a zip written by hand with ZIP64 extra fields on every entry, as numpy's
 * savez does (it opens each member with force_zip64=True); stored only. */
void tw_zip64(tw_buf *out, const char *const *names, const tw_buf *members, size_t n);

/* Writes a buffer to a file (replacing it); aborts on failure. */
void tw_write(const char *path, const void *data, size_t size);
/* Writes a string to a file. */
void tw_write_text(const char *path, const char *text);

#endif
