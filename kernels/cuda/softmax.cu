// Row softmax in CUDA C: the same algorithm as kernels/softmax.py, written in the CUDA programming model.
//
//   y[r, j] = exp(x[r, j] - m_r) / l_r,   m_r = max_j x[r, j],   l_r = sum_j exp(x[r, j] - m_r)
//
// Build (kernels/cuda_softmax.py does this on a GPU machine; the compile tier runs the second line, no GPU needed):
//   nvcc -O3 -arch=sm_90 -Xcompiler -fPIC -shared kernels/cuda/softmax.cu -o softmax.so
//   nvcc -arch=sm_90 -cubin -Xptxas -v kernels/cuda/softmax.cu -o softmax.cubin   # registers, smem, spills
//
// The model, as used here:
//   grid   one block per row (blockIdx.x = row); blocks run independently, in any order, on any SM.
//   block  THREADS threads (a multiple of 32) that share fast on-chip __shared__ memory and can wait for
//          each other at a barrier, __syncthreads(). Thread t handles columns t, t + THREADS, t + 2 THREADS...
//          so that neighbouring threads read neighbouring addresses (one coalesced transaction per warp).
//   warp   32 threads that execute together; they exchange registers directly with __shfl_xor_sync,
//          no shared memory and no barrier needed.
//   A block-wide reduction is therefore two levels: shuffles inside each warp, then the warps' partial
//   results meet in shared memory (barrier), then one more shuffle round.
//
// Versions:
//   1. softmax_rows        two reductions: the max, then the sum of exp(x - max); the row is read 3 times.
//   2. softmax_rows_online one read for both statistics: each thread keeps a running (max m, sum l) and pairs
//                          are merged with the online-softmax rescale (FlashAttention's trick):
//                          (m1, l1) + (m2, l2) = (M, l1 exp(m1 - M) + l2 exp(m2 - M)),  M = max(m1, m2).
// The kernels are torch-free extern "C" code; softmax_rows_launch is the host launcher Python calls (ctypes).

#include <cuda_runtime.h>
#include <math.h>

#define WARP 32
#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float warp_max(float x) {
    for (int offset = WARP / 2; offset > 0; offset /= 2)  // butterfly: after 5 steps every lane has the max
        x = fmaxf(x, __shfl_xor_sync(FULL_MASK, x, offset));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
    for (int offset = WARP / 2; offset > 0; offset /= 2)
        x += __shfl_xor_sync(FULL_MASK, x, offset);
    return x;
}

// One value per thread -> the block's max (or sum), returned to every thread.
template <bool IS_MAX>
__device__ float block_reduce(float x, float* partial) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, n_warps = blockDim.x / WARP;
    x = IS_MAX ? warp_max(x) : warp_sum(x);
    if (lane == 0) partial[warp] = x;
    __syncthreads();  // every warp's partial is in shared memory before anyone reads them
    x = lane < n_warps ? partial[lane] : (IS_MAX ? -INFINITY : 0.0f);
    x = IS_MAX ? warp_max(x) : warp_sum(x);  // each warp reduces the partials: all threads get the result
    __syncthreads();  // nobody overwrites `partial` (next reduction) while a warp is still reading it
    return x;
}

extern "C" __global__ void softmax_rows(const float* __restrict__ x, float* __restrict__ y, int n_cols) {
    __shared__ float partial[WARP];  // one slot per warp (at most 1024 / 32 = 32 warps)
    const float* row = x + (size_t)blockIdx.x * n_cols;
    float* out = y + (size_t)blockIdx.x * n_cols;

    float m = -INFINITY;
    for (int j = threadIdx.x; j < n_cols; j += blockDim.x) m = fmaxf(m, row[j]);
    m = block_reduce<true>(m, partial);

    float l = 0.0f;
    for (int j = threadIdx.x; j < n_cols; j += blockDim.x) l += __expf(row[j] - m);
    const float inv_l = 1.0f / block_reduce<false>(l, partial);

    for (int j = threadIdx.x; j < n_cols; j += blockDim.x) out[j] = __expf(row[j] - m) * inv_l;
}

// exp: the fast hardware approximation on the device, expf on the host (tests emulate merge() on a CPU).
__host__ __device__ __forceinline__ float fast_exp(float x) {
#ifdef __CUDA_ARCH__
    return __expf(x);
#else
    return expf(x);
#endif
}

// (m, l) <- (m, l) + (m2, l2): the running max and the sum of exp(x - max), rescaled to the larger max.
__host__ __device__ __forceinline__ void merge(float& m, float& l, float m2, float l2) {
    if (isnan(m2) || isnan(l2)) {  // fmaxf(m, NaN) = m would drop it: a NaN poisons the row, as in torch.softmax
        l = NAN;
        return;
    }
    const float big = fmaxf(m, m2);
    if (big == -INFINITY) return;  // nothing finite seen on either side: keep (-inf, 0), avoid exp(-inf + inf)
    l = l * fast_exp(m - big) + l2 * fast_exp(m2 - big);  // a NaN in l stays NaN
    m = big;
}

__device__ __forceinline__ void warp_merge(float& m, float& l) {
    for (int offset = WARP / 2; offset > 0; offset /= 2) {
        const float m2 = __shfl_xor_sync(FULL_MASK, m, offset);  // every lane shuffles before any branch
        const float l2 = __shfl_xor_sync(FULL_MASK, l, offset);
        merge(m, l, m2, l2);
    }
}

extern "C" __global__ void softmax_rows_online(const float* __restrict__ x, float* __restrict__ y, int n_cols) {
    __shared__ float partial_m[WARP];
    __shared__ float partial_l[WARP];
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, n_warps = blockDim.x / WARP;
    const float* row = x + (size_t)blockIdx.x * n_cols;
    float* out = y + (size_t)blockIdx.x * n_cols;

    float m = -INFINITY, l = 0.0f;
    for (int j = threadIdx.x; j < n_cols; j += blockDim.x) merge(m, l, row[j], 1.0f);  // one element: (x, 1)
    warp_merge(m, l);
    if (lane == 0) {
        partial_m[warp] = m;
        partial_l[warp] = l;
    }
    __syncthreads();
    m = lane < n_warps ? partial_m[lane] : -INFINITY;
    l = lane < n_warps ? partial_l[lane] : 0.0f;
    warp_merge(m, l);

    const float inv_l = 1.0f / l;
    for (int j = threadIdx.x; j < n_cols; j += blockDim.x) out[j] = __expf(row[j] - m) * inv_l;
}

// Host launcher: x and y are device pointers to contiguous (n_rows, n_cols) float32 rows. Returns a
// cudaError_t code (0 = success); softmax_error_string turns it into text.
extern "C" int softmax_rows_launch(const float* x, float* y, int n_rows, int n_cols, int version,
                                   cudaStream_t stream) {
    if (n_rows <= 0 || n_cols <= 0 || (version != 1 && version != 2)) return (int)cudaErrorInvalidValue;
    int threads = ((n_cols + WARP - 1) / WARP) * WARP;  // whole warps (shuffles use all 32 lanes), at most 256
    if (threads > 256) threads = 256;
    if (version == 1)
        softmax_rows<<<n_rows, threads, 0, stream>>>(x, y, n_cols);
    else
        softmax_rows_online<<<n_rows, threads, 0, stream>>>(x, y, n_cols);
    return (int)cudaGetLastError();
}

extern "C" const char* softmax_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }
