/* The fractal mixture's exact log-density and score in one pass (float32).

   The same mathematics as GMM._block in fractal.py, fused: for each point,
   every component's logit is computed once, exponentiated once and folded
   into a few sums, with nothing of size [N, K] ever written to memory.
   fractal.py compiles this file on first use and falls back to its torch
   code (the reference, tested against float64) when no C compiler exists.

   Layout (as fractal.py's coefficients): K = G * B components in B groups
   of G that share a covariance C_b = [[a, b], [b, c]]; component (j, b) is
   at index j * B + b, with v = mu - center_b. kernel.py pads B to a multiple
   of 8 (a vector) with groups too far away to count.

   For A = adj(C_b) + s I and det = det(C_b + s I), u = x - center_b:
     logit = log w - 0.5 log det - 0.5 (u - v)^T A (u - v) / det
     score = -sum_k r_k A (u - v_k) / det
   so a group contributes A (u W - V) / det with W = sum_j e_j and
   V = sum_j e_j v_j: centred differences keep float32's digits. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* e^x for x in [-87, 80] (the caller clamps at -80: below, e^x is nothing
   next to the peak's e^0). Plain arithmetic, so gcc vectorises it with the
   loop around it, where glibc's expf is a call that checks special cases:
     x = n ln2 + f, |f| <= ln2 / 2   (Cody-Waite: ln2 in two parts, by fmaf,
                                      which -ffast-math may not reassociate)
     e^f by its Taylor polynomial of degree 6 (error < 1.2e-7 relative)
     e^x = e^f 2^n                   (n added to the exponent bits)
   glibc's expf had been a large part of this kernel's time (perf). tests/test_fractal.py
   checks the kernel against float64. */
static inline float exp_clamped(float x)
{
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    float f = fmaf(-n, 0.693359375f, x);          /* ln2's leading bits: n * this is exact */
    f = fmaf(-n, -2.12194440e-4f, f);             /* the rest of ln2 */
    float p = 1.0f / 720;
    p = fmaf(p, f, 1.0f / 120);
    p = fmaf(p, f, 1.0f / 24);
    p = fmaf(p, f, 1.0f / 6);
    p = fmaf(p, f, 0.5f);
    p = fmaf(p, f, 1.0f);
    p = fmaf(p, f, 1.0f);
    int32_t bits;
    memcpy(&bits, &p, sizeof bits);
    bits += (int32_t)n * (1 << 23);
    memcpy(&p, &bits, sizeof p);
    return p;
}

void gmm_score(int n, const float *x, const float *s2,      /* x: [n, 2], s2 = sigma^2: [n] */
               int G, int B,
               const float *abc,                            /* [3, B] */
               const float *center,                         /* [B, 2] */
               const float *v0, const float *v1,            /* [G, B] */
               const float *vadj, const float *vv,          /* [G, B]: v^T adj(C) v, |v|^2 */
               const float *logw,                           /* [G, B] */
               float *logp, float *score)                   /* out: [n], [n, 2] (score may be NULL) */
{
    const int K = G * B;
    float *buf = malloc(sizeof(float) * (size_t)(K + 8 * B));
    float *logit = buf, *base = buf + K, *p0 = base + B, *p1 = p0 + B, *p2 = p1 + B, *p3 = p2 + B;
    float *W = p3 + B, *V0 = W + B, *V1 = V0 + B;
    const float *a = abc, *b = abc + B, *c = abc + 2 * B;
    for (int i = 0; i < n; i++) {
        const float x0 = x[2 * i], x1 = x[2 * i + 1], s = s2[i];
        /* per group: the terms shared by its G components */
        for (int k = 0; k < B; k++) {
            float u0 = x0 - center[2 * k], u1 = x1 - center[2 * k + 1];
            float det = (a[k] * c[k] - b[k] * b[k]) + s * (a[k] + c[k] + s);
            float inv = 1.0f / det;
            float au0 = (c[k] + s) * u0 - b[k] * u1, au1 = (a[k] + s) * u1 - b[k] * u0;
            base[k] = -0.5f * ((u0 * au0 + u1 * au1) * inv + logf(det));
            p0[k] = au0 * inv;
            p1[k] = au1 * inv;
            p2[k] = -0.5f * inv;
            p3[k] = -0.5f * inv * s;
        }
        /* every component's logit, and their maximum */
        float peak = -INFINITY;
        for (int j = 0; j < G; j++) {
            const int o = j * B;
            for (int k = 0; k < B; k++) {
                float l = logw[o + k] + base[k] + p0[k] * v0[o + k] + p1[k] * v1[o + k]
                          + p2[k] * vadj[o + k] + p3[k] * vv[o + k];
                logit[o + k] = l;
                peak = l > peak ? l : peak;
            }
        }
        /* exponentiate once; fold into per-group sums W, V */
        for (int k = 0; k < B; k++) W[k] = V0[k] = V1[k] = 0.0f;
        for (int j = 0; j < G; j++) {
            const int o = j * B;
            for (int k = 0; k < B; k++) {
                float d = logit[o + k] - peak;
                float e = exp_clamped(d < -80.0f ? -80.0f : d);   /* e^-80 is negligible */
                W[k] += e;
                V0[k] += e * v0[o + k];
                V1[k] += e * v1[o + k];
            }
        }
        double total = 0.0, g0 = 0.0, g1 = 0.0;
        for (int k = 0; k < B; k++) {
            total += W[k];
            float u0 = x0 - center[2 * k], u1 = x1 - center[2 * k + 1];
            float d0 = u0 * W[k] - V0[k], d1 = u1 * W[k] - V1[k];     /* sum_j e_j (u - v_j) */
            float inv = -2.0f * p2[k];
            g0 += inv * ((c[k] + s) * d0 - b[k] * d1);
            g1 += inv * ((a[k] + s) * d1 - b[k] * d0);
        }
        logp[i] = (float)(log(total) + peak - 1.8378770664093453);   /* log(2 pi) */
        if (score) {
            score[2 * i] = (float)(-g0 / total);
            score[2 * i + 1] = (float)(-g1 / total);
        }
    }
    free(buf);
}
