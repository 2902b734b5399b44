// Host launchers of the Engram CUDA kernels: plain CUDA C++ (raw device pointers, no torch), so the
// kernels compile-check with standalone nvcc. The torch binding (engram_ops_binding.cpp) allocates
// every buffer (including cub temp storage) and calls these on the current stream.
// Semantics: engram_pretrain/kernels/reference.py.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace engram {

// out[i] = table[ids[i] + (num_heads ? offsets[i % num_heads] : 0)] for i < n, rows of row_bytes bytes.
// An id outside [0, num_rows) (or a per-head id outside [0, num_rows)) zero-fills its output row and
// sets *bad_flag = 1 (bad_flag: device int the caller zeroed). ids are int64 or int32 (ids_are_int32).
cudaError_t launch_gather(const void* table, int64_t num_rows, int64_t row_bytes, const void* ids, bool ids_are_int32,
                          const int64_t* offsets, int64_t num_heads, int64_t n, void* out, int* bad_flag,
                          cudaStream_t stream);

// Bytes of temp storage launch_sort_segments needs for m ids below limit.
size_t sort_segments_temp_bytes(int64_t m, int64_t limit);

// Stable radix sort of ids [m] (int64, expected in [0, limit); the sort looks at the bits of limit - 1
// only) and their duplicate segments:
//   order[j]        position in ids of the j-th smallest id (ties in order of occurrence)
//   unique_ids[u]   u-th distinct id (ascending), u < *num_unique
//   seg_starts[u]   first j of segment u; seg_starts[*num_unique] = m
// Buffers (device): order_in, sorted_ids, order, seg_pos: [m]; unique_ids: [m]; seg_starts: [m + 1];
// num_unique: [1]. An id outside [0, limit) sets *bad_flag = 1 (results then undefined).
cudaError_t launch_sort_segments(const int64_t* ids, int64_t m, int64_t limit, void* temp, size_t temp_bytes,
                                 int64_t* order_in, int64_t* sorted_ids, int64_t* order, int64_t* seg_pos,
                                 int64_t* unique_ids, int64_t* seg_starts, int64_t* num_unique, int* bad_flag,
                                 cudaStream_t stream);

// Floating dtypes the launchers take through void pointers (the binding maps torch dtypes onto these).
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// summed[u] = sum_{j in segment u} grads[order[j]] (in sorted order); dtype kFloat32 or kFloat64.
cudaError_t launch_segment_sum(const void* grads, DType dtype, int64_t d, const int64_t* order,
                               const int64_t* seg_starts, int64_t num_unique, void* summed, cudaStream_t stream);

struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay;
  int64_t global_step;  // > 0: bias-correction step of every row; 0: the row's own step count
};

// Row-sparse AdamW in place (reference.py) on rows unique_ids[u], u < num_unique. State (exp_avg,
// exp_avg_sq, grads) has state_dtype (kFloat32/kFloat64); param has state_dtype, or kBFloat16/kFloat16
// with kFloat32 state. step_per_row is int32 (step_int32) or int64. The gradient of row u is
// sum_{j in segment u} grads[order[j]]; with order == nullptr and seg_starts == nullptr, grads[u].
// Returns cudaErrorInvalidValue for an unsupported dtype pair.
cudaError_t launch_sparse_adam(void* param, DType param_dtype, void* exp_avg, void* exp_avg_sq, DType state_dtype,
                               void* step_per_row, bool step_int32, int64_t d, const int64_t* unique_ids,
                               int64_t num_unique, const void* grads, const int64_t* order,
                               const int64_t* seg_starts, AdamHyper hyper, cudaStream_t stream);

// *bad_flag = 1 unless ids [n] are strictly increasing and inside [0, num_rows).
cudaError_t launch_check_sorted_unique(const int64_t* ids, int64_t n, int64_t num_rows, int* bad_flag,
                                       cudaStream_t stream);

}  // namespace engram
