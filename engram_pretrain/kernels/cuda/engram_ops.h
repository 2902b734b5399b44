// Host launchers of the Engram CUDA kernels: plain CUDA C++ (raw device pointers, no torch), so the
// kernels compile-check with standalone nvcc. The per-element bodies and launch configurations live in
// include/engram_kernels.h (shared with the CPU grid emulation). The torch binding
// (engram_ops_binding.cpp) allocates every buffer (including cub temp storage) and calls these on the
// current stream. Semantics: engram_pretrain/kernels/reference.py.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "engram_kernels.h"

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
// only) and their duplicate segments, all left on the device:
//   order[j]        position in ids of the j-th smallest id (ties in order of occurrence)
//   unique_ids[u]   u-th distinct id (ascending), u < *num_unique
//   seg_starts[u]   first j of segment u; seg_starts[*num_unique] = m
// Buffers (device): order_in, sorted_ids, order, seg_pos: [m]; unique_ids: [m]; seg_starts: [m + 1];
// num_unique: [1]. An id outside [0, limit) sets *bad_flag = 1 (results then undefined).
cudaError_t launch_sort_segments(const int64_t* ids, int64_t m, int64_t limit, void* temp, size_t temp_bytes,
                                 int64_t* order_in, int64_t* sorted_ids, int64_t* order, int64_t* seg_pos,
                                 int64_t* unique_ids, int64_t* seg_starts, int64_t* num_unique, int* bad_flag,
                                 cudaStream_t stream);

// summed[u] = sum_{j in segment u} grads[order[j]] (in sorted order) for u < num_unique (rows_bound >=
// num_unique sizes the launch). grads kFloat32/kFloat64 (summed in their dtype) or kBFloat16/kFloat16
// (summed in float32; summed is float32).
cudaError_t launch_segment_sum(const void* grads, DType grad_dtype, int64_t d, const int64_t* order,
                               const int64_t* seg_starts, Count num_unique, int64_t rows_bound, void* summed,
                               cudaStream_t stream);

// Row-sparse AdamW in place (reference.py), then the step bump of the touched rows (AdamArgs). State
// kFloat32/kFloat64; param of the state dtype, or kBFloat16/kFloat16 with kFloat32 state; grads of the
// state dtype or (float32 state) bf16/fp16. Returns cudaErrorInvalidValue for an unsupported combination.
cudaError_t launch_sparse_adam(const AdamArgs& args, cudaStream_t stream);

// *bad_flag = 1 unless ids [n] are strictly increasing and inside [0, num_rows).
cudaError_t launch_check_sorted_unique(const int64_t* ids, int64_t n, int64_t num_rows, int* bad_flag,
                                       cudaStream_t stream);

}  // namespace engram
