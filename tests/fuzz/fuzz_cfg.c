/* libFuzzer target: the cfg.json readers (SAELens, sparsify, activation_scaler.json) on any
 * bytes, not NUL-terminated; and what a config that parses must then say (a transcoder's d_out,
 * its b_dec never subtracted, the decoder-norm rescale only on the TopK classes, an
 * architecture libsae runs), aborting otherwise so that libFuzzer reports the input. */
#include "formats.h"

#include <stdint.h>
#include <stdio.h>
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
    if (sae__saelens_cfg_parse(text, size, "cfg.json", &c) == SAE_OK) {
        bool topk_class = c.arch == SAE_ARCH_TOPK || c.arch == SAE_ARCH_BATCHTOPK;
        if (c.arch < SAE_ARCH_RELU || c.arch > SAE_ARCH_GATED || c.arch == SAE_ARCH_GROUPMAX ||
            c.architecture == NULL || c.d_in == 0 || c.d_sae == 0 || c.d_out == 0 ||
            (!c.transcoder && (c.d_out != c.d_in || c.skip)) ||
            (c.transcoder && c.apply_b_dec) || (c.rescale_by_decoder_norm && !topk_class) ||
            (topk_class && c.k == 0) || c.norm > SAE__NORM_LAYER_NORM) {
            fprintf(stderr, "fuzz_cfg: a SAELens config parsed into an impossible state\n");
            abort();
        }
    }
    if (sae__sparsify_cfg_parse(text, size, "cfg.json", &s) == SAE_OK &&
        (s.d_in == 0 || s.k == 0 || s.k > UINT32_MAX)) {
        fprintf(stderr, "fuzz_cfg: a sparsify config parsed into an impossible state\n");
        abort();
    }
    (void)sae__saelens_scaler_parse(text, size, "activation_scaler.json", &scale);
    free(text);
    return 0;
}
