/* libFuzzer target: the npz reader (libzip, then each member's .npy header) on any bytes. A
 * model that loads is encoded once and freed. */
#include "formats.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    unsigned char *copy = malloc(size ? size : 1);
    if (copy == NULL)
        return 0;
    memcpy(copy, data, size);
    sae_model *m = NULL;
    if (sae__npz_load(copy, size, "fuzz.npz", &m) == SAE_OK) {
        size_t d_in = sae_model_d_in(m), d_sae = sae_model_d_sae(m);
        float *x = calloc(d_in, sizeof(float)), *f = calloc(d_sae, sizeof(float));
        if (x != NULL && f != NULL)
            (void)sae_encode(m, x, 1, f);
        free(x);
        free(f);
        sae_model_free(m);
    }
    free(copy);
    return 0;
}
