/* encode: prints each token's strongest SAE features.
 *
 *   encode MODEL ACTIVATIONS.npy [-k K] [-n TOKENS] [-f FIRST]
 *
 * MODEL is anything sae_model_load reads (libsae, SAELens, sparsify, Gemma Scope). The .npy file
 * holds activations [tokens][d_in] (float32, float16 or float64, C order); its header is checked
 * against the model before anything is encoded. Tokens are encoded in batches, one GEMM each. */
#include <sae.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { BATCH = 256 };

static int usage(void)
{
    fprintf(stderr, "usage: encode MODEL ACTIVATIONS.npy [-k K] [-n TOKENS] [-f FIRST]\n"
                    "  -k K       features to print per token (default 8)\n"
                    "  -n TOKENS  tokens to encode (default: all)\n"
                    "  -f FIRST   first token (default 0)\n");
    return 2;
}

static int parse_size(const char *s, size_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (*s == '-' || end == s || *end != '\0' || errno == ERANGE)
        return -1;
    *out = (size_t)v;
    return 0;
}

static int fail(const char *what, int rc)
{
    fprintf(stderr, "encode: %s: %s (%s)\n", what, sae_last_error(), sae_strerror(rc));
    return 1;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return usage();
    size_t k = 8, first = 0, count = SIZE_MAX;
    for (int i = 3; i < argc; i += 2) {
        size_t *dst = strcmp(argv[i], "-k") == 0   ? &k
                      : strcmp(argv[i], "-n") == 0 ? &count
                      : strcmp(argv[i], "-f") == 0 ? &first
                                                   : NULL;
        if (dst == NULL || i + 1 >= argc || parse_size(argv[i + 1], dst) != 0)
            return usage();
    }
    if (k == 0)
        return usage();

    sae_model *m = NULL;
    sae_npy *acts = NULL;
    int rc = sae_model_load(&m, argv[1]);
    if (rc != SAE_OK)
        return fail("loading the model", rc);
    if ((rc = sae_npy_open(&acts, argv[2])) != SAE_OK) {
        sae_model_free(m);
        return fail("opening the activations", rc);
    }
    size_t d_in = sae_model_d_in(m), rows = sae_npy_rows(acts);
    if (sae_npy_cols(acts) != d_in) {
        fprintf(stderr, "encode: %s holds rows of %zu values, but the model's d_in is %zu\n",
                argv[2], sae_npy_cols(acts), d_in);
        sae_npy_close(acts);
        sae_model_free(m);
        return 1;
    }
    if (first > rows)
        first = rows;
    if (count > rows - first)
        count = rows - first;
    printf("model: %s (%s, %s), d_in %zu, d_sae %zu; %zu of %zu tokens\n",
           sae_arch_name(sae_model_arch(m)), sae_model_format(m), sae_model_dtype(m), d_in,
           sae_model_d_sae(m), count, rows);

    float *x = malloc(BATCH * d_in * sizeof *x), *val = malloc(BATCH * k * sizeof *val);
    uint32_t *idx = malloc(BATCH * k * sizeof *idx), *nnz = malloc(BATCH * sizeof *nnz);
    int status = 0;
    if (x == NULL || val == NULL || idx == NULL || nnz == NULL) {
        fprintf(stderr, "encode: out of memory\n");
        status = 1;
    }
    for (size_t done = 0; status == 0 && done < count; done += BATCH) {
        size_t n = count - done < BATCH ? count - done : BATCH;
        if ((rc = sae_npy_read(acts, first + done, n, x)) != SAE_OK ||
            (rc = sae_encode_sparse(m, x, n, k, idx, val, nnz)) != SAE_OK) {
            status = fail("encoding", rc);
            break;
        }
        for (size_t t = 0; t < n; t++) {
            printf("token %zu:", first + done + t);
            for (uint32_t j = 0; j < nnz[t]; j++)
                printf(" %u=%.4g", idx[t * k + j], (double)val[t * k + j]);
            printf(nnz[t] ? "\n" : " (no active feature)\n");
        }
    }
    free(x);
    free(val);
    free(idx);
    free(nnz);
    sae_npy_close(acts);
    sae_model_free(m);
    return status;
}
