// The CUDA fold registered with PyTorch's dispatcher:
//   torch.ops.reslora_kernels.fold_lora_(weight, lora_B, lora_A, coef)  ->  weight += coef * lora_B @ lora_A
// The schema is defined here with TORCH_LIBRARY_FRAGMENT (the Python side defines its own ops in the same
// namespace) and the kernel is registered for CUDA tensors only. The library is a plain shared object, no
// Python module: reslora_kernels/fold.py loads it with torch.ops.load_library on first use. Every input is
// checked before the launch, which runs on the current CUDA stream.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fold_kernel.cuh"

namespace {

template <typename torch_t, typename cuda_t>
void launch(at::Tensor& weight, const at::Tensor& lora_B, const at::Tensor& lora_A, double coef) {
  // at::Half / at::BFloat16 have the bit layout of __half / __nv_bfloat16.
  const cudaError_t err = reslora::launch_fold<cuda_t>(
      reinterpret_cast<cuda_t*>(weight.data_ptr<torch_t>()), weight.size(0), weight.size(1), weight.stride(0),
      reinterpret_cast<const cuda_t*>(lora_B.data_ptr<torch_t>()), lora_B.stride(0),
      reinterpret_cast<const cuda_t*>(lora_A.data_ptr<torch_t>()), lora_A.stride(0), lora_A.size(0),
      static_cast<float>(coef), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "reslora fold kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor& fold_lora_(at::Tensor& weight, const at::Tensor& lora_B, const at::Tensor& lora_A, double coef) {
  TORCH_CHECK(weight.is_cuda() && lora_B.is_cuda() && lora_A.is_cuda(), "fold_lora_: all tensors must be on CUDA");
  TORCH_CHECK(weight.device() == lora_B.device() && weight.device() == lora_A.device(),
              "fold_lora_: all tensors must be on one device");
  TORCH_CHECK(weight.dim() == 2 && lora_B.dim() == 2 && lora_A.dim() == 2, "fold_lora_: 2-D tensors expected");
  TORCH_CHECK(lora_B.size(0) == weight.size(0) && lora_A.size(1) == weight.size(1) && lora_B.size(1) == lora_A.size(0),
              "fold_lora_: weight ", weight.sizes(), ", lora_B ", lora_B.sizes(), " and lora_A ", lora_A.sizes(),
              " do not form W + B A");
  TORCH_CHECK(lora_B.scalar_type() == weight.scalar_type() && lora_A.scalar_type() == weight.scalar_type(),
              "fold_lora_: dtypes differ");
  TORCH_CHECK(weight.stride(1) == 1, "fold_lora_: weight needs unit column stride");
  const at::Tensor b = lora_B.stride(1) == 1 ? lora_B : lora_B.contiguous();
  const at::Tensor a = lora_A.stride(1) == 1 ? lora_A : lora_A.contiguous();
  const c10::cuda::CUDAGuard guard(weight.device());
  switch (weight.scalar_type()) {
    case at::kFloat: launch<float, float>(weight, b, a, coef); break;
    case at::kHalf: launch<at::Half, __half>(weight, b, a, coef); break;
    case at::kBFloat16: launch<at::BFloat16, __nv_bfloat16>(weight, b, a, coef); break;
    default: TORCH_CHECK(false, "fold_lora_: float32, float16 or bfloat16 expected, got ", weight.scalar_type());
  }
  return weight;
}

}  // namespace

// The schema's argument names are the Python call's (reslora_kernels/fold.py); tests/test_fold.py parses it.
TORCH_LIBRARY_FRAGMENT(reslora_kernels, m) {
  m.def("fold_lora_(Tensor(a!) weight, Tensor lora_B, Tensor lora_A, float coef) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(reslora_kernels, CUDA, m) { m.impl("fold_lora_", &fold_lora_); }
