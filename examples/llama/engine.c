/*
 * engine.c - llama2.c checkpoint loading, the Llama forward pass, sampling, generation.
 *
 * Written from the public description of llama2.c's legacy checkpoint format and forward pass.
 * Matrices are stored row-major as [out][in] (PyTorch's nn.Linear layout), so every projection
 * is one cblas_sgemv(RowMajor, NoTrans, out, in, W, ld = in).
 */
#include "engine.h"
#include "engine_internal.h"

#include <cblas.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- errors ----------------------------------------------------------------------------- */

static _Thread_local char last_error[512];

const char *llama_last_error(void) { return last_error; }

void llama_clear_error(void) { last_error[0] = '\0'; }

int llama_fail(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return code;
}

/* ---- files ------------------------------------------------------------------------------ */

int llama_read_file(const char *path, unsigned char **data, size_t *size)
{
    *data = NULL;
    *size = 0;
    FILE *f = fopen(path, "rb");
    if (!f)
        return llama_fail(LLAMA_EIO, "%s: cannot open: %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    unsigned char *buf = malloc(cap);
    if (!buf) {
        fclose(f);
        return llama_fail(LLAMA_ENOMEM, "%s: out of memory", path);
    }
    for (;;) {
        if (n == cap) {
            if (cap > ((size_t)-1) / 2) {
                free(buf);
                fclose(f);
                return llama_fail(LLAMA_ENOMEM, "%s: file too large", path);
            }
            unsigned char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                fclose(f);
                return llama_fail(LLAMA_ENOMEM, "%s: out of memory after %zu bytes", path, n);
            }
            buf = nb;
            cap *= 2;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0)
            break;
    }
    int err = ferror(f);
    fclose(f);
    if (err) {
        free(buf);
        return llama_fail(LLAMA_EIO, "%s: read error after %zu bytes", path, n);
    }
    *data = buf;
    *size = n;
    return LLAMA_OK;
}

/* ---- model ------------------------------------------------------------------------------ */

struct llama_model {
    llama_config cfg;
    float *weights; /* every float of the file after the header */
    const float *tok_emb;   /* [vocab][dim] */
    const float *rms_att;   /* [layers][dim] */
    const float *wq;        /* [layers][dim][dim] */
    const float *wk;        /* [layers][kv_dim][dim] */
    const float *wv;        /* [layers][kv_dim][dim] */
    const float *wo;        /* [layers][dim][dim] */
    const float *rms_ffn;   /* [layers][dim] */
    const float *w1;        /* [layers][hidden][dim] */
    const float *w2;        /* [layers][dim][hidden] */
    const float *w3;        /* [layers][hidden][dim] */
    const float *rms_final; /* [dim] */
    const float *wcls;      /* [vocab][dim] */
    float *rope_cos;        /* [seq_len][head_size / 2] */
    float *rope_sin;
};

#define HEADER_INTS 7
#define HEADER_BYTES (HEADER_INTS * 4)
#define MAX_HEADER_VALUE (1 << 24) /* far above any llama2.c model; keeps int math safe */

/* a*b (+ c) in size_t, failing on overflow. */
static int mul_ok(size_t a, size_t b, size_t *r) { return !__builtin_mul_overflow(a, b, r); }
static int add_ok(size_t a, size_t b, size_t *r) { return !__builtin_add_overflow(a, b, r); }

static int32_t read_i32(const unsigned char *p)
{
    int32_t v;
    memcpy(&v, p, sizeof v); /* llama2.c files are little-endian, as every host we build on */
    return v;
}

void llama_model_free(llama_model *m)
{
    if (!m)
        return;
    free(m->weights);
    free(m->rope_cos);
    free(m->rope_sin);
    free(m);
}

const llama_config *llama_model_config(const llama_model *m) { return m ? &m->cfg : NULL; }

static int check_header(const char *path, const int32_t h[HEADER_INTS], llama_config *c)
{
    static const char *const names[HEADER_INTS] = {"dim",        "hidden_dim", "n_layers",
                                                   "n_heads",    "n_kv_heads", "vocab_size",
                                                   "seq_len"};
    if ((uint32_t)h[0] == 0x616b3432u)
        return llama_fail(LLAMA_EFORMAT,
                          "%s: starts with magic \"ak42\": a versioned llama2.c export; only the "
                          "legacy (version 0) format is supported",
                          path);
    for (int i = 0; i < HEADER_INTS; i++) {
        int64_t v = i == 5 && h[i] < 0 ? -(int64_t)h[i] : (int64_t)h[i];
        if (v <= 0 || v > MAX_HEADER_VALUE)
            return llama_fail(LLAMA_EFORMAT,
                              "%s: header field %d (%s) is %d, expected 1..%d%s", path, i,
                              names[i], (int)h[i], MAX_HEADER_VALUE,
                              i == 5 ? " in absolute value" : "");
    }
    c->dim = h[0];
    c->hidden_dim = h[1];
    c->n_layers = h[2];
    c->n_heads = h[3];
    c->n_kv_heads = h[4];
    c->shared_classifier = h[5] > 0;
    c->vocab_size = h[5] > 0 ? h[5] : -h[5];
    c->seq_len = h[6];
    if (c->dim % c->n_heads != 0)
        return llama_fail(LLAMA_EFORMAT, "%s: dim %d is not a multiple of n_heads %d", path,
                          c->dim, c->n_heads);
    if ((c->dim / c->n_heads) % 2 != 0)
        return llama_fail(LLAMA_EFORMAT,
                          "%s: head size %d (dim %d / n_heads %d) is odd; rotary embeddings "
                          "need pairs",
                          path, c->dim / c->n_heads, c->dim, c->n_heads);
    if (c->n_kv_heads > c->n_heads || c->n_heads % c->n_kv_heads != 0)
        return llama_fail(LLAMA_EFORMAT, "%s: n_heads %d is not a multiple of n_kv_heads %d",
                          path, c->n_heads, c->n_kv_heads);
    return LLAMA_OK;
}

/* Number of floats the weights of config c take, or 0 on overflow. */
static size_t expected_floats(const llama_config *c)
{
    size_t dim = (size_t)c->dim, hid = (size_t)c->hidden_dim, L = (size_t)c->n_layers;
    size_t kv = dim / (size_t)c->n_heads * (size_t)c->n_kv_heads;
    size_t hs = dim / (size_t)c->n_heads;
    size_t parts[10], total = 0;
    int ok = mul_ok((size_t)c->vocab_size, dim, &parts[0]) /* embedding */
             && mul_ok(L, dim * 2, &parts[1])              /* rms_att + rms_ffn */
             && mul_ok(L, dim * dim, &parts[2])            /* wq */
             && mul_ok(L, dim * kv, &parts[3]) && mul_ok(parts[3], 2, &parts[3]) /* wk, wv */
             && mul_ok(L, dim * dim, &parts[4])                                  /* wo */
             && mul_ok(L, dim * hid, &parts[5]) && mul_ok(parts[5], 3, &parts[5]) /* w1-3 */
             && mul_ok((size_t)c->seq_len, hs, &parts[6]); /* freq_cis real + imag */
    if (!ok)
        return 0;
    parts[7] = dim; /* rms_final */
    parts[8] = c->shared_classifier ? 0 : parts[0];
    for (int i = 0; i < 9; i++)
        if (!add_ok(total, parts[i], &total))
            return 0;
    return total;
}

static int make_rope(llama_model *m)
{
    const llama_config *c = &m->cfg;
    int hs = c->dim / c->n_heads, half = hs / 2;
    size_t n = (size_t)c->seq_len * (size_t)half;
    m->rope_cos = malloc(n * sizeof(float));
    m->rope_sin = malloc(n * sizeof(float));
    if (!m->rope_cos || !m->rope_sin)
        return llama_fail(LLAMA_ENOMEM, "out of memory for rotary tables (%zu floats)", 2 * n);
    for (int pos = 0; pos < c->seq_len; pos++) {
        for (int j = 0; j < half; j++) {
            /* the pair (2j, 2j+1) of every head turns by pos * 10000^(-2j / head_size) */
            float freq = 1.0f / powf(10000.0f, (float)(2 * j) / (float)hs);
            float angle = (float)pos * freq;
            m->rope_cos[(size_t)pos * (size_t)half + (size_t)j] = cosf(angle);
            m->rope_sin[(size_t)pos * (size_t)half + (size_t)j] = sinf(angle);
        }
    }
    return LLAMA_OK;
}

int llama_model_load(const char *path, llama_model **out)
{
    if (!out)
        return llama_fail(LLAMA_EINVAL, "llama_model_load: out is NULL");
    *out = NULL;
    if (!path)
        return llama_fail(LLAMA_EINVAL, "llama_model_load: path is NULL");
    llama_clear_error();

    unsigned char *data;
    size_t size;
    int rc = llama_read_file(path, &data, &size);
    if (rc)
        return rc;
    if (size < HEADER_BYTES) {
        free(data);
        return llama_fail(LLAMA_EFORMAT,
                          "%s: %zu bytes, too short for the 28-byte llama2.c header", path, size);
    }
    int32_t h[HEADER_INTS];
    for (int i = 0; i < HEADER_INTS; i++)
        h[i] = read_i32(data + 4 * i);
    llama_config cfg;
    rc = check_header(path, h, &cfg);
    if (rc) {
        free(data);
        return rc;
    }
    size_t nfloat = expected_floats(&cfg), want;
    if (nfloat == 0 || !mul_ok(nfloat, 4, &want) || !add_ok(want, HEADER_BYTES, &want)) {
        free(data);
        return llama_fail(LLAMA_EFORMAT, "%s: header implies an impossibly large model", path);
    }
    if (size != want) {
        free(data);
        return llama_fail(LLAMA_EFORMAT,
                          "%s: %zu bytes, but the header (dim %d, hidden_dim %d, n_layers %d, "
                          "n_heads %d, n_kv_heads %d, vocab_size %d%s, seq_len %d) implies "
                          "%zu bytes (28-byte header + %zu float32 weights)%s",
                          path, size, cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads,
                          cfg.n_kv_heads, cfg.vocab_size,
                          cfg.shared_classifier ? " shared" : " unshared", cfg.seq_len, want,
                          nfloat, size < want ? ": truncated?" : ": trailing data");
    }

    llama_model *m = calloc(1, sizeof *m);
    if (!m) {
        free(data);
        return llama_fail(LLAMA_ENOMEM, "%s: out of memory", path);
    }
    m->cfg = cfg;
    m->weights = malloc(nfloat * sizeof(float));
    if (!m->weights) {
        free(data);
        llama_model_free(m);
        return llama_fail(LLAMA_ENOMEM, "%s: out of memory for %zu weights", path, nfloat);
    }
    memcpy(m->weights, data + HEADER_BYTES, nfloat * sizeof(float));
    free(data);

    size_t dim = (size_t)cfg.dim, hid = (size_t)cfg.hidden_dim, L = (size_t)cfg.n_layers;
    size_t hs = dim / (size_t)cfg.n_heads, kv = hs * (size_t)cfg.n_kv_heads;
    size_t vocab = (size_t)cfg.vocab_size;
    struct {
        const char *name;
        const float **dst;
        size_t n;
    } tensors[] = {
        {"token_embedding", &m->tok_emb, vocab * dim},
        {"rms_att", &m->rms_att, L * dim},
        {"wq", &m->wq, L * dim * dim},
        {"wk", &m->wk, L * kv * dim},
        {"wv", &m->wv, L * kv * dim},
        {"wo", &m->wo, L * dim * dim},
        {"rms_ffn", &m->rms_ffn, L * dim},
        {"w1", &m->w1, L * hid * dim},
        {"w2", &m->w2, L * dim * hid},
        {"w3", &m->w3, L * hid * dim},
        {"rms_final", &m->rms_final, dim},
        {"freq_cis", NULL, (size_t)cfg.seq_len * hs},
        {"classifier", &m->wcls, cfg.shared_classifier ? 0 : vocab * dim},
    };
    size_t off = 0;
    for (size_t t = 0; t < sizeof tensors / sizeof tensors[0]; t++) {
        const float *p = m->weights + off;
        for (size_t i = 0; i < tensors[t].n; i++) {
            if (!isfinite(p[i])) {
                size_t byte = HEADER_BYTES + (off + i) * 4;
                llama_model_free(m);
                return llama_fail(LLAMA_EFORMAT,
                                  "%s: tensor %s holds a non-finite value at element %zu "
                                  "(byte offset %zu)",
                                  path, tensors[t].name, i, byte);
            }
        }
        if (tensors[t].dst)
            *tensors[t].dst = p;
        off += tensors[t].n;
    }
    if (cfg.shared_classifier)
        m->wcls = m->tok_emb;
    rc = make_rope(m);
    if (rc) {
        llama_model_free(m);
        return rc;
    }
    *out = m;
    return LLAMA_OK;
}

/* ---- state ------------------------------------------------------------------------------ */

struct llama_state {
    const llama_model *m;
    float *x;      /* [dim] residual stream */
    float *xb;     /* [dim] normed input / attention output */
    float *xb2;    /* [dim] */
    float *hb;     /* [hidden] */
    float *hb2;    /* [hidden] */
    float *q;      /* [dim] */
    float *att;    /* [seq_len] scores of one head */
    float *logits; /* [vocab] */
    float *kcache; /* [layers][seq_len][kv_dim] */
    float *vcache; /* [layers][seq_len][kv_dim] */
    llama_resid_hook hook;
    int hook_layer;
    void *hook_user;
    llama_point_hook point_hook;
    void *point_user;
};

void llama_state_free(llama_state *s)
{
    if (!s)
        return;
    free(s->x);
    free(s->xb);
    free(s->xb2);
    free(s->hb);
    free(s->hb2);
    free(s->q);
    free(s->att);
    free(s->logits);
    free(s->kcache);
    free(s->vcache);
    free(s);
}

int llama_state_create(const llama_model *m, llama_state **out)
{
    if (!out)
        return llama_fail(LLAMA_EINVAL, "llama_state_create: out is NULL");
    *out = NULL;
    if (!m)
        return llama_fail(LLAMA_EINVAL, "llama_state_create: model is NULL");
    const llama_config *c = &m->cfg;
    size_t dim = (size_t)c->dim, hid = (size_t)c->hidden_dim;
    size_t kv = dim / (size_t)c->n_heads * (size_t)c->n_kv_heads, cache;
    if (!mul_ok((size_t)c->n_layers * (size_t)c->seq_len, kv, &cache) ||
        !mul_ok(cache, sizeof(float), &cache))
        return llama_fail(LLAMA_ENOMEM, "llama_state_create: KV cache size overflows");
    llama_state *s = calloc(1, sizeof *s);
    if (!s)
        return llama_fail(LLAMA_ENOMEM, "llama_state_create: out of memory");
    s->m = m;
    s->x = calloc(dim, sizeof(float));
    s->xb = calloc(dim, sizeof(float));
    s->xb2 = calloc(dim, sizeof(float));
    s->hb = calloc(hid, sizeof(float));
    s->hb2 = calloc(hid, sizeof(float));
    s->q = calloc(dim, sizeof(float));
    s->att = calloc((size_t)c->seq_len, sizeof(float));
    s->logits = calloc((size_t)c->vocab_size, sizeof(float));
    s->kcache = calloc(1, cache);
    s->vcache = calloc(1, cache);
    if (!s->x || !s->xb || !s->xb2 || !s->hb || !s->hb2 || !s->q || !s->att || !s->logits ||
        !s->kcache || !s->vcache) {
        llama_state_free(s);
        return llama_fail(LLAMA_ENOMEM, "llama_state_create: out of memory (KV cache %zu bytes)",
                          2 * cache);
    }
    *out = s;
    return LLAMA_OK;
}

int llama_state_set_hook(llama_state *s, int layer, llama_resid_hook hook, void *user)
{
    if (!s)
        return llama_fail(LLAMA_EINVAL, "llama_state_set_hook: state is NULL");
    if (hook && layer != LLAMA_HOOK_ALL_LAYERS && (layer < 0 || layer > s->m->cfg.n_layers))
        return llama_fail(LLAMA_EINVAL,
                          "llama_state_set_hook: layer %d out of range 0..%d (or "
                          "LLAMA_HOOK_ALL_LAYERS)",
                          layer, s->m->cfg.n_layers);
    s->hook = hook;
    s->hook_layer = layer;
    s->hook_user = hook ? user : NULL;
    return LLAMA_OK;
}

int llama_state_set_point_hook(llama_state *s, llama_point_hook hook, void *user)
{
    if (!s)
        return llama_fail(LLAMA_EINVAL, "llama_state_set_point_hook: state is NULL");
    s->point_hook = hook;
    s->point_user = hook ? user : NULL;
    return LLAMA_OK;
}

static const char *const point_names[LLAMA_HOOK_POINTS] = {
    "hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_in", "hook_mlp_out",
    "hook_resid_post"};

const char *llama_hook_point_name(llama_hook_point point)
{
    return (unsigned)point < LLAMA_HOOK_POINTS ? point_names[point] : NULL;
}

int llama_hook_point_parse(const char *name, llama_hook_point *point, int *layer)
{
    if (!name || !point)
        return llama_fail(LLAMA_EINVAL, "llama_hook_point_parse: NULL argument");
    const char *rest = name;
    if (strncmp(name, "blocks.", 7) == 0) {
        char *end;
        long l = strtol(name + 7, &end, 10);
        if (end == name + 7 || *end != '.' || l < 0 || l > INT_MAX)
            return llama_fail(LLAMA_EINVAL, "'%s': expected blocks.<layer>.hook_<point>", name);
        if (layer)
            *layer = (int)l;
        rest = end + 1;
    }
    for (int p = 0; p < LLAMA_HOOK_POINTS; p++)
        if (strcmp(rest, point_names[p]) == 0) {
            *point = (llama_hook_point)p;
            return LLAMA_OK;
        }
    return llama_fail(LLAMA_EINVAL,
                      "'%s': not a hook point (hook_resid_pre, hook_attn_out, hook_resid_mid, "
                      "hook_mlp_in, hook_mlp_out, hook_resid_post)",
                      name);
}

float *llama_logits(llama_state *s) { return s ? s->logits : NULL; }

/* ---- forward pass ----------------------------------------------------------------------- */

/* o = w * x / sqrt(mean(x^2) + 1e-5) */
static void rmsnorm(float *o, const float *x, const float *w, int n)
{
    float ss = 0.0f;
    for (int i = 0; i < n; i++)
        ss += x[i] * x[i];
    ss = 1.0f / sqrtf(ss / (float)n + 1e-5f);
    for (int i = 0; i < n; i++)
        o[i] = w[i] * (ss * x[i]);
}

static void softmax(float *x, int n)
{
    float max = x[0];
    for (int i = 1; i < n; i++)
        if (x[i] > max)
            max = x[i];
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    for (int i = 0; i < n; i++)
        x[i] /= sum;
}

/* y[rows] = W[rows][cols] x[cols] */
static void matvec(float *y, const float *w, const float *x, int rows, int cols)
{
    cblas_sgemv(CblasRowMajor, CblasNoTrans, rows, cols, 1.0f, w, cols, x, 1, 0.0f, y, 1);
}

/* Rotates the pairs (2j, 2j+1) of each head of v (n_heads heads of hs floats) by position. */
static void rope(float *v, int n_heads, int hs, const float *cs, const float *sn)
{
    for (int h = 0; h < n_heads; h++) {
        float *p = v + h * hs;
        for (int j = 0; j < hs / 2; j++) {
            float a = p[2 * j], b = p[2 * j + 1];
            p[2 * j] = a * cs[j] - b * sn[j];
            p[2 * j + 1] = a * sn[j] + b * cs[j];
        }
    }
}

static int hooked(const llama_state *s, int layer)
{
    return s->hook && (s->hook_layer == LLAMA_HOOK_ALL_LAYERS || s->hook_layer == layer);
}

/* One token at one position. cap (if not NULL) receives x entering layer cap_layer. */
static void forward_one(llama_state *s, int token, int pos, int want_logits, int cap_layer,
                        float *cap)
{
    const llama_model *m = s->m;
    const llama_config *c = &m->cfg;
    const int dim = c->dim, hid = c->hidden_dim, hs = dim / c->n_heads;
    const int kv_dim = hs * c->n_kv_heads, group = c->n_heads / c->n_kv_heads;
    const size_t udim = (size_t)dim, ukv = (size_t)kv_dim, uhid = (size_t)hid;
    const float *cs = m->rope_cos + (size_t)pos * (size_t)(hs / 2);
    const float *sn = m->rope_sin + (size_t)pos * (size_t)(hs / 2);
    const float scale = 1.0f / sqrtf((float)hs);
    float *x = s->x;

    memcpy(x, m->tok_emb + (size_t)token * udim, udim * sizeof(float));

#define POINT(point, v)                                                                            \
    do {                                                                                           \
        if (s->point_hook)                                                                         \
            s->point_hook((point), l, pos, (v), dim, s->point_user);                               \
    } while (0)
    for (int l = 0; l <= c->n_layers; l++) {
        if (hooked(s, l))
            s->hook(l, pos, x, dim, s->hook_user);
        if (l < c->n_layers)
            POINT(LLAMA_HOOK_RESID_PRE, x);
        if (cap && l == cap_layer)
            memcpy(cap, x, udim * sizeof(float));
        if (l == c->n_layers)
            break;
        const size_t ul = (size_t)l;

        /* attention: q, k, v of the normed stream; k and v go straight into the cache */
        float *kc = s->kcache + (ul * (size_t)c->seq_len) * ukv;
        float *vc = s->vcache + (ul * (size_t)c->seq_len) * ukv;
        float *k = kc + (size_t)pos * ukv, *v = vc + (size_t)pos * ukv;
        rmsnorm(s->xb, x, m->rms_att + ul * udim, dim);
        matvec(s->q, m->wq + ul * udim * udim, s->xb, dim, dim);
        matvec(k, m->wk + ul * ukv * udim, s->xb, kv_dim, dim);
        matvec(v, m->wv + ul * ukv * udim, s->xb, kv_dim, dim);
        rope(s->q, c->n_heads, hs, cs, sn);
        rope(k, c->n_kv_heads, hs, cs, sn);

        for (int h = 0; h < c->n_heads; h++) {
            const float *qh = s->q + h * hs;
            const size_t kvoff = (size_t)(h / group * hs); /* query head h reads kv head h/group */
            /* att[t] = q . k_t / sqrt(hs) for t = 0..pos: the cache rows are a matrix of
             * (pos+1) x hs with leading dimension kv_dim */
            cblas_sgemv(CblasRowMajor, CblasNoTrans, pos + 1, hs, scale, kc + kvoff, kv_dim, qh,
                        1, 0.0f, s->att, 1);
            softmax(s->att, pos + 1);
            /* xb_h = sum_t att[t] v_t */
            cblas_sgemv(CblasRowMajor, CblasTrans, pos + 1, hs, 1.0f, vc + kvoff, kv_dim, s->att,
                        1, 0.0f, s->xb + h * hs, 1);
        }
        matvec(s->xb2, m->wo + ul * udim * udim, s->xb, dim, dim);
        POINT(LLAMA_HOOK_ATTN_OUT, s->xb2);
        for (int i = 0; i < dim; i++)
            x[i] += s->xb2[i];
        POINT(LLAMA_HOOK_RESID_MID, x);

        /* SwiGLU feed-forward: w2 (silu(w1 xn) * (w3 xn)) */
        rmsnorm(s->xb, x, m->rms_ffn + ul * udim, dim);
        POINT(LLAMA_HOOK_MLP_IN, s->xb);
        matvec(s->hb, m->w1 + ul * uhid * udim, s->xb, hid, dim);
        matvec(s->hb2, m->w3 + ul * uhid * udim, s->xb, hid, dim);
        for (int i = 0; i < hid; i++) {
            float a = s->hb[i];
            s->hb[i] = a / (1.0f + expf(-a)) * s->hb2[i];
        }
        matvec(s->xb, m->w2 + ul * udim * uhid, s->hb, dim, hid);
        POINT(LLAMA_HOOK_MLP_OUT, s->xb);
        for (int i = 0; i < dim; i++)
            x[i] += s->xb[i];
        POINT(LLAMA_HOOK_RESID_POST, x);
    }
#undef POINT

    if (want_logits) {
        rmsnorm(s->xb, x, m->rms_final, dim);
        matvec(s->logits, m->wcls, s->xb, c->vocab_size, dim);
    }
}

static int check_token_pos(const llama_state *s, const char *fn, int token, int pos)
{
    const llama_config *c = &s->m->cfg;
    if (token < 0 || token >= c->vocab_size)
        return llama_fail(LLAMA_EINVAL, "%s: token id %d out of range 0..%d", fn, token,
                          c->vocab_size - 1);
    if (pos < 0 || pos >= c->seq_len)
        return llama_fail(LLAMA_EINVAL, "%s: position %d out of range 0..%d (seq_len %d)", fn,
                          pos, c->seq_len - 1, c->seq_len);
    return LLAMA_OK;
}

int llama_forward(llama_state *s, int token, int pos)
{
    if (!s)
        return llama_fail(LLAMA_EINVAL, "llama_forward: state is NULL");
    int rc = check_token_pos(s, "llama_forward", token, pos);
    if (rc)
        return rc;
    forward_one(s, token, pos, 1, -1, NULL);
    return LLAMA_OK;
}

int llama_forward_tokens(llama_state *s, const int *tokens, int n, int pos0, int resid_layer,
                         float *resid_out)
{
    if (!s || (!tokens && n > 0))
        return llama_fail(LLAMA_EINVAL, "llama_forward_tokens: state or tokens is NULL");
    const llama_config *c = &s->m->cfg;
    if (n < 1 || pos0 < 0 || pos0 > c->seq_len - n)
        return llama_fail(LLAMA_EINVAL,
                          "llama_forward_tokens: %d tokens from position %d do not fit in "
                          "seq_len %d (need n >= 1)",
                          n, pos0, c->seq_len);
    if (resid_out && (resid_layer < 0 || resid_layer > c->n_layers))
        return llama_fail(LLAMA_EINVAL, "llama_forward_tokens: resid_layer %d out of range 0..%d",
                          resid_layer, c->n_layers);
    for (int i = 0; i < n; i++) {
        int rc = check_token_pos(s, "llama_forward_tokens", tokens[i], pos0 + i);
        if (rc)
            return rc;
    }
    for (int i = 0; i < n; i++)
        forward_one(s, tokens[i], pos0 + i, i == n - 1, resid_layer,
                    resid_out ? resid_out + (size_t)i * (size_t)c->dim : NULL);
    return LLAMA_OK;
}

/* ---- sampling --------------------------------------------------------------------------- */

typedef struct {
    float p;
    int id;
} prob_id;

struct llama_sampler {
    int n;
    float temperature, topp;
    uint64_t rng;
    float *probs;
    prob_id *sorted;
};

/* xorshift64*: see engine.h */
static uint32_t rng_u32(uint64_t *st)
{
    *st ^= *st >> 12;
    *st ^= *st << 25;
    *st ^= *st >> 27;
    return (uint32_t)((*st * 0x2545F4914F6CDD1Dull) >> 32);
}

static float rng_f32(uint64_t *st) { return (float)(rng_u32(st) >> 8) / 16777216.0f; }

int llama_sampler_create(int vocab_size, float temperature, float topp, uint64_t seed,
                         llama_sampler **out)
{
    if (!out)
        return llama_fail(LLAMA_EINVAL, "llama_sampler_create: out is NULL");
    *out = NULL;
    if (vocab_size < 1)
        return llama_fail(LLAMA_EINVAL, "llama_sampler_create: vocab_size %d < 1", vocab_size);
    if (!(temperature >= 0.0f) || !isfinite(temperature) || !isfinite(topp))
        return llama_fail(LLAMA_EINVAL,
                          "llama_sampler_create: temperature %g must be finite and >= 0, topp "
                          "%g finite",
                          (double)temperature, (double)topp);
    llama_sampler *smp = calloc(1, sizeof *smp);
    if (!smp)
        return llama_fail(LLAMA_ENOMEM, "llama_sampler_create: out of memory");
    smp->n = vocab_size;
    smp->temperature = temperature;
    smp->topp = topp;
    smp->rng = seed ? seed : 0x9E3779B97F4A7C15ull;
    smp->probs = malloc((size_t)vocab_size * sizeof(float));
    smp->sorted = malloc((size_t)vocab_size * sizeof(prob_id));
    if (!smp->probs || !smp->sorted) {
        llama_sampler_free(smp);
        return llama_fail(LLAMA_ENOMEM, "llama_sampler_create: out of memory");
    }
    *out = smp;
    return LLAMA_OK;
}

void llama_sampler_free(llama_sampler *smp)
{
    if (!smp)
        return;
    free(smp->probs);
    free(smp->sorted);
    free(smp);
}

static int by_prob_desc(const void *a, const void *b)
{
    float pa = ((const prob_id *)a)->p, pb = ((const prob_id *)b)->p;
    return pa > pb ? -1 : pa < pb ? 1 : 0;
}

static int sample_nucleus(llama_sampler *smp, float coin)
{
    const int n = smp->n;
    /* tokens below this cannot be in the nucleus; dropping them first keeps the sort short */
    const float cutoff = (1.0f - smp->topp) / (float)(n > 1 ? n - 1 : 1);
    int kept = 0;
    for (int i = 0; i < n; i++)
        if (smp->probs[i] >= cutoff)
            smp->sorted[kept++] = (prob_id){smp->probs[i], i};
    if (kept == 0)
        return 0;
    qsort(smp->sorted, (size_t)kept, sizeof(prob_id), by_prob_desc);
    float mass = 0.0f;
    int last = kept - 1;
    for (int i = 0; i < kept; i++) {
        mass += smp->sorted[i].p;
        if (mass > smp->topp) {
            last = i;
            break;
        }
    }
    float r = coin * mass, cdf = 0.0f;
    for (int i = 0; i <= last; i++) {
        cdf += smp->sorted[i].p;
        if (r < cdf)
            return smp->sorted[i].id;
    }
    return smp->sorted[last].id;
}

int llama_sample(llama_sampler *smp, const float *logits, int n)
{
    if (!smp || !logits)
        return llama_fail(LLAMA_EINVAL, "llama_sample: sampler or logits is NULL");
    if (n != smp->n)
        return llama_fail(LLAMA_EINVAL, "llama_sample: %d logits, sampler made for %d", n,
                          smp->n);
    if (smp->temperature == 0.0f) {
        int best = 0;
        for (int i = 1; i < n; i++)
            if (logits[i] > logits[best])
                best = i;
        return best;
    }
    for (int i = 0; i < n; i++)
        smp->probs[i] = logits[i] / smp->temperature;
    softmax(smp->probs, n);
    float coin = rng_f32(&smp->rng);
    if (smp->topp > 0.0f && smp->topp < 1.0f)
        return sample_nucleus(smp, coin);
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += smp->probs[i];
        if (coin < cdf)
            return i;
    }
    return n - 1; /* rounding left the cdf just below coin */
}

/* ---- generation ------------------------------------------------------------------------- */

int llama_generate(llama_state *s, llama_sampler *smp, const int *prompt, int n_prompt,
                   int max_new, int *out, int out_cap, int *n_out)
{
    if (!s || !smp || !prompt || !out || !n_out)
        return llama_fail(LLAMA_EINVAL, "llama_generate: a pointer argument is NULL");
    *n_out = 0;
    const llama_config *c = &s->m->cfg;
    if (n_prompt < 1 || n_prompt > c->seq_len)
        return llama_fail(LLAMA_EINVAL, "llama_generate: prompt of %d tokens, need 1..%d",
                          n_prompt, c->seq_len);
    if (max_new < 0)
        return llama_fail(LLAMA_EINVAL, "llama_generate: max_new %d < 0", max_new);
    int limit = max_new > c->seq_len - n_prompt ? c->seq_len : n_prompt + max_new;
    if (out_cap < limit)
        return llama_fail(LLAMA_ERANGE,
                          "llama_generate: out holds %d tokens, need %d (prompt %d + max_new %d, "
                          "at most seq_len %d)",
                          out_cap, limit, n_prompt, max_new, c->seq_len);
    int rc = llama_forward_tokens(s, prompt, n_prompt, 0, 0, NULL);
    if (rc)
        return rc;
    memcpy(out, prompt, (size_t)n_prompt * sizeof(int));
    int n = n_prompt;
    while (n < limit) {
        int next = llama_sample(smp, s->logits, c->vocab_size);
        if (next < 0)
            return next;
        if (next == LLAMA_TOKEN_BOS)
            break;
        out[n++] = next;
        if (n < limit)
            forward_one(s, next, n - 1, 1, -1, NULL);
    }
    *n_out = n;
    return LLAMA_OK;
}
