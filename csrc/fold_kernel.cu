// W += coef * B A, in place, for any rank, in one launch.
//
// Memory-bound: every element of W is read once and written once. A block owns a tile of
// TILE_ROWS rows x (THREADS * COLS_PER_THREAD) columns; each thread owns COLS_PER_THREAD adjacent
// columns of those rows, so a warp's W accesses are contiguous. For each chunk of RANK_CHUNK
// ranks, the block stages B's rows in shared memory (every thread reads the same B value: a
// broadcast) and each thread keeps its columns of A in registers, accumulating B A in float32.

#include "fold_kernel.cuh"

namespace reslora {
namespace {

constexpr int THREADS = 128;
constexpr int COLS_PER_THREAD = 2;
constexpr int TILE_ROWS = 32;
constexpr int RANK_CHUNK = 16;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename scalar_t>
__global__ void __launch_bounds__(THREADS)
fold_kernel(scalar_t* __restrict__ weight, int64_t n_rows, int64_t n_cols, int64_t ld_weight,
            const scalar_t* __restrict__ lora_B, int64_t ld_b, const scalar_t* __restrict__ lora_A,
            int64_t ld_a, int64_t rank, float coef) {
  __shared__ float b_tile[TILE_ROWS][RANK_CHUNK];

  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * TILE_ROWS;
  const int64_t col0 = (static_cast<int64_t>(blockIdx.x) * THREADS + threadIdx.x) * COLS_PER_THREAD;

  float acc[TILE_ROWS][COLS_PER_THREAD];
#pragma unroll
  for (int i = 0; i < TILE_ROWS; ++i)
#pragma unroll
    for (int c = 0; c < COLS_PER_THREAD; ++c) acc[i][c] = 0.f;

  for (int64_t r0 = 0; r0 < rank; r0 += RANK_CHUNK) {
    // Stage B[row0 : row0 + TILE_ROWS, r0 : r0 + RANK_CHUNK] (zero-padded) for the whole block.
    for (int idx = threadIdx.x; idx < TILE_ROWS * RANK_CHUNK; idx += THREADS) {
      const int i = idx / RANK_CHUNK, j = idx % RANK_CHUNK;
      const int64_t row = row0 + i, r = r0 + j;
      b_tile[i][j] = (row < n_rows && r < rank) ? to_float(lora_B[row * ld_b + r]) : 0.f;
    }
    // This thread's columns of A[r0 : r0 + RANK_CHUNK, :].
    float a_reg[RANK_CHUNK][COLS_PER_THREAD];
#pragma unroll
    for (int j = 0; j < RANK_CHUNK; ++j)
#pragma unroll
      for (int c = 0; c < COLS_PER_THREAD; ++c) {
        const int64_t r = r0 + j, col = col0 + c;
        a_reg[j][c] = (r < rank && col < n_cols) ? to_float(lora_A[r * ld_a + col]) : 0.f;
      }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < TILE_ROWS; ++i)
#pragma unroll
      for (int j = 0; j < RANK_CHUNK; ++j)
#pragma unroll
        for (int c = 0; c < COLS_PER_THREAD; ++c) acc[i][c] += b_tile[i][j] * a_reg[j][c];
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < TILE_ROWS; ++i) {
    const int64_t row = row0 + i;
    if (row >= n_rows) break;
#pragma unroll
    for (int c = 0; c < COLS_PER_THREAD; ++c) {
      const int64_t col = col0 + c;
      if (col < n_cols) {
        scalar_t* w = weight + row * ld_weight + col;
        *w = from_float<scalar_t>(to_float(*w) + coef * acc[i][c]);
      }
    }
  }
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_fold(scalar_t* weight, int64_t n_rows, int64_t n_cols, int64_t ld_weight,
                        const scalar_t* lora_B, int64_t ld_b, const scalar_t* lora_A, int64_t ld_a,
                        int64_t rank, float coef, cudaStream_t stream) {
  if (n_rows == 0 || n_cols == 0 || rank == 0) return cudaSuccess;
  const int64_t cols_per_block = static_cast<int64_t>(THREADS) * COLS_PER_THREAD;
  const int64_t blocks_x = (n_cols + cols_per_block - 1) / cols_per_block;
  const int64_t blocks_y = (n_rows + TILE_ROWS - 1) / TILE_ROWS;
  if (blocks_y > 65535) return cudaErrorInvalidConfiguration;  // gridDim.y limit: 2M rows
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(blocks_y));
  fold_kernel<scalar_t><<<grid, THREADS, 0, stream>>>(weight, n_rows, n_cols, ld_weight, lora_B, ld_b, lora_A, ld_a,
                                                      rank, coef);
  return cudaGetLastError();
}

template cudaError_t launch_fold<float>(float*, int64_t, int64_t, int64_t, const float*, int64_t, const float*,
                                        int64_t, int64_t, float, cudaStream_t);
template cudaError_t launch_fold<__half>(__half*, int64_t, int64_t, int64_t, const __half*, int64_t, const __half*,
                                         int64_t, int64_t, float, cudaStream_t);
template cudaError_t launch_fold<__nv_bfloat16>(__nv_bfloat16*, int64_t, int64_t, int64_t, const __nv_bfloat16*,
                                                int64_t, const __nv_bfloat16*, int64_t, int64_t, float, cudaStream_t);

}  // namespace reslora
