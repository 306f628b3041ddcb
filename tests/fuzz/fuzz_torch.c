/* libFuzzer target: the .pt reader (lib/torch.c). An input starting "PK" is taken as a whole
 * archive; any other input is taken as the pickle (data.pkl) and wrapped in an archive with
 * storages 0-3 (16 bytes each), so that mutations reach the unpickler instead of stopping at the
 * zip's CRC. A dict that opens has every tensor read, and its names looked up. */
#include "formats.h"
#include "writers.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void exercise(const unsigned char *bytes, size_t size)
{
    sae__torch_dict *d = NULL;
    if (sae__torch_open(bytes, size, "fuzz.pt", &d) != SAE_OK)
        return;
    for (size_t i = 0; i < d->n_tensors; i++) {
        const sae__torch_tensor *t = &d->tensors[i];
        if (t->count <= (1u << 20)) {
            float *v = malloc((t->count ? t->count : 1) * sizeof(float));
            if (v != NULL)
                (void)sae__torch_tensor_to_float(d, t, v);
            free(v);
        }
        if (sae__torch_find(d, t->name) == NULL)
            abort();
    }
    for (size_t i = 0; i < d->n_scalars; i++) {
        double x;
        if (sae__torch_find_scalar(d, d->scalars[i].name) == NULL)
            abort();
        (void)sae__torch_number(d, d->scalars[i].name, &x);
    }
    sae__torch_close(d);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size >= 2 && data[0] == 'P' && data[1] == 'K') {
        unsigned char *copy = malloc(size);
        if (copy == NULL)
            return 0;
        memcpy(copy, data, size);
        exercise(copy, size);
        free(copy);
        return 0;
    }
    static const char *const names[] = {"archive/data.pkl", "archive/data/0", "archive/data/1",
                                        "archive/data/2",   "archive/data/3", "archive/version"};
    tw_buf members[6];
    memset(members, 0, sizeof members);
    tw_put(&members[0], data, size);
    for (size_t i = 1; i <= 4; i++) {
        unsigned char storage[16];
        for (size_t b = 0; b < sizeof storage; b++)
            storage[b] = (unsigned char)(i * 16 + b);
        tw_put(&members[i], storage, sizeof storage);
    }
    tw_put(&members[5], "3\n", 2);
    tw_buf z = {0};
    tw_zip(&z, names, members, 6, false);
    exercise(z.data, z.size);
    tw_free(&z);
    for (size_t i = 0; i < 6; i++)
        tw_free(&members[i]);
    return 0;
}
