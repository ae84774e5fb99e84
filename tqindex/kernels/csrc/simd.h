// SIMD traits for the fast-scan kernel: one struct per instruction set, all with the same members.
//
// A register holds kLanes lanes of 16 bytes. Byte-table look-ups (`lookup`) and unpacks work
// lane by lane, as pshufb and punpck do, so one block of 16 * kLanes rows is processed as
// kLanes independent 16-row sub-blocks: lane l of every register belongs to rows 16l .. 16l+15.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(TQ_SIMDE)  // AVX-512 emulated with SIMDe, to test that path on CPUs without it (scripts/check_avx512.sh)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#elif defined(TQ_ISA_AVX2) || defined(TQ_ISA_AVX512)
#include <immintrin.h>
#endif

namespace tq {

#if defined(TQ_ISA_AVX2)
struct Simd {
  static constexpr int kLanes = 2;
  static constexpr int kBytes = 32;
  using V = __m256i;
  static V zero() { return _mm256_setzero_si256(); }
  static V load(const uint8_t* p) { return _mm256_load_si256(reinterpret_cast<const V*>(p)); }
  static void store(uint8_t* p, V v) { _mm256_store_si256(reinterpret_cast<V*>(p), v); }
  // column c of a step's 32-row blocks (kernel.h): one block per register
  static V load_column(const uint8_t* p, size_t) { return _mm256_loadu_si256(reinterpret_cast<const V*>(p)); }
  static void store_column(uint8_t* p, size_t, V v) { _mm256_storeu_si256(reinterpret_cast<V*>(p), v); }
  // the 16-bit sums of even rows (low bytes) and odd rows (high bytes) -> uint16 per row, in row order
  static void store_rows(uint16_t* out, V even, V odd) {
    const V lo = _mm256_unpacklo_epi16(even, odd), hi = _mm256_unpackhi_epi16(even, odd);
    _mm256_storeu_si256(reinterpret_cast<V*>(out), _mm256_permute2x128_si256(lo, hi, 0x20));
    _mm256_storeu_si256(reinterpret_cast<V*>(out + 16), _mm256_permute2x128_si256(lo, hi, 0x31));
  }
  // lane l <- the 16 bytes at p + l * lane_stride
  static V load_lanes(const uint8_t* p, size_t lane_stride) {
    __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + lane_stride));
    return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
  }
  // every lane <- the 16-byte table at p
  static V broadcast_table(const uint8_t* p) {
    return _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static V set1(uint8_t b) { return _mm256_set1_epi8(static_cast<char>(b)); }
  static V lookup(V table, V idx) { return _mm256_shuffle_epi8(table, idx); }
  static V bit_and(V a, V b) { return _mm256_and_si256(a, b); }
  static V bit_or(V a, V b) { return _mm256_or_si256(a, b); }
  static V srl16(V a, int n) { return _mm256_srl_epi16(a, _mm_cvtsi32_si128(n)); }
  static V sll16(V a, int n) { return _mm256_sll_epi16(a, _mm_cvtsi32_si128(n)); }
  static V high_bytes(V a) { return _mm256_srli_epi16(a, 8); }
  static V low_to_high(V a) { return _mm256_slli_epi16(a, 8); }
  static V add8(V a, V b) { return _mm256_add_epi8(a, b); }
  static V add16(V a, V b) { return _mm256_add_epi16(a, b); }
  static V sub16(V a, V b) { return _mm256_sub_epi16(a, b); }
  static V unpacklo8(V a, V b) { return _mm256_unpacklo_epi8(a, b); }
  static V unpackhi8(V a, V b) { return _mm256_unpackhi_epi8(a, b); }
  static V unpacklo16(V a, V b) { return _mm256_unpacklo_epi16(a, b); }
  static V unpackhi16(V a, V b) { return _mm256_unpackhi_epi16(a, b); }
  static V unpacklo32(V a, V b) { return _mm256_unpacklo_epi32(a, b); }
  static V unpackhi32(V a, V b) { return _mm256_unpackhi_epi32(a, b); }
  static V unpacklo64(V a, V b) { return _mm256_unpacklo_epi64(a, b); }
  static V unpackhi64(V a, V b) { return _mm256_unpackhi_epi64(a, b); }
};
#elif defined(TQ_ISA_AVX512)
struct Simd {
  static constexpr int kLanes = 4;
  static constexpr int kBytes = 64;
  using V = __m512i;
  static V zero() { return _mm512_setzero_si512(); }
  static V load(const uint8_t* p) { return _mm512_load_si512(reinterpret_cast<const void*>(p)); }
  static void store(uint8_t* p, V v) { _mm512_store_si512(reinterpret_cast<void*>(p), v); }
  // column c of a step's two 32-row blocks, `stride` bytes apart: lanes 0-1 from the first
  static V load_column(const uint8_t* p, size_t stride) {
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + stride)), 1);
  }
  static void store_column(uint8_t* p, size_t stride, V v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(v));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + stride), _mm512_extracti64x4_epi64(v, 1));
  }
  static void store_rows(uint16_t* out, V even, V odd) {
    // per lane: unpacklo gives its rows 0-7, unpackhi its rows 8-15
    const V lo = _mm512_unpacklo_epi16(even, odd), hi = _mm512_unpackhi_epi16(even, odd);
    const V first = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), second = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    _mm512_storeu_si512(reinterpret_cast<void*>(out), _mm512_permutex2var_epi64(lo, first, hi));
    _mm512_storeu_si512(reinterpret_cast<void*>(out + 32), _mm512_permutex2var_epi64(lo, second, hi));
  }
  static V load_lanes(const uint8_t* p, size_t lane_stride) {
    V v = _mm512_inserti32x4(_mm512_setzero_si512(), _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), 0);
    v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + lane_stride)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 * lane_stride)), 2);
    return _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 3 * lane_stride)), 3);
  }
  static V broadcast_table(const uint8_t* p) {
    return _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static V set1(uint8_t b) { return _mm512_set1_epi8(static_cast<char>(b)); }
  static V lookup(V table, V idx) { return _mm512_shuffle_epi8(table, idx); }
  static V bit_and(V a, V b) { return _mm512_and_si512(a, b); }
  static V bit_or(V a, V b) { return _mm512_or_si512(a, b); }
  static V srl16(V a, int n) { return _mm512_srl_epi16(a, _mm_cvtsi32_si128(n)); }
  static V sll16(V a, int n) { return _mm512_sll_epi16(a, _mm_cvtsi32_si128(n)); }
  static V high_bytes(V a) { return _mm512_srli_epi16(a, 8); }
  static V low_to_high(V a) { return _mm512_slli_epi16(a, 8); }
  static V add8(V a, V b) { return _mm512_add_epi8(a, b); }
  static V add16(V a, V b) { return _mm512_add_epi16(a, b); }
  static V sub16(V a, V b) { return _mm512_sub_epi16(a, b); }
  static V unpacklo8(V a, V b) { return _mm512_unpacklo_epi8(a, b); }
  static V unpackhi8(V a, V b) { return _mm512_unpackhi_epi8(a, b); }
  static V unpacklo16(V a, V b) { return _mm512_unpacklo_epi16(a, b); }
  static V unpackhi16(V a, V b) { return _mm512_unpackhi_epi16(a, b); }
  static V unpacklo32(V a, V b) { return _mm512_unpacklo_epi32(a, b); }
  static V unpackhi32(V a, V b) { return _mm512_unpackhi_epi32(a, b); }
  static V unpacklo64(V a, V b) { return _mm512_unpacklo_epi64(a, b); }
  static V unpackhi64(V a, V b) { return _mm512_unpackhi_epi64(a, b); }
};
#endif

}  // namespace tq
