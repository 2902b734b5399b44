// Engram CUDA kernels: fused multi-head gather with per-head offsets; backward sort (cub radix sort)
// + segment reduce of duplicate rows + fused row-sparse AdamW in place. Plain CUDA C++ (no torch
// headers): compile-checks with `nvcc -c -arch=sm_90 engram_ops.cu`. Build with --fmad=false so the
// update rounds exactly like the reference (no contraction into fused multiply-adds).
#include "engram_ops.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <cstdint>

namespace engram {
namespace {

constexpr int kThreads = 256;

inline unsigned grid_for(int64_t work, int threads) {
  int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65535LL * 32)));
}

template <typename index_t>
__device__ __forceinline__ int64_t load_id(const void* ids, int64_t i) {
  return static_cast<int64_t>(static_cast<const index_t*>(ids)[i]);
}

// Rows of vpr vectors of V bytes. threadIdx.x walks the vectors of a row, threadIdx.y picks the row
// within the block; grid-stride over rows (no per-element integer division).
template <typename V, typename index_t>
__global__ void gather_kernel(const V* __restrict__ table, int64_t num_rows, int64_t vpr, const void* __restrict__ ids,
                              const int64_t* __restrict__ offsets, int64_t num_heads, int64_t n, V* __restrict__ out,
                              int* __restrict__ bad_flag) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; i < n; i += stride) {
    const int64_t local = load_id<index_t>(ids, i);
    const int64_t row = num_heads > 0 ? local + offsets[i % num_heads] : local;
    const bool ok = local >= 0 && local < num_rows && row >= 0 && row < num_rows;
    V* dst = out + i * vpr;
    if (ok) {
      const V* src = table + row * vpr;
      for (int64_t c = threadIdx.x; c < vpr; c += blockDim.x) dst[c] = src[c];
    } else {
      for (int64_t c = threadIdx.x; c < vpr; c += blockDim.x) dst[c] = V{};
      if (threadIdx.x == 0) atomicExch(bad_flag, 1);
    }
  }
}

template <typename V>
cudaError_t gather_vec(const void* table, int64_t num_rows, int64_t row_bytes, const void* ids, bool ids_are_int32,
                       const int64_t* offsets, int64_t num_heads, int64_t n, void* out, int* bad_flag,
                       cudaStream_t stream) {
  const int64_t vpr = row_bytes / static_cast<int64_t>(sizeof(V));
  int lanes = 1;  // vector lanes per row: smallest power of two >= vpr, at most a warp
  while (lanes < 32 && lanes < vpr) lanes *= 2;
  const dim3 block(lanes, kThreads / lanes);
  const unsigned grid = grid_for(n, static_cast<int>(block.y));
  if (ids_are_int32) {
    gather_kernel<V, int32_t><<<grid, block, 0, stream>>>(static_cast<const V*>(table), num_rows, vpr, ids, offsets,
                                                          num_heads, n, static_cast<V*>(out), bad_flag);
  } else {
    gather_kernel<V, int64_t><<<grid, block, 0, stream>>>(static_cast<const V*>(table), num_rows, vpr, ids, offsets,
                                                          num_heads, n, static_cast<V*>(out), bad_flag);
  }
  return cudaGetLastError();
}

inline bool aligned_to(const void* p, int64_t row_bytes, size_t width) {
  return reinterpret_cast<uintptr_t>(p) % width == 0 && row_bytes % static_cast<int64_t>(width) == 0;
}

__global__ void iota_kernel(int64_t* out, int64_t m) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < m;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = i;
  }
}

// flags[j] = 1 where sorted[j] starts a new segment; flags ids outside [0, limit).
__global__ void head_flags_kernel(const int64_t* __restrict__ sorted, int64_t m, int64_t limit,
                                  int64_t* __restrict__ flags, int* __restrict__ bad_flag) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < m;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    flags[j] = (j == 0 || sorted[j] != sorted[j - 1]) ? 1 : 0;
    if (sorted[j] < 0 || sorted[j] >= limit) atomicExch(bad_flag, 1);
  }
}

// seg_pos = inclusive sum of the head flags: segment of j is seg_pos[j] - 1.
__global__ void scatter_segments_kernel(const int64_t* __restrict__ sorted, const int64_t* __restrict__ flags,
                                        const int64_t* __restrict__ seg_pos, int64_t m,
                                        int64_t* __restrict__ unique_ids, int64_t* __restrict__ seg_starts,
                                        int64_t* __restrict__ num_unique) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < m;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (flags[j]) {
      unique_ids[seg_pos[j] - 1] = sorted[j];
      seg_starts[seg_pos[j] - 1] = j;
    }
    if (j == m - 1) {
      seg_starts[seg_pos[j]] = m;
      *num_unique = seg_pos[j];
    }
  }
}

__global__ void zero_count_kernel(int64_t* seg_starts, int64_t* num_unique) {
  seg_starts[0] = 0;
  *num_unique = 0;
}

// Gradient of segment u, column c, summed in sorted (= occurrence) order.
template <typename scalar_t>
__device__ __forceinline__ scalar_t segment_value(const scalar_t* __restrict__ grads, int64_t d,
                                                  const int64_t* __restrict__ order,
                                                  const int64_t* __restrict__ seg_starts, int64_t u, int64_t c) {
  if (seg_starts == nullptr) return grads[u * d + c];
  scalar_t acc = scalar_t(0);
  for (int64_t j = seg_starts[u]; j < seg_starts[u + 1]; ++j) acc += grads[order[j] * d + c];
  return acc;
}

// One block per segment (grid-stride over segments), threads over columns.
template <typename scalar_t>
__global__ void segment_sum_kernel(const scalar_t* __restrict__ grads, int64_t d, const int64_t* __restrict__ order,
                                   const int64_t* __restrict__ seg_starts, int64_t num_unique,
                                   scalar_t* __restrict__ summed) {
  for (int64_t u = blockIdx.x; u < num_unique; u += gridDim.x) {
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      summed[u * d + c] = segment_value(grads, d, order, seg_starts, u, c);
    }
  }
}

// Parameter storage <-> compute type.
template <typename param_t, typename state_t>
struct ParamIO {
  __device__ __forceinline__ static state_t load(const param_t* p) { return static_cast<state_t>(*p); }
  __device__ __forceinline__ static void store(param_t* p, state_t w) { *p = static_cast<param_t>(w); }
};
template <>
struct ParamIO<__nv_bfloat16, float> {
  __device__ __forceinline__ static float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  __device__ __forceinline__ static void store(__nv_bfloat16* p, float w) { *p = __float2bfloat16_rn(w); }
};
template <>
struct ParamIO<__half, float> {
  __device__ __forceinline__ static float load(const __half* p) { return __half2float(*p); }
  __device__ __forceinline__ static void store(__half* p, float w) { *p = __float2half_rn(w); }
};

// One block per touched row (grid-stride over rows), threads over columns. Thread 0 bumps the row's
// step count; the block reads it from shared memory.
template <typename param_t, typename state_t, typename step_t>
__global__ void sparse_adam_kernel(param_t* __restrict__ param, state_t* __restrict__ exp_avg,
                                   state_t* __restrict__ exp_avg_sq, step_t* __restrict__ step_per_row, int64_t d,
                                   const int64_t* __restrict__ unique_ids, int64_t num_unique,
                                   const state_t* __restrict__ grads, const int64_t* __restrict__ order,
                                   const int64_t* __restrict__ seg_starts, AdamHyper h) {
  __shared__ int64_t step_sh;
  const state_t b1 = static_cast<state_t>(h.beta1), omb1 = static_cast<state_t>(1.0 - h.beta1);
  const state_t b2 = static_cast<state_t>(h.beta2), omb2 = static_cast<state_t>(1.0 - h.beta2);
  const state_t e = static_cast<state_t>(h.eps), lr = static_cast<state_t>(h.lr);
  const bool decay = h.weight_decay != 0.0;
  const state_t keep = static_cast<state_t>(1.0 - h.lr * h.weight_decay);
  for (int64_t u = blockIdx.x; u < num_unique; u += gridDim.x) {
    const int64_t r = unique_ids[u];
    if (threadIdx.x == 0) {
      const step_t s = step_per_row[r] + 1;
      step_per_row[r] = s;
      step_sh = static_cast<int64_t>(s);
    }
    __syncthreads();
    const double t = static_cast<double>(h.global_step > 0 ? h.global_step : step_sh);
    const state_t bc1 = static_cast<state_t>(1.0 - pow(h.beta1, t));
    const state_t bc2 = static_cast<state_t>(1.0 - pow(h.beta2, t));
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      const state_t g = segment_value(grads, d, order, seg_starts, u, c);
      const int64_t k = r * d + c;
      const state_t m = exp_avg[k] * b1 + g * omb1;
      const state_t v = exp_avg_sq[k] * b2 + (g * g) * omb2;
      const state_t update = (m / bc1) / (sqrt(v / bc2) + e);
      state_t w = ParamIO<param_t, state_t>::load(param + k);
      if (decay) w = w * keep;
      ParamIO<param_t, state_t>::store(param + k, w - lr * update);
      exp_avg[k] = m;
      exp_avg_sq[k] = v;
    }
    __syncthreads();  // step_sh is rewritten for the next row
  }
}

__global__ void check_sorted_unique_kernel(const int64_t* __restrict__ ids, int64_t n, int64_t num_rows,
                                           int* __restrict__ bad_flag) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (ids[i] < 0 || ids[i] >= num_rows || (i > 0 && ids[i] <= ids[i - 1])) atomicExch(bad_flag, 1);
  }
}

// Radix bits covering ids in [0, limit).
inline int end_bit_for(int64_t limit) {
  int bits = 1;
  while (bits < 63 && (int64_t{1} << bits) < limit) ++bits;
  return bits;
}

inline int column_threads(int64_t d) {
  const int64_t warps = (d + 31) / 32;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(warps, 1) * 32, kThreads));
}

inline unsigned segment_grid(int64_t num_unique) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(num_unique, 1LL << 30)));
}

}  // namespace

cudaError_t launch_gather(const void* table, int64_t num_rows, int64_t row_bytes, const void* ids, bool ids_are_int32,
                          const int64_t* offsets, int64_t num_heads, int64_t n, void* out, int* bad_flag,
                          cudaStream_t stream) {
  if (n == 0 || row_bytes == 0) return cudaSuccess;
  if (aligned_to(table, row_bytes, 16) && aligned_to(out, row_bytes, 16)) {
    return gather_vec<uint4>(table, num_rows, row_bytes, ids, ids_are_int32, offsets, num_heads, n, out, bad_flag,
                             stream);
  }
  if (aligned_to(table, row_bytes, 8) && aligned_to(out, row_bytes, 8)) {
    return gather_vec<uint2>(table, num_rows, row_bytes, ids, ids_are_int32, offsets, num_heads, n, out, bad_flag,
                             stream);
  }
  if (aligned_to(table, row_bytes, 4) && aligned_to(out, row_bytes, 4)) {
    return gather_vec<uint32_t>(table, num_rows, row_bytes, ids, ids_are_int32, offsets, num_heads, n, out,
                                bad_flag, stream);
  }
  if (aligned_to(table, row_bytes, 2) && aligned_to(out, row_bytes, 2)) {
    return gather_vec<uint16_t>(table, num_rows, row_bytes, ids, ids_are_int32, offsets, num_heads, n, out,
                                bad_flag, stream);
  }
  return gather_vec<uint8_t>(table, num_rows, row_bytes, ids, ids_are_int32, offsets, num_heads, n, out, bad_flag,
                             stream);
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
  const unsigned grid = grid_for(m, kThreads);
  iota_kernel<<<grid, kThreads, 0, stream>>>(order_in, m);
  cudaError_t err = cub::DeviceRadixSort::SortPairs(temp, temp_bytes, ids, sorted_ids, order_in, order, m, 0,
                                                    end_bit_for(limit), stream);
  if (err != cudaSuccess) return err;
  int64_t* flags = order_in;  // free after the sort
  head_flags_kernel<<<grid, kThreads, 0, stream>>>(sorted_ids, m, limit, flags, bad_flag);
  err = cub::DeviceScan::InclusiveSum(temp, temp_bytes, static_cast<const int64_t*>(flags), seg_pos, m, stream);
  if (err != cudaSuccess) return err;
  scatter_segments_kernel<<<grid, kThreads, 0, stream>>>(sorted_ids, flags, seg_pos, m, unique_ids, seg_starts,
                                                         num_unique);
  return cudaGetLastError();
}

cudaError_t launch_segment_sum(const void* grads, DType dtype, int64_t d, const int64_t* order,
                               const int64_t* seg_starts, int64_t num_unique, void* summed, cudaStream_t stream) {
  if (num_unique == 0 || d == 0) return cudaSuccess;
  const unsigned grid = segment_grid(num_unique);
  const int threads = column_threads(d);
  if (dtype == DType::kFloat32) {
    segment_sum_kernel<float><<<grid, threads, 0, stream>>>(static_cast<const float*>(grads), d, order, seg_starts,
                                                            num_unique, static_cast<float*>(summed));
  } else if (dtype == DType::kFloat64) {
    segment_sum_kernel<double><<<grid, threads, 0, stream>>>(static_cast<const double*>(grads), d, order,
                                                             seg_starts, num_unique, static_cast<double*>(summed));
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

namespace {

template <typename param_t, typename state_t>
cudaError_t adam_typed(void* param, void* exp_avg, void* exp_avg_sq, void* step_per_row, bool step_int32, int64_t d,
                       const int64_t* unique_ids, int64_t num_unique, const void* grads, const int64_t* order,
                       const int64_t* seg_starts, AdamHyper h, cudaStream_t stream) {
  const unsigned grid = segment_grid(num_unique);
  const int threads = column_threads(d);
  auto* p = static_cast<param_t*>(param);
  auto* m = static_cast<state_t*>(exp_avg);
  auto* v = static_cast<state_t*>(exp_avg_sq);
  const auto* g = static_cast<const state_t*>(grads);
  if (step_int32) {
    sparse_adam_kernel<param_t, state_t, int32_t><<<grid, threads, 0, stream>>>(
        p, m, v, static_cast<int32_t*>(step_per_row), d, unique_ids, num_unique, g, order, seg_starts, h);
  } else {
    sparse_adam_kernel<param_t, state_t, int64_t><<<grid, threads, 0, stream>>>(
        p, m, v, static_cast<int64_t*>(step_per_row), d, unique_ids, num_unique, g, order, seg_starts, h);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sparse_adam(void* param, DType param_dtype, void* exp_avg, void* exp_avg_sq, DType state_dtype,
                               void* step_per_row, bool step_int32, int64_t d, const int64_t* unique_ids,
                               int64_t num_unique, const void* grads, const int64_t* order,
                               const int64_t* seg_starts, AdamHyper hyper, cudaStream_t stream) {
  if (num_unique == 0) return cudaSuccess;
  if (state_dtype == DType::kFloat64 && param_dtype == DType::kFloat64) {
    return adam_typed<double, double>(param, exp_avg, exp_avg_sq, step_per_row, step_int32, d, unique_ids,
                                      num_unique, grads, order, seg_starts, hyper, stream);
  }
  if (state_dtype != DType::kFloat32) return cudaErrorInvalidValue;
  switch (param_dtype) {
    case DType::kFloat32:
      return adam_typed<float, float>(param, exp_avg, exp_avg_sq, step_per_row, step_int32, d, unique_ids,
                                      num_unique, grads, order, seg_starts, hyper, stream);
    case DType::kBFloat16:
      return adam_typed<__nv_bfloat16, float>(param, exp_avg, exp_avg_sq, step_per_row, step_int32, d, unique_ids,
                                              num_unique, grads, order, seg_starts, hyper, stream);
    case DType::kFloat16:
      return adam_typed<__half, float>(param, exp_avg, exp_avg_sq, step_per_row, step_int32, d, unique_ids,
                                       num_unique, grads, order, seg_starts, hyper, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t launch_check_sorted_unique(const int64_t* ids, int64_t n, int64_t num_rows, int* bad_flag,
                                       cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  check_sorted_unique_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(ids, n, num_rows, bad_flag);
  return cudaGetLastError();
}

}  // namespace engram
