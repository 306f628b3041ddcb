/* llama.cpp control-vector files: GGUF v3 with one F32 "direction.<layer>" tensor per layer.
 *
 * Layout (ggml docs/gguf.md), all integers little-endian:
 *   "GGUF", u32 version 3, u64 tensor count, u64 metadata count
 *   metadata: { string key, u32 type, value }            strings are u64 length + bytes
 *   tensor infos: { string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset }
 *   zero padding to the alignment, then the tensor data, each tensor padded to the alignment.
 * ggml's reader takes the data section to be the sum of the padded tensor sizes, so the last
 * tensor is padded too. */
#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GGUF_VERSION 3
#define GGUF_ALIGNMENT 32
#define GGUF_TYPE_UINT32 4
#define GGUF_TYPE_INT32 5
#define GGUF_TYPE_STRING 8
#define GGML_TYPE_F32 0

typedef struct {
    unsigned char *p;
    size_t len, cap;
} buffer;

static void put(buffer *b, const void *data, size_t size)
{
    if (b->p != NULL)
        memcpy(b->p + b->len, data, size);
    b->len += size;
}

static void put_u32(buffer *b, uint32_t v)
{
    unsigned char le[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16),
                           (unsigned char)(v >> 24)};
    put(b, le, 4);
}

static void put_u64(buffer *b, uint64_t v)
{
    put_u32(b, (uint32_t)v);
    put_u32(b, (uint32_t)(v >> 32));
}

static void put_str(buffer *b, const char *s)
{
    size_t len = strlen(s);
    put_u64(b, len);
    put(b, s, len);
}

static size_t padded(size_t size) { return (size + GGUF_ALIGNMENT - 1) / GGUF_ALIGNMENT * GGUF_ALIGNMENT; }

/* Everything before the tensor data, padded. Called once with b->p NULL to measure. */
static void header(buffer *b, size_t n_embd, size_t n_layer, const char *hint, size_t tensor_bytes)
{
    const size_t layers = n_layer - 1;
    put(b, "GGUF", 4);
    put_u32(b, GGUF_VERSION);
    put_u64(b, layers);
    put_u64(b, 4);
    put_str(b, "general.architecture");
    put_u32(b, GGUF_TYPE_STRING);
    put_str(b, "controlvector");
    put_str(b, "general.alignment");
    put_u32(b, GGUF_TYPE_UINT32);
    put_u32(b, GGUF_ALIGNMENT);
    put_str(b, "controlvector.model_hint");
    put_u32(b, GGUF_TYPE_STRING);
    put_str(b, hint);
    /* llama-cvector-generator writes the count as int32; so do we, for any reader that checks. */
    put_str(b, "controlvector.layer_count");
    put_u32(b, GGUF_TYPE_INT32);
    put_u32(b, (uint32_t)layers);
    for (size_t l = 1; l <= layers; l++) {
        char name[32];
        snprintf(name, sizeof name, "direction.%zu", l);
        put_str(b, name);
        put_u32(b, 1);
        put_u64(b, n_embd);
        put_u32(b, GGML_TYPE_F32);
        put_u64(b, (l - 1) * tensor_bytes);
    }
    static const unsigned char zeros[GGUF_ALIGNMENT] = {0};
    put(b, zeros, padded(b->len) - b->len);
}

int sae_cvec_write(const char *path, const float *data, size_t n_embd, size_t n_layer,
                   const char *model_hint)
{
    SAE_CHECK_NULL(path);
    SAE_CHECK_NULL(data);
    if (n_embd == 0)
        return sae__fail(SAE_EINVAL, "%s: n_embd must be at least 1", __func__);
    if (n_layer < 2 || n_layer - 1 > INT32_MAX)
        return sae__fail(SAE_EINVAL,
                         "%s: n_layer = %zu; a control vector has n_layer - 1 layers, from 1 to "
                         "%d",
                         __func__, n_layer, INT32_MAX);
    size_t count, tensor_bytes, data_bytes;
    if (!sae__mul(n_embd, n_layer - 1, &count) || !sae__mul(n_embd, sizeof(float), &tensor_bytes) ||
        tensor_bytes > SIZE_MAX - GGUF_ALIGNMENT ||
        !sae__mul(padded(tensor_bytes), n_layer - 1, &data_bytes))
        return sae__fail(SAE_EINVAL, "%s: %zu layers of %zu floats is too large", __func__,
                         n_layer - 1, n_embd);
    tensor_bytes = padded(tensor_bytes);
    int rc = sae__check_finite(data, count, n_embd, "data");
    if (rc != SAE_OK)
        return sae__wrap(rc, "%s: ", __func__);
    const char *hint = model_hint ? model_hint : "";

    buffer head = {0};
    header(&head, n_embd, n_layer, hint, tensor_bytes);
    head.cap = head.len;
    head.len = 0;
    head.p = sae__alloc(head.cap, 1, "control-vector header");
    unsigned char *layer = sae__zalloc(tensor_bytes, 1, "control-vector layer");
    if (head.p == NULL || layer == NULL) {
        free(head.p);
        free(layer);
        return SAE_ENOMEM;
    }
    header(&head, n_embd, n_layer, hint, tensor_bytes);

    sae__atomic_file f;
    rc = sae__atomic_begin(&f, path);
    if (rc == SAE_OK)
        rc = sae__atomic_write(&f, head.p, head.len);
    for (size_t l = 0; rc == SAE_OK && l < n_layer - 1; l++) {
        /* Bytes in little-endian order whatever the host; the padding stays zero. */
        buffer out = {layer, 0, tensor_bytes};
        for (size_t j = 0; j < n_embd; j++) {
            uint32_t bits;
            memcpy(&bits, data + l * n_embd + j, sizeof bits);
            put_u32(&out, bits);
        }
        rc = sae__atomic_write(&f, layer, tensor_bytes);
    }
    if (rc == SAE_OK)
        rc = sae__atomic_commit(&f);
    else
        sae__atomic_abort(&f);
    free(head.p);
    free(layer);
    return rc;
}
