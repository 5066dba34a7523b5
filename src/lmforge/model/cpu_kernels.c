/* Fused fp32 CPU kernels for the training step: one pass over memory where eager PyTorch makes 3-8.
 *
 * Every array is contiguous. Rows are split statically across `nt` OpenMP threads, and each
 * reduction runs in a fixed order, so results do not depend on timing (bit-exact resume holds).
 * Built and loaded by cpu_kernels.py, which also holds the reference formulas.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

/* exp that the compiler can vectorize without -ffast-math (Cephes' expf: Cody-Waite reduction and a
 * degree-6 polynomial, about 1 ulp). Inputs are clamped to [-87, 88], where 2^n stays a normal
 * float: below, the result is ~1e-38 instead of a denormal or 0, which no sum here can notice. */
static inline float exp_(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return p * scale.f;
}

/* y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps), per row of c values. */
void rmsnorm_fwd(const float *x, const float *w, float *y, float *rstd, int64_t n, int64_t c, float eps, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const float *xr = x + r * c;
        float *yr = y + r * c;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < c; j++) ss += xr[j] * xr[j];
        float s = 1.0f / sqrtf(ss / (float)c + eps);
        rstd[r] = s;
#pragma omp simd
        for (int64_t j = 0; j < c; j++) yr[j] = (xr[j] * s) * w[j];
    }
}

/* gx = s * (g*w - xh * mean(g*w*xh)), xh = x*s; gw_part[t] += g*xh over thread t's rows. */
void rmsnorm_bwd(const float *g, const float *x, const float *w, const float *rstd, float *gx, float *gw_part,
                 int64_t n, int64_t c, int nt) {
#pragma omp parallel num_threads(nt)
    {
        float *acc = gw_part + (int64_t)omp_get_thread_num() * c;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            const float *gr = g + r * c, *xr = x + r * c;
            float *out = gx + r * c;
            float s = rstd[r], dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t j = 0; j < c; j++) dot += gr[j] * w[j] * xr[j];
            float m = dot * s / (float)c;  /* mean(g*w*xh) */
#pragma omp simd
            for (int64_t j = 0; j < c; j++) {
                float xh = xr[j] * s;
                out[j] = s * (gr[j] * w[j] - xh * m);
                acc[j] += gr[j] * xh;
            }
        }
    }
}

/* h = silu(a) * b */
void swiglu_fwd(const float *a, const float *b, float *h, int64_t n, int nt) {
#pragma omp parallel for simd num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; i++) h[i] = a[i] / (1.0f + exp_(-a[i])) * b[i];
}

/* h[r, j] = silu(a[r, j]) * a[r, f + j] over n rows of [gate | up] (a fused gate/up product's output),
 * one thread: a decoding step's few rows. */
void swiglu_rows(const float *a, float *h, int64_t n, int64_t f) {
    for (int64_t r = 0; r < n; r++) {
        const float *g = a + r * 2 * f, *u = g + f;
        float *o = h + r * f;
#pragma omp simd
        for (int64_t j = 0; j < f; j++) o[j] = g[j] / (1.0f + exp_(-g[j])) * u[j];
    }
}

/* da = dh * b * sig * (1 + a * (1 - sig)), db = dh * silu(a) */
void swiglu_bwd(const float *dh, const float *a, const float *b, float *da, float *db, int64_t n, int nt) {
#pragma omp parallel for simd num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float sig = 1.0f / (1.0f + exp_(-a[i]));
        db[i] = dh[i] * a[i] * sig;
        da[i] = dh[i] * b[i] * sig * (1.0f + a[i] * (1.0f - sig));
    }
}

/* Rotate-half RoPE on x (rows, heads, d) with tables cos/sin_signed (t, d): row r is position r % t.
 * Rows of x are ldx floats apart (a q/k slice of a fused q/k/v projection); out is contiguous.
 * out = x * cos + swap_halves(x) * sin_signed. With inverse=1 it applies the transpose (the backward):
 * out = x * cos + swap_halves(x * sin_signed). */
void rope(const float *x, int64_t ldx, const float *cos_t, const float *sin_t, float *out, int64_t rows, int64_t t,
          int64_t heads, int64_t d, int inverse, int nt) {
    int64_t half = d / 2;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos_t + (r % t) * d, *s = sin_t + (r % t) * d;
        for (int64_t h = 0; h < heads; h++) {
            const float *xr = x + r * ldx + h * d;
            float *o = out + (r * heads + h) * d;
            if (!inverse) {
#pragma omp simd
                for (int64_t j = 0; j < half; j++) {
                    o[j] = xr[j] * c[j] + xr[j + half] * s[j];
                    o[j + half] = xr[j + half] * c[j + half] + xr[j] * s[j + half];
                }
            } else {
#pragma omp simd
                for (int64_t j = 0; j < half; j++) {
                    o[j] = xr[j] * c[j] + xr[j + half] * s[j + half];
                    o[j + half] = xr[j + half] * c[j + half] + xr[j] * s[j];
                }
            }
        }
    }
}

/* Cross-entropy over rows of z (n, v), in place: z becomes softmax(z) - onehot(target), and
 * loss_part[t] gets thread t's sum of (logsumexp - z[target]). Rows whose target is ignore_index
 * (or out of range) become zeros and add no loss. */
void xent_fwd_bwd(float *z, const int64_t *target, double *loss_part, int64_t n, int64_t v, int64_t ignore_index,
                  int nt) {
#pragma omp parallel num_threads(nt)
    {
        double acc = 0.0;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            float *zr = z + r * v;
            int64_t tg = target[r];
            if (tg == ignore_index || tg < 0 || tg >= v) {
                memset(zr, 0, (size_t)v * sizeof(float));
                continue;
            }
            float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
            for (int64_t j = 0; j < v; j++) mx = zr[j] > mx ? zr[j] : mx;
            float zt = zr[tg];
            double sum = 0.0;  /* a float sum of 50k terms would lose ~1e-5 relative */
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < v; j++) {
                float e = exp_(zr[j] - mx);
                zr[j] = e;
                sum += (double)e;
            }
            float inv = (float)(1.0 / sum);
#pragma omp simd
            for (int64_t j = 0; j < v; j++) zr[j] *= inv;
            zr[tg] -= 1.0f;
            acc += log(sum) + (double)mx - (double)zt;
        }
        loss_part[omp_get_thread_num()] = acc;
    }
}
