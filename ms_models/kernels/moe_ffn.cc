// MoeFFN: the routed experts of a mixture-of-experts layer over a flat token batch, as one MindSpore
// custom CPU operator (ops.Custom, func_type "aot"). Built like paged_attention.cc (ms_models/kernels).
//
// Contract (all inputs contiguous; params = 8 inputs then 1 output):
//  0 x          f32 [T, H]     the layer's normed hidden states (input of the router and of every expert)
//  1 logits     f32 [T, E]     router logits over all E experts (x @ router weight, a MindSpore matmul)
//  2 w_gate     f32 [El, H, I] the gate projection ([in, out]) of the El experts this rank holds:
//                 experts first_expert .. first_expert + El - 1 (all E without expert parallel)
//  3 w_up       f32 [El, H, I]
//  4 w_down     f32 [El, I, H]
//  5 query_start_loc i32 [R+1] rows [qsl[0], qsl[num_reqs]) are the step's real tokens; the others
//                 (padding up to the token bucket) are not routed and their output rows are zero
//  6 params     i32 [2] = (num_reqs, sliding window): the attention kernel's per-step input, shared
//  7 moe        i32 [3] = (top_k, norm_topk_prob, first_expert)
//  8 out        f32 [T, H]
//
// Routing as HF transformers (Qwen2-MoE, Qwen3-MoE, Mixtral): p = softmax(logits) over the E
// experts, the top_k largest p (ties: lower expert id first), divided by their sum when norm_topk_prob.
// out[t] = sum_k p_k * down_e(silu(gate_e(x[t])) * up_e(x[t])) for the token's experts e that this rank
// holds (expert parallel: each rank adds its part, the caller all-reduces; every rank routes every token).
//
// Grouped compute: the T*top_k (token, expert) assignments are counting-sorted by expert, so each
// expert's rows form one contiguous segment of a [T*top_k] layout; an expert no token chose costs
// nothing. Phase 1: per (expert, chunk of CW = 32 intermediate columns) the expert's rows, RB at a time,
// through gate and up (one pass over x, the weight chunk stays in cache across row blocks), silu(g)*u
// into act [T*top_k, I]. Phase 2: per (expert, chunk of CW hidden columns) act @ w_down into
// y [T*top_k, H]. Phase 3: per token, the weighted sum of its top_k rows of y (no atomics: the result
// does not depend on the thread count).
//
// Threads: OpenMP, at most MS_PA_THREADS (default 2, the attention kernel's setting), one for small
// work (waking the team costs more than it saves).

#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "common.h"

#ifndef MOE_CLONES
#define MOE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif

namespace {

constexpr int RB = 4;   // rows per register block
constexpr int CW = 32;  // output columns per work unit (2 x RB x CW accumulators: 16 AVX-512 registers)
constexpr int64_t SERIAL_FLOPS = 2000000;  // below this, one thread

struct Unit {
  int32_t e, c0;  // expert, first output column
};

bool is(const char *dtype, const char *want) { return dtype && strcmp(dtype, want) == 0; }

int num_threads(int64_t flops, int64_t units) {
  if (flops < SERIAL_FLOPS || units < 2) return 1;
  return (int)std::min<int64_t>(max_kernel_threads(), units);
}

// Top-k of one token from its router logits: expert ids and weights (see the contract).
void route(const float *__restrict logits, int64_t E, int K, bool norm, int32_t *ids, float *w) {
  float mx = logits[0];
  for (int64_t e = 1; e < E; ++e) mx = std::max(mx, logits[e]);
  double total = 0;
  for (int64_t e = 0; e < E; ++e) total += std::exp((double)logits[e] - mx);
  double chosen = 0;
  for (int k = 0; k < K; ++k) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e) {
      bool taken = false;
      for (int j = 0; j < k; ++j) taken |= ids[j] == e;
      if (!taken && (best < 0 || logits[e] > logits[best])) best = e;
    }
    ids[k] = (int32_t)best;
    const double p = std::exp((double)logits[best] - mx) / total;
    w[k] = (float)p;
    chosen += p;
  }
  if (norm)
    for (int k = 0; k < K; ++k) w[k] = (float)((double)w[k] / chosen);
}

// One block of NR rows (token rows xr) through gate and up: act rows ``orow`` = silu(x @ wg[:, c0:c0+w]) *
// (x @ wu[:, c0:c0+w]). W: the width at compile time (CW), 0: ``cw``; NR and W fixed keep the accumulators
// in registers.
template <int W, int NR>
PA_INLINE void gate_up_block(const float *const *xr, const float *__restrict wg, const float *__restrict wu,
                             int64_t H, int64_t I, int64_t c0, int64_t cw, float *__restrict orow) {
  const int64_t width = W ? W : cw;
  float ag[NR][CW] = {}, au[NR][CW] = {};
  for (int64_t h = 0; h < H; ++h) {
    const float *g = wg + h * I + c0, *u = wu + h * I + c0;
    for (int r = 0; r < NR; ++r) {
      const float xv = xr[r][h];
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) {
        ag[r][c] += xv * g[c];
        au[r][c] += xv * u[c];
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    float *o = orow + r * I + c0;
    for (int64_t c = 0; c < width; ++c) o[c] = ag[r][c] / (1.f + std::exp(-ag[r][c])) * au[r][c];
  }
}

// One block of NR act rows (from ``arow``) through down: y rows ``yrow`` [c0:c0+w] = act @ wd[:, c0:c0+w].
template <int W, int NR>
PA_INLINE void down_block(const float *__restrict arow, const float *__restrict wd, int64_t I, int64_t H, int64_t c0,
                          int64_t cw, float *__restrict yrow) {
  const int64_t width = W ? W : cw;
  float a[NR][CW] = {};
  for (int64_t i = 0; i < I; ++i) {
    const float *d = wd + i * H + c0;
    for (int r = 0; r < NR; ++r) {
      const float av = arow[r * I + i];
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) a[r][c] += av * d[c];
    }
  }
  for (int r = 0; r < NR; ++r) memcpy(yrow + r * H + c0, a[r], sizeof(float) * width);
}

template <int W>
PA_INLINE void gate_up_w(const float *x, const int32_t *tok, int64_t n, const float *wg, const float *wu, int64_t H,
                         int64_t I, int64_t c0, int64_t cw, float *act) {
  for (int64_t r0 = 0; r0 < n; r0 += RB) {
    const int nr = (int)std::min<int64_t>(RB, n - r0);
    const float *xr[RB];
    for (int r = 0; r < nr; ++r) xr[r] = x + (int64_t)tok[r0 + r] * H;
    float *o = act + r0 * I;
    switch (nr) {
      case 4: gate_up_block<W, 4>(xr, wg, wu, H, I, c0, cw, o); break;
      case 3: gate_up_block<W, 3>(xr, wg, wu, H, I, c0, cw, o); break;
      case 2: gate_up_block<W, 2>(xr, wg, wu, H, I, c0, cw, o); break;
      default: gate_up_block<W, 1>(xr, wg, wu, H, I, c0, cw, o);
    }
  }
}

template <int W>
PA_INLINE void down_w(const float *act, int64_t n, const float *wd, int64_t I, int64_t H, int64_t c0, int64_t cw,
                      float *y) {
  for (int64_t r0 = 0; r0 < n; r0 += RB) {
    const int nr = (int)std::min<int64_t>(RB, n - r0);
    const float *a = act + r0 * I;
    float *o = y + r0 * H;
    switch (nr) {
      case 4: down_block<W, 4>(a, wd, I, H, c0, cw, o); break;
      case 3: down_block<W, 3>(a, wd, I, H, c0, cw, o); break;
      case 2: down_block<W, 2>(a, wd, I, H, c0, cw, o); break;
      default: down_block<W, 1>(a, wd, I, H, c0, cw, o);
    }
  }
}

// act[seg] = silu(x[tok] @ wg[:, c0:c0+cw]) * (x[tok] @ wu[:, c0:c0+cw]) for one expert's segment: its n
// assignments' token rows ``tok``, act rows from ``act`` on.
MOE_CLONES void gate_up(const float *x, const int32_t *tok, int64_t n, const float *wg, const float *wu, int64_t H,
                        int64_t I, int64_t c0, int64_t cw, float *act) {
  if (cw == CW)
    gate_up_w<CW>(x, tok, n, wg, wu, H, I, c0, cw, act);
  else
    gate_up_w<0>(x, tok, n, wg, wu, H, I, c0, cw, act);
}

// y[seg, c0:c0+cw] = act[seg] @ wd[:, c0:c0+cw] for one expert's segment of n rows (act and y from its first row).
MOE_CLONES void down(const float *act, int64_t n, const float *wd, int64_t I, int64_t H, int64_t c0, int64_t cw,
                     float *y) {
  if (cw == CW)
    down_w<CW>(act, n, wd, I, H, c0, cw, y);
  else
    down_w<0>(act, n, wd, I, H, c0, cw, y);
}

}  // namespace

extern "C" int MoeFFN(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                      void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 9) return 1;
  static const char *want_dtype[9] = {"float32", "float32", "float32", "float32", "float32",
                                      "int32",   "int32",   "int32",   "float32"};
  static const int want_ndim[9] = {2, 2, 3, 3, 3, 1, 1, 1, 2};
  for (int i = 0; i < 9; ++i)
    if (!is(dtypes[i], want_dtype[i]) || ndims[i] != want_ndim[i]) return 2;
  const int64_t T = shapes[0][0], H = shapes[0][1], E = shapes[1][1], I = shapes[2][2], R = shapes[5][0] - 1;
  const int64_t El = shapes[2][0];  // local experts
  if (shapes[1][0] != T || shapes[2][1] != H || shapes[3][0] != El || shapes[3][1] != H || shapes[3][2] != I ||
      shapes[4][0] != El || shapes[4][1] != I || shapes[4][2] != H || shapes[6][0] != 2 || shapes[7][0] != 3 ||
      shapes[8][0] != T || shapes[8][1] != H || E <= 0 || El <= 0 || El > E || R < 0)
    return 3;
  const float *x = static_cast<const float *>(params[0]);
  const float *logits = static_cast<const float *>(params[1]);
  const float *wg = static_cast<const float *>(params[2]);
  const float *wu = static_cast<const float *>(params[3]);
  const float *wd = static_cast<const float *>(params[4]);
  const int32_t *qsl = static_cast<const int32_t *>(params[5]);
  const int32_t *prm = static_cast<const int32_t *>(params[6]);
  const int32_t *moe = static_cast<const int32_t *>(params[7]);
  float *out = static_cast<float *>(params[8]);
  const int num_reqs = prm[0], K = moe[0];
  const bool norm = moe[1] != 0;
  const int64_t e_first = moe[2];
  if (num_reqs < 0 || num_reqs > R || K < 1 || K > E || e_first < 0 || e_first + El > E) return 4;
  const int64_t t0 = num_reqs > 0 ? qsl[0] : 0, t1 = num_reqs > 0 ? qsl[num_reqs] : 0;
  if (t0 < 0 || t1 < t0 || t1 > T) return 5;
  memset(out, 0, sizeof(float) * T * H);
  const int64_t n = t1 - t0, NK = n * K;
  if (n == 0) return 0;

  // routing and the counting sort by local expert (assignments to other ranks' experts: pos -1, no row)
  std::vector<int32_t> ids(NK);
  std::vector<float> w(NK);
  for (int64_t t = 0; t < n; ++t) route(logits + (t0 + t) * E, E, K, norm, ids.data() + t * K, w.data() + t * K);
  for (int64_t a = 0; a < NK; ++a) ids[a] = (ids[a] >= e_first && ids[a] < e_first + El) ? ids[a] - e_first : -1;
  std::vector<int64_t> start(El + 1, 0);
  for (int64_t a = 0; a < NK; ++a)
    if (ids[a] >= 0) start[ids[a] + 1]++;
  for (int64_t e = 0; e < El; ++e) start[e + 1] += start[e];
  std::vector<int64_t> pos(NK, -1), fill(start.begin(), start.end() - 1);
  std::vector<int32_t> tok(std::max<int64_t>(start[El], 1));  // token row of each sorted assignment
  for (int64_t a = 0; a < NK; ++a) {
    if (ids[a] < 0) continue;
    const int64_t p = fill[ids[a]]++;
    pos[a] = p;
    tok[p] = (int32_t)(t0 + a / K);
  }
  const int64_t NL = start[El];  // local assignments

  std::vector<Unit> u1, u2;
  for (int64_t e = 0; e < El; ++e) {
    if (start[e + 1] == start[e]) continue;
    for (int64_t c = 0; c < I; c += CW) u1.push_back({(int32_t)e, (int32_t)c});
    for (int64_t c = 0; c < H; c += CW) u2.push_back({(int32_t)e, (int32_t)c});
  }
  // work buffers kept between calls (grown to the largest step's, never zeroed: every row used is written first)
  static thread_local std::vector<float> act, y;
  if (act.size() < (size_t)(NL * I)) act.resize((size_t)(NL * I));
  if (y.size() < (size_t)(NL * H)) y.resize((size_t)(NL * H));
  float *act_p = act.data(), *y_p = y.data();  // the caller's buffers (thread_local: other threads have their own)
  const int nthreads = num_threads(6 * NL * H * I, (int64_t)u1.size());
  const int64_t n1 = (int64_t)u1.size(), n2 = (int64_t)u2.size();

#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n1; ++i) {
      const int64_t e = u1[i].e, c0 = u1[i].c0;
      gate_up(x, tok.data() + start[e], start[e + 1] - start[e], wg + e * H * I, wu + e * H * I, H, I, c0,
              std::min<int64_t>(CW, I - c0), act_p + start[e] * I);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n2; ++i) {
      const int64_t e = u2[i].e, c0 = u2[i].c0;
      down(act_p + start[e] * I, start[e + 1] - start[e], wd + e * I * H, I, H, c0,
           std::min<int64_t>(CW, H - c0), y_p + start[e] * H);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n; ++t) {
      float *o = out + (t0 + t) * H;
      for (int k = 0; k < K; ++k) {
        if (pos[t * K + k] < 0) continue;
        const float wk = w[t * K + k];
        const float *yr = y_p + pos[t * K + k] * H;
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) o[h] += wk * yr[h];
      }
    }
  }
  return 0;
}
