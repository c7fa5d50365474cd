#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
// This core's peak rate of the int8 dot-product step every quantized CPU GEMM here is made of
// (AVX2 maddubs + madd by the scales + add: 32 multiply-adds) and of fp32 FMA (8), one thread,
// 12 independent accumulators, operands in registers: the ceiling a GEMM's GOP/s is read against.
//   g++ -O2 -march=native benchmarks/cpu_peak.cpp -o /tmp/cpu_peak && /tmp/cpu_peak
// (benchmarks/cpu_ggml.py --peak builds and runs it.)
int main() {
  const long iters = 200000000;
  __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(5), s = _mm256_set1_epi16(1);
  __m256i acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_epi32(i);
  auto t0 = std::chrono::steady_clock::now();
  for (long it = 0; it < iters / 12; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), s));
    __asm__ volatile("" : "+x"(a), "+x"(b));
  }
  double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  __m256i tot = acc[0];
  for (int i = 1; i < 12; ++i) tot = _mm256_add_epi32(tot, acc[i]);
  printf("int8 maddubs+madd+add: %.1f GMAC/s per core (32 MAC each) [%d]\n", iters * 32.0 / dt / 1e9, _mm256_extract_epi32(tot, 0));
  __m256 f[12], x = _mm256_set1_ps(1.0001f), y = _mm256_set1_ps(0.9999f);
  for (int i = 0; i < 12; ++i) f[i] = _mm256_set1_ps(i);
  t0 = std::chrono::steady_clock::now();
  for (long it = 0; it < iters / 12; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) f[i] = _mm256_fmadd_ps(x, y, f[i]);
    __asm__ volatile("" : "+x"(x), "+x"(y));
  }
  dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  __m256 ft = f[0];
  for (int i = 1; i < 12; ++i) ft = _mm256_add_ps(ft, f[i]);
  printf("fp32 fma: %.1f GMAC/s per core (8 MAC each) [%f]\n", iters * 8.0 / dt / 1e9, _mm256_cvtss_f32(ft));
}
