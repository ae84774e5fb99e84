// Python bindings of the fast-scan kernel. Built once per instruction set, as
// tqindex.kernels._fastscan_{generic,avx2,avx512}; tqindex/kernels/fastscan.py picks one.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <functional>
#include <algorithm>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>

#include "scan.h"

namespace py = pybind11;

namespace {

#if defined(TQ_ISA_AVX512)
constexpr const char* kIsa = "avx512";
#elif defined(TQ_ISA_AVX2)
constexpr const char* kIsa = "avx2";
#else
constexpr const char* kIsa = "generic";
#endif

template <class T>
using Array = py::array_t<T, py::array::c_style>;

template <class T>
const T* data_of(const Array<T>& a, py::ssize_t size, const char* name) {
  if (a.size() != size) throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(size) + " values, got " + std::to_string(a.size()));
  return a.data();
}

// An optional array argument's data: nullptr for None, else the array (kept alive in `holder`),
// checked to hold `size` values
template <class T>
const T* optional_data(const py::object& value, Array<T>& holder, py::ssize_t size, const char* name) {
  if (value.is_none()) return nullptr;
  holder = value.cast<Array<T>>();
  return data_of(holder, size, name);
}

std::shared_ptr<tq::Plan> make_plan(int dim, int code_bytes, int n_factors, int n_index_keys, bool direct, const Array<int32_t>& parts,
                                    const Array<int32_t>& part_start, const Array<int32_t>& key_coord, const Array<float>& key_values,
                                    const Array<uint8_t>& reachable, const Array<float>& key_errmax, const Array<float>& key_errvar,
                                    const Array<int32_t>& fields, const Array<int32_t>& sign_field, const Array<float>& levels,
                                    const Array<int32_t>& level_offset) {
  auto plan = std::make_shared<tq::Plan>();
  plan->dim = dim;
  plan->code_bytes = code_bytes;
  plan->n_factors = n_factors;
  plan->n_keys = static_cast<int32_t>(part_start.size()) - 1;
  plan->n_index_keys = n_index_keys;
  plan->direct = direct;
  if (plan->n_keys < 0 || n_index_keys < 0 || n_index_keys > plan->n_keys || dim < 1 || code_bytes < 1 || n_factors < 1 || n_factors > 2)
    throw std::invalid_argument("fast-scan plan: inconsistent sizes");
  if (plan->n_keys % 2 || n_index_keys % 2 || (direct && plan->n_keys / 2 > code_bytes))
    throw std::invalid_argument("fast-scan plan: keys go two to a byte column, each segment an even count");
  const int32_t* ps = data_of(part_start, plan->n_keys + 1, "part_start");
  plan->part_start.assign(ps, ps + plan->n_keys + 1);
  if (parts.ndim() != 2 || parts.shape(1) != 4 || parts.shape(0) != plan->part_start.back()) throw std::invalid_argument("parts: expected (P, 4)");
  for (py::ssize_t p = 0; p < parts.shape(0); ++p) {
    const int32_t* v = parts.data(p, 0);
    if (v[0] < 0 || v[0] >= code_bytes) throw std::invalid_argument("parts: column outside the row");
    plan->parts.push_back(tq::Part{v[0], v[1], v[2], static_cast<uint8_t>(v[3])});
  }
  const py::ssize_t g = plan->n_keys;
  const int32_t* kc = data_of(key_coord, g * 4, "key_coord");
  for (py::ssize_t i = 0; i < g * 4; ++i)
    if (kc[i] >= (sign_field.data()[0] >= 0 ? 2 * dim : dim)) throw std::invalid_argument("key_coord: column outside the query");
  plan->key_coord.assign(kc, kc + g * 4);
  const float* kv = data_of(key_values, g * 64, "key_values");
  plan->key_values.assign(kv, kv + g * 64);
  const uint8_t* re = data_of(reachable, g * 16, "reachable");
  plan->reachable.assign(re, re + g * 16);
  const float* em = data_of(key_errmax, g * 4, "key_errmax");
  plan->key_errmax.assign(em, em + g * 4);
  const float* ev = data_of(key_errvar, g * 4, "key_errvar");
  plan->key_errvar.assign(ev, ev + g * 4);
  if (fields.ndim() != 2 || fields.shape(1) != 4) throw std::invalid_argument("fields: expected (F, 4)");
  std::vector<tq::Field> index_fields;
  for (py::ssize_t f = 0; f < fields.shape(0); ++f) {
    const int32_t* v = fields.data(f, 0);
    if (v[1] != 1 && v[1] != 2 && v[1] != 4 && v[1] != 8) throw std::invalid_argument("fields: widths must be 1, 2, 4 or 8 bits");
    if (v[2] < 0 || v[2] > dim) throw std::invalid_argument("fields: a field's stop must be within 0..dim");
    if (v[0] < 0 || v[3] < 0 || v[3] + v[1] > 30 || v[0] + (static_cast<int64_t>(v[2]) * v[1] + 7) / 8 > code_bytes)
      throw std::invalid_argument("fields: a field outside the row");
    index_fields.push_back(tq::Field{v[0], v[1], v[2], v[3]});
  }
  const int32_t* sf = data_of(sign_field, 4, "sign_field");
  if (sf[0] >= 0 && sf[0] + (dim + 7) / 8 > code_bytes) throw std::invalid_argument("sign_field: outside the row");
  const int32_t* lo = data_of(level_offset, dim, "level_offset");
  for (int j = 0; j < dim; ++j) {  // the largest code of coordinate j must index a level
    int64_t top = 0;
    for (const tq::Field& f : index_fields)
      if (j < f.stop) top |= ((int64_t{1} << f.width) - 1) << f.shift;
    if (lo[j] < 0 || lo[j] + top >= static_cast<int64_t>(levels.size())) throw std::invalid_argument("level_offset: a code past the levels");
  }
  plan->exact = tq::ExactScorer(dim, std::move(index_fields), tq::Field{sf[0], sf[1], sf[2], sf[3]},
                                std::vector<float>(levels.data(), levels.data() + levels.size()), std::vector<int32_t>(lo, lo + dim));
  plan->index_keys();
  return plan;
}

class PySearch {
 public:
  PySearch(std::shared_ptr<tq::Plan> plan, const Array<float>& queries, int k, double z, int threads) : plan_(plan) {
    if (queries.ndim() != 2 || queries.shape(1) != plan->query_width())
      throw std::invalid_argument("queries: expected (m, " + std::to_string(plan->query_width()) + ") float32");
    if (k < 1) throw std::invalid_argument("k must be >= 1");
    m_ = queries.shape(0);
    k_ = k;
    py::gil_scoped_release release;
    search_ = std::make_unique<tq::Search>(plan, queries.data(), m_, k, z, threads);
  }

  // packed rows (n, code_bytes); key_columns: None or their key columns (key_columns() of the
  // plan); bias: None or float32 (n,), added to every query's score of the row; rows: None (the
  // rows are numbered row0..) or int64 (n,), their numbers; queries: None (all) or int64 (q,),
  // distinct positions in the batch, the queries this scan is for; query_bias: None or float32,
  // one per query scanned (q, or m without queries), added to its scores of every row
  void scan(const Array<uint8_t>& packed, const Array<float>& factors, const py::object& valid, int64_t row0, int threads,
            const py::object& key_columns, const py::object& bias, const py::object& rows, const py::object& queries,
            const py::object& query_bias) {
    const int64_t n = checked_rows(packed, factors);
    Array<uint8_t> mask, columns;
    Array<float> row_bias;
    const uint8_t* valid_ptr = optional_data(valid, mask, n, "valid");
    const uint8_t* columns_ptr = optional_data(key_columns, columns, column_bytes(n), "key_columns");
    const float* bias_ptr = optional_data(bias, row_bias, n, "bias");
    Array<int64_t> numbers, positions;
    Array<float> per_query;
    const int64_t* rows_ptr = optional_data(rows, numbers, n, "rows");
    tq::Subset subset;
    if (!queries.is_none()) {
      positions = queries.cast<Array<int64_t>>();
      if (positions.ndim() != 1) throw std::invalid_argument("queries: expected (q,) int64");
      subset.queries = positions.data();
      subset.count = positions.size();
      std::vector<bool> seen(m_);
      for (int64_t j = 0; j < subset.count; ++j) {
        const int64_t i = subset.queries[j];
        if (i < 0 || i >= m_ || seen[i]) throw std::invalid_argument("queries: expected distinct positions in 0.." + std::to_string(m_ - 1));
        seen[i] = true;
      }
    }
    if (!query_bias.is_none()) {
      per_query = query_bias.cast<Array<float>>();
      subset.bias = data_of(per_query, queries.is_none() ? m_ : subset.count, "query_bias");
    }
    py::gil_scoped_release release;
    search_->scan(tq::Codes{packed.data(), n, columns_ptr}, factors.data(), valid_ptr, bias_ptr, row0, rows_ptr, subset, threads);
  }

  // groups of rows, each scanned for its own queries (tq::Search::scan_groups): packed (n,
  // code_bytes), factors (n, n_factors), valid None or (n,), key_columns None or the rows' key
  // columns (every start then a multiple of the block); starts, stops int64 (g,): each group's
  // rows; offsets int64 (g + 1,) into queries int64 (total,): each group's query positions;
  // query_bias None or float32 (total,)
  void scan_groups(const Array<uint8_t>& packed, const Array<float>& factors, const py::object& valid, const py::object& key_columns,
                   const Array<int64_t>& starts, const Array<int64_t>& stops, const Array<int64_t>& offsets, const Array<int64_t>& queries,
                   const py::object& query_bias, int threads) {
    const int64_t n = checked_rows(packed, factors), groups = starts.size();
    const int64_t* lo = data_of(starts, groups, "starts");
    const int64_t* hi = data_of(stops, groups, "stops");
    const int64_t* off = data_of(offsets, groups + 1, "offsets");
    const int64_t* who = data_of(queries, off[groups], "queries");
    Array<uint8_t> mask, columns;
    Array<float> per_query;
    const uint8_t* valid_ptr = optional_data(valid, mask, n, "valid");
    const uint8_t* columns_ptr = optional_data(key_columns, columns, column_bytes(n), "key_columns");
    const float* bias_ptr = optional_data(query_bias, per_query, off[groups], "query_bias");
    if (off[0] != 0) throw std::invalid_argument("offsets: expected to start at 0");
    std::vector<int64_t> seen(m_, -1);  // the last group each query was seen in
    for (int64_t g = 0; g < groups; ++g) {
      if (lo[g] < 0 || hi[g] < lo[g] || hi[g] > n) throw std::invalid_argument("starts, stops: a group outside the rows");
      if (columns_ptr != nullptr && lo[g] % tq::kBlock) throw std::invalid_argument("starts: with key columns, multiples of " + std::to_string(tq::kBlock));
      if (off[g + 1] < off[g]) throw std::invalid_argument("offsets: expected non-decreasing");
      for (int64_t j = off[g]; j < off[g + 1]; ++j) {
        if (who[j] < 0 || who[j] >= m_ || seen[who[j]] == g)
          throw std::invalid_argument("queries: expected distinct positions in 0.." + std::to_string(m_ - 1) + " within a group");
        seen[who[j]] = g;
      }
    }
    py::gil_scoped_release release;
    search_->scan_groups(tq::Codes{packed.data(), n, columns_ptr}, factors.data(), valid_ptr, lo, hi, groups, off, who, bias_ptr, threads);
  }

  py::tuple result() const {
    Array<float> scores({m_, static_cast<int64_t>(k_)});
    Array<int64_t> rows({m_, static_cast<int64_t>(k_)});
    search_->result(scores.mutable_data(), rows.mutable_data());
    return py::make_tuple(scores, rows);
  }

  // (lut (m, n_keys, 16) uint8, scale (m, 2), bias (m, 2), margin (m, 2)): for tests
  py::tuple tables() const {
    const int64_t g = plan_->n_keys;
    Array<uint8_t> lut({m_, g, int64_t(16)});
    Array<double> scale({m_, int64_t(2)}), bias({m_, int64_t(2)}), margin({m_, int64_t(2)});
    for (int64_t i = 0; i < m_; ++i) {
      std::copy(search_->lut(i), search_->lut(i) + g * 16, lut.mutable_data(i, 0, 0));
      const tq::QueryTables& t = search_->tables(i);
      for (int s = 0; s < 2; ++s) {
        *scale.mutable_data(i, s) = t.scale[s];
        *bias.mutable_data(i, s) = t.bias[s];
        *margin.mutable_data(i, s) = t.margin[s];
      }
    }
    return py::make_tuple(lut, scale, bias, margin);
  }

  int64_t rescored() const { return search_->rescored(); }

 private:
  // the row count of packed rows (n, code_bytes) with their factors (n, n_factors), checked
  int64_t checked_rows(const Array<uint8_t>& packed, const Array<float>& factors) const {
    if (packed.ndim() != 2 || packed.shape(1) != plan_->code_bytes)
      throw std::invalid_argument("packed: expected (n, " + std::to_string(plan_->code_bytes) + ") uint8");
    const int64_t n = packed.shape(0);
    if (factors.ndim() != 2 || factors.shape(0) != n || factors.shape(1) != plan_->n_factors) throw std::invalid_argument("factors: expected (n, n_factors) float32");
    return n;
  }

  // bytes of the key columns of n rows
  int64_t column_bytes(int64_t n) const { return (n + tq::kBlock - 1) / tq::kBlock * (plan_->n_keys / 2) * tq::kBlock; }

  std::shared_ptr<tq::Plan> plan_;
  std::unique_ptr<tq::Search> search_;
  int64_t m_ = 0;
  int k_ = 0;
};

// key columns of packed rows (n, code_bytes): uint8 (ceil(n / 32), n_keys / 2, 32)
Array<uint8_t> key_columns(const std::shared_ptr<tq::Plan>& plan, const Array<uint8_t>& packed, int threads) {
  if (packed.ndim() != 2 || packed.shape(1) != plan->code_bytes)
    throw std::invalid_argument("packed: expected (n, " + std::to_string(plan->code_bytes) + ") uint8");
  const int64_t n = packed.shape(0), blocks = (n + tq::kBlock - 1) / tq::kBlock;
  Array<uint8_t> out({blocks, static_cast<int64_t>(plan->n_keys / 2), static_cast<int64_t>(tq::kBlock)});
  uint8_t* data = out.mutable_data();
  py::gil_scoped_release release;
  tq::to_key_columns(*plan, packed.data(), n, data, threads);
  return out;
}

// The largest of row[start, stop), stop > start, finite
float row_max(const float* row, int64_t start, int64_t stop) {
  float lanes[8];
  for (int t = 0; t < 8; ++t) lanes[t] = row[start];
  int64_t j = start;
  for (; j + 8 <= stop; j += 8)  // 8 independent maxima: no chain of dependent compares
    for (int t = 0; t < 8; ++t) lanes[t] = row[j + t] > lanes[t] ? row[j + t] : lanes[t];
  for (; j < stop; ++j) lanes[0] = row[j] > lanes[0] ? row[j] : lanes[0];
  float top = lanes[0];
  for (int t = 1; t < 8; ++t) top = std::max(top, lanes[t]);
  return top;
}

// The k best entries (larger, then lower column) of one row of n finite floats into scores[0..k)
// and columns[0..k). The least of the maxima of >= k blocks of the row is at most its k-th
// largest, so the entries at or above it hold the k best: a pass for the maxima, a pass
// collecting the few entries above as integer keys that sort as the entries rank, and a
// selection among those (a heap of k costs a mispredicted branch and a sift per insertion
// instead: 2.4x slower at k = 32 of 1,024).
void top_k_of_row(const float* row, int64_t n, int k, std::vector<uint64_t>& keys, float* scores, int64_t* columns) {
  if (k == 1) {  // the maximum, then its first column (a running arg-max waits on each compare: 4x slower)
    const float top = row_max(row, 0, n);
    int64_t best = 0;
    while (best + 1 < n && row[best] != top) ++best;  // bounded: a NaN (not for these rows) ends at the last column
    scores[0] = top == 0.0f ? 0.0f : top;  // -0.0 ties with 0.0, as below
    columns[0] = best;
    return;
  }
  const int64_t block = std::max<int64_t>(1, n / k);  // ceil(n / block) >= k blocks
  float floor = std::numeric_limits<float>::infinity();
  for (int64_t start = 0; start < n; start += block) floor = std::min(floor, row_max(row, start, std::min(n, start + block)));
  keys.clear();
  for (int64_t j = 0; j < n; ++j) {
    if (row[j] < floor) continue;  // most entries: a branch the CPU predicts (6x faster than a branch-free store)
    uint32_t bits;
    std::memcpy(&bits, &row[j], sizeof bits);
    bits = bits == 0x80000000u ? 0 : bits;  // -0.0 ties with 0.0
    bits = (bits >> 31) != 0 ? ~bits : bits | 0x80000000u;  // unsigned order = float order
    keys.push_back((static_cast<uint64_t>(bits) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(j)));  // ties: lower column first
  }
  const auto first = keys.begin(), last = keys.end();
  std::nth_element(first, first + (k - 1), last, std::greater<uint64_t>());
  std::sort(first, first + k, std::greater<uint64_t>());
  for (int j = 0; j < k; ++j) {
    uint32_t bits = static_cast<uint32_t>(keys[j] >> 32);
    bits = (bits >> 31) != 0 ? bits & 0x7fffffffu : ~bits;
    std::memcpy(&scores[j], &bits, sizeof bits);
    columns[j] = ~static_cast<uint32_t>(keys[j]);
  }
}

// The k largest entries of each row of scores (m, n), finite: values float32 (m, k) best first and
// their columns int64 (m, k), ties to the lower column (`top_k_of_row`). Rows are claimed a few at
// a time by `threads` workers.
py::tuple top_k_rows(const Array<float>& scores, int k, int threads) {
  if (scores.ndim() != 2) throw std::invalid_argument("scores: expected (m, n) float32");
  const int64_t m = scores.shape(0), n = scores.shape(1);
  if (k < 1 || k > n) throw std::invalid_argument("k must be in 1.." + std::to_string(n) + ", got " + std::to_string(k));
  if (n > (int64_t{1} << 32)) throw std::invalid_argument("scores: at most 2^32 columns");
  Array<float> values({m, static_cast<int64_t>(k)});
  Array<int64_t> columns({m, static_cast<int64_t>(k)});
  const float* in = scores.data();
  float* out_values = values.mutable_data();
  int64_t* out_columns = columns.mutable_data();
  {
  py::gil_scoped_release release;
  constexpr int64_t kRowsPerClaim = 16;
  const int tasks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, m / (4 * kRowsPerClaim))));
  std::atomic<int64_t> next{0};
  tq::Pool::get().run(tasks, [&](int) {
    std::vector<uint64_t> keys;
    for (int64_t i0 = next.fetch_add(kRowsPerClaim); i0 < m; i0 = next.fetch_add(kRowsPerClaim))
      for (int64_t i = i0; i < std::min(m, i0 + kRowsPerClaim); ++i) top_k_of_row(in + i * n, n, k, keys, out_values + i * k, out_columns + i * k);
  });
  }
  return py::make_tuple(values, columns);
}

bool cpu_supports(const std::string& feature) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (feature == "avx2") return __builtin_cpu_supports("avx2");
  if (feature == "avx512bw") return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#endif
  return false;
}

}  // namespace

PYBIND11_MODULE(TQ_MODULE_NAME, m) {
  m.doc() = "tqindex fast-scan kernel (4-bit look-up tables in SIMD registers, exact rescoring)";
  m.attr("isa") = kIsa;
  m.attr("block_rows") = tq::kBlock;
  m.def("cpu_supports", &cpu_supports, "True if this CPU has the feature ('avx2' or 'avx512bw')");
  py::class_<tq::Plan, std::shared_ptr<tq::Plan>>(m, "Plan", py::module_local());  // each build keeps its own types
  m.def("make_plan", &make_plan);
  m.def("key_columns", &key_columns, py::arg("plan"), py::arg("packed"), py::arg("threads"));
  m.def("top_k_rows", &top_k_rows, py::arg("scores"), py::arg("k"), py::arg("threads"));
  m.def("set_openmp_pid", &tq::set_openmp_pid, py::arg("pid"),
        "Searches of process pid (0: of none) run on the OpenMP team of torch's runtime, the others on std::threads");
  py::class_<PySearch>(m, "Search", py::module_local())
      .def(py::init<std::shared_ptr<tq::Plan>, const Array<float>&, int, double, int>(), py::arg("plan"), py::arg("queries"), py::arg("k"),
           py::arg("z"), py::arg("threads") = 1)
      .def("scan", &PySearch::scan, py::arg("packed"), py::arg("factors"), py::arg("valid"), py::arg("row0"), py::arg("threads"),
           py::arg("key_columns") = py::none(), py::arg("bias") = py::none(), py::arg("rows") = py::none(), py::arg("queries") = py::none(),
           py::arg("query_bias") = py::none())
      .def("scan_groups", &PySearch::scan_groups, py::arg("packed"), py::arg("factors"), py::arg("valid"), py::arg("key_columns"),
           py::arg("starts"), py::arg("stops"), py::arg("offsets"), py::arg("queries"), py::arg("query_bias"), py::arg("threads"))
      .def("result", &PySearch::result)
      .def("tables", &PySearch::tables)
      .def("rescored", &PySearch::rescored);
}

