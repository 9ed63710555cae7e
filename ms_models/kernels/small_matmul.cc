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
// Contract: all f32, 2-D, contiguous; M <= 16; returns nonzero (MindSpore raises) otherwise.
// - SmallMatMul: x [M, K], w [K, N] -> y [M, N].
// - SmallMatMulT: x, w [N, K] -> x @ w^T (the lm head's [vocab, hidden]; each w row dotted with every x row).
// - SmallMatMul3: x, w0, w1, w2 -> x @ w0, x @ w1, x @ w2 (a layer's q, k, v: one launch and one wake of the
//   pool instead of three; each thread takes its share of every weight's columns).
// - SmallGateUp: x, w_gate, w_up (both [K, N]) -> silu(x @ w_gate) * (x @ w_up) (a gated MLP's first half:
//   one launch instead of two products, a SiLU and a multiply).
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
#include <climits>
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

// y[:, j0:j1] = x @ w[:, j0:j1] for M <= 16 rows; j1 - j0 a multiple of 16 (the caller does the tail).
// gate: y[:, j0:j1] = silu(y[:, j0:j1]) * (x @ w[:, j0:j1]) instead (y holds x @ w_gate there).
SM_CLONES void cols(const float *__restrict x, int64_t M, int64_t K, const float *__restrict w, int64_t N, int64_t j0,
                 int64_t j1, float *__restrict y, float *__restrict acc, bool gate) {
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
  if (!gate) {
    for (int64_t m = 0; m < M; ++m) memcpy(y + m * N + j0, acc + m * nc, sizeof(float) * nc);
    return;
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < nc; ++j) y[m * N + j0 + j] = silu(y[m * N + j0 + j]) * acc[m * nc + j];
}

void tail(const float *x, int64_t M, int64_t K, const float *w, int64_t N, int64_t j0, float *y, bool gate) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = j0; j < N; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * w[k * N + j];
      y[m * N + j] = gate ? silu(y[m * N + j]) * s : s;
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

struct Job {
  const float *x;
  const float *w[MAX_W];
  float *y[MAX_W];
  int64_t N[MAX_W], per[MAX_W];  // per: columns per part (a multiple of 16 unless transposed)
  int nw;                        // weights (and outputs)
  int64_t M, K;
  bool transposed;               // one w, [N, K]
  bool gated;                    // y[0] = silu(x @ w[0]) * (x @ w[1]): two weights, one output
};

int64_t shared_cols(const Job &j, int i) { return j.transposed ? j.N[i] : j.N[i] / 16 * 16; }

void part(void *c, int id) {
  const Job &j = *static_cast<Job *>(c);
  thread_local std::vector<float> acc;
  if ((int64_t)acc.size() < j.M * CHUNK) acc.resize(j.M * CHUNK);
  for (int i = 0; i < (j.gated ? 1 : j.nw); ++i) {
    const int64_t j0 = id * j.per[i], j1 = std::min<int64_t>(shared_cols(j, i), j0 + j.per[i]);
    if (j0 >= j1) continue;
    if (j.transposed) return rows_t(j.x, j.M, j.K, j.w[0], j.N[0], j0, j1, j.y[0]);
    for (int64_t c0 = j0; c0 < j1; c0 += CHUNK) {
      const int64_t c1 = std::min(j1, c0 + CHUNK);
      cols(j.x, j.M, j.K, j.w[i], j.N[i], c0, c1, j.y[i], acc.data(), false);
      if (j.gated) cols(j.x, j.M, j.K, j.w[1], j.N[1], c0, c1, j.y[0], acc.data(), true);
    }
  }
}

bool is_f32_2d(int i, int *ndims, const char **dtypes) {
  return ndims[i] == 2 && dtypes[i] && strcmp(dtypes[i], "float32") == 0;
}

// Checks the contract and runs the products: params = x, nw weights, then the outputs (nw, or one when gated).
int run(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, int nw, bool transposed,
        bool gated) {
  const int nout = gated ? 1 : nw;
  if (nparam != 1 + nw + nout) return 1;
  for (int i = 0; i < nparam; ++i)
    if (!is_f32_2d(i, ndims, dtypes)) return 1;
  Job j{};
  j.x = (const float *)params[0];
  j.M = shapes[0][0];
  j.K = shapes[0][1];
  j.nw = nw;
  j.transposed = transposed;
  j.gated = gated;
  if (j.M > 16) return 2;
  int64_t work = 0, narrowest = INT64_MAX;
  for (int i = 0; i < nw; ++i) {
    const int64_t *ws = shapes[1 + i], *ys = shapes[1 + nw + (gated ? 0 : i)];
    j.w[i] = (const float *)params[1 + i];
    j.y[i] = (float *)params[1 + nw + (gated ? 0 : i)];
    j.N[i] = ws[transposed ? 0 : 1];
    if (ws[transposed ? 1 : 0] != j.K || ys[0] != j.M || ys[1] != j.N[i] || j.N[i] != (gated ? j.N[0] : j.N[i]))
      return 2;
    work += j.K * j.N[i];
    narrowest = std::min(narrowest, shared_cols(j, i));
  }
  // a call under ~0.1 ms (K x N < 128 Ki floats in all) or a product under 32 columns runs on the calling thread
  const int parts = (work >= (1 << 17) && narrowest >= 32) ? max_kernel_threads() : 1;
  auto split = [&](int p) {
    for (int i = 0; i < nw; ++i)
      j.per[i] = transposed ? (j.N[i] + p - 1) / p : (shared_cols(j, i) / 16 + p - 1) / p * 16;
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
  if (!transposed)
    for (int i = 0; i < nw; ++i) {
      const int64_t n16 = shared_cols(j, i);
      if (n16 < j.N[i]) tail(j.x, j.M, j.K, j.w[i], j.N[i], n16, j.y[gated ? 0 : i], gated && i == 1);
    }
  return 0;
}
}  // namespace

extern "C" int SmallMatMul(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                           void *extra) {
  (void)stream;
  (void)extra;
  return run(nparam, params, ndims, shapes, dtypes, 1, false, false);
}

// The same with w [N, K] (y = x @ w^T): the lm head's [vocab, hidden] table.
extern "C" int SmallMatMulT(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return run(nparam, params, ndims, shapes, dtypes, 1, true, false);
}

// Three products of one x in one call (a layer's q, k and v): params x, w0, w1, w2, y0, y1, y2.
extern "C" int SmallMatMul3(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return run(nparam, params, ndims, shapes, dtypes, 3, false, false);
}

// A gated MLP's first half: y = silu(x @ w_gate) * (x @ w_up), params x, w_gate, w_up, y (both weights [K, N]).
extern "C" int SmallGateUp(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return run(nparam, params, ndims, shapes, dtypes, 2, false, true);
}
