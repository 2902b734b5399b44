// Engram CUDA kernels: thin __global__ wrappers around the per-element bodies of
// include/engram_kernels.h (shared with the CPU grid emulation, emulation/engram_cuda_emulation.cpp) and
// the host launchers of engram_ops.h, which pick the launch configuration with the same shared functions.
// Only the radix sort and the scan (cub) are CUDA-specific. Plain CUDA C++ (no torch headers):
// compile-checks with `nvcc -c -arch=sm_90 -I../include engram_ops.cu`. Build with --fmad=false so the
// update rounds exactly like the reference (no contraction into fused multiply-adds).
#include "engram_ops.h"

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <cstdint>

#include "engram_kernels.h"

namespace engram {
namespace {

__device__ __forceinline__ Thread this_thread() {
  return {static_cast<int64_t>(blockIdx.x), static_cast<int64_t>(gridDim.x), static_cast<int64_t>(threadIdx.x),
          static_cast<int64_t>(threadIdx.y), static_cast<int64_t>(blockDim.x), static_cast<int64_t>(blockDim.y)};
}

inline dim3 grid_of(const LaunchConfig& c) { return dim3(static_cast<unsigned>(c.grid)); }
inline dim3 block_of(const LaunchConfig& c) {
  return dim3(static_cast<unsigned>(c.block_x), static_cast<unsigned>(c.block_y));
}

template <typename V, typename index_t>
__global__ void gather_kernel(const V* __restrict__ table, int64_t num_rows, int64_t vpr,
                              const index_t* __restrict__ ids, const int64_t* __restrict__ offsets,
                              int64_t num_heads, int64_t n, V* __restrict__ out, int* __restrict__ bad_flag) {
  gather_rows_element<V, index_t>(this_thread(), table, num_rows, vpr, ids, offsets, num_heads, n, out, bad_flag);
}

__global__ void iota_kernel(int64_t* out, int64_t m) { iota_element(this_thread(), out, m); }

__global__ void head_flags_kernel(const int64_t* sorted, int64_t m, int64_t limit, int64_t* flags, int* bad_flag) {
  head_flags_element(this_thread(), sorted, m, limit, flags, bad_flag);
}

__global__ void scatter_segments_kernel(const int64_t* sorted, const int64_t* flags, const int64_t* seg_pos,
                                        int64_t m, int64_t* unique_ids, int64_t* seg_starts,
                                        int64_t* num_unique) {
  scatter_segments_element(this_thread(), sorted, flags, seg_pos, m, unique_ids, seg_starts, num_unique);
}

__global__ void zero_count_kernel(int64_t* seg_starts, int64_t* num_unique) {
  zero_count_element(this_thread(), seg_starts, num_unique);
}

template <typename acc_t, typename grad_t>
__global__ void segment_sum_kernel(const grad_t* grads, int64_t d, const int64_t* order, const int64_t* seg_starts,
                                   Count num_unique, acc_t* summed) {
  segment_sum_element<acc_t, grad_t>(this_thread(), grads, d, order, seg_starts, num_unique, summed);
}

template <typename param_t, typename state_t, typename grad_t, typename step_t>
__global__ void sparse_adam_kernel(param_t* param, state_t* exp_avg, state_t* exp_avg_sq, const step_t* steps,
                                   int64_t num_rows, int64_t d, const int64_t* unique_ids, Count num_unique,
                                   const grad_t* grads, const int64_t* order, const int64_t* seg_starts,
                                   AdamHyper h, int* bad_flag) {
  sparse_adam_element<param_t, state_t, grad_t, step_t>(this_thread(), param, exp_avg, exp_avg_sq, steps, num_rows,
                                                        d, unique_ids, num_unique, grads, order, seg_starts, h,
                                                        bad_flag);
}

template <typename step_t>
__global__ void bump_steps_kernel(step_t* steps, int64_t num_rows, const int64_t* unique_ids, Count num_unique) {
  bump_steps_element<step_t>(this_thread(), steps, num_rows, unique_ids, num_unique);
}

__global__ void check_sorted_unique_kernel(const int64_t* ids, int64_t n, int64_t num_rows, int* bad_flag) {
  check_sorted_unique_element(this_thread(), ids, n, num_rows, bad_flag);
}

template <typename V, typename index_t>
cudaError_t gather_typed(const void* table, int64_t num_rows, int64_t row_bytes, const void* ids,
                         const int64_t* offsets, int64_t num_heads, int64_t n, void* out, int* bad_flag,
                         cudaStream_t stream) {
  const int64_t vpr = row_bytes / static_cast<int64_t>(sizeof(V));
  const LaunchConfig c = gather_config(n, vpr);
  gather_kernel<V, index_t><<<grid_of(c), block_of(c), 0, stream>>>(static_cast<const V*>(table), num_rows, vpr,
                                                                    static_cast<const index_t*>(ids), offsets,
                                                                    num_heads, n, static_cast<V*>(out), bad_flag);
  return cudaGetLastError();
}

template <typename param_t, typename state_t, typename grad_t, typename step_t>
cudaError_t adam_typed(const AdamArgs& a, cudaStream_t stream) {
  const LaunchConfig rows = row_config(a.rows_bound, a.d);
  sparse_adam_kernel<param_t, state_t, grad_t, step_t><<<grid_of(rows), block_of(rows), 0, stream>>>(
      static_cast<param_t*>(a.param), static_cast<state_t*>(a.exp_avg), static_cast<state_t*>(a.exp_avg_sq),
      static_cast<const step_t*>(a.step_per_row), a.num_rows, a.d, a.unique_ids, a.num_unique,
      static_cast<const grad_t*>(a.grads), a.order, a.seg_starts, a.hyper, a.bad_flag);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const LaunchConfig each = elementwise_config(a.rows_bound);  // after the update: it reads the old steps
  bump_steps_kernel<step_t><<<grid_of(each), block_of(each), 0, stream>>>(
      static_cast<step_t*>(a.step_per_row), a.num_rows, a.unique_ids, a.num_unique);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gather(const void* table, int64_t num_rows, int64_t row_bytes, const void* ids, bool ids_are_int32,
                          const int64_t* offsets, int64_t num_heads, int64_t n, void* out, int* bad_flag,
                          cudaStream_t stream) {
  if (n == 0 || row_bytes == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  with_vector_type(gather_vector_bytes(table, out, row_bytes), [&](auto v) {
    with_index_type(ids_are_int32, [&](auto i) {
      err = gather_typed<ENGRAM_T(v), ENGRAM_T(i)>(table, num_rows, row_bytes, ids, offsets, num_heads, n, out,
                                                   bad_flag, stream);
    });
  });
  return err;
}

size_t sort_segments_temp_bytes(int64_t m, int64_t limit) {
  const int end_bit = end_bit_for(limit);
  size_t sort_bytes = 0, scan_bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const int64_t*>(nullptr),
                                  static_cast<int64_t*>(nullptr), static_cast<const int64_t*>(nullptr),
                                  static_cast<int64_t*>(nullptr), m, 0, end_bit);
  cub::DeviceScan::InclusiveSum(nullptr, scan_bytes, static_cast<const int64_t*>(nullptr),
                                static_cast<int64_t*>(nullptr), m);
  return std::max<size_t>(std::max(sort_bytes, scan_bytes), 1);
}

cudaError_t launch_sort_segments(const int64_t* ids, int64_t m, int64_t limit, void* temp, size_t temp_bytes,
                                 int64_t* order_in, int64_t* sorted_ids, int64_t* order, int64_t* seg_pos,
                                 int64_t* unique_ids, int64_t* seg_starts, int64_t* num_unique, int* bad_flag,
                                 cudaStream_t stream) {
  if (m == 0) {
    zero_count_kernel<<<1, 1, 0, stream>>>(seg_starts, num_unique);
    return cudaGetLastError();
  }
  const LaunchConfig each = elementwise_config(m);
  iota_kernel<<<grid_of(each), block_of(each), 0, stream>>>(order_in, m);
  cudaError_t err = cub::DeviceRadixSort::SortPairs(temp, temp_bytes, ids, sorted_ids, order_in, order, m, 0,
                                                    end_bit_for(limit), stream);
  if (err != cudaSuccess) return err;
  int64_t* flags = order_in;  // free after the sort
  head_flags_kernel<<<grid_of(each), block_of(each), 0, stream>>>(sorted_ids, m, limit, flags, bad_flag);
  err = cub::DeviceScan::InclusiveSum(temp, temp_bytes, static_cast<const int64_t*>(flags), seg_pos, m, stream);
  if (err != cudaSuccess) return err;
  scatter_segments_kernel<<<grid_of(each), block_of(each), 0, stream>>>(sorted_ids, flags, seg_pos, m, unique_ids,
                                                                        seg_starts, num_unique);
  return cudaGetLastError();
}

cudaError_t launch_segment_sum(const void* grads, DType grad_dtype, int64_t d, const int64_t* order,
                               const int64_t* seg_starts, Count num_unique, int64_t rows_bound, void* summed,
                               cudaStream_t stream) {
  if (rows_bound == 0 || d == 0) return cudaSuccess;
  const LaunchConfig c = row_config(rows_bound, d);
  const bool ok = with_grad_types(grad_dtype, [&](auto acc, auto g) {
    using acc_t = ENGRAM_T(acc);
    using grad_t = ENGRAM_T(g);
    segment_sum_kernel<acc_t, grad_t><<<grid_of(c), block_of(c), 0, stream>>>(
        static_cast<const grad_t*>(grads), d, order, seg_starts, num_unique, static_cast<acc_t*>(summed));
  });
  return ok ? cudaGetLastError() : cudaErrorInvalidValue;
}

cudaError_t launch_sparse_adam(const AdamArgs& a, cudaStream_t stream) {
  if (a.rows_bound == 0) return cudaSuccess;
  cudaError_t err = cudaSuccess;
  const bool ok = with_adam_types(a, [&](auto p, auto s, auto g, auto st) {
    err = adam_typed<ENGRAM_T(p), ENGRAM_T(s), ENGRAM_T(g), ENGRAM_T(st)>(a, stream);
  });
  return ok ? err : cudaErrorInvalidValue;
}

cudaError_t launch_check_sorted_unique(const int64_t* ids, int64_t n, int64_t num_rows, int* bad_flag,
                                       cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const LaunchConfig each = elementwise_config(n);
  check_sorted_unique_kernel<<<grid_of(each), block_of(each), 0, stream>>>(ids, n, num_rows, bad_flag);
  return cudaGetLastError();
}

}  // namespace engram
