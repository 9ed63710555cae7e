// Helpers shared by the custom CPU kernels of this directory (included by the .cc files; the build's hash
// covers this file too, ms_models/kernels/__init__.py).
#pragma once

#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cstdlib>

#define PA_INLINE static inline __attribute__((always_inline))

// exp(x) for x <= 0 (scores minus the running max), vectorisable (no libm call):
// Cephes-style range reduction x = n*ln2 + r, |r| <= ln2/2, degree-6 polynomial; relative error ~2e-7.
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

// Threads. MindSpore's CPU budget here is 2 threads; MS_PA_THREADS overrides (1: no OpenMP team).
// Wait policy: see ms_models/kernels/__init__.py.
inline int max_kernel_threads() {
  static const int n = [] {
    const char *e = getenv("MS_PA_THREADS");
    int v = e ? atoi(e) : 2;
    return v < 1 ? 1 : v;
  }();
  return n;
}
