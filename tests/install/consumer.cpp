// sae.h must compile as C++ (extern "C", no C-only constructs in declarations).
#include <sae.h>

#include <cstdio>

int main()
{
    sae_model *m = nullptr;
    int rc = sae_model_new(&m, SAE_ARCH_RELU, 2, 3);
    std::printf("C++: %s, d_sae %zu\n", sae_strerror(rc), sae_model_d_sae(m));
    sae_model_free(m);
    return rc == SAE_OK ? 0 : 1;
}
