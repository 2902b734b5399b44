// Torch binding of the Engram CUDA kernels (engram_ops.cu): the launcher backend of the shared
// torch-facing ops (include/engram_binding.h), launching on the current stream with every buffer from the
// caching allocator. Compiled only against a CUDA build of torch (builder.CUDA_BUILDER).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "engram_binding.h"
#include "engram_ops.h"

#define ENGRAM_CUDA_OK(expr)                                                        \
  do {                                                                              \
    cudaError_t err_ = (expr);                                                      \
    TORCH_CHECK(err_ == cudaSuccess, #expr, " failed: ", cudaGetErrorString(err_)); \
  } while (0)

namespace {

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

struct CudaLaunchers {
  using Guard = c10::cuda::CUDAGuard;

  static void check_tensor(const at::Tensor& t, const at::Tensor& like, const char* name) {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
    TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  }

  static void gather(const void* table, int64_t num_rows, int64_t row_bytes, const void* ids, bool ids_are_int32,
                     const int64_t* offsets, int64_t num_heads, int64_t n, void* out, int* bad_flag) {
    ENGRAM_CUDA_OK(engram::launch_gather(table, num_rows, row_bytes, ids, ids_are_int32, offsets, num_heads, n, out,
                                         bad_flag, stream()));
  }

  static size_t sort_temp_bytes(int64_t m, int64_t limit) { return engram::sort_segments_temp_bytes(m, limit); }

  static void sort_segments(const int64_t* ids, int64_t m, int64_t limit, void* temp, size_t temp_bytes,
                            int64_t* order_in, int64_t* sorted_ids, int64_t* order, int64_t* seg_pos,
                            int64_t* unique_ids, int64_t* seg_starts, int64_t* num_unique, int* bad_flag) {
    ENGRAM_CUDA_OK(engram::launch_sort_segments(ids, m, limit, temp, temp_bytes, order_in, sorted_ids, order, seg_pos,
                                                unique_ids, seg_starts, num_unique, bad_flag, stream()));
  }

  static void segment_sum(const void* grads, engram::DType dtype, int64_t d, const int64_t* order,
                          const int64_t* seg_starts, engram::Count num_unique, int64_t rows_bound, void* summed) {
    ENGRAM_CUDA_OK(engram::launch_segment_sum(grads, dtype, d, order, seg_starts, num_unique, rows_bound, summed,
                                              stream()));
  }

  static void sparse_adam(const engram::AdamArgs& args) { ENGRAM_CUDA_OK(engram::launch_sparse_adam(args, stream())); }

  static void check_sorted_unique(const int64_t* ids, int64_t n, int64_t num_rows, int* bad_flag) {
    ENGRAM_CUDA_OK(engram::launch_check_sorted_unique(ids, n, num_rows, bad_flag, stream()));
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "Engram CUDA ops: fused multi-head gather, sort + segment reduce, fused row-sparse AdamW";
  engram::BoundOps<CudaLaunchers>::define(mod);
}
