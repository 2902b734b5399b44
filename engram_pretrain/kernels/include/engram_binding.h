// The torch-facing Engram ops over a launcher backend B, shared by the CUDA extension
// (cuda/engram_ops_binding.cpp: B launches the kernels of engram_ops.cu on the current stream) and the
// CPU grid emulation (emulation/engram_cuda_emulation.cpp: B runs the same per-element bodies over every
// (block, thread) of the same launch configurations). So the buffer sizing, the device-side counts and
// the error flags below run in the CPU suite exactly as on the GPU.
//
// B provides: Guard (device guard constructed from a c10::Device), check_tensor(t, like, name) (device
// and contiguity), gather(...), sort_temp_bytes(m, limit), sort_segments(...), segment_sum(...),
// sparse_adam(const AdamArgs&), check_sorted_unique(...) with the launchers' arguments of
// cuda/engram_ops.h (no stream); each throws on a launch error.
//
// Host syncs: a call with check=true reads its error flag back (one sync); segment_reduce and
// sparse_adam_step_ read the unique-row count to size their outputs (one sync). sparse_adam_step_nosync_
// and check=false calls never read anything back: counts stay on the device (launches sized by the
// lookups, an upper bound) and errors go to the caller's sticky flag.
#pragma once

#include <torch/csrc/utils/pybind.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <limits>
#include <vector>

#include "engram_checks.h"
#include "engram_kernels.h"

namespace engram {

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      TORCH_CHECK_VALUE(false, "unsupported dtype ", t);
  }
}

// float32 for 16-bit float gradients (summed in float32), else the gradients' dtype.
inline at::ScalarType accumulation_type(at::ScalarType t) {
  return (t == at::kBFloat16 || t == at::kHalf) ? at::kFloat : t;
}

// Duplicate segments of a sort, on the device: order [m], unique [m] (the first `count` valid),
// seg_starts [m + 1], count [1].
struct Segments {
  at::Tensor order, unique, seg_starts, count;
};

template <typename B>
struct BoundOps {
  static bool flag_set(const at::Tensor& flag) { return flag.item<int>() != 0; }  // host sync

  static void check_flag(const at::Tensor& flag, const at::Tensor& like) {
    B::check_tensor(flag, like, "bad_flag");
    TORCH_CHECK(flag.scalar_type() == at::kInt && flag.numel() == 1, "bad_flag must be int32 [1]");
  }

  static void gather(const at::Tensor& table, const at::Tensor& ids, const int64_t* offsets, int64_t num_heads,
                     at::Tensor& out, const at::Tensor& bad_flag, bool check) {
    const typename B::Guard guard(table.device());
    B::gather(table.data_ptr(), table.size(0), table.size(1) * table.element_size(), ids.data_ptr(),
              ids.scalar_type() == at::kInt, offsets, num_heads, ids.numel(), out.data_ptr(),
              bad_flag.data_ptr<int>());
    if (check) TORCH_CHECK_INDEX(!flag_set(bad_flag), "row id out of range for a table with ", table.size(0), " rows");
  }

  static void check_gather(const at::Tensor& table, const at::Tensor& ids, const at::Tensor& out,
                           const at::Tensor& bad_flag) {
    B::check_tensor(table, table, "table");
    B::check_tensor(ids, table, "ids");
    B::check_tensor(out, table, "out");
    check_flag(bad_flag, table);
    check_gather_shapes(table, ids, out);
  }

  static void gather_rows_into(const at::Tensor& table, const at::Tensor& ids, at::Tensor out, at::Tensor bad_flag,
                               bool check) {
    check_gather(table, ids, out, bad_flag);
    gather(table, ids, nullptr, 0, out, bad_flag, check);
  }

  static void multihead_gather_into(const at::Tensor& table, const at::Tensor& row_ids, const at::Tensor& head_offsets,
                                    at::Tensor out, at::Tensor bad_flag, bool check) {
    check_gather(table, row_ids, out, bad_flag);
    B::check_tensor(head_offsets, table, "head_offsets");
    TORCH_CHECK(head_offsets.scalar_type() == at::kLong, "head_offsets must be int64");
    const int64_t num_heads = head_offsets.numel();
    TORCH_CHECK(num_heads > 0 && row_ids.dim() >= 1 && row_ids.size(-1) == num_heads,
                "row_ids must end in H = head_offsets.numel()");
    gather(table, row_ids, head_offsets.data_ptr<int64_t>(), num_heads, out, bad_flag, check);
  }

  static Segments sort_segments(const at::Tensor& row_ids, int64_t limit, const at::Tensor& bad_flag) {
    const at::Tensor ids = row_ids.to(at::kLong).contiguous();
    const int64_t m = ids.numel();
    const typename B::Guard guard(ids.device());
    const auto opts = ids.options();
    const size_t temp_bytes = B::sort_temp_bytes(m, limit);
    at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, opts.dtype(at::kByte));
    at::Tensor order_in = at::empty({m}, opts), sorted = at::empty({m}, opts), order = at::empty({m}, opts);
    at::Tensor seg_pos = at::empty({m}, opts), unique = at::empty({m}, opts), seg_starts = at::empty({m + 1}, opts);
    at::Tensor count = at::empty({1}, opts);
    B::sort_segments(ids.data_ptr<int64_t>(), m, limit, temp.data_ptr(), temp_bytes, order_in.data_ptr<int64_t>(),
                     sorted.data_ptr<int64_t>(), order.data_ptr<int64_t>(), seg_pos.data_ptr<int64_t>(),
                     unique.data_ptr<int64_t>(), seg_starts.data_ptr<int64_t>(), count.data_ptr<int64_t>(),
                     bad_flag.data_ptr<int>());
    return {order, unique, seg_starts, count};
  }

  static std::vector<at::Tensor> segment_reduce(const at::Tensor& row_ids, const at::Tensor& grads) {
    B::check_tensor(row_ids, row_ids, "row_ids");
    B::check_tensor(grads, row_ids, "grads");
    check_index_dtype(row_ids, "row_ids");
    TORCH_CHECK(row_ids.dim() == 1 && grads.dim() == 2 && grads.size(0) == row_ids.size(0),
                "row_ids [M] and grads [M, d] expected");
    const DType gt = to_dtype(grads.scalar_type());
    at::Tensor flag = at::zeros({1}, row_ids.options().dtype(at::kInt));
    Segments seg = sort_segments(row_ids, std::numeric_limits<int64_t>::max(), flag);
    const int64_t u = seg.count.item<int64_t>();  // host sync: sizes the outputs
    TORCH_CHECK_INDEX(!flag_set(flag), "row ids must be >= 0");
    at::Tensor summed = at::empty({u, grads.size(1)}, grads.options().dtype(accumulation_type(grads.scalar_type())));
    const typename B::Guard guard(grads.device());
    B::segment_sum(grads.data_ptr(), gt, grads.size(1), seg.order.data_ptr<int64_t>(),
                   seg.seg_starts.data_ptr<int64_t>(), Count{nullptr, u}, u, summed.data_ptr());
    return {seg.unique.narrow(0, 0, u).clone(), summed};
  }

  static void check_adam(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                         const at::Tensor& step, const at::Tensor& grads, int64_t global_step) {
    B::check_tensor(param, param, "param");
    B::check_tensor(exp_avg, param, "exp_avg");
    B::check_tensor(exp_avg_sq, param, "exp_avg_sq");
    B::check_tensor(step, param, "step_per_row");
    B::check_tensor(grads, param, "grads");
    check_adam_shapes(param, exp_avg, exp_avg_sq, step, grads, global_step, /*low_precision_grads=*/true);
  }

  static void adam(at::Tensor& param, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& step,
                   const int64_t* unique_ids, Count num_unique, int64_t rows_bound, const at::Tensor& grads,
                   const int64_t* order, const int64_t* seg_starts, const AdamHyper& hyper, const at::Tensor& flag) {
    const typename B::Guard guard(param.device());
    const AdamArgs args{param.data_ptr(),       to_dtype(param.scalar_type()),  exp_avg.data_ptr(),
                        exp_avg_sq.data_ptr(),  to_dtype(exp_avg.scalar_type()), step.data_ptr(),
                        step.scalar_type() == at::kInt, param.size(0),  param.size(1),
                        unique_ids,             num_unique,                     rows_bound,
                        grads.data_ptr(),       to_dtype(grads.scalar_type()),  order,
                        seg_starts,             hyper,                          flag.data_ptr<int>()};
    B::sparse_adam(args);
  }

  static void sparse_adam_update_(at::Tensor param, at::Tensor exp_avg, at::Tensor exp_avg_sq, at::Tensor step_per_row,
                                  const at::Tensor& unique_ids, const at::Tensor& grads, double lr, double beta1,
                                  double beta2, double eps, double weight_decay, int64_t global_step,
                                  at::Tensor bad_flag, bool check) {
    check_adam(param, exp_avg, exp_avg_sq, step_per_row, grads, global_step);
    check_flag(bad_flag, param);
    B::check_tensor(unique_ids, param, "unique_ids");
    TORCH_CHECK(unique_ids.scalar_type() == at::kLong, "unique_ids must be int64");
    TORCH_CHECK(unique_ids.dim() == 1 && unique_ids.size(0) == grads.size(0), "unique_ids [U] and grads [U, d]");
    const int64_t u = unique_ids.numel();
    if (check) {
      const typename B::Guard guard(param.device());
      B::check_sorted_unique(unique_ids.data_ptr<int64_t>(), u, param.size(0), bad_flag.data_ptr<int>());
      TORCH_CHECK_VALUE(!flag_set(bad_flag), "unique_ids must be sorted strictly increasing and inside [0, ",
                        param.size(0), ")");
    }
    adam(param, exp_avg, exp_avg_sq, step_per_row, unique_ids.data_ptr<int64_t>(), Count{nullptr, u}, u, grads,
         nullptr, nullptr, AdamHyper{lr, beta1, beta2, eps, weight_decay, global_step}, bad_flag);
  }

  static void check_step(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                         const at::Tensor& step, const at::Tensor& row_ids, const at::Tensor& grads,
                         int64_t global_step) {
    check_adam(param, exp_avg, exp_avg_sq, step, grads, global_step);
    B::check_tensor(row_ids, param, "row_ids");
    check_index_dtype(row_ids, "row_ids");
    TORCH_CHECK(row_ids.dim() == 1 && row_ids.size(0) == grads.size(0), "row_ids [M] and grads [M, d]");
  }

  // Sort + segment reduce + AdamW; returns the touched rows [U] (one host sync for U and the id check).
  static at::Tensor sparse_adam_step_(at::Tensor param, at::Tensor exp_avg, at::Tensor exp_avg_sq,
                                      at::Tensor step_per_row, const at::Tensor& row_ids, const at::Tensor& grads,
                                      double lr, double beta1, double beta2, double eps, double weight_decay,
                                      int64_t global_step) {
    check_step(param, exp_avg, exp_avg_sq, step_per_row, row_ids, grads, global_step);
    at::Tensor flag = at::zeros({1}, param.options().dtype(at::kInt));
    Segments seg = sort_segments(row_ids, param.size(0), flag);
    const int64_t u = seg.count.item<int64_t>();
    TORCH_CHECK_INDEX(!flag_set(flag), "row ids must lie in [0, ", param.size(0), ")");
    adam(param, exp_avg, exp_avg_sq, step_per_row, seg.unique.data_ptr<int64_t>(), Count{nullptr, u}, u,
         grads, seg.order.data_ptr<int64_t>(), seg.seg_starts.data_ptr<int64_t>(),
         AdamHyper{lr, beta1, beta2, eps, weight_decay, global_step}, flag);
    return seg.unique.narrow(0, 0, u);
  }

  // The same without any host sync: the unique-row count stays on the device (returned, int64 [1]), the
  // launches are sized by the number of lookups, an id outside [0, R) raises the caller's sticky bad_flag
  // (its row is never written; the results of the call are then undefined).
  static at::Tensor sparse_adam_step_nosync_(at::Tensor param, at::Tensor exp_avg, at::Tensor exp_avg_sq,
                                             at::Tensor step_per_row, const at::Tensor& row_ids,
                                             const at::Tensor& grads, double lr, double beta1, double beta2,
                                             double eps, double weight_decay, int64_t global_step,
                                             at::Tensor bad_flag) {
    check_step(param, exp_avg, exp_avg_sq, step_per_row, row_ids, grads, global_step);
    check_flag(bad_flag, param);
    Segments seg = sort_segments(row_ids, param.size(0), bad_flag);
    adam(param, exp_avg, exp_avg_sq, step_per_row, seg.unique.data_ptr<int64_t>(),
         Count{seg.count.data_ptr<int64_t>(), 0}, row_ids.numel(), grads,
         seg.order.data_ptr<int64_t>(), seg.seg_starts.data_ptr<int64_t>(),
         AdamHyper{lr, beta1, beta2, eps, weight_decay, global_step}, bad_flag);
    return seg.count;
  }

  static void define(pybind11::module& mod) {
    mod.def("gather_rows_into", &gather_rows_into, "out[i] = table[ids[i]]");
    mod.def("multihead_gather_into", &multihead_gather_into, "out[n, h] = table[row_ids[n, h] + head_offsets[h]]");
    mod.def("segment_reduce", &segment_reduce, "(unique_ids, summed grads) of duplicate rows");
    mod.def("sparse_adam_update_", &sparse_adam_update_, "row-sparse AdamW in place on unique rows");
    mod.def("sparse_adam_step_", &sparse_adam_step_, "sort + segment reduce + row-sparse AdamW in place");
    mod.def("sparse_adam_step_nosync_", &sparse_adam_step_nosync_,
            "sort + segment reduce + row-sparse AdamW in place; device-side count, no host sync");
  }
};

}  // namespace engram
