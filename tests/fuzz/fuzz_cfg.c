/* libFuzzer target: the cfg.json readers (SAELens, sparsify, activation_scaler.json) on any
 * bytes, not NUL-terminated. */
#include "internal.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size ? size : 1);
    if (text == NULL)
        return 0;
    memcpy(text, data, size);
    sae__saelens_cfg c;
    sae__sparsify_cfg s;
    double scale;
    (void)sae__saelens_cfg_parse(text, size, "cfg.json", &c);
    (void)sae__sparsify_cfg_parse(text, size, "cfg.json", &s);
    (void)sae__saelens_scaler_parse(text, size, "activation_scaler.json", &scale);
    free(text);
    return 0;
}
