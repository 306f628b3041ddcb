/* bfloat16 weight products on the CPU's bfloat16 matrix instructions (AMX tiles, else AVX512-BF16
 * dot products) through oneDNN's matmul (C API, dnnl.h), the library torch uses for the same
 * products; and the same matmul in float32 for the few-token products sgemm_dnnl.c gives it. Built only when CMake finds oneDNN (SAE_HAVE_DNNL); without it, or on a CPU without
 * those instructions, sae__bf16_isa says SAE_BF16_PATH_WIDEN and weights.c widens the weights for
 * SGEMM as before.
 *
 * oneDNN's bf16 matmul takes bfloat16 on both sides, so the activations are rounded to bfloat16
 * here (to nearest even, as the weights were), and the products accumulate in float32 into a
 * float32 destination (sae.h, SAE_PARAM_BF16_WEIGHTS, states what this does to accuracy).
 *
 * The matmul's AMX and AVX512-BF16 kernels read the weights in a blocked layout (pairs of rows
 * interleaved, in 16 x 64 tiles); given row-major weights, every call first copies all of them
 * into that layout, which at 64 tokens was over half the product's time (2304 x 16384 on the AMX
 * Xeon of docs/performance.md: 8.2 ms against 3.7 ms with the copy made beforehand). So a
 * bfloat16 model also holds its W_enc and W_dec in that layout (sae__bf16_pack, remade by every
 * write of them), and the products read those; the row-major copy stays for everything else
 * (rows of W_dec, saving, a few tokens' products).
 *
 * Nothing else is kept between calls but oneDNN's CPU engine (one per process, made once): each
 * call describes its matmul and asks oneDNN for the primitive, which oneDNN's own primitive cache
 * returns in a few microseconds for a shape it has seen (about 1 ms to generate a new one). A
 * const model is only read, so many threads may use one model at once. Each call brings its
 * own scratchpad (user scratchpad mode), so concurrent calls share no buffers either.
 *
 * oneDNN runs its threads through OpenMP (Debian's libdnnl is built so): a call sets the calling
 * thread's OpenMP thread count to the model's (SAE_PARAM_THREADS) for the product and restores
 * it afterwards; the count is a per-thread setting, so other threads are untouched. */
#include "internal.h"

#ifdef SAE_HAVE_DNNL

#include <oneapi/dnnl/dnnl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* libgomp's, which libdnnl links: declared here so that no OpenMP flags are needed. */
extern int omp_get_max_threads(void);
extern void omp_set_num_threads(int);

static pthread_once_t once = PTHREAD_ONCE_INIT;
static dnnl_engine_t engine;
static sae_bf16_path path = SAE_BF16_PATH_WIDEN;

/* SAE_BF16_ISA caps the path, for tests and comparisons: "none" keeps the widening path, and
 * "avx512_bf16" keeps oneDNN off AMX, through dnnl_set_max_cpu_isa, which acts on the whole
 * process's oneDNN and only before its first use (else the cap is not applied, and the path
 * reported is the one oneDNN actually takes). Unset or "amx": the best the CPU has. */
static void init(void)
{
    const char *cap = getenv("SAE_BF16_ISA");
    if (cap != NULL && strcmp(cap, "avx512_bf16") == 0)
        (void)dnnl_set_max_cpu_isa(dnnl_cpu_isa_avx512_core_bf16);
    /* The engine serves the float32 products (sgemm_dnnl.c) whatever the bfloat16 path. */
    if (dnnl_engine_create(&engine, dnnl_cpu, 0) != dnnl_success) {
        engine = NULL;
        return;
    }
    if (cap != NULL && strcmp(cap, "none") == 0)
        return;
    const dnnl_cpu_isa_t isa = dnnl_get_effective_cpu_isa();
    /* Each ISA value is a bit mask containing the ones below it. */
    const bool amx = ((unsigned)isa & (unsigned)dnnl_cpu_isa_avx512_core_amx) ==
                     (unsigned)dnnl_cpu_isa_avx512_core_amx;
    const bool bf16 = ((unsigned)isa & (unsigned)dnnl_cpu_isa_avx512_core_bf16) ==
                      (unsigned)dnnl_cpu_isa_avx512_core_bf16;
    if (!bf16)
        return;
    path = amx ? SAE_BF16_PATH_AMX : SAE_BF16_PATH_AVX512_BF16;
}

sae_bf16_path sae__bf16_isa(void)
{
    pthread_once(&once, init);
    return path;
}

/* Round to nearest, ties to even (weights.c's narrowing, without its range check: a finite float
 * beyond bfloat16's largest finite value becomes infinity, as it would overflow the float product
 * too). */
static inline uint16_t narrow1(float v)
{
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

typedef struct {
    const float *src;
    uint16_t *dst;
    size_t cols;
} narrow_job;

static void narrow_range(void *arg, size_t begin, size_t end, size_t worker)
{
    (void)worker;
    const narrow_job *job = arg;
    for (size_t i = begin * job->cols; i < end * job->cols; i++)
        job->dst[i] = narrow1(job->src[i]);
}

static int dnnl_fail(const char *what, dnnl_status_t s)
{
    if (s == dnnl_out_of_memory)
        return sae__fail(SAE_ENOMEM, "oneDNN: out of memory (%s)", what);
    return sae__fail(SAE_EUNSUPPORTED, "oneDNN: %s failed (status %d)", what, (int)s);
}

struct sae__bf16_packed {
    dnnl_memory_desc_t md; /* the layout, as the matmul's primitive descriptor reported it */
    void *data;
};

/* The primitive descriptor of C [M][N] (f32, row stride ldc) = alpha * (A [M][K] @ W [K][N]) +
 * beta * C, A and W bf16, A in a_tag's layout and W in w_tag's (dnnl_format_tag_any: the one the
 * matmul prefers), user scratchpad. */
static dnnl_status_t matmul_pd(dnnl_data_type_t type, size_t M, size_t K, size_t N,
                               dnnl_format_tag_t a_tag, dnnl_format_tag_t w_tag, size_t ldc,
                               float alpha, float beta, dnnl_primitive_desc_t *pd,
                               const char **step)
{
    dnnl_status_t s;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t ops = NULL;
    dnnl_memory_desc_t a_md, w_md, c_md;
    const dnnl_dims_t a_dims = {(dnnl_dim_t)M, (dnnl_dim_t)K},
                      w_dims = {(dnnl_dim_t)K, (dnnl_dim_t)N},
                      c_dims = {(dnnl_dim_t)M, (dnnl_dim_t)N},
                      c_strides = {(dnnl_dim_t)ldc, 1};
    dnnl_matmul_desc_t desc;
#define TRY(call)                                                                                  \
    do {                                                                                           \
        *step = #call;                                                                             \
        if ((s = (call)) != dnnl_success)                                                          \
            goto done;                                                                             \
    } while (0)
    TRY(dnnl_memory_desc_init_by_tag(&a_md, 2, a_dims, type, a_tag));
    TRY(dnnl_memory_desc_init_by_tag(&w_md, 2, w_dims, type, w_tag));
    TRY(dnnl_memory_desc_init_by_strides(&c_md, 2, c_dims, dnnl_f32, c_strides));
    TRY(dnnl_matmul_desc_init(&desc, &a_md, &w_md, NULL, &c_md));
    TRY(dnnl_primitive_attr_create(&attr));
    TRY(dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user));
    if (alpha != 1.0f) /* the scale comes before the sum */
        TRY(dnnl_primitive_attr_set_output_scales(attr, 1, 0, &alpha));
    if (beta != 0.0f) {
        TRY(dnnl_post_ops_create(&ops));
        TRY(dnnl_post_ops_append_sum(ops, beta));
        TRY(dnnl_primitive_attr_set_post_ops(attr, ops));
    }
    TRY(dnnl_primitive_desc_create(pd, &desc, attr, engine, NULL));
#undef TRY
done:
    if (ops != NULL)
        dnnl_post_ops_destroy(ops);
    if (attr != NULL)
        dnnl_primitive_attr_destroy(attr);
    return s;
}

/* Sets the calling thread's OpenMP team to `threads` for one oneDNN call; returns the count to
 * restore after it. */
static int team_of(size_t threads)
{
    const int saved_threads = omp_get_max_threads();
    omp_set_num_threads(threads > 1024 ? 1024 : (int)threads);
    return saved_threads;
}

/* Runs prim with args on the calling thread's OpenMP team of `threads`. */
static dnnl_status_t run(dnnl_primitive_t prim, int nargs, const dnnl_exec_arg_t *args,
                         size_t threads, const char **step)
{
    const int saved_threads = team_of(threads);
    dnnl_stream_t stream = NULL;
    dnnl_status_t s = dnnl_stream_create(&stream, engine, dnnl_stream_default_flags);
    *step = "dnnl_stream_create";
    if (s == dnnl_success) {
        *step = "dnnl_primitive_execute";
        s = dnnl_primitive_execute(prim, stream, nargs, args);
    }
    if (s == dnnl_success) {
        *step = "dnnl_stream_wait";
        s = dnnl_stream_wait(stream);
    }
    if (stream != NULL)
        dnnl_stream_destroy(stream);
    omp_set_num_threads(saved_threads);
    return s;
}

/* Runs the matmul of pd on threads threads, its source, weights and destination at data[0..2]
 * (the first two only read), with a scratchpad of its own. Returns SAE_OK or the error set. */
static int matmul_run(dnnl_primitive_desc_t pd, const dnnl_memory_desc_t *w_md,
                      const void *const data[3], size_t threads)
{
    int rc = SAE_OK;
    dnnl_status_t s;
    const char *step = "";
    dnnl_primitive_t prim = NULL;
    dnnl_memory_t mem[4] = {NULL, NULL, NULL, NULL};
    void *scratch = NULL;
    const dnnl_memory_desc_t *md[3] = {dnnl_primitive_desc_query_md(pd, dnnl_query_src_md, 0),
                                       w_md,
                                       dnnl_primitive_desc_query_md(pd, dnnl_query_dst_md, 0)};
#define TRY(call)                                                                                  \
    do {                                                                                           \
        step = #call;                                                                              \
        if ((s = (call)) != dnnl_success)                                                          \
            goto failed;                                                                           \
    } while (0)
    TRY(dnnl_primitive_create(&prim, pd));
    const dnnl_memory_desc_t *scratch_md =
        dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
    const size_t scratch_bytes = scratch_md != NULL ? dnnl_memory_desc_get_size(scratch_md) : 0;
    if (scratch_bytes > 0) {
        if (posix_memalign(&scratch, 64, scratch_bytes) != 0) {
            scratch = NULL;
            rc = sae__fail(SAE_ENOMEM, "out of memory (%zu bytes of oneDNN scratchpad)",
                           scratch_bytes);
            goto done;
        }
        TRY(dnnl_memory_create(&mem[3], scratch_md, engine, scratch));
    }
    for (int i = 0; i < 3; i++)
        TRY(dnnl_memory_create(&mem[i], md[i], engine, (void *)(uintptr_t)data[i]));
#undef TRY
    const dnnl_exec_arg_t args[4] = {{DNNL_ARG_SRC, mem[0]},
                                     {DNNL_ARG_WEIGHTS, mem[1]},
                                     {DNNL_ARG_DST, mem[2]},
                                     {DNNL_ARG_SCRATCHPAD, mem[3]}};
    if ((s = run(prim, scratch_bytes > 0 ? 4 : 3, args, threads, &step)) != dnnl_success)
        goto failed;
    goto done;
failed:
    rc = dnnl_fail(step, s);
done:
    for (int i = 0; i < 4; i++)
        if (mem[i] != NULL)
            dnnl_memory_destroy(mem[i]);
    if (prim != NULL)
        dnnl_primitive_destroy(prim);
    free(scratch);
    return rc;
}

/* The matmul's preferred layout does not depend on the number of tokens (checked for 1 to 1024
 * tokens, on AMX and AVX512-BF16, with oneDNN 2.6), so one token count stands for all; a product
 * whose preferred layout differs takes W as it is instead. */
enum { PACK_TOKENS = 64 };

struct sae__bf16_packed *sae__bf16_pack(const uint16_t *W, size_t K, size_t N, size_t threads)
{
    if (sae__bf16_isa() == SAE_BF16_PATH_WIDEN)
        return NULL;
    struct sae__bf16_packed *P = calloc(1, sizeof *P);
    dnnl_primitive_desc_t pd = NULL, rpd = NULL;
    dnnl_primitive_t reorder = NULL;
    dnnl_memory_t from = NULL, to = NULL;
    dnnl_memory_desc_t plain;
    const dnnl_dims_t dims = {(dnnl_dim_t)K, (dnnl_dim_t)N};
    const char *step;
    bool ok = P != NULL && matmul_pd(dnnl_bf16, PACK_TOKENS, K, N, dnnl_ab, dnnl_format_tag_any, N, 1.0f,
                                     0.0f, &pd, &step) == dnnl_success;
    if (ok) {
        P->md = *dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
        /* 64-byte alignment, as oneDNN allocates its own. */
        ok = posix_memalign(&P->data, 64, dnnl_memory_desc_get_size(&P->md)) == 0;
        if (!ok)
            P->data = NULL;
    }
    ok = ok && dnnl_memory_desc_init_by_tag(&plain, 2, dims, dnnl_bf16, dnnl_ab) == dnnl_success &&
         dnnl_memory_create(&from, &plain, engine, (void *)(uintptr_t)W) == dnnl_success &&
         dnnl_memory_create(&to, &P->md, engine, P->data) == dnnl_success &&
         dnnl_reorder_primitive_desc_create(&rpd, &plain, engine, &P->md, engine, NULL) ==
             dnnl_success &&
         dnnl_primitive_create(&reorder, rpd) == dnnl_success;
    if (ok) {
        const dnnl_exec_arg_t args[2] = {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}};
        ok = run(reorder, 2, args, threads, &step) == dnnl_success;
    }
    if (reorder != NULL)
        dnnl_primitive_destroy(reorder);
    if (rpd != NULL)
        dnnl_primitive_desc_destroy(rpd);
    if (to != NULL)
        dnnl_memory_destroy(to);
    if (from != NULL)
        dnnl_memory_destroy(from);
    if (pd != NULL)
        dnnl_primitive_desc_destroy(pd);
    if (!ok) {
        sae__bf16_packed_free(P);
        return NULL;
    }
    return P;
}

void sae__bf16_packed_free(struct sae__bf16_packed *P)
{
    if (P == NULL)
        return;
    free(P->data);
    free(P);
}

int sae__bf16_dnnl_product(const uint16_t *W, const struct sae__bf16_packed *P, size_t K,
                           size_t N, const float *A, size_t n, float *C, float beta,
                           size_t threads)
{
    if (sae__bf16_isa() == SAE_BF16_PATH_WIDEN)
        return sae__fail(SAE_EUNSUPPORTED, "no bfloat16 matrix instructions");
    uint16_t *A16 = sae__alloc(n * K, sizeof *A16, "bfloat16 activations");
    if (A16 == NULL)
        return SAE_ENOMEM;
    narrow_job nj = {A, A16, K};
    sae__parallel_for(threads, n, sae__grain(K), narrow_range, &nj);

    int rc;
    dnnl_status_t s;
    const char *step = "";
    dnnl_primitive_desc_t pd = NULL;
    const dnnl_memory_desc_t *w_md = NULL;
    const void *w_data = W;
    if (P != NULL) {
        if ((s = matmul_pd(dnnl_bf16, n, K, N, dnnl_ab, dnnl_format_tag_any, N, 1.0f, beta, &pd,
                           &step)) != dnnl_success)
            goto failed;
        w_md = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
        if (dnnl_memory_desc_equal(w_md, &P->md))
            w_data = P->data;
        else {
            dnnl_primitive_desc_destroy(pd);
            pd = NULL;
        }
    }
    if (pd == NULL) {
        if ((s = matmul_pd(dnnl_bf16, n, K, N, dnnl_ab, dnnl_ab, N, 1.0f, beta, &pd, &step)) !=
            dnnl_success)
            goto failed;
        w_md = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    }
    const void *const data[3] = {A16, w_data, C};
    rc = matmul_run(pd, w_md, data, threads);
    goto done;
failed:
    rc = dnnl_fail(step, s);
done:
    if (pd != NULL)
        dnnl_primitive_desc_destroy(pd);
    free(A16);
    return rc;
}

/* One matmul of the given operands made and run (matmul_pd's arguments, data as matmul_run's). */
static int matmul_once(dnnl_data_type_t type, size_t M, size_t K, size_t N,
                       dnnl_format_tag_t a_tag, dnnl_format_tag_t w_tag, size_t ldc, float alpha,
                       float beta, const void *const data[3], size_t threads)
{
    const char *step = "";
    dnnl_primitive_desc_t pd = NULL;
    const dnnl_status_t s = matmul_pd(type, M, K, N, a_tag, w_tag, ldc, alpha, beta, &pd, &step);
    if (s != dnnl_success)
        return dnnl_fail(step, s);
    const int rc =
        matmul_run(pd, dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0), data, threads);
    dnnl_primitive_desc_destroy(pd);
    return rc;
}

int sae__bf16_dnnl_gemm(bool ta, bool tb, size_t M, size_t N, size_t K, float alpha,
                        const uint16_t *A, const uint16_t *B, float beta, float *C, size_t ldc,
                        size_t threads)
{
    if (sae__bf16_isa() == SAE_BF16_PATH_WIDEN)
        return sae__fail(SAE_EUNSUPPORTED, "no bfloat16 matrix instructions");
    const void *const data[3] = {A, B, C};
    /* A transposed operand is the stored matrix read column-major (tag ba): no copy. */
    return matmul_once(dnnl_bf16, M, K, N, ta ? dnnl_ba : dnnl_ab, tb ? dnnl_ba : dnnl_ab, ldc,
                       alpha, beta, data, threads);
}

int sae__f32_dnnl_matmul(size_t n, size_t K, size_t N, const float *A, const float *W, float beta,
                         float *C, size_t threads)
{
    (void)sae__bf16_isa();
    if (engine == NULL)
        return sae__fail(SAE_EUNSUPPORTED, "oneDNN: no CPU engine");
    const void *const data[3] = {A, W, C};
    return matmul_once(dnnl_f32, n, K, N, dnnl_ab, dnnl_ab, N, 1.0f, beta, data, threads);
}

int sae__f32_dnnl_sgemm(size_t n, size_t K, size_t N, const float *A, const float *W, float beta,
                        float *C, size_t threads)
{
    const int saved_threads = team_of(threads);
    const dnnl_status_t s =
        dnnl_sgemm('N', 'N', (dnnl_dim_t)n, (dnnl_dim_t)N, (dnnl_dim_t)K, 1.0f, A, (dnnl_dim_t)K,
                   W, (dnnl_dim_t)N, beta, C, (dnnl_dim_t)N);
    omp_set_num_threads(saved_threads);
    return s == dnnl_success ? SAE_OK : dnnl_fail("dnnl_sgemm", s);
}

#else /* without oneDNN: the widening path only */

sae_bf16_path sae__bf16_isa(void) { return SAE_BF16_PATH_WIDEN; }

int sae__bf16_dnnl_product(const uint16_t *W, const struct sae__bf16_packed *P, size_t K,
                           size_t N, const float *A, size_t n, float *C, float beta,
                           size_t threads)
{
    (void)W, (void)P, (void)K, (void)N, (void)A, (void)n, (void)C, (void)beta, (void)threads;
    return sae__fail(SAE_EUNSUPPORTED, "libsae was built without oneDNN");
}

int sae__f32_dnnl_matmul(size_t n, size_t K, size_t N, const float *A, const float *W, float beta,
                         float *C, size_t threads)
{
    (void)n, (void)K, (void)N, (void)A, (void)W, (void)beta, (void)C, (void)threads;
    return sae__fail(SAE_EUNSUPPORTED, "libsae was built without oneDNN");
}

int sae__f32_dnnl_sgemm(size_t n, size_t K, size_t N, const float *A, const float *W, float beta,
                        float *C, size_t threads)
{
    (void)n, (void)K, (void)N, (void)A, (void)W, (void)beta, (void)C, (void)threads;
    return sae__fail(SAE_EUNSUPPORTED, "libsae was built without oneDNN");
}

struct sae__bf16_packed *sae__bf16_pack(const uint16_t *W, size_t K, size_t N, size_t threads)
{
    (void)W, (void)K, (void)N, (void)threads;
    return NULL;
}

void sae__bf16_packed_free(struct sae__bf16_packed *P) { (void)P; }

int sae__bf16_dnnl_gemm(bool ta, bool tb, size_t M, size_t N, size_t K, float alpha,
                        const uint16_t *A, const uint16_t *B, float beta, float *C, size_t ldc,
                        size_t threads)
{
    (void)ta, (void)tb, (void)M, (void)N, (void)K, (void)alpha, (void)A, (void)B, (void)beta;
    (void)C, (void)ldc, (void)threads;
    return sae__fail(SAE_EUNSUPPORTED, "libsae was built without oneDNN");
}

#endif

const char *sae_bf16_path_name(sae_bf16_path p)
{
    switch (p) {
    case SAE_BF16_PATH_FLOAT: return "float";
    case SAE_BF16_PATH_WIDEN: return "widen";
    case SAE_BF16_PATH_AVX512_BF16: return "avx512_bf16";
    case SAE_BF16_PATH_AMX: return "amx";
    default: return NULL;
    }
}
