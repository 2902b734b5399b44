// Thin torch binding of the Engram CUDA kernels (engram_ops.cu). Compiled only against a CUDA build
// of torch (builder.CUDA_BUILDER). It validates tensors, allocates every buffer (cub temp storage
// included) with the caching allocator and launches on the current stream. Range checks read a
// device flag back (one host sync per call); segment counts need one sync to size the outputs.
#include <torch/csrc/utils/pybind.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <vector>

#include "engram_checks.h"
#include "engram_ops.h"

#define ENGRAM_CUDA_OK(expr)                                                     \
  do {                                                                           \
    cudaError_t err_ = (expr);                                                   \
    TORCH_CHECK(err_ == cudaSuccess, #expr, " failed: ", cudaGetErrorString(err_)); \
  } while (0)

namespace {

void check_cuda_contig(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

bool flag_set(const at::Tensor& flag) { return flag.item<int>() != 0; }

void gather_common(const at::Tensor& table, const at::Tensor& ids, const int64_t* offsets, int64_t num_heads,
                   at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(table.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor flag = at::zeros({1}, table.options().dtype(at::kInt));
  ENGRAM_CUDA_OK(engram::launch_gather(table.data_ptr(), table.size(0), table.size(1) * table.element_size(),
                                       ids.data_ptr(), ids.scalar_type() == at::kInt, offsets, num_heads, ids.numel(),
                                       out.data_ptr(), flag.data_ptr<int>(), stream.stream()));
  TORCH_CHECK_INDEX(!flag_set(flag), "row id out of range for a table with ", table.size(0), " rows");
}

void check_gather(const at::Tensor& table, const at::Tensor& ids, const at::Tensor& out) {
  check_cuda_contig(table, table, "table");
  check_cuda_contig(ids, table, "ids");
  check_cuda_contig(out, table, "out");
  engram::check_gather_shapes(table, ids, out);
}

struct Segments {
  at::Tensor order;       // [M] positions in sorted order
  at::Tensor unique_ids;  // [U] ascending
  at::Tensor seg_starts;  // [U + 1]
  int64_t num_unique;
};

Segments sort_segments(const at::Tensor& row_ids, int64_t limit) {
  const at::Tensor ids = row_ids.to(at::kLong).contiguous();
  const int64_t m = ids.numel();
  const c10::cuda::CUDAGuard guard(ids.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto opts = ids.options();
  const size_t temp_bytes = engram::sort_segments_temp_bytes(m, limit);
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, opts.dtype(at::kByte));
  at::Tensor order_in = at::empty({m}, opts), sorted = at::empty({m}, opts), order = at::empty({m}, opts);
  at::Tensor seg_pos = at::empty({m}, opts), unique = at::empty({m}, opts), seg_starts = at::empty({m + 1}, opts);
  at::Tensor count = at::empty({1}, opts);
  at::Tensor flag = at::zeros({1}, opts.dtype(at::kInt));
  ENGRAM_CUDA_OK(engram::launch_sort_segments(
      ids.data_ptr<int64_t>(), m, limit, temp.data_ptr(), temp_bytes, order_in.data_ptr<int64_t>(),
      sorted.data_ptr<int64_t>(), order.data_ptr<int64_t>(), seg_pos.data_ptr<int64_t>(), unique.data_ptr<int64_t>(),
      seg_starts.data_ptr<int64_t>(), count.data_ptr<int64_t>(), flag.data_ptr<int>(), stream.stream()));
  const int64_t u = count.item<int64_t>();
  TORCH_CHECK_INDEX(!flag_set(flag), "row ids must lie in [0, ", limit, ")");
  return {order, unique.narrow(0, 0, u).clone(), seg_starts.narrow(0, 0, u + 1), u};
}

engram::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return engram::DType::kFloat32;
    case at::kDouble:
      return engram::DType::kFloat64;
    case at::kBFloat16:
      return engram::DType::kBFloat16;
    case at::kHalf:
      return engram::DType::kFloat16;
    default:
      TORCH_CHECK_VALUE(false, "unsupported dtype ", t);
  }
}

void check_adam(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                const at::Tensor& step, const at::Tensor& grads, int64_t global_step) {
  check_cuda_contig(param, param, "param");
  check_cuda_contig(exp_avg, param, "exp_avg");
  check_cuda_contig(exp_avg_sq, param, "exp_avg_sq");
  check_cuda_contig(step, param, "step_per_row");
  check_cuda_contig(grads, param, "grads");
  engram::check_adam_shapes(param, exp_avg, exp_avg_sq, step, grads, global_step);
}

void adam_launch(at::Tensor& param, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& step,
                 const at::Tensor& unique_ids, int64_t num_unique, const at::Tensor& grads, const int64_t* order,
                 const int64_t* seg_starts, const engram::AdamHyper& hyper) {
  const c10::cuda::CUDAGuard guard(param.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  ENGRAM_CUDA_OK(engram::launch_sparse_adam(
      param.data_ptr(), to_dtype(param.scalar_type()), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
      to_dtype(exp_avg.scalar_type()), step.data_ptr(), step.scalar_type() == at::kInt, param.size(1),
      unique_ids.data_ptr<int64_t>(), num_unique, grads.data_ptr(), order, seg_starts, hyper, stream.stream()));
}

}  // namespace

void gather_rows_into(const at::Tensor& table, const at::Tensor& ids, at::Tensor out) {
  check_gather(table, ids, out);
  gather_common(table, ids, nullptr, 0, out);
}

void multihead_gather_into(const at::Tensor& table, const at::Tensor& row_ids, const at::Tensor& head_offsets,
                           at::Tensor out) {
  check_gather(table, row_ids, out);
  check_cuda_contig(head_offsets, table, "head_offsets");
  TORCH_CHECK(head_offsets.scalar_type() == at::kLong, "head_offsets must be int64");
  const int64_t num_heads = head_offsets.numel();
  TORCH_CHECK(num_heads > 0 && row_ids.dim() >= 1 && row_ids.size(-1) == num_heads,
              "row_ids must end in H = head_offsets.numel()");
  gather_common(table, row_ids, head_offsets.data_ptr<int64_t>(), num_heads, out);
}

std::vector<at::Tensor> segment_reduce(const at::Tensor& row_ids, const at::Tensor& grads) {
  check_cuda_contig(row_ids, row_ids, "row_ids");
  check_cuda_contig(grads, row_ids, "grads");
  check_index_dtype(row_ids, "row_ids");
  TORCH_CHECK(row_ids.dim() == 1 && grads.dim() == 2 && grads.size(0) == row_ids.size(0),
              "row_ids [M] and grads [M, d] expected");
  TORCH_CHECK(grads.scalar_type() == at::kFloat || grads.scalar_type() == at::kDouble,
              "grads must be float32 or float64");
  Segments seg = sort_segments(row_ids, std::numeric_limits<int64_t>::max());
  at::Tensor summed = at::empty({seg.num_unique, grads.size(1)}, grads.options());
  const c10::cuda::CUDAGuard guard(grads.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  ENGRAM_CUDA_OK(engram::launch_segment_sum(grads.data_ptr(), to_dtype(grads.scalar_type()), grads.size(1),
                                            seg.order.data_ptr<int64_t>(), seg.seg_starts.data_ptr<int64_t>(),
                                            seg.num_unique, summed.data_ptr(), stream.stream()));
  return {seg.unique_ids, summed};
}

void sparse_adam_update_(at::Tensor param, at::Tensor exp_avg, at::Tensor exp_avg_sq, at::Tensor step_per_row,
                         const at::Tensor& unique_ids, const at::Tensor& grads, double lr, double beta1,
                         double beta2, double eps, double weight_decay, int64_t global_step) {
  check_adam(param, exp_avg, exp_avg_sq, step_per_row, grads, global_step);
  check_cuda_contig(unique_ids, param, "unique_ids");
  TORCH_CHECK(unique_ids.scalar_type() == at::kLong, "unique_ids must be int64");
  TORCH_CHECK(unique_ids.dim() == 1 && unique_ids.size(0) == grads.size(0), "unique_ids [U] and grads [U, d]");
  const c10::cuda::CUDAGuard guard(param.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor flag = at::zeros({1}, unique_ids.options().dtype(at::kInt));
  ENGRAM_CUDA_OK(engram::launch_check_sorted_unique(unique_ids.data_ptr<int64_t>(), unique_ids.numel(),
                                                    param.size(0), flag.data_ptr<int>(), stream.stream()));
  TORCH_CHECK_VALUE(!flag_set(flag), "unique_ids must be sorted strictly increasing and inside [0, ", param.size(0),
                    ")");
  adam_launch(param, exp_avg, exp_avg_sq, step_per_row, unique_ids, unique_ids.numel(), grads, nullptr, nullptr,
              engram::AdamHyper{lr, beta1, beta2, eps, weight_decay, global_step});
}

at::Tensor sparse_adam_step_(at::Tensor param, at::Tensor exp_avg, at::Tensor exp_avg_sq, at::Tensor step_per_row,
                             const at::Tensor& row_ids, const at::Tensor& grads, double lr, double beta1,
                             double beta2, double eps, double weight_decay, int64_t global_step) {
  check_adam(param, exp_avg, exp_avg_sq, step_per_row, grads, global_step);
  check_cuda_contig(row_ids, param, "row_ids");
  check_index_dtype(row_ids, "row_ids");
  TORCH_CHECK(row_ids.dim() == 1 && row_ids.size(0) == grads.size(0), "row_ids [M] and grads [M, d]");
  Segments seg = sort_segments(row_ids, param.size(0));
  adam_launch(param, exp_avg, exp_avg_sq, step_per_row, seg.unique_ids, seg.num_unique, grads,
              seg.order.data_ptr<int64_t>(), seg.seg_starts.data_ptr<int64_t>(),
              engram::AdamHyper{lr, beta1, beta2, eps, weight_decay, global_step});
  return seg.unique_ids;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "Engram CUDA ops: fused multi-head gather, sort + segment reduce, fused row-sparse AdamW";
  mod.def("gather_rows_into", &gather_rows_into, "out[i] = table[ids[i]]");
  mod.def("multihead_gather_into", &multihead_gather_into, "out[n, h] = table[row_ids[n, h] + head_offsets[h]]");
  mod.def("segment_reduce", &segment_reduce, "(unique_ids, summed grads) of duplicate rows");
  mod.def("sparse_adam_update_", &sparse_adam_update_, "row-sparse AdamW in place on unique rows");
  mod.def("sparse_adam_step_", &sparse_adam_step_, "sort + segment reduce + row-sparse AdamW in place");
}
