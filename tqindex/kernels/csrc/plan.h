// The fast-scan plan of one codec layout, and what it computes per query:
// quantized look-up tables (one scale and bias per query and segment), their error bound,
// and the exact (float64) score of a packed row (exact.h), used to rescore candidates.
//
// Keys. A row's score is a sum over keys g of T_g[key_g(row)], where key_g is a 4-bit value
// gathered from the packed row by a few "parts" (byte column, shift, mask) and T_g is a 16-entry
// table of the key's partial inner product with the rotated query. Segment 0 (keys
// [0, n_index_keys)) scores the code indices and is scaled by factor 0; segment 1 (the rest)
// scores the QJL sign bits of prod codes and is scaled by factor 1.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "exact.h"

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace tq {

struct Part {
  int32_t col;     // byte of the packed row
  int32_t rshift;  // shift right by this (or left by lshift): moves the bits to their key position
  int32_t lshift;
  uint8_t mask;    // the key bits this part sets, after the shift
};

// Largest table entry: the two entries of a key pair add in 8 bits (scan.h, accumulate).
constexpr int kTableMax = 127;

// One query's quantized tables: lut[g * 16 + v] in 0..kTableMax; score of a key sum S in segment s
// is S * scale[s] + bias[s], off the float table sum by at most margin[s].
struct QueryTables {
  double scale[2] = {0, 0}, bias[2] = {0, 0}, margin[2] = {0, 0};
};

// Vectors of the compiler's extension (GCC, Clang) for build_tables, as wide as the build's
// registers: a key's 16 values are kParts vectors of kLanes float32.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;
#endif
constexpr int kLanes = kVectorBytes / 4, kParts = 16 / kLanes;
typedef float FV __attribute__((vector_size(kVectorBytes)));
typedef int32_t IV __attribute__((vector_size(kVectorBytes)));

// A key's 16 table entries (kParts vectors of int32 in 0..kTableMax) -> 16 bytes at out, with
// packing instructions (GCC narrows a vector of int32 to bytes one lane at a time)
inline void store_entries(uint8_t* out, const IV* level) {
#if defined(__AVX512F__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(reinterpret_cast<__m512i>(level[0])));
#elif defined(__AVX2__)
  // packs works within 128-bit halves: entries 0-3, 8-11, 4-7, 12-15 as int16, put in order by the permute
  const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(reinterpret_cast<__m256i>(level[0]), reinterpret_cast<__m256i>(level[1])), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1)));
#elif defined(__SSE2__) && !defined(__AVX__)
  const __m128i low = _mm_packs_epi32(reinterpret_cast<__m128i>(level[0]), reinterpret_cast<__m128i>(level[1]));
  const __m128i high = _mm_packs_epi32(reinterpret_cast<__m128i>(level[2]), reinterpret_cast<__m128i>(level[3]));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(low, high));
#else
  for (int h = 0; h < kParts; ++h)
    for (int lane = 0; lane < kLanes; ++lane) out[h * kLanes + lane] = static_cast<uint8_t>(level[h][lane]);
#endif
}

// The largest lane of v: a shuffle tree where the build has x86 vectors (GCC kept a loop over
// lanes in memory, a chain of store forwards)
inline float lane_max(FV v) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps(reinterpret_cast<__m512>(v));
#elif defined(__AVX__)
  const __m256 w = reinterpret_cast<__m256>(v);
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(w), _mm256_extractf128_ps(w, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
#else
  float m = v[0];
  for (int lane = 1; lane < kLanes; ++lane) m = std::max(m, v[lane]);
  return m;
#endif
}

// lanes[span][h]: 1 for the values v = h * kLanes + lane below span, else 0
struct SpanMask {
  FV lanes[17][kParts];
  SpanMask() {
    for (int span = 0; span <= 16; ++span)
      for (int v = 0; v < 16; ++v) lanes[span][v / kLanes][v % kLanes] = v < span ? 1.0f : 0.0f;
  }
};
inline const SpanMask kSpanMask;

// build_tables works in float32: each table entry and its rounding error are off by a few float
// roundings of |low| + range of its key, which the margin covers with this factor to spare
constexpr double kFloatSlack = 8.0 / (1 << 24);

struct Plan {
  int32_t dim = 0;         // D, coordinates per row (rotated space)
  int32_t code_bytes = 0;  // B
  int32_t n_keys = 0, n_index_keys = 0, n_factors = 1;
  bool direct = false;  // key 2c / 2c + 1 are the low / high nibble of byte c, nothing else
  std::vector<int32_t> part_start;  // (n_keys + 1,)
  std::vector<Part> parts;
  std::vector<int32_t> key_coord;   // (n_keys, 4): query column of each slot, -1 for none
  std::vector<float> key_values;    // (n_keys, 16, 4): level of each slot for each key value
  std::vector<uint8_t> reachable;   // (n_keys, 16): key values that packed rows can hold
  std::vector<float> key_errmax;    // (n_keys, 4): max |level - key_values| (keys of > 4 bits)
  std::vector<float> key_errvar;    // (n_keys, 4): mean squared such error
  std::vector<int32_t> key_slots;   // (n_keys,): slots in use (a prefix), from index_keys()
  std::vector<int32_t> key_span;    // (n_keys,): reachable values 0 .. span - 1
  std::vector<float> key_share;      // (n_keys,): 1 / key_span
  std::vector<uint8_t> key_monotone;  // (n_keys,): one coordinate whose values rise with the key
  std::vector<float> slot_values;   // (n_keys, 4, 16): key_values slot-major
  ExactScorer exact;                // the exact estimator, which rescores candidates

  int query_width() const { return exact.has_signs() ? 2 * dim : dim; }

  // Fill lut (n_keys * 16 bytes) and the scales, biases and error margins for one rotated query.
  // z > 0: margins are min(worst case, z standard deviations of the rounding error); z <= 0: worst case.
  // A key's 16 values are kParts float32 vectors (values past its span masked to 0), with no
  // branch on the query: 5x faster than a float64 loop per value.
  QueryTables build_tables(const float* q, double z, uint8_t* lut) const {
    QueryTables out;
    thread_local std::vector<FV> scratch;  // the tables (n_keys, kParts), then each key's low end
    scratch.resize(kParts * static_cast<size_t>(n_keys) + (n_keys + kLanes - 1) / kLanes);
    FV* table = scratch.data();
    float* lo = reinterpret_cast<float*>(table + kParts * static_cast<size_t>(n_keys));
    double max_range[2] = {0, 0}, sum_range[2] = {0, 0}, approx_max[2] = {0, 0}, approx_var[2] = {0, 0};
    double magnitude[2] = {0, 0};  // sum over keys of |low| + range: the float32 roundings scale with it
    for (int s = 0; s < 2; ++s) {  // index keys, then sign keys; sums in locals (in the arrays, each
      // key's sum would wait on the last one's store)
      double s_max_range = 0, s_sum_range = 0, s_approx_max = 0, s_approx_var = 0, s_bias = 0, s_magnitude = 0;
      for (int g = s == 0 ? 0 : n_index_keys; g < (s == 0 ? n_index_keys : n_keys); ++g) {
        const int span = key_span[g];
        FV* t = table + kParts * g;
        for (int h = 0; h < kParts; ++h) t[h] = FV{};
        for (int slot = 0; slot < key_slots[g]; ++slot) {
          const float qc = q[key_coord[g * 4 + slot]];
          const float* values = &slot_values[(g * 4 + slot) * 16];
          for (int h = 0; h < kParts; ++h) {
            FV v;
            std::memcpy(&v, values + kLanes * h, sizeof v);
            t[h] += qc * v;
          }
          s_approx_max += std::fabs(qc) * key_errmax[g * 4 + slot];
          s_approx_var += static_cast<double>(qc) * qc * key_errvar[g * 4 + slot];
        }
        const float* tv = reinterpret_cast<const float*>(t);
        float low, high;
        if (key_monotone[g]) {  // one coordinate, levels in order: its extremes are at the ends
          // (min / max, not a branch on the query's sign, which the CPU would mispredict half the time)
          low = std::min(tv[0], tv[span - 1]);
          high = std::max(tv[0], tv[span - 1]);
        } else {
          low = *std::min_element(tv, tv + span);
          high = *std::max_element(tv, tv + span);
        }
        lo[g] = low;
        const double range = static_cast<double>(high) - low;
        s_max_range = std::max(s_max_range, range);
        s_sum_range += range;
        s_bias += low;
        s_magnitude += std::fabs(low) + range;
      }
      max_range[s] = s_max_range, sum_range[s] = s_sum_range, approx_max[s] = s_approx_max, approx_var[s] = s_approx_var;
      out.bias[s] = s_bias, magnitude[s] = s_magnitude;
    }
    double a[2];
    for (int s = 0; s < 2; ++s) {
      // entries in 0..kTableMax and every key sum of a segment within 16 bits
      a[s] = max_range[s] > 0 ? std::min(kTableMax / max_range[s], 65535.0 / sum_range[s]) : 0.0;
      out.scale[s] = a[s] > 0 ? 1.0 / a[s] : 0.0;
    }
    double worst[2] = {0, 0}, var[2] = {0, 0};
    for (int s = 0; s < 2; ++s) {  // index keys, then sign keys
      const float scale = static_cast<float>(out.scale[s]), as = static_cast<float>(a[s]);
      FV var_lanes[kParts] = {};  // per value 0..15: the sum over keys of err^2 / span (the same in every build)
      double worst_s = 0;
      for (int g = s == 0 ? 0 : n_index_keys; g < (s == 0 ? n_index_keys : n_keys); ++g) {
        const int span = key_span[g];
        const float low = lo[g], share = key_share[g];
        IV err_max = {};  // |err| as bit patterns, which order non-negative floats alike
        IV levels[kParts];
        for (int h = 0; h < kParts; ++h) {
          const FV t = table[kParts * g + h], in = kSpanMask.lanes[span][h];
          // t >= low on the span: rounds to nearest, to 0..kTableMax; past the span (in = 0) 0 and no error
          IV level = __builtin_convertvector((t - low) * as * in + 0.5f, IV);
          const IV over = level > kTableMax;
          level = levels[h] = (level & ~over) | (kTableMax & over);
          const FV err = (t - (__builtin_convertvector(level, FV) * scale + low)) * in;
          var_lanes[h] += err * err * share;
          const IV size = reinterpret_cast<IV>(err) & 0x7fffffff, larger = size > err_max;
          err_max = (err_max & ~larger) | (size & larger);
        }
        store_entries(lut + g * 16, levels);
        worst_s += lane_max(reinterpret_cast<FV>(err_max));
      }
      worst[s] = worst_s;
      for (int v = 0; v < 16; ++v) var[s] += var_lanes[v / kLanes][v % kLanes];
    }
    for (int s = 0; s < 2; ++s) {
      const double bound = worst[s] + approx_max[s];
      const double spread = std::sqrt(var[s] + approx_var[s]);
      double margin = z > 0 ? std::min(bound, z * spread) : bound;
      // float32 tables, and the kernel's float32 test of S * scale + bias: covered with room to spare
      margin += kFloatSlack * magnitude[s] + 1e-6 * (sum_range[s] + std::fabs(out.bias[s])) + 1e-30;
      out.margin[s] = margin;
    }
    return out;
  }

  // From key_coord, key_values and reachable: the per-key slot counts, value spans and slot-major values.
  void index_keys() {
    key_slots.assign(n_keys, 0);
    key_span.assign(n_keys, 0);
    key_monotone.assign(n_keys, 0);
    key_share.assign(n_keys, 0.0f);
    slot_values.assign(static_cast<size_t>(n_keys) * 64, 0.0f);
    for (int g = 0; g < n_keys; ++g) {
      while (key_slots[g] < 4 && key_coord[g * 4 + key_slots[g]] >= 0) ++key_slots[g];
      while (key_span[g] < 16 && reachable[g * 16 + key_span[g]]) ++key_span[g];
      for (int v = key_span[g]; v < 16; ++v)
        if (reachable[g * 16 + v]) throw std::invalid_argument("reachable key values must be a prefix 0..2^bits");
      for (int slot = key_slots[g]; slot < 4; ++slot)
        if (key_coord[g * 4 + slot] >= 0) throw std::invalid_argument("a key's query columns must be a prefix of its slots");
      if (key_span[g] == 0) throw std::invalid_argument("every key must reach value 0");
      key_share[g] = 1.0f / key_span[g];
      for (int slot = 0; slot < 4; ++slot)
        for (int v = 0; v < key_span[g]; ++v) slot_values[(g * 4 + slot) * 16 + v] = key_values[(g * 16 + v) * 4 + slot];  // 0 past the span
      const float* values = &slot_values[g * 64];
      key_monotone[g] = key_slots[g] == 1 && std::is_sorted(values, values + key_span[g]);
    }
  }
};

}  // namespace tq
