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
// (2) attention over work units (request, kv head, tile of up to QT query tokens): the unit
// rotates its G*qn query rows (G = H/KVH) into a local buffer and walks the keys it needs in
// chunks of KC positions, each key row loaded once for all rows of the unit (GQA + query-tile
// sharing), with an online softmax (running max / sum; no [Q, L] score matrix).
//
// Threads: OpenMP, at most MS_PA_THREADS (default 2) and 1 for small work (spawn/wake cost
// exceeds the gain). See the comment at pa_num_threads about the wait policy.

#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

#define PA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define PA_INLINE static inline __attribute__((always_inline))

namespace {

constexpr int QT = 16;  // query tokens per work unit
constexpr int KC = 32;  // keys per online-softmax chunk

struct Dims {
  int64_t T, H, KVH, D, BS, NB, M, R, G;
  int num_reqs, window;
};

// exp(x) for x <= 0 (scores minus the running max), vectorisable (no libm call): Cephes-style
// range reduction x = n*ln2 + r, |r| <= ln2/2, degree-6 polynomial; relative error ~2e-7.
// Inputs below -87 give 0.
PA_INLINE float fast_exp(float x) {
  x = std::max(x, -87.0f);
  // round to nearest with the 1.5*2^23 trick (vectorises on every target; no -ffast-math here)
  float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float s;
  memcpy(&s, &e, 4);
  return p * s;
}

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
  int32_t r, kvh, t0, n;  // request, kv head, first token row, tokens (<= QT)
  int64_t cost;
};

// One work unit. Rows of the unit: row = i*G + g for token i (0..n-1) and query head kvh*G + g.
PA_CLONES void attend_unit(const Dims &dm, const Unit &u, const float *q, const float *cos_sin,
                           const float *k_cache, const float *v_cache, const int32_t *seq_lens,
                           const int32_t *qsl, const int32_t *block_tables, float *out, float *ws) {
  const int64_t D = dm.D, G = dm.G, BS = dm.BS;
  const int64_t HD = dm.H * D, KW = dm.KVH * D;
  const int rows = u.n * (int)G;
  float *qr = ws;                   // [rows, D] rotated queries
  float *acc = qr + rows * D;       // [rows, D]
  float *sc = acc + rows * D;       // [rows, KC]
  float *mx = sc + rows * KC;       // [rows]
  float *sum = mx + rows;           // [rows]
  const float *krow[KC], *vrow[KC];  // the chunk's key / value rows (through the block table)

  const int64_t qlen = qsl[u.r + 1] - qsl[u.r];
  const int64_t p0 = (int64_t)seq_lens[u.r] - qlen + (u.t0 - qsl[u.r]);  // position of the first token
  for (int i = 0; i < u.n; ++i) {
    const int64_t t = u.t0 + i;
    for (int64_t g = 0; g < G; ++g)
      rotate(qr + (i * G + g) * D, q + t * HD + (u.kvh * G + g) * D, cos_sin + t * D, D);
  }
  for (int64_t x = 0; x < rows * D; ++x) acc[x] = 0.f;
  for (int x = 0; x < rows; ++x) {
    mx[x] = -INFINITY;
    sum[x] = 0.f;
  }
  const int64_t W = dm.window;
  const int64_t hi = p0 + u.n - 1;                     // last key any row sees
  const int64_t lo = W > 0 ? std::max<int64_t>(0, p0 - W + 1) : 0;  // first key any row sees
  const int32_t *bt = block_tables + (int64_t)u.r * dm.M;

  for (int64_t j0 = lo; j0 <= hi; j0 += KC) {
    const int nk = (int)std::min<int64_t>(KC, hi - j0 + 1);
    for (int c = 0; c < nk; ++c) {
      const int64_t j = j0 + c;
      const int64_t slot = (int64_t)bt[j / BS] * BS + j % BS;
      krow[c] = k_cache + slot * KW + u.kvh * D;
      vrow[c] = v_cache + slot * KW + u.kvh * D;
    }
    // scores: each key row loaded once for all rows
    for (int c = 0; c < nk; ++c) {
      const float *kr = krow[c];
      for (int x = 0; x < rows; ++x) {
        const float *qx = qr + x * D;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D; ++d) s += qx[d] * kr[d];
        sc[x * KC + c] = s;
      }
    }
    // online softmax per row, over the chunk keys this row sees: [max(jlo_i, j0), min(p_i, j0+nk-1)]
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
        float m = mx[x];
        for (int c = ca; c <= cb; ++c) m = std::max(m, s[c]);
        const float scale = fast_exp(mx[x] - m);  // mx = -inf -> 0
        float l = 0.f;
#pragma omp simd reduction(+ : l)
        for (int c = 0; c < nk; ++c) {
          const float e = (c >= ca && c <= cb) ? fast_exp(s[c] - m) : 0.f;
          s[c] = e;
          l += e;
        }
        sum[x] = sum[x] * scale + l;
        mx[x] = m;
        if (scale != 1.f) {
          float *ax = acc + x * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ax[d] *= scale;
        }
      }
    }
    // acc += P V: each value row loaded once for all rows
    for (int c = 0; c < nk; ++c) {
      const float *vr = vrow[c];
      for (int x = 0; x < rows; ++x) {
        const float pw = sc[x * KC + c];
        if (pw == 0.f) continue;
        float *ax = acc + x * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ax[d] += pw * vr[d];
      }
    }
  }
  for (int i = 0; i < u.n; ++i) {
    const int64_t t = u.t0 + i;
    for (int64_t g = 0; g < G; ++g) {
      const int x = i * (int)G + (int)g;
      const float inv = sum[x] > 0.f ? 1.f / sum[x] : 0.f;
      float *o = out + t * HD + (u.kvh * G + g) * D;
      const float *ax = acc + x * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = ax[d] * inv;
    }
  }
}

// Threads. MindSpore's CPU budget here is 2 threads; MS_PA_THREADS overrides (1 disables
// OpenMP). Small work runs on the calling thread: waking the team costs more than it saves.
// Wait policy: see ms_models/kernels/__init__.py (OMP_WAIT_POLICY / GOMP_SPINCOUNT are read
// by libgomp at load, so the loader documents and the worker sets them before importing).
int pa_num_threads(int64_t work) {
  static int max_threads = [] {
    const char *e = getenv("MS_PA_THREADS");
    int n = e ? atoi(e) : 2;
    return n < 1 ? 1 : n;
  }();
  if (work < (int64_t)1 << 17) return 1;
  return max_threads;
}

bool is(const char *dtype, const char *want) { return dtype && strcmp(dtype, want) == 0; }

}  // namespace

extern "C" int PagedAttentionFlat(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                  void *stream, void *extra) {
  (void)stream;
  (void)extra;
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
      for (int64_t h = 0; h < dm.KVH; ++h) {
        Unit u{r, (int32_t)h, (int32_t)(qsl[r] + i0), n, keys * (n * dm.G + 2) * dm.D};
        work += u.cost;
        units.push_back(u);
      }
    }
  }
  std::sort(units.begin(), units.end(), [](const Unit &a, const Unit &b) { return a.cost > b.cost; });
  const int nthreads = pa_num_threads(work);
  const size_t ws_floats = (size_t)QT * dm.G * (2 * dm.D + KC + 2);
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
      attend_unit(dm, units[i], q, cos_sin, k_cache, v_cache, seq_lens, qsl, bt, out, ws.data());
  }
  // zero the rows outside every request and the padding rows (slot -1)
  const int64_t HD = dm.H * dm.D;
  if (first > 0) memset(out, 0, sizeof(float) * first * HD);
  if (last < dm.T) memset(out + last * HD, 0, sizeof(float) * (dm.T - last) * HD);
  for (int64_t t = first; t < last; ++t)
    if (slots[t] < 0) memset(out + t * HD, 0, sizeof(float) * HD);
  return 0;
}
