/*
 * zeropur_kernels.h -- the per-element / per-sample math of ZeroPur, shared by
 * the CUDA kernels (zeropur_kernels.cu, nvcc or NVRTC) and the C ABI host
 * library (zeropur_host.cpp, any C++ compiler). numpy_twin.py is the Python
 * definition of exactly the same arithmetic; all three agree bit for bit.
 *
 * Rules that keep the three implementations bit-identical:
 *   - float32 only, every operation rounded on its own: build with
 *     nvcc --fmad=false / NVRTC --fmad=false / g++ -ffp-contract=off, never
 *     with fast-math (no FTZ, IEEE division).
 *   - clips are explicit ternaries (`x < lo ? lo : x`), never fminf/fmaxf, so
 *     ties and signed zeros give the same bytes everywhere.
 *   - the L1 norm has one canonical reduction order (ZP_LANES lanes, strided
 *     sequential accumulation, then a fixed binary tree), see zp_l1_*.
 *   - the blur is integer arithmetic (uint32), Pillow's fixed-point box blur.
 *
 * Compiles as plain C++ (and C99) too: ZP_HD expands to `static inline` there.
 * No includes under NVRTC (it has no standard headers).
 */
#ifndef ZEROPUR_KERNELS_H
#define ZEROPUR_KERNELS_H

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define ZP_HD __host__ __device__ __forceinline__
#else
#include <math.h>
#define ZP_HD static inline
#endif

/* Number of lanes of the canonical L1 reduction; also the CUDA block size of
 * the GS-update and L1 kernels (one block per sample). Must stay a power of 2. */
#define ZP_LANES 256
/* Pillow fixed point: 24 fractional bits, rounding half up. */
#define ZP_BLUR_SHIFT 24
#define ZP_BLUR_HALF (1u << 23)
#define ZP_BLUR_ONE (1u << 24)
#define ZP_BLUR_PASSES 3
/* Largest blur plane (h*w) and radius the kernels accept (int indexing). */
#define ZP_MAX_PLANE (1ll << 30)
#define ZP_MAX_RADIUS (1 << 23)

/* Error codes of every C entry point (host library and CUDA launchers). */
#define ZP_OK 0
#define ZP_ERR_NULL (-1)        /* a required pointer is NULL */
#define ZP_ERR_SIZE (-2)        /* negative / overflowing size */
#define ZP_ERR_SCALAR (-3)      /* non-finite eps/step/decay or bad flag */
#define ZP_ERR_BLUR_WEIGHTS (-4)/* radius/ww/fw not a valid Pillow weight set */
#define ZP_ERR_ALLOC (-5)       /* host allocation failed */
#define ZP_ERR_CUDA (-6)        /* a CUDA runtime call failed */
#define ZP_ERR_TOO_LARGE (-7)   /* image line too long for the blur kernel's shared memory */

/* ------------------------------------------------------------------ utils */

ZP_HD int zp_clampi(int v, int lo, int hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

/* sign in {-1, 0, +1}; 0 for +0 and -0 (and NaN, which is rejected upstream). */
ZP_HD float zp_sign(float v)
{
    return v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : 0.0f);
}

ZP_HD float zp_absf(float v)
{
    return v < 0.0f ? -v : (v == 0.0f ? 0.0f : v); /* |-0| = +0, same as fabsf */
}

/* clip to the eps ball around x_in, then to [0, 1]; the bounds are computed
 * in float32 (x_in - eps, x_in + eps). Ties keep x (same bytes everywhere). */
ZP_HD float zp_project(float x, float x_in, float eps)
{
    const float lo = x_in - eps;
    const float hi = x_in + eps;
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
    x = x < 0.0f ? 0.0f : x;
    x = x > 1.0f ? 1.0f : x;
    return x;
}

/* ------------------------------------------------------------- L1 norm */

/* Canonical order, lane part: lane k accumulates |g[j]| for j = k, k+LANES,
 * ... in increasing j, starting from +0.0f. Lanes with k >= p stay +0. */
ZP_HD float zp_l1_lane(const float* g, long long p, long long k)
{
    float acc = 0.0f;
    for (long long j = k; j < p; j += ZP_LANES) {
        acc = acc + zp_absf(g[j]);
    }
    return acc;
}

/* Canonical order, tree part (sequential form, used by the host library):
 * for s = LANES/2, ..., 1: lane[k] += lane[k+s] for k < s; result lane[0].
 * Destroys `lanes`. CUDA does the same tree in shared memory. */
ZP_HD float zp_l1_tree(float* lanes)
{
    for (int s = ZP_LANES / 2; s > 0; s >>= 1) {
        for (int k = 0; k < s; ++k) {
            lanes[k] = lanes[k] + lanes[k + s];
        }
    }
    return lanes[0];
}

/* ---------------------------------------------------- element updates */

/* One GS element: g = grad/l1 (0 when l1 == 0), m = g + decay*m,
 * x = project(x - step*sign(m)). */
ZP_HD void zp_gs_elem(float* x, float* m, float grad, float x_in, float l1,
                      float eps, float step, float decay)
{
    const float g = (l1 == 0.0f) ? 0.0f : grad / l1;
    const float dm = decay * (*m);
    const float mv = g + dm;
    *m = mv;
    const float delta = step * zp_sign(mv);
    *x = zp_project(*x - delta, x_in, eps);
}

/* One AP element: x = project(x - step*sign(grad)). */
ZP_HD float zp_ap_elem(float x, float grad, float x_in, float eps, float step)
{
    const float delta = step * zp_sign(grad);
    return zp_project(x - delta, x_in, eps);
}

/* ------------------------------------------------------------------ blur */

/* floor(x * 255) in float32, clamped to [0, 255]. */
ZP_HD unsigned int zp_quantize(float x)
{
    const float f = floorf(x * 255.0f);
    if (!(f > 0.0f)) return 0u; /* also catches NaN (rejected upstream) */
    if (f > 255.0f) return 255u;
    return (unsigned int)f;
}

/* b / 255 as float32 (a true division). */
ZP_HD float zp_dequantize(unsigned int b)
{
    return (float)b / 255.0f;
}

/* One output of one Pillow box pass over a line of n uint8 samples spaced
 * `stride` elements apart, edges replicated:
 *   (ww * sum_{k=-r..r} in[pos+k] + fw * (in[pos-r-1] + in[pos+r+1]) + 2^23) >> 24
 * Fits uint32 because (2r+1)*ww + 2*fw <= 2^24 (checked by the entry points).
 * Plane indices are int: entry points require h*w <= ZP_MAX_PLANE and a radius
 * <= ZP_MAX_RADIUS so pos +- (radius+1) cannot overflow. */
ZP_HD unsigned int zp_box_tap(const unsigned char* line, int stride, int n, int pos, int radius,
                              unsigned int ww, unsigned int fw)
{
    unsigned int acc = 0u;
    for (int k = -radius; k <= radius; ++k) {
        acc += (unsigned int)line[zp_clampi(pos + k, 0, n - 1) * stride];
    }
    const unsigned int edge = (unsigned int)line[zp_clampi(pos - radius - 1, 0, n - 1) * stride] +
                              (unsigned int)line[zp_clampi(pos + radius + 1, 0, n - 1) * stride];
    return (acc * ww + edge * fw + ZP_BLUR_HALF) >> ZP_BLUR_SHIFT;
}

/* Launch plan of the CUDA blur kernel for an h x w plane and max_smem bytes of
 * dynamic shared memory: lines == 0 keeps the whole plane (two uint8 copies)
 * in shared memory; lines > 0 processes `lines` rows, then `lines` columns, at a
 * time, with the intermediate (exact integers) staged in the float output. */
ZP_HD int zp_blur_plan(long long h, long long w, long long max_smem, int* lines, long long* smem)
{
    if (h <= 0 || w <= 0 || max_smem <= 0) return ZP_ERR_SIZE;
    if (h > ZP_MAX_PLANE / w) return ZP_ERR_SIZE;
    if (2 * h * w <= max_smem) {
        *lines = 0;
        *smem = 2 * h * w;
        return ZP_OK;
    }
    const long long longest = h > w ? h : w;
    long long l = max_smem / (2 * longest);
    if (l < 1) return ZP_ERR_TOO_LARGE;
    if (l > 32) l = 32;
    *lines = (int)l;
    *smem = 2 * l * longest;
    return ZP_OK;
}

/* radius == 0 with ww == 2^24 and fw == 0 is Pillow's box_radius == 0: the
 * blur is the identity on the quantized image (each pass would reproduce it). */
ZP_HD int zp_blur_is_identity(int radius, unsigned int ww, unsigned int fw)
{
    return radius == 0 && ww == ZP_BLUR_ONE && fw == 0u;
}

/* Validates a Pillow weight set as produced by zeropur_rt.blur.box_blur_weights. */
ZP_HD int zp_blur_weights_ok(int radius, unsigned int ww, unsigned int fw)
{
    if (radius < 0 || radius > ZP_MAX_RADIUS) return 0;
    const unsigned long long total =
        (unsigned long long)(2 * (long long)radius + 1) * ww + 2ull * fw;
    return total <= (unsigned long long)ZP_BLUR_ONE && ww > 0u;
}

#endif /* ZEROPUR_KERNELS_H */
