/* libFuzzer target: the 2026 publishers' readers behind the safetensors detection (Gemma Scope 2
 * with its config.json, Llama Scope with its hyperparams.json, Llama Scope R1 / lm_saes 2025 with
 * its config.json, circuit-tracer), with side files.
 * Input: [flags u8][config length u16 LE][config][hyperparams length u16 LE][hyperparams]
 * [safetensors bytes]. flags bit 0: pass config.json, bit 1: pass hyperparams.json, bit 2: the
 * weights are named params_layer_1.safetensors, bit 3: pass the hyperparams part as
 * circuit-tracer's config.yaml too. A model that loads is encoded once and freed. */
#include "formats.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Exact-size copies of the next length-prefixed part, so ASan sees any read past either end. */
static char *part(const uint8_t **p, size_t *left, size_t *len)
{
    *len = 0;
    if (*left < 2)
        return NULL;
    size_t n = (size_t)(*p)[0] | (size_t)(*p)[1] << 8;
    *p += 2, *left -= 2;
    if (n > *left)
        n = *left;
    char *c = malloc(n ? n : 1);
    if (c != NULL)
        memcpy(c, *p, n);
    *p += n, *left -= n, *len = n;
    return c;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    unsigned flags = data[0];
    const uint8_t *p = data + 1;
    size_t left = size - 1, config_len, hyper_len;
    char *config = part(&p, &left, &config_len);
    char *hyper = part(&p, &left, &hyper_len);
    unsigned char *st = malloc(left ? left : 1);
    if (st != NULL) {
        memcpy(st, p, left);
        const sae__sides sides = {{NULL, 0, "cfg.json"},
                                  {NULL, 0, "activation_scaler.json"},
                                  {(flags & 1) ? config : NULL, config_len, "config.json"},
                                  {(flags & 2) ? hyper : NULL, hyper_len, "hyperparams.json"},
                                  (flags & 4) ? "params_layer_1.safetensors" : "w.safetensors",
                                  {(flags & 8) ? hyper : NULL, hyper_len, "config.yaml"}};
        sae_model *m = NULL;
        if (sae__load_safetensors_ex(st, left, NULL, "fuzz.safetensors", &sides, &m) == SAE_OK) {
            size_t d_in = sae_model_d_in(m), d_sae = sae_model_d_sae(m);
            float *x = calloc(d_in, sizeof(float)), *f = calloc(d_sae, sizeof(float));
            if (x != NULL && f != NULL) {
                for (size_t i = 0; i < d_in; i++)
                    x[i] = 0.25f * (float)(i % 7) - 0.5f;
                (void)sae_encode(m, x, 1, f);
            }
            free(x);
            free(f);
            sae_model_free(m);
        }
    }
    free(st);
    free(config);
    free(hyper);
    return 0;
}
