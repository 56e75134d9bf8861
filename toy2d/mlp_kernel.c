/* The toy MLP's score and its weight gradient, fused (model.py's _Score in C).

   The same formulas as _Score in model.py (read its docstring first), run a
   tile of TILE points at a time so that every activation stays in cache and
   every element-wise step happens next to the matrix product that needs it.
   Built per width and type: -DWIDTH=64 -DREAL=float (kernel.py does this).

   Per point, with weights W_0 [n, 4] and W_l [n, n] (l = 1..L, silu's 1/0.596
   already folded in):
     forward   u = [x c_in, log(sigma) / 4, 1], h_0 = W_0 u, h_l = W_l silu(h_{l-1})
     score     b_L = k h_L (k = 2 gain / (n sigma)), a_{l-1} = W_l^T b_l,
               b_{l-1} = silu'(h_{l-1}) a_{l-1}, s = c_in (W_0^T b_0)[:2] - c_in^2 x
   mlp_forward writes s, and h_l and a_l when asked (training needs them);
   mlp_backward takes e = dLoss/ds and adds dLoss/dW_l and dLoss/dgain to its
   accumulators, running both passes in reverse as _Score.backward does. */
#include <stdlib.h>
#include <tgmath.h>   /* exp, log, sqrt of the type REAL */

#ifndef WIDTH
#define WIDTH 64
#endif
#ifndef REAL
#define REAL float
#endif
typedef REAL real;
/* One AVX register of reals; aligned(sizeof(real)) allows unaligned rows. */
typedef real vec __attribute__((vector_size(32), aligned(sizeof(real))));
#define LANES ((int)(32 / sizeof(real)))
#define NV (WIDTH / LANES)
#define TILE 32
#if WIDTH % 8 != 0
#error "WIDTH must be a multiple of 8 (a whole number of vectors; kernel.py checks it)"
#endif

/* exp overflows float beyond 88; silu and its slopes are 0 to rounding below -80 anyway */
static real sigmoid(real h) { return 1 / (1 + exp(h < -80 ? (real)80 : -h)); }

/* The two products below work on blocks of BV vectors (up to 4) of two rows
   at once: 2 BV accumulators stay in registers, and each vector loaded from
   memory feeds two multiply-adds (one per row). */
#define BV (NV < 4 ? NV : 4)

/* Y[r, :] = sum_k X[r, k] M[k, :] for r < R: X [R, m], M [m, WIDTH], Y [R, WIDTH]. */
static void rows_times(int R, int m, const real *X, const real *M, real *Y)
{
    for (int r = 0; r < R; r += 2) {
        const real *x0 = X + r * m, *x1 = r + 1 < R ? x0 + m : x0;  /* an odd last row is done twice */
        for (int c = 0; c < NV; c += BV) {
            vec acc0[BV] = {0}, acc1[BV] = {0};   /* plain arrays, no memcpy: kept in registers */
            for (int k = 0; k < m; k++) {
                const vec *row = (const vec *)(M + k * WIDTH) + c;
                const real a0 = x0[k], a1 = x1[k];
                for (int v = 0; v < BV; v++) {
                    acc0[v] += a0 * row[v];
                    acc1[v] += a1 * row[v];
                }
            }
            vec *y0 = (vec *)(Y + r * WIDTH) + c, *y1 = (vec *)(Y + (r + 1) * WIDTH) + c;
            for (int v = 0; v < BV; v++)
                y0[v] = acc0[v];
            if (r + 1 < R)
                for (int v = 0; v < BV; v++)
                    y1[v] = acc1[v];
        }
    }
}

/* G[i, :] += sum_r P[r, i] Q[r, :]: P [R, WIDTH], Q [R, WIDTH], G [WIDTH, WIDTH]. */
static void add_outer(int R, const real *P, const real *Q, real *G)
{
    for (int i = 0; i < WIDTH; i += 2) {   /* WIDTH is even */
        for (int c = 0; c < NV; c += BV) {
            vec *g0 = (vec *)(G + i * WIDTH) + c, *g1 = (vec *)(G + (i + 1) * WIDTH) + c;
            vec acc0[BV], acc1[BV];
            for (int v = 0; v < BV; v++) {
                acc0[v] = g0[v];
                acc1[v] = g1[v];
            }
            for (int r = 0; r < R; r++) {
                const vec *q = (const vec *)(Q + r * WIDTH) + c;
                const real p0 = P[r * WIDTH + i], p1 = P[r * WIDTH + i + 1];
                for (int v = 0; v < BV; v++) {
                    acc0[v] += p0 * q[v];
                    acc1[v] += p1 * q[v];
                }
            }
            for (int v = 0; v < BV; v++) {
                g0[v] = acc0[v];
                g1[v] = acc1[v];
            }
        }
    }
}

/* The transposes the products need: W_0^T [4, n], and W_l^T [n, n] for l >= 1. */
static real *transposes(int L, const real *w0, const real *w)
{
    real *t = malloc(sizeof(real) * (size_t)(4 * WIDTH + L * WIDTH * WIDTH));
    for (int j = 0; j < WIDTH; j++)
        for (int i = 0; i < 4; i++)
            t[i * WIDTH + j] = w0[j * 4 + i];
    for (int l = 0; l < L; l++)
        for (int i = 0; i < WIDTH; i++)
            for (int j = 0; j < WIDTH; j++)
                t[4 * WIDTH + l * WIDTH * WIDTH + j * WIDTH + i] = w[l * WIDTH * WIDTH + i * WIDTH + j];
    return t;
}

static void inputs(int R, const real *x, const real *sigma, real sigma_data, real *c_in, real *u)
{
    for (int r = 0; r < R; r++) {
        c_in[r] = 1 / sqrt(sigma[r] * sigma[r] + sigma_data * sigma_data);
        u[4 * r] = x[2 * r] * c_in[r];
        u[4 * r + 1] = x[2 * r + 1] * c_in[r];
        u[4 * r + 2] = log(sigma[r]) / 4;
        u[4 * r + 3] = 1;
    }
}

/* Points lo..hi-1 of n. x [n, 2], sigma [n], w0 [WIDTH, 4], w [L, WIDTH, WIDTH];
   out: score [n, 2]; hs [L+1, n, WIDTH] and as [L, n, WIDTH] unless NULL. */
void mlp_forward(int lo, int hi, int n, int L, const real *x, const real *sigma, real gain,
                 real sigma_data, const real *w0, const real *w, real *score, real *hs, real *as)
{
    const size_t T = TILE * WIDTH;
    real *wt = transposes(L, w0, w);
    real *buf = malloc(sizeof(real) * (T * (2 * L + 3) + 5 * TILE));
    real *h = buf, *s = h + (L + 1) * T, *act = s + L * T, *a = act + T, *c_in = a + T, *u = c_in + TILE;
    for (int r0 = lo; r0 < hi; r0 += TILE) {
        const int R = hi - r0 < TILE ? hi - r0 : TILE;
        /* h_l of this tile: written straight into hs when training needs it */
#define H(l) (hs ? hs + ((size_t)(l) * n + r0) * WIDTH : h + (size_t)(l) * T)
        inputs(R, x + 2 * r0, sigma + r0, sigma_data, c_in, u);
        /* forward pass */
        rows_times(R, 4, u, wt, H(0));
        for (int l = 1; l <= L; l++) {
            const real *hp = H(l - 1);
            real *sp = s + (l - 1) * T;
            for (int i = 0; i < R * WIDTH; i++) {
                sp[i] = sigmoid(hp[i]);
                act[i] = hp[i] * sp[i];
            }
            rows_times(R, WIDTH, act, wt + 4 * WIDTH + (l - 1) * WIDTH * WIDTH, H(l));
        }
        /* backward pass: b_L = k h_L, then a_{l-1} = W_l^T b_l, b_{l-1} = silu'(h_{l-1}) a_{l-1} */
        real *b = act;
        for (int r = 0; r < R; r++) {
            const real k = 2 * gain / (WIDTH * sigma[r0 + r]);
            for (int j = 0; j < WIDTH; j++)
                b[r * WIDTH + j] = k * H(L)[r * WIDTH + j];
        }
        for (int l = L; l >= 1; l--) {
            real *al = as ? as + ((size_t)(l - 1) * n + r0) * WIDTH : a;   /* a_{l-1}, kept when asked */
            rows_times(R, WIDTH, b, w + (l - 1) * WIDTH * WIDTH, al);
            const real *hp = H(l - 1), *sp = s + (l - 1) * T;
            for (int i = 0; i < R * WIDTH; i++)
                b[i] = sp[i] * (1 + hp[i] * (1 - sp[i])) * al[i];
        }
        for (int r = 0; r < R; r++) {
            real q0 = 0, q1 = 0;
            for (int j = 0; j < WIDTH; j++) {
                q0 += b[r * WIDTH + j] * w0[j * 4];
                q1 += b[r * WIDTH + j] * w0[j * 4 + 1];
            }
            const real c = c_in[r], *xr = x + 2 * (r0 + r);
            score[2 * (r0 + r)] = c * q0 - c * c * xr[0];
            score[2 * (r0 + r) + 1] = c * q1 - c * c * xr[1];
        }
#undef H
    }
    free(buf);
    free(wt);
}

/* Points lo..hi-1 of n, with mlp_forward's hs and as and e = dLoss/dscore [n, 2].
   Adds to gw0 [WIDTH, 4], gw [L, WIDTH, WIDTH] and gain_grad [1]. */
void mlp_backward(int lo, int hi, int n, int L, const real *x, const real *sigma, real gain,
                  real sigma_data, const real *w0, const real *w, const real *hs, const real *as,
                  const real *e, real *gw0, real *gw, real *gain_grad)
{
    const size_t T = TILE * WIDTH;
    real *wt = transposes(L, w0, w);
    real *buf = malloc(sizeof(real) * (T * (2 * L + 4) + 5 * TILE));
    real *s = buf, *hb = s + L * T, *bb = hb + (L + 1) * T, *bn = bb + T,
         *ab = bn + T, *c_in = ab + T, *u = c_in + TILE;
    double gain_sum = 0;
    for (int r0 = lo; r0 < hi; r0 += TILE) {
        const int R = hi - r0 < TILE ? hi - r0 : TILE;
#define H(l) (hs + ((size_t)(l) * n + r0) * WIDTH)   /* h_l of this tile, as mlp_forward saved it */
        inputs(R, x + 2 * r0, sigma + r0, sigma_data, c_in, u);
        for (int l = 0; l < L; l++)
            for (int i = 0; i < R * WIDTH; i++)
                s[l * T + i] = sigmoid(H(l)[i]);
#define A(l, r) (as + ((size_t)(l) * n + r0 + (r)) * WIDTH)   /* a_l of point r0 + r */
        /* reverse of the backward pass; bn holds b_{l+1}, bb the adjoint of b_l */
        for (int r = 0; r < R; r++) {
            const real e0 = c_in[r] * e[2 * (r0 + r)], e1 = c_in[r] * e[2 * (r0 + r) + 1];
            const real k = 2 * gain / (WIDTH * sigma[r0 + r]);   /* b_0 = k h_0 when L = 0 */
            const real *al = L ? A(0, r) : H(0), *hl = H(0) + r * WIDTH, *sl = s + r * WIDTH;
            for (int j = 0; j < WIDTH; j++) {
                const real b0 = L ? sl[j] * (1 + hl[j] * (1 - sl[j])) * al[j] : k * hl[j];
                gw0[j * 4] += b0 * e0;
                gw0[j * 4 + 1] += b0 * e1;
                bb[r * WIDTH + j] = e0 * w0[j * 4] + e1 * w0[j * 4 + 1];
            }
        }
        for (int l = 0; l < L; l++) {
            const real *hl = H(l), *sl = s + l * T, *hn = H(l + 1);
            for (int r = 0; r < R; r++) {
                const real *al = A(l, r);
                for (int j = 0; j < WIDTH; j++) {
                    const int i = r * WIDTH + j;
                    const real sg = sl[i], hv = hl[i];
                    const real slope = sg * (1 + hv * (1 - sg));
                    const real curve = sg * (1 - sg) * (2 + hv * (1 - 2 * sg));
                    hb[l * T + i] = curve * al[j] * bb[i];   /* b_l = silu'(h_l) a_l: second-order term */
                    ab[i] = slope * bb[i];                   /* adjoint of a_l */
                }
                if (l + 1 < L) {
                    const real *an = A(l + 1, r), *sn = s + (l + 1) * T;
                    for (int j = 0; j < WIDTH; j++) {
                        const int i = r * WIDTH + j;
                        bn[i] = sn[i] * (1 + hn[i] * (1 - sn[i])) * an[j];
                    }
                } else {
                    const real k = 2 * gain / (WIDTH * sigma[r0 + r]);
                    for (int j = 0; j < WIDTH; j++)
                        bn[r * WIDTH + j] = k * hn[r * WIDTH + j];
                }
            }
            add_outer(R, bn, ab, gw + l * WIDTH * WIDTH);         /* a_l = W_{l+1}^T b_{l+1} */
            rows_times(R, WIDTH, ab, wt + 4 * WIDTH + l * WIDTH * WIDTH, bb);
        }
#undef A
        /* b_L = gain k' h_L: the adjoint of h_L, and gain's gradient */
        for (int r = 0; r < R; r++) {
            const real k = 2 / (WIDTH * sigma[r0 + r]);
            for (int j = 0; j < WIDTH; j++) {
                const int i = r * WIDTH + j;
                gain_sum += k * H(L)[i] * bb[i];
                hb[L * T + i] = gain * k * bb[i];
            }
        }
        /* reverse of the forward pass: h_l = W_l silu(h_{l-1}) */
        for (int l = L; l >= 1; l--) {
            const real *hp = H(l - 1), *sp = s + (l - 1) * T;
            for (int i = 0; i < R * (int)WIDTH; i++)
                ab[i] = hp[i] * sp[i];                           /* silu(h_{l-1}) */
            add_outer(R, hb + l * T, ab, gw + (l - 1) * WIDTH * WIDTH);
            rows_times(R, WIDTH, hb + l * T, w + (l - 1) * WIDTH * WIDTH, bb);
            for (int i = 0; i < R * (int)WIDTH; i++)
                hb[(l - 1) * T + i] += sp[i] * (1 + hp[i] * (1 - sp[i])) * bb[i];
        }
        for (int r = 0; r < R; r++)
            for (int j = 0; j < WIDTH; j++)
                for (int i = 0; i < 4; i++)
                    gw0[j * 4 + i] += hb[r * WIDTH + j] * u[4 * r + i];
#undef H
    }
    *gain_grad += (real)gain_sum;
    free(buf);
    free(wt);
}
