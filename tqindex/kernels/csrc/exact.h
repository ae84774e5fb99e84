// The exact (float64) estimator of one packed row, which rescores the fast-scan's candidates:
// f0 * <q, c[idx]> + f1 * <q2, signs> (the second term for prod codes only).
//
// Every build sums in the same order, so all give the same scores: coordinate j goes to partial
// sum j % 8, in order, and the eight partial sums add as ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)).
// Products of a float32 query value and a float32 level are exact in float64, so an AVX-512
// register of eight float64 lanes, or two AVX2 registers of four, are these eight sums. The
// SIMD builds score the common layouts (whole fields of 1 + 0, 2 + 0, 4 + 0, 2 + 1 or 1 + 1
// bits, one codebook of at most 16 levels, dim a multiple of kSimdCoords) kSimdCoords
// coordinates a step, the levels from registers (vpermps); the others read the codes 8
// coordinates at a time (whole fields up to 8 + 0 and 4 + 2 bits) or unpack the row first (any
// layout).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace tq {

#if defined(__AVX512F__)
constexpr int kSimdCoords = 16;  // coordinates a step of the SIMD index sum
#else
constexpr int kSimdCoords = 8;
#endif

struct Field {
  int32_t offset, width, stop, shift;  // as in tqindex/packing.py
};

class ExactScorer {
 public:
  ExactScorer() = default;

  // fields: the index fields; sign_field offset -1 for none; levels (L,) and level_offset (dim,):
  // coordinate j's code c has level levels[level_offset[j] + c] (make_plan checks every index is in bounds)
  ExactScorer(int dim, std::vector<Field> fields, Field sign_field, std::vector<float> levels, std::vector<int32_t> level_offset)
      : dim_(dim), fields_(std::move(fields)), sign_field_(sign_field), levels_(std::move(levels)), level_offset_(std::move(level_offset)) {
    const bool whole = dim_ % 8 == 0 && fields_.size() <= 2 &&
                       std::all_of(fields_.begin(), fields_.end(), [&](const Field& f) { return f.stop == dim_; }) &&
                       (fields_.empty() || fields_[0].shift == 0) && (fields_.size() < 2 || fields_[1].shift == fields_[0].width);
    w0_ = whole && !fields_.empty() ? fields_[0].width : 0;
    w1_ = whole && fields_.size() > 1 ? fields_[1].width : 0;
    const int n_levels = 1 << (w0_ + w1_);
    const bool one_codebook = !level_offset_.empty() && level_offset_[0] >= 0 && level_offset_[0] + n_levels <= static_cast<int>(levels_.size()) &&
                              std::all_of(level_offset_.begin(), level_offset_.end(), [&](int32_t o) { return o == level_offset_[0]; });
    simd_ = whole && w0_ > 0 && w0_ + w1_ <= 4 && w0_ <= 4 && w1_ <= 2 && dim_ % kSimdCoords == 0 && one_codebook;
    if (simd_) std::copy_n(levels_.begin() + level_offset_[0], n_levels, table_);
    signs_simd_ = sign_field_.offset >= 0 && dim_ % 8 == 0;
  }

  bool has_signs() const { return sign_field_.offset >= 0; }

  // q: the rotated query (dim floats, then dim more for prod codes); idx: dim int32 of scratch
  double operator()(const float* q, const uint8_t* row, const float* factors, int32_t* idx) const {
    double score = static_cast<double>(factors[0]) * index_sum(q, row, idx);
    if (sign_field_.offset < 0) return score;
    return score + static_cast<double>(factors[1]) * sign_sum(q + dim_, row + sign_field_.offset);
  }

 private:
  static double total(const double* part) { return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])); }

  // <q, c[idx]>
  double index_sum(const float* q, const uint8_t* row, int32_t* idx) const {
#if defined(__AVX512F__) || defined(__AVX2__)
    if (simd_) {
      if (w0_ == 1 && w1_ == 0) return simd_sum<1, 0>(q, row);
      if (w0_ == 2 && w1_ == 0) return simd_sum<2, 0>(q, row);
      if (w0_ == 4 && w1_ == 0) return simd_sum<4, 0>(q, row);
      if (w0_ == 2 && w1_ == 1) return simd_sum<2, 1>(q, row);
      if (w0_ == 1 && w1_ == 1) return simd_sum<1, 1>(q, row);
    }
#endif
    if (w0_ == 1 && w1_ == 0) return fused_sum<1, 0>(q, row);
    if (w0_ == 2 && w1_ == 0) return fused_sum<2, 0>(q, row);
    if (w0_ == 4 && w1_ == 0) return fused_sum<4, 0>(q, row);
    if (w0_ == 8 && w1_ == 0) return fused_sum<8, 0>(q, row);
    if (w0_ == 1 && w1_ == 1) return fused_sum<1, 1>(q, row);
    if (w0_ == 2 && w1_ == 1) return fused_sum<2, 1>(q, row);
    if (w0_ == 4 && w1_ == 1) return fused_sum<4, 1>(q, row);
    if (w0_ == 4 && w1_ == 2) return fused_sum<4, 2>(q, row);
    return unpacked_sum(q, row, idx);
  }

  // The W bits of coordinates j .. j + 7 of a whole field starting at `bytes`, one byte read per W
  template <int W>
  static uint64_t word8(const uint8_t* bytes, int j) {
    uint64_t word = 0;
    std::memcpy(&word, bytes + j / 8 * W, W);  // little-endian: coordinate j + t at bits t * W
    return word;
  }

  // whole fields of W0 bits (and W1 bits above them), 8 coordinates a step
  template <int W0, int W1>
  double fused_sum(const float* q, const uint8_t* row) const {
    const uint8_t* bytes0 = row + fields_[0].offset;
    const uint8_t* bytes1 = W1 > 0 ? row + fields_[1].offset : row;
    double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int j = 0; j < dim_; j += 8) {
      const uint64_t word0 = word8<W0>(bytes0, j), word1 = W1 > 0 ? word8<W1>(bytes1, j) : 0;
      for (int t = 0; t < 8; ++t) {
        uint32_t code = static_cast<uint32_t>(word0 >> (t * W0)) & ((1u << W0) - 1);
        if (W1 > 0) code |= (static_cast<uint32_t>(word1 >> (t * W1)) & ((1u << W1) - 1)) << W0;
        part[t] += static_cast<double>(q[j + t]) * levels_[level_offset_[j + t] + code];
      }
    }
    return total(part);
  }

  // any layout: the row unpacked into idx first
  double unpacked_sum(const float* q, const uint8_t* row, int32_t* idx) const {
    std::fill(idx, idx + dim_, 0);
    for (const Field& f : fields_) {
      const int per_byte = 8 / f.width, mask = (1 << f.width) - 1;
      for (int j = 0, byte = f.offset; j < f.stop; ++byte) {
        unsigned bits = row[byte];
        for (int slot = 0; slot < per_byte && j < f.stop; ++slot, ++j, bits >>= f.width) idx[j] |= (bits & mask) << f.shift;
      }
    }
    double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int j = 0; j < dim_; ++j) part[j % 8] += static_cast<double>(q[j]) * levels_[level_offset_[j] + idx[j]];
    return total(part);
  }

  // <q2, signs>: bit i of the sign bytes (LSB first) set means +q2[i], clear -q2[i]
  double sign_sum(const float* q2, const uint8_t* bytes) const {
    double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#if defined(__AVX512F__)
    if (signs_simd_) {
      __m512d acc = _mm512_setzero_pd();
      const __m512i sign = _mm512_set1_epi64(static_cast<int64_t>(uint64_t{1} << 63));
      for (int i = 0; i < dim_; i += 8) {
        const __m512i v = _mm512_castpd_si512(_mm512_cvtps_pd(_mm256_loadu_ps(q2 + i)));
        const __mmask8 clear = static_cast<__mmask8>(~bytes[i / 8]);
        acc = _mm512_add_pd(acc, _mm512_castsi512_pd(_mm512_mask_xor_epi64(v, clear, v, sign)));
      }
      _mm512_storeu_pd(part, acc);
      return total(part);
    }
#elif defined(__AVX2__)
    if (signs_simd_) {
      __m256d acc_lo = _mm256_setzero_pd(), acc_hi = _mm256_setzero_pd();
      const __m256d sign = _mm256_set1_pd(-0.0);
      const __m256i bit_lo = _mm256_setr_epi64x(1, 2, 4, 8), bit_hi = _mm256_setr_epi64x(16, 32, 64, 128);
      for (int i = 0; i < dim_; i += 8) {
        const __m256i byte = _mm256_set1_epi64x(bytes[i / 8]);
        const __m256d clear_lo = _mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_and_si256(byte, bit_lo), _mm256_setzero_si256()));
        const __m256d clear_hi = _mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_and_si256(byte, bit_hi), _mm256_setzero_si256()));
        acc_lo = _mm256_add_pd(acc_lo, _mm256_xor_pd(_mm256_cvtps_pd(_mm_loadu_ps(q2 + i)), _mm256_and_pd(clear_lo, sign)));
        acc_hi = _mm256_add_pd(acc_hi, _mm256_xor_pd(_mm256_cvtps_pd(_mm_loadu_ps(q2 + i + 4)), _mm256_and_pd(clear_hi, sign)));
      }
      _mm256_storeu_pd(part, acc_lo);
      _mm256_storeu_pd(part + 4, acc_hi);
      return total(part);
    }
#endif
    // times +-1: exact, and no branch on random bits; 8 coordinates a step keep the sums in registers
    auto add = [&](int i, int t) { part[t] += static_cast<double>(static_cast<int>((bytes[i / 8] >> t) & 1) * 2 - 1) * q2[i + t]; };
    int i = 0;
    for (; i + 8 <= dim_; i += 8)
      for (int t = 0; t < 8; ++t) add(i, t);
    for (int t = 0; i + t < dim_; ++t) add(i, t);
    return total(part);
  }

#if defined(__AVX512F__)
  // The W-bit codes of coordinates j .. j + 15 of a whole field starting at `bytes`, one per lane
  template <int W>
  static __m512i codes16(const uint8_t* bytes, int j) {
    uint64_t word = 0;
    std::memcpy(&word, bytes + j / 8 * W, 2 * W);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i bit = _mm512_mullo_epi32(lane, _mm512_set1_epi32(W));  // lane t's bits start at t * W
    const __m512i dwords = _mm512_permutexvar_epi32(_mm512_srli_epi32(bit, 5), _mm512_set1_epi64(static_cast<int64_t>(word)));
    return _mm512_and_si512(_mm512_srlv_epi32(dwords, _mm512_and_si512(bit, _mm512_set1_epi32(31))), _mm512_set1_epi32((1 << W) - 1));
  }

  template <int W0, int W1>
  double simd_sum(const float* q, const uint8_t* row) const {
    const uint8_t* bytes0 = row + fields_[0].offset;
    const uint8_t* bytes1 = W1 > 0 ? row + fields_[1].offset : row;
    const __m512 table = _mm512_loadu_ps(table_);
    __m512d acc = _mm512_setzero_pd();
    for (int j = 0; j < dim_; j += 16) {
      __m512i code = codes16<W0>(bytes0, j);
      if (W1 > 0) code = _mm512_or_si512(code, _mm512_slli_epi32(codes16<W1>(bytes1, j), W0));
      const __m512 level = _mm512_permutexvar_ps(code, table), value = _mm512_loadu_ps(q + j);
      acc = _mm512_add_pd(acc, _mm512_mul_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(value)), _mm512_cvtps_pd(_mm512_castps512_ps256(level))));
      const __m256 value_hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(value), 1));
      const __m256 level_hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(level), 1));
      acc = _mm512_add_pd(acc, _mm512_mul_pd(_mm512_cvtps_pd(value_hi), _mm512_cvtps_pd(level_hi)));
    }
    double part[8];
    _mm512_storeu_pd(part, acc);
    return total(part);
  }
#elif defined(__AVX2__)
  // The W-bit codes of coordinates j .. j + 7 of a whole field starting at `bytes`, one per lane
  template <int W>
  static __m256i codes8(const uint8_t* bytes, int j) {
    uint32_t word = 0;
    std::memcpy(&word, bytes + j / 8 * W, W);
    const __m256i bit = _mm256_setr_epi32(0, W, 2 * W, 3 * W, 4 * W, 5 * W, 6 * W, 7 * W);  // lane t's bits start at t * W
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), bit), _mm256_set1_epi32((1 << W) - 1));
  }

  template <int W0, int W1>
  double simd_sum(const float* q, const uint8_t* row) const {
    const uint8_t* bytes0 = row + fields_[0].offset;
    const uint8_t* bytes1 = W1 > 0 ? row + fields_[1].offset : row;
    const __m256 table_lo = _mm256_loadu_ps(table_), table_hi = _mm256_loadu_ps(table_ + 8);
    __m256d acc_lo = _mm256_setzero_pd(), acc_hi = _mm256_setzero_pd();  // partial sums 0-3 and 4-7
    for (int j = 0; j < dim_; j += 8) {
      __m256i code = codes8<W0>(bytes0, j);
      if (W1 > 0) code = _mm256_or_si256(code, _mm256_slli_epi32(codes8<W1>(bytes1, j), W0));
      __m256 level = _mm256_permutevar8x32_ps(table_lo, code);
      if (W0 + W1 > 3)  // codes 8-15 from the second register: bit 3 moved to the sign bit selects it
        level = _mm256_blendv_ps(level, _mm256_permutevar8x32_ps(table_hi, code), _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));
      const __m256 value = _mm256_loadu_ps(q + j);
      acc_lo = _mm256_add_pd(acc_lo, _mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(value)), _mm256_cvtps_pd(_mm256_castps256_ps128(level))));
      acc_hi = _mm256_add_pd(acc_hi, _mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(value, 1)), _mm256_cvtps_pd(_mm256_extractf128_ps(level, 1))));
    }
    double part[8];
    _mm256_storeu_pd(part, acc_lo);
    _mm256_storeu_pd(part + 4, acc_hi);
    return total(part);
  }
#endif

  int dim_ = 0;
  std::vector<Field> fields_;
  Field sign_field_{-1, 1, 0, 0};
  std::vector<float> levels_;
  std::vector<int32_t> level_offset_;
  int w0_ = 0, w1_ = 0;     // widths of whole fields (0: not whole)
  bool simd_ = false;       // the SIMD index sum applies
  bool signs_simd_ = false;  // the SIMD sign sum applies
  float table_[16] = {};    // the one codebook, for simd_
};

}  // namespace tq
