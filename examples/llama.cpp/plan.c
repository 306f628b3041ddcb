/* plan.c: see plan.h. */
#include "plan.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int plan_parse_op(char kind, const char *s, plan_op *op)
{
    char *end;
    errno = 0;
    op->kind = kind;
    op->feature = strtoul(s, &end, 10);
    if (errno || end == s || *end != ':')
        return -1;
    const char *v = end + 1;
    op->value = strtof(v, &end);
    if (end == v)
        return -1;
    op->relative = kind == 'c' && *end == 'x';
    if (op->relative)
        end++;
    return *end ? -1 : 0;
}

float *plan_load_max(const char *path, size_t d_sae)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "%s: %s\n", path, strerror(errno));
        return NULL;
    }
    float *mx = calloc(d_sae, sizeof *mx);
    char *seen = calloc(d_sae, 1);
    char line[8192];
    size_t n_seen = 0;
    int bad = !mx || !seen;
    while (!bad && fgets(line, sizeof line, f)) {
        unsigned long i;
        unsigned long long c;
        float v;
        if (line[0] == '#')
            continue;
        if (sscanf(line, "%lu\t%llu\t%f", &i, &c, &v) != 3 || i >= d_sae || seen[i]) {
            fprintf(stderr, "%s: a line that does not fit an SAE of %zu features: %s", path, d_sae,
                    line);
            bad = 1;
            break;
        }
        mx[i] = v;
        seen[i] = 1;
        n_seen++;
    }
    fclose(f);
    free(seen);
    if (!bad && n_seen != d_sae) {
        fprintf(stderr, "%s lists %zu features, the SAE has %zu\n", path, n_seen, d_sae);
        bad = 1;
    }
    if (bad) {
        free(mx);
        return NULL;
    }
    return mx;
}

int plan_build(const sae_model *sae, const plan_op *ops, int n, const float *max,
               sae_steer **out, char *desc, size_t desc_cap)
{
    *out = NULL;
    if (desc_cap)
        desc[0] = 0;
    if (n == 0)
        return 0;
    sae_steer *plan;
    if (sae_steer_new(&plan, sae) != SAE_OK) {
        fprintf(stderr, "%s\n", sae_last_error());
        return -1;
    }
    size_t at = 0;
    for (int j = 0; j < n; j++) {
        const plan_op *op = &ops[j];
        int rc;
        if (op->feature >= sae_model_d_sae(sae)) {
            fprintf(stderr, "feature %lu is past the SAE's d_sae = %zu\n", op->feature,
                    sae_model_d_sae(sae));
            sae_steer_free(plan);
            return -1;
        }
        const uint32_t i = (uint32_t)op->feature;
        if (op->kind == 'c' && op->relative) {
            if (!max) {
                fprintf(stderr, "a clamp to a multiple of the max (F:Mx) needs the maxima (--stats)\n");
                sae_steer_free(plan);
                return -1;
            }
            rc = sae_steer_clamp_relative(plan, i, op->value, NULL, max);
        } else if (op->kind == 'c') {
            rc = sae_steer_clamp(plan, i, op->value);
        } else if (op->kind == 's') {
            rc = sae_steer_scale(plan, i, op->value);
        } else {
            rc = sae_steer_add(plan, i, op->value);
        }
        if (rc != SAE_OK) {
            fprintf(stderr, "%s\n", sae_last_error());
            sae_steer_free(plan);
            return -1;
        }
        if (at < desc_cap) {
            int k;
            if (op->kind == 'c' && op->relative)
                k = snprintf(desc + at, desc_cap - at, "%sclamp %lu to %gx its max (%g)", j ? ", " : "",
                             op->feature, (double)op->value, (double)(op->value * max[i]));
            else
                k = snprintf(desc + at, desc_cap - at, "%s%s %lu %s %g", j ? ", " : "",
                             op->kind == 'c' ? "clamp" : op->kind == 's' ? "scale" : "add",
                             op->feature, op->kind == 'c' ? "to" : op->kind == 's' ? "by" : "x",
                             (double)op->value);
            at += k > 0 ? (size_t)k : 0;
        }
    }
    *out = plan;
    return 0;
}

int plan_load_tokens(const char *path, size_t d_sae, int *tok, int *n_of)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "%s: %s\n", path, strerror(errno));
        return -1;
    }
    char line[8192];
    int rc = 0;
    for (size_t i = 0; i < d_sae; i++) {
        tok[i] = -1;
        n_of[i] = 0;
    }
    while (rc == 0 && fgets(line, sizeof line, f)) {
        if (line[0] == '#')
            continue;
        unsigned long i;
        char *p = line, *end;
        int ids[64], n = 0;
        i = strtoul(p, &end, 10);
        /* skip the count and max columns */
        for (int col = 0; col < 3 && end; col++)
            end = strchr(end + (col ? 1 : 0), '\t');
        if (end == NULL || i >= d_sae) {
            fprintf(stderr, "%s: a line that does not fit an SAE of %zu features: %s", path, d_sae,
                    line);
            rc = -1;
            break;
        }
        for (p = end + 1; n < 64 && *p && *p != '\n';) {
            long t = strtol(p, &end, 10);
            if (end == p)
                break;
            ids[n++] = (int)t;
            p = *end == ',' ? end + 1 : end;
        }
        for (int a = 0; a < n; a++) {
            int c = 0;
            for (int b = 0; b < n; b++)
                c += ids[b] == ids[a];
            if (c > n_of[i]) {
                n_of[i] = c;
                tok[i] = ids[a];
            }
        }
    }
    fclose(f);
    return rc;
}
