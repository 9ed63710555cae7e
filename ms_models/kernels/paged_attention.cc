// PagedAttentionFlat: RoPE + paged KV-cache write + ragged flat-batch attention, as one MindSpore
// custom CPU operator (ops.Custom, func_type "aot"). Built by ms_models/kernels/__init__.py:
//   g++ -O3 -fopenmp -shared -fPIC (no -march: the hot functions carry target_clones, so one .so
//   uses AVX-512 where the CPU has it, else AVX2, else baseline x86-64).
//
// Contract (all inputs contiguous; params = 11 inputs then 1 output):
//  0 q            f32 [T, H*D]   query, already scaled by 1/sqrt(D), not rotated
//  1 k            f32 [T, KVH*D] not rotated
//  2 v            f32 [T, KVH*D]
//  3 k_cache      f32 [NB, BS, KVH, D] (vLLM layout; the last block is scratch) -- WRITTEN IN PLACE
//  4 v_cache      f32 [NB, BS, KVH, D]                                       -- WRITTEN IN PLACE
//  5 cos_sin      f32 [T, D]: row t = cat(cos[:D/2], sin[:D/2]) at token t's position (neox RoPE:
//                 x' = x*cos + rotate_half(x)*sin, rotate_half(x) = cat(-x2, x1))
//  6 slot_mapping i32 [T]: cache slot (block*BS + offset) of token t's rotated K and V;
//                 -1 = padding token (no write, output row zero)
//  7 query_start_loc i32 [R+1]: request r owns rows [qsl[r], qsl[r+1]) (contiguous, in order)
//  8 seq_lens     i32 [R]: context length of request r after this step; its query token i
//                 (0-based among its qlen tokens) is at position seq_lens[r] - qlen + i and
//                 attends causally to key positions 0..position, read through the block table
//                 (this step's keys are written to the cache first, then read like the others)
//  9 block_tables i32 [R, M]: entries past ceil(seq_lens[r]/BS) are undefined (may be -1)
// 10 params       i32 [2] = (num_reqs, sliding_window W); W > 0: query at p sees keys (p-W, p]
// 11 out          f32 [T, H*D]; GQA: query head h uses kv head h / (H/KVH); rows outside every
//                 request (and rows whose slot is -1) are zero.
// H, KVH, D, BS, NB, M, R, T come from the shapes. Returns nonzero (MindSpore raises) on
// inconsistent shapes/dtypes or out-of-range slots/blocks/lengths of real requests.
//
// Algorithm: (1) every real token's K (rotated) and V go to the cache, token-parallel;
// (2) attention over work units (request, kv head -- or all kv heads when a unit has few rows,
// as in decode --, tile of up to QT query tokens): the unit rotates its G*qn query rows per kv
// head (G = H/KVH) into a local buffer and walks the keys it needs in chunks of KC positions,
// each key/value row loaded once for all rows of its kv head (GQA + query-tile sharing), with an
// online softmax (running max / sum; no [Q, L] score matrix). The unit's slice of the next chunk's key and
// value rows is prefetched while the current chunk computes: decode reads the cache from DRAM, once per layer
// (SmolLM2-135M heads, 30 layers' caches, 2-vCPU AMD EPYC: decode B=8 / B=32 at 200 and B=8 at 1,000 tokens of
// context 0.82-0.91x the time without it, 1x512 prefill unchanged). Scores: dot products for few rows,
// a register-tiled product with the chunk's keys transposed for many (prefill). Specialised for
// head_dim 64 and 128 (any even head_dim works, slower).
//
// Threads: OpenMP, at most MS_PA_THREADS (default 2), 1 for small work (waking the team costs more
// than it saves). Wait policy: the loader sets GOMP_SPINCOUNT=0, so idle team threads sleep at once
// and leave the cores to MindSpore's thread pool (figures in ms_models/kernels/__init__.py).

#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "common.h"

#ifndef PA_CLONES  // tests build with -DPA_CLONES= (plus -mavx2 -mfma) to check each clone's code path
#define PA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif

namespace {

constexpr int QT = 16;  // query tokens per work unit
constexpr int KC = 32;  // keys per online-softmax chunk

struct Dims {
  int64_t T, H, KVH, D, BS, NB, M, R, G;
  int num_reqs, window;
};

// dst = neox-rotate(src) for one head of width D; cs = cat(cos[:D/2], sin[:D/2]).
PA_INLINE void rotate(float *__restrict dst, const float *__restrict src, const float *__restrict cs, int64_t D) {
  const int64_t h = D / 2;
  const float *c = cs, *s = cs + h;
#pragma omp simd
  for (int64_t d = 0; d < h; ++d) {
    float x1 = src[d], x2 = src[d + h];
    dst[d] = x1 * c[d] - x2 * s[d];
    dst[d + h] = x2 * c[d] + x1 * s[d];
  }
}

PA_CLONES void write_kv_token(const Dims &dm, int64_t t, int64_t slot, const float *k, const float *v,
                              const float *cos_sin, float *k_cache, float *v_cache) {
  const int64_t D = dm.D, W = dm.KVH * D;
  const float *cs = cos_sin + t * D;
  float *kc = k_cache + slot * W, *vc = v_cache + slot * W;
  for (int64_t h = 0; h < dm.KVH; ++h) rotate(kc + h * D, k + t * W + h * D, cs, D);
  memcpy(vc, v + t * W, sizeof(float) * W);
}

struct Unit {
  int32_t r, h0, h1, t0, n;  // request, kv heads [h0, h1), first token row, tokens (<= QT)
  int64_t cost;
};

// S[x][c] = q_x . k_c for rows x < rows (a multiple of 4) and the chunk's keys, from K transposed
// to kt [D][KC]: a 4-row x KC-key register tile, broadcast q, FMAs along the key axis (no
// horizontal sums). For the query tiles of prefills, where rows are many.
template <int DC>
PA_INLINE void scores_tiled(const float *__restrict qr, int rows, const float *__restrict kt, float *__restrict sc,
                            int64_t Drt) {
  const int64_t D = DC ? DC : Drt;
  for (int x0 = 0; x0 < rows; x0 += 4) {
    float a[4][KC] = {};
    for (int64_t d = 0; d < D; ++d) {
      const float *k = kt + d * KC;
      for (int r = 0; r < 4; ++r) {
        const float qv = qr[(x0 + r) * D + d];
#pragma omp simd
        for (int c = 0; c < KC; ++c) a[r][c] += qv * k[c];
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < KC; ++c) sc[(x0 + r) * KC + c] = a[r][c];
  }
}

// The same scores as dot products, each key row loaded once for all rows (few rows: decode).
template <int DC>
PA_INLINE void scores_dot(const float *__restrict qr, int rows, const float *const *krow, int64_t koff, int nk,
                          float *__restrict sc, int64_t Drt) {
  const int64_t D = DC ? DC : Drt;
  for (int c = 0; c < nk; ++c) {
    const float *kr = krow[c] + koff;
    for (int x = 0; x < rows; ++x) {
      const float *qx = qr + x * D;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += qx[d] * kr[d];
      sc[x * KC + c] = s;
    }
  }
}

// acc[x] += sum_c P[x][c] * v_c for rows x < rows (a multiple of 4): RB rows' accumulators stay in
// registers while the chunk's value rows stream past.
template <int DC>
PA_INLINE void accumulate_pv(float *__restrict acc, const float *__restrict sc, int rows, const float *const *vrow,
                             int64_t voff, int nk, int64_t Drt) {
  constexpr int RB = DC == 64 ? 4 : DC == 128 ? 2 : 1;
  constexpr int DA = DC ? DC : 1;
  if (DC == 0) {
    for (int c = 0; c < nk; ++c) {
      const float *vr = vrow[c] + voff;
      for (int x = 0; x < rows; ++x) {
        const float pw = sc[x * KC + c];
        float *ax = acc + x * Drt;
#pragma omp simd
        for (int64_t d = 0; d < Drt; ++d) ax[d] += pw * vr[d];
      }
    }
    return;
  }
  for (int x0 = 0; x0 < rows; x0 += RB) {
    float a[RB][DA];
    for (int r = 0; r < RB; ++r)
      for (int d = 0; d < DA; ++d) a[r][d] = acc[(x0 + r) * DA + d];
    for (int c = 0; c < nk; ++c) {
      const float *vr = vrow[c] + voff;
      for (int r = 0; r < RB; ++r) {
        const float pw = sc[(x0 + r) * KC + c];
#pragma omp simd
        for (int d = 0; d < DA; ++d) a[r][d] += pw * vr[d];
      }
    }
    for (int r = 0; r < RB; ++r)
      for (int d = 0; d < DA; ++d) acc[(x0 + r) * DA + d] = a[r][d];
  }
}

// Rows (per kv head) from which the transposed-K score tile pays for the transpose (measured).
constexpr int TILED_MIN_ROWS = 12;

// One work unit: request u.r, kv heads [h0, h1), tokens t0..t0+n-1. Per kv head hh, rows
// x = i*G + g (token i, query head hh*G + g), padded to a multiple of 4 with zero queries.
template <int DC>
PA_INLINE void attend_unit(const Dims &dm, const Unit &u, const float *q, const float *cos_sin, const float *k_cache,
                 const float *v_cache, const int32_t *seq_lens, const int32_t *qsl, const int32_t *block_tables,
                 float *out, float *ws) {
  const int64_t D = DC ? DC : dm.D, G = dm.G, BS = dm.BS;
  const int64_t HD = dm.H * D, KW = dm.KVH * D;
  const int nh = u.h1 - u.h0;
  const int rows = u.n * (int)G;              // per kv head
  const int rows_p = (rows + 3) & ~3;
  float *qr = ws;                              // [nh][rows_p, D] rotated queries
  float *acc = qr + nh * rows_p * D;           // [nh][rows_p, D]
  float *sc = acc + nh * rows_p * D;           // [rows_p, KC] (one head at a time)
  float *kt = sc + rows_p * KC;                // [D, KC] transposed keys
  float *mx = kt + D * KC;                     // [nh][rows]
  float *sum = mx + nh * rows;                 // [nh][rows]
  const float *krow[KC], *vrow[KC];            // the chunk's key / value slots (through the block table)

  const int64_t qlen = qsl[u.r + 1] - qsl[u.r];
  const int64_t p0 = (int64_t)seq_lens[u.r] - qlen + (u.t0 - qsl[u.r]);  // position of the first token
  for (int hh = 0; hh < nh; ++hh) {
    float *qh = qr + hh * rows_p * D;
    for (int i = 0; i < u.n; ++i) {
      const int64_t t = u.t0 + i;
      for (int64_t g = 0; g < G; ++g)
        rotate(qh + (i * G + g) * D, q + t * HD + ((u.h0 + hh) * G + g) * D, cos_sin + t * D, D);
    }
    for (int64_t x = rows * D; x < rows_p * D; ++x) qh[x] = 0.f;
  }
  for (int64_t x = 0; x < nh * rows_p * D; ++x) acc[x] = 0.f;
  for (int x = 0; x < nh * rows; ++x) {
    mx[x] = -INFINITY;
    sum[x] = 0.f;
  }
  const int64_t W = dm.window;
  const int64_t hi = p0 + u.n - 1;                                   // last key any row sees
  const int64_t lo = W > 0 ? std::max<int64_t>(0, p0 - W + 1) : 0;  // first key any row sees
  const int32_t *bt = block_tables + (int64_t)u.r * dm.M;
  const bool tiled = rows >= TILED_MIN_ROWS;

  // The unit's heads' part of each key / value row: prefetched a chunk ahead (the cache is read once per step and
  // layer, from DRAM; the rows of one block are contiguous but each unit reads only its heads' slice of them).
  const int64_t pf0 = u.h0 * D, pf1 = u.h1 * D;
  for (int64_t j0 = lo; j0 <= hi; j0 += KC) {
    const int nk = (int)std::min<int64_t>(KC, hi - j0 + 1);
    for (int c = 0; c < nk; ++c) {
      const int64_t j = j0 + c;
      const int64_t slot = (int64_t)bt[j / BS] * BS + j % BS;
      krow[c] = k_cache + slot * KW;
      vrow[c] = v_cache + slot * KW;
    }
    for (int64_t j = j0 + KC; j <= std::min<int64_t>(hi, j0 + 2 * KC - 1); ++j) {
      const int64_t slot = (int64_t)bt[j / BS] * BS + j % BS;
      for (int64_t x = pf0; x < pf1; x += 16) {
        __builtin_prefetch(k_cache + slot * KW + x);
        __builtin_prefetch(v_cache + slot * KW + x);
      }
    }
    for (int hh = 0; hh < nh; ++hh) {
      const int64_t hoff = (u.h0 + hh) * D;
      const float *qh = qr + hh * rows_p * D;
      if (tiled) {
        for (int c = 0; c < nk; ++c)
          for (int64_t d = 0; d < D; ++d) kt[d * KC + c] = krow[c][hoff + d];
        for (int c = nk; c < KC; ++c)
          for (int64_t d = 0; d < D; ++d) kt[d * KC + c] = 0.f;
        scores_tiled<DC>(qh, rows_p, kt, sc, D);
      } else {
        scores_dot<DC>(qh, rows, krow, hoff, nk, sc, D);
      }
      // online softmax per row over the chunk keys it sees: [max(first_i, j0), min(p_i, j0+nk-1)]
      float *m_h = mx + hh * rows, *l_h = sum + hh * rows, *acc_h = acc + hh * rows_p * D;
      for (int i = 0; i < u.n; ++i) {
        const int64_t p = p0 + i;
        const int64_t a = std::max<int64_t>(j0, W > 0 ? p - W + 1 : 0);
        const int64_t b = std::min<int64_t>(j0 + nk - 1, p);
        const int ca = (int)(a - j0), cb = (int)(b - j0);  // inclusive chunk columns
        for (int64_t g = 0; g < G; ++g) {
          const int x = i * (int)G + (int)g;
          float *s = sc + x * KC;
          if (a > b) {  // nothing visible in this chunk
            for (int c = 0; c < nk; ++c) s[c] = 0.f;
            continue;
          }
          float m = m_h[x];
          for (int c = ca; c <= cb; ++c) m = std::max(m, s[c]);
          const float scale = fast_exp(m_h[x] - m);  // first visible chunk: m_h = -inf -> ~0 (acc, sum are 0)
          float l = 0.f;
#pragma omp simd reduction(+ : l)
          for (int c = 0; c < nk; ++c) {
            const float e = (c >= ca && c <= cb) ? fast_exp(s[c] - m) : 0.f;
            s[c] = e;
            l += e;
          }
          l_h[x] = l_h[x] * scale + l;
          m_h[x] = m;
          if (scale != 1.f) {
            float *ax = acc_h + x * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ax[d] *= scale;
          }
        }
      }
      for (int x = rows; x < rows_p; ++x)
        for (int c = 0; c < KC; ++c) sc[x * KC + c] = 0.f;
      accumulate_pv<DC>(acc_h, sc, rows_p, vrow, hoff, nk, D);
    }
  }
  for (int hh = 0; hh < nh; ++hh) {
    for (int i = 0; i < u.n; ++i) {
      const int64_t t = u.t0 + i;
      for (int64_t g = 0; g < G; ++g) {
        const int x = i * (int)G + (int)g;
        const float l = sum[hh * rows + x];
        const float inv = l > 0.f ? 1.f / l : 0.f;
        float *o = out + t * HD + ((u.h0 + hh) * G + g) * D;
        const float *ax = acc + (hh * rows_p + x) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] = ax[d] * inv;
      }
    }
  }
}

PA_CLONES void attend(const Dims &dm, const Unit &u, const float *q, const float *cos_sin, const float *k_cache,
                      const float *v_cache, const int32_t *seq_lens, const int32_t *qsl, const int32_t *block_tables,
                      float *out, float *ws) {
  if (dm.D == 64)
    attend_unit<64>(dm, u, q, cos_sin, k_cache, v_cache, seq_lens, qsl, block_tables, out, ws);
  else if (dm.D == 128)
    attend_unit<128>(dm, u, q, cos_sin, k_cache, v_cache, seq_lens, qsl, block_tables, out, ws);
  else
    attend_unit<0>(dm, u, q, cos_sin, k_cache, v_cache, seq_lens, qsl, block_tables, out, ws);
}

// Threads (common.h): small work runs on the calling thread.
int pa_num_threads(int64_t work, int64_t units) {
  // ~1M cost units is ~0.1 ms on one thread (decode B=4 at 256 context, Qwen2.5-0.5B heads)
  if (work < ((int64_t)1 << 20) || units < 2) return 1;
  return (int)std::min<int64_t>(max_kernel_threads(), units);
}

// MS_PA_PROFILE=1: the kernel's own wall time (count, mean) to stderr at exit, to tell kernel time from
// MindSpore's launch overhead when benchmarking.
struct Profile {
  bool on = getenv("MS_PA_PROFILE") != nullptr;
  int64_t n = 0;
  double total_us = 0;
  ~Profile() {
    if (on && n) fprintf(stderr, "PagedAttentionFlat: %lld calls, mean %.1f us\n", (long long)n, total_us / n);
  }
} g_profile;

bool is(const char *dtype, const char *want) { return dtype && strcmp(dtype, want) == 0; }

}  // namespace

// With MS_PA_PROFILE set: calls and total kernel time since the last reset (for bench.py, which
// opens the same library MindSpore loaded, through ctypes).
extern "C" void PagedAttentionFlatProfile(int64_t *calls, double *total_us, int reset) {
  *calls = g_profile.n;
  *total_us = g_profile.total_us;
  if (reset) {
    g_profile.n = 0;
    g_profile.total_us = 0;
  }
}

extern "C" int PagedAttentionFlat(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                  void *stream, void *extra) {
  (void)stream;
  (void)extra;
  const auto t_start = std::chrono::steady_clock::now();
  if (nparam != 12) return 1;
  static const char *want_dtype[12] = {"float32", "float32", "float32", "float32", "float32", "float32",
                                       "int32",   "int32",   "int32",   "int32",   "int32",   "float32"};
  static const int want_ndim[12] = {2, 2, 2, 4, 4, 2, 1, 1, 1, 2, 1, 2};
  for (int i = 0; i < 12; ++i)
    if (!is(dtypes[i], want_dtype[i]) || ndims[i] != want_ndim[i]) return 2;
  Dims dm;
  dm.NB = shapes[3][0];
  dm.BS = shapes[3][1];
  dm.KVH = shapes[3][2];
  dm.D = shapes[3][3];
  dm.T = shapes[0][0];
  dm.M = shapes[9][1];
  dm.R = shapes[8][0];
  if (dm.D <= 0 || dm.D % 2 || dm.KVH <= 0 || dm.BS <= 0 || shapes[0][1] % dm.D) return 3;
  dm.H = shapes[0][1] / dm.D;
  if (dm.H % dm.KVH) return 3;
  dm.G = dm.H / dm.KVH;
  for (int i = 0; i < 4; ++i)
    if (shapes[4][i] != shapes[3][i]) return 3;
  const int64_t KW = dm.KVH * dm.D;
  if (shapes[1][0] != dm.T || shapes[1][1] != KW || shapes[2][0] != dm.T || shapes[2][1] != KW ||
      shapes[5][0] != dm.T || shapes[5][1] != dm.D || shapes[6][0] != dm.T || shapes[7][0] != dm.R + 1 ||
      shapes[9][0] != dm.R || shapes[10][0] != 2 || shapes[11][0] != dm.T || shapes[11][1] != dm.H * dm.D)
    return 3;

  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  float *k_cache = static_cast<float *>(params[3]);
  float *v_cache = static_cast<float *>(params[4]);
  const float *cos_sin = static_cast<const float *>(params[5]);
  const int32_t *slots = static_cast<const int32_t *>(params[6]);
  const int32_t *qsl = static_cast<const int32_t *>(params[7]);
  const int32_t *seq_lens = static_cast<const int32_t *>(params[8]);
  const int32_t *bt = static_cast<const int32_t *>(params[9]);
  const int32_t *prm = static_cast<const int32_t *>(params[10]);
  float *out = static_cast<float *>(params[11]);
  dm.num_reqs = prm[0];
  dm.window = prm[1];
  if (dm.num_reqs < 0 || dm.num_reqs > dm.R || dm.window < 0) return 4;

  // Validate the metadata the kernel dereferences (cheap: O(T + R*M)).
  const int64_t nslots = dm.NB * dm.BS;
  for (int64_t t = 0; t < dm.T; ++t)
    if (slots[t] < -1 || slots[t] >= nslots) return 5;
  const int64_t first = dm.num_reqs > 0 ? qsl[0] : 0;
  if (first < 0 || first > dm.T) return 6;
  for (int r = 0; r < dm.num_reqs; ++r) {
    const int64_t qlen = (int64_t)qsl[r + 1] - qsl[r];
    if (qlen < 0 || qsl[r + 1] > dm.T || seq_lens[r] < qlen) return 6;
    if (qlen == 0) continue;
    const int64_t nblk = ((int64_t)seq_lens[r] + dm.BS - 1) / dm.BS;
    if (nblk > dm.M) return 7;
    for (int64_t b = 0; b < nblk; ++b) {
      const int32_t id = bt[(int64_t)r * dm.M + b];
      if (id < 0 || id >= dm.NB) return 7;
    }
  }
  const int64_t last = dm.num_reqs > 0 ? qsl[dm.num_reqs] : 0;

  // Work units, most expensive first (dynamic schedule balances the tail).
  std::vector<Unit> units;
  int64_t work = 0;
  for (int r = 0; r < dm.num_reqs; ++r) {
    const int64_t qlen = (int64_t)qsl[r + 1] - qsl[r];
    for (int64_t i0 = 0; i0 < qlen; i0 += QT) {
      const int n = (int)std::min<int64_t>(QT, qlen - i0);
      int64_t keys = (int64_t)seq_lens[r] - qlen + i0 + n;
      if (dm.window > 0) keys = std::min<int64_t>(keys, dm.window + n);
      // few rows per kv head (decode): one unit takes all kv heads, so it uses every byte of the
      // cache rows it loads ([KVH, D] per slot); many rows: one unit per kv head
      const int64_t hstep = n * dm.G < TILED_MIN_ROWS ? dm.KVH : 1;
      for (int64_t h = 0; h < dm.KVH; h += hstep) {
        Unit u{r, (int32_t)h, (int32_t)(h + hstep), (int32_t)(qsl[r] + i0), n,
               keys * hstep * (n * dm.G + 2) * dm.D};
        work += u.cost;
        units.push_back(u);
      }
    }
  }
  std::sort(units.begin(), units.end(), [](const Unit &a, const Unit &b) { return a.cost > b.cost; });
  const int nthreads = pa_num_threads(work, (int64_t)units.size());
  const int64_t rows_max = ((int64_t)QT * dm.G + 3) & ~3;
  const size_t ws_floats = (size_t)(dm.KVH * rows_max * (2 * dm.D + 2) + rows_max * KC + dm.D * KC);
  const int64_t nunits = (int64_t)units.size();

#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    std::vector<float> ws(ws_floats + 8);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < dm.T; ++t) {
      if (slots[t] >= 0) write_kv_token(dm, t, slots[t], k, v, cos_sin, k_cache, v_cache);
    }
    // (implicit barrier: every write lands before any read)
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t i = 0; i < nunits; ++i)
      attend(dm, units[i], q, cos_sin, k_cache, v_cache, seq_lens, qsl, bt, out, ws.data());
  }
  // zero the rows outside every request and the padding rows (slot -1)
  const int64_t HD = dm.H * dm.D;
  if (first > 0) memset(out, 0, sizeof(float) * first * HD);
  if (last < dm.T) memset(out + last * HD, 0, sizeof(float) * (dm.T - last) * HD);
  for (int64_t t = first; t < last; ++t)
    if (slots[t] < 0) memset(out + t * HD, 0, sizeof(float) * HD);
  if (g_profile.on) {
    g_profile.n++;
    g_profile.total_us += std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t_start).count();
  }
  return 0;
}
