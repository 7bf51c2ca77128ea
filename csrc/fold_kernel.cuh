// reslora_kernels CUDA fold: W += coef * B A in place (see fold_kernel.cu).
// Plain CUDA, no torch: the kernel compiles with nvcc alone; fold_binding.cpp adapts it to torch.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace reslora {

// weight [n_rows, n_cols] (row stride ld_weight, unit column stride), lora_B [n_rows, rank]
// (row stride ld_b), lora_A [rank, n_cols] (row stride ld_a); all in scalar_t
// (float, __half or __nv_bfloat16). The product is accumulated in float32 and added to W in
// float32 before one rounding to scalar_t.
template <typename scalar_t>
cudaError_t launch_fold(scalar_t* weight, int64_t n_rows, int64_t n_cols, int64_t ld_weight,
                        const scalar_t* lora_B, int64_t ld_b, const scalar_t* lora_A, int64_t ld_a,
                        int64_t rank, float coef, cudaStream_t stream);

}  // namespace reslora
