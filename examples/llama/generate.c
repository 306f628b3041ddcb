/*
 * generate - prompt in, text out, with the llama engine.
 *
 *   generate MODEL.bin TOKENIZER.bin [-i PROMPT] [-n NEW] [-t TEMP] [-p TOPP] [-s SEED] [-v]
 *
 * -t 0 (the default) is greedy; -p is nucleus sampling (0 = off); -v also prints the token ids.
 * With -t 1 -p 0.9 -s SEED it prints what llama2.c's `run MODEL -z TOK -t 1 -p 0.9 -s SEED`
 * prints.
 */
#include "engine.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(void)
{
    fprintf(stderr, "usage: generate MODEL.bin TOKENIZER.bin [-i PROMPT] [-n NEW_TOKENS] "
                    "[-t TEMPERATURE] [-p TOPP] [-s SEED] [-v]\n");
}

static int parse_num(const char *opt, const char *s, double lo, double hi, double *v)
{
    char *end;
    errno = 0;
    double d = strtod(s, &end);
    if (errno || end == s || *end || !(d >= lo && d <= hi)) {
        fprintf(stderr, "generate: %s needs a number in [%g, %g], got \"%s\"\n", opt, lo, hi, s);
        return -1;
    }
    *v = d;
    return 0;
}

int main(int argc, char **argv)
{
    const char *model_path = NULL, *tok_path = NULL, *prompt = "";
    double max_new = 256, temperature = 0, topp = 0, seed = 1;
    int verbose = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (a[0] == '-' && a[1] && !a[2] && strchr("intps", a[1])) {
            if (i + 1 >= argc) {
                usage();
                return 2;
            }
            const char *v = argv[++i];
            int bad = 0;
            switch (a[1]) {
            case 'i': prompt = v; break;
            case 'n': bad = parse_num("-n", v, 0, 1 << 20, &max_new); break;
            case 't': bad = parse_num("-t", v, 0, 100, &temperature); break;
            case 'p': bad = parse_num("-p", v, 0, 1, &topp); break;
            case 's': bad = parse_num("-s", v, 0, 1.8e19, &seed); break;
            default: break;
            }
            if (bad)
                return 2;
        } else if (strcmp(a, "-v") == 0) {
            verbose = 1;
        } else if (!model_path) {
            model_path = a;
        } else if (!tok_path) {
            tok_path = a;
        } else {
            usage();
            return 2;
        }
    }
    if (!model_path || !tok_path) {
        usage();
        return 2;
    }

    llama_model *m = NULL;
    llama_tokenizer *t = NULL;
    llama_state *s = NULL;
    llama_sampler *smp = NULL;
    int *toks = NULL, *out = NULL;
    char *text = NULL;
    int rc = 1;
    if (llama_model_load(model_path, &m))
        goto fail;
    const llama_config *c = llama_model_config(m);
    if (llama_tokenizer_load(tok_path, c->vocab_size, &t) || llama_state_create(m, &s) ||
        llama_sampler_create(c->vocab_size, (float)temperature, (float)topp, (uint64_t)seed,
                             &smp))
        goto fail;
    size_t cap = strlen(prompt) + 3;
    toks = malloc(cap * sizeof(int));
    out = malloc((size_t)c->seq_len * sizeof(int));
    if (!toks || !out) {
        fprintf(stderr, "generate: out of memory\n");
        rc = 1;
        goto done;
    }
    int n, n_out;
    if (llama_tokenize(t, prompt, 1, 0, toks, (int)cap, &n))
        goto fail;
    if (n > c->seq_len) {
        fprintf(stderr, "generate: prompt of %d tokens is longer than seq_len %d\n", n,
                c->seq_len);
        goto done;
    }
    int want = (int)max_new > c->seq_len - n ? c->seq_len - n : (int)max_new;
    if (llama_generate(s, smp, toks, n, want, out, c->seq_len, &n_out))
        goto fail;
    size_t len;
    llama_detokenize(t, out, n_out, NULL, 0, &len);
    text = malloc(len + 1);
    if (!text || llama_detokenize(t, out, n_out, text, len + 1, NULL))
        goto fail;
    fwrite(text, 1, len, stdout);
    fputc('\n', stdout);
    if (verbose) {
        for (int i = 0; i < n_out; i++)
            fprintf(stderr, "%d%c", out[i], i + 1 < n_out ? ' ' : '\n');
    }
    rc = 0;
    goto done;
fail:
    fprintf(stderr, "generate: %s\n", llama_last_error());
done:
    free(text);
    free(toks);
    free(out);
    llama_sampler_free(smp);
    llama_state_free(s);
    llama_tokenizer_free(t);
    llama_model_free(m);
    return rc;
}
