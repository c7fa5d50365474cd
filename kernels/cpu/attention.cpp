// Attention over the paged KV cache on CPU (layouts: kernels/paged_attention_ref.py), fp32/bf16/fp16
// caches and int8 caches with per-(slot, kv head) scales, which are folded into the scores (K) and
// the probabilities (V) rather than into dequantized copies.
//   paged_decode_attention  -> kernels/paged_attention_ref.py decode_attention_cpu
//   paged_prefill_attention -> kernels/paged_attention_ref.py prefill_attention_cpu (SDPA's math path)
// Both take the layer's sliding window (window > 0: the query at position p reads keys
// (p - window, p], Mistral's and Gemma's local layers) and Gemma 2's logit soft-cap (softcap > 0:
// each scaled score s becomes softcap * tanh(s / softcap) before the softmax).
// Both are tested against paged_attention_ref and contiguous SDPA (tests/kernels/test_cpu_ops.py).
#include "ops.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace lowbit_cpu {
namespace {

// Runs fn(cache_t{}, k_scale, v_scale) for the cache's element type (scales: int8 caches only).
template <typename Fn>
void dispatch_cache(const torch::Tensor& k_cache, const c10::optional<torch::Tensor>& k_scale,
                    const c10::optional<torch::Tensor>& v_scale, Fn&& fn) {
  if (k_cache.scalar_type() == torch::kChar) {
    TORCH_CHECK(k_scale.has_value() && v_scale.has_value(), "an int8 cache needs k_scale and v_scale");
    const auto ks = k_scale->to(torch::kFloat).contiguous(), vs = v_scale->to(torch::kFloat).contiguous();
    fn(int8_t{}, ks.data_ptr<float>(), vs.data_ptr<float>());
    return;
  }
  const float* none = nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(), "paged_attention",
                                  [&] { fn(scalar_t{}, none, none); });
}

void check_caches(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [T, H, D], caches [NB, BS, Hkv, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k and v caches differ in shape");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k and v caches differ in dtype");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(q.size(2) == k_cache.size(3), "head_dim of q and cache differ");
}

// The block-table entries a context of len tokens uses must name blocks of the pool; entries past
// them are padding and never read.
void check_table(const int64_t* table, int64_t width, int64_t len, int64_t block_size, int64_t num_blocks) {
  TORCH_CHECK(len <= width * block_size, "context longer than the block table");
  for (int64_t i = 0; i < (len + block_size - 1) / block_size; ++i)
    TORCH_CHECK(table[i] >= 0 && table[i] < num_blocks, "block table entry out of range");
}

// exp(x) for the softmax's x <= 0, within ~2 ulp: Cephes' expf (range reduction by ln 2 in two
// parts, degree-6 polynomial, 2^n from the exponent bits). std::exp sets errno, so a loop calling
// it stays scalar; this one vectorizes, and prefill attention takes ~1.2M exps per layer at 512 tokens.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // 2^n stays a normal float
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

// max(s[0, n)), n >= 1. std::max_element is one dependent compare per element (~4 cycles each),
// which was 15% of decode attention's time at 1900 keys.
inline float row_max(const float* s, int64_t n) {
  int64_t i = 0;
  float top = s[0];
#if defined(__AVX512F__)
  if (n >= 16) {
    __m512 best = _mm512_loadu_ps(s);
    for (i = 16; i + 16 <= n; i += 16) best = _mm512_max_ps(best, _mm512_loadu_ps(s + i));
    top = _mm512_reduce_max_ps(best);
  }
#endif
  for (; i < n; ++i) top = std::max(top, s[i]);
  return top;
}

// s[0, n) -> softcap * tanh(s / softcap): Gemma 2 bounds its attention logits so (+-50).
inline void soft_cap(float* s, int64_t n, float softcap) {
  if (softcap <= 0.f) return;
  const float inv = 1.f / softcap;
  for (int64_t i = 0; i < n; ++i) s[i] = softcap * std::tanh(s[i] * inv);
}

// The first key position the query at position `pos` reads: pos - window + 1, or 0 without one.
inline int64_t window_start(int64_t pos, int64_t window) {
  return window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
}

// s[0, n) -> exp(s - max(s)); returns (max, sum of the exps).
inline std::pair<float, float> softmax_numerators(float* s, int64_t n) {
  const float top = row_max(s, n);
  float norm = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    s[i] = exp_nonpositive(s[i] - top);
    norm += s[i];
  }
  return {top, norm};
}

// ---------------------------------------------------------------- decode: split-K over segments

// Keys per decode task. A single sequence has few kv heads (3 for SmolLM2): without splitting its
// context, two threads would get one and two heads. Segments also keep a task's scores on the stack.
constexpr int64_t kSegment = 128;

#if defined(__AVX512F__)
// Cache rows are read with widen16 (ops.h); fp64 caches (dispatched, never used by the engine) take the scalar loops.
template <typename cache_t>
constexpr bool kWidens = !std::is_same_v<cache_t, double>;

// [sum(a), sum(b), sum(c), sum(d)]: one shuffle tree for four dot products instead of four
// _mm512_reduce_add_ps, whose shuffles were ~15% of decode attention's time.
inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // per 128-bit lane
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));  // a b a b | c d c d
  const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
  const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),  // a b c d per lane
                                    _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

// scores[n * kSegment + j] = (q_n . k_j) * factors[j] for N query heads (q [N][dim], dim % 16 == 0)
// and four keys k_0..k_3.
template <int N, typename cache_t>
inline void key_scores4(const float* q, const cache_t* const* k, int64_t dim, const float* factors, float* scores) {
  __m512 acc[N][4];
  for (int n = 0; n < N; ++n)
    for (int j = 0; j < 4; ++j) acc[n][j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 16) {
    __m512 kv[4];
    for (int j = 0; j < 4; ++j) kv[j] = widen16(k[j] + d);
    for (int n = 0; n < N; ++n) {
      const __m512 qv = _mm512_loadu_ps(q + n * dim + d);
      for (int j = 0; j < 4; ++j) acc[n][j] = _mm512_fmadd_ps(qv, kv[j], acc[n][j]);
    }
  }
  const __m128 f = _mm_loadu_ps(factors);
  for (int n = 0; n < N; ++n)
    _mm_storeu_ps(scores + n * kSegment, _mm_mul_ps(sum4(acc[n][0], acc[n][1], acc[n][2], acc[n][3]), f));
}

// The same for one key.
template <int N, typename cache_t>
inline void key_scores(const float* q, const cache_t* k, int64_t dim, float factor, float* scores) {
  __m512 acc[N];
  for (int n = 0; n < N; ++n) acc[n] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 16) {
    const __m512 kv = widen16(k + d);
    for (int n = 0; n < N; ++n) acc[n] = _mm512_fmadd_ps(_mm512_loadu_ps(q + n * dim + d), kv, acc[n]);
  }
  for (int n = 0; n < N; ++n) scores[n * kSegment] = _mm512_reduce_add_ps(acc[n]) * factor;
}

template <int N, typename cache_t>
inline void segment_key_scores(const float* q, const cache_t* const* rows, const float* factors, int64_t count,
                               int64_t dim, float* scores) {
  int64_t i = 0;
  for (; i + 4 <= count; i += 4) key_scores4<N>(q, rows + i, dim, factors + i, scores + i);
  for (; i < count; ++i) key_scores<N>(q, rows[i], dim, factors[i], scores + i);
}

// out[n][d0, d0 + 16 C) = sum_i p[n * kSegment + i] * V_i[d0, d0 + 16 C) over the segment's rows,
// N query heads x C 16-lane chunks accumulated in registers (at most 16 of the 32).
template <int N, int C, typename cache_t>
inline void weighted_rows(const float* p, const cache_t* const* rows, int64_t count, int64_t d0, int64_t dim,
                          float* out) {
  __m512 acc[N][C];
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c) acc[n][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < count; ++i) {
    __m512 v[C];
    for (int c = 0; c < C; ++c) v[c] = widen16(rows[i] + d0 + 16 * c);
    for (int n = 0; n < N; ++n) {
      const __m512 pn = _mm512_set1_ps(p[n * kSegment + i]);
      for (int c = 0; c < C; ++c) acc[n][c] = _mm512_fmadd_ps(pn, v[c], acc[n][c]);
    }
  }
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + n * dim + d0 + 16 * c, acc[n][c]);
}

template <int N, typename cache_t>
inline void weighted_rows_n(const float* p, const cache_t* const* rows, int64_t count, int64_t d0, int64_t dim,
                            float* out) {
  switch ((dim - d0) / 16) {
    case 1: return weighted_rows<N, 1>(p, rows, count, d0, dim, out);
    case 2: return weighted_rows<N, 2>(p, rows, count, d0, dim, out);
    case 3: return weighted_rows<N, 3>(p, rows, count, d0, dim, out);
    default: return weighted_rows<N, 4>(p, rows, count, d0, dim, out);
  }
}
#endif

// One task's view: the query heads of one kv head (q pre-scaled) over keys [s0, s1) of a sequence.
template <typename cache_t>
struct Segment {
  const float* q;  // [group][dim]
  const cache_t* const* k_rows;  // [count] pointers to K rows
  const cache_t* const* v_rows;
  const float* k_scales;  // [count]: the int8 scales, ones for a float cache
  const float* v_scales;  // [count], or null for a float cache
  int64_t count, group, dim;
};

// scores [group][kSegment] (only [0, count) used) = q . K, times the K scales.
template <typename cache_t>
void segment_scores(const Segment<cache_t>& s, float* scores) {
#if defined(__AVX512F__)
  if constexpr (kWidens<cache_t>) {
    if (s.dim % 16 == 0) {
      for (int64_t g = 0; g < s.group; g += 4) {  // up to 4 query heads share each widened K row
        const float* qg = s.q + g * s.dim;
        float* sg = scores + g * kSegment;
        switch (std::min<int64_t>(4, s.group - g)) {
          case 1: segment_key_scores<1>(qg, s.k_rows, s.k_scales, s.count, s.dim, sg); break;
          case 2: segment_key_scores<2>(qg, s.k_rows, s.k_scales, s.count, s.dim, sg); break;
          case 3: segment_key_scores<3>(qg, s.k_rows, s.k_scales, s.count, s.dim, sg); break;
          default: segment_key_scores<4>(qg, s.k_rows, s.k_scales, s.count, s.dim, sg); break;
        }
      }
      return;
    }
  }
#endif
  for (int64_t g = 0; g < s.group; ++g) {
    const float* qg = s.q + g * s.dim;
    for (int64_t i = 0; i < s.count; ++i) {
      float dot = 0.f;
      for (int64_t d = 0; d < s.dim; ++d) dot += qg[d] * static_cast<float>(s.k_rows[i][d]);
      scores[g * kSegment + i] = dot * s.k_scales[i];
    }
  }
}

// out [group][dim] = sum_i p[g][i] * V_i (the V scales already folded into p).
template <typename cache_t>
void segment_values(const Segment<cache_t>& s, const float* p, float* out) {
#if defined(__AVX512F__)
  if constexpr (kWidens<cache_t>) {
    if (s.dim % 16 == 0) {
      for (int64_t g = 0; g < s.group; g += 4) {
        for (int64_t d0 = 0; d0 < s.dim; d0 += 64) {
          const float* pg = p + g * kSegment;
          float* og = out + g * s.dim;
          switch (std::min<int64_t>(4, s.group - g)) {
            case 1: weighted_rows_n<1>(pg, s.v_rows, s.count, d0, s.dim, og); break;
            case 2: weighted_rows_n<2>(pg, s.v_rows, s.count, d0, s.dim, og); break;
            case 3: weighted_rows_n<3>(pg, s.v_rows, s.count, d0, s.dim, og); break;
            default: weighted_rows_n<4>(pg, s.v_rows, s.count, d0, s.dim, og); break;
          }
        }
      }
      return;
    }
  }
#endif
  std::fill(out, out + s.group * s.dim, 0.f);
  for (int64_t i = 0; i < s.count; ++i)
    for (int64_t h = 0; h < s.group; ++h) {
      const float w = p[h * kSegment + i];
      for (int64_t d = 0; d < s.dim; ++d) out[h * s.dim + d] += w * static_cast<float>(s.v_rows[i][d]);
    }
}

// One segment's partial softmax: per query head its max score, sum of exp(score - max) and the
// unnormalized weighted sum of values, which decode_attention_impl merges across segments.
template <typename cache_t>
void attend_segment(const Segment<cache_t>& s, float softcap, float* top, float* norm, float* acc) {
  alignas(64) float scores[kSegment * 8];
  std::vector<float> large;  // more than 8 query heads per kv head
  float* p = scores;
  if (s.group > 8) {
    large.resize(s.group * kSegment);
    p = large.data();
  }
  segment_scores(s, p);
  for (int64_t g = 0; g < s.group; ++g) {
    soft_cap(p + g * kSegment, s.count, softcap);
    std::tie(top[g], norm[g]) = softmax_numerators(p + g * kSegment, s.count);
    if (s.v_scales)
      for (int64_t i = 0; i < s.count; ++i) p[g * kSegment + i] *= s.v_scales[i];
  }
  segment_values(s, p, acc);
}

// q [B, H, D] fp32; out [B, H, D] fp32. Tasks are (sequence, segment, kv head), in that
// order, so that at::parallel_for's contiguous ranges carry about equal numbers of keys.
template <typename cache_t>
void decode_attention_impl(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const float* k_scale, const float* v_scale, const int64_t* tables, int64_t width,
                           const int32_t* lens, float scale, int64_t window, float softcap, torch::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2), group = heads / kv_heads;
  std::vector<int64_t> first(batch + 1, 0), start(batch);  // first segment, first key of each sequence
  int64_t keys = 0;
  for (int64_t b = 0; b < batch; ++b) {
    start[b] = window_start(lens[b] - 1, window);
    keys += lens[b] - start[b];
    first[b + 1] = first[b] + (lens[b] - start[b] + kSegment - 1) / kSegment;
  }
  const int64_t tasks = first[batch] * kv_heads;
  // Below ~400 cached rows in all, forking the threads costs more than it saves (4.7 us on one
  // thread vs 10.1 on two at 16 keys x 3 kv heads; even at 384 rows).
  const int64_t rows = keys * kv_heads;
  const int64_t grain = rows < 384 ? tasks + 1 : 1;  // parallel_for runs ranges shorter than grain inline
  std::vector<float> tops(tasks * group), norms(tasks * group), accs(tasks * group * dim);
  const float* qp = q.data_ptr<float>();
  const cache_t* kp = k_cache.data_ptr<cache_t>();
  const cache_t* vp = v_cache.data_ptr<cache_t>();
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    const cache_t* k_rows[kSegment];
    const cache_t* v_rows[kSegment];
    float k_scales[kSegment], v_scales[kSegment];
    std::fill(k_scales, k_scales + kSegment, 1.f);
    std::vector<float> qs(group * dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t segment = task / kv_heads, kvh = task % kv_heads;
      const int64_t b = std::upper_bound(first.begin(), first.end(), segment) - first.begin() - 1;
      const int64_t s0 = start[b] + (segment - first[b]) * kSegment;
      const int64_t count = std::min<int64_t>(kSegment, lens[b] - s0);
      const int64_t* table = tables + b * width;
      // Keys [s0, s0 + count): block and offset advance together (no division per key).
      for (int64_t i = 0, block = s0 / block_size, offset = s0 % block_size; i < count; ++i) {
        const int64_t at = (table[block] * block_size + offset) * kv_heads + kvh;
        k_rows[i] = kp + at * dim;
        v_rows[i] = vp + at * dim;
        if (k_scale) {
          k_scales[i] = k_scale[at];
          v_scales[i] = v_scale[at];
        }
        if (++offset == block_size) {
          offset = 0;
          ++block;
        }
      }
      const float* qg = qp + (b * heads + kvh * group) * dim;
      for (int64_t j = 0; j < group * dim; ++j) qs[j] = qg[j] * scale;
      const Segment<cache_t> s{qs.data(), k_rows, v_rows, k_scales, v_scale ? v_scales : nullptr, count, group, dim};
      attend_segment(s, softcap, tops.data() + task * group, norms.data() + task * group, accs.data() + task * group * dim);
    }
  });
  // Merge each query head's segments: rescale each by exp(its max - the overall max).
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch * heads, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, kvh = (bh % heads) / group, g = bh % group;
      float* o = op + bh * dim;
      std::fill(o, o + dim, 0.f);
      float top = -std::numeric_limits<float>::infinity(), norm = 0.f;
      for (int64_t seg = first[b]; seg < first[b + 1]; ++seg) top = std::max(top, tops[(seg * kv_heads + kvh) * group + g]);
      for (int64_t seg = first[b]; seg < first[b + 1]; ++seg) {
        const int64_t at = (seg * kv_heads + kvh) * group + g;
        const float w = exp_nonpositive(tops[at] - top);
        norm += w * norms[at];
        const float* a = accs.data() + at * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] += w * a[d];
      }
      const float inv = norm > 0.f ? 1.f / norm : 0.f;  // no keys: zeros
      for (int64_t d = 0; d < dim; ++d) o[d] *= inv;
    }
  });
}

// ---------------------------------------------------------------- prefill

constexpr int64_t kKeyBlock = 16;  // keys per transposed K block: one 16-lane vector of scores
constexpr int64_t kQueryTile = 16;  // query rows per task, the unit of parallel work

// Dequantizes keys and values [key0, key0 + len) of every kv head, scales folded in: K into blocks
// of kKeyBlock keys transposed to keys[Hkv][block][D][16] (zero past len), V into values[Hkv][len][D],
// both indexed from key0. Once per call, so every query tile reads the same copy.
template <typename cache_t>
void gather_heads(const cache_t* kp, const cache_t* vp, const float* k_scale, const float* v_scale,
                  const int64_t* table, int64_t block_size, int64_t kv_heads, int64_t dim, int64_t key0,
                  int64_t len, std::vector<float>& keys, std::vector<float>& values) {
  const int64_t blocks = (len + kKeyBlock - 1) / kKeyBlock, head_keys = blocks * dim * kKeyBlock;
  keys.assign(kv_heads * head_keys, 0.f);
  values.resize(kv_heads * len * dim);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin * kKeyBlock; l < std::min(end * kKeyBlock, len); ++l) {
      const int64_t slot = table[(key0 + l) / block_size] * block_size + (key0 + l) % block_size;
      for (int64_t kvh = 0; kvh < kv_heads; ++kvh) {
        const int64_t at = slot * kv_heads + kvh;
        const float ks = k_scale ? k_scale[at] : 1.f, vs = v_scale ? v_scale[at] : 1.f;
        const cache_t* kr = kp + at * dim;
        const cache_t* vr = vp + at * dim;
        float* kt = keys.data() + kvh * head_keys + (l / kKeyBlock) * dim * kKeyBlock + l % kKeyBlock;
        for (int64_t d = 0; d < dim; ++d) kt[d * kKeyBlock] = static_cast<float>(kr[d]) * ks;
        float* v = values.data() + (kvh * len + l) * dim;
        for (int64_t d = 0; d < dim; ++d) v[d] = static_cast<float>(vr[d]) * vs;
      }
    }
  });
}

// scores[0, 16 * blocks) = q . K for K in transposed blocks [D][16]. Four blocks at a time in
// AVX-512: four independent FMA chains hide the FMA latency a single chain would wait on.
inline void row_scores(const float* q, const float* keys, int64_t dim, int64_t blocks, float* scores) {
  int64_t b = 0;
#if defined(__AVX512F__)
  static_assert(kKeyBlock == 16, "one 16-lane vector per key block");
  const int64_t stride = dim * kKeyBlock;
  for (; b + 4 <= blocks; b += 4) {
    const float* k = keys + b * stride;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t d = 0; d < dim; ++d) {
      const __m512 qd = _mm512_set1_ps(q[d]);
      s0 = _mm512_fmadd_ps(qd, _mm512_loadu_ps(k + d * kKeyBlock), s0);
      s1 = _mm512_fmadd_ps(qd, _mm512_loadu_ps(k + stride + d * kKeyBlock), s1);
      s2 = _mm512_fmadd_ps(qd, _mm512_loadu_ps(k + 2 * stride + d * kKeyBlock), s2);
      s3 = _mm512_fmadd_ps(qd, _mm512_loadu_ps(k + 3 * stride + d * kKeyBlock), s3);
    }
    _mm512_storeu_ps(scores + b * kKeyBlock, s0);
    _mm512_storeu_ps(scores + (b + 1) * kKeyBlock, s1);
    _mm512_storeu_ps(scores + (b + 2) * kKeyBlock, s2);
    _mm512_storeu_ps(scores + (b + 3) * kKeyBlock, s3);
  }
#endif
  for (; b < blocks; ++b) {
    float s[kKeyBlock] = {};
    const float* k = keys + b * dim * kKeyBlock;
    for (int64_t d = 0; d < dim; ++d)
      for (int64_t j = 0; j < kKeyBlock; ++j) s[j] += q[d] * k[d * kKeyBlock + j];
    std::memcpy(scores + b * kKeyBlock, s, sizeof(s));
  }
}

// out[D] = inv_norm * sum_l p[l] * values[l][D]. In AVX-512, 64 output lanes at a time stay in
// four registers across the whole sum.
inline void weighted_values(const float* p, const float* values, int64_t len, int64_t dim, float inv_norm,
                            float* out) {
  int64_t d0 = 0;
#if defined(__AVX512F__)
  for (; d0 + 64 <= dim; d0 += 64) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t l = 0; l < len; ++l) {
      const float* v = values + l * dim + d0;
      const __m512 pl = _mm512_set1_ps(p[l]);
      a0 = _mm512_fmadd_ps(pl, _mm512_loadu_ps(v), a0);
      a1 = _mm512_fmadd_ps(pl, _mm512_loadu_ps(v + 16), a1);
      a2 = _mm512_fmadd_ps(pl, _mm512_loadu_ps(v + 32), a2);
      a3 = _mm512_fmadd_ps(pl, _mm512_loadu_ps(v + 48), a3);
    }
    const __m512 inv = _mm512_set1_ps(inv_norm);
    _mm512_storeu_ps(out + d0, _mm512_mul_ps(a0, inv));
    _mm512_storeu_ps(out + d0 + 16, _mm512_mul_ps(a1, inv));
    _mm512_storeu_ps(out + d0 + 32, _mm512_mul_ps(a2, inv));
    _mm512_storeu_ps(out + d0 + 48, _mm512_mul_ps(a3, inv));
  }
#endif
  std::fill(out + d0, out + dim, 0.f);
  for (int64_t l = 0; l < len; ++l)
    for (int64_t d = d0; d < dim; ++d) out[d] += p[l] * values[l * dim + d];
  for (int64_t d = d0; d < dim; ++d) out[d] *= inv_norm;
}

// q [Tq, H, D] fp32 (the sequence's newest Tq tokens, the last at position context_len - 1);
// table [nb] int64 -> out [Tq, H, D] fp32. Query row i, at position p = context_len - Tq + i, sees
// keys [window_start(p), p]. Scores are never materialized beyond one row of one head; the
// dequantized K and V the rows can see are held for the call (4 * 2 * Hkv * D bytes per token).
template <typename cache_t>
void prefill_attention_impl(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                            const float* k_scale, const float* v_scale, const int64_t* table, int64_t context_len,
                            float scale, int64_t window, float softcap, torch::Tensor& out) {
  const int64_t tq = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2), group = heads / kv_heads;
  const int64_t first = context_len - tq, tiles = (tq + kQueryTile - 1) / kQueryTile;
  const int64_t key0 = window_start(first, window), held = context_len - key0;
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  std::vector<float> keys, values;
  gather_heads(k_cache.data_ptr<cache_t>(), v_cache.data_ptr<cache_t>(), k_scale, v_scale, table, block_size,
               kv_heads, dim, key0, held, keys, values);
  const int64_t head_keys = keys.size() / kv_heads;
  at::parallel_for(0, kv_heads * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(head_keys / dim), qs(dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kvh = task / tiles, r0 = (task % tiles) * kQueryTile;
      const int64_t r1 = std::min(r0 + kQueryTile, tq);
      const float* head_k = keys.data() + kvh * head_keys;
      const float* head_v = values.data() + kvh * held * dim;
      for (int64_t r = r0; r < r1; ++r) {
        // The row's keys [lo, hi) in the held copy's indices; scores start at lo's key block.
        const int64_t hi = first + r + 1 - key0, lo = window_start(first + r, window) - key0;
        const int64_t b0 = lo / kKeyBlock, skip = lo - b0 * kKeyBlock, len = hi - lo;
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = kvh * group + g;
          const float* qr = qp + (r * heads + h) * dim;
          for (int64_t d = 0; d < dim; ++d) qs[d] = qr[d] * scale;
          row_scores(qs.data(), head_k + b0 * dim * kKeyBlock, dim, (hi + kKeyBlock - 1) / kKeyBlock - b0,
                     scores.data());
          float* row = scores.data() + skip;
          soft_cap(row, len, softcap);
          const float norm = softmax_numerators(row, len).second;
          weighted_values(row, head_v + lo * dim, len, dim, 1.f / norm, op + (r * heads + h) * dim);
        }
      }
    }
  });
}

}  // namespace

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                                     int64_t window, double softcap) {
  check_caches(q, k_cache, v_cache);
  TORCH_CHECK(window >= 0 && softcap >= 0, "window and softcap must be >= 0 (0: none)");
  const auto qf = q.to(torch::kFloat).contiguous();
  const auto tables = block_tables.to(torch::kLong).contiguous();
  const auto lens = context_lens.to(torch::kInt).contiguous();
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == q.size(0) && lens.numel() == q.size(0),
              "one block table and length per query");
  const int64_t width = tables.size(1);
  for (int64_t b = 0; b < q.size(0); ++b) {
    TORCH_CHECK(lens.data_ptr<int32_t>()[b] >= 0, "context lengths must be >= 0");
    check_table(tables.data_ptr<int64_t>() + b * width, width, lens.data_ptr<int32_t>()[b], k_cache.size(1),
                k_cache.size(0));
  }
  auto out = torch::empty(qf.sizes(), qf.options());
  dispatch_cache(k_cache, k_scale, v_scale, [&](auto tag, const float* ks, const float* vs) {
    decode_attention_impl<decltype(tag)>(qf, k_cache, v_cache, ks, vs, tables.data_ptr<int64_t>(), width,
                                         lens.data_ptr<int32_t>(), static_cast<float>(scale), window,
                                         static_cast<float>(softcap), out);
  });
  return out;
}

torch::Tensor paged_prefill_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                      c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale,
                                      torch::Tensor block_table, int64_t context_len, double scale,
                                      int64_t window, double softcap) {
  check_caches(q, k_cache, v_cache);
  TORCH_CHECK(window >= 0 && softcap >= 0, "window and softcap must be >= 0 (0: none)");
  TORCH_CHECK(q.size(0) >= 1 && context_len >= q.size(0), "context_len must cover the queries");
  const auto table = block_table.to(torch::kLong).contiguous();
  TORCH_CHECK(table.dim() == 1, "block_table: [nb]");
  check_table(table.data_ptr<int64_t>(), table.size(0), context_len, k_cache.size(1), k_cache.size(0));
  const auto qf = q.to(torch::kFloat).contiguous();
  auto out = torch::empty(qf.sizes(), qf.options());
  dispatch_cache(k_cache, k_scale, v_scale, [&](auto tag, const float* ks, const float* vs) {
    prefill_attention_impl<decltype(tag)>(qf, k_cache, v_cache, ks, vs, table.data_ptr<int64_t>(), context_len,
                                          static_cast<float>(scale), window, static_cast<float>(softcap), out);
  });
  return out;
}

}  // namespace lowbit_cpu
