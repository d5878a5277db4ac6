/*
 * zeropur_host.cpp -- C ABI host library (libzeropur_host) built from the same
 * header as the CUDA kernels. Compile with -ffp-contract=off and without
 * fast-math so every float operation rounds on its own (bit-identical to
 * numpy_twin.py and to the CUDA kernels built with --fmad=false).
 *
 * All entry points take raw pointers + sizes + scalars and return ZP_OK (0) or
 * a negative ZP_ERR_* code (see zeropur_kernels.h); they never crash on bad
 * sizes or NULL pointers. Arrays are C-contiguous float32: N samples of P
 * values (NCHW with P = C*H*W), or `planes` planes of H x W for the blur.
 */
#include <cmath>
#include <cstdlib>

#include "zeropur_kernels.h"

#if defined(_WIN32)
#define ZP_API extern "C" __declspec(dllexport)
#else
#define ZP_API extern "C" __attribute__((visibility("default")))
#endif

namespace {

int check_np(long long n, long long p)
{
    if (n < 0 || p < 0) return ZP_ERR_SIZE;
    if (p > 0 && n > 0x7fffffffffffffffll / p) return ZP_ERR_SIZE;
    return ZP_OK;
}

bool finite3(float a, float b, float c)
{
    return std::isfinite(a) && std::isfinite(b) && std::isfinite(c);
}

/* Canonical L1 norm of one sample; lane loop in chunk order (cache friendly),
 * each lane still accumulates its elements sequentially in increasing j. */
float sample_l1(const float* g, long long p)
{
    float lanes[ZP_LANES];
    for (int k = 0; k < ZP_LANES; ++k) lanes[k] = 0.0f;
    long long j0 = 0;
    for (; j0 + ZP_LANES <= p; j0 += ZP_LANES) {
        for (int k = 0; k < ZP_LANES; ++k) lanes[k] = lanes[k] + zp_absf(g[j0 + k]);
    }
    for (int k = 0; j0 + k < p; ++k) lanes[k] = lanes[k] + zp_absf(g[j0 + k]);
    return zp_l1_tree(lanes);
}

/* 3 box passes over `nlines` lines of n samples (element stride es, line
 * stride ls): a -> b -> a -> b, result in b. */
void three_passes(unsigned char* a, unsigned char* b, int nlines, int n, int es, int ls, int radius,
                  unsigned int ww, unsigned int fw)
{
    unsigned char* src = a;
    unsigned char* dst = b;
    for (int pass = 0; pass < ZP_BLUR_PASSES; ++pass) {
        for (int l = 0; l < nlines; ++l) {
            for (int pos = 0; pos < n; ++pos) {
                dst[l * ls + pos * es] =
                    (unsigned char)zp_box_tap(src + l * ls, es, n, pos, radius, ww, fw);
            }
        }
        unsigned char* t = src;
        src = dst;
        dst = t;
    }
}

}  // namespace

ZP_API int zp_host_abi_version(void) { return 1; }

ZP_API const char* zp_strerror(int code)
{
    switch (code) {
        case ZP_OK: return "ok";
        case ZP_ERR_NULL: return "a required pointer is NULL";
        case ZP_ERR_SIZE: return "negative or overflowing size";
        case ZP_ERR_SCALAR: return "non-finite scalar argument or bad flag";
        case ZP_ERR_BLUR_WEIGHTS: return "invalid Pillow box-blur weights (radius, ww, fw)";
        case ZP_ERR_ALLOC: return "host allocation failed";
        case ZP_ERR_CUDA: return "CUDA runtime error";
        case ZP_ERR_TOO_LARGE: return "image too large for the blur kernel";
        default: return "unknown error";
    }
}

/* Canonical per-sample L1 norms of grad (n x p) into l1_out (n floats). */
ZP_API int zp_host_l1_norms(const float* grad, long long n, long long p, float* l1_out)
{
    int rc = check_np(n, p);
    if (rc != ZP_OK) return rc;
    if (n == 0) return ZP_OK;
    if (!l1_out || (p > 0 && !grad)) return ZP_ERR_NULL;
    for (long long i = 0; i < n; ++i) l1_out[i] = sample_l1(grad + i * p, p);
    return ZP_OK;
}

/* GS step in place on x and m. l1_scope: 0 = per-sample norm, 1 = batch norm
 * (per-sample norms summed sequentially i = 0..n-1 in float32). */
ZP_API int zp_host_gs_update(float* x, const float* grad, float* m, const float* x_in, long long n,
                             long long p, float eps, float step, float decay, int l1_scope)
{
    int rc = check_np(n, p);
    if (rc != ZP_OK) return rc;
    if (l1_scope != 0 && l1_scope != 1) return ZP_ERR_SCALAR;
    if (!finite3(eps, step, decay)) return ZP_ERR_SCALAR;
    if (n == 0 || p == 0) return ZP_OK;
    if (!x || !grad || !m || !x_in) return ZP_ERR_NULL;
    float batch_l1 = 0.0f;
    if (l1_scope == 1) {
        for (long long i = 0; i < n; ++i) batch_l1 = batch_l1 + sample_l1(grad + i * p, p);
    }
    for (long long i = 0; i < n; ++i) {
        const long long base = i * p;
        const float l1 = (l1_scope == 1) ? batch_l1 : sample_l1(grad + base, p);
        for (long long j = 0; j < p; ++j) {
            const long long e = base + j;
            zp_gs_elem(&x[e], &m[e], grad[e], x_in[e], l1, eps, step, decay);
        }
    }
    return ZP_OK;
}

/* AP step in place on x. */
ZP_API int zp_host_ap_update(float* x, const float* grad, const float* x_in, long long n, long long p,
                             float eps, float step)
{
    int rc = check_np(n, p);
    if (rc != ZP_OK) return rc;
    if (!finite3(eps, step, 0.0f)) return ZP_ERR_SCALAR;
    const long long total = n * p;
    if (total == 0) return ZP_OK;
    if (!x || !grad || !x_in) return ZP_ERR_NULL;
    for (long long e = 0; e < total; ++e) x[e] = zp_ap_elem(x[e], grad[e], x_in[e], eps, step);
    return ZP_OK;
}

/* Pillow-exact blur of `planes` planes of h x w: quantize, 3 horizontal + 3
 * vertical box passes with integer weights (radius, ww, fw from
 * zeropur_rt.blur.box_blur_weights), /255. out may be the same pointer as x. */
ZP_API int zp_host_blur(const float* x, float* out, long long planes, long long h, long long w,
                        int radius, unsigned int ww, unsigned int fw)
{
    if (planes < 0 || h < 0 || w < 0) return ZP_ERR_SIZE;
    if (!zp_blur_weights_ok(radius, ww, fw)) return ZP_ERR_BLUR_WEIGHTS;
    if (planes == 0 || h == 0 || w == 0) return ZP_OK;
    if (h > ZP_MAX_PLANE / w) return ZP_ERR_SIZE; /* int indexing inside a plane */
    const long long hw = h * w;
    if (planes > 0x7fffffffffffffffll / hw) return ZP_ERR_SIZE;
    if (!x || !out) return ZP_ERR_NULL;
    const bool identity = zp_blur_is_identity(radius, ww, fw) != 0;
    unsigned char* a = nullptr;
    unsigned char* b = nullptr;
    if (!identity) {
        a = static_cast<unsigned char*>(std::malloc(static_cast<size_t>(hw) * 2));
        if (!a) return ZP_ERR_ALLOC;
        b = a + hw;
    }
    for (long long pl = 0; pl < planes; ++pl) {
        const float* xp = x + pl * hw;
        float* op = out + pl * hw;
        if (identity) {
            for (long long e = 0; e < hw; ++e) op[e] = zp_dequantize(zp_quantize(xp[e]));
            continue;
        }
        for (long long e = 0; e < hw; ++e) a[e] = (unsigned char)zp_quantize(xp[e]);
        const int hi = (int)h, wi = (int)w;
        three_passes(a, b, hi, wi, 1, wi, radius, ww, fw); /* rows:    a -> b */
        three_passes(b, a, wi, hi, wi, 1, radius, ww, fw); /* columns: b -> a */
        for (long long e = 0; e < hw; ++e) op[e] = zp_dequantize(a[e]);
    }
    std::free(a);
    return ZP_OK;
}
