// The one nanobind translation unit: validates tensors received through DLPack, builds the core's
// plain descriptions, calls the CPU or CUDA implementation, and turns a non-OK Status into a
// Python exception. No libtorch: outputs are allocated by the Python layer and passed in.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "vecinfer/attention.h"
#include "vecinfer/kept.h"
#include "vecinfer/ops.h"
#include "vecinfer/paged.h"

namespace nb = nanobind;
using vecinfer::DType;
using vecinfer::Status;
using vecinfer::StatusCode;

namespace {

using OptArray = std::optional<nb::ndarray<>>;

[[noreturn]] void fail_value(const std::string& message) { throw nb::value_error(message.c_str()); }
[[noreturn]] void fail_type(const std::string& message) { throw nb::type_error(message.c_str()); }

void raise_if_error(const Status& s) {
  switch (s.code) {
    case StatusCode::kOk: return;
    case StatusCode::kInvalidArgument:
    case StatusCode::kUnsupported: fail_value(s.message);
    default: throw std::runtime_error(s.message);  // nanobind maps this to RuntimeError
  }
}

std::string shape_string(const nb::ndarray<>& a) {
  std::string s = "[";
  for (size_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + "]";
}

std::string dtype_name(nb::dlpack::dtype t) {
  using Code = nb::dlpack::dtype_code;
  const char* kind = t.code == uint8_t(Code::Float) ? "float" : t.code == uint8_t(Code::Int) ? "int"
                   : t.code == uint8_t(Code::UInt) ? "uint" : t.code == uint8_t(Code::Bfloat) ? "bfloat"
                   : "other";
  return std::string(kind) + std::to_string(t.bits);
}

bool is_float32(nb::dlpack::dtype t) { return t == nb::dtype<float>(); }
bool is_uint8(nb::dlpack::dtype t) { return t == nb::dtype<uint8_t>(); }

DType element_dtype(const nb::ndarray<>& a, const char* name) {
  const auto t = a.dtype();
  if (t.lanes == 1 && t.bits == 32 && t.code == uint8_t(nb::dlpack::dtype_code::Float)) return DType::kFloat32;
  if (t.lanes == 1 && t.bits == 16 && t.code == uint8_t(nb::dlpack::dtype_code::Float)) return DType::kFloat16;
  if (t.lanes == 1 && t.bits == 16 && t.code == uint8_t(nb::dlpack::dtype_code::Bfloat)) return DType::kBFloat16;
  fail_type(std::string(name) + ": expected a float32, float16 or bfloat16 tensor, got " + dtype_name(t));
}

bool is_contiguous(const nb::ndarray<>& a) {
  if (a.size() == 0) return true;  // an empty tensor's strides are arbitrary
  int64_t expected = 1;
  for (size_t i = a.ndim(); i-- > 0;) {
    if (a.shape(i) != 1 && a.stride(i) != expected) return false;
    expected *= a.shape(i);
  }
  return true;
}

// Where every tensor of one call lives: all on the CPU, or all on one CUDA device.
struct Placement {
  bool cuda = false;
  int32_t device_id = 0;
};

Placement placement_of(const nb::ndarray<>& a, const char* name) {
  if (a.device_type() == nb::device::cpu::value) return {false, 0};
  if (a.device_type() == nb::device::cuda::value) return {true, a.device_id()};
  fail_value(std::string(name) + ": tensors must be on the CPU or a CUDA device");
}

void check_same_placement(const Placement& p, const nb::ndarray<>& a, const char* name) {
  const Placement q = placement_of(a, name);
  if (q.cuda != p.cuda || q.device_id != p.device_id)
    fail_value(std::string(name) + ": must be on the same device as the input tensor");
}

void check_contiguous(const nb::ndarray<>& a, const char* name) {
  if (!is_contiguous(a)) fail_value(std::string(name) + ": must be contiguous (call .contiguous())");
}

// The element tensor of an op: [..., heads, tokens, head_dim], contiguous, non-empty.
vecinfer::RowLayout row_layout(const nb::ndarray<>& x, const char* name) {
  if (x.ndim() < 1) fail_value(std::string(name) + ": expected at least one dimension [..., head_dim]");
  check_contiguous(x, name);
  vecinfer::RowLayout layout;
  const size_t n = x.ndim();
  layout.head_dim = static_cast<int32_t>(x.shape(n - 1));
  if (x.shape(n - 1) != 64 && x.shape(n - 1) != 128 && x.shape(n - 1) != 256)
    fail_value(std::string(name) + ": head_dim (last dimension) must be 64, 128 or 256, got shape " +
               shape_string(x));
  if (x.size() == 0) fail_value(std::string(name) + ": is empty (shape " + shape_string(x) + ")");
  layout.num_rows = static_cast<int64_t>(x.size()) / layout.head_dim;
  layout.num_heads = n >= 3 ? static_cast<int64_t>(x.shape(n - 3)) : 1;
  layout.tokens_per_head = n >= 2 ? static_cast<int64_t>(x.shape(n - 2)) : 1;
  return layout;
}

// Scale or mean table: float32 [table_rows, head_dim] on the input's device.
const float* table(const OptArray& a, const char* name, const vecinfer::RowLayout& layout,
                   const Placement& p, int64_t& table_rows) {
  if (!a) return nullptr;
  const nb::ndarray<>& t = *a;
  if (!is_float32(t.dtype())) fail_type(std::string(name) + ": expected a float32 tensor, got " + dtype_name(t.dtype()));
  check_same_placement(p, t, name);
  check_contiguous(t, name);
  if (t.ndim() != 2 || static_cast<int64_t>(t.shape(1)) != layout.head_dim || t.shape(0) == 0)
    fail_value(std::string(name) + ": expected shape [num_kv_heads, " + std::to_string(layout.head_dim) +
               "], got " + shape_string(t));
  const int64_t rows = static_cast<int64_t>(t.shape(0));
  if (layout.num_heads % rows != 0)
    fail_value(std::string(name) + ": has " + std::to_string(rows) + " rows (KV heads), but the input has " +
               std::to_string(layout.num_heads) + " heads (third-from-last dimension), not a multiple");
  if (table_rows != 0 && table_rows != rows) fail_value("scale and mean must have the same shape");
  table_rows = rows;
  return static_cast<const float*>(t.data());
}

vecinfer::Transform make_transform(const OptArray& scale, const OptArray& mean, bool hadamard,
                                   const vecinfer::RowLayout& layout, const Placement& p) {
  vecinfer::Transform t;
  int64_t rows = 0;
  t.scale = table(scale, "scale", layout, p, rows);
  t.mean = table(mean, "mean", layout, p, rows);
  t.table_rows = rows > 0 ? rows : 1;
  t.hadamard = hadamard;
  return t;
}

// Codebook: float32 [num_codebooks, 2**code_bits, sub_dim].
vecinfer::Codebook make_codebook(const nb::ndarray<>& cb, const vecinfer::RowLayout& layout, const Placement& p,
                                 const std::string& name = "codebook") {
  if (!is_float32(cb.dtype())) fail_type(name + ": expected a float32 tensor, got " + dtype_name(cb.dtype()));
  check_same_placement(p, cb, name.c_str());
  check_contiguous(cb, name.c_str());
  if (cb.ndim() != 3)
    fail_value(name + ": expected shape [num_codebooks, 2**code_bits, sub_dim], got " + shape_string(cb));
  const int64_t groups = static_cast<int64_t>(cb.shape(0));
  const int64_t centroids = static_cast<int64_t>(cb.shape(1));
  const int64_t sub_dim = static_cast<int64_t>(cb.shape(2));
  if (sub_dim != 2 && sub_dim != 4 && sub_dim != 8)
    fail_value(name + ": sub_dim (last dimension) must be 2, 4 or 8, got shape " + shape_string(cb));
  const int32_t bits = vecinfer::code_bits_of(centroids);
  if (bits < 4 || bits > 12)
    fail_value(name + ": the number of centroids (second dimension) must be a power of two from 16 to "
               "4096 (code_bits 4 to 12), got shape " + shape_string(cb));
  if (groups < 1 || layout.num_heads % groups != 0)
    fail_value(name + ": " + std::to_string(groups) + " codebooks do not divide the input's " +
               std::to_string(layout.num_heads) + " heads; use 1 (per layer) or one per KV head");
  vecinfer::Codebook c;
  c.centroids = static_cast<const float*>(cb.data());
  c.num_codebooks = groups;
  c.sub_dim = static_cast<int32_t>(sub_dim);
  c.code_bits = bits;
  return c;
}

void check_like(const nb::ndarray<>& out, const nb::ndarray<>& x, const char* name, DType dtype,
                const Placement& p) {
  if (element_dtype(out, name) != dtype) fail_type(std::string(name) + ": must have the input's dtype");
  check_same_placement(p, out, name);
  check_contiguous(out, name);
  bool same = out.ndim() == x.ndim();
  for (size_t i = 0; same && i < x.ndim(); ++i) same = out.shape(i) == x.shape(i);
  if (!same) fail_value(std::string(name) + ": expected shape " + shape_string(x) + ", got " + shape_string(out));
}

// codes: uint8 [..., code_row_bytes] with the element tensor's leading shape.
void check_codes(const nb::ndarray<>& codes, const nb::ndarray<>& x, int64_t row_bytes, const Placement& p) {
  if (!is_uint8(codes.dtype())) fail_type("codes: expected a uint8 tensor, got " + dtype_name(codes.dtype()));
  check_same_placement(p, codes, "codes");
  check_contiguous(codes, "codes");
  bool same = codes.ndim() == x.ndim() && static_cast<int64_t>(codes.shape(codes.ndim() - 1)) == row_bytes;
  for (size_t i = 0; same && i + 1 < x.ndim(); ++i) same = codes.shape(i) == x.shape(i);
  if (!same) {
    std::string expected = "[";
    for (size_t i = 0; i + 1 < x.ndim(); ++i) expected += std::to_string(x.shape(i)) + ", ";
    fail_value("codes: expected shape " + expected + std::to_string(row_bytes) + "] (" + std::to_string(row_bytes) +
               " bytes per row for this codebook), got " + shape_string(codes));
  }
}

// The checks an op makes of its element tensor (dtype, device, layout), on their own: the Python
// layer asks them before allocating an output sized from that tensor.
void check_elements(nb::ndarray<> x, const std::string& name) {
  element_dtype(x, name.c_str());
  placement_of(x, name.c_str());
  row_layout(x, name.c_str());
}

void* stream_ptr(uintptr_t stream) { return reinterpret_cast<void*>(stream); }

void transform(nb::ndarray<> x, nb::ndarray<> out, OptArray scale, OptArray mean, bool hadamard, int kind,
               uintptr_t stream) {
  const DType dtype = element_dtype(x, "x");
  const Placement p = placement_of(x, "x");
  const vecinfer::RowLayout layout = row_layout(x, "x");
  check_like(out, x, "out", dtype, p);
  const vecinfer::Transform t = make_transform(scale, mean, hadamard, layout, p);
  const auto k = static_cast<vecinfer::TransformKind>(kind);
  raise_if_error(p.cuda ? vecinfer::cuda::transform(dtype, x.data(), out.data(), layout, t, k, stream_ptr(stream))
                        : vecinfer::cpu::transform(dtype, x.data(), out.data(), layout, t, k));
}

void vq_encode(nb::ndarray<> x, nb::ndarray<> codes, nb::ndarray<> codebook, OptArray scale, OptArray mean,
               bool hadamard, uintptr_t stream) {
  const DType dtype = element_dtype(x, "x");
  const Placement p = placement_of(x, "x");
  const vecinfer::RowLayout layout = row_layout(x, "x");
  const vecinfer::Codebook cb = make_codebook(codebook, layout, p);
  check_codes(codes, x, vecinfer::code_row_bytes(layout.head_dim, cb.sub_dim, cb.code_bits), p);
  const vecinfer::Transform t = make_transform(scale, mean, hadamard, layout, p);
  auto* c = static_cast<uint8_t*>(codes.data());
  raise_if_error(p.cuda ? vecinfer::cuda::vq_encode(dtype, x.data(), c, layout, cb, t, stream_ptr(stream))
                        : vecinfer::cpu::vq_encode(dtype, x.data(), c, layout, cb, t));
}

void vq_decode(nb::ndarray<> codes, nb::ndarray<> out, nb::ndarray<> codebook, OptArray scale, OptArray mean,
               bool hadamard, uintptr_t stream) {
  const DType dtype = element_dtype(out, "out");
  const Placement p = placement_of(out, "out");
  const vecinfer::RowLayout layout = row_layout(out, "out");
  const vecinfer::Codebook cb = make_codebook(codebook, layout, p);
  check_codes(codes, out, vecinfer::code_row_bytes(layout.head_dim, cb.sub_dim, cb.code_bits), p);
  const vecinfer::Transform t = make_transform(scale, mean, hadamard, layout, p);
  const auto* c = static_cast<const uint8_t*>(codes.data());
  raise_if_error(p.cuda ? vecinfer::cuda::vq_decode(dtype, c, out.data(), layout, cb, t, stream_ptr(stream))
                        : vecinfer::cpu::vq_decode(dtype, c, out.data(), layout, cb, t));
}

// ---- attention on the compressed cache ---------------------------------------------------------

bool is_int32(nb::dlpack::dtype t) { return t == nb::dtype<int32_t>(); }

// A 4-D contiguous tensor [batch, heads, tokens, last] on the placement, with the given dims checked
// (-1: any). Returns the token capacity (third dimension).
int64_t check_4d(const nb::ndarray<>& a, const char* name, const Placement& p, int64_t batch, int64_t heads,
                 int64_t last, const char* what) {
  check_same_placement(p, a, name);
  check_contiguous(a, name);
  if (a.ndim() != 4 || int64_t(a.shape(0)) != batch || int64_t(a.shape(1)) != heads ||
      (last >= 0 && int64_t(a.shape(3)) != last))
    fail_value(std::string(name) + ": expected shape [" + std::to_string(batch) + ", " + std::to_string(heads) +
               ", tokens, " + std::to_string(last) + "] (" + what + "), got " + shape_string(a));
  return int64_t(a.shape(2));
}

struct AttentionArgs {
  DType dtype;
  Placement placement;
  vecinfer::AttentionShape shape;
  vecinfer::CompressedKV kv;
};

// The cache side of an attention or append call: a batch of `batch` sequences, head_dim d, the
// element type and placement of the call.
vecinfer::CompressedKV describe_cache(DType dtype, const Placement& p, int64_t batch, int64_t d,
                                      const nb::ndarray<>& key_codes, const nb::ndarray<>& value_codes,
                                      const nb::ndarray<>& lengths, const nb::ndarray<>& sink_keys,
                                      const nb::ndarray<>& sink_values, const nb::ndarray<>& recent_keys,
                                      const nb::ndarray<>& recent_values, const nb::ndarray<>& key_codebook,
                                      const nb::ndarray<>& value_codebook, const OptArray& key_scale,
                                      const OptArray& key_mean, const OptArray& value_mean, bool hadamard,
                                      int64_t max_coded, const OptArray& page_table, const OptArray& seq_slots,
                                      bool recent_ring) {
  vecinfer::CompressedKV kv;
  if (!is_uint8(key_codes.dtype()) || !is_uint8(value_codes.dtype()))
    fail_type("key_codes/value_codes: expected uint8 tensors");
  const bool paged = page_table.has_value();
  if (key_codes.ndim() != 4)
    fail_value(std::string("key_codes: expected ") +
               (paged ? "[num_pages, num_kv_heads, page_size, bytes]" : "[batch, num_kv_heads, capacity, bytes]") +
               ", got " + shape_string(key_codes));
  // The per-sequence buffers have a row per sequence of the batch, or per slot with seq_slots.
  int64_t slots = batch;
  if (seq_slots) {
    const nb::ndarray<>& t = *seq_slots;
    if (!is_int32(t.dtype())) fail_type("seq_slots: expected an int32 tensor, got " + dtype_name(t.dtype()));
    check_same_placement(p, t, "seq_slots");
    check_contiguous(t, "seq_slots");
    if (t.ndim() != 1 || int64_t(t.shape(0)) != batch)
      fail_value("seq_slots: expected [" + std::to_string(batch) + "] (q's batch), got " + shape_string(t));
    if (lengths.ndim() != 2 || lengths.shape(0) < 1)
      fail_value("lengths: expected [num_slots, 3] (sinks, coded, recent per slot), got " + shape_string(lengths));
    slots = int64_t(lengths.shape(0));
    kv.seq_slots = static_cast<const int32_t*>(t.data());
    kv.num_slots = slots;
  }
  kv.recent_ring = recent_ring;
  if (!paged && int64_t(key_codes.shape(0)) != slots)
    fail_value("key_codes: holds " + std::to_string(key_codes.shape(0)) + " sequences, expected " +
               std::to_string(slots) + (seq_slots ? " (the slots of lengths)" : " (q's batch)"));
  const int64_t hkv = int64_t(key_codes.shape(1));
  if (hkv < 1) fail_value("key_codes: has no KV heads (second dimension), shape " + shape_string(key_codes));
  vecinfer::RowLayout heads;  // tables and codebooks are per KV head
  heads.head_dim = int32_t(d);
  heads.num_heads = hkv;
  heads.num_rows = hkv;
  heads.tokens_per_head = 1;
  kv.key_codebook = make_codebook(key_codebook, heads, p, "key_codebook");
  kv.value_codebook = make_codebook(value_codebook, heads, p, "value_codebook");
  const int64_t key_bytes = vecinfer::code_row_bytes(int32_t(d), kv.key_codebook.sub_dim, kv.key_codebook.code_bits);
  const int64_t value_bytes =
      vecinfer::code_row_bytes(int32_t(d), kv.value_codebook.sub_dim, kv.value_codebook.code_bits);
  // Contiguous: [batch, Hkv, capacity, bytes]. Paged: pools [num_pages, Hkv, page_size, bytes].
  const int64_t outer = paged ? int64_t(key_codes.shape(0)) : slots;
  const int64_t rows = check_4d(key_codes, "key_codes", p, outer, hkv, key_bytes, "bytes per row of the key codebook");
  if (check_4d(value_codes, "value_codes", p, outer, hkv, value_bytes, "bytes per row of the value codebook") != rows)
    fail_value("value_codes: must hold as many tokens (third dimension) as key_codes");
  kv.code_capacity = rows;
  if (paged) {
    const nb::ndarray<>& t = *page_table;
    if (!is_int32(t.dtype())) fail_type("page_table: expected an int32 tensor, got " + dtype_name(t.dtype()));
    check_same_placement(p, t, "page_table");
    check_contiguous(t, "page_table");
    if (t.ndim() != 2 || int64_t(t.shape(0)) != slots || t.shape(1) == 0)
      fail_value("page_table: expected [" + std::to_string(slots) + ", max_pages] (page ids per sequence), got " +
                 shape_string(t));
    if (outer < 1) fail_value("key_codes: the page pools hold no pages");
    if (rows < 16 || (rows & (rows - 1)) != 0)
      fail_value("key_codes: page_size (third dimension) must be a power of two >= 16, got " + std::to_string(rows));
    kv.page_table = static_cast<const int32_t*>(t.data());
    kv.page_size = int32_t(rows);
    kv.num_pages = outer;
    kv.max_pages = int64_t(t.shape(1));
    if (kv.max_pages > (int64_t{1} << 40) / rows) fail_value("page_table: too many pages per sequence");
    kv.code_capacity = kv.max_pages * rows;
  }
  kv.key_codes = static_cast<uint8_t*>(key_codes.data());
  kv.value_codes = static_cast<uint8_t*>(value_codes.data());
  if (!is_int32(lengths.dtype())) fail_type("lengths: expected an int32 tensor, got " + dtype_name(lengths.dtype()));
  check_same_placement(p, lengths, "lengths");
  check_contiguous(lengths, "lengths");
  if (lengths.ndim() != 2 || int64_t(lengths.shape(0)) != slots || lengths.shape(1) != 3)
    fail_value("lengths: expected [" + std::to_string(slots) + ", 3] (sinks, coded, recent per sequence), got " +
               shape_string(lengths));
  kv.lengths = static_cast<int32_t*>(lengths.data());
  for (auto [t, name] : {std::pair{&sink_keys, "sink_keys"}, {&sink_values, "sink_values"},
                         {&recent_keys, "recent_keys"}, {&recent_values, "recent_values"}})
    if (element_dtype(*t, name) != dtype) fail_type(std::string(name) + ": must have q's dtype");
  kv.sink_capacity = check_4d(sink_keys, "sink_keys", p, slots, hkv, d, "head_dim");
  if (check_4d(sink_values, "sink_values", p, slots, hkv, d, "head_dim") != kv.sink_capacity)
    fail_value("sink_values: must hold as many tokens as sink_keys");
  kv.recent_capacity = check_4d(recent_keys, "recent_keys", p, slots, hkv, d, "head_dim");
  if (check_4d(recent_values, "recent_values", p, slots, hkv, d, "head_dim") != kv.recent_capacity)
    fail_value("recent_values: must hold as many tokens as recent_keys");
  kv.sink_keys = sink_keys.data();
  kv.sink_values = sink_values.data();
  kv.recent_keys = recent_keys.data();
  kv.recent_values = recent_values.data();
  kv.key_transform = make_transform(key_scale, key_mean, hadamard, heads, p);
  int64_t mean_rows = 0;
  kv.value_mean = table(value_mean, "value_mean", heads, p, mean_rows);
  kv.value_mean_rows = mean_rows > 0 ? mean_rows : 1;
  if (max_coded < 0 || max_coded > kv.code_capacity)
    fail_value("max_coded: must be in [0, " + std::to_string(kv.code_capacity) + "] (the code capacity), got " +
               std::to_string(max_coded));
  kv.max_coded = max_coded;
  return kv;
}

AttentionArgs attention_args(const nb::ndarray<>& q, const nb::ndarray<>& key_codes, const nb::ndarray<>& value_codes,
                             const nb::ndarray<>& lengths, const nb::ndarray<>& sink_keys,
                             const nb::ndarray<>& sink_values, const nb::ndarray<>& recent_keys,
                             const nb::ndarray<>& recent_values, const nb::ndarray<>& key_codebook,
                             const nb::ndarray<>& value_codebook, const OptArray& key_scale,
                             const OptArray& key_mean, const OptArray& value_mean, bool hadamard, int64_t max_coded,
                             const OptArray& page_table, const OptArray& seq_slots, bool recent_ring,
                             const OptArray& query_indptr = std::nullopt, int64_t max_queries = 0) {
  AttentionArgs a;
  a.dtype = element_dtype(q, "q");
  a.placement = placement_of(q, "q");
  const Placement& p = a.placement;
  check_contiguous(q, "q");
  int64_t batch = 0, hq = 0, tq = 0, d = 0;
  if (query_indptr) {  // ragged: q packed [total_queries, num_q_heads, head_dim]
    const nb::ndarray<>& t = *query_indptr;
    if (q.ndim() != 3)
      fail_value("q: with query_indptr expected packed [total_queries, num_q_heads, head_dim], got " + shape_string(q));
    if (!is_int32(t.dtype())) fail_type("query_indptr: expected an int32 tensor, got " + dtype_name(t.dtype()));
    check_same_placement(p, t, "query_indptr");
    check_contiguous(t, "query_indptr");
    if (t.ndim() != 1 || t.shape(0) < 2)
      fail_value("query_indptr: expected [batch + 1] (a batch of at least one), got " + shape_string(t));
    if (max_queries < 1) fail_value("max_queries: must be >= 1 (the most queries of any sequence)");
    batch = int64_t(t.shape(0)) - 1, hq = int64_t(q.shape(1)), tq = max_queries, d = int64_t(q.shape(2));
    if (q.shape(0) < 1 || hq < 1) fail_value("q: is empty (shape " + shape_string(q) + ")");
    a.shape.query_indptr = static_cast<const int32_t*>(t.data());
    a.shape.total_queries = int64_t(q.shape(0));
  } else {
    if (q.ndim() != 4) fail_value("q: expected [batch, num_q_heads, num_queries, head_dim], got " + shape_string(q));
    batch = int64_t(q.shape(0)), hq = int64_t(q.shape(1)), tq = int64_t(q.shape(2)), d = int64_t(q.shape(3));
    if (batch < 1 || hq < 1 || tq < 1) fail_value("q: is empty (shape " + shape_string(q) + ")");
  }
  if (d != 64 && d != 128 && d != 256) fail_value("q: head_dim (last dimension) must be 64, 128 or 256, got " + shape_string(q));
  a.kv = describe_cache(a.dtype, p, batch, d, key_codes, value_codes, lengths, sink_keys, sink_values, recent_keys,
                        recent_values, key_codebook, value_codebook, key_scale, key_mean, value_mean, hadamard,
                        max_coded, page_table, seq_slots, recent_ring);
  const int64_t hkv = int64_t(key_codes.shape(1));
  if (hq % hkv != 0)
    fail_value("q: " + std::to_string(hq) + " query heads are not a multiple of the " + std::to_string(hkv) +
               " KV heads of key_codes");
  a.shape.batch = batch;
  a.shape.num_q_heads = hq;
  a.shape.num_kv_heads = hkv;
  a.shape.num_queries = tq;
  a.shape.head_dim = int32_t(d);
  return a;
}

// Workspace bytes the CUDA kernel needs: integers only, so the call is cheap.
int64_t attention_workspace_bytes(int64_t batch, int64_t num_q_heads, int64_t num_kv_heads, int64_t num_queries,
                                  int32_t head_dim, int32_t key_sub_dim, int32_t key_code_bits,
                                  int32_t value_sub_dim, int32_t value_code_bits, int64_t max_coded,
                                  int64_t full_precision_capacity, bool ragged) {
  vecinfer::AttentionShape shape;
  shape.total_queries = ragged ? 1 : 0;  // only its sign is read: a ragged call (attention.h)
  shape.batch = batch;
  shape.num_q_heads = num_q_heads;
  shape.num_kv_heads = num_kv_heads;
  shape.num_queries = num_queries;
  shape.head_dim = head_dim;
  vecinfer::CompressedKV kv;
  kv.key_codebook.sub_dim = key_sub_dim;
  kv.key_codebook.code_bits = key_code_bits;
  kv.value_codebook.sub_dim = value_sub_dim;
  kv.value_codebook.code_bits = value_code_bits;
  kv.max_coded = max_coded;
  kv.sink_capacity = full_precision_capacity;  // sinks + recent window: only their sum is read
  return static_cast<int64_t>(vecinfer::cuda::attention_workspace_bytes(shape, kv));
}

// Runs attention (workspace: a CUDA byte tensor of attention_workspace_bytes, ignored on the CPU).
void attention(nb::ndarray<> q, nb::ndarray<> out, OptArray lse, nb::ndarray<> key_codes, nb::ndarray<> value_codes,
                  nb::ndarray<> lengths, nb::ndarray<> sink_keys, nb::ndarray<> sink_values, nb::ndarray<> recent_keys,
                  nb::ndarray<> recent_values, nb::ndarray<> key_codebook, nb::ndarray<> value_codebook,
                  OptArray key_scale, OptArray key_mean, OptArray value_mean, bool hadamard, double scale,
                  int64_t max_coded, OptArray page_table, OptArray seq_slots, bool recent_ring, OptArray workspace,
                  uintptr_t stream, OptArray query_indptr, int64_t max_queries) {
  const AttentionArgs a = attention_args(q, key_codes, value_codes, lengths, sink_keys, sink_values, recent_keys,
                                         recent_values, key_codebook, value_codebook, key_scale, key_mean, value_mean,
                                         hadamard, max_coded, page_table, seq_slots, recent_ring, query_indptr,
                                         max_queries);
  check_like(out, q, "out", a.dtype, a.placement);
  float* lse_ptr = nullptr;
  if (lse) {
    if (!is_float32(lse->dtype())) fail_type("lse: expected a float32 tensor");
    check_same_placement(a.placement, *lse, "lse");
    check_contiguous(*lse, "lse");
    if (query_indptr ? lse->ndim() != 2 || lse->shape(0) != q.shape(0) || lse->shape(1) != q.shape(1)
                     : lse->ndim() != 3 || lse->shape(0) != q.shape(0) || lse->shape(1) != q.shape(1) ||
                           lse->shape(2) != q.shape(2))
      fail_value(std::string("lse: expected shape ") +
                 (query_indptr ? "[total_queries, num_q_heads]" : "[batch, num_q_heads, num_queries]") + ", got " +
                 shape_string(*lse));
    lse_ptr = static_cast<float*>(lse->data());
  }
  const float softmax_scale = static_cast<float>(scale);
  if (!a.placement.cuda) {
    raise_if_error(vecinfer::cpu::attention(a.dtype, q.data(), out.data(), lse_ptr, a.shape, a.kv, softmax_scale));
    return;
  }
  if (!workspace) fail_value("workspace: required on CUDA (see attention_workspace_bytes)");
  check_same_placement(a.placement, *workspace, "workspace");
  raise_if_error(vecinfer::cuda::attention(a.dtype, q.data(), out.data(), lse_ptr, a.shape, a.kv, softmax_scale,
                                           workspace->data(), workspace->nbytes(), stream_ptr(stream)));
}

// Appends tokens (keys/values [rows, num_kv_heads, head_dim], head_dim contiguous) to a paged
// cache with a ring window; arrivals: CUDA int32 [num_slots] zeros (see paged.h), ignored on the CPU.
void append_tokens(nb::ndarray<> keys, nb::ndarray<> values, nb::ndarray<> seq_slots, nb::ndarray<> indptr,
                   int64_t max_new_tokens, nb::ndarray<> key_codes, nb::ndarray<> value_codes, nb::ndarray<> page_table,
                   nb::ndarray<> lengths, nb::ndarray<> sink_keys, nb::ndarray<> sink_values, nb::ndarray<> ring_keys,
                   nb::ndarray<> ring_values, nb::ndarray<> key_codebook, nb::ndarray<> value_codebook,
                   OptArray key_scale, OptArray key_mean, OptArray value_mean, bool hadamard, OptArray arrivals,
                   uintptr_t stream) {
  const DType dtype = element_dtype(keys, "keys");
  const Placement p = placement_of(keys, "keys");
  if (keys.ndim() != 3 || keys.stride(2) != 1)
    fail_value("keys: expected [rows, num_kv_heads, head_dim] with head_dim contiguous, got " + shape_string(keys));
  if (element_dtype(values, "values") != dtype) fail_type("values: must have the dtype of keys");
  check_same_placement(p, values, "values");
  if (values.ndim() != 3 || values.shape(0) != keys.shape(0) || values.shape(1) != keys.shape(1) ||
      values.shape(2) != keys.shape(2) || values.stride(0) != keys.stride(0) || values.stride(1) != keys.stride(1) ||
      values.stride(2) != 1)
    fail_value("values: expected the shape and strides of keys " + shape_string(keys) + ", got " + shape_string(values));
  if (keys.stride(0) < 0 || keys.stride(1) < 0) fail_value("keys/values: negative strides");
  const int64_t d = int64_t(keys.shape(2));
  if (d != 64 && d != 128 && d != 256) fail_value("keys: head_dim (last dimension) must be 64, 128 or 256");
  for (auto [t, name] : {std::pair{&seq_slots, "seq_slots"}, {&indptr, "indptr"}}) {
    if (!is_int32(t->dtype())) fail_type(std::string(name) + ": expected an int32 tensor, got " + dtype_name(t->dtype()));
    check_same_placement(p, *t, name);
    check_contiguous(*t, name);
  }
  if (seq_slots.ndim() != 1 || seq_slots.shape(0) == 0)
    fail_value("seq_slots: expected a non-empty [batch] tensor, got " + shape_string(seq_slots));
  const int64_t batch = int64_t(seq_slots.shape(0));
  if (indptr.ndim() != 1 || int64_t(indptr.shape(0)) != batch + 1)
    fail_value("indptr: expected [" + std::to_string(batch + 1) + "] (batch + 1), got " + shape_string(indptr));
  const OptArray slots_arg = seq_slots, table_arg = page_table;
  const vecinfer::CompressedKV kv =
      describe_cache(dtype, p, batch, d, key_codes, value_codes, lengths, sink_keys, sink_values, ring_keys,
                     ring_values, key_codebook, value_codebook, key_scale, key_mean, value_mean, hadamard, 0,
                     table_arg, slots_arg, true);
  const int64_t hkv = int64_t(key_codes.shape(1));
  if (int64_t(keys.shape(1)) != hkv)
    fail_value("keys: " + std::to_string(keys.shape(1)) + " heads, the cache " + std::to_string(hkv) + " KV heads");
  vecinfer::TokenBatch tokens;
  tokens.batch = batch;
  tokens.seq_slots = static_cast<const int32_t*>(seq_slots.data());
  tokens.indptr = static_cast<const int32_t*>(indptr.data());
  tokens.keys = keys.data();
  tokens.values = values.data();
  tokens.num_rows = int64_t(keys.shape(0));
  tokens.row_stride = keys.stride(0);
  tokens.head_stride = keys.stride(1);
  vecinfer::AttentionShape shape;
  shape.batch = batch;
  shape.num_q_heads = hkv;
  shape.num_kv_heads = hkv;
  shape.num_queries = 1;
  shape.head_dim = int32_t(d);
  if (!p.cuda) {
    raise_if_error(vecinfer::cpu::append_tokens(dtype, shape, tokens, kv));
    return;
  }
  if (!arrivals) fail_value("arrivals: required on CUDA (int32 [num_slots] zeros)");
  if (!is_int32(arrivals->dtype())) fail_type("arrivals: expected an int32 tensor");
  check_same_placement(p, *arrivals, "arrivals");
  check_contiguous(*arrivals, "arrivals");
  if (arrivals->ndim() != 1 || int64_t(arrivals->shape(0)) != kv.num_slots)
    fail_value("arrivals: expected [" + std::to_string(kv.num_slots) + "] (one per slot), got " +
               shape_string(*arrivals));
  raise_if_error(vecinfer::cuda::append_tokens(dtype, shape, tokens, kv, max_new_tokens,
                                               static_cast<int32_t*>(arrivals->data()), stream_ptr(stream)));
}

// One decode step of a cache with kept tokens (kept.h) on one layer's buffers, all contiguous:
// element tensors in the dtype of new_keys, scores float32, positions, lengths and slots int32.
// seq_slots None: the per-sequence buffers have one row per sequence of the batch; otherwise
// sequence b is their row seq_slots[b]. code_positions None: not recorded.
void kept_step(nb::ndarray<> new_keys, nb::ndarray<> new_values, nb::ndarray<> sink_keys, nb::ndarray<> sink_values,
               nb::ndarray<> window_keys, nb::ndarray<> window_values, nb::ndarray<> window_scores,
               nb::ndarray<> kept_scores, nb::ndarray<> kept_positions, OptArray code_positions,
               int64_t code_capacity, nb::ndarray<> lengths, OptArray seq_slots, int64_t sinks, double keep_fraction,
               int64_t keep_tokens, nb::ndarray<> encode_keys, nb::ndarray<> encode_values, nb::ndarray<> next_lengths,
               nb::ndarray<> encode_lengths, uintptr_t stream) {
  const DType dtype = element_dtype(new_keys, "new_keys");
  const Placement p = placement_of(new_keys, "new_keys");
  if (new_keys.ndim() != 3)
    fail_value("new_keys: expected [batch, num_kv_heads, head_dim], got " + shape_string(new_keys));
  const int64_t batch = int64_t(new_keys.shape(0)), hkv = int64_t(new_keys.shape(1)), d = int64_t(new_keys.shape(2));
  if (sink_keys.ndim() != 4 || window_keys.ndim() != 4 || window_scores.ndim() != 2 || kept_scores.ndim() != 2)
    fail_value("kept_step: sink/window buffers are 4-D, scores 2-D");
  const int64_t rows = int64_t(sink_keys.shape(0));  // of the per-sequence buffers
  const int64_t sink_rows = int64_t(sink_keys.shape(2)), window = int64_t(window_keys.shape(2));
  const int64_t kept_capacity = int64_t(kept_scores.shape(1));
  if (!seq_slots && rows != batch)
    fail_value("sink_keys: expected one row per sequence of the batch (" + std::to_string(batch) +
               ") without seq_slots, got " + shape_string(sink_keys));
  enum Kind { kElements, kFloat32, kInt32 };
  auto expect = [&](const nb::ndarray<>& a, const char* name, Kind kind, std::vector<int64_t> shape) {
    if (kind == kElements && element_dtype(a, name) != dtype) fail_type(std::string(name) + ": must have the dtype of new_keys");
    if (kind == kFloat32 && !is_float32(a.dtype()))
      fail_type(std::string(name) + ": expected a float32 tensor, got " + dtype_name(a.dtype()));
    if (kind == kInt32 && !is_int32(a.dtype()))
      fail_type(std::string(name) + ": expected an int32 tensor, got " + dtype_name(a.dtype()));
    check_same_placement(p, a, name);
    check_contiguous(a, name);
    bool same = a.ndim() == shape.size();
    for (size_t i = 0; same && i < shape.size(); ++i) same = int64_t(a.shape(i)) == shape[i];
    if (!same) {
      std::string want = "[";
      for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
      fail_value(std::string(name) + ": expected " + want + "], got " + shape_string(a));
    }
  };
  expect(new_keys, "new_keys", kElements, {batch, hkv, d});
  expect(new_values, "new_values", kElements, {batch, hkv, d});
  expect(sink_keys, "sink_keys", kElements, {rows, hkv, sink_rows, d});
  expect(sink_values, "sink_values", kElements, {rows, hkv, sink_rows, d});
  expect(window_keys, "window_keys", kElements, {rows, hkv, window, d});
  expect(window_values, "window_values", kElements, {rows, hkv, window, d});
  expect(window_scores, "window_scores", kFloat32, {rows, window});
  expect(kept_scores, "kept_scores", kFloat32, {rows, kept_capacity});
  expect(kept_positions, "kept_positions", kInt32, {rows, kept_capacity});
  if (code_positions) expect(*code_positions, "code_positions", kInt32, {rows, code_capacity});
  if (seq_slots) expect(*seq_slots, "seq_slots", kInt32, {batch});
  expect(lengths, "lengths", kInt32, {rows, 3});
  expect(encode_keys, "encode_keys", kElements, {batch, hkv, d});
  expect(encode_values, "encode_values", kElements, {batch, hkv, d});
  expect(next_lengths, "next_lengths", kInt32, {rows, 3});
  expect(encode_lengths, "encode_lengths", kInt32, {rows, 3});
  if (sinks < 0 || sinks > sink_rows) fail_value("sinks: expected a count in [0, sink rows]");
  vecinfer::KeptStep st;
  st.batch = batch, st.num_kv_heads = hkv, st.head_dim = d;
  st.sinks = sinks, st.kept_capacity = sink_rows - sinks, st.window = window, st.code_capacity = code_capacity;
  if (seq_slots) st.seq_slots = static_cast<const int32_t*>(seq_slots->data()), st.num_slots = rows;
  if (kept_capacity != st.kept_capacity)
    fail_value("kept_scores: expected one column per kept row (" + std::to_string(st.kept_capacity) + "), got " +
               shape_string(kept_scores));
  st.keep_fraction = keep_fraction, st.keep_tokens = keep_tokens;
  st.new_keys = new_keys.data(), st.new_values = new_values.data();
  st.sink_keys = sink_keys.data(), st.sink_values = sink_values.data();
  st.window_keys = window_keys.data(), st.window_values = window_values.data();
  st.encode_keys = encode_keys.data(), st.encode_values = encode_values.data();
  st.window_scores = static_cast<float*>(window_scores.data());
  st.kept_scores = static_cast<float*>(kept_scores.data());
  st.kept_positions = static_cast<int32_t*>(kept_positions.data());
  st.code_positions = code_positions ? static_cast<int32_t*>(code_positions->data()) : nullptr;
  st.lengths = static_cast<const int32_t*>(lengths.data());
  st.next_lengths = static_cast<int32_t*>(next_lengths.data());
  st.encode_lengths = static_cast<int32_t*>(encode_lengths.data());
  raise_if_error(p.cuda ? vecinfer::cuda::kept_step(dtype, st, stream_ptr(stream)) : vecinfer::cpu::kept_step(dtype, st));
}

// A decode plan over the layers of one cache: the arguments of every layer checked once, the
// split-KV schedule made once (CUDA), then run(layer, ...) per layer and step with raw pointers
// (the Python wrapper checks q and out, and keeps every tensor alive).
class AttentionPlan {
 public:
  void add_layer(nb::ndarray<> q, nb::ndarray<> key_codes, nb::ndarray<> value_codes, nb::ndarray<> lengths,
                 nb::ndarray<> sink_keys, nb::ndarray<> sink_values, nb::ndarray<> recent_keys,
                 nb::ndarray<> recent_values, nb::ndarray<> key_codebook, nb::ndarray<> value_codebook,
                 OptArray key_scale, OptArray key_mean, OptArray value_mean, bool hadamard, int64_t max_coded,
                 OptArray page_table, OptArray seq_slots, bool recent_ring, OptArray query_indptr,
                 int64_t max_queries) {
    const AttentionArgs a = attention_args(q, key_codes, value_codes, lengths, sink_keys, sink_values, recent_keys,
                                           recent_values, key_codebook, value_codebook, key_scale, key_mean,
                                           value_mean, hadamard, max_coded, page_table, seq_slots, recent_ring,
                                           query_indptr, max_queries);
    if (layers_.empty()) {
      dtype_ = a.dtype, placement_ = a.placement, shape_ = a.shape;
      if (placement_.cuda) raise_if_error(vecinfer::cuda::plan_attention(dtype_, shape_, a.kv, plan_));
    } else if (a.dtype != dtype_ || a.placement.cuda != placement_.cuda ||
               a.placement.device_id != placement_.device_id || a.shape.batch != shape_.batch ||
               a.shape.num_q_heads != shape_.num_q_heads || a.shape.num_kv_heads != shape_.num_kv_heads ||
               a.shape.num_queries != shape_.num_queries || a.shape.head_dim != shape_.head_dim ||
               a.shape.query_indptr != shape_.query_indptr || a.shape.total_queries != shape_.total_queries) {
      fail_value("add_layer: every layer of a plan takes the same q shape, dtype and device");
    }
    layers_.push_back(a.kv);
  }

  int64_t workspace_bytes() const { return int64_t(plan_.workspace_bytes); }
  int64_t splits() const { return plan_.splits; }

  void run(int64_t layer, uintptr_t q, uintptr_t out, uintptr_t lse, double scale, uintptr_t workspace,
           int64_t workspace_bytes, uintptr_t stream) const {
    if (layer < 0 || layer >= int64_t(layers_.size()))
      fail_value("layer: " + std::to_string(layer) + " is not a layer of this plan (it has " +
                 std::to_string(layers_.size()) + ")");
    const void* qp = reinterpret_cast<const void*>(q);
    void* op = reinterpret_cast<void*>(out);
    float* lp = reinterpret_cast<float*>(lse);
    const float softmax_scale = static_cast<float>(scale);
    if (!placement_.cuda) {
      raise_if_error(vecinfer::cpu::attention(dtype_, qp, op, lp, shape_, layers_[layer], softmax_scale));
      return;
    }
    raise_if_error(vecinfer::cuda::run_attention(plan_, qp, op, lp, layers_[layer], softmax_scale,
                                                 reinterpret_cast<void*>(workspace), size_t(workspace_bytes),
                                                 stream_ptr(stream)));
  }

 private:
  DType dtype_ = DType::kFloat16;
  Placement placement_;
  vecinfer::AttentionShape shape_;
  vecinfer::cuda::AttentionPlan plan_;
  std::vector<vecinfer::CompressedKV> layers_;
};

// Puts a CPU float32 codebook [num_codebooks, 2**code_bits, sub_dim] on the kernel's 8-bit grid, in place.
void snap_codebook(nb::ndarray<> codebook) {
  if (!is_float32(codebook.dtype())) fail_type("codebook: expected a float32 tensor, got " + dtype_name(codebook.dtype()));
  if (codebook.device_type() != nb::device::cpu::value) fail_value("codebook: expected a CPU tensor");
  check_contiguous(codebook, "codebook");
  if (codebook.ndim() != 3 || codebook.shape(0) == 0 || codebook.shape(2) == 0 || codebook.shape(2) > 8)
    fail_value("codebook: expected [num_codebooks, 2**code_bits, sub_dim <= 8], got " + shape_string(codebook));
  const int32_t bits = vecinfer::code_bits_of(static_cast<int64_t>(codebook.shape(1)));
  if (bits < 1 || bits > 12)
    fail_value("codebook: the number of centroids must be a power of two from 2 to 4096, got " + shape_string(codebook));
  vecinfer::Codebook shape;
  shape.num_codebooks = int64_t(codebook.shape(0));
  shape.sub_dim = int32_t(codebook.shape(2));
  shape.code_bits = bits;
  raise_if_error(vecinfer::snap_codebook(static_cast<float*>(codebook.data()), shape));
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "vecinfer's compiled core (use the functions of the vecinfer package, not these)";
  m.def("transform", &transform, nb::arg("x"), nb::arg("out"), nb::arg("scale").none(), nb::arg("mean").none(),
        nb::arg("hadamard"), nb::arg("kind"), nb::arg("stream"));
  m.def("vq_encode", &vq_encode, nb::arg("x"), nb::arg("codes"), nb::arg("codebook"), nb::arg("scale").none(),
        nb::arg("mean").none(), nb::arg("hadamard"), nb::arg("stream"));
  m.def("vq_decode", &vq_decode, nb::arg("codes"), nb::arg("out"), nb::arg("codebook"), nb::arg("scale").none(),
        nb::arg("mean").none(), nb::arg("hadamard"), nb::arg("stream"));
  m.def("check_elements", &check_elements, nb::arg("x"), nb::arg("name"));
  m.def("code_row_bytes", &vecinfer::code_row_bytes, nb::arg("head_dim"), nb::arg("sub_dim"), nb::arg("code_bits"));
  m.def("attention", &attention, nb::arg("q"), nb::arg("out"), nb::arg("lse").none(), nb::arg("key_codes"),
        nb::arg("value_codes"), nb::arg("lengths"), nb::arg("sink_keys"), nb::arg("sink_values"),
        nb::arg("recent_keys"), nb::arg("recent_values"), nb::arg("key_codebook"), nb::arg("value_codebook"),
        nb::arg("key_scale").none(), nb::arg("key_mean").none(), nb::arg("value_mean").none(), nb::arg("hadamard"),
        nb::arg("scale"), nb::arg("max_coded"), nb::arg("page_table").none(), nb::arg("seq_slots").none(),
        nb::arg("recent_ring"), nb::arg("workspace").none(), nb::arg("stream"), nb::arg("query_indptr").none(),
        nb::arg("max_queries"));
  m.def("append_tokens", &append_tokens, nb::arg("keys"), nb::arg("values"), nb::arg("seq_slots"), nb::arg("indptr"),
        nb::arg("max_new_tokens"), nb::arg("key_codes"), nb::arg("value_codes"), nb::arg("page_table"),
        nb::arg("lengths"), nb::arg("sink_keys"), nb::arg("sink_values"), nb::arg("ring_keys"),
        nb::arg("ring_values"), nb::arg("key_codebook"), nb::arg("value_codebook"), nb::arg("key_scale").none(),
        nb::arg("key_mean").none(), nb::arg("value_mean").none(), nb::arg("hadamard"), nb::arg("arrivals").none(),
        nb::arg("stream"));
  m.def("kept_step", &kept_step, nb::arg("new_keys"), nb::arg("new_values"), nb::arg("sink_keys"),
        nb::arg("sink_values"), nb::arg("window_keys"), nb::arg("window_values"), nb::arg("window_scores"),
        nb::arg("kept_scores"), nb::arg("kept_positions"), nb::arg("code_positions").none(),
        nb::arg("code_capacity"), nb::arg("lengths"), nb::arg("seq_slots").none(), nb::arg("sinks"),
        nb::arg("keep_fraction"), nb::arg("keep_tokens"), nb::arg("encode_keys"),
        nb::arg("encode_values"), nb::arg("next_lengths"), nb::arg("encode_lengths"), nb::arg("stream"));
  nb::class_<AttentionPlan>(m, "AttentionPlan")
      .def(nb::init<>())
      .def("add_layer", &AttentionPlan::add_layer, nb::arg("q"), nb::arg("key_codes"), nb::arg("value_codes"),
           nb::arg("lengths"), nb::arg("sink_keys"), nb::arg("sink_values"), nb::arg("recent_keys"),
           nb::arg("recent_values"), nb::arg("key_codebook"), nb::arg("value_codebook"), nb::arg("key_scale").none(),
           nb::arg("key_mean").none(), nb::arg("value_mean").none(), nb::arg("hadamard"), nb::arg("max_coded"),
           nb::arg("page_table").none(), nb::arg("seq_slots").none(), nb::arg("recent_ring"),
           nb::arg("query_indptr").none(), nb::arg("max_queries"))
      .def_prop_ro("workspace_bytes", &AttentionPlan::workspace_bytes)
      .def_prop_ro("splits", &AttentionPlan::splits)
      .def("run", &AttentionPlan::run, nb::arg("layer"), nb::arg("q"), nb::arg("out"), nb::arg("lse"),
           nb::arg("scale"), nb::arg("workspace"), nb::arg("workspace_bytes"), nb::arg("stream"));
  m.def("snap_codebook", &snap_codebook, nb::arg("codebook"));
  m.def("attention_workspace_bytes", &attention_workspace_bytes, nb::arg("batch"), nb::arg("num_q_heads"),
        nb::arg("num_kv_heads"), nb::arg("num_queries"), nb::arg("head_dim"), nb::arg("key_sub_dim"),
        nb::arg("key_code_bits"), nb::arg("value_sub_dim"), nb::arg("value_code_bits"), nb::arg("max_coded"),
        nb::arg("full_precision_capacity"), nb::arg("ragged"));
  m.def("cuda_attention_support",
        [](int dtype, int64_t num_queries, int32_t key_sub_dim, int32_t key_code_bits, int32_t value_sub_dim,
           int32_t value_code_bits) {
          vecinfer::Codebook key, value;
          key.sub_dim = key_sub_dim, key.code_bits = key_code_bits;
          value.sub_dim = value_sub_dim, value.code_bits = value_code_bits;
          const Status s = vecinfer::cuda::attention_supports(static_cast<DType>(dtype), num_queries, key, value);
          return std::string(s.ok() ? "" : s.message);
        },
        nb::arg("dtype"), nb::arg("num_queries"), nb::arg("key_sub_dim"), nb::arg("key_code_bits"),
        nb::arg("value_sub_dim"), nb::arg("value_code_bits"));
  m.def("cuda_built", &vecinfer::cuda::built);
  m.def("check_device", [] { raise_if_error(vecinfer::cuda::check_device()); });
}
