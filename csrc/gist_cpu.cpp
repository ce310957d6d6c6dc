// gist-fast: the GIST loss on the CPU, both passes of the two-pass plan (benchmarks/NOTES.md) in native code.
//
// Pass 1 (forward) walks row tiles, one task per tile, tasks spread over OpenMP threads. For every
// column tile of every block it forms the student tile S = R_s C_s^T and the guide tile
// Gd = R_g C_g^T with two matmuls, then ONE fused sweep per row masks, takes the tile maximum and
// turns the kept logits into exp weights relative to the running shift (online logsumexp), and a
// third matmul adds the weighted columns to the row-side accumulator E (flash-attention style).
//
// Pass 2 (backward) walks column tiles: a task owns a column range of one student input and
// visits every block whose columns come from that input, so each gradient row is written by one
// task only: no atomics, and the result does not depend on the thread count or the schedule.
// When the caller allows it, pass 1 also keeps the guide mask as bits (B·N/8 bytes) and pass 2
// reads them instead of recomputing the guide dots (a sixth of the FLOPs at d = dg).
//
// Everything is computed in the inputs' dtype (float32 or float64; the Python glue upcasts half
// inputs). Row vectors are normalised once into contiguous copies: without the bitmask, memory
// stays linear in B.
//
// Matryoshka (forward_matryoshka / backward_matryoshka): the same two passes for every prefix dim
// m_1 < ... < m_K of the student at once. Per tile the guide dots and mask are formed once and the
// raw student dots of all prefixes come from one sweep over the features, segment by segment up to
// m_K; each dim keeps its own prefix norms, online logsumexp, target logit and gradient products.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// The elementwise sweeps are compiled for AVX-512, AVX2+FMA and the baseline and chosen at load
// time, so one build runs everywhere and still uses the wide vectors of the machine it runs on.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define GIST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GIST_CLONES
#endif

#define GIST_INLINE inline __attribute__((always_inline))

namespace {

constexpr double kNormEps = 1e-8;  // x / max(||x||, eps), as docs/loss.md

// ---------------------------------------------------------------------------------------------
// exp that vectorises: Cody-Waite range reduction, a degree-6 polynomial (Cephes expf) and the
// exponent built from the rounded multiple of ln 2 with integer ops. Arguments below ~-87.3 give
// 0 (the flush only drops weights below 1e-38 of the row maximum), -inf gives 0.

GIST_INLINE float exp_approx(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365447504f;
  const float xc = std::min(std::max(x, lo), hi);
  // Round x / ln2 to the nearest integer with the 1.5 * 2^23 trick; the low bits of t hold n.
  const float t = xc * 1.44269504088896341f + 12582912.0f;
  const float n = t - 12582912.0f;
  int32_t ti;
  std::memcpy(&ti, &t, sizeof ti);
  const int32_t ni = ti - 0x4B400000;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const float e = p * scale;
  return x < lo ? 0.0f : e;
}

// float64 is the precision path (tests, fp64 training): the libm exp, exact to an ulp.
GIST_INLINE double exp_approx(double x) { return std::exp(x); }

// ---------------------------------------------------------------------------------------------
// The fused sweeps over one row of a tile. `s` and `g` are the student and guide cosines of the
// row against the tile's columns; a column is masked when g > thr (strict), except an exact tie:
// where the column's guide-row id `cid[j]` is the row's tie id `tie` (the logit's guide pair is
// the pair that defines thr), the row's exact decision `tie_masked` applies (gist_fast/backends/
// ties.py). The never-masked target column is patched by the caller, outside the vector loop. The
// output may be the student row itself (each j reads s_j before writing w_j; `omp simd` vouches).

template <typename T>
GIST_INLINE bool guide_masks(T g, T thr, int32_t cid, int32_t tie, bool tie_masked) {
  return cid == tie ? tie_masked : g > thr;
}

// w_j = s_j / tau, or -inf where masked; returns max_j w_j (-inf when every entry is masked).
#define GIST_DEFINE_MASK_MAX(T)                                                                   \
  GIST_CLONES T mask_row_max(const T* s, const T* __restrict g, const int32_t* __restrict cid, T* w, \
                             int64_t n, T thr, int32_t tie, bool tie_masked, T inv_tau) {         \
    const T ninf = -std::numeric_limits<T>::infinity();                                           \
    T mx = ninf;                                                                                  \
    _Pragma("omp simd reduction(max : mx)") for (int64_t j = 0; j < n; ++j) {                    \
      const T z = guide_masks(g[j], thr, cid[j], tie, tie_masked) ? ninf : s[j] * inv_tau;        \
      w[j] = z;                                                                                   \
      mx = std::max(mx, z);                                                                       \
    }                                                                                             \
    return mx;                                                                                    \
  }

// w_j = exp(w_j - shift) in place; returns the sum.
#define GIST_DEFINE_EXP_SUM(T)                                                                    \
  GIST_CLONES T exp_row_sum(T* __restrict w, int64_t n, T shift) {                               \
    T sum = 0;                                                                                    \
    _Pragma("omp simd reduction(+ : sum)") for (int64_t j = 0; j < n; ++j) {                     \
      const T e = exp_approx(w[j] - shift);                                                       \
      w[j] = e;                                                                                   \
      sum += e;                                                                                   \
    }                                                                                             \
    return sum;                                                                                   \
  }

// Pass 2: out_j = exp(s_j / tau - lse) * scale, 0 where masked (the softmax times the row weight).
#define GIST_DEFINE_PROB(T)                                                                       \
  GIST_CLONES void prob_row(const T* s, const T* __restrict g, const int32_t* __restrict cid, T* out, \
                            int64_t n, T thr, int32_t tie, bool tie_masked, T inv_tau, T lse, T scale) { \
    _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) {                                         \
      const T e = exp_approx(s[j] * inv_tau - lse) * scale;                                       \
      out[j] = guide_masks(g[j], thr, cid[j], tie, tie_masked) ? T(0) : e;                        \
    }                                                                                             \
  }

GIST_DEFINE_MASK_MAX(float)
GIST_DEFINE_MASK_MAX(double)
GIST_DEFINE_EXP_SUM(float)
GIST_DEFINE_EXP_SUM(double)
GIST_DEFINE_PROB(float)
GIST_DEFINE_PROB(double)

// The guide mask of one row of a tile as bits (1 = masked) at columns c0 .. c0 + n of the row's
// words, and back as 0/1 values (so that prob_row with thr = 1/2 and no tie id reads it like
// guide cosines).
template <typename T>
void pack_mask_row(const T* g, const int32_t* cid, T thr, int32_t tie, bool tie_masked, int64_t n, int64_t c0,
                   uint64_t* words) {
  int64_t j = 0;
  auto one = [&](int64_t jj) {
    if (guide_masks(g[jj], thr, cid[jj], tie, tie_masked)) words[(c0 + jj) >> 6] |= uint64_t(1) << ((c0 + jj) & 63);
  };
  for (; j < n && ((c0 + j) & 63) != 0; ++j) one(j);
  for (; j + 64 <= n; j += 64) {
    uint64_t w = 0;
    for (int l = 0; l < 64; ++l) w |= uint64_t(guide_masks(g[j + l], thr, cid[j + l], tie, tie_masked)) << l;
    words[(c0 + j) >> 6] |= w;
  }
  for (; j < n; ++j) one(j);
}

template <typename T>
void unpack_mask_row(const uint64_t* words, int64_t c0, int64_t n, T* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<T>((words[(c0 + j) >> 6] >> ((c0 + j) & 63)) & 1);
}

// ---------------------------------------------------------------------------------------------
// Problem description.

constexpr int kAnchor = 0, kPositive = 1;  // student/guide inputs: 0 anchor, 1 positive, 2+m negative m

struct Block {
  int row_input;  // kAnchor, or kPositive for PP (rows o..o+B of the positives)
  int col_input;
  bool is_target;  // AP: column o + i of row i is the never-masked target
};

struct Options {
  double temperature;
  bool relative;
  double margin;
  bool contrast_anchors;
  bool contrast_positives;
  int64_t offset;
  int64_t tile_rows;
  int64_t tile_cols;
};

struct Problem {
  std::vector<at::Tensor> student;  // normalised, contiguous, compute dtype
  std::vector<at::Tensor> guide;
  std::vector<at::Tensor> ids;  // int32 id of every guide row, per input (equal ids: bitwise-equal rows)
  std::vector<at::Tensor> inv_norm;  // 1 / max(||x||, eps) of the student rows
  std::vector<at::Tensor> norm;      // ||x|| of the student rows
  std::vector<Block> blocks;
  // Guide-mask bitmask layout: block b's row i starts at word mask_base[b] + i * mask_stride[b].
  std::vector<int64_t> mask_base, mask_stride;
  int64_t mask_words = 0;
  int64_t batch = 0, candidates = 0, offset = 0;
  at::ScalarType dtype;

  // Rows r0 .. r0 + n of a block's row side (PP rows are shifted by the offset).
  at::Tensor rows(const std::vector<at::Tensor>& side, int which, int64_t r0, int64_t n) const {
    return side[which].narrow(0, r0 + (which == kPositive ? offset : 0), n);
  }

  // The tie id of anchor row i in a block whose rows come from `row_input`: the id of the other
  // guide row of the threshold pair (ga_i, gp_{o+i}): gp_{o+i} for anchor rows, ga_i for PP rows.
  int32_t row_tie(int row_input, int64_t i) const {
    return row_input == kPositive ? ids[kAnchor].data_ptr<int32_t>()[i]
                                  : ids[kPositive].data_ptr<int32_t>()[offset + i];
  }
};

at::ScalarType compute_dtype(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  for (const auto* list : {&a, &b})
    for (const auto& t : *list)
      if (t.scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

Problem prepare(const std::vector<at::Tensor>& student, const std::vector<at::Tensor>& guide,
                const std::vector<at::Tensor>& ids, const Options& opt, bool keep_norms, bool raw_student = false) {
  TORCH_CHECK(student.size() >= 2 && student.size() == guide.size(),
              "gist_fast cpp: expected [anchor, positive, *negatives] for student and guide");
  TORCH_CHECK(ids.size() == guide.size(), "gist_fast cpp: expected one id vector per guide input");
  for (size_t x = 0; x < ids.size(); ++x)
    TORCH_CHECK(ids[x].scalar_type() == at::kInt && ids[x].dim() == 1 && ids[x].size(0) == guide[x].size(0),
                "gist_fast cpp: guide row ids must be int32 vectors, one id per guide row");
  Problem pb;
  pb.dtype = compute_dtype(student, guide);
  pb.batch = student[0].size(0);
  pb.candidates = student[1].size(0);
  pb.offset = opt.offset;
  auto normalise = [&](const at::Tensor& x, at::Tensor* norm_out, at::Tensor* inv_out) {
    TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "gist_fast cpp: inputs must be 2-D CPU tensors");
    at::Tensor xc = x.to(pb.dtype);
    at::Tensor norm = xc.norm(2, {1});
    at::Tensor inv = norm.clamp_min(kNormEps).reciprocal();
    if (norm_out) *norm_out = norm;
    if (inv_out) *inv_out = inv;
    return (xc * inv.unsqueeze(1)).contiguous();
  };
  for (const auto& x : student) {
    at::Tensor n, inv;
    if (raw_student) {  // Matryoshka: each prefix dim has its own norms (struct Prefixes)
      TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "gist_fast cpp: inputs must be 2-D CPU tensors");
      pb.student.push_back(x.to(pb.dtype).contiguous());
      continue;
    }
    pb.student.push_back(normalise(x, &n, &inv));
    if (keep_norms) {
      pb.norm.push_back(n);
      pb.inv_norm.push_back(inv);
    }
  }
  for (const auto& x : guide) pb.guide.push_back(normalise(x, nullptr, nullptr));
  for (const auto& x : ids) pb.ids.push_back(x.contiguous());

  pb.blocks.push_back({kAnchor, kPositive, true});
  if (opt.contrast_anchors) pb.blocks.push_back({kAnchor, kAnchor, false});
  if (opt.contrast_positives) pb.blocks.push_back({kPositive, kPositive, false});
  for (int m = 2; m < static_cast<int>(student.size()); ++m) pb.blocks.push_back({kAnchor, m, false});
  for (const Block& blk : pb.blocks) {
    pb.mask_base.push_back(pb.mask_words);
    pb.mask_stride.push_back((pb.student[blk.col_input].size(0) + 63) / 64);
    pb.mask_words += pb.batch * pb.mask_stride.back();
  }
  return pb;
}

// Runs f(task) for task in [0, n) over at::get_num_threads() OpenMP threads, dynamically scheduled
// (tasks differ in cost and the machine may be shared). Each task writes only its own outputs, so
// the result is the same whichever thread runs it. The first exception is rethrown.
template <typename F>
void parallel_tasks(int64_t n, const F& f) {
  if (n <= 0) return;
  std::exception_ptr error;
  std::mutex error_lock;
#ifdef _OPENMP
  const int threads = static_cast<int>(std::min<int64_t>(n, at::get_num_threads()));
  const bool nested = at::in_parallel_region();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && !nested)
#endif
  for (int64_t task = 0; task < n; ++task) {
    try {
      at::NoGradGuard no_grad;
      f(task);
    } catch (...) {
      std::lock_guard<std::mutex> guard(error_lock);
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

// A contiguous rows x cols view at the start of a scratch buffer.
at::Tensor scratch(at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.narrow(0, 0, rows * cols).view({rows, cols});
}

// thr_i from t_i = ĝa_i · ĝp_{o+i}, and the exact decision at a tie (g = t_i exactly): masked iff
// margin > 0 (absolute) or |t_i| * margin > 0 (relative), as uint8.
std::pair<at::Tensor, at::Tensor> thresholds(const Problem& pb, const Options& opt) {
  const int64_t B = pb.batch;
  at::Tensor t = (pb.guide[kAnchor] * pb.rows(pb.guide, kPositive, 0, B)).sum(1);
  at::Tensor thr = (opt.relative ? t - t.abs() * opt.margin : t - opt.margin).contiguous();
  at::Tensor tie_masked = opt.margin <= 0 ? at::zeros({B}, t.options().dtype(at::kByte))
                          : opt.relative  ? t.ne(0).to(at::kByte)
                                          : at::ones({B}, t.options().dtype(at::kByte));
  return {thr, tie_masked.contiguous()};
}

// ---------------------------------------------------------------------------------------------
// Pass 1: lse_i, the loss l_i = lse_i - z_{i,o+i}, and the softmax-weighted means E of the column
// vectors seen from the anchor rows (e_anchor) and from the PP rows (e_positive).
//
// Per row the running shift m_i is the largest kept logit so far and the sum is relative to it;
// the loss is formed as (m_i - z_target) + log(sum) with z_target taken from the same tile value
// the softmax used, so when the target is the row maximum the loss is log(sum) without the
// cancellation of two O(1/tau) numbers.

template <typename T>
void row_pass(const Problem& pb, const Options& opt, const at::Tensor& thr, const at::Tensor& tie_masked,
              at::Tensor& losses, at::Tensor& lse, at::Tensor& e_anchor, at::Tensor& e_positive, uint64_t* mask) {
  const int64_t B = pb.batch, TM = opt.tile_rows, TN = opt.tile_cols;
  const T inv_tau = static_cast<T>(1.0 / opt.temperature);
  const T* thr_p = thr.data_ptr<T>();
  const uint8_t* tie_masked_p = tie_masked.data_ptr<uint8_t>();
  T* lse_p = lse.data_ptr<T>();
  T* loss_p = losses.data_ptr<T>();
  const int64_t d = pb.student[0].size(1);
  const int64_t tiles = (B + TM - 1) / TM;

  parallel_tasks(tiles, [&](int64_t tile) {
    const int64_t r0 = tile * TM, rn = std::min(TM, B - r0);
    auto options = pb.student[0].options();
    at::Tensor s_buf = at::empty({TM * TN}, options), g_buf = at::empty({TM * TN}, options);
    const T ninf = -std::numeric_limits<T>::infinity();
    std::vector<T> shift(rn, ninf), total(rn, T(0)), target(rn, T(0));
    at::Tensor acc[2] = {e_anchor.narrow(0, r0, rn), e_positive.defined() ? e_positive.narrow(0, r0, rn) : at::Tensor()};
    for (auto& a : acc)
      if (a.defined()) a.zero_();

    for (size_t b = 0; b < pb.blocks.size(); ++b) {
      const Block& blk = pb.blocks[b];
      at::Tensor rs = pb.rows(pb.student, blk.row_input, r0, rn);
      at::Tensor rg = pb.rows(pb.guide, blk.row_input, r0, rn);
      at::Tensor& a = acc[blk.row_input];
      const int64_t ncols = pb.student[blk.col_input].size(0);
      for (int64_t c0 = 0; c0 < ncols; c0 += TN) {
        const int64_t cn = std::min(TN, ncols - c0);
        at::Tensor cs = pb.student[blk.col_input].narrow(0, c0, cn);
        at::Tensor cg = pb.guide[blk.col_input].narrow(0, c0, cn);
        const int32_t* cid = pb.ids[blk.col_input].data_ptr<int32_t>() + c0;
        at::Tensor s = scratch(s_buf, rn, cn), g = scratch(g_buf, rn, cn);
        at::mm_out(s, rs, cs.t());
        at::mm_out(g, rg, cg.t());
        T* s_p = s.data_ptr<T>();
        const T* g_p = g.data_ptr<T>();
        for (int64_t i = 0; i < rn; ++i) {
          T* w = s_p + i * cn;
          // Read the target's cosine before the sweep overwrites the row.
          const int64_t jt = blk.is_target ? pb.offset + r0 + i - c0 : -1;
          const bool has_target = jt >= 0 && jt < cn;
          const T target_s = has_target ? w[jt] : T(0);
          const int32_t tie = pb.row_tie(blk.row_input, r0 + i);
          const bool tie_m = tie_masked_p[r0 + i] != 0;
          T mx = mask_row_max(w, g_p + i * cn, cid, w, cn, thr_p[r0 + i], tie, tie_m, inv_tau);
          if (mask) {
            uint64_t* words = mask + pb.mask_base[b] + (r0 + i) * pb.mask_stride[b];
            pack_mask_row(g_p + i * cn, cid, thr_p[r0 + i], tie, tie_m, cn, c0, words);
            if (has_target) words[(c0 + jt) >> 6] &= ~(uint64_t(1) << ((c0 + jt) & 63));
          }
          if (has_target) {
            w[jt] = target[i] = target_s * inv_tau;
            mx = std::max(mx, w[jt]);
          }
          if (mx == ninf) {  // every entry of this row of the tile is masked: no weight
            std::fill(w, w + cn, T(0));
            continue;
          }
          if (mx > shift[i]) {  // (exp(-inf) = 0 on the first kept entry: nothing to rescale)
            const T alpha = std::exp(shift[i] - mx);
            const bool seen = total[i] > 0;  // else the accumulators are still 0
            total[i] *= alpha;
            for (T* row : {seen && acc[0].defined() ? acc[0].data_ptr<T>() : nullptr,
                           seen && acc[1].defined() ? acc[1].data_ptr<T>() : nullptr}) {
              if (!row) continue;
              T* r = row + i * d;
              for (int64_t k = 0; k < d; ++k) r[k] *= alpha;
            }
            shift[i] = mx;
          }
          total[i] += exp_row_sum(w, cn, shift[i]);
        }
        a.addmm_(s, cs);
      }
    }
    for (int64_t i = 0; i < rn; ++i) {
      // The target is never masked, so total >= 1 after the shift and lse is finite.
      const T log_total = std::log(total[i]);
      lse_p[r0 + i] = shift[i] + log_total;
      loss_p[r0 + i] = (shift[i] - target[i]) + log_total;
      const T inv_total = T(1) / total[i];
      for (auto& a : acc) {
        if (!a.defined()) continue;
        T* r = a.data_ptr<T>() + i * d;
        for (int64_t k = 0; k < d; ++k) r[k] *= inv_total;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Pass 2: the column-side gradients dĉ_j += sum_i G_ij r̂_i with G_ij = (P_ij - [j target]) * scale_i.

template <typename T>
void column_pass(const Problem& pb, const Options& opt, const at::Tensor& lse, const at::Tensor& thr,
                 const at::Tensor& tie_masked, const at::Tensor& scale, std::vector<at::Tensor>& grads,
                 const uint64_t* mask) {
  const int64_t B = pb.batch, TM = opt.tile_rows, TN = opt.tile_cols;
  const T inv_tau = static_cast<T>(1.0 / opt.temperature);
  const T* thr_p = thr.data_ptr<T>();
  const uint8_t* tie_masked_p = tie_masked.data_ptr<uint8_t>();
  const T* lse_p = lse.data_ptr<T>();
  const T* scale_p = scale.data_ptr<T>();

  // A task is a column tile of one student input; it visits every block drawing columns from it.
  struct Task {
    int input;
    int64_t c0, cn;
  };
  std::vector<Task> tasks;
  for (int x = 0; x < static_cast<int>(pb.student.size()); ++x) {
    bool used = false;
    for (const Block& blk : pb.blocks) used = used || blk.col_input == x;
    if (!used) continue;
    const int64_t ncols = pb.student[x].size(0);
    for (int64_t c0 = 0; c0 < ncols; c0 += TN) tasks.push_back({x, c0, std::min(TN, ncols - c0)});
  }

  parallel_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t t) {
    const Task task = tasks[t];
    auto options = pb.student[0].options();
    at::Tensor s_buf = at::empty({TM * TN}, options), g_buf = at::empty({TM * TN}, options);
    at::Tensor cs = pb.student[task.input].narrow(0, task.c0, task.cn);
    at::Tensor cg = pb.guide[task.input].narrow(0, task.c0, task.cn);
    at::Tensor dc = grads[task.input].narrow(0, task.c0, task.cn);
    const int32_t* cid = static_cast<const int32_t*>(pb.ids[task.input].data_ptr()) + task.c0;
    for (size_t b = 0; b < pb.blocks.size(); ++b) {
      const Block& blk = pb.blocks[b];
      if (blk.col_input != task.input) continue;
      for (int64_t r0 = 0; r0 < B; r0 += TM) {
        const int64_t rn = std::min(TM, B - r0);
        at::Tensor rs = pb.rows(pb.student, blk.row_input, r0, rn);
        at::Tensor rg = pb.rows(pb.guide, blk.row_input, r0, rn);
        at::Tensor s = scratch(s_buf, rn, task.cn), g = scratch(g_buf, rn, task.cn);
        at::mm_out(s, rs, cs.t());
        // With pass 1's bitmask the guide dots are not recomputed: the bits become 0/1 "cosines"
        // compared with 1/2.
        if (!mask) at::mm_out(g, rg, cg.t());
        T* s_p = s.data_ptr<T>();
        T* g_p = g.data_ptr<T>();
        for (int64_t i = 0; i < rn; ++i) {
          T* row = s_p + i * task.cn;
          T thr_i = thr_p[r0 + i];
          int32_t tie = pb.row_tie(blk.row_input, r0 + i);
          if (mask) {
            unpack_mask_row(mask + pb.mask_base[b] + (r0 + i) * pb.mask_stride[b], task.c0, task.cn,
                            g_p + i * task.cn);
            thr_i = T(0.5);
            tie = -1;  // the bits already hold the tie decisions; ids are >= 0
          }
          const int64_t jt = blk.is_target ? pb.offset + r0 + i - task.c0 : -1;
          const bool has_target = jt >= 0 && jt < task.cn;
          const T target_s = has_target ? row[jt] : T(0);
          const T lse_i = lse_p[r0 + i], scale_i = scale_p[r0 + i];
          prob_row(row, g_p + i * task.cn, cid, row, task.cn, thr_i, tie, tie_masked_p[r0 + i] != 0, inv_tau, lse_i,
                   scale_i);
          if (has_target) row[jt] = (std::exp(target_s * inv_tau - lse_i) - T(1)) * scale_i;
        }
        dc.addmm_(s.t(), rs);
      }
    }
  });
}

// dx = (dx̂ - x̂ (x̂·dx̂)) / max(||x||, eps); below eps the norm is a constant and dx = dx̂ / eps.
void through_normalisation(const Problem& pb, std::vector<at::Tensor>& grads) {
  for (size_t x = 0; x < grads.size(); ++x) {
    at::Tensor& g = grads[x];
    at::Tensor radial = (pb.student[x] * g).sum(1, true);
    radial.masked_fill_((pb.norm[x] < kNormEps).unsqueeze(1), 0.0);
    g.sub_(pb.student[x] * radial).mul_(pb.inv_norm[x].unsqueeze(1));
  }
}

Options make_options(double temperature, bool relative, double margin, bool contrast_anchors,
                     bool contrast_positives, int64_t offset, int64_t tile_rows, int64_t tile_cols) {
  TORCH_CHECK(tile_rows >= 1 && tile_cols >= 1, "gist_fast cpp: tile sizes must be >= 1");
  TORCH_CHECK(temperature > 0, "gist_fast cpp: temperature must be > 0");
  return {temperature, relative, margin, contrast_anchors, contrast_positives, offset, tile_rows, tile_cols};
}

// ---------------------------------------------------------------------------------------------
// Matryoshka: sum_k w_k L_k, L_k the loss of the student rows cut to their first m_k features
// (dims ascending), all dims in one sweep per tile. What the dims share is computed once per tile:
// the guide dots and the mask (kept as bytes for the tile), and the raw student dots, summed
// segment by segment (features m_{k-1} .. m_k) into one buffer: after segment k it holds the raw
// dots of prefix m_k. Dim k's logits scale them by its own inverse prefix norms,
// raw_ij / (|r_i[:m_k]| |c_j[:m_k]| tau); each dim keeps its own shift, sum, target logit, row-side
// means E^k (B x m_k) and column-side gradients. The student rows are kept un-normalised; the
// column normalisation is folded into the exp weights (w_ij / |c_j[:m_k]|) and the row
// normalisation into the column pass's probabilities, so every matmul takes the raw rows.

// m_j = 1 where the guide drops column j of a row, else 0.
#define GIST_DEFINE_MASK_BYTES(T)                                                                 \
  GIST_CLONES void mask_row_bytes(const T* __restrict g, const int32_t* __restrict cid, uint8_t* __restrict m, \
                                  int64_t n, T thr, int32_t tie, bool tie_masked) {               \
    _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) m[j] = guide_masks(g[j], thr, cid[j], tie, tie_masked); \
  }

// z_j = raw_j * row_scale * col_inv_j, or -inf where masked; returns max_j z_j.
#define GIST_DEFINE_PREFIX_MAX(T)                                                                 \
  GIST_CLONES T prefix_logits_max(const T* __restrict raw, const uint8_t* __restrict m,            \
                                  const T* __restrict col_inv, T* __restrict z, int64_t n, T row_scale) { \
    const T ninf = -std::numeric_limits<T>::infinity();                                           \
    T mx = ninf;                                                                                  \
    _Pragma("omp simd reduction(max : mx)") for (int64_t j = 0; j < n; ++j) {                    \
      const T v = m[j] ? ninf : raw[j] * row_scale * col_inv[j];                                  \
      z[j] = v;                                                                                   \
      mx = std::max(mx, v);                                                                       \
    }                                                                                             \
    return mx;                                                                                    \
  }

// e_j = exp(z_j - shift); z_j = e_j * col_inv_j in place (the weight of the raw column); returns sum e_j.
#define GIST_DEFINE_EXP_SUM_SCALED(T)                                                             \
  GIST_CLONES T exp_row_sum_scaled(T* __restrict z, const T* __restrict col_inv, int64_t n, T shift) { \
    T sum = 0;                                                                                    \
    _Pragma("omp simd reduction(+ : sum)") for (int64_t j = 0; j < n; ++j) {                     \
      const T e = exp_approx(z[j] - shift);                                                       \
      z[j] = e * col_inv[j];                                                                      \
      sum += e;                                                                                   \
    }                                                                                             \
    return sum;                                                                                   \
  }

// Pass 2: out_j = exp(raw_j * row_scale * col_inv_j - lse) * scale, 0 where masked.
#define GIST_DEFINE_PREFIX_PROB(T)                                                                \
  GIST_CLONES void prefix_prob_row(const T* __restrict raw, const uint8_t* __restrict m,           \
                                   const T* __restrict col_inv, T* __restrict out, int64_t n, T row_scale, T lse, \
                                   T scale) {                                                     \
    _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) {                                         \
      const T e = exp_approx(raw[j] * row_scale * col_inv[j] - lse) * scale;                      \
      out[j] = m[j] ? T(0) : e;                                                                   \
    }                                                                                             \
  }

GIST_DEFINE_MASK_BYTES(float)
GIST_DEFINE_MASK_BYTES(double)
GIST_DEFINE_PREFIX_MAX(float)
GIST_DEFINE_PREFIX_MAX(double)
GIST_DEFINE_EXP_SUM_SCALED(float)
GIST_DEFINE_EXP_SUM_SCALED(double)
GIST_DEFINE_PREFIX_PROB(float)
GIST_DEFINE_PREFIX_PROB(double)

// The dims ascending and, per student input, the prefix norms |x[:m_k]| and 1 / max(|x[:m_k]|, eps)
// as (K, rows) tensors (from per-segment sums of squares).
struct Prefixes {
  std::vector<int64_t> dims, starts;  // segment k covers features starts[k] .. dims[k]
  std::vector<at::Tensor> norm, inv_norm;

  Prefixes(const Problem& pb, const std::vector<int64_t>& dims_ascending) : dims(dims_ascending) {
    const int64_t d = pb.student[0].size(1);
    TORCH_CHECK(!dims.empty(), "gist_fast cpp: matryoshka_dims must not be empty");
    for (size_t k = 0; k < dims.size(); ++k) {
      TORCH_CHECK(dims[k] >= 1 && dims[k] <= d && (k == 0 || dims[k] > dims[k - 1]),
                  "gist_fast cpp: matryoshka_dims must be ascending and lie in [1, d]");
      starts.push_back(k == 0 ? 0 : dims[k - 1]);
    }
    for (const at::Tensor& x : pb.student) {
      std::vector<at::Tensor> segments;
      for (size_t k = 0; k < dims.size(); ++k) segments.push_back(x.narrow(1, starts[k], dims[k] - starts[k]).square().sum(1));
      at::Tensor n = at::stack(segments).cumsum(0).sqrt().contiguous();
      norm.push_back(n);
      inv_norm.push_back(n.clamp_min(kNormEps).reciprocal().contiguous());
    }
  }

  int64_t size() const { return static_cast<int64_t>(dims.size()); }

  // 1 / |x[:m_k]| of student input `which`, from row `row` on.
  template <typename T>
  const T* inv(int which, int64_t k, int64_t row) const {
    return inv_norm[which].data_ptr<T>() + k * inv_norm[which].size(1) + row;
  }
};

// The mask bytes of a tile (rn x cn, row stride cn) from the guide dots `g`, 1 = dropped; the AP
// target column never dropped. With `bits`, also sets pass 1's guide-mask bits.
template <typename T>
void tile_mask_bytes(const Problem& pb, size_t b, const T* g, const int32_t* cid, const T* thr_p,
                     const uint8_t* tie_masked_p, int64_t r0, int64_t rn, int64_t c0, int64_t cn, uint8_t* m,
                     uint64_t* bits) {
  const Block& blk = pb.blocks[b];
  for (int64_t i = 0; i < rn; ++i) {
    const int32_t tie = pb.row_tie(blk.row_input, r0 + i);
    const bool tie_m = tie_masked_p[r0 + i] != 0;
    mask_row_bytes(g + i * cn, cid, m + i * cn, cn, thr_p[r0 + i], tie, tie_m);
    const int64_t jt = blk.is_target ? pb.offset + r0 + i - c0 : -1;
    const bool has_target = jt >= 0 && jt < cn;
    if (has_target) m[i * cn + jt] = 0;
    if (bits) {
      uint64_t* words = bits + pb.mask_base[b] + (r0 + i) * pb.mask_stride[b];
      pack_mask_row(g + i * cn, cid, thr_p[r0 + i], tie, tie_m, cn, c0, words);
      if (has_target) words[(c0 + jt) >> 6] &= ~(uint64_t(1) << ((c0 + jt) & 63));
    }
  }
}

// raw = rows[:, :m_0] cols[:, :m_0]^T for k = 0, else raw += the segment k's dots.
void add_segment(at::Tensor& raw, const at::Tensor& rows, const at::Tensor& cols, const Prefixes& px, int64_t k) {
  const int64_t a = px.starts[k], w = px.dims[k] - a;
  if (k == 0)
    at::mm_out(raw, rows.narrow(1, a, w), cols.narrow(1, a, w).t());
  else
    raw.addmm_(rows.narrow(1, a, w), cols.narrow(1, a, w).t());
}

// Pass 1 for every dim: losses (K, B), lse (K, B), and per dim the softmax-weighted means of the
// normalised column prefixes seen from the anchor rows (e_anchor[k], B x m_k) and the PP rows.
template <typename T>
void matryoshka_row_pass(const Problem& pb, const Options& opt, const Prefixes& px, const at::Tensor& thr,
                         const at::Tensor& tie_masked, at::Tensor& losses, at::Tensor& lse,
                         std::vector<at::Tensor>& e_anchor, std::vector<at::Tensor>& e_positive, uint64_t* bits) {
  const int64_t B = pb.batch, TM = opt.tile_rows, TN = opt.tile_cols, K = px.size();
  const T inv_tau = static_cast<T>(1.0 / opt.temperature);
  const T* thr_p = thr.data_ptr<T>();
  const uint8_t* tie_masked_p = tie_masked.data_ptr<uint8_t>();
  T* lse_p = lse.data_ptr<T>();
  T* loss_p = losses.data_ptr<T>();
  const int64_t tiles = (B + TM - 1) / TM;

  parallel_tasks(tiles, [&](int64_t tile) {
    const int64_t r0 = tile * TM, rn = std::min(TM, B - r0);
    auto options = pb.student[0].options();
    at::Tensor raw_buf = at::empty({TM * TN}, options), w_buf = at::empty({TM * TN}, options);
    at::Tensor g_buf = at::empty({TM * TN}, options);
    std::vector<uint8_t> m(TM * TN);
    const T ninf = -std::numeric_limits<T>::infinity();
    // Per dim k and row i at [k * rn + i]: running shift, sum of exp relative to it, target logit.
    std::vector<T> shift(K * rn, ninf), total(K * rn, T(0)), target(K * rn, T(0));
    std::vector<std::array<at::Tensor, 2>> acc(K);
    for (int64_t k = 0; k < K; ++k) {
      acc[k][0] = e_anchor[k].narrow(0, r0, rn);
      if (!e_positive.empty()) acc[k][1] = e_positive[k].narrow(0, r0, rn);
      for (auto& a : acc[k])
        if (a.defined()) a.zero_();
    }

    for (size_t b = 0; b < pb.blocks.size(); ++b) {
      const Block& blk = pb.blocks[b];
      const int64_t row_start = r0 + (blk.row_input == kPositive ? pb.offset : 0);
      at::Tensor rs = pb.rows(pb.student, blk.row_input, r0, rn);
      at::Tensor rg = pb.rows(pb.guide, blk.row_input, r0, rn);
      const int64_t ncols = pb.student[blk.col_input].size(0);
      for (int64_t c0 = 0; c0 < ncols; c0 += TN) {
        const int64_t cn = std::min(TN, ncols - c0);
        at::Tensor cs = pb.student[blk.col_input].narrow(0, c0, cn);
        at::Tensor cg = pb.guide[blk.col_input].narrow(0, c0, cn);
        const int32_t* cid = pb.ids[blk.col_input].data_ptr<int32_t>() + c0;
        at::Tensor raw = scratch(raw_buf, rn, cn), w = scratch(w_buf, rn, cn), g = scratch(g_buf, rn, cn);
        at::mm_out(g, rg, cg.t());
        tile_mask_bytes<T>(pb, b, g.data_ptr<T>(), cid, thr_p, tie_masked_p, r0, rn, c0, cn, m.data(), bits);
        const T* raw_p = raw.data_ptr<T>();
        T* w_p = w.data_ptr<T>();
        for (int64_t k = 0; k < K; ++k) {
          add_segment(raw, rs, cs, px, k);
          const T* row_inv = px.inv<T>(blk.row_input, k, row_start);
          const T* col_inv = px.inv<T>(blk.col_input, k, c0);
          const int64_t mk = px.dims[k];
          T* sh = shift.data() + k * rn;
          T* tot = total.data() + k * rn;
          for (int64_t i = 0; i < rn; ++i) {
            T* z = w_p + i * cn;
            T mx = prefix_logits_max(raw_p + i * cn, m.data() + i * cn, col_inv, z, cn, row_inv[i] * inv_tau);
            const int64_t jt = blk.is_target ? pb.offset + r0 + i - c0 : -1;
            if (jt >= 0 && jt < cn) target[k * rn + i] = z[jt];
            if (mx == ninf) {  // every entry of this row of the tile is masked: no weight
              std::fill(z, z + cn, T(0));
              continue;
            }
            if (mx > sh[i]) {  // (exp(-inf) = 0 on the first kept entry: nothing to rescale)
              const T alpha = std::exp(sh[i] - mx);
              const bool seen = tot[i] > 0;  // else the accumulators are still 0
              tot[i] *= alpha;
              for (auto& a : acc[k]) {
                if (!seen || !a.defined()) continue;
                T* r = a.data_ptr<T>() + i * mk;
                for (int64_t f = 0; f < mk; ++f) r[f] *= alpha;
              }
              sh[i] = mx;
            }
            tot[i] += exp_row_sum_scaled(z, col_inv, cn, sh[i]);
          }
          acc[k][blk.row_input].addmm_(w, cs.narrow(1, 0, mk));
        }
      }
    }
    for (int64_t k = 0; k < K; ++k) {
      const int64_t mk = px.dims[k];
      for (int64_t i = 0; i < rn; ++i) {
        // The target is never masked, so total >= 1 after the shift and lse is finite.
        const T s = shift[k * rn + i], log_total = std::log(total[k * rn + i]);
        lse_p[k * B + r0 + i] = s + log_total;
        loss_p[k * B + r0 + i] = (s - target[k * rn + i]) + log_total;
        const T inv_total = T(1) / total[k * rn + i];
        for (auto& a : acc[k]) {
          if (!a.defined()) continue;
          T* r = a.data_ptr<T>() + i * mk;
          for (int64_t f = 0; f < mk; ++f) r[f] *= inv_total;
        }
      }
    }
  });
}

// Pass 2 for every dim: grads[k][x] (rows of input x, m_k) += sum_i G^k_ij r̂^k_i, with
// G^k_ij = (P^k_ij - [j target]) scale_ki, scale (K, B).
template <typename T>
void matryoshka_column_pass(const Problem& pb, const Options& opt, const Prefixes& px, const at::Tensor& lse,
                            const at::Tensor& thr, const at::Tensor& tie_masked, const at::Tensor& scale,
                            std::vector<std::vector<at::Tensor>>& grads, const uint64_t* bits) {
  const int64_t B = pb.batch, TM = opt.tile_rows, TN = opt.tile_cols, K = px.size();
  const T inv_tau = static_cast<T>(1.0 / opt.temperature);
  const T* thr_p = thr.data_ptr<T>();
  const uint8_t* tie_masked_p = tie_masked.data_ptr<uint8_t>();
  const T* lse_p = lse.data_ptr<T>();
  const T* scale_p = scale.data_ptr<T>();

  struct Task {
    int input;
    int64_t c0, cn;
  };
  std::vector<Task> tasks;
  for (int x = 0; x < static_cast<int>(pb.student.size()); ++x) {
    bool used = false;
    for (const Block& blk : pb.blocks) used = used || blk.col_input == x;
    if (!used) continue;
    const int64_t ncols = pb.student[x].size(0);
    for (int64_t c0 = 0; c0 < ncols; c0 += TN) tasks.push_back({x, c0, std::min(TN, ncols - c0)});
  }

  parallel_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t t) {
    const Task task = tasks[t];
    auto options = pb.student[0].options();
    at::Tensor raw_buf = at::empty({TM * TN}, options), p_buf = at::empty({TM * TN}, options);
    at::Tensor g_buf = at::empty({TM * TN}, options);
    std::vector<uint8_t> m(TM * TN);
    at::Tensor cs = pb.student[task.input].narrow(0, task.c0, task.cn);
    at::Tensor cg = pb.guide[task.input].narrow(0, task.c0, task.cn);
    const int32_t* cid = static_cast<const int32_t*>(pb.ids[task.input].data_ptr()) + task.c0;
    for (size_t b = 0; b < pb.blocks.size(); ++b) {
      const Block& blk = pb.blocks[b];
      if (blk.col_input != task.input) continue;
      for (int64_t r0 = 0; r0 < B; r0 += TM) {
        const int64_t rn = std::min(TM, B - r0), cn = task.cn;
        const int64_t row_start = r0 + (blk.row_input == kPositive ? pb.offset : 0);
        at::Tensor rs = pb.rows(pb.student, blk.row_input, r0, rn);
        at::Tensor raw = scratch(raw_buf, rn, cn), p = scratch(p_buf, rn, cn);
        if (bits) {  // pass 1's bits: the guide dots are not recomputed
          for (int64_t i = 0; i < rn; ++i) {
            const uint64_t* words = bits + pb.mask_base[b] + (r0 + i) * pb.mask_stride[b];
            uint8_t* mi = m.data() + i * cn;
            for (int64_t j = 0; j < cn; ++j) mi[j] = (words[(task.c0 + j) >> 6] >> ((task.c0 + j) & 63)) & 1;
          }
        } else {
          at::Tensor g = scratch(g_buf, rn, cn);
          at::mm_out(g, pb.rows(pb.guide, blk.row_input, r0, rn), cg.t());
          tile_mask_bytes<T>(pb, b, g.data_ptr<T>(), cid, thr_p, tie_masked_p, r0, rn, task.c0, cn, m.data(),
                             nullptr);
        }
        const T* raw_p = raw.data_ptr<T>();
        T* p_p = p.data_ptr<T>();
        for (int64_t k = 0; k < K; ++k) {
          add_segment(raw, rs, cs, px, k);
          const T* row_inv = px.inv<T>(blk.row_input, k, row_start);
          const T* col_inv = px.inv<T>(task.input, k, task.c0);
          for (int64_t i = 0; i < rn; ++i) {
            const T row_scale = row_inv[i] * inv_tau, lse_i = lse_p[k * B + r0 + i];
            // The row's normalisation folded in: the matmul below takes the raw rows.
            const T s = scale_p[k * B + r0 + i] * row_inv[i];
            const T* raw_i = raw_p + i * cn;
            T* out = p_p + i * cn;
            prefix_prob_row(raw_i, m.data() + i * cn, col_inv, out, cn, row_scale, lse_i, s);
            const int64_t jt = blk.is_target ? pb.offset + r0 + i - task.c0 : -1;
            if (jt >= 0 && jt < cn) out[jt] = (std::exp(raw_i[jt] * row_scale * col_inv[jt] - lse_i) - T(1)) * s;
          }
          grads[k][task.input].narrow(0, task.c0, cn).addmm_(p.t(), rs.narrow(1, 0, px.dims[k]));
        }
      }
    }
  });
}

}  // namespace

// Forward: returns (losses (B,), lse (B,), thr (B,), tie decisions (B,) uint8, e_anchor (B, d),
// e_positive (B, d) or empty, guide-mask bits (int64 words, B * N / 64 of them) or empty). With
// `keep_mask`, pass 2 can take the bits instead of recomputing the guide dots. `ids`: the int32 id
// of every guide row, per guide input (gist_fast/backends/ties.py).
std::vector<at::Tensor> gist_forward(const std::vector<at::Tensor>& student, const std::vector<at::Tensor>& guide,
                                     const std::vector<at::Tensor>& ids, double temperature, bool relative, double margin, bool contrast_anchors,
                                     bool contrast_positives, int64_t offset, int64_t tile_rows, int64_t tile_cols,
                                     bool keep_mask) {
  at::NoGradGuard no_grad;
  const Options opt = make_options(temperature, relative, margin, contrast_anchors, contrast_positives, offset,
                                   tile_rows, tile_cols);
  const Problem pb = prepare(student, guide, ids, opt, false);
  at::Tensor thr, tie_masked;
  std::tie(thr, tie_masked) = thresholds(pb, opt);
  const int64_t B = pb.batch, d = pb.student[0].size(1);
  auto options = pb.student[0].options();
  at::Tensor lse = at::empty({B}, options), losses = at::empty({B}, options);
  at::Tensor e_anchor = at::empty({B, d}, options);
  at::Tensor e_positive = contrast_positives ? at::empty({B, d}, options) : at::Tensor();
  at::Tensor mask = at::zeros({keep_mask ? pb.mask_words : 0}, options.dtype(at::kLong));
  uint64_t* mask_p = keep_mask ? reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>()) : nullptr;
  AT_DISPATCH_FLOATING_TYPES(pb.dtype, "gist_row_pass",
                             [&] {
                               row_pass<scalar_t>(pb, opt, thr, tie_masked, losses, lse, e_anchor, e_positive, mask_p);
                             });
  return {losses, lse, thr, tie_masked, e_anchor, e_positive.defined() ? e_positive : at::empty({0}, options), mask};
}

// Backward: the gradient of sum_i w_i * loss_i w.r.t. every student input (compute dtype), where
// `row_weight` holds w_i. With `consume`, the storage of e_anchor / e_positive is reused. `mask` is
// the forward's guide-mask bits, or empty to recompute the guide dots.
std::vector<at::Tensor> gist_backward(const std::vector<at::Tensor>& student, const std::vector<at::Tensor>& guide,
                                      const std::vector<at::Tensor>& ids, const at::Tensor& lse, const at::Tensor& thr,
                                      const at::Tensor& tie_masked, at::Tensor e_anchor,
                                      at::Tensor e_positive, const at::Tensor& row_weight, double temperature,
                                      bool relative, double margin, bool contrast_anchors, bool contrast_positives,
                                      int64_t offset, int64_t tile_rows, int64_t tile_cols, bool consume,
                                      const at::Tensor& mask) {
  at::NoGradGuard no_grad;
  const Options opt = make_options(temperature, relative, margin, contrast_anchors, contrast_positives, offset,
                                   tile_rows, tile_cols);
  const Problem pb = prepare(student, guide, ids, opt, true);
  TORCH_CHECK(tie_masked.scalar_type() == at::kByte && tie_masked.numel() == pb.batch && tie_masked.is_contiguous(),
              "gist_fast cpp: the tie decisions do not match the inputs");
  const int64_t B = pb.batch, o = pb.offset;
  const uint64_t* mask_p = nullptr;
  if (mask.numel() > 0) {
    TORCH_CHECK(mask.numel() == pb.mask_words && mask.scalar_type() == at::kLong && mask.is_contiguous(),
                "gist_fast cpp: the guide mask does not match the inputs");
    mask_p = reinterpret_cast<const uint64_t*>(mask.data_ptr<int64_t>());
  }
  at::Tensor scale = (row_weight.to(pb.dtype) / temperature).contiguous();
  at::Tensor scale_col = scale.unsqueeze(1);

  // Row side: dâ_i = scale_i (E_a,i - p̂_{o+i}); dp̂_{o+i} = scale_i E_p,i; negatives 0.
  std::vector<at::Tensor> grads;
  at::Tensor da = consume ? e_anchor : e_anchor.clone();
  da.sub_(pb.rows(pb.student, kPositive, 0, B)).mul_(scale_col);
  grads.push_back(da);
  at::Tensor dp;
  if (e_positive.numel() > 0 && pb.candidates == B && consume) {
    dp = e_positive.mul_(scale_col);
  } else {
    dp = at::zeros_like(pb.student[kPositive]);
    if (e_positive.numel() > 0) dp.narrow(0, o, B).addcmul_(e_positive, scale_col);
  }
  grads.push_back(dp);
  for (size_t m = 2; m < pb.student.size(); ++m) grads.push_back(at::zeros_like(pb.student[m]));

  AT_DISPATCH_FLOATING_TYPES(pb.dtype, "gist_column_pass",
                             [&] { column_pass<scalar_t>(pb, opt, lse, thr, tie_masked, scale, grads, mask_p); });
  through_normalisation(pb, grads);
  return grads;
}

// Matryoshka forward (dims ascending): returns [losses (K, B), lse (K, B), thr (B,), tie decisions
// (B,) uint8, guide-mask bits or empty, e_anchor[0..K) (B x m_k), e_positive[0..K) (B x m_k, or
// empty without PP)]. The per-dim row losses are weighted by the caller.
std::vector<at::Tensor> gist_forward_matryoshka(
    const std::vector<at::Tensor>& student, const std::vector<at::Tensor>& guide, const std::vector<at::Tensor>& ids,
    const std::vector<int64_t>& dims, double temperature, bool relative, double margin, bool contrast_anchors,
    bool contrast_positives, int64_t offset, int64_t tile_rows, int64_t tile_cols, bool keep_mask) {
  at::NoGradGuard no_grad;
  const Options opt = make_options(temperature, relative, margin, contrast_anchors, contrast_positives, offset,
                                   tile_rows, tile_cols);
  const Problem pb = prepare(student, guide, ids, opt, false, true);
  const Prefixes px(pb, dims);
  at::Tensor thr, tie_masked;
  std::tie(thr, tie_masked) = thresholds(pb, opt);
  const int64_t B = pb.batch, K = px.size();
  auto options = pb.student[0].options();
  at::Tensor lse = at::empty({K, B}, options), losses = at::empty({K, B}, options);
  std::vector<at::Tensor> e_anchor, e_positive;
  for (int64_t k = 0; k < K; ++k) {
    e_anchor.push_back(at::empty({B, px.dims[k]}, options));
    if (contrast_positives) e_positive.push_back(at::empty({B, px.dims[k]}, options));
  }
  at::Tensor mask = at::zeros({keep_mask ? pb.mask_words : 0}, options.dtype(at::kLong));
  uint64_t* mask_p = keep_mask ? reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>()) : nullptr;
  AT_DISPATCH_FLOATING_TYPES(pb.dtype, "gist_matryoshka_row_pass", [&] {
    matryoshka_row_pass<scalar_t>(pb, opt, px, thr, tie_masked, losses, lse, e_anchor, e_positive, mask_p);
  });
  std::vector<at::Tensor> out = {losses, lse, thr, tie_masked, mask};
  for (int64_t k = 0; k < K; ++k) out.push_back(e_anchor[k]);
  for (int64_t k = 0; k < K; ++k) out.push_back(contrast_positives ? e_positive[k] : at::empty({0}, options));
  return out;
}

// Matryoshka backward: the gradient of sum_i row_weight_i sum_k weights_k loss_ki w.r.t. every
// student input (compute dtype, full width). With `consume`, the storage of e_anchor / e_positive
// is reused. `mask`: the forward's guide-mask bits, or empty to recompute the guide dots.
std::vector<at::Tensor> gist_backward_matryoshka(
    const std::vector<at::Tensor>& student, const std::vector<at::Tensor>& guide, const std::vector<at::Tensor>& ids,
    const std::vector<int64_t>& dims, const std::vector<double>& weights, const at::Tensor& lse, const at::Tensor& thr,
    const at::Tensor& tie_masked, std::vector<at::Tensor> e_anchor, std::vector<at::Tensor> e_positive,
    const at::Tensor& row_weight, double temperature, bool relative, double margin, bool contrast_anchors,
    bool contrast_positives, int64_t offset, int64_t tile_rows, int64_t tile_cols, bool consume,
    const at::Tensor& mask) {
  at::NoGradGuard no_grad;
  const Options opt = make_options(temperature, relative, margin, contrast_anchors, contrast_positives, offset,
                                   tile_rows, tile_cols);
  const Problem pb = prepare(student, guide, ids, opt, false, true);
  const Prefixes px(pb, dims);
  const int64_t B = pb.batch, o = pb.offset, K = px.size();
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == K && static_cast<int64_t>(e_anchor.size()) == K &&
                  static_cast<int64_t>(e_positive.size()) == K,
              "gist_fast cpp: one weight and one row-side mean per Matryoshka dim");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == K && lse.size(1) == B && lse.is_contiguous() &&
                  lse.scalar_type() == pb.dtype,
              "gist_fast cpp: lse does not match the inputs");
  TORCH_CHECK(tie_masked.scalar_type() == at::kByte && tie_masked.numel() == B && tie_masked.is_contiguous(),
              "gist_fast cpp: the tie decisions do not match the inputs");
  const uint64_t* mask_p = nullptr;
  if (mask.numel() > 0) {
    TORCH_CHECK(mask.numel() == pb.mask_words && mask.scalar_type() == at::kLong && mask.is_contiguous(),
                "gist_fast cpp: the guide mask does not match the inputs");
    mask_p = reinterpret_cast<const uint64_t*>(mask.data_ptr<int64_t>());
  }
  at::Tensor base = row_weight.to(pb.dtype) / temperature;
  std::vector<at::Tensor> scales;
  for (int64_t k = 0; k < K; ++k) scales.push_back(base * weights[k]);
  at::Tensor scale = at::stack(scales).contiguous();  // (K, B)

  // Row side per dim: dâ^k_i = s^k_i (E^k_a,i - p̂^k_{o+i}); dp̂^k_{o+i} = s^k_i E^k_p,i; negatives 0.
  at::Tensor positives = pb.rows(pb.student, kPositive, 0, B);
  std::vector<std::vector<at::Tensor>> grads(K);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t mk = px.dims[k];
    at::Tensor s = scale[k].unsqueeze(1);
    at::Tensor positive_hat = positives.narrow(1, 0, mk) * px.inv_norm[kPositive][k].narrow(0, o, B).unsqueeze(1);
    at::Tensor da = consume ? e_anchor[k] : e_anchor[k].clone();
    da.sub_(positive_hat).mul_(s);
    grads[k].push_back(da);
    at::Tensor dp;
    if (e_positive[k].numel() > 0 && pb.candidates == B && consume) {
      dp = e_positive[k].mul_(s);
    } else {
      dp = at::zeros({pb.candidates, mk}, positives.options());
      if (e_positive[k].numel() > 0) dp.narrow(0, o, B).addcmul_(e_positive[k], s);
    }
    grads[k].push_back(dp);
    for (size_t x = 2; x < pb.student.size(); ++x)
      grads[k].push_back(at::zeros({pb.student[x].size(0), mk}, positives.options()));
  }
  AT_DISPATCH_FLOATING_TYPES(pb.dtype, "gist_matryoshka_column_pass", [&] {
    matryoshka_column_pass<scalar_t>(pb, opt, px, lse, thr, tie_masked, scale, grads, mask_p);
  });

  // Through each prefix's normalisation, summed over the dims:
  // dx[:, :m_k] += (dx̂^k - x̂^k (x̂^k·dx̂^k)) / max(|x[:m_k]|, eps); below eps the norm is constant.
  std::vector<at::Tensor> out;
  for (size_t x = 0; x < pb.student.size(); ++x) {
    at::Tensor dx = at::zeros_like(pb.student[x]);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t mk = px.dims[k];
      at::Tensor inv = px.inv_norm[x][k].unsqueeze(1);
      at::Tensor& g = grads[k][x];
      at::Tensor x_hat = pb.student[x].narrow(1, 0, mk) * inv;
      at::Tensor radial = (x_hat * g).sum(1, true);
      radial.masked_fill_((px.norm[x][k] < kNormEps).unsqueeze(1), 0.0);
      dx.narrow(1, 0, mk).add_(g.sub_(x_hat.mul_(radial)).mul_(inv));
    }
    out.push_back(dx);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gist-fast: fused two-pass GIST loss on the CPU (float32 / float64)";
  m.def("forward", &gist_forward, "Pass 1: per-row losses, lse, thresholds and row-side means");
  m.def("backward", &gist_backward, "Row-side and column-side (pass 2) gradients w.r.t. the student inputs");
  m.def("forward_matryoshka", &gist_forward_matryoshka,
        "Pass 1 for every Matryoshka dim in one sweep: per-dim row losses, lse and row-side means");
  m.def("backward_matryoshka", &gist_backward_matryoshka,
        "Gradients of the weighted Matryoshka loss w.r.t. the student inputs (every dim in one sweep)");
}
