// The fast-scan search: 4-bit look-up tables over rows read a step at a time, with the exact
// top-k kept by rescoring every row whose approximate score could still enter it.
//
// Blocked layout. Rows go in blocks of kBlock = 32; a block stores byte column c of its rows as
// 32 consecutive bytes (byte r: row r of the block), columns one after another. A kernel step
// is kRows rows (one block with AVX2 or without SIMD, two with AVX-512), and a register holds
// column c of the step: byte b of 16-byte lane l is row 16l + b. Codes arrive as packed rows,
// transposed a step at a time in registers, and optionally also as key columns (to_key_columns):
// the blocked layout of the keys themselves, two per byte, which the scan reads as they are.
//
// Per step and key, one byte shuffle looks up the key's 16-entry table for every row of the
// step; the results are accumulated in 16-bit lanes, even and odd rows apart (FAISS's fast-scan:
// the sum of a whole register seen as 16-bit values, and of its high bytes). Without SIMD the
// same integer sums are computed row by row, so every instruction set ranks alike.
//
// Pruning: with tables quantized by scale a and per-query error margin E (plan.h), a row whose
// approximate score plus |f| E is below the k-th best exact score so far cannot enter the top-k:
// only the others are rescored exactly. With the worst-case margin (z <= 0) the result is the
// exact top-k of the estimator over all rows; ties go to the lower row.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

#include "plan.h"
#include "pool.h"
#include "simd.h"

namespace tq {

struct Hit {
  float score;
  int64_t row;
};

// a ranks before b: higher score, then lower row
inline bool better(const Hit& a, const Hit& b) { return a.score > b.score || (a.score == b.score && a.row < b.row); }

// The k best hits seen, worst on top.
class TopK {
 public:
  explicit TopK(int k) : k_(k) { hits_.reserve(k); }
  bool full() const { return static_cast<int>(hits_.size()) == k_; }
  float threshold() const { return full() ? hits_.front().score : -std::numeric_limits<float>::infinity(); }
  void push(const Hit& hit) {
    if (!full()) {
      hits_.push_back(hit);
      std::push_heap(hits_.begin(), hits_.end(), better);
    } else if (better(hit, hits_.front())) {
      std::pop_heap(hits_.begin(), hits_.end(), better);
      hits_.back() = hit;
      std::push_heap(hits_.begin(), hits_.end(), better);
    }
  }
  const std::vector<Hit>& hits() const { return hits_; }
  std::vector<Hit> sorted() const {
    std::vector<Hit> out = hits_;
    std::sort(out.begin(), out.end(), better);
    return out;
  }

 private:
  int k_;
  std::vector<Hit> hits_;
};

// The k largest values seen (lower bounds of scores), smallest on top.
class LowerK {
 public:
  explicit LowerK(int k) : k_(k) { values_.reserve(k); }
  float threshold() const {
    return static_cast<int>(values_.size()) == k_ ? values_.front() : -std::numeric_limits<float>::infinity();
  }
  void push(float value) {
    if (static_cast<int>(values_.size()) < k_) {
      values_.push_back(value);
      std::push_heap(values_.begin(), values_.end(), std::greater<float>());
    } else if (value > values_.front()) {
      std::pop_heap(values_.begin(), values_.end(), std::greater<float>());
      values_.back() = value;
      std::push_heap(values_.begin(), values_.end(), std::greater<float>());
    }
  }
  const std::vector<float>& values() const { return values_; }

 private:
  int k_;
  std::vector<float> values_;
};

// A row that may enter the top-k, with the upper bound of its score.
struct Candidate {
  float upper;
  int64_t row;
};

// A candidate kept for rescoring at the end of a search over groups: the upper bound of its score,
// the bias its group adds, and its row.
struct Deferred {
  float upper, bias;
  int64_t row;
};

// What one task found for one query: its exact top-k and the k best lower bounds it saw.
struct Found {
  explicit Found(int k) : exact(k), lower(k) {}
  TopK exact;
  LowerK lower;
};

constexpr int kBlock = 32;
#if defined(TQ_ISA_AVX2) || defined(TQ_ISA_AVX512)
constexpr int kRows = 16 * Simd::kLanes;
#else
constexpr int kRows = kBlock;
#endif
constexpr int kBlocksPerStep = kRows / kBlock;

// 64-byte aligned scratch that lives as long as a task
struct Scratch {
  explicit Scratch(size_t bytes) : data(static_cast<uint8_t*>(::operator new(bytes + 64, std::align_val_t(64)))) {
    std::memset(data, 0, bytes + 64);
  }
  ~Scratch() { ::operator delete(data, std::align_val_t(64)); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  uint8_t* data;
};

// A step's columns: column c of its block s at base + s * stride + c * kBlock.
struct Columns {
  const uint8_t* base;
  size_t stride;
};

#if defined(TQ_ISA_AVX2) || defined(TQ_ISA_AVX512)
// bit-reversed 4-bit numbers: after transpose16, column c sits in register kBitrev4[c]
constexpr int kBitrev4[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

// 16x16 byte transpose in every lane: four rounds of interleaves, 8-, 16-, 32- and 64-bit
inline void transpose16(Simd::V* x) {
  Simd::V y[16];
  for (int i = 0; i < 8; ++i) y[i] = Simd::unpacklo8(x[2 * i], x[2 * i + 1]), y[i + 8] = Simd::unpackhi8(x[2 * i], x[2 * i + 1]);
  for (int i = 0; i < 8; ++i) x[i] = Simd::unpacklo16(y[2 * i], y[2 * i + 1]), x[i + 8] = Simd::unpackhi16(y[2 * i], y[2 * i + 1]);
  for (int i = 0; i < 8; ++i) y[i] = Simd::unpacklo32(x[2 * i], x[2 * i + 1]), y[i + 8] = Simd::unpackhi32(x[2 * i], x[2 * i + 1]);
  for (int i = 0; i < 8; ++i) x[i] = Simd::unpacklo64(y[2 * i], y[2 * i + 1]), x[i + 8] = Simd::unpackhi64(y[2 * i], y[2 * i + 1]);
}

// kRows packed rows at `rows` (row stride `stride`, each readable for round_up(code_bytes, 16)
// bytes) -> the blocked layout at `out` (blocks `out_stride` bytes apart)
inline void transpose_rows(const Plan& plan, const uint8_t* rows, size_t stride, uint8_t* out, size_t out_stride) {
  const int padded = (plan.code_bytes + 15) & ~15;
  for (int j = 0; j < padded; j += 16) {
    Simd::V x[16];
    for (int i = 0; i < 16; ++i) x[i] = Simd::load_lanes(rows + i * stride + j, 16 * stride);
    transpose16(x);
    for (int c = 0; c < 16; ++c) Simd::store_column(out + (j + c) * kBlock, out_stride, x[kBitrev4[c]]);
  }
}

// keys (n_keys, kBytes) of a step, for plans that are not direct
inline void step_keys(const Plan& plan, Columns cols, uint8_t* keys) {
  for (int g = 0; g < plan.n_keys; ++g) {
    Simd::V key = Simd::zero();
    for (int p = plan.part_start[g]; p < plan.part_start[g + 1]; ++p) {
      const Part& part = plan.parts[p];
      Simd::V c = Simd::load_column(cols.base + part.col * kBlock, cols.stride);
      c = Simd::sll16(Simd::srl16(c, part.rshift), part.lshift);
      key = Simd::bit_or(key, Simd::bit_and(c, Simd::set1(part.mask)));
    }
    Simd::store(keys + g * Simd::kBytes, key);
  }
}

// Table sums of kQ queries (tables luts[i]) over keys [first, last) of one step (an
// even count): 16-bit lanes, the low byte of each the running sum of an even row, the high byte's
// sum kept apart in acc_high. Entries are at most kTableMax = 127 (plan.h), so the look-ups of a
// key pair add in 8 bits before they are widened: a fifth fewer operations than widening each.
// Direct plans read key 2c / 2c + 1 as the low / high nibble of column c; others read extracted
// keys, one register each.
template <bool kDirect, int kQ>
inline void accumulate(const uint8_t* const* luts, Columns cols, const uint8_t* keys, int first, int last, Simd::V* acc,
                       Simd::V* acc_high) {
  const Simd::V low_nibble = Simd::set1(0x0F);
  const uint8_t* tables[kQ];  // a local copy: stores to acc (may_alias vectors) could otherwise change luts[i]
  for (int i = 0; i < kQ; ++i) acc[i] = Simd::zero(), acc_high[i] = Simd::zero(), tables[i] = luts[i];
  for (int g = first; g < last; g += 2) {
    Simd::V k0, k1;
    if (kDirect) {
      const Simd::V col = Simd::load_column(cols.base + (g / 2) * kBlock, cols.stride);
      k0 = Simd::bit_and(col, low_nibble);
      k1 = Simd::bit_and(Simd::srl16(col, 4), low_nibble);
    } else {
      k0 = Simd::load(keys + g * Simd::kBytes);
      k1 = Simd::load(keys + (g + 1) * Simd::kBytes);
    }
    for (int i = 0; i < kQ; ++i) {
      const uint8_t* table = tables[i] + g * 16;
      const Simd::V r = Simd::add8(Simd::lookup(Simd::broadcast_table(table), k0), Simd::lookup(Simd::broadcast_table(table + 16), k1));
      acc[i] = Simd::add16(acc[i], r);
      acc_high[i] = Simd::add16(acc_high[i], Simd::high_bytes(r));
    }
  }
}

template <bool kDirect, int kQ>
inline void step_sums(const Plan& plan, const uint8_t* const* luts, Columns cols, const uint8_t* keys, uint16_t (*sums)[2][kRows]) {
  Simd::V acc[kQ], acc_high[kQ];
  for (int s = 0; s < 2; ++s) {
    const int first = s == 0 ? 0 : plan.n_index_keys, last = s == 0 ? plan.n_index_keys : plan.n_keys;
    if (first == last) continue;
    accumulate<kDirect, kQ>(luts, cols, keys, first, last, acc, acc_high);
    // 16-bit lane t holds rows 2t (low byte) and 2t + 1 (high byte); sums wrap mod 2^16 and fit it
    for (int i = 0; i < kQ; ++i) Simd::store_rows(sums[i][s], Simd::sub16(acc[i], Simd::low_to_high(acc_high[i])), acc_high[i]);
  }
}
#else
inline void transpose_rows(const Plan& plan, const uint8_t* rows, size_t stride, uint8_t* out, size_t) {
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < plan.code_bytes; ++c) out[c * kBlock + r] = rows[r * stride + c];
}

inline void step_keys(const Plan& plan, Columns cols, uint8_t* keys) {
  for (int g = 0; g < plan.n_keys; ++g) {
    for (int r = 0; r < kRows; ++r) {
      unsigned key = 0;
      for (int p = plan.part_start[g]; p < plan.part_start[g + 1]; ++p) {
        const Part& part = plan.parts[p];
        key |= ((static_cast<unsigned>(cols.base[part.col * kBlock + r]) >> part.rshift) << part.lshift) & part.mask;
      }
      keys[g * kRows + r] = static_cast<uint8_t>(key);
    }
  }
}

template <bool kDirect, int kQ>
inline void step_sums(const Plan& plan, const uint8_t* const* luts, Columns cols, const uint8_t* keys, uint16_t (*sums)[2][kRows]) {
  for (int i = 0; i < kQ; ++i) {
    for (int r = 0; r < kRows; ++r) {
      uint32_t total[2] = {0, 0};
      for (int g = 0; g < plan.n_keys; ++g) {
        const unsigned key = kDirect ? (cols.base[(g / 2) * kBlock + r] >> (4 * (g % 2))) & 15u : keys[g * kRows + r];
        total[g < plan.n_index_keys ? 0 : 1] += luts[i][g * 16 + key];
      }
      sums[i][0][r] = static_cast<uint16_t>(total[0]);
      sums[i][1][r] = static_cast<uint16_t>(total[1]);
    }
  }
}
#endif

// Bit r set where row r of a step may enter the top-k: f0 (S0 scale0 + bias0) + |f0| margin0
// (+ the same for segment 1) + the row's bias + the query's bias >= tau, evaluated in float
// (plan.h's margins cover its rounding).
inline uint64_t may_enter(const uint16_t (*sums)[kRows], const float* f0, const float* f1, const float* row_bias, float query_bias,
                          const QueryTables& t, float tau, int n_factors) {
  uint64_t bits = 0;
#if defined(TQ_ISA_AVX2) || defined(TQ_ISA_AVX512)
  const __m256 scale0 = _mm256_set1_ps(static_cast<float>(t.scale[0])), bias0 = _mm256_set1_ps(static_cast<float>(t.bias[0]));
  const __m256 margin0 = _mm256_set1_ps(static_cast<float>(t.margin[0])), limit = _mm256_set1_ps(tau);
  const __m256 scale1 = _mm256_set1_ps(static_cast<float>(t.scale[1])), bias1 = _mm256_set1_ps(static_cast<float>(t.bias[1]));
  const __m256 margin1 = _mm256_set1_ps(static_cast<float>(t.margin[1]));
  const __m256 sign = _mm256_set1_ps(-0.0f), query = _mm256_set1_ps(query_bias);
  for (int r = 0; r < kRows; r += 8) {
    const __m256 s0 = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sums[0] + r))));
    const __m256 a0 = _mm256_loadu_ps(f0 + r);
    __m256 upper = _mm256_fmadd_ps(a0, _mm256_fmadd_ps(s0, scale0, bias0), _mm256_add_ps(_mm256_loadu_ps(row_bias + r), query));
    upper = _mm256_fmadd_ps(_mm256_andnot_ps(sign, a0), margin0, upper);
    if (n_factors > 1) {
      const __m256 s1 = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sums[1] + r))));
      const __m256 a1 = _mm256_loadu_ps(f1 + r);
      upper = _mm256_fmadd_ps(a1, _mm256_fmadd_ps(s1, scale1, bias1), upper);
      upper = _mm256_fmadd_ps(_mm256_andnot_ps(sign, a1), margin1, upper);
    }
    bits |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(upper, limit, _CMP_GE_OQ))) << r;
  }
#else
  for (int r = 0; r < kRows; ++r) {
    float upper = f0[r] * (sums[0][r] * static_cast<float>(t.scale[0]) + static_cast<float>(t.bias[0])) +
                  std::fabs(f0[r]) * static_cast<float>(t.margin[0]) + (row_bias[r] + query_bias);
    if (n_factors > 1)
      upper += f1[r] * (sums[1][r] * static_cast<float>(t.scale[1]) + static_cast<float>(t.bias[1])) +
               std::fabs(f1[r]) * static_cast<float>(t.margin[1]);
    if (upper >= tau) bits |= uint64_t(1) << r;
  }
#endif
  return bits;
}

// Key columns of n packed rows: (ceil(n / kBlock), n_keys / 2, kBlock) bytes, column c of a
// block holding key 2c (low nibble) and key 2c + 1 (high nibble) of each of its rows.
inline void to_key_columns(const Plan& plan, const uint8_t* packed, int64_t n, uint8_t* out, int threads) {
  const int64_t steps = (n + kRows - 1) / kRows, blocks = (n + kBlock - 1) / kBlock;
  const size_t padded_block = static_cast<size_t>((plan.code_bytes + 15) & ~15) * kBlock;
  const size_t column_block = static_cast<size_t>(plan.n_keys / 2) * kBlock;
  const int tasks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, steps / 64)));
  Pool::get().run(tasks, [&](int task) {
    Scratch rows(padded_block * kBlocksPerStep), cols(padded_block * kBlocksPerStep), keys(static_cast<size_t>(plan.n_keys) * kRows),
        step_out(column_block * kBlocksPerStep);
    for (int64_t step = steps * task / tasks; step < steps * (task + 1) / tasks; ++step) {
      const int64_t start = step * kRows, count = std::min<int64_t>(kRows, n - start);
      std::memset(rows.data, 0, padded_block * kBlocksPerStep);  // rows past n and the padding read as zeros
      for (int64_t r = 0; r < count; ++r) std::memcpy(rows.data + r * plan.code_bytes, packed + (start + r) * plan.code_bytes, plan.code_bytes);
      transpose_rows(plan, rows.data, plan.code_bytes, cols.data, padded_block);
      const Columns where{cols.data, padded_block};
#if defined(TQ_ISA_AVX2) || defined(TQ_ISA_AVX512)
      const Simd::V* pairs = nullptr;
      if (!plan.direct) {
        step_keys(plan, where, keys.data);
        pairs = reinterpret_cast<const Simd::V*>(keys.data);
      }
      for (int c = 0; c < plan.n_keys / 2; ++c) {
        const Simd::V v = plan.direct ? Simd::load_column(cols.data + c * kBlock, padded_block)
                                       : Simd::bit_or(pairs[2 * c], Simd::sll16(pairs[2 * c + 1], 4));
        Simd::store_column(step_out.data + c * kBlock, column_block, v);
      }
#else
      if (!plan.direct) step_keys(plan, where, keys.data);
      for (int c = 0; c < plan.n_keys / 2; ++c)
        for (int r = 0; r < kRows; ++r)
          step_out.data[c * kBlock + r] = plan.direct ? cols.data[c * kBlock + r] : keys.data[2 * c * kRows + r] | keys.data[(2 * c + 1) * kRows + r] << 4;
#endif
      const int64_t first_block = start / kBlock, last_block = std::min<int64_t>(blocks, first_block + kBlocksPerStep);
      std::memcpy(out + first_block * column_block, step_out.data, (last_block - first_block) * column_block);
    }
  });
}

// The codes of one scan() call: n packed rows and, optionally, their key columns.
struct Codes {
  const uint8_t* packed;
  int64_t n;
  const uint8_t* key_columns;  // (ceil(n / kBlock), n_keys / 2, kBlock) or nullptr
};

// The queries one scan() call is for: `count` distinct positions in the batch (queries nullptr:
// all m, in order), and a bias per position added to its scores of every row (bias nullptr: 0).
struct Subset {
  const int64_t* queries = nullptr;
  int64_t count = 0;
  const float* bias = nullptr;
};

// One search: m rotated queries, top-k kept across the chunks passed to scan().
class Search {
 public:
  Search(std::shared_ptr<const Plan> plan, const float* queries, int64_t m, int k, double z, int threads = 1)
      : plan_(std::move(plan)), m_(m), k_(k) {
    const int width = plan_->query_width();
    queries_.assign(queries, queries + m * width);
    // not zeroed (build_tables writes every entry; zeroing megabytes cost more than the scan at
    // nprobe 1), except the 64 bytes of padding past the last table
    lut_.reset(new uint8_t[static_cast<size_t>(m) * lut_stride() + 64]);
    std::memset(lut_.get() + static_cast<size_t>(m) * lut_stride(), 0, 64);
    tables_.resize(m);
    // tables of many queries: in parallel, claimed a few queries at a time, so that a worker slowed
    // by another process's thread on its core (an OpenMP team still spinning) holds no one up
    const int tasks = static_cast<int>(std::min<int64_t>(threads, m / kQueriesPerTableTask));
    std::atomic<int64_t> next{0};
    Pool::get().run(std::max(tasks, 1), [&](int) {
      for (int64_t i0 = next.fetch_add(kQueriesPerClaim); i0 < m; i0 = next.fetch_add(kQueriesPerClaim))
        for (int64_t i = i0; i < std::min(m, i0 + kQueriesPerClaim); ++i) tables_[i] = plan_->build_tables(&queries_[i * width], z, mutable_lut(i));
    });
    best_.reserve(m), lower_.reserve(m);
    for (int64_t i = 0; i < m; ++i) best_.emplace_back(k), lower_.emplace_back(k);
  }

  // Scan n rows (packed, code_bytes each, and optionally their key columns), numbered row0.. or
  // rows[0..n) where `rows` is given, with factors (n, n_factors), an optional validity mask (n,)
  // and an optional bias (n,) added to every query's score of the row, for the queries of
  // `subset`; `threads` workers at most.
  void scan(Codes codes, const float* factors, const uint8_t* valid, const float* bias, int64_t row0, const int64_t* rows,
            Subset subset, int threads) {
    const int64_t steps = (codes.n + kRows - 1) / kRows;
    Who who;
    for (int64_t j = 0; j < (subset.queries != nullptr ? subset.count : m_); ++j) {
      const int64_t i = subset.queries != nullptr ? subset.queries[j] : j;
      who.query.push_back(i);
      who.bias.push_back(subset.bias != nullptr ? subset.bias[j] : 0.0f);
      who.floor.push_back(std::max(best_[i].threshold(), lower_[i].threshold()));
    }
    const int64_t q = static_cast<int64_t>(who.query.size());
    if (steps == 0 || q == 0) return;
    const double lookups = static_cast<double>(codes.n) * plan_->n_keys * static_cast<double>(q);
    const int64_t useful = std::max<int64_t>(1, static_cast<int64_t>(lookups / kMinLookupsPerTask));
    const int tasks = static_cast<int>(std::min<int64_t>({static_cast<int64_t>(std::max(threads, 1)), steps, useful}));
    std::vector<std::vector<Found>> found(tasks);
    const Numbering numbering{row0, rows};
    Pool::get().run(tasks, [&](int task) {
      found[task] = scan_steps(codes, factors, valid, bias, numbering, who, steps * task / tasks, steps * (task + 1) / tasks);
    });
    for (auto& part : found)
      for (int64_t j = 0; j < q; ++j) {
        for (const Hit& hit : part[j].exact.hits()) best_[who.query[j]].push(hit);
        for (float value : part[j].lower.values()) lower_[who.query[j]].push(value);
      }
  }

  // Groups of rows, each scanned for its own queries (an inverted file's lists, each for the
  // queries that probe it): group g is rows [starts[g], stops[g]) of `codes`, numbered by position,
  // for the queries query_of[offsets[g]..offsets[g + 1]) (distinct within a group), each with its
  // query_bias (nullptr: 0) added to its scores of the group's rows. With key columns, every start
  // is a multiple of kBlock. Whole groups go to up to `threads` workers, the costliest first; a
  // worker keeps its own top-k per query, so a query's k-th best so far prunes every later group
  // of that worker; the workers' results are merged at the end.
  void scan_groups(Codes codes, const float* factors, const uint8_t* valid, const int64_t* starts, const int64_t* stops, int64_t groups,
                   const int64_t* offsets, const int64_t* query_of, const float* query_bias, int threads) {
    std::vector<int64_t> order(groups);
    std::iota(order.begin(), order.end(), int64_t{0});
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return (stops[a] - starts[a]) * (offsets[a + 1] - offsets[a]) > (stops[b] - starts[b]) * (offsets[b + 1] - offsets[b]);
    });
    double lookups = 0;
    for (int64_t g = 0; g < groups; ++g) lookups += static_cast<double>(std::max<int64_t>(0, stops[g] - starts[g])) * (offsets[g + 1] - offsets[g]);
    const int64_t useful = std::max<int64_t>(1, static_cast<int64_t>(lookups * plan_->n_keys / kMinLookupsPerTask));
    const int tasks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(std::max(threads, 1)), groups, useful})));
    const int nf = plan_->n_factors;
    const size_t column_block = static_cast<size_t>(plan_->n_keys / 2) * kBlock;
    std::atomic<int64_t> next{0};
    // per worker and query: the k best lower bounds seen, and the candidates above them; rescored
    // once at the end, best upper bound first, so a query's rescoring stops as a flat scan's does
    std::vector<std::vector<LowerK>> lower(tasks);
    std::vector<std::vector<std::vector<Deferred>>> pending(tasks, std::vector<std::vector<Deferred>>(m_));
    Pool::get().run(tasks, [&](int task) {
      std::vector<LowerK>& my_lower = lower[task];
      std::vector<std::vector<Deferred>>& my_pending = pending[task];
      for (int64_t i = 0; i < m_; ++i) my_lower.emplace_back(k_);
      std::vector<std::vector<Deferred>> part_pending;
      for (int64_t at = next.fetch_add(1); at < groups; at = next.fetch_add(1)) {
        const int64_t g = order[at], lo = starts[g], n = stops[g] - lo;
        if (n <= 0 || offsets[g + 1] <= offsets[g]) continue;
        Who who;
        for (int64_t j = offsets[g]; j < offsets[g + 1]; ++j) {
          const int64_t i = query_of[j];
          who.query.push_back(i);
          who.bias.push_back(query_bias != nullptr ? query_bias[j] : 0.0f);
          who.floor.push_back(std::max({best_[i].threshold(), lower_[i].threshold(), my_lower[i].threshold()}));
        }
        const Codes part{codes.packed + lo * plan_->code_bytes, n, codes.key_columns != nullptr ? codes.key_columns + (lo / kBlock) * column_block : nullptr};
        part_pending.assign(who.query.size(), {});
        std::vector<Found> found = scan_steps(part, factors + lo * nf, valid != nullptr ? valid + lo : nullptr, nullptr, Numbering{lo, nullptr},
                                              who, 0, (n + kRows - 1) / kRows, part_pending.data());
        for (size_t j = 0; j < who.query.size(); ++j) {
          const int64_t i = who.query[j];
          for (float value : found[j].lower.values()) my_lower[i].push(value);
          std::vector<Deferred>& list = my_pending[i];
          list.insert(list.end(), part_pending[j].begin(), part_pending[j].end());
          if (list.size() > kCompactAt + 4 * static_cast<size_t>(k_)) {
            const float tau = slack(my_lower[i].threshold());
            list.erase(std::remove_if(list.begin(), list.end(), [tau](const Deferred& c) { return c.upper < tau; }), list.end());
          }
        }
      }
    });
    for (int task = 0; task < tasks; ++task)
      for (int64_t i = 0; i < static_cast<int64_t>(lower[task].size()); ++i)
        for (float value : lower[task][i].values()) lower_[i].push(value);
    const int rescorers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(std::max(threads, 1), m_ / kQueriesPerTableTask)));
    std::atomic<int64_t> claimed{0};
    Pool::get().run(rescorers, [&](int) {
      std::vector<int32_t> idx(plan_->dim);
      std::vector<Deferred> list;
      int64_t rescored = 0;
      for (int64_t i = claimed.fetch_add(1); i < m_; i = claimed.fetch_add(1)) {  // claimed one query at a time, as the tables
        list.clear();
        for (int t = 0; t < tasks; ++t) list.insert(list.end(), pending[t][i].begin(), pending[t][i].end());
        std::sort(list.begin(), list.end(), [](const Deferred& a, const Deferred& b) { return a.upper > b.upper; });
        const float* query = &queries_[i * plan_->query_width()];
        for (size_t at = 0; at < list.size(); ++at) {
          const Deferred& c = list[at];
          if (c.upper < slack(std::max(lower_[i].threshold(), best_[i].threshold()))) break;
          // the rows were scanned as key columns: their packed bytes are far from the cache
          for (size_t ahead = at == 0 ? 1 : kRescoreAhead; ahead <= kRescoreAhead && at + ahead < list.size(); ++ahead)
            prefetch_row(codes.packed + list[at + ahead].row * plan_->code_bytes, factors + list[at + ahead].row * nf);
          const double score = plan_->exact(query, codes.packed + c.row * plan_->code_bytes, factors + c.row * nf, idx.data()) + c.bias;
          best_[i].push(Hit{static_cast<float>(score), c.row});
          ++rescored;
        }
      }
      rescored_ += rescored;
    });
  }

  // scores (m, k) best first and rows (m, k); -inf and -1 past the rows that qualified
  void result(float* scores, int64_t* rows) const {
    for (int64_t i = 0; i < m_; ++i) {
      const std::vector<Hit> hits = best_[i].sorted();
      for (int j = 0; j < k_; ++j) {
        const bool have = j < static_cast<int>(hits.size());
        scores[i * k_ + j] = have ? hits[j].score : -std::numeric_limits<float>::infinity();
        rows[i * k_ + j] = have ? hits[j].row : -1;
      }
    }
  }

  const QueryTables& tables(int64_t i) const { return tables_[i]; }
  const uint8_t* lut(int64_t i) const { return lut_.get() + i * lut_stride(); }
  int64_t rescored() const { return rescored_.load(); }

 private:
  static constexpr double kMinLookupsPerTask = 2e6;  // below this a worker costs more than it saves
  static constexpr int64_t kQueriesPerTableTask = 16;  // tables of fewer queries per worker are built on one thread
  static constexpr int64_t kQueriesPerClaim = 4;  // queries whose tables a worker claims at a time
  static constexpr int64_t kPrefetchSteps = 2;
  static constexpr size_t kRescoreAhead = 2;  // candidates whose rows are prefetched ahead of their rescoring
  static constexpr int kQueriesPerPass = 4;  // queries sharing each column load
  static constexpr size_t kCompactAt = 4096;  // candidates kept per query before the stale ones are dropped

  // the queries of one scan() call: position in the batch, bias, and the k-th best score so far
  struct Who {
    std::vector<int64_t> query;
    std::vector<float> bias, floor;
  };

  // the number of the scanned row at position p: row0 + p, or rows[p]
  struct Numbering {
    int64_t row0;
    const int64_t* rows;
    int64_t operator()(int64_t p) const { return rows != nullptr ? rows[p] : row0 + p; }
  };

  size_t lut_stride() const { return static_cast<size_t>(plan_->n_keys) * 16; }
  uint8_t* mutable_lut(int64_t i) { return lut_.get() + i * lut_stride(); }

  // Rows [first, last) steps: candidates are collected with their bounds as the steps go (the k
  // best lower bounds so far prune the rest), then rescored best upper bound first, stopping
  // where the upper bound falls below the k-th exact score: the rows rescored are few even
  // where the first rows of a scan would all pass a threshold that is still low.
  std::vector<Found> scan_steps(Codes codes, const float* factors, const uint8_t* valid, const float* bias, Numbering numbering,
                                const Who& who, int64_t first, int64_t last, std::vector<Deferred>* deferred = nullptr) {
    const Plan& plan = *plan_;
    const int nf = plan.n_factors;
    const size_t padded_block = static_cast<size_t>((plan.code_bytes + 15) & ~15) * kBlock;  // a transposed block
    const size_t column_block = static_cast<size_t>(plan.n_keys / 2) * kBlock;               // a block of key columns
    const bool columns = codes.key_columns != nullptr;
    // without key columns, packed rows are transposed into `cols` a step at a time and, unless the
    // plan is direct, their keys extracted into `keys`
    const size_t cols_bytes = columns ? 0 : padded_block * kBlocksPerStep;
    const size_t key_bytes = columns || plan.direct ? 0 : static_cast<size_t>(plan.n_keys) * kRows;
    // a tile of steps whose bytes every query pass of the tile reads again (from L2)
    const size_t step_bytes = columns ? column_block * kBlocksPerStep : cols_bytes + key_bytes;
    const int64_t q_all = static_cast<int64_t>(who.query.size());
    const int64_t tile = q_all == 1 ? 1 : std::min<int64_t>(std::max<int64_t>(1, last - first), std::max<int64_t>(1, (128 << 10) / static_cast<int64_t>(step_bytes)));
    Scratch cols(cols_bytes * tile), keys(key_bytes * tile), tail(std::max(padded_block, column_block) * kBlocksPerStep);
    std::vector<Found> found;
    for (int64_t j = 0; j < q_all; ++j) found.emplace_back(k_);
    std::vector<std::vector<Candidate>> candidates(q_all);
    std::vector<Columns> where(tile);
    std::vector<float> f0(tile * kRows), f1(tile * kRows), row_bias(tile * kRows);
    std::vector<uint64_t> live(tile);
    alignas(64) uint16_t sums[kQueriesPerPass][2][kRows];
    const int64_t n = codes.n;

    for (int64_t t0 = first; t0 < last; t0 += tile) {
      const int64_t t1 = std::min(last, t0 + tile);
      for (int64_t step = t0; step < t1; ++step) {
        const int64_t slot = step - t0, start = step * kRows, stop = std::min<int64_t>(n, start + kRows);
        where[slot] = step_columns(plan, codes, start, cols.data + slot * cols_bytes, padded_block, tail.data);
        if (!columns && !plan.direct) step_keys(plan, where[slot], keys.data + slot * key_bytes);
        uint64_t bits = 0;
        for (int64_t r = start; r < start + kRows; ++r) {
          const int64_t j = slot * kRows + (r - start);
          const bool in = r < stop && (valid == nullptr || valid[r]);
          f0[j] = r < stop ? factors[r * nf] : 0.0f;
          f1[j] = r < stop && nf > 1 ? factors[r * nf + 1] : 0.0f;
          row_bias[j] = r < stop && bias != nullptr ? bias[r] : 0.0f;
          bits |= static_cast<uint64_t>(in) << (r - start);
        }
        live[slot] = bits;
      }
      for (int64_t i0 = 0; i0 < q_all; i0 += kQueriesPerPass) {
        const int q = static_cast<int>(std::min<int64_t>(kQueriesPerPass, q_all - i0));
        const uint8_t* luts[kQueriesPerPass];
        for (int qi = 0; qi < q; ++qi) luts[qi] = lut(who.query[i0 + qi]);
        for (int64_t step = t0; step < t1; ++step) {
          const int64_t slot = step - t0;
          if (live[slot] == 0) continue;
          dispatch_sums(plan.direct || columns, q, luts, where[slot], keys.data + slot * key_bytes, sums);
          for (int qi = 0; qi < q; ++qi) {
            const int64_t i = i0 + qi;
            const QueryTables& t = tables_[who.query[i]];
            LowerK& lower = found[i].lower;
            const int64_t j0 = slot * kRows;
            // the bounds of row r of the step for this query: its estimate -+ the margin
            auto bounds = [&](int r) {
              const int64_t j = j0 + r;
              double approx = f0[j] * (sums[qi][0][r] * t.scale[0] + t.bias[0]) + row_bias[j] + who.bias[i];
              double margin = std::fabs(f0[j]) * t.margin[0];
              if (nf > 1) {
                approx += f1[j] * (sums[qi][1][r] * t.scale[1] + t.bias[1]);
                margin += std::fabs(f1[j]) * t.margin[1];
              }
              return std::make_pair(static_cast<float>(approx - margin), static_cast<float>(approx + margin));
            };
            float tau = slack(std::max(who.floor[i], lower.threshold()));
            if (tau == -std::numeric_limits<float>::infinity() && __builtin_popcountll(live[slot]) >= k_) {
              // no floor yet (a query's first rows): the k-th best lower bound of this step's rows,
              // what `lower` would hold once they were all pushed, prunes them before any is kept
              // (at nprobe 1 a query's list is its only rows: most would be kept, then dropped)
              float lows[kRows];
              int count = 0;
              for (uint64_t bits = live[slot]; bits; bits &= bits - 1) lows[count++] = bounds(__builtin_ctzll(bits)).first;
              std::nth_element(lows, lows + (k_ - 1), lows + count, std::greater<float>());
              tau = slack(lows[k_ - 1]);
            }
            uint64_t bits = may_enter(sums[qi], &f0[j0], &f1[j0], &row_bias[j0], who.bias[i], t, tau, nf) & live[slot];
            while (bits) {
              const int r = __builtin_ctzll(bits);
              bits &= bits - 1;
              const auto [low, high] = bounds(r);
              lower.push(low);
              candidates[i].push_back(Candidate{high, step * kRows + r});
            }
            if (candidates[i].size() > kCompactAt + 4 * static_cast<size_t>(k_)) compact(candidates[i], slack(lower.threshold()));
          }
        }
      }
    }
    if (deferred != nullptr) {  // the caller rescores: hand over the candidates still above the bounds
      for (int64_t i = 0; i < q_all; ++i) {
        const float tau = slack(std::max(who.floor[i], found[i].lower.threshold()));
        for (const Candidate& c : candidates[i])
          if (c.upper >= tau) deferred[i].push_back(Deferred{c.upper, who.bias[i], numbering(c.row)});
      }
      return found;
    }
    std::vector<int32_t> idx(plan.dim);
    int64_t rescored = 0;
    for (int64_t i = 0; i < q_all; ++i) {
      std::vector<Candidate>& list = candidates[i];
      std::sort(list.begin(), list.end(), [](const Candidate& a, const Candidate& b) { return a.upper > b.upper; });
      TopK& exact = found[i].exact;
      const float* query = &queries_[who.query[i] * plan.query_width()];
      for (const Candidate& c : list) {
        if (c.upper < slack(std::max({who.floor[i], found[i].lower.threshold(), exact.threshold()}))) break;
        const uint8_t* bytes = codes.packed + c.row * plan.code_bytes;
        const double score = plan.exact(query, bytes, factors + c.row * nf, idx.data()) + (bias != nullptr ? bias[c.row] : 0.0) +
                             static_cast<double>(who.bias[i]);
        exact.push(Hit{static_cast<float>(score), numbering(c.row)});
        ++rescored;
      }
    }
    rescored_ += rescored;
    return found;
  }

  // bring a packed row and its factors toward the cache
  void prefetch_row(const uint8_t* row, const float* factors) const {
    for (int line = 0; line < plan_->code_bytes; line += 64) __builtin_prefetch(row + line, 0, 1);
    __builtin_prefetch(row + plan_->code_bytes - 1, 0, 1);
    __builtin_prefetch(factors, 0, 1);
  }

  // a float at tau may stand for a float64 score just below it, and bounds are float-rounded
  static float slack(float tau) { return tau - 1e-6f * std::fabs(tau); }

  // drop the candidates whose upper bound is below tau
  static void compact(std::vector<Candidate>& list, float tau) {
    list.erase(std::remove_if(list.begin(), list.end(), [tau](const Candidate& c) { return c.upper < tau; }), list.end());
  }

  // the step's columns: its key columns where the caller keeps them, or its packed rows transposed into `cols`
  static Columns step_columns(const Plan& plan, Codes codes, int64_t start, uint8_t* cols, size_t padded_block, uint8_t* tail) {
    if (codes.key_columns != nullptr) {
      const size_t block_bytes = static_cast<size_t>(plan.n_keys / 2) * kBlock;
      const int64_t block = start / kBlock, blocks = (codes.n + kBlock - 1) / kBlock;
      if (block + kBlocksPerStep <= blocks) return Columns{codes.key_columns + block * block_bytes, block_bytes};
      // the step passes the last block (AVX-512, an odd block count): a zero block stands in
      std::memset(tail, 0, block_bytes * kBlocksPerStep);
      std::memcpy(tail, codes.key_columns + block * block_bytes, (blocks - block) * block_bytes);
      return Columns{tail, block_bytes};
    }
    const uint8_t* rows = codes.packed + start * plan.code_bytes;
    if (start + kRows >= codes.n) {  // the last step: a zero-padded copy, so no read passes the end of the codes
      std::memset(tail, 0, padded_block * kBlocksPerStep);
      std::memcpy(tail, rows, (codes.n - start) * plan.code_bytes);
      rows = tail;
    } else if (start + (kPrefetchSteps + 1) * kRows <= codes.n) {
      // a step reads 16 bytes from each of many rows at a time, which hardware prefetchers follow
      // poorly: bring the step after next into L2 ahead of time
      const uint8_t* ahead = rows + kPrefetchSteps * kRows * plan.code_bytes;
      for (size_t line = 0; line < kRows * static_cast<size_t>(plan.code_bytes); line += 64) __builtin_prefetch(ahead + line, 0, 2);
    }
    transpose_rows(plan, rows, plan.code_bytes, cols, padded_block);
    return Columns{cols, padded_block};
  }

  void dispatch_sums(bool direct, int q, const uint8_t* const* luts, Columns cols, const uint8_t* keys, uint16_t (*sums)[2][kRows]) const {
    const Plan& plan = *plan_;
    if (direct) {
      if (q == kQueriesPerPass) return step_sums<true, kQueriesPerPass>(plan, luts, cols, keys, sums);
      for (int i = 0; i < q; ++i) step_sums<true, 1>(plan, luts + i, cols, keys, sums + i);
    } else {
      if (q == kQueriesPerPass) return step_sums<false, kQueriesPerPass>(plan, luts, cols, keys, sums);
      for (int i = 0; i < q; ++i) step_sums<false, 1>(plan, luts + i, cols, keys, sums + i);
    }
  }

  std::shared_ptr<const Plan> plan_;
  int64_t m_;
  int k_;
  std::vector<float> queries_;
  std::unique_ptr<uint8_t[]> lut_;
  std::vector<QueryTables> tables_;
  std::vector<TopK> best_;
  std::vector<LowerK> lower_;
  std::atomic<int64_t> rescored_{0};
};

}  // namespace tq
