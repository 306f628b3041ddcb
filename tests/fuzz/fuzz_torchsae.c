/* libFuzzer target: the layer that reads published dictionaries out of torch.save files
 * (lib/torchsae.c: dictionary_learning, OpenAI, Goodfire), above the unpickler fuzz_torch covers.
 * The archive is rebuilt from the input each time, so that mutations reach the key and shape
 * checks instead of stopping at a member's CRC:
 *   [flags u8][config length u16 LE][config.json][pickle length u16 LE][data.pkl]
 *   [storage count u8] then per storage [length u16 LE][bytes]
 * become archive/data.pkl, archive/data/0..n-1 and archive/version. flags bit 0: pass the
 * config.json; bits 1-2: the file is named fuzz/ae.pt, math/<Goodfire R1 file>,
 * logic/<Goodfire R1 file> or fuzz/sae.pt (the names torchsae.c reads a k or a layout from).
 * A model that loads is encoded and reconstructed once and freed. */
#include "formats.h"
#include "writers.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

enum { MAX_STORAGES = 32 };

static size_t take(const uint8_t **p, size_t *left, size_t want)
{
    size_t n = want < *left ? want : *left;
    *p += n, *left -= n;
    return n;
}

static size_t u16(const uint8_t **p, size_t *left)
{
    if (*left < 2) {
        *left = 0;
        return 0;
    }
    size_t v = (size_t)(*p)[0] | (size_t)(*p)[1] << 8;
    *p += 2, *left -= 2;
    return v;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    const unsigned flags = data[0];
    const uint8_t *p = data + 1;
    size_t left = size - 1;
    size_t cfg_len = u16(&p, &left);
    const uint8_t *cfg = p;
    cfg_len = take(&p, &left, cfg_len);
    size_t pkl_len = u16(&p, &left);
    const uint8_t *pkl = p;
    pkl_len = take(&p, &left, pkl_len);
    size_t n = left ? (size_t)p[0] % (MAX_STORAGES + 1) : 0;
    take(&p, &left, 1);

    static char names[MAX_STORAGES + 2][32];
    const char *member_names[MAX_STORAGES + 2];
    tw_buf members[MAX_STORAGES + 2];
    memset(members, 0, sizeof members);
    member_names[0] = "archive/data.pkl";
    tw_put(&members[0], pkl, pkl_len);
    for (size_t i = 0; i < n; i++) {
        snprintf(names[i + 1], sizeof names[i + 1], "archive/data/%zu", i);
        member_names[i + 1] = names[i + 1];
        size_t len = u16(&p, &left);
        const uint8_t *bytes = p;
        len = take(&p, &left, len);
        tw_put(&members[i + 1], bytes, len);
    }
    member_names[n + 1] = "archive/version";
    tw_put(&members[n + 1], "3\n", 2);
    tw_buf z = {0};
    tw_zip(&z, member_names, members, n + 2, false);

    /* An exact-size copy of config.json, so ASan sees a read past its end. */
    char *cfg_copy = malloc(cfg_len ? cfg_len : 1);
    if (cfg_copy != NULL && z.data != NULL) {
        memcpy(cfg_copy, cfg, cfg_len);
        static const char *const paths[] = {"fuzz/ae.pt", "math/DeepSeek-R1-SAE-l37.pt",
                                            "logic/DeepSeek-R1-SAE-l37.pt", "fuzz/sae.pt"};
        sae_model *m = NULL;
        if (sae__torchsae_load(z.data, z.size, paths[(flags >> 1) & 3],
                               (flags & 1) ? cfg_copy : NULL, cfg_len, "config.json",
                               &m) == SAE_OK) {
            size_t d_in = sae_model_d_in(m), d_sae = sae_model_d_sae(m),
                   d_out = sae_model_d_out(m);
            float *x = calloc(d_in, sizeof(float)), *f = calloc(d_sae, sizeof(float));
            float *y = calloc(d_out, sizeof(float));
            if (x != NULL && f != NULL && y != NULL) {
                for (size_t i = 0; i < d_in; i++)
                    x[i] = 0.25f * (float)(i % 7) - 0.5f;
                (void)sae_encode(m, x, 1, f);
                (void)sae_reconstruct(m, x, 1, y);
            }
            free(x);
            free(f);
            free(y);
            sae_model_free(m);
        }
    }
    free(cfg_copy);
    tw_free(&z);
    for (size_t i = 0; i < n + 2; i++)
        tw_free(&members[i]);
    return 0;
}
