// Per-element bodies and launch configurations of the Engram CUDA kernels, shared by the CUDA launchers
// (cuda/engram_ops.cu: each __global__ kernel builds the thread's `Thread` from the built-ins and calls a
// body) and the CPU grid emulation (emulation/engram_cuda_emulation.cpp: runs the same bodies over every
// (block, thread) of the same launch configuration). Plain C++17, no torch and no CUDA runtime headers,
// so it compiles with standalone nvcc and with the host compiler alike. Semantics: kernels/reference.py;
// design: docs/kernels.md ("Shared kernel bodies").
//
// Rules every body follows, so that running the threads one after another on a CPU computes what the GPU
// computes in parallel:
// - no shared memory and no __syncthreads(): a body reads nothing another thread of the same launch
//   writes (cross-thread dependencies are split into separate launches, e.g. the row-step bump);
// - every output element is written by exactly one thread, except the sticky error flag (set to 1 only);
// - all index arithmetic is int64 (`Thread` holds the built-ins as int64).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define ENGRAM_HD __host__ __device__
#define ENGRAM_INLINE __forceinline__
#else
#define ENGRAM_HD
#define ENGRAM_INLINE inline
#endif

namespace engram {

// ------------------------------------------------------------------------------------ launch geometry

// The built-ins one thread sees (the dimensions the kernels use), widened to int64.
struct Thread {
  int64_t block_x, grid_x;          // blockIdx.x, gridDim.x
  int64_t thread_x, thread_y;       // threadIdx.x, threadIdx.y
  int64_t block_dim_x, block_dim_y;  // blockDim.x, blockDim.y
};

// A 1-D grid of 2-D blocks.
struct LaunchConfig {
  int64_t grid;
  int64_t block_x, block_y;
};

constexpr int64_t kThreads = 256;
constexpr int64_t kMaxGrid = 65535LL * 32;  // grid-stride loops cover the rest
constexpr int64_t kMaxRowGrid = 1LL << 30;  // one block per row, grid-stride beyond

inline int64_t grid_for(int64_t work, int64_t per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  return blocks < 1 ? 1 : (blocks > kMaxGrid ? kMaxGrid : blocks);
}

// Gather of n rows of vpr vectors: threadIdx.x over the vectors of a row (a power of two <= 32 lanes),
// threadIdx.y over the rows of the block.
inline LaunchConfig gather_config(int64_t n, int64_t vpr) {
  int64_t lanes = 1;
  while (lanes < 32 && lanes < vpr) lanes *= 2;
  const int64_t rows_per_block = kThreads / lanes;
  return {grid_for(n, rows_per_block), lanes, rows_per_block};
}

// One thread per element of m.
inline LaunchConfig elementwise_config(int64_t m) { return {grid_for(m, kThreads), kThreads, 1}; }

// One block per row (rows: the number of rows or an upper bound of it), threads over the d columns.
inline LaunchConfig row_config(int64_t rows, int64_t d) {
  const int64_t warps = (d + 31) / 32;
  const int64_t threads = warps < 1 ? 32 : (warps * 32 > kThreads ? kThreads : warps * 32);
  const int64_t grid = rows < 1 ? 1 : (rows > kMaxRowGrid ? kMaxRowGrid : rows);
  return {grid, threads, 1};
}

// A count known on the host (ptr == nullptr) or only on the device (read by every thread that needs it):
// the number of unique rows of a sort stays on the device, the launch uses an upper bound.
struct Count {
  const int64_t* ptr;
  int64_t value;
  ENGRAM_HD ENGRAM_INLINE int64_t get() const { return ptr != nullptr ? *ptr : value; }
};

// Sticky error flag (device int the caller zeroed): only ever set to 1.
ENGRAM_HD ENGRAM_INLINE void raise_flag(int* flag) {
#if defined(__CUDA_ARCH__)
  atomicExch(flag, 1);
#else
  __atomic_store_n(flag, 1, __ATOMIC_RELAXED);
#endif
}

// ------------------------------------------------------------------------------------------ dtypes

// 16-bit float storage (the bit layout of torch's BFloat16 / Half).
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

// Vector types of the row copies (16 and 8 bytes: CUDA's uint4/uint2 on the device).
#if defined(__CUDACC__)
using Vec16 = uint4;
using Vec8 = uint2;
#else
struct alignas(16) Vec16 {
  uint32_t x, y, z, w;
};
struct alignas(8) Vec8 {
  uint32_t x, y;
};
#endif

ENGRAM_HD ENGRAM_INLINE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

ENGRAM_HD ENGRAM_INLINE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// Conversions: CUDA intrinsics on the device; on the host the bit routines torch's c10 types use. Both
// round to nearest even.
ENGRAM_HD ENGRAM_INLINE float to_float(bf16_t x) {
#if defined(__CUDA_ARCH__)
  return __bfloat162float(__ushort_as_bfloat16(x.bits));
#else
  return bits_float(static_cast<uint32_t>(x.bits) << 16);
#endif
}

ENGRAM_HD ENGRAM_INLINE bf16_t to_bf16(float f) {
#if defined(__CUDA_ARCH__)
  return {__bfloat16_as_ushort(__float2bfloat16_rn(f))};
#else
  if (f != f) return {0x7FC0};
  const uint32_t u = float_bits(f);
  return {static_cast<uint16_t>((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16)};
#endif
}

ENGRAM_HD ENGRAM_INLINE float to_float(fp16_t x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#else
  const uint32_t w = static_cast<uint32_t>(x.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
  return bits_float(sign | (two_w < (1u << 27) ? float_bits(denormalized) : float_bits(normalized)));
#endif
}

ENGRAM_HD ENGRAM_INLINE fp16_t to_fp16(float f) {
#if defined(__CUDA_ARCH__)
  return {__half_as_ushort(__float2half_rn(f))};
#else
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return {static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
#endif
}

// load<T>(x): x in compute type T (float/double); store(p, w): w rounded to p's storage type.
template <typename T>
ENGRAM_HD ENGRAM_INLINE T load(float x) {
  return static_cast<T>(x);
}
template <typename T>
ENGRAM_HD ENGRAM_INLINE T load(double x) {
  return static_cast<T>(x);
}
template <typename T>
ENGRAM_HD ENGRAM_INLINE T load(bf16_t x) {
  return static_cast<T>(to_float(x));
}
template <typename T>
ENGRAM_HD ENGRAM_INLINE T load(fp16_t x) {
  return static_cast<T>(to_float(x));
}
ENGRAM_HD ENGRAM_INLINE void store(float* p, float w) { *p = w; }
ENGRAM_HD ENGRAM_INLINE void store(double* p, double w) { *p = w; }
ENGRAM_HD ENGRAM_INLINE void store(bf16_t* p, float w) { *p = to_bf16(w); }
ENGRAM_HD ENGRAM_INLINE void store(fp16_t* p, float w) { *p = to_fp16(w); }

ENGRAM_HD ENGRAM_INLINE float sqrt_of(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}
ENGRAM_HD ENGRAM_INLINE double sqrt_of(double x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}
ENGRAM_HD ENGRAM_INLINE double pow_of(double b, double e) {
#if defined(__CUDA_ARCH__)
  return ::pow(b, e);
#else
  return std::pow(b, e);
#endif
}

// ---------------------------------------------------------------------------------------- gathers

// out[i] = table[ids[i] + (num_heads ? offsets[i % num_heads] : 0)], rows of vpr vectors V; grid-stride
// over rows i. An id outside [0, num_rows) (or an offset row outside it) zero-fills its output row and
// raises bad_flag.
template <typename V, typename index_t>
ENGRAM_HD ENGRAM_INLINE void gather_rows_element(const Thread& t, const V* __restrict__ table, int64_t num_rows,
                                                 int64_t vpr, const index_t* __restrict__ ids,
                                                 const int64_t* __restrict__ offsets, int64_t num_heads, int64_t n,
                                                 V* __restrict__ out, int* __restrict__ bad_flag) {
  const int64_t stride = t.grid_x * t.block_dim_y;
  for (int64_t i = t.block_x * t.block_dim_y + t.thread_y; i < n; i += stride) {
    const int64_t local = static_cast<int64_t>(ids[i]);
    const int64_t row = num_heads > 0 ? local + offsets[i % num_heads] : local;
    const bool ok = local >= 0 && local < num_rows && row >= 0 && row < num_rows;
    V* dst = out + i * vpr;
    if (ok) {
      const V* src = table + row * vpr;
      for (int64_t c = t.thread_x; c < vpr; c += t.block_dim_x) dst[c] = src[c];
    } else {
      for (int64_t c = t.thread_x; c < vpr; c += t.block_dim_x) dst[c] = V{};
      if (t.thread_x == 0) raise_flag(bad_flag);
    }
  }
}

// ------------------------------------------------------------------------- sort into segments

// Elementwise grid-stride loop index of thread t.
#define ENGRAM_FOR_EACH(t, i, n) \
  for (int64_t i = (t).block_x * (t).block_dim_x + (t).thread_x; i < (n); i += (t).grid_x * (t).block_dim_x)

ENGRAM_HD ENGRAM_INLINE void iota_element(const Thread& t, int64_t* __restrict__ out, int64_t m) {
  ENGRAM_FOR_EACH(t, i, m) { out[i] = i; }
}

// flags[j] = 1 where sorted[j] starts a new segment; ids outside [0, limit) raise bad_flag.
ENGRAM_HD ENGRAM_INLINE void head_flags_element(const Thread& t, const int64_t* __restrict__ sorted, int64_t m,
                                                int64_t limit, int64_t* __restrict__ flags,
                                                int* __restrict__ bad_flag) {
  ENGRAM_FOR_EACH(t, j, m) {
    flags[j] = (j == 0 || sorted[j] != sorted[j - 1]) ? 1 : 0;
    if (sorted[j] < 0 || sorted[j] >= limit) raise_flag(bad_flag);
  }
}

// seg_pos = inclusive sum of the head flags (segment of j: seg_pos[j] - 1) -> unique ids, segment starts
// (seg_starts[U] = m) and the count U, all on the device.
ENGRAM_HD ENGRAM_INLINE void scatter_segments_element(const Thread& t, const int64_t* __restrict__ sorted,
                                                      const int64_t* __restrict__ flags,
                                                      const int64_t* __restrict__ seg_pos, int64_t m,
                                                      int64_t* __restrict__ unique_ids,
                                                      int64_t* __restrict__ seg_starts,
                                                      int64_t* __restrict__ num_unique) {
  ENGRAM_FOR_EACH(t, j, m) {
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

// m == 0: no segments.
ENGRAM_HD ENGRAM_INLINE void zero_count_element(const Thread& t, int64_t* seg_starts, int64_t* num_unique) {
  if (t.block_x == 0 && t.thread_x == 0 && t.thread_y == 0) {
    seg_starts[0] = 0;
    *num_unique = 0;
  }
}

// Radix bits covering ids in [0, limit) (the sort looks at these bits only).
inline int end_bit_for(int64_t limit) {
  int bits = 1;
  while (bits < 63 && (int64_t{1} << bits) < limit) ++bits;
  return bits;
}

// ---------------------------------------------------------------------- segment reduce, Adam

// Gradient of segment u, column c, in acc_t: grads[u] (order == nullptr), else the sum of the segment's
// gradients in sorted (= occurrence) order from +0.
template <typename acc_t, typename grad_t>
ENGRAM_HD ENGRAM_INLINE acc_t segment_value(const grad_t* __restrict__ grads, int64_t d,
                                            const int64_t* __restrict__ order,
                                            const int64_t* __restrict__ seg_starts, int64_t u, int64_t c) {
  if (order == nullptr) return load<acc_t>(grads[u * d + c]);
  acc_t acc = acc_t(0);
  for (int64_t j = seg_starts[u]; j < seg_starts[u + 1]; ++j) acc += load<acc_t>(grads[order[j] * d + c]);
  return acc;
}

// summed[u] = segment u's gradient; one block per segment (grid-stride), threads over columns.
template <typename acc_t, typename grad_t>
ENGRAM_HD ENGRAM_INLINE void segment_sum_element(const Thread& t, const grad_t* __restrict__ grads, int64_t d,
                                                 const int64_t* __restrict__ order,
                                                 const int64_t* __restrict__ seg_starts, Count num_unique,
                                                 acc_t* __restrict__ summed) {
  const int64_t nu = num_unique.get();
  for (int64_t u = t.block_x; u < nu; u += t.grid_x) {
    for (int64_t c = t.thread_x; c < d; c += t.block_dim_x) {
      summed[u * d + c] = segment_value<acc_t>(grads, d, order, seg_starts, u, c);
    }
  }
}

struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay;
  int64_t global_step;  // > 0: bias-correction step of every row; 0: the row's own step count + 1
};

// Floating dtypes the launchers take through void pointers (the bindings map torch dtypes onto these).
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// One row-sparse AdamW launch (sparse_adam_element + bump_steps_element). Row u < num_unique takes
// unique_ids[u]; its gradient is grads[u] (order == seg_starts == nullptr) or the sum over segment u of
// grads[order[j]]. rows_bound >= num_unique sizes the launch (the number of lookups when the count only
// exists on the device).
struct AdamArgs {
  void* param;
  DType param_dtype;
  void* exp_avg;
  void* exp_avg_sq;
  DType state_dtype;
  void* step_per_row;
  bool step_int32;
  int64_t num_rows, d;
  const int64_t* unique_ids;
  Count num_unique;
  int64_t rows_bound;
  const void* grads;
  DType grad_dtype;
  const int64_t* order;
  const int64_t* seg_starts;
  AdamHyper hyper;
  int* bad_flag;
};

// Row-sparse AdamW (reference.py) on rows unique_ids[u], u < num_unique: one block per row (grid-stride),
// threads over columns. Reads the row's step count (t = step + 1); the bump itself is the next launch
// (bump_steps_element), so no thread writes what another reads. Rows outside [0, num_rows) are skipped
// and raise bad_flag. State in state_t; param stored as param_t (state_t or a 16-bit float with float
// state); gradients read as grad_t (state_t or bf16/fp16) and summed in state_t.
template <typename param_t, typename state_t, typename grad_t, typename step_t>
ENGRAM_HD ENGRAM_INLINE void sparse_adam_element(const Thread& t, param_t* __restrict__ param,
                                                 state_t* __restrict__ exp_avg, state_t* __restrict__ exp_avg_sq,
                                                 const step_t* __restrict__ step_per_row, int64_t num_rows,
                                                 int64_t d, const int64_t* __restrict__ unique_ids,
                                                 Count num_unique, const grad_t* __restrict__ grads,
                                                 const int64_t* __restrict__ order,
                                                 const int64_t* __restrict__ seg_starts, AdamHyper h,
                                                 int* __restrict__ bad_flag) {
  const state_t b1 = static_cast<state_t>(h.beta1), omb1 = static_cast<state_t>(1.0 - h.beta1);
  const state_t b2 = static_cast<state_t>(h.beta2), omb2 = static_cast<state_t>(1.0 - h.beta2);
  const state_t e = static_cast<state_t>(h.eps), lr = static_cast<state_t>(h.lr);
  const bool decay = h.weight_decay != 0.0;
  const state_t keep = static_cast<state_t>(1.0 - h.lr * h.weight_decay);
  const int64_t nu = num_unique.get();
  for (int64_t u = t.block_x; u < nu; u += t.grid_x) {
    const int64_t r = unique_ids[u];
    if (r < 0 || r >= num_rows) {
      if (t.thread_x == 0) raise_flag(bad_flag);
      continue;
    }
    const double step = h.global_step > 0 ? static_cast<double>(h.global_step)
                                          : static_cast<double>(static_cast<int64_t>(step_per_row[r]) + 1);
    const state_t bc1 = static_cast<state_t>(1.0 - pow_of(h.beta1, step));
    const state_t bc2 = static_cast<state_t>(1.0 - pow_of(h.beta2, step));
    for (int64_t c = t.thread_x; c < d; c += t.block_dim_x) {
      const state_t g = segment_value<state_t>(grads, d, order, seg_starts, u, c);
      const int64_t k = r * d + c;
      const state_t m = exp_avg[k] * b1 + g * omb1;
      const state_t v = exp_avg_sq[k] * b2 + (g * g) * omb2;
      const state_t update = (m / bc1) / (sqrt_of(v / bc2) + e);
      state_t w = load<state_t>(param[k]);
      if (decay) w = w * keep;
      store(param + k, static_cast<state_t>(w - lr * update));
      exp_avg[k] = m;
      exp_avg_sq[k] = v;
    }
  }
}

// ------------------------------------------------------------------- dtype paths of a launch

// with_*(..., f): calls f with Type<T>{} tags of the storage/compute types a launch uses (the .cu
// launchers and the emulation instantiate the same bodies for the same dtype combinations); false when
// the combination is unsupported.
template <typename T>
struct Type {
  using type = T;
};
#define ENGRAM_T(tag) typename decltype(tag)::type

// Copy unit of a row gather: the widest of 16, 8, 4, 2, 1 bytes both pointers and the row size align to.
inline int gather_vector_bytes(const void* table, const void* out, int64_t row_bytes) {
  for (int width : {16, 8, 4, 2}) {
    if (reinterpret_cast<uintptr_t>(table) % width == 0 && reinterpret_cast<uintptr_t>(out) % width == 0 &&
        row_bytes % width == 0) {
      return width;
    }
  }
  return 1;
}

template <typename F>
void with_vector_type(int bytes, F&& f) {
  switch (bytes) {
    case 16:
      return f(Type<Vec16>{});
    case 8:
      return f(Type<Vec8>{});
    case 4:
      return f(Type<uint32_t>{});
    case 2:
      return f(Type<uint16_t>{});
    default:
      return f(Type<uint8_t>{});
  }
}

template <typename F>
void with_index_type(bool ids_are_int32, F&& f) {
  if (ids_are_int32) return f(Type<int32_t>{});
  return f(Type<int64_t>{});
}

// Segment sums: f(Type<acc_t>, Type<grad_t>); 16-bit gradients are summed in float.
template <typename F>
bool with_grad_types(DType grads, F&& f) {
  switch (grads) {
    case DType::kFloat32:
      return f(Type<float>{}, Type<float>{}), true;
    case DType::kFloat64:
      return f(Type<double>{}, Type<double>{}), true;
    case DType::kBFloat16:
      return f(Type<float>{}, Type<bf16_t>{}), true;
    case DType::kFloat16:
      return f(Type<float>{}, Type<fp16_t>{}), true;
  }
  return false;
}

// Row-sparse Adam: f(Type<param_t>, Type<state_t>, Type<grad_t>, Type<step_t>). float64 state: float64
// param and gradients; float32 state: float32/bf16/fp16 param and float32/bf16/fp16 gradients.
template <typename F>
bool with_adam_types(const AdamArgs& a, F&& f) {
  auto steps = [&](auto p, auto s, auto g) {
    if (a.step_int32) {
      f(p, s, g, Type<int32_t>{});
    } else {
      f(p, s, g, Type<int64_t>{});
    }
    return true;
  };
  if (a.state_dtype == DType::kFloat64) {
    if (a.param_dtype != DType::kFloat64 || a.grad_dtype != DType::kFloat64) return false;
    return steps(Type<double>{}, Type<double>{}, Type<double>{});
  }
  if (a.state_dtype != DType::kFloat32) return false;
  auto grads = [&](auto p) {
    switch (a.grad_dtype) {
      case DType::kFloat32:
        return steps(p, Type<float>{}, Type<float>{});
      case DType::kBFloat16:
        return steps(p, Type<float>{}, Type<bf16_t>{});
      case DType::kFloat16:
        return steps(p, Type<float>{}, Type<fp16_t>{});
      default:
        return false;
    }
  };
  switch (a.param_dtype) {
    case DType::kFloat32:
      return grads(Type<float>{});
    case DType::kBFloat16:
      return grads(Type<bf16_t>{});
    case DType::kFloat16:
      return grads(Type<fp16_t>{});
    default:
      return false;
  }
}

// step_per_row[unique_ids[u]] += 1 for u < num_unique (ids unique: one thread per row).
template <typename step_t>
ENGRAM_HD ENGRAM_INLINE void bump_steps_element(const Thread& t, step_t* __restrict__ step_per_row,
                                                int64_t num_rows, const int64_t* __restrict__ unique_ids,
                                                Count num_unique) {
  const int64_t nu = num_unique.get();
  ENGRAM_FOR_EACH(t, u, nu) {
    const int64_t r = unique_ids[u];
    if (r >= 0 && r < num_rows) step_per_row[r] = static_cast<step_t>(step_per_row[r] + 1);
  }
}

// bad_flag unless ids [n] are strictly increasing and inside [0, num_rows).
ENGRAM_HD ENGRAM_INLINE void check_sorted_unique_element(const Thread& t, const int64_t* __restrict__ ids, int64_t n,
                                                         int64_t num_rows, int* __restrict__ bad_flag) {
  ENGRAM_FOR_EACH(t, i, n) {
    if (ids[i] < 0 || ids[i] >= num_rows || (i > 0 && ids[i] <= ids[i - 1])) raise_flag(bad_flag);
  }
}

}  // namespace engram
