/*
 * zeropur_kernels.cu -- CUDA kernels of ZeroPur's GS/AP updates and of the
 * Pillow-exact blur, built on zeropur_kernels.h (the same math as the host
 * library and numpy_twin.py, bit for bit).
 *
 * Build with --fmad=false (nvcc) / --fmad=false (NVRTC) and without
 * --use_fast_math: an FMA contraction would change rounding.
 *
 * Kernels (extern "C", unmangled, for cuModuleGetFunction):
 *   zp_gs_update_kernel  grid (N), block ZP_LANES(256), static smem.
 *       mode 0 (l1_scope "sample"): ONE launch per GS step. Block i computes
 *           sample i's L1 norm in the canonical order (lane k = thread k,
 *           shared-memory tree), then updates m and x of sample i.
 *           If l1_buf != NULL the per-sample norm is also stored there.
 *       mode 1 (l1_scope "batch"): second launch of a two-kernel scheme; l1_buf
 *           holds the N per-sample norms written by zp_l1_kernel; every block
 *           sums them sequentially i = 0..N-1 in float32 (the documented batch
 *           norm), then updates its sample. Two launches are needed because a
 *           batch norm is a grid-wide dependency: a single launch would need a
 *           cooperative grid sync (or an N^2 redundant reduction).
 *   zp_l1_kernel         grid (N), block 256: per-sample L1 norms -> l1_out.
 *   zp_ap_update_kernel  any 1-D grid (grid-stride), any block size.
 *   zp_blur_kernel       grid (planes = N*C), block 256 (any), dynamic smem
 *       from zp_blur_plan(): quantize + 3 horizontal + 3 vertical Pillow box
 *       passes + /255 in one launch. `lines` == 0: the whole plane (two uint8
 *       buffers) sits in shared memory (e.g. 32x32: 2 KiB). `lines` > 0: rows
 *       then columns are processed `lines` at a time and the horizontal
 *       result is staged (exact small integers) in `out`. out may equal x.
 *
 * The canonical L1 order caps a sample's reduction at 256 threads: that is the
 * price of bit equality with the host twin (a sample of 3x224x224 costs 588
 * sequential adds per thread).
 *
 * Host launchers (extern "C" zp_cuda_*, CUDA runtime API) are compiled only by
 * nvcc (not NVRTC) into libzeropur_cuda; the Python bindings (cuda.py) load
 * the fatbin / NVRTC output instead and launch with the driver API.
 */
#include "zeropur_kernels.h"

#define ZP_BLUR_THREADS 256
/* Hook for the CPU emulation test (tests/test_kernels.py), which maps
 * __shared__ to `static` and needs a plain `extern` here. */
#ifndef ZP_EXTERN_SHARED
#define ZP_EXTERN_SHARED extern __shared__
#endif
/* Default dynamic shared memory budget of the blur kernel: 48 KiB needs no
 * cudaFuncSetAttribute opt-in on any architecture. */
#define ZP_BLUR_MAX_SMEM (48 * 1024)

/* ------------------------------------------------------------ reductions */

/* Canonical L1 norm of one sample (p values at g), computed by a block of
 * exactly ZP_LANES threads. All threads must call it. Returns the norm to
 * every thread. */
__device__ __forceinline__ float zp_block_l1(const float* g, long long p, float* lanes)
{
    const int k = threadIdx.x;
    lanes[k] = zp_l1_lane(g, p, k);
    __syncthreads();
    for (int s = ZP_LANES / 2; s > 0; s >>= 1) {
        if (k < s) {
            lanes[k] = lanes[k] + lanes[k + s];
        }
        __syncthreads();
    }
    const float l1 = lanes[0];
    __syncthreads(); /* lanes may be reused by the caller */
    return l1;
}

extern "C" __global__ void __launch_bounds__(ZP_LANES)
zp_l1_kernel(const float* grad, float* l1_out, long long p)
{
    __shared__ float lanes[ZP_LANES];
    const long long i = blockIdx.x;
    const float l1 = zp_block_l1(grad + i * p, p, lanes);
    if (threadIdx.x == 0) {
        l1_out[i] = l1;
    }
}

extern "C" __global__ void __launch_bounds__(ZP_LANES)
zp_gs_update_kernel(float* x, const float* grad, float* m, const float* x_in,
                    float* l1_buf, long long n, long long p,
                    float eps, float step, float decay, int mode)
{
    __shared__ float lanes[ZP_LANES];
    __shared__ float l1_shared;
    const long long i = blockIdx.x;
    const long long base = i * p;
    if (mode == 0) {
        const float l1 = zp_block_l1(grad + base, p, lanes);
        if (threadIdx.x == 0) {
            l1_shared = l1;
            if (l1_buf != 0) l1_buf[i] = l1;
        }
    } else {
        if (threadIdx.x == 0) {
            float total = 0.0f;
            for (long long j = 0; j < n; ++j) {
                total = total + l1_buf[j];
            }
            l1_shared = total;
        }
    }
    __syncthreads();
    const float l1 = l1_shared;
    for (long long j = threadIdx.x; j < p; j += ZP_LANES) {
        const long long e = base + j;
        float xv = x[e];
        float mv = m[e];
        zp_gs_elem(&xv, &mv, grad[e], x_in[e], l1, eps, step, decay);
        m[e] = mv;
        x[e] = xv;
    }
}

extern "C" __global__ void
zp_ap_update_kernel(float* x, const float* grad, const float* x_in, long long total,
                    float eps, float step)
{
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        x[e] = zp_ap_elem(x[e], grad[e], x_in[e], eps, step);
    }
}

/* ------------------------------------------------------------------ blur */

/* Three box passes over `nlines` lines of n samples (element stride es, line
 * stride ls) held in shared memory: a -> b -> a -> b. Result in b. */
__device__ void zp_three_passes(unsigned char* a, unsigned char* b, int nlines, int n, int es,
                                int ls, int radius, unsigned int ww, unsigned int fw)
{
    const int total = nlines * n;
    unsigned char* src = a;
    unsigned char* dst = b;
    for (int pass = 0; pass < ZP_BLUR_PASSES; ++pass) {
        for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
            int l, pos;
            if (es == 1) { /* consecutive threads walk along a line */
                l = idx / n;
                pos = idx - l * n;
            } else { /* consecutive threads walk across lines */
                pos = idx / nlines;
                l = idx - pos * nlines;
            }
            dst[l * ls + pos * es] =
                (unsigned char)zp_box_tap(src + l * ls, es, n, pos, radius, ww, fw);
        }
        __syncthreads();
        unsigned char* t = src;
        src = dst;
        dst = t;
    }
}

/* h*w <= ZP_MAX_PLANE (int indexing inside a plane); plane offsets are 64-bit. */
extern "C" __global__ void
zp_blur_kernel(const float* x, float* out, int h, int w, int radius, unsigned int ww,
               unsigned int fw, int lines)
{
    ZP_EXTERN_SHARED unsigned char zp_smem[];
    const int hw = h * w;
    const float* xp = x + (long long)blockIdx.x * hw;
    float* op = out + (long long)blockIdx.x * hw;

    if (zp_blur_is_identity(radius, ww, fw)) {
        for (int idx = threadIdx.x; idx < hw; idx += blockDim.x) {
            op[idx] = zp_dequantize(zp_quantize(xp[idx]));
        }
        return;
    }

    if (lines == 0) {
        unsigned char* a = zp_smem;
        unsigned char* b = zp_smem + hw;
        for (int idx = threadIdx.x; idx < hw; idx += blockDim.x) {
            a[idx] = (unsigned char)zp_quantize(xp[idx]);
        }
        __syncthreads();
        zp_three_passes(a, b, h, w, 1, w, radius, ww, fw);  /* rows:    a -> b */
        zp_three_passes(b, a, w, h, w, 1, radius, ww, fw);  /* columns: b -> a */
        for (int idx = threadIdx.x; idx < hw; idx += blockDim.x) {
            op[idx] = zp_dequantize(a[idx]);
        }
        return;
    }

    const int longest = h > w ? h : w;
    unsigned char* a = zp_smem;
    unsigned char* b = zp_smem + lines * longest;
    /* rows, `lines` at a time; horizontal result staged in op as exact integers */
    for (int r0 = 0; r0 < h; r0 += lines) {
        const int nl = (h - r0) < lines ? (h - r0) : lines;
        for (int idx = threadIdx.x; idx < nl * w; idx += blockDim.x) {
            a[idx] = (unsigned char)zp_quantize(xp[r0 * w + idx]);
        }
        __syncthreads();
        zp_three_passes(a, b, nl, w, 1, w, radius, ww, fw);
        for (int idx = threadIdx.x; idx < nl * w; idx += blockDim.x) {
            op[r0 * w + idx] = (float)b[idx];
        }
        __syncthreads();
    }
    /* columns, `lines` at a time (global writes above are visible block-wide
     * after __syncthreads) */
    for (int c0 = 0; c0 < w; c0 += lines) {
        const int nc = (w - c0) < lines ? (w - c0) : lines;
        for (int idx = threadIdx.x; idx < h * nc; idx += blockDim.x) {
            const int row = idx / nc;
            const int c = idx - row * nc;
            a[idx] = (unsigned char)op[row * w + c0 + c];
        }
        __syncthreads();
        zp_three_passes(a, b, nc, h, nc, 1, radius, ww, fw);
        for (int idx = threadIdx.x; idx < h * nc; idx += blockDim.x) {
            const int row = idx / nc;
            const int c = idx - row * nc;
            op[row * w + c0 + c] = zp_dequantize(b[idx]);
        }
        __syncthreads();
    }
}

/* ------------------------------------------------------- host launchers */
#ifndef __CUDACC_RTC__
#include <cuda_runtime.h>
#include <math.h>

#if defined(_WIN32)
#define ZP_CUDA_API extern "C" __declspec(dllexport)
#else
#define ZP_CUDA_API extern "C" __attribute__((visibility("default")))
#endif

static int zp_cuda_check_np(long long n, long long p)
{
    if (n < 0 || p < 0) return ZP_ERR_SIZE;
    if (n > 0x7fffffffll) return ZP_ERR_SIZE; /* grid.x limit */
    if (p > 0 && n > 0x7fffffffffffffffll / p) return ZP_ERR_SIZE;
    return ZP_OK;
}

static int zp_cuda_last_error(void)
{
    return cudaGetLastError() == cudaSuccess ? ZP_OK : ZP_ERR_CUDA;
}

ZP_CUDA_API int zp_cuda_abi_version(void) { return 1; }

/* l1_scratch: n floats of device memory; required for l1_scope == 1 (batch),
 * optional for 0 (receives the per-sample norms). */
ZP_CUDA_API int zp_cuda_gs_update(float* x, const float* grad, float* m, const float* x_in,
                                  float* l1_scratch, long long n, long long p, float eps,
                                  float step, float decay, int l1_scope, void* stream)
{
    int rc = zp_cuda_check_np(n, p);
    if (rc != ZP_OK) return rc;
    if (l1_scope != 0 && l1_scope != 1) return ZP_ERR_SCALAR;
    if (!isfinite(eps) || !isfinite(step) || !isfinite(decay)) return ZP_ERR_SCALAR;
    if (n == 0 || p == 0) return ZP_OK;
    if (!x || !grad || !m || !x_in) return ZP_ERR_NULL;
    if (l1_scope == 1 && !l1_scratch) return ZP_ERR_NULL;
    cudaStream_t s = (cudaStream_t)stream;
    if (l1_scope == 1) {
        zp_l1_kernel<<<(unsigned int)n, ZP_LANES, 0, s>>>(grad, l1_scratch, p);
        if ((rc = zp_cuda_last_error()) != ZP_OK) return rc;
    }
    zp_gs_update_kernel<<<(unsigned int)n, ZP_LANES, 0, s>>>(x, grad, m, x_in, l1_scratch, n, p, eps,
                                                             step, decay, l1_scope);
    return zp_cuda_last_error();
}

ZP_CUDA_API int zp_cuda_l1_norms(const float* grad, float* l1_out, long long n, long long p,
                                 void* stream)
{
    int rc = zp_cuda_check_np(n, p);
    if (rc != ZP_OK) return rc;
    if (n == 0) return ZP_OK;
    if (!l1_out || (p > 0 && !grad)) return ZP_ERR_NULL;
    zp_l1_kernel<<<(unsigned int)n, ZP_LANES, 0, (cudaStream_t)stream>>>(grad, l1_out, p);
    return zp_cuda_last_error();
}

ZP_CUDA_API int zp_cuda_ap_update(float* x, const float* grad, const float* x_in, long long n,
                                  long long p, float eps, float step, void* stream)
{
    int rc = zp_cuda_check_np(n, p);
    if (rc != ZP_OK) return rc;
    if (!isfinite(eps) || !isfinite(step)) return ZP_ERR_SCALAR;
    const long long total = n * p;
    if (total == 0) return ZP_OK;
    if (!x || !grad || !x_in) return ZP_ERR_NULL;
    long long blocks = (total + 255) / 256;
    if (blocks > 65535ll * 8) blocks = 65535ll * 8;
    zp_ap_update_kernel<<<(unsigned int)blocks, 256, 0, (cudaStream_t)stream>>>(x, grad, x_in, total,
                                                                               eps, step);
    return zp_cuda_last_error();
}

ZP_CUDA_API int zp_cuda_blur(const float* x, float* out, long long planes, long long h, long long w,
                             int radius, unsigned int ww, unsigned int fw, void* stream)
{
    if (planes < 0 || h < 0 || w < 0) return ZP_ERR_SIZE;
    if (planes > 0x7fffffffll) return ZP_ERR_SIZE;
    if (!zp_blur_weights_ok(radius, ww, fw)) return ZP_ERR_BLUR_WEIGHTS;
    if (planes == 0 || h == 0 || w == 0) return ZP_OK;
    if (!x || !out) return ZP_ERR_NULL;
    int lines = 0;
    long long smem = 0;
    int rc = zp_blur_plan(h, w, ZP_BLUR_MAX_SMEM, &lines, &smem);
    if (rc != ZP_OK) return rc;
    zp_blur_kernel<<<(unsigned int)planes, ZP_BLUR_THREADS, (size_t)smem, (cudaStream_t)stream>>>(
        x, out, (int)h, (int)w, radius, ww, fw, lines);
    return zp_cuda_last_error();
}
#endif /* __CUDACC_RTC__ */
