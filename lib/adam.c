/* The Adam optimizer over flat float arrays, in torch.optim.Adam's arithmetic, so that a run
 * compares with the Python trainers (SAELens, sparsify, OpenAI's sparse_autoencoder all use it). */
#include "internal.h"

#include <math.h>

void sae__adam_update(float *p, const float *g, float *m, float *v, size_t n, const sae__adam *a)
{
    /* The bias corrections in double: 1 - 0.999^t loses most of its digits in float early on. */
    const double bc1 = 1.0 - pow(a->beta1, (double)a->step);
    const double bc2 = 1.0 - pow(a->beta2, (double)a->step);
    const float step_size = (float)(a->lr / bc1);
    const float inv_bc2_sqrt = (float)(1.0 / sqrt(bc2));
    const float b1 = (float)a->beta1, b2 = (float)a->beta2;
    const float c1 = (float)(1.0 - a->beta1), c2 = (float)(1.0 - a->beta2);
    const float eps = (float)a->eps;
    for (size_t i = 0; i < n; i++) {
        float gi = g[i];
        float mi = b1 * m[i] + c1 * gi;
        float vi = b2 * v[i] + c2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= step_size * mi / (sqrtf(vi) * inv_bc2_sqrt + eps);
    }
}
