// SmallMatMul: y [M, N] = x [M, K] @ w [K, N] for the few rows of a decode step (M <= 16; the model uses it
// for token buckets of at most SMALL_MATMUL_ROWS, ms_models.layers), as MindSpore custom CPU operators
// (ops.Custom, func_type "aot"). Built by ms_models/kernels/__init__.py like paged_attention.cc.
//
// Why: MindSpore's MatMul runs a product of 1-16 rows on one thread (measured: the same time with 1 and 2
// threads), reading the weights at ~17 GB/s, while decode is weight-bandwidth bound and two cores read ~30.
// Here the weight's columns are split between MS_PA_THREADS threads; each streams eight weight rows at a time
// (sequentially, [K, N] row-major as the model stores it) into per-row accumulators that stay in L1/L2
// (chunks of 2,048 columns), so every weight byte is read once per call whatever M is.
//
// Contract: all f32, contiguous, 2-D but eps ([1]); M <= 16; returns nonzero (MindSpore raises) otherwise.
// - SmallMatMul: x [M, K], w [K, N] -> y [M, N].
// - SmallMatMulT: x, w [N, K] -> x @ w^T (the lm head's [vocab, hidden]; each w row dotted with every x row).
// - SmallMatMulAdd: x, w, r [M, N] -> r + x @ w (o_proj / down_proj and the residual add after them).
// - SmallMatMul3: x, w0, w1, w2 -> x @ w0, x @ w1, x @ w2 (a layer's q, k, v: one launch and one wake of the
//   pool instead of three; each thread takes its share of every weight's columns).
// - SmallGateUp: x, w_gate, w_up (both [K, N]) -> silu(x @ w_gate) * (x @ w_up) (a gated MLP's first half:
//   one launch instead of two products, a SiLU and a multiply).
// - SmallNormMatMul3, SmallNormGateUp: the same of RMSNorm(x) = x / sqrt(mean(x^2) + eps) per row, eps [1] the
//   second input (the norm's gamma is folded into the weights), replacing the norm's five kernels.
// Sums run in another order than MindSpore's MatMul: results differ in the last bits (relative 1e-6).
//
// Threads: not OpenMP. A helper woken from sleep for every call costs ~65 us on this VM (a futex wake of an
// idle vCPU), as much as a 1,536-column product; so the helpers of a small pool spin for SPIN_US after each
// call, yielding the core (sched_yield) to any other runnable thread, and only then sleep. Decode graphs call
// the kernel every few tens of microseconds; a prefill graph does not call it, and its helpers sleep.

#include <stdint.h>
#include <string.h>
#include <math.h>
#include <sched.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>
#include "common.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // v16 by value in always-inline helpers only

#ifndef SM_CLONES  // tests build with -DSM_CLONES= to check one code path
#define SM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif


namespace {
typedef float v16 __attribute__((vector_size(64), aligned(4)));  // 16 floats: one zmm, two ymm, four xmm
constexpr int KU = 8;                 // weight rows per pass
constexpr int64_t CHUNK = 2048;       // columns per accumulator block
constexpr int SPIN_US = 300;          // a helper's spin after a call, before it sleeps

PA_INLINE v16 ld(const float *p) { v16 v; memcpy(&v, p, 64); return v; }
PA_INLINE void st(float *p, v16 v) { memcpy(p, &v, 64); }
PA_INLINE float silu(float g) { return g / (1.f + expf(-g)); }

// What a product's columns end as: y = x @ w (STORE), y = silu(y) * (x @ w) where y holds x @ w_gate (GATE), or
// y = r + x @ w (ADD; r [M, N] like y).
enum Epi { STORE, GATE, ADD };

// y[:, j0:j1] = x @ w[:, j0:j1] for M <= 16 rows, ended as epi says; j1 - j0 a multiple of 16 (the caller does
// the tail).
SM_CLONES void cols(const float *__restrict x, int64_t M, int64_t K, const float *__restrict w, int64_t N, int64_t j0,
                 int64_t j1, float *__restrict y, float *__restrict acc, Epi epi, const float *__restrict r) {
  const int64_t nc = j1 - j0;
  for (int64_t i = 0; i < M * nc; ++i) acc[i] = 0.f;
  int64_t k = 0;
  for (; k + KU <= K; k += KU) {
    const float *wk = w + k * N + j0;
    float xs[16][KU];
    for (int64_t m = 0; m < M; ++m)
      for (int u = 0; u < KU; ++u) xs[m][u] = x[m * K + k + u];
    for (int64_t j = 0; j < nc; j += 16) {
      v16 wv[KU];
      for (int u = 0; u < KU; ++u) wv[u] = ld(wk + u * N + j);
      for (int64_t m = 0; m < M; ++m) {
        v16 a = ld(acc + m * nc + j);
        for (int u = 0; u < KU; ++u) a += xs[m][u] * wv[u];
        st(acc + m * nc + j, a);
      }
    }
  }
  for (; k < K; ++k) {
    const float *wk = w + k * N + j0;
    for (int64_t j = 0; j < nc; j += 16) {
      const v16 wv = ld(wk + j);
      for (int64_t m = 0; m < M; ++m) st(acc + m * nc + j, ld(acc + m * nc + j) + x[m * K + k] * wv);
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    float *ym = y + m * N + j0;
    const float *am = acc + m * nc;
    if (epi == STORE) {
      memcpy(ym, am, sizeof(float) * nc);
    } else if (epi == GATE) {
      for (int64_t j = 0; j < nc; ++j) ym[j] = silu(ym[j]) * am[j];
    } else {
      const float *rm = r + m * N + j0;
      for (int64_t j = 0; j < nc; ++j) ym[j] = rm[j] + am[j];
    }
  }
}

void tail(const float *x, int64_t M, int64_t K, const float *w, int64_t N, int64_t j0, float *y, Epi epi,
          const float *r) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = j0; j < N; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * w[k * N + j];
      float &o = y[m * N + j];
      o = epi == STORE ? s : epi == GATE ? silu(o) * s : r[m * N + j] + s;
    }
}

// y[:, v0:v1] = x @ t[v0:v1, :]^T (t [N, K] row-major: the lm head's [vocab, hidden]): each row of t is read
// once, dotted with every row of x (M accumulators in registers).
SM_CLONES void rows_t(const float *__restrict x, int64_t M, int64_t K, const float *__restrict t, int64_t N, int64_t v0,
                      int64_t v1, float *__restrict y) {
  const int64_t k16 = K / 16 * 16;
  for (int64_t v = v0; v < v1; ++v) {
    const float *tv = t + v * K;
    v16 acc[16];
    for (int64_t m = 0; m < M; ++m) acc[m] = v16{};
    for (int64_t k = 0; k < k16; k += 16) {
      const v16 w = ld(tv + k);
      for (int64_t m = 0; m < M; ++m) acc[m] += ld(x + m * K + k) * w;
    }
    for (int64_t m = 0; m < M; ++m) {
      float s = 0.f;
      for (int i = 0; i < 16; ++i) s += acc[m][i];
      for (int64_t k = k16; k < K; ++k) s += x[m * K + k] * tv[k];
      y[m * N + v] = s;
    }
  }
}

// The pool: max_kernel_threads() - 1 helpers, started on first use (never before MindSpore's first op, so
// never across a fork), never destroyed (their threads outlive exit()).
struct Pool {
  int helpers = 0;
  std::atomic<uint64_t> gen{0};
  std::atomic<int> left{0};
  std::mutex mu;
  std::condition_variable cv;
  int sleeping = 0;
  void (*fn)(void *, int) = nullptr;
  void *ctx = nullptr;

  explicit Pool(int n) : helpers(n) {
    for (int i = 0; i < n; ++i) std::thread([this, i] { loop(i + 1); }).detach();
  }
  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(SPIN_US);
      int spins = 0;
      while (gen.load(std::memory_order_acquire) == seen) {
        if (++spins % 64 == 0) {
          if (std::chrono::steady_clock::now() > until) {
            std::unique_lock<std::mutex> lk(mu);
            ++sleeping;
            cv.wait(lk, [&] { return gen.load(std::memory_order_acquire) != seen; });
            --sleeping;
            break;
          }
          sched_yield();
        }
      }
      seen = gen.load(std::memory_order_acquire);
      fn(ctx, id);
      left.fetch_sub(1, std::memory_order_acq_rel);
    }
  }
  void run(void (*f)(void *, int), void *c) {
    fn = f;
    ctx = c;
    left.store(helpers, std::memory_order_release);
    gen.fetch_add(1, std::memory_order_acq_rel);
    {
      std::lock_guard<std::mutex> lk(mu);
      if (sleeping) cv.notify_all();
    }
    f(c, 0);
    while (left.load(std::memory_order_acquire) > 0) __builtin_ia32_pause();
  }
};

Pool &pool() {
  static Pool *p = new Pool(max_kernel_threads() - 1);  // never destroyed: its threads outlive exit()
  return *p;
}

constexpr int MAX_W = 3;   // products of one x per call

// An entry point's signature. params: x [M, K], eps [1] when norm, the weights, r [M, N] when add, then the
// outputs (one per weight, or one when gated).
struct Spec {
  int nw;            // weights
  bool transposed;   // one w, [N, K]: x @ w^T
  bool gated;        // y = silu(x @ w[0]) * (x @ w[1])
  bool norm;         // x replaced by x / sqrt(mean(x^2) + eps) per row (RMSNorm, its gamma folded into w)
  bool add;          // y = r + x @ w
};

struct Job {
  const float *x, *r;
  const float *w[MAX_W];
  float *y[MAX_W];
  int64_t N[MAX_W], per[MAX_W];  // per: columns per part (a multiple of 16 unless transposed)
  int64_t M, K;
  Spec spec;
};

int64_t shared_cols(const Job &j, int i) { return j.spec.transposed ? j.N[i] : j.N[i] / 16 * 16; }

Epi first_epi(const Job &j) { return j.spec.add ? ADD : STORE; }

void part(void *c, int id) {
  const Job &j = *static_cast<Job *>(c);
  thread_local std::vector<float> acc;
  if ((int64_t)acc.size() < j.M * CHUNK) acc.resize(j.M * CHUNK);
  for (int i = 0; i < (j.spec.gated ? 1 : j.spec.nw); ++i) {
    const int64_t j0 = id * j.per[i], j1 = std::min<int64_t>(shared_cols(j, i), j0 + j.per[i]);
    if (j0 >= j1) continue;
    if (j.spec.transposed) return rows_t(j.x, j.M, j.K, j.w[0], j.N[0], j0, j1, j.y[0]);
    for (int64_t c0 = j0; c0 < j1; c0 += CHUNK) {
      const int64_t c1 = std::min(j1, c0 + CHUNK);
      cols(j.x, j.M, j.K, j.w[i], j.N[i], c0, c1, j.y[i], acc.data(), first_epi(j), j.r);
      if (j.spec.gated) cols(j.x, j.M, j.K, j.w[1], j.N[1], c0, c1, j.y[0], acc.data(), GATE, nullptr);
    }
  }
}

bool is_f32(int i, int ndim, int *ndims, const char **dtypes) {
  return ndims[i] == ndim && dtypes[i] && strcmp(dtypes[i], "float32") == 0;
}

// Checks the contract (Spec) and runs the products.
int run(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, Spec spec) {
  const int nw = spec.nw, nin = 1 + spec.norm + nw + spec.add, nout = spec.gated ? 1 : nw;
  if (nparam != nin + nout || (spec.add && nw != 1)) return 1;
  for (int i = 0; i < nparam; ++i)
    if (!is_f32(i, spec.norm && i == 1 ? 1 : 2, ndims, dtypes)) return 1;
  Job j{};
  j.spec = spec;
  j.x = (const float *)params[0];
  j.M = shapes[0][0];
  j.K = shapes[0][1];
  if (j.M > 16 || (spec.norm && shapes[1][0] != 1)) return 2;
  const int w0 = 1 + spec.norm;
  int64_t work = 0, narrowest = INT64_MAX;
  for (int i = 0; i < nw; ++i) {
    const int64_t *ws = shapes[w0 + i], *ys = shapes[nin + (spec.gated ? 0 : i)];
    j.w[i] = (const float *)params[w0 + i];
    j.y[i] = (float *)params[nin + (spec.gated ? 0 : i)];
    j.N[i] = ws[spec.transposed ? 0 : 1];
    if (ws[spec.transposed ? 1 : 0] != j.K || ys[0] != j.M || ys[1] != j.N[i] || (spec.gated && j.N[i] != j.N[0]))
      return 2;
    work += j.K * j.N[i];
    narrowest = std::min(narrowest, shared_cols(j, i));
  }
  if (spec.add) {
    const int64_t *rs = shapes[w0 + nw];
    if (rs[0] != j.M || rs[1] != j.N[0]) return 2;
    j.r = (const float *)params[w0 + nw];
  }
  thread_local std::vector<float> xn;   // the normalised x (this call's; the pool reads it)
  if (spec.norm) {
    const float eps = *(const float *)params[1];
    xn.resize(j.M * j.K);
    for (int64_t m = 0; m < j.M; ++m) {
      const float *xm = j.x + m * j.K;
      double ss = 0.0;
      for (int64_t k = 0; k < j.K; ++k) ss += (double)xm[k] * xm[k];
      const float scale = (float)(1.0 / sqrt(ss / j.K + eps));
      for (int64_t k = 0; k < j.K; ++k) xn[m * j.K + k] = xm[k] * scale;
    }
    j.x = xn.data();
  }
  // a call under ~0.1 ms (K x N < 128 Ki floats in all) or a product under 32 columns runs on the calling thread
  const int parts = (work >= (1 << 17) && narrowest >= 32) ? max_kernel_threads() : 1;
  auto split = [&](int p) {
    for (int i = 0; i < nw; ++i)
      j.per[i] = spec.transposed ? (j.N[i] + p - 1) / p : (shared_cols(j, i) / 16 + p - 1) / p * 16;
  };
  split(parts);
  // MindSpore may launch independent kernels (q, k, v) at once: one call uses the pool, the others run alone
  static std::mutex in_use;
  std::unique_lock<std::mutex> lk(in_use, std::defer_lock);
  if (parts > 1 && lk.try_lock()) {
    pool().run(part, &j);
  } else {
    split(1);
    part(&j, 0);
  }
  if (!spec.transposed)
    for (int i = 0; i < nw; ++i) {
      const int64_t n16 = shared_cols(j, i);
      if (n16 < j.N[i])
        tail(j.x, j.M, j.K, j.w[i], j.N[i], n16, j.y[spec.gated ? 0 : i],
             spec.gated && i == 1 ? GATE : first_epi(j), j.r);
    }
  return 0;
}
}  // namespace

// An entry point MindSpore calls (func_type "aot": inputs, then outputs, in params) with its Spec.
#define SMALL_MATMUL_ENTRY(name, ...)                                                                           \
  extern "C" int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,  \
                      void *extra) {                                                                            \
    (void)stream;                                                                                               \
    (void)extra;                                                                                                \
    return run(nparam, params, ndims, shapes, dtypes, Spec __VA_ARGS__);                                        \
  }

// y = x @ w: params x, w, y.
SMALL_MATMUL_ENTRY(SmallMatMul, {1, false, false, false, false})

// y = x @ w^T, w [N, K] (the lm head's [vocab, hidden] table): params x, w, y.
SMALL_MATMUL_ENTRY(SmallMatMulT, {1, true, false, false, false})

// y = r + x @ w (a row-parallel product and the residual): params x, w, r, y.
SMALL_MATMUL_ENTRY(SmallMatMulAdd, {1, false, false, false, true})

// Three products of one x (a layer's q, k and v): params x, w0, w1, w2, y0, y1, y2.
SMALL_MATMUL_ENTRY(SmallMatMul3, {3, false, false, false, false})

// The same of RMSNorm(x) (gamma folded into the weights): params x, eps [1], w0, w1, w2, y0, y1, y2.
SMALL_MATMUL_ENTRY(SmallNormMatMul3, {3, false, false, true, false})

// A gated MLP's first half: y = silu(x @ w_gate) * (x @ w_up): params x, w_gate, w_up, y.
SMALL_MATMUL_ENTRY(SmallGateUp, {2, false, true, false, false})

// The same of RMSNorm(x): params x, eps [1], w_gate, w_up, y.
SMALL_MATMUL_ENTRY(SmallNormGateUp, {2, false, true, true, false})
