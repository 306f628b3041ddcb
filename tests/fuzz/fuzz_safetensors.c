/* libFuzzer target: the safetensors reader and the three readers of what it holds (libsae's
 * own metadata, SAELens, sparsify), with an optional cfg.json and activation_scaler.json.
 * Input: [flags u8][cfg length u16 LE][cfg bytes][safetensors bytes]. flags bit 0: pass the cfg,
 * bit 1: pass a scaling factor. A model that loads is encoded once and freed. */
#include "formats.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void use(sae_model *m)
{
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

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 3)
        return 0;
    unsigned flags = data[0];
    size_t cfg_len = (size_t)data[1] | (size_t)data[2] << 8;
    if (cfg_len > size - 3)
        cfg_len = size - 3;
    /* Exact-size copies, so ASan sees any read past either end. */
    char *cfg = malloc(cfg_len ? cfg_len : 1);
    size_t st_size = size - 3 - cfg_len;
    unsigned char *st = malloc(st_size ? st_size : 1);
    if (cfg == NULL || st == NULL) {
        free(cfg);
        free(st);
        return 0;
    }
    memcpy(cfg, data + 3, cfg_len);
    memcpy(st, data + 3 + cfg_len, st_size);
    static const char scaler[] = "{\"scaling_factor\": 0.5}";
    sae_model *m = NULL;
    int rc = sae__load_safetensors(st, st_size, NULL, "fuzz.safetensors", (flags & 1) ? cfg : NULL,
                                   cfg_len, "cfg.json", (flags & 2) ? scaler : NULL,
                                   sizeof scaler - 1, "activation_scaler.json", &m);
    if (rc == SAE_OK)
        use(m);
    free(cfg);
    free(st);
    return 0;
}
