// Ternary GEMV in CUDA C: y = W x with W in {-1, 0, 1} 2-bit packed and x int8, exact int32 results.
//
// Build:  nvcc -O3 -arch=sm_80 -Xcompiler -fPIC -shared ternary_gemv.cu -o libternary_gemv.so
//         (kernels/cuda_ternary.py does this and calls ternary_gemv_launch through ctypes)
//
// Packing (nanomodels/bitlinear.py pack_ternary): row n is ceil(K/4) bytes; byte j holds weights 4j .. 4j+3,
// weight k at bits 2(k mod 4) as the code c = w + 1 in {0, 1, 2}.
//
// One warp per row of W. Lane l reads bytes l, l + 32, l + 64, ... of the row (consecutive lanes read
// consecutive bytes: coalesced), turns each byte into four int8 weights in one 32-bit word, and multiplies it
// with the four matching activations by __dp4a (a 4-way int8 dot product with int32 accumulation, one
// instruction). The 32 partial sums are added by a butterfly of __shfl_xor_sync: after it every lane holds
// the row's total. The byte -> word decode is done once per block into a 256-entry table in shared memory
// (1 KiB), so the inner loop is one table read and one __dp4a per 4 weights. Torch-free extern "C".

#include <cuda_runtime.h>
#include <stdint.h>

#define ROWS_PER_BLOCK 4  // warps per block, one row each

__device__ __forceinline__ int decode_byte(unsigned int b) {
    // codes c0..c3 (2 bits each) -> bytes (c_i - 1) as int8, little-endian: weight 4j + i in byte i of the word
    unsigned int codes = (b & 3u) | ((b >> 2) & 3u) << 8 | ((b >> 4) & 3u) << 16 | ((b >> 6) & 3u) << 24;
    return (int)__vsub4(codes, 0x01010101u);  // per-byte subtract: 0 -> 0xFF (-1), 1 -> 0, 2 -> 1
}

__device__ __forceinline__ int load_x4(const int8_t *x, int k, int K) {
    if (k + 3 < K && (K & 3) == 0) return *reinterpret_cast<const int *>(x + k);  // aligned: one 32-bit load
    unsigned int word = 0;
    for (int i = 0; i < 4; i++)
        if (k + i < K) word |= (unsigned int)(uint8_t)x[k + i] << (8 * i);  // the row's tail: zeros past K
    return (int)word;
}

extern "C" __global__ void ternary_gemv_warp(const uint8_t *__restrict__ W, const int8_t *__restrict__ x,
                                             int32_t *__restrict__ y, int N, int K) {
    __shared__ int table[256];  // byte -> its four weights as int8 in one word
    for (int b = threadIdx.x; b < 256; b += blockDim.x) table[b] = decode_byte(b);
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
    if (row >= N) return;  // after the barrier; a whole warp leaves together, so the shuffles see full warps
    const int row_bytes = (K + 3) / 4;
    const uint8_t *w = W + (size_t)row * row_bytes;
    int acc = 0;
    for (int j = lane; j < row_bytes; j += 32) acc = __dp4a(table[w[j]], load_x4(x, 4 * j, K), acc);
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (lane == 0) y[row] = acc;
}

extern "C" int ternary_gemv_launch(const void *W, const void *x, void *y, int N, int K, void *stream) {
    if (N <= 0 || K <= 0) return (int)cudaErrorInvalidValue;
    dim3 grid((N + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK), block(32 * ROWS_PER_BLOCK);
    ternary_gemv_warp<<<grid, block, 0, (cudaStream_t)stream>>>((const uint8_t *)W, (const int8_t *)x,
                                                                 (int32_t *)y, N, K);
    return (int)cudaGetLastError();
}

extern "C" const char *ternary_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }
