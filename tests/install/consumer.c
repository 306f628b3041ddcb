/* A program that uses an installed libsae the way a user's would: the header and the library,
 * nothing from the source tree. */
#include <sae.h>

#include <stdio.h>

int main(void)
{
    if (sae_version_number() != SAE_VERSION_NUMBER) {
        fprintf(stderr, "header %d, library %u\n", SAE_VERSION_NUMBER, sae_version_number());
        return 1;
    }
    sae_model *m;
    if (sae_model_new(&m, SAE_ARCH_TOPK, 4, 8) != SAE_OK) {
        fprintf(stderr, "%s\n", sae_last_error());
        return 1;
    }
    float b_enc[8] = {0, 3, 1, 0, 2, 0, 0, 0}, x[4] = {0}, val[2];
    uint32_t idx[2], count;
    int rc = sae_model_set_tensor(m, SAE_B_ENC, b_enc);
    if (rc == SAE_OK)
        rc = sae_model_set_param(m, SAE_PARAM_K, 2);
    if (rc == SAE_OK)
        rc = sae_encode_sparse(m, x, 1, 2, idx, val, &count);
    sae_model_free(m);
    if (rc != SAE_OK || count != 2 || idx[0] != 1 || idx[1] != 4) {
        fprintf(stderr, "unexpected result: %s\n", sae_last_error());
        return 1;
    }
    printf("libsae %s works\n", sae_version_string());
    return 0;
}
