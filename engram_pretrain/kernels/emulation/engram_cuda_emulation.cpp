// CPU grid emulation of the Engram CUDA kernels: a launcher backend of the shared torch-facing ops
// (include/engram_binding.h) that runs the per-element bodies of include/engram_kernels.h -- the ones
// the __global__ kernels of cuda/engram_ops.cu call -- over every (block, thread) of the launch
// configuration the CUDA launcher computes with the same functions, one thread after another. So the
// CUDA index arithmetic, bounds, grid-stride loops, dtype paths and device-side counts run in the CPU
// suite against the torch reference. Only cub's radix sort and scan are replaced by a stable sort on the
// same key bits and a sequential inclusive sum (same contract). See docs/kernels.md.
//
// Test hooks: set_reverse_order(true) runs blocks and threads in reverse order (results must not
// change: no body depends on another thread of its launch); gather_rows_window / sparse_adam_step_window_
// treat a tensor as rows [row_base, row_base + R) of a virtual table, so the bodies' int64 offsets of rows
// beyond 2^31 elements are exercised without allocating them.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "engram_binding.h"
#include "engram_kernels.h"

namespace {

using engram::LaunchConfig;
using engram::Thread;

bool g_reverse = false;

// Every (block, thread) of a launch: blocks in order, within a block threadIdx.y then threadIdx.x.
template <typename Body>
void run_grid(const LaunchConfig& c, Body&& body) {
  const int64_t threads = c.block_x * c.block_y;
  for (int64_t bi = 0; bi < c.grid; ++bi) {
    const int64_t b = g_reverse ? c.grid - 1 - bi : bi;
    for (int64_t ti = 0; ti < threads; ++ti) {
      const int64_t tl = g_reverse ? threads - 1 - ti : ti;
      body(Thread{b, c.grid, tl % c.block_x, tl / c.block_x, c.block_x, c.block_y});
    }
  }
}

template <typename V, typename index_t>
void gather_typed(const void* table, int64_t num_rows, int64_t row_bytes, const void* ids, const int64_t* offsets,
                  int64_t num_heads, int64_t n, void* out, int* bad_flag) {
  const int64_t vpr = row_bytes / static_cast<int64_t>(sizeof(V));
  run_grid(engram::gather_config(n, vpr), [&](const Thread& t) {
    engram::gather_rows_element<V, index_t>(t, static_cast<const V*>(table), num_rows, vpr,
                                            static_cast<const index_t*>(ids), offsets, num_heads, n,
                                            static_cast<V*>(out), bad_flag);
  });
}

template <typename param_t, typename state_t, typename grad_t, typename step_t>
void adam_typed(const engram::AdamArgs& a) {
  run_grid(engram::row_config(a.rows_bound, a.d), [&](const Thread& t) {
    engram::sparse_adam_element<param_t, state_t, grad_t, step_t>(
        t, static_cast<param_t*>(a.param), static_cast<state_t*>(a.exp_avg), static_cast<state_t*>(a.exp_avg_sq),
        static_cast<const step_t*>(a.step_per_row), a.num_rows, a.d, a.unique_ids, a.num_unique,
        static_cast<const grad_t*>(a.grads), a.order, a.seg_starts, a.hyper, a.bad_flag);
  });
  run_grid(engram::elementwise_config(a.rows_bound), [&](const Thread& t) {
    engram::bump_steps_element<step_t>(t, static_cast<step_t*>(a.step_per_row), a.num_rows, a.unique_ids,
                                       a.num_unique);
  });
}

struct EmulatedLaunchers {
  struct Guard {
    explicit Guard(c10::Device) {}
  };

  static void check_tensor(const at::Tensor& t, const at::Tensor& like, const char* name) {
    TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor (emulated CUDA ops)");
    TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  }

  static void gather(const void* table, int64_t num_rows, int64_t row_bytes, const void* ids, bool ids_are_int32,
                     const int64_t* offsets, int64_t num_heads, int64_t n, void* out, int* bad_flag) {
    if (n == 0 || row_bytes == 0) return;
    engram::with_vector_type(engram::gather_vector_bytes(table, out, row_bytes), [&](auto v) {
      engram::with_index_type(ids_are_int32, [&](auto i) {
        gather_typed<ENGRAM_T(v), ENGRAM_T(i)>(table, num_rows, row_bytes, ids, offsets, num_heads, n, out, bad_flag);
      });
    });
  }

  static size_t sort_temp_bytes(int64_t, int64_t) { return 1; }

  // launch_sort_segments with cub's SortPairs (stable, on key bits [0, end_bit)) and InclusiveSum emulated.
  static void sort_segments(const int64_t* ids, int64_t m, int64_t limit, void*, size_t, int64_t* order_in,
                            int64_t* sorted_ids, int64_t* order, int64_t* seg_pos, int64_t* unique_ids,
                            int64_t* seg_starts, int64_t* num_unique, int* bad_flag) {
    if (m == 0) {
      run_grid(LaunchConfig{1, 1, 1}, [&](const Thread& t) { engram::zero_count_element(t, seg_starts, num_unique); });
      return;
    }
    const LaunchConfig each = engram::elementwise_config(m);
    run_grid(each, [&](const Thread& t) { engram::iota_element(t, order_in, m); });
    const int end_bit = engram::end_bit_for(limit);
    const uint64_t mask = end_bit >= 64 ? ~uint64_t{0} : (uint64_t{1} << end_bit) - 1;
    std::vector<int64_t> perm(m);
    std::iota(perm.begin(), perm.end(), int64_t{0});
    std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) {
      return (static_cast<uint64_t>(ids[a]) & mask) < (static_cast<uint64_t>(ids[b]) & mask);
    });
    for (int64_t j = 0; j < m; ++j) {
      sorted_ids[j] = ids[perm[j]];
      order[j] = order_in[perm[j]];
    }
    int64_t* flags = order_in;  // free after the sort, as in the CUDA launcher
    run_grid(each, [&](const Thread& t) { engram::head_flags_element(t, sorted_ids, m, limit, flags, bad_flag); });
    int64_t sum = 0;
    for (int64_t j = 0; j < m; ++j) seg_pos[j] = (sum += flags[j]);
    run_grid(each, [&](const Thread& t) {
      engram::scatter_segments_element(t, sorted_ids, flags, seg_pos, m, unique_ids, seg_starts, num_unique);
    });
  }

  static void segment_sum(const void* grads, engram::DType dtype, int64_t d, const int64_t* order,
                          const int64_t* seg_starts, engram::Count num_unique, int64_t rows_bound, void* summed) {
    if (rows_bound == 0 || d == 0) return;
    const LaunchConfig c = engram::row_config(rows_bound, d);
    const bool ok = engram::with_grad_types(dtype, [&](auto acc, auto g) {
      using acc_t = ENGRAM_T(acc);
      using grad_t = ENGRAM_T(g);
      run_grid(c, [&](const Thread& t) {
        engram::segment_sum_element<acc_t, grad_t>(t, static_cast<const grad_t*>(grads), d, order, seg_starts,
                                                   num_unique, static_cast<acc_t*>(summed));
      });
    });
    TORCH_CHECK_VALUE(ok, "unsupported gradient dtype");
  }

  static void sparse_adam(const engram::AdamArgs& a) {
    if (a.rows_bound == 0) return;
    const bool ok = engram::with_adam_types(a, [&](auto p, auto s, auto g, auto st) {
      adam_typed<ENGRAM_T(p), ENGRAM_T(s), ENGRAM_T(g), ENGRAM_T(st)>(a);
    });
    TORCH_CHECK_VALUE(ok, "unsupported param/state/gradient dtype combination");
  }

  static void check_sorted_unique(const int64_t* ids, int64_t n, int64_t num_rows, int* bad_flag) {
    if (n == 0) return;
    run_grid(engram::elementwise_config(n),
             [&](const Thread& t) { engram::check_sorted_unique_element(t, ids, n, num_rows, bad_flag); });
  }
};

using Ops = engram::BoundOps<EmulatedLaunchers>;

// The pointer of row -row_base of `t` (rows of row_len elements): t then holds rows [row_base, row_base + R)
// of a virtual tensor that starts there. Only rows inside t are ever dereferenced (pointer arithmetic of a
// wrong width would land outside and read wrong data or fault).
char* virtual_base(const at::Tensor& t, int64_t row_base) {
  return static_cast<char*>(t.data_ptr()) - row_base * t.size(1) * t.element_size();
}

// gather_rows_into on a window: ids address rows of the virtual table [0, row_base + R).
void gather_rows_window(const at::Tensor& table, const at::Tensor& ids, at::Tensor out, at::Tensor bad_flag,
                        int64_t row_base) {
  Ops::check_gather(table, ids, out, bad_flag);
  EmulatedLaunchers::gather(virtual_base(table, row_base), row_base + table.size(0), table.size(1) * table.element_size(),
                            ids.data_ptr(), ids.scalar_type() == at::kInt, nullptr, 0, ids.numel(), out.data_ptr(),
                            bad_flag.data_ptr<int>());
}

// sparse_adam_step_nosync_ on windows: param/state/steps hold rows [row_base, row_base + R) of virtual
// tensors; row_ids address the virtual rows. Returns the unique-row count [1].
at::Tensor sparse_adam_step_window_(at::Tensor param, at::Tensor exp_avg, at::Tensor exp_avg_sq,
                                    at::Tensor step_per_row, const at::Tensor& row_ids, const at::Tensor& grads,
                                    double lr, double beta1, double beta2, double eps, double weight_decay,
                                    int64_t global_step, at::Tensor bad_flag, int64_t row_base) {
  Ops::check_step(param, exp_avg, exp_avg_sq, step_per_row, row_ids, grads, global_step);
  Ops::check_flag(bad_flag, param);
  const int64_t rows = row_base + param.size(0);
  engram::Segments seg = Ops::sort_segments(row_ids, rows, bad_flag);
  char* steps = static_cast<char*>(step_per_row.data_ptr()) - row_base * step_per_row.element_size();
  const engram::AdamArgs args{virtual_base(param, row_base), engram::to_dtype(param.scalar_type()),
                              virtual_base(exp_avg, row_base), virtual_base(exp_avg_sq, row_base),
                              engram::to_dtype(exp_avg.scalar_type()), steps, step_per_row.scalar_type() == at::kInt,
                              rows, param.size(1), seg.unique.data_ptr<int64_t>(),
                              engram::Count{seg.count.data_ptr<int64_t>(), 0}, row_ids.numel(), grads.data_ptr(),
                              engram::to_dtype(grads.scalar_type()), seg.order.data_ptr<int64_t>(),
                              seg.seg_starts.data_ptr<int64_t>(),
                              engram::AdamHyper{lr, beta1, beta2, eps, weight_decay, global_step},
                              bad_flag.data_ptr<int>()};
  EmulatedLaunchers::sparse_adam(args);
  return seg.count;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "CPU grid emulation of the Engram CUDA kernels (same bodies and launch configurations)";
  Ops::define(mod);
  mod.def("set_reverse_order", [](bool reverse) { g_reverse = reverse; }, "run blocks and threads in reverse order");
  mod.def("gather_rows_window", &gather_rows_window, "gather_rows_into on rows [row_base, row_base + R)");
  mod.def("sparse_adam_step_window_", &sparse_adam_step_window_,
          "sparse_adam_step_nosync_ on state rows [row_base, row_base + R)");
  mod.def("launch_config", [](const std::string& kind, int64_t work, int64_t width) {
    const LaunchConfig c = kind == "gather" ? engram::gather_config(work, width)
                         : kind == "rows"   ? engram::row_config(work, width)
                                            : engram::elementwise_config(work);
    return std::vector<int64_t>{c.grid, c.block_x, c.block_y};
  }, "launch configuration (grid, block.x, block.y) of a kernel kind: gather | rows | elementwise");
}
