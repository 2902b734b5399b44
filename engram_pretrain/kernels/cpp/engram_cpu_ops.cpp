// CPU ops for host-resident Engram tables (OpenMP, parallel over rows).
//
// Semantics are defined by engram_pretrain/kernels/reference.py; the Python wrappers in
// dispatch.py validate shapes/dtypes, these functions re-check what memory safety depends on.
// Every parallel loop uses at::get_num_threads() threads (torch.set_num_threads controls it).
// Light headers instead of <torch/extension.h> (halves the build time): pybind11 + Tensor casters.
#include <torch/csrc/utils/pybind.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <utility>
#include <vector>

#include "engram_checks.h"

namespace {

using engram::check_index_dtype;

void check_cpu_contig(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Rows are read in random order (hashed ids), which hardware prefetchers cannot predict: request the
// row kPrefetchAhead iterations ahead (at most kPrefetchBytes of it).
constexpr int64_t kPrefetchAhead = 8;
constexpr int64_t kPrefetchBytes = 1024;
// Rows per OpenMP work item: dynamic scheduling keeps a descheduled thread (shared machines) from
// stalling the whole loop; results do not depend on the schedule (rows are independent).
constexpr int64_t kChunk = 256;

inline void prefetch_row(const void* row, int64_t bytes, bool write = false) {
  const char* p = static_cast<const char*>(row);
  const int64_t n = std::min(bytes, kPrefetchBytes);
  for (int64_t off = 0; off < n; off += 64) {
    if (write) {
      __builtin_prefetch(p + off, 1);
    } else {
      __builtin_prefetch(p + off, 0);
    }
  }
}

// Copy rows table[ids[i * H + h] + offsets[h]] -> out[i * H + h] for i < n / H, h < H (H = num_heads;
// H == 0: no offsets, one row per id). Returns whether every id is in range; an offending flat id (its
// output row zero-filled) goes to *bad_row.
template <typename index_t>
bool gather_impl(const char* table, int64_t num_rows, int64_t row_bytes, const index_t* ids,
                 const int64_t* offsets, int64_t num_heads, int64_t n, char* out, int64_t* bad_row) {
  std::atomic<bool> any_bad{false};
  std::atomic<int64_t> bad{0};
  const int64_t heads = num_heads > 0 ? num_heads : 1;
  const int64_t groups = n / heads;
  const int64_t ahead_groups = (kPrefetchAhead + heads - 1) / heads;
  const int nt = at::get_num_threads();
#pragma omp parallel for num_threads(nt) schedule(dynamic, kChunk)
  for (int64_t i = 0; i < groups; ++i) {
    if (i + ahead_groups < groups) {
      for (int64_t hd = 0; hd < heads; ++hd) {
        const int64_t ahead = static_cast<int64_t>(ids[(i + ahead_groups) * heads + hd]) +
                              (num_heads > 0 ? offsets[hd] : 0);
        if (ahead >= 0 && ahead < num_rows) prefetch_row(table + ahead * row_bytes, row_bytes);
      }
    }
    for (int64_t hd = 0; hd < heads; ++hd) {
      const int64_t j = i * heads + hd;
      const int64_t local = static_cast<int64_t>(ids[j]);
      const int64_t row = num_heads > 0 ? local + offsets[hd] : local;
      if (local < 0 || local >= num_rows || row < 0 || row >= num_rows) {
        if (!any_bad.exchange(true)) bad.store(row);
        std::memset(out + j * row_bytes, 0, row_bytes);
        continue;
      }
      std::memcpy(out + j * row_bytes, table + row * row_bytes, row_bytes);
    }
  }
  *bad_row = bad.load();
  return !any_bad.load();
}

bool gather_dispatch(const at::Tensor& table, const at::Tensor& ids, const int64_t* offsets, int64_t num_heads,
                     at::Tensor& out, int64_t* bad_row) {
  const int64_t row_bytes = table.size(1) * table.element_size();
  const char* tp = static_cast<const char*>(table.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  if (ids.scalar_type() == at::kLong) {
    return gather_impl<int64_t>(tp, table.size(0), row_bytes, ids.data_ptr<int64_t>(), offsets, num_heads,
                                ids.numel(), op, bad_row);
  }
  return gather_impl<int32_t>(tp, table.size(0), row_bytes, ids.data_ptr<int32_t>(), offsets, num_heads,
                              ids.numel(), op, bad_row);
}

void check_gather_args(const at::Tensor& table, const at::Tensor& ids, const at::Tensor& out) {
  check_cpu_contig(table, "table");
  check_cpu_contig(ids, "ids");
  check_cpu_contig(out, "out");
  engram::check_gather_shapes(table, ids, out);
}

}  // namespace

// out[i, :] = table[ids[i], :]; out is preallocated (e.g. pinned) with ids.numel() * d elements.
void gather_rows_into(const at::Tensor& table, const at::Tensor& ids, at::Tensor out) {
  check_gather_args(table, ids, out);
  int64_t bad = 0;
  const bool ok = gather_dispatch(table, ids, nullptr, 0, out, &bad);
  TORCH_CHECK_INDEX(ok, "row id ", bad, " out of range for a table with ", table.size(0), " rows");
}

// out[n, h, :] = table[row_ids[n, h] + head_offsets[h], :] with row_ids [N, H] (any leading shape).
void multihead_gather_into(const at::Tensor& table, const at::Tensor& row_ids, const at::Tensor& head_offsets,
                           at::Tensor out) {
  check_gather_args(table, row_ids, out);
  check_cpu_contig(head_offsets, "head_offsets");
  TORCH_CHECK(head_offsets.scalar_type() == at::kLong, "head_offsets must be int64");
  const int64_t num_heads = head_offsets.numel();
  TORCH_CHECK(num_heads > 0 && row_ids.dim() >= 1 && row_ids.size(-1) == num_heads,
              "row_ids must end in H = head_offsets.numel()");
  int64_t bad = 0;
  const bool ok = gather_dispatch(table, row_ids, head_offsets.data_ptr<int64_t>(), num_heads, out, &bad);
  TORCH_CHECK_INDEX(ok, "row id + head offset ", bad, " out of range for a table with ", table.size(0),
                    " rows");
}

namespace {

// Duplicate rows of a lookup batch: keys sorted ascending (stable: equal ids keep their order of
// occurrence), order[j] = position in the batch of the j-th sorted key, segment u covers sorted
// positions seg[u] .. seg[u + 1] (seg has U + 1 entries).
struct Segments {
  std::vector<int64_t> keys, order, seg;
  int64_t count() const { return static_cast<int64_t>(seg.size()) - 1; }
};

constexpr int kRadixBits = 11;
constexpr int64_t kSmallSort = 256;

// Stable LSD radix sort of (keys, order) by keys in [0, max_key], 11 bits per pass.
void radix_sort_pairs(std::vector<int64_t>& keys, std::vector<int64_t>& order, int64_t max_key) {
  const int64_t m = static_cast<int64_t>(keys.size());
  std::vector<int64_t> keys2(m), order2(m), count(int64_t{1} << kRadixBits);
  const int64_t mask = (int64_t{1} << kRadixBits) - 1;
  for (int shift = 0; shift < 63 && (max_key >> shift) > 0; shift += kRadixBits) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < m; ++i) ++count[(keys[i] >> shift) & mask];
    int64_t sum = 0;
    for (auto& c : count) {
      const int64_t n = c;
      c = sum;
      sum += n;
    }
    for (int64_t i = 0; i < m; ++i) {
      const int64_t pos = count[(keys[i] >> shift) & mask]++;
      keys2[pos] = keys[i];
      order2[pos] = order[i];
    }
    keys.swap(keys2);
    order.swap(order2);
  }
}

template <typename index_t>
Segments sort_segments(const index_t* ids, int64_t m) {
  Segments s;
  s.keys.resize(m);
  s.order.resize(m);
  int64_t max_key = 0;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t k = static_cast<int64_t>(ids[i]);
    TORCH_CHECK_INDEX(k >= 0, "negative row id ", k);
    s.keys[i] = k;
    s.order[i] = i;
    max_key = std::max(max_key, k);
  }
  if (m <= kSmallSort) {
    std::stable_sort(s.order.begin(), s.order.end(), [&](int64_t a, int64_t b) { return s.keys[a] < s.keys[b]; });
    for (int64_t j = 0; j < m; ++j) s.keys[j] = static_cast<int64_t>(ids[s.order[j]]);
  } else {
    radix_sort_pairs(s.keys, s.order, max_key);
  }
  for (int64_t j = 0; j < m; ++j) {
    if (j == 0 || s.keys[j] != s.keys[j - 1]) s.seg.push_back(j);
  }
  s.seg.push_back(m);
  return s;
}

Segments segments_of(const at::Tensor& row_ids) {
  if (row_ids.scalar_type() == at::kLong) return sort_segments<int64_t>(row_ids.data_ptr<int64_t>(), row_ids.numel());
  return sort_segments<int32_t>(row_ids.data_ptr<int32_t>(), row_ids.numel());
}

// acc = sum of grads[order[j]] for j in [begin, end), in that order, starting from +0.
template <typename scalar_t>
void segment_sum(const scalar_t* grads, int64_t d, const int64_t* order, int64_t begin, int64_t end,
                 scalar_t* acc) {
  for (int64_t c = 0; c < d; ++c) acc[c] = scalar_t(0);
  for (int64_t j = begin; j < end; ++j) {
    if (j + kPrefetchAhead < end) {  // long segments (hot rows); callers prefetch the next segments
      prefetch_row(grads + order[j + kPrefetchAhead] * d, d * static_cast<int64_t>(sizeof(scalar_t)));
    }
    const scalar_t* g = grads + order[j] * d;
    for (int64_t c = 0; c < d; ++c) acc[c] += g[c];
  }
}

struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay;
  int64_t global_step;  // > 0: bias-correction step of every row; 0: the row's own step
};

// Read-increment-write of a row's step count (int32 or int64 storage).
inline int64_t bump_step(void* steps, bool int32, int64_t r) {
  if (int32) {
    int32_t* s = static_cast<int32_t*>(steps) + r;
    return *s += 1;
  }
  int64_t* s = static_cast<int64_t*>(steps) + r;
  return *s += 1;
}

// One row of AdamW computed in state_t, parameter stored as param_t (reference.py: same operations in
// the same order, no contraction into fused multiply-adds).
template <typename param_t, typename state_t>
inline void adam_row(param_t* __restrict__ p, state_t* __restrict__ m, state_t* __restrict__ v,
                     const state_t* __restrict__ g, int64_t d, state_t bc1, state_t bc2, const AdamHyper& h) {
  const state_t b1 = static_cast<state_t>(h.beta1), omb1 = static_cast<state_t>(1.0 - h.beta1);
  const state_t b2 = static_cast<state_t>(h.beta2), omb2 = static_cast<state_t>(1.0 - h.beta2);
  const state_t e = static_cast<state_t>(h.eps), lr = static_cast<state_t>(h.lr);
  const bool decay = h.weight_decay != 0.0;
  const state_t keep = static_cast<state_t>(1.0 - h.lr * h.weight_decay);
  for (int64_t c = 0; c < d; ++c) {
    const state_t gc = g[c];
    const state_t mc = m[c] * b1 + gc * omb1;
    const state_t vc = v[c] * b2 + (gc * gc) * omb2;
    const state_t update = (mc / bc1) / (std::sqrt(vc / bc2) + e);
    state_t w = static_cast<state_t>(p[c]);
    if (decay) w = w * keep;
    p[c] = static_cast<param_t>(w - lr * update);
    m[c] = mc;
    v[c] = vc;
  }
}

template <typename scalar_t>
void segment_reduce_impl(const at::Tensor& grads, const Segments& seg, int64_t* unique, at::Tensor& summed) {
  const int64_t u = seg.count(), d = grads.size(1);
  const scalar_t* gp = grads.data_ptr<scalar_t>();
  scalar_t* sp = summed.data_ptr<scalar_t>();
  const int nt = at::get_num_threads();
#pragma omp parallel for num_threads(nt) schedule(dynamic, kChunk)
  for (int64_t k = 0; k < u; ++k) {
    if (k + kPrefetchAhead < u) {
      prefetch_row(gp + seg.order[seg.seg[k + kPrefetchAhead]] * d, d * static_cast<int64_t>(sizeof(scalar_t)));
    }
    unique[k] = seg.keys[seg.seg[k]];
    segment_sum<scalar_t>(gp, d, seg.order.data(), seg.seg[k], seg.seg[k + 1], sp + k * d);
  }
}

// Bias corrections (1 - beta1^t, 1 - beta2^t) rounded to state_t, t = the global step or the row's step.
// Per-row steps are tabulated up to the largest step when that takes no more pow() calls than rows.
template <typename state_t>
class BiasCorrections {
 public:
  BiasCorrections(const AdamHyper& h, const void* steps, bool steps32, const int64_t* ids, int64_t u) : h_(h) {
    if (h.global_step > 0) {
      fixed_ = true;
      fixed1_ = value(h.beta1, h.global_step);
      fixed2_ = value(h.beta2, h.global_step);
      return;
    }
    int64_t max_t = 0;  // largest step after this update
    for (int64_t k = 0; k < u; ++k) {
      const int64_t r = ids[k];
      const int64_t s = steps32 ? static_cast<const int32_t*>(steps)[r] : static_cast<const int64_t*>(steps)[r];
      max_t = std::max(max_t, s + 1);
    }
    if (max_t <= std::max<int64_t>(u, 64)) {
      table1_.resize(max_t + 1);
      table2_.resize(max_t + 1);
      for (int64_t t = 1; t <= max_t; ++t) {
        table1_[t] = value(h.beta1, t);
        table2_[t] = value(h.beta2, t);
      }
    }
  }

  void get(int64_t step, state_t& bc1, state_t& bc2) const {
    if (fixed_) {
      bc1 = fixed1_;
      bc2 = fixed2_;
    } else if (step < static_cast<int64_t>(table1_.size())) {
      bc1 = table1_[step];
      bc2 = table2_[step];
    } else {
      bc1 = value(h_.beta1, step);
      bc2 = value(h_.beta2, step);
    }
  }

 private:
  static state_t value(double beta, int64_t t) {
    return static_cast<state_t>(1.0 - std::pow(beta, static_cast<double>(t)));
  }

  const AdamHyper& h_;
  bool fixed_ = false;
  state_t fixed1_{}, fixed2_{};
  std::vector<state_t> table1_, table2_;
};

// AdamW on rows ids[k], k < u. Row k's gradient: grads[k] when order == nullptr, else the sum over
// segment k of the sorted lookups (order/seg from sort_segments), accumulated per thread.
template <typename param_t, typename state_t>
void adam_rows_impl(at::Tensor& param, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& step_per_row,
                    const int64_t* ids, int64_t u, const at::Tensor& grads, const int64_t* order, const int64_t* seg,
                    const AdamHyper& h) {
  const int64_t d = param.size(1);
  param_t* p = static_cast<param_t*>(param.data_ptr());
  state_t* m = exp_avg.data_ptr<state_t>();
  state_t* v = exp_avg_sq.data_ptr<state_t>();
  void* steps = step_per_row.data_ptr();
  const bool steps32 = step_per_row.scalar_type() == at::kInt;
  const state_t* g = grads.data_ptr<state_t>();
  const BiasCorrections<state_t> bias(h, steps, steps32, ids, u);
  const int nt = at::get_num_threads();
#pragma omp parallel num_threads(nt)
  {
    std::vector<state_t> acc(order != nullptr ? d : 0);
#pragma omp for schedule(dynamic, kChunk)
    for (int64_t k = 0; k < u; ++k) {
      if (k + kPrefetchAhead < u) {
        const int64_t ahead = ids[k + kPrefetchAhead];
        prefetch_row(p + ahead * d, d * static_cast<int64_t>(sizeof(param_t)), true);
        prefetch_row(m + ahead * d, d * static_cast<int64_t>(sizeof(state_t)), true);
        prefetch_row(v + ahead * d, d * static_cast<int64_t>(sizeof(state_t)), true);
        if (order != nullptr) {
          prefetch_row(g + order[seg[k + kPrefetchAhead]] * d, d * static_cast<int64_t>(sizeof(state_t)));
        }
      }
      const int64_t r = ids[k];
      const state_t* gk = g + k * d;
      if (order != nullptr) {
        segment_sum<state_t>(g, d, order, seg[k], seg[k + 1], acc.data());
        gk = acc.data();
      }
      state_t bc1, bc2;
      bias.get(bump_step(steps, steps32, r), bc1, bc2);
      adam_row<param_t, state_t>(p + r * d, m + r * d, v + r * d, gk, d, bc1, bc2, h);
    }
  }
}

void adam_rows(at::Tensor& param, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, at::Tensor& step_per_row,
               const int64_t* ids, int64_t u, const at::Tensor& grads, const int64_t* order, const int64_t* seg,
               const AdamHyper& h) {
  const auto pt = param.scalar_type();
  if (exp_avg.scalar_type() == at::kDouble) {
    adam_rows_impl<double, double>(param, exp_avg, exp_avg_sq, step_per_row, ids, u, grads, order, seg, h);
  } else if (pt == at::kFloat) {
    adam_rows_impl<float, float>(param, exp_avg, exp_avg_sq, step_per_row, ids, u, grads, order, seg, h);
  } else if (pt == at::kBFloat16) {
    adam_rows_impl<c10::BFloat16, float>(param, exp_avg, exp_avg_sq, step_per_row, ids, u, grads, order, seg, h);
  } else {
    adam_rows_impl<c10::Half, float>(param, exp_avg, exp_avg_sq, step_per_row, ids, u, grads, order, seg, h);
  }
}

void check_adam_state(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                      const at::Tensor& step, const at::Tensor& grads, const AdamHyper& h) {
  check_cpu_contig(param, "param");
  check_cpu_contig(exp_avg, "exp_avg");
  check_cpu_contig(exp_avg_sq, "exp_avg_sq");
  check_cpu_contig(step, "step_per_row");
  check_cpu_contig(grads, "grads");
  engram::check_adam_shapes(param, exp_avg, exp_avg_sq, step, grads, h.global_step);
}

}  // namespace

// (unique_ids [U] int64 ascending, summed [U, d]); sums in order of occurrence.
std::vector<at::Tensor> segment_reduce(const at::Tensor& row_ids, const at::Tensor& grads) {
  check_cpu_contig(row_ids, "row_ids");
  check_cpu_contig(grads, "grads");
  check_index_dtype(row_ids, "row_ids");
  TORCH_CHECK(row_ids.dim() == 1 && grads.dim() == 2 && grads.size(0) == row_ids.size(0),
              "row_ids [M] and grads [M, d] expected");
  TORCH_CHECK(grads.scalar_type() == at::kFloat || grads.scalar_type() == at::kDouble,
              "grads must be float32 or float64");
  const Segments seg = segments_of(row_ids);
  const int64_t u = seg.count();
  at::Tensor unique = at::empty({u}, row_ids.options().dtype(at::kLong));
  at::Tensor summed = at::empty({u, grads.size(1)}, grads.options());
  int64_t* up = unique.data_ptr<int64_t>();
  if (grads.scalar_type() == at::kFloat) {
    segment_reduce_impl<float>(grads, seg, up, summed);
  } else {
    segment_reduce_impl<double>(grads, seg, up, summed);
  }
  return {unique, summed};
}

// Row-sparse AdamW in place on rows unique_ids [U] (sorted strictly increasing) with grads [U, d]
// (state dtype). global_step > 0 replaces the per-row bias-correction step.
void sparse_adam_update_(at::Tensor param, at::Tensor exp_avg, at::Tensor exp_avg_sq, at::Tensor step_per_row,
                         const at::Tensor& unique_ids, const at::Tensor& grads, double lr, double beta1,
                         double beta2, double eps, double weight_decay, int64_t global_step) {
  const AdamHyper h{lr, beta1, beta2, eps, weight_decay, global_step};
  check_adam_state(param, exp_avg, exp_avg_sq, step_per_row, grads, h);
  check_cpu_contig(unique_ids, "unique_ids");
  TORCH_CHECK(unique_ids.scalar_type() == at::kLong, "unique_ids must be int64");
  TORCH_CHECK(unique_ids.dim() == 1 && unique_ids.size(0) == grads.size(0), "unique_ids [U] and grads [U, d]");
  const int64_t u = unique_ids.numel(), rows = param.size(0);
  const int64_t* ids = unique_ids.data_ptr<int64_t>();
  for (int64_t k = 0; k < u; ++k) {
    TORCH_CHECK_INDEX(ids[k] >= 0 && ids[k] < rows, "unique id ", ids[k], " out of range for ", rows, " rows");
    TORCH_CHECK_VALUE(k == 0 || ids[k] > ids[k - 1], "unique_ids must be sorted strictly increasing");
  }
  adam_rows(param, exp_avg, exp_avg_sq, step_per_row, ids, u, grads, nullptr, nullptr, h);
}

// segment_reduce + sparse_adam_update_ fused: row_ids [M] with duplicates, grads [M, d] (state dtype).
// Each touched row's gradient is summed into a per-thread buffer and applied at once; returns the
// touched rows (unique_ids [U] ascending).
at::Tensor sparse_adam_step_(at::Tensor param, at::Tensor exp_avg, at::Tensor exp_avg_sq, at::Tensor step_per_row,
                             const at::Tensor& row_ids, const at::Tensor& grads, double lr, double beta1,
                             double beta2, double eps, double weight_decay, int64_t global_step) {
  const AdamHyper h{lr, beta1, beta2, eps, weight_decay, global_step};
  check_adam_state(param, exp_avg, exp_avg_sq, step_per_row, grads, h);
  check_cpu_contig(row_ids, "row_ids");
  check_index_dtype(row_ids, "row_ids");
  TORCH_CHECK(row_ids.dim() == 1 && row_ids.size(0) == grads.size(0), "row_ids [M] and grads [M, d]");
  const Segments seg = segments_of(row_ids);
  const int64_t u = seg.count(), rows = param.size(0);
  at::Tensor unique = at::empty({u}, row_ids.options().dtype(at::kLong));
  int64_t* up = unique.data_ptr<int64_t>();
  for (int64_t k = 0; k < u; ++k) up[k] = seg.keys[seg.seg[k]];
  TORCH_CHECK_INDEX(u == 0 || up[u - 1] < rows, "row id ", u ? up[u - 1] : 0, " out of range for ", rows, " rows");
  adam_rows(param, exp_avg, exp_avg_sq, step_per_row, up, u, grads, seg.order.data(), seg.seg.data(), h);
  return unique;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "Engram CPU ops (OpenMP): row gather, multi-head gather, segment reduce, row-sparse AdamW";
  mod.def("gather_rows_into", &gather_rows_into, "out[i] = table[ids[i]]");
  mod.def("multihead_gather_into", &multihead_gather_into, "out[n, h] = table[row_ids[n, h] + head_offsets[h]]");
  mod.def("segment_reduce", &segment_reduce, "(unique_ids, summed grads) of duplicate rows");
  mod.def("sparse_adam_update_", &sparse_adam_update_, "row-sparse AdamW in place on unique rows");
  mod.def("sparse_adam_step_", &sparse_adam_step_, "segment reduce + row-sparse AdamW in place");
  mod.def("num_threads", []() { return at::get_num_threads(); }, "threads used by the parallel loops");
}
