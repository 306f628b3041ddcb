/*
 * test_engine.c - the llama engine (examples/llama) against real models and their references.
 *
 * For stories260K (llama2.c's TinyStories model) and aidreams260K, reference.json holds, per
 * prompt: the prompt's token ids, the greedy continuation, the logits of the first 8
 * positions and (stories260K) the residual stream entering layer 2 at the first 4. The
 * resid_*.npy files hold that residual stream for every token of many sampled texts.
 * runc_samples.txt holds stories printed by llama2.c's run.c, which our sampler reproduces.
 *
 * LLAMA_DATA_DIR (compile definition, or argv[1]) is the shared data folder.
 */
#define _POSIX_C_SOURCE 200809L

#include "engine.h"

#include <check.h>
#include <cJSON.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef LLAMA_DATA_DIR
#define LLAMA_DATA_DIR "../shared/data"
#endif

static const char *data_dir = LLAMA_DATA_DIR;

static const char *const models[] = {"stories260K", "aidreams260K"};
static const char *const resid_files[] = {"resid_mid.npy", "resid_layer2.npy"};
#define N_MODELS 2

/* ---- helpers ------------------------------------------------------------------------------ */

static char *path_of(const char *model, const char *file)
{
    static char buf[4][1024];
    static int next;
    char *p = buf[next++ % 4];
    snprintf(p, sizeof buf[0], "%s/%s/%s", data_dir, model, file);
    return p;
}

static char *slurp(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    ck_assert(n >= 0);
    char *buf = malloc((size_t)n + 1);
    ck_assert(buf != NULL);
    ck_assert_uint_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
    buf[n] = '\0';
    fclose(f);
    if (size)
        *size = (size_t)n;
    return buf;
}

static cJSON *load_reference(const char *model)
{
    char *text = slurp(path_of(model, "reference.json"), NULL);
    cJSON *ref = cJSON_Parse(text);
    free(text);
    ck_assert_msg(ref != NULL, "reference.json of %s does not parse", model);
    return ref;
}

/* A cJSON array of numbers into a malloc'd int array. */
static int *json_ints(const cJSON *arr, int *n)
{
    ck_assert(cJSON_IsArray(arr));
    *n = cJSON_GetArraySize(arr);
    int *v = malloc((size_t)(*n > 0 ? *n : 1) * sizeof(int));
    ck_assert(v != NULL);
    int i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, arr) v[i++] = (int)e->valuedouble;
    return v;
}

typedef struct {
    llama_model *m;
    llama_tokenizer *t;
    llama_state *s;
    cJSON *ref;
} fixture;

static void open_model(int which, fixture *fx)
{
    memset(fx, 0, sizeof *fx);
    const char *name = models[which];
    ck_assert_msg(llama_model_load(path_of(name, "model.bin"), &fx->m) == LLAMA_OK, "%s",
                  llama_last_error());
    ck_assert_msg(llama_tokenizer_load(path_of(name, "tok512.bin"),
                                       llama_model_config(fx->m)->vocab_size,
                                       &fx->t) == LLAMA_OK,
                  "%s", llama_last_error());
    ck_assert_int_eq(llama_state_create(fx->m, &fx->s), LLAMA_OK);
    fx->ref = load_reference(name);
}

static void close_model(fixture *fx)
{
    cJSON_Delete(fx->ref);
    llama_state_free(fx->s);
    llama_tokenizer_free(fx->t);
    llama_model_free(fx->m);
}

static const cJSON *cases(const fixture *fx)
{
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(fx->ref, "cases");
    ck_assert(cJSON_IsArray(c) && cJSON_GetArraySize(c) > 0);
    return c;
}

/* Minimal .npy (version 1/2, little-endian, C order) reader for <f4 and <i4. */
static void *load_npy(const char *path, const char *descr, size_t *rows, size_t *cols)
{
    size_t size;
    char *buf = slurp(path, &size);
    ck_assert_msg(size > 10 && memcmp(buf, "\x93NUMPY", 6) == 0, "%s: not .npy", path);
    size_t hlen, off;
    if (buf[6] == 1) {
        hlen = (unsigned char)buf[8] | (size_t)(unsigned char)buf[9] << 8;
        off = 10;
    } else {
        hlen = (unsigned char)buf[8] | (size_t)(unsigned char)buf[9] << 8 |
               (size_t)(unsigned char)buf[10] << 16 | (size_t)(unsigned char)buf[11] << 24;
        off = 12;
    }
    ck_assert(off + hlen <= size);
    char *header = strndup(buf + off, hlen);
    ck_assert_msg(strstr(header, descr) != NULL, "%s: want %s in %s", path, descr, header);
    ck_assert(strstr(header, "'fortran_order': False") != NULL);
    const char *sh = strstr(header, "'shape': (");
    ck_assert(sh != NULL);
    sh += strlen("'shape': (");
    *rows = strtoul(sh, (char **)&sh, 10);
    *cols = 1;
    if (*sh == ',' && sh[1] == ' ' && sh[2] >= '0' && sh[2] <= '9')
        *cols = strtoul(sh + 2, NULL, 10);
    free(header);
    size_t nbytes = *rows * *cols * 4;
    ck_assert_uint_eq(size - off - hlen, nbytes);
    void *data = malloc(nbytes);
    ck_assert(data != NULL);
    memcpy(data, buf + off + hlen, nbytes);
    free(buf);
    return data;
}

/* ---- tokenizer ---------------------------------------------------------------------------- */

START_TEST(tokenizer_matches_reference_prompts)
{
    fixture fx;
    open_model(_i, &fx);
    const cJSON *c;
    cJSON_ArrayForEach(c, cases(&fx))
    {
        const char *prompt = cJSON_GetObjectItemCaseSensitive(c, "prompt")->valuestring;
        int n_want, n;
        int *want = json_ints(cJSON_GetObjectItemCaseSensitive(c, "prompt_tokens"), &n_want);
        int got[512];
        ck_assert_int_eq(llama_tokenize(fx.t, prompt, 1, 0, got, 512, &n), LLAMA_OK);
        ck_assert_msg(n == n_want, "%s \"%s\": %d tokens, want %d", models[_i], prompt, n,
                      n_want);
        for (int i = 0; i < n; i++)
            ck_assert_msg(got[i] == want[i], "\"%s\" token %d: %d, want %d", prompt, i, got[i],
                          want[i]);
        free(want);
    }
    close_model(&fx);
}
END_TEST

START_TEST(tokenizer_round_trips_with_byte_fallback)
{
    fixture fx;
    open_model(0, &fx);
    /* accents, CJK and an emoji: mostly byte-fallback tokens */
    const char *text = "Caf\xc3\xa9 \xe7\x8c\xab and a \xf0\x9f\x90\xb1 named Tom.";
    int toks[256], n;
    ck_assert_int_eq(llama_tokenize(fx.t, text, 1, 1, toks, 256, &n), LLAMA_OK);
    ck_assert_int_eq(toks[0], LLAMA_TOKEN_BOS);
    ck_assert_int_eq(toks[n - 1], LLAMA_TOKEN_EOS);
    int bytes = 0;
    for (int i = 0; i < n; i++)
        bytes += toks[i] >= 3 && toks[i] <= 258;
    ck_assert_int_ge(bytes, 7); /* the CJK character and the emoji at least */
    char out[256];
    size_t len;
    ck_assert_int_eq(llama_detokenize(fx.t, toks, n, out, sizeof out, &len), LLAMA_OK);
    ck_assert_str_eq(out, text);
    ck_assert_uint_eq(len, strlen(text));
    /* empty text: BOS only, no dummy prefix */
    ck_assert_int_eq(llama_tokenize(fx.t, "", 1, 0, toks, 256, &n), LLAMA_OK);
    ck_assert_int_eq(n, 1);
    /* too small a buffer says how much is needed */
    ck_assert_int_eq(llama_tokenize(fx.t, text, 1, 1, toks, 2, &n), LLAMA_ERANGE);
    ck_assert_int_gt(n, 2);
    ck_assert_int_eq(llama_detokenize(fx.t, toks, 0, out, 1, &len), LLAMA_OK);
    ck_assert_str_eq(out, "");
    close_model(&fx);
}
END_TEST

/* ---- forward pass ------------------------------------------------------------------------- */

START_TEST(greedy_continuations_match_reference)
{
    fixture fx;
    open_model(_i, &fx);
    llama_sampler *greedy;
    ck_assert_int_eq(llama_sampler_create(llama_model_config(fx.m)->vocab_size, 0.0f, 0.0f, 1,
                                          &greedy),
                     LLAMA_OK);
    const cJSON *c;
    cJSON_ArrayForEach(c, cases(&fx))
    {
        int n_prompt, n_want, n_out, out[1024];
        int *prompt = json_ints(cJSON_GetObjectItemCaseSensitive(c, "prompt_tokens"), &n_prompt);
        int *want = json_ints(cJSON_GetObjectItemCaseSensitive(c, "greedy_tokens"), &n_want);
        ck_assert_int_eq(llama_generate(fx.s, greedy, prompt, n_prompt, n_want - n_prompt, out,
                                        1024, &n_out),
                         LLAMA_OK);
        ck_assert_int_eq(n_out, n_want);
        for (int i = 0; i < n_out; i++)
            ck_assert_msg(out[i] == want[i], "%s case \"%s\": token %d is %d, want %d",
                          models[_i], cJSON_GetObjectItemCaseSensitive(c, "prompt")->valuestring,
                          i, out[i], want[i]);
        char text[4096];
        ck_assert_int_eq(llama_detokenize(fx.t, out, n_out, text, sizeof text, NULL), LLAMA_OK);
        ck_assert_str_eq(text, cJSON_GetObjectItemCaseSensitive(c, "greedy_text")->valuestring);
        free(prompt);
        free(want);
    }
    llama_sampler_free(greedy);
    close_model(&fx);
}
END_TEST

START_TEST(logits_match_reference)
{
    fixture fx;
    open_model(_i, &fx);
    const int vocab = llama_model_config(fx.m)->vocab_size;
    double worst = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, cases(&fx))
    {
        int n_tok;
        int *toks = json_ints(cJSON_GetObjectItemCaseSensitive(c, "greedy_tokens"), &n_tok);
        const cJSON *rows = cJSON_GetObjectItemCaseSensitive(c, "logits_first8");
        ck_assert_int_eq(cJSON_GetArraySize(rows), 8);
        for (int pos = 0; pos < 8; pos++) {
            ck_assert_int_eq(llama_forward(fx.s, toks[pos], pos), LLAMA_OK);
            const float *lg = llama_logits(fx.s);
            const cJSON *row = cJSON_GetArrayItem(rows, pos);
            ck_assert_int_eq(cJSON_GetArraySize(row), vocab);
            int v = 0;
            const cJSON *e;
            cJSON_ArrayForEach(e, row)
            {
                double d = fabs((double)lg[v] - e->valuedouble);
                if (d > worst)
                    worst = d;
                ck_assert_msg(d <= 1e-4, "%s pos %d logit %d: %.6f, want %.6f", models[_i], pos,
                              v, (double)lg[v], e->valuedouble);
                v++;
            }
        }
        free(toks);
    }
    fprintf(stderr, "%s: largest logit error %.2e\n", models[_i], worst);
    close_model(&fx);
}
END_TEST

typedef struct {
    float rows[8][64];
    int calls, bad;
} capture;

static void capture_hook(int layer, int pos, float *x, int dim, void *user)
{
    capture *cap = user;
    cap->calls++;
    if (layer != 2 || dim != 64 || pos < 0 || pos >= 8) {
        cap->bad++;
        return;
    }
    memcpy(cap->rows[pos], x, sizeof cap->rows[0]);
}

START_TEST(resid_entering_layer2_matches_reference)
{
    fixture fx;
    open_model(0, &fx);
    capture cap = {0};
    ck_assert_int_eq(llama_state_set_hook(fx.s, 2, capture_hook, &cap), LLAMA_OK);
    const cJSON *c;
    cJSON_ArrayForEach(c, cases(&fx))
    {
        int n_tok;
        int *toks = json_ints(cJSON_GetObjectItemCaseSensitive(c, "greedy_tokens"), &n_tok);
        float via_out[4][64];
        cap.calls = 0;
        ck_assert_int_eq(llama_forward_tokens(fx.s, toks, 4, 0, 2, &via_out[0][0]), LLAMA_OK);
        ck_assert_int_eq(cap.calls, 4); /* once per token at the one hooked layer */
        ck_assert_int_eq(cap.bad, 0);
        const cJSON *rows = cJSON_GetObjectItemCaseSensitive(c, "resid_layer2_first4");
        for (int pos = 0; pos < 4; pos++) {
            const cJSON *row = cJSON_GetArrayItem(rows, pos);
            ck_assert_int_eq(cJSON_GetArraySize(row), 64);
            int i = 0;
            const cJSON *e;
            cJSON_ArrayForEach(e, row)
            {
                ck_assert_msg(fabs((double)cap.rows[pos][i] - e->valuedouble) <= 1e-4,
                              "pos %d dim %d: %.6f, want %.6f", pos, i,
                              (double)cap.rows[pos][i], e->valuedouble);
                ck_assert(via_out[pos][i] == cap.rows[pos][i]);
                i++;
            }
        }
        free(toks);
    }
    close_model(&fx);
}
END_TEST

/* The rows of the data set's activation file for its first text, rebuilt by running that
 * text's tokens through the engine. */
START_TEST(resid_matches_dataset_rows)
{
    fixture fx;
    open_model(_i, &fx);
    size_t n, one, rows, dim, n2, n3;
    int32_t *tokens = load_npy(path_of(models[_i], "tokens.npy"), "'<i4'", &n, &one);
    int32_t *docs = load_npy(path_of(models[_i], "doc_ids.npy"), "'<i4'", &n2, &one);
    int32_t *positions = load_npy(path_of(models[_i], "positions.npy"), "'<i4'", &n3, &one);
    float *resid = load_npy(path_of(models[_i], resid_files[_i]), "'<f4'", &rows, &dim);
    ck_assert_uint_eq(n, rows);
    ck_assert_uint_eq(n2, rows);
    ck_assert_uint_eq(n3, rows);
    ck_assert_uint_eq(dim, (size_t)llama_model_config(fx.m)->dim);

    /* the first text: rows with the first row's doc id, in position order from 0 */
    int toks[64];
    size_t row_of[64];
    int len = 0;
    for (size_t r = 0; r < rows && len < 64; r++) {
        if (docs[r] != docs[0])
            continue;
        ck_assert_int_eq(positions[r], len);
        toks[len] = tokens[r];
        row_of[len] = r;
        len++;
    }
    ck_assert_int_ge(len, 32);
    ck_assert_int_eq(toks[0], LLAMA_TOKEN_BOS);
    float *got = malloc((size_t)len * dim * sizeof(float));
    ck_assert_int_eq(llama_forward_tokens(fx.s, toks, len, 0, 2, got), LLAMA_OK);
    double worst = 0;
    for (int p = 0; p < len; p++)
        for (size_t i = 0; i < dim; i++) {
            double d = fabs((double)got[(size_t)p * dim + i] - (double)resid[row_of[p] * dim + i]);
            if (d > worst)
                worst = d;
        }
    fprintf(stderr, "%s: %d rows of %s, largest error %.2e\n", models[_i], len, resid_files[_i],
            worst);
    ck_assert_msg(worst <= 1e-4, "largest error %.3e", worst);
    free(got);
    free(tokens);
    free(docs);
    free(positions);
    free(resid);
    close_model(&fx);
}
END_TEST

/* ---- the hook ----------------------------------------------------------------------------- */

typedef struct {
    int layers[16];
    int calls;
    float add;
} steer;

static void record_and_add(int layer, int pos, float *x, int dim, void *user)
{
    (void)pos;
    steer *st = user;
    if (st->calls < 16)
        st->layers[st->calls] = layer;
    st->calls++;
    x[0] += st->add;
    (void)dim;
}

START_TEST(hook_sees_every_layer_and_can_steer)
{
    fixture fx;
    open_model(0, &fx);
    const int L = llama_model_config(fx.m)->n_layers, vocab = 512;
    float plain[512], steered[512], noop[512];
    ck_assert_int_eq(llama_forward(fx.s, LLAMA_TOKEN_BOS, 0), LLAMA_OK);
    memcpy(plain, llama_logits(fx.s), sizeof plain);

    steer st = {.add = 0.0f};
    ck_assert_int_eq(llama_state_set_hook(fx.s, LLAMA_HOOK_ALL_LAYERS, record_and_add, &st),
                     LLAMA_OK);
    ck_assert_int_eq(llama_forward(fx.s, LLAMA_TOKEN_BOS, 0), LLAMA_OK);
    memcpy(noop, llama_logits(fx.s), sizeof noop);
    ck_assert_int_eq(st.calls, L + 1); /* entering layers 0..L-1, then before the final norm */
    for (int l = 0; l <= L; l++)
        ck_assert_int_eq(st.layers[l], l);
    ck_assert(memcmp(plain, noop, sizeof plain) == 0);

    steer st2 = {.add = 5.0f};
    ck_assert_int_eq(llama_state_set_hook(fx.s, 2, record_and_add, &st2), LLAMA_OK);
    ck_assert_int_eq(llama_forward(fx.s, LLAMA_TOKEN_BOS, 0), LLAMA_OK);
    memcpy(steered, llama_logits(fx.s), sizeof steered);
    ck_assert_int_eq(st2.calls, 1);
    double diff = 0;
    for (int v = 0; v < vocab; v++)
        diff += fabs((double)steered[v] - (double)plain[v]);
    ck_assert_msg(diff > 1e-2, "steering at layer 2 changed nothing");

    ck_assert_int_eq(llama_state_set_hook(fx.s, L + 1, record_and_add, &st), LLAMA_EINVAL);
    ck_assert_int_eq(llama_state_set_hook(fx.s, -2, record_and_add, &st), LLAMA_EINVAL);
    ck_assert_int_eq(llama_state_set_hook(fx.s, 0, NULL, NULL), LLAMA_OK);
    ck_assert_int_eq(llama_forward(fx.s, LLAMA_TOKEN_BOS, 0), LLAMA_OK);
    ck_assert(memcmp(plain, llama_logits(fx.s), sizeof plain) == 0);
    close_model(&fx);
}
END_TEST

/* Every hook point of every layer, recorded for one token at a time. */
enum { MAX_DIM = 64, MAX_LAYERS = 8 };
typedef struct {
    float v[MAX_LAYERS][LLAMA_HOOK_POINTS][MAX_DIM];
    int calls;
    int zero_mlp_out_at; /* a layer whose MLP output the hook replaces with zeros; -1: none */
} points;

static void record_points(llama_hook_point point, int layer, int pos, float *v, int dim, void *user)
{
    (void)pos;
    points *p = user;
    ck_assert(layer >= 0 && layer < MAX_LAYERS && dim <= MAX_DIM);
    memcpy(p->v[layer][point], v, (size_t)dim * sizeof *v);
    if (point == LLAMA_HOOK_MLP_OUT && layer == p->zero_mlp_out_at)
        memset(v, 0, (size_t)dim * sizeof *v);
    p->calls++;
}

static void record_resid(int layer, int pos, float *x, int dim, void *user)
{
    (void)pos;
    float(*pre)[MAX_DIM] = user;
    memcpy(pre[layer], x, (size_t)dim * sizeof *x);
}

START_TEST(hook_points_compose_as_the_block_does)
{
    fixture fx;
    open_model(_i, &fx);
    const llama_config *c = llama_model_config(fx.m);
    const int L = c->n_layers, dim = c->dim;
    ck_assert(L <= MAX_LAYERS && dim <= MAX_DIM);
    static points p;
    memset(&p, 0, sizeof p);
    p.zero_mlp_out_at = -1;
    float pre[MAX_LAYERS + 1][MAX_DIM];
    ck_assert_int_eq(llama_state_set_point_hook(fx.s, record_points, &p), LLAMA_OK);
    ck_assert_int_eq(llama_state_set_hook(fx.s, LLAMA_HOOK_ALL_LAYERS, record_resid, pre),
                     LLAMA_OK);
    int toks[3] = {LLAMA_TOKEN_BOS, 300, 301};
    for (int pos = 0; pos < 3; pos++)
        ck_assert_int_eq(llama_forward(fx.s, toks[pos], pos), LLAMA_OK);
    ck_assert_int_eq(p.calls, 3 * L * LLAMA_HOOK_POINTS);
    /* After the last token: pre = resid_pre, mid = pre + attn_out, post = mid + mlp_out = the
     * next layer's pre; mlp_in = rmsnorm(mid) * rms_ffn, up to that weight: the direction of mid. */
    for (int l = 0; l < L; l++) {
        const float *P = p.v[l][LLAMA_HOOK_RESID_PRE], *A = p.v[l][LLAMA_HOOK_ATTN_OUT];
        const float *M = p.v[l][LLAMA_HOOK_RESID_MID], *O = p.v[l][LLAMA_HOOK_MLP_OUT];
        const float *Q = p.v[l][LLAMA_HOOK_RESID_POST];
        for (int j = 0; j < dim; j++) {
            ck_assert_float_eq(P[j], pre[l][j]);
            ck_assert_float_eq_tol(M[j], P[j] + A[j], 1e-6f);
            ck_assert_float_eq_tol(Q[j], M[j] + O[j], 1e-6f);
            ck_assert_float_eq(Q[j], pre[l + 1][j]);
        }
        double ms = 0;
        for (int j = 0; j < dim; j++)
            ms += (double)M[j] * M[j];
        ms = sqrt(ms / dim + 1e-5);
        int differs = 0;
        for (int j = 0; j < dim; j++)
            differs |= fabs(p.v[l][LLAMA_HOOK_MLP_IN][j] - M[j] / ms) > 1e-3 * fabs(M[j] / ms);
        ck_assert_msg(differs, "mlp_in should carry the rms_ffn weight");
    }
    /* A hook that replaces layer 1's MLP output with zeros: the stream after it is resid_mid. */
    p.zero_mlp_out_at = 1;
    ck_assert_int_eq(llama_forward(fx.s, LLAMA_TOKEN_BOS, 0), LLAMA_OK);
    for (int j = 0; j < dim; j++)
        ck_assert_float_eq(p.v[1][LLAMA_HOOK_RESID_POST][j], p.v[1][LLAMA_HOOK_RESID_MID][j]);
    ck_assert_int_eq(llama_state_set_point_hook(fx.s, NULL, NULL), LLAMA_OK);
    ck_assert_int_eq(llama_state_set_hook(fx.s, 0, NULL, NULL), LLAMA_OK);
    close_model(&fx);
}
END_TEST

START_TEST(hook_point_names_parse)
{
    llama_hook_point pt;
    int layer = -1;
    ck_assert_int_eq(llama_hook_point_parse("blocks.3.hook_mlp_out", &pt, &layer), LLAMA_OK);
    ck_assert_int_eq(pt, LLAMA_HOOK_MLP_OUT);
    ck_assert_int_eq(layer, 3);
    ck_assert_int_eq(llama_hook_point_parse("hook_resid_mid", &pt, &layer), LLAMA_OK);
    ck_assert_int_eq(pt, LLAMA_HOOK_RESID_MID);
    ck_assert_int_eq(layer, 3);
    for (int q = 0; q < LLAMA_HOOK_POINTS; q++) {
        ck_assert_int_eq(llama_hook_point_parse(llama_hook_point_name((llama_hook_point)q), &pt,
                                                NULL),
                         LLAMA_OK);
        ck_assert_int_eq(pt, q);
    }
    ck_assert_ptr_null(llama_hook_point_name(LLAMA_HOOK_POINTS));
    ck_assert_int_eq(llama_hook_point_parse("blocks.x.hook_mlp_out", &pt, &layer), LLAMA_EINVAL);
    ck_assert_int_eq(llama_hook_point_parse("blocks.2hook_mlp_out", &pt, &layer), LLAMA_EINVAL);
    ck_assert_int_eq(llama_hook_point_parse("hook_mlp", &pt, &layer), LLAMA_EINVAL);
    ck_assert_int_eq(llama_hook_point_parse(NULL, &pt, &layer), LLAMA_EINVAL);
    ck_assert_int_eq(llama_state_set_point_hook(NULL, record_points, NULL), LLAMA_EINVAL);
}
END_TEST

/* ---- sampling ----------------------------------------------------------------------------- */

/* The story llama2.c's run.c prints for `-t 1.0 -p 0.9 -s 133742 -n 256`. */
START_TEST(sampling_reproduces_runc)
{
    fixture fx;
    open_model(0, &fx);
    char *all = slurp(path_of("stories260K", "runc_samples.txt"), NULL);
    char *start = strstr(all, "-s 133742");
    ck_assert(start != NULL);
    start = strchr(start, '\n') + 1;
    char *end = strstr(start, "\n===");
    if (end)
        *end = '\0';
    size_t want_len = strlen(start);
    while (want_len > 0 && start[want_len - 1] == '\n')
        start[--want_len] = '\0';

    llama_sampler *smp;
    ck_assert_int_eq(llama_sampler_create(512, 1.0f, 0.9f, 133742, &smp), LLAMA_OK);
    int bos = LLAMA_TOKEN_BOS, out[512], n_out;
    ck_assert_int_eq(llama_generate(fx.s, smp, &bos, 1, 256, out, 512, &n_out), LLAMA_OK);
    char text[4096];
    ck_assert_int_eq(llama_detokenize(fx.t, out, n_out, text, sizeof text, NULL), LLAMA_OK);
    ck_assert_str_eq(text, start);

    /* the same seed gives the same story; plain temperature sampling works too */
    llama_sampler *a, *b;
    int out2[512], n2;
    ck_assert_int_eq(llama_sampler_create(512, 0.8f, 0.0f, 7, &a), LLAMA_OK);
    ck_assert_int_eq(llama_sampler_create(512, 0.8f, 0.0f, 7, &b), LLAMA_OK);
    ck_assert_int_eq(llama_generate(fx.s, a, &bos, 1, 80, out, 512, &n_out), LLAMA_OK);
    ck_assert_int_eq(llama_generate(fx.s, b, &bos, 1, 80, out2, 512, &n2), LLAMA_OK);
    ck_assert_int_eq(n_out, n2);
    ck_assert(memcmp(out, out2, (size_t)n_out * sizeof(int)) == 0);
    llama_sampler_free(a);
    llama_sampler_free(b);
    llama_sampler_free(smp);
    free(all);
    close_model(&fx);
}
END_TEST

/* ---- errors ------------------------------------------------------------------------------- */

static char tmpdir[256];

static void make_tmpdir(void)
{
    const char *base = getenv("SAE_TEST_TMPDIR"); /* set by ctest in libsae's build */
    snprintf(tmpdir, sizeof tmpdir, "%s/test_engine_XXXXXX", base && *base ? base : "/tmp");
    ck_assert(mkdtemp(tmpdir) != NULL);
}

static const char *write_tmp(const char *name, const void *data, size_t n)
{
    static char p[512];
    snprintf(p, sizeof p, "%s/%s", tmpdir, name);
    FILE *f = fopen(p, "wb");
    ck_assert(f != NULL);
    ck_assert_uint_eq(fwrite(data, 1, n, f), n);
    fclose(f);
    return p;
}

static void rm_tmp(const char *name)
{
    char p[512];
    snprintf(p, sizeof p, "%s/%s", tmpdir, name);
    remove(p);
}

/* Loading `bytes` as a model fails with `code` and a message containing `needle`. */
static void expect_model_error(const char *what, const void *bytes, size_t n, int code,
                               const char *needle)
{
    const char *p = write_tmp("bad.bin", bytes, n);
    llama_model *m = (llama_model *)(uintptr_t)1;
    int rc = llama_model_load(p, &m);
    ck_assert_msg(rc == code, "%s: rc %d, want %d (%s)", what, rc, code, llama_last_error());
    ck_assert_msg(m == NULL, "%s: *out not cleared", what);
    ck_assert_msg(strstr(llama_last_error(), needle) != NULL, "%s: message \"%s\" lacks \"%s\"",
                  what, llama_last_error(), needle);
    rm_tmp("bad.bin");
}

START_TEST(bad_model_files_fail_cleanly)
{
    make_tmpdir();
    size_t size;
    char *good = slurp(path_of("stories260K", "model.bin"), &size);
    char *copy = malloc(size + 8);
    ck_assert(copy != NULL);

    expect_model_error("empty", good, 0, LLAMA_EFORMAT, "too short");
    expect_model_error("half header", good, 12, LLAMA_EFORMAT, "too short");
    expect_model_error("header only", good, 28, LLAMA_EFORMAT, "truncated");
    expect_model_error("truncated", good, size - 4, LLAMA_EFORMAT, "truncated");
    expect_model_error("truncated half", good, size / 2, LLAMA_EFORMAT, "1056540 bytes");

    memcpy(copy, good, size);
    memset(copy + size, 0, 8);
    expect_model_error("trailing", copy, size + 8, LLAMA_EFORMAT, "trailing");

    /* header fields: dim 64, hidden 172, layers 5, heads 8, kv 4, vocab 512, seq 512 */
    struct {
        int field;
        int32_t value;
        const char *needle;
    } bad[] = {
        {0, 0, "dim"},          {0, -64, "dim"},           {1, 0, "hidden_dim"},
        {2, -1, "n_layers"},    {3, 0, "n_heads"},         {3, 7, "multiple of n_heads"},
        {3, 64, "odd"},         {4, 3, "n_kv_heads"},      {4, 16, "n_kv_heads"},
        {5, 0, "vocab_size"},   {5, INT32_MIN, "vocab"},   {6, 0, "seq_len"},
        {6, 0x7fffffff, "seq_len"}, {2, 6, "implies"},     {5, -512, "unshared"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        memcpy(copy, good, size);
        memcpy(copy + 4 * bad[i].field, &bad[i].value, 4);
        char what[64];
        snprintf(what, sizeof what, "header field %d = %d", bad[i].field, (int)bad[i].value);
        expect_model_error(what, copy, size, LLAMA_EFORMAT, bad[i].needle);
    }

    memcpy(copy, good, size);
    memcpy(copy, "24ka", 4); /* uint32 0x616b3432 little-endian */
    expect_model_error("versioned export", copy, size, LLAMA_EFORMAT, "ak42");

    memcpy(copy, good, size);
    float nan = NAN;
    memcpy(copy + 28 + 4 * 40000, &nan, 4); /* inside wq */
    expect_model_error("NaN weight", copy, size, LLAMA_EFORMAT, "wq");

    llama_model *m = NULL;
    ck_assert_int_eq(llama_model_load("/nonexistent/model.bin", &m), LLAMA_EIO);
    ck_assert_ptr_null(m);
    ck_assert_ptr_nonnull(strstr(llama_last_error(), "/nonexistent/model.bin"));
    ck_assert_int_eq(llama_model_load(NULL, &m), LLAMA_EINVAL);
    ck_assert_int_eq(llama_model_load(path_of("stories260K", "model.bin"), NULL), LLAMA_EINVAL);

    free(copy);
    free(good);
    rmdir(tmpdir);
}
END_TEST

static void expect_tok_error(const char *what, const void *bytes, size_t n, int vocab, int code,
                             const char *needle)
{
    const char *p = write_tmp("tok.bin", bytes, n);
    llama_tokenizer *t = (llama_tokenizer *)(uintptr_t)1;
    int rc = llama_tokenizer_load(p, vocab, &t);
    ck_assert_msg(rc == code, "%s: rc %d, want %d (%s)", what, rc, code, llama_last_error());
    ck_assert_ptr_null(t);
    ck_assert_msg(strstr(llama_last_error(), needle) != NULL, "%s: message \"%s\" lacks \"%s\"",
                  what, llama_last_error(), needle);
    rm_tmp("tok.bin");
}

START_TEST(bad_tokenizer_files_fail_cleanly)
{
    make_tmpdir();
    size_t size;
    char *good = slurp(path_of("stories260K", "tok512.bin"), &size);
    char *copy = malloc(size + 4);
    ck_assert(copy != NULL);
    expect_tok_error("empty", good, 0, 512, LLAMA_EFORMAT, "too short");
    expect_tok_error("truncated", good, size - 1, 512, LLAMA_EFORMAT, "token 511");
    expect_tok_error("cut in a record", good, 100, 512, LLAMA_EFORMAT, "token");
    expect_tok_error("vocab too big", good, size, 513, LLAMA_EFORMAT, "truncated at token 512");
    expect_tok_error("vocab too small", good, size, 400, LLAMA_EFORMAT, "bytes left");
    expect_tok_error("no byte tokens", good, size, 100, LLAMA_EINVAL, "259");
    memcpy(copy, good, size);
    int32_t neg = -5;
    memcpy(copy + 8, &neg, 4); /* token 0's length */
    expect_tok_error("negative length", copy, size, 512, LLAMA_EFORMAT, "length -5");
    memcpy(copy, good, size);
    int32_t zero = 0;
    memcpy(copy, &zero, 4);
    expect_tok_error("max_token_length 0", copy, size, 512, LLAMA_EFORMAT, "max_token_length");
    llama_tokenizer *t;
    ck_assert_int_eq(llama_tokenizer_load("/nonexistent/tok.bin", 512, &t), LLAMA_EIO);
    free(copy);
    free(good);
    rmdir(tmpdir);
}
END_TEST

START_TEST(bad_arguments_are_rejected)
{
    fixture fx;
    open_model(0, &fx);
    ck_assert_int_eq(llama_forward(fx.s, -1, 0), LLAMA_EINVAL);
    ck_assert_int_eq(llama_forward(fx.s, 512, 0), LLAMA_EINVAL);
    ck_assert_int_eq(llama_forward(fx.s, 1, 512), LLAMA_EINVAL);
    ck_assert_int_eq(llama_forward(fx.s, 1, -1), LLAMA_EINVAL);
    ck_assert_int_eq(llama_forward(NULL, 1, 0), LLAMA_EINVAL);
    int toks[2] = {1, 600};
    ck_assert_int_eq(llama_forward_tokens(fx.s, toks, 2, 0, 0, NULL), LLAMA_EINVAL);
    ck_assert_int_eq(llama_forward_tokens(fx.s, toks, 1, 512, 0, NULL), LLAMA_EINVAL);
    ck_assert_int_eq(llama_forward_tokens(fx.s, toks, 0, 0, 0, NULL), LLAMA_EINVAL);
    float buf[64];
    ck_assert_int_eq(llama_forward_tokens(fx.s, toks, 1, 0, 6, buf), LLAMA_EINVAL);
    ck_assert_int_eq(llama_forward_tokens(fx.s, toks, 1, 0, 5, buf), LLAMA_OK); /* final */

    llama_sampler *smp = NULL;
    ck_assert_int_eq(llama_sampler_create(512, -1.0f, 0.0f, 1, &smp), LLAMA_EINVAL);
    ck_assert_int_eq(llama_sampler_create(0, 1.0f, 0.0f, 1, &smp), LLAMA_EINVAL);
    ck_assert_int_eq(llama_sampler_create(512, 0.0f, 0.0f, 1, &smp), LLAMA_OK);
    ck_assert_int_eq(llama_sample(smp, llama_logits(fx.s), 100), LLAMA_EINVAL);
    int out[4], n;
    ck_assert_int_eq(llama_generate(fx.s, smp, toks, 1, 10, out, 4, &n), LLAMA_ERANGE);
    ck_assert_int_eq(llama_generate(fx.s, smp, toks, 0, 10, out, 4, &n), LLAMA_EINVAL);
    ck_assert_int_eq(llama_generate(fx.s, smp, toks, 1, 3, out, 4, &n), LLAMA_OK);
    ck_assert_int_eq(n, 4);
    size_t len;
    ck_assert_ptr_null(llama_token_piece(fx.t, 0, 512, &len));
    ck_assert_int_eq(llama_detokenize(fx.t, toks, 2, NULL, 0, &len), LLAMA_EINVAL);

    llama_sampler_free(smp);
    llama_sampler_free(NULL);
    llama_state_free(NULL);
    llama_tokenizer_free(NULL);
    llama_model_free(NULL);
    close_model(&fx);
}
END_TEST

/* ---- suite -------------------------------------------------------------------------------- */

static Suite *engine_suite(void)
{
    Suite *s = suite_create("engine");
    TCase *tc = tcase_create("reference");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, tokenizer_matches_reference_prompts, 0, N_MODELS);
    tcase_add_test(tc, tokenizer_round_trips_with_byte_fallback);
    tcase_add_loop_test(tc, greedy_continuations_match_reference, 0, N_MODELS);
    tcase_add_loop_test(tc, logits_match_reference, 0, N_MODELS);
    tcase_add_test(tc, resid_entering_layer2_matches_reference);
    tcase_add_loop_test(tc, resid_matches_dataset_rows, 0, N_MODELS);
    tcase_add_test(tc, hook_sees_every_layer_and_can_steer);
    tcase_add_loop_test(tc, hook_points_compose_as_the_block_does, 0, N_MODELS);
    tcase_add_test(tc, hook_point_names_parse);
    tcase_add_test(tc, sampling_reproduces_runc);
    suite_add_tcase(s, tc);

    TCase *err = tcase_create("errors");
    tcase_add_test(err, bad_model_files_fail_cleanly);
    tcase_add_test(err, bad_tokenizer_files_fail_cleanly);
    tcase_add_test(err, bad_arguments_are_rejected);
    suite_add_tcase(s, err);
    return s;
}

int main(int argc, char **argv)
{
    if (argc > 1)
        data_dir = argv[1];
    SRunner *sr = srunner_create(engine_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
