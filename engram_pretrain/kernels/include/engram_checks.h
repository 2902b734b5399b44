// Argument checks shared by the C++ CPU ops (cpp/engram_cpu_ops.cpp) and the CUDA binding
// (cuda/engram_ops_binding.cpp): dtypes and shapes. Each binding checks the device and contiguity of its
// tensors itself (CPU vs CUDA on the table's device), then calls these.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace engram {

inline void check_index_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name, " must be int64 or int32");
}

// table [R, d], ids int32/int64, out of table's dtype with ids.numel() * d elements.
inline void check_gather_shapes(const at::Tensor& table, const at::Tensor& ids, const at::Tensor& out) {
  check_index_dtype(ids, "ids");
  TORCH_CHECK(table.dim() == 2, "table must be [R, d]");
  TORCH_CHECK(out.scalar_type() == table.scalar_type(), "out dtype must equal table dtype");
  TORCH_CHECK(out.numel() == ids.numel() * table.size(1), "out must hold ids.numel() * d elements");
}

// Row-sparse Adam: param [R, d] (float64 with float64 state, or float32/bfloat16/float16 with float32
// state), moments like param, grads [*, d] of the state dtype (or, with low_precision_grads and float32
// state, bfloat16/float16: the kernels sum them in float32) and step_per_row int32/int64 [R];
// global_step >= 0.
inline void check_adam_shapes(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                              const at::Tensor& step, const at::Tensor& grads, int64_t global_step,
                              bool low_precision_grads = false) {
  TORCH_CHECK(param.dim() == 2, "param must be [R, d]");
  const auto st = exp_avg.scalar_type(), pt = param.scalar_type();
  TORCH_CHECK_VALUE((st == at::kDouble && pt == at::kDouble) ||
                        (st == at::kFloat && (pt == at::kFloat || pt == at::kBFloat16 || pt == at::kHalf)),
                    "param/state dtypes must be float64/float64, or float32/bfloat16/float16 with float32 state");
  TORCH_CHECK(exp_avg.sizes() == param.sizes() && exp_avg_sq.sizes() == param.sizes(), "state shape != param");
  const auto gt = grads.scalar_type();
  const bool low = gt == at::kBFloat16 || gt == at::kHalf;
  const bool grads_ok = gt == st || (low_precision_grads && st == at::kFloat && low);
  TORCH_CHECK(exp_avg_sq.scalar_type() == st && grads_ok, "exp_avg_sq and grads need the state dtype");
  TORCH_CHECK((step.scalar_type() == at::kLong || step.scalar_type() == at::kInt) && step.numel() == param.size(0),
              "step_per_row must be int32/int64 [R]");
  TORCH_CHECK(grads.dim() == 2 && grads.size(1) == param.size(1), "grads must be [*, d]");
  TORCH_CHECK_VALUE(global_step >= 0, "global_step must be >= 0 (0: per-row bias correction)");
}

}  // namespace engram
