// Unit tests of the CPU reference implementations, through the public C++ API only
// (vecinfer::cpu::*, code_row_bytes, check_*). Every expected value is computed here, in double,
// from the definitions in types.h / ops.h: the Walsh-Hadamard matrix is built explicitly as
// H[i][j] = (-1)^popcount(i & j) / sqrt(D), codes are packed/unpacked bit by bit from the
// documented stream layout, float16 / bfloat16 values are decoded from their bit fields.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#define VECINFER_TEST_HAVE_MMAP 1
#endif

#include "vecinfer/ops.h"

namespace {

using vecinfer::Codebook;
using vecinfer::DType;
using vecinfer::RowLayout;
using vecinfer::Status;
using vecinfer::StatusCode;
using vecinfer::Transform;
using vecinfer::TransformKind;
namespace cpu = vecinfer::cpu;

// ------------------------------------------------------------------------------------------
// Independent reference helpers
// ------------------------------------------------------------------------------------------

struct Rng {
  explicit Rng(uint64_t seed) : gen(seed) {}
  double normal() { return std::normal_distribution<double>(0.0, 1.0)(gen); }
  double uniform(double a, double b) { return std::uniform_real_distribution<double>(a, b)(gen); }
  uint32_t bits(int n) { return static_cast<uint32_t>(gen() & ((uint64_t{1} << n) - 1)); }
  std::mt19937_64 gen;
};

RowLayout make_layout(int64_t batch, int64_t heads, int64_t tokens, int32_t head_dim) {
  RowLayout l;
  l.num_rows = batch * heads * tokens;
  l.head_dim = head_dim;
  l.num_heads = heads;
  l.tokens_per_head = tokens;
  return l;
}

// Head of row r for the [..., H, T, D] layout (types.h: "Row r belongs to head (r / T) % H").
int64_t head_of_row(const RowLayout& l, int64_t r) { return (r / l.tokens_per_head) % l.num_heads; }

// Per-head table entry, written from the documentation: head h reads entry h / (H / rows).
int64_t table_entry(int64_t head, int64_t num_heads, int64_t rows) { return head / (num_heads / rows); }

// Explicit orthonormal Walsh-Hadamard matrix (Sylvester order).
std::vector<double> hadamard_matrix(int d) {
  std::vector<double> h(static_cast<size_t>(d) * d);
  const double norm = 1.0 / std::sqrt(static_cast<double>(d));
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < d; ++j) h[i * d + j] = (__builtin_popcount(i & j) % 2 ? -norm : norm);
  return h;
}

std::vector<double> mat_vec(const std::vector<double>& h, const double* v, int d) {
  std::vector<double> out(d, 0.0);
  for (int i = 0; i < d; ++i) {
    double s = 0.0;
    for (int j = 0; j < d; ++j) s += h[i * d + j] * v[j];
    out[i] = s;
  }
  return out;
}

// Reference transform of one row in double. scale/mean point at the row's table entry or are null.
std::vector<double> ref_transform(const double* x, int d, const float* scale, const float* mean,
                                  bool hadamard, TransformKind kind, const std::vector<double>& h) {
  std::vector<double> v(x, x + d);
  switch (kind) {
    case TransformKind::kKey:
      for (int i = 0; i < d; ++i) {
        if (mean) v[i] -= mean[i];
        if (scale) v[i] /= scale[i];
      }
      if (hadamard) v = mat_vec(h, v.data(), d);
      break;
    case TransformKind::kQuery:
      for (int i = 0; i < d; ++i)
        if (scale) v[i] *= scale[i];
      if (hadamard) v = mat_vec(h, v.data(), d);
      break;
    case TransformKind::kKeyInverse:
      if (hadamard) v = mat_vec(h, v.data(), d);
      for (int i = 0; i < d; ++i) {
        if (scale) v[i] *= scale[i];
        if (mean) v[i] += mean[i];
      }
      break;
  }
  return v;
}

// IEEE binary16 bits -> value, from the bit fields.
double half_value(uint16_t b) {
  const int sign = b >> 15, exponent = (b >> 10) & 0x1f, mantissa = b & 0x3ff;
  double v;
  if (exponent == 0x1f)
    v = mantissa ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (exponent == 0)
    v = std::ldexp(static_cast<double>(mantissa), -24);
  else
    v = std::ldexp(static_cast<double>(1024 + mantissa), exponent - 25);
  return sign ? -v : v;
}

// bfloat16 bits -> value, from the bit fields.
double bf16_value(uint16_t b) {
  const int sign = b >> 15, exponent = (b >> 7) & 0xff, mantissa = b & 0x7f;
  double v;
  if (exponent == 0xff)
    v = mantissa ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (exponent == 0)
    v = std::ldexp(static_cast<double>(mantissa), -133);
  else
    v = std::ldexp(static_cast<double>(128 + mantissa), exponent - 134);
  return sign ? -v : v;
}

// Value of v rounded to nearest-even with `mantissa_bits` explicit bits and minimum normal
// exponent `min_exp` (finite results only; the callers stay far from overflow).
double round_to_format(double v, int mantissa_bits, int min_exp) {
  if (v == 0.0) return v;
  int e;
  std::frexp(std::fabs(v), &e);  // |v| in [2^(e-1), 2^e)
  const int exponent = std::max(e - 1, min_exp);
  const double step = std::ldexp(1.0, exponent - mantissa_bits);
  const double q = std::nearbyint(std::fabs(v) / step);  // default rounding: to nearest even
  return std::copysign(q * step, v);
}
double round_half(double v) { return round_to_format(v, 10, -14); }
double round_bf16(double v) { return round_to_format(v, 7, -126); }

// Random half / bf16 bit patterns of moderate magnitude (no overflow after the transforms).
uint16_t random_half(Rng& rng) {
  const uint32_t exponent = 15 - 4 + rng.bits(3);  // 2^-4 .. 2^3
  return static_cast<uint16_t>((rng.bits(1) << 15) | (exponent << 10) | rng.bits(10));
}
uint16_t random_bf16(Rng& rng) {
  const uint32_t exponent = 127 - 4 + rng.bits(3);
  return static_cast<uint16_t>((rng.bits(1) << 15) | (exponent << 7) | rng.bits(7));
}

// Packs codes into the documented little-endian bit stream, one bit at a time.
std::vector<uint8_t> pack_row_ref(const std::vector<uint32_t>& codes, int code_bits) {
  const size_t nbits = codes.size() * code_bits;
  std::vector<uint8_t> bytes((nbits + 7) / 8, 0);
  for (size_t j = 0; j < codes.size(); ++j)
    for (int b = 0; b < code_bits; ++b) {
      const size_t bit = j * code_bits + b;
      if ((codes[j] >> b) & 1u) bytes[bit / 8] |= static_cast<uint8_t>(1u << (bit % 8));
    }
  return bytes;
}

uint32_t unpack_code_ref(const uint8_t* row, int j, int code_bits) {
  uint32_t code = 0;
  for (int b = 0; b < code_bits; ++b) {
    const int bit = j * code_bits + b;
    code |= ((row[bit / 8] >> (bit % 8)) & 1u) << b;
  }
  return code;
}

std::vector<float> random_floats(Rng& rng, size_t n, double sd = 1.0) {
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(sd * rng.normal());
  return v;
}

std::vector<float> random_scales(Rng& rng, size_t n) {
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(std::exp(rng.uniform(std::log(0.4), std::log(2.5))));
  return v;
}

std::string where(const char* what, int64_t row, int i) {
  return std::string(what) + " row " + std::to_string(row) + " elem " + std::to_string(i);
}

// ------------------------------------------------------------------------------------------
// code_row_bytes and the reference helpers themselves
// ------------------------------------------------------------------------------------------

TEST(CodeRowBytes, MatchesFormula) {
  for (int d : {64, 128, 256})
    for (int s : {2, 4, 8})
      for (int b = 4; b <= 12; ++b)
        EXPECT_EQ(vecinfer::code_row_bytes(d, s, b), d / s * b / 8) << d << " " << s << " " << b;
  EXPECT_EQ(vecinfer::code_row_bytes(128, 4, 8), 32);
  EXPECT_EQ(vecinfer::code_row_bytes(128, 8, 12), 24);
  EXPECT_EQ(vecinfer::code_row_bytes(64, 8, 5), 5);
  EXPECT_EQ(vecinfer::code_row_bytes(256, 2, 12), 192);
}

TEST(CodeRowBytes, UnsupportedShapesGiveZero) {
  EXPECT_EQ(vecinfer::code_row_bytes(96, 4, 8), 0);
  EXPECT_EQ(vecinfer::code_row_bytes(32, 4, 8), 0);
  EXPECT_EQ(vecinfer::code_row_bytes(512, 4, 8), 0);
  EXPECT_EQ(vecinfer::code_row_bytes(128, 3, 8), 0);
  EXPECT_EQ(vecinfer::code_row_bytes(128, 16, 8), 0);
  EXPECT_EQ(vecinfer::code_row_bytes(128, 1, 8), 0);
  EXPECT_EQ(vecinfer::code_row_bytes(128, 4, 3), 0);
  EXPECT_EQ(vecinfer::code_row_bytes(128, 4, 13), 0);
  EXPECT_EQ(vecinfer::code_row_bytes(128, 4, 0), 0);
}

TEST(ReferenceHelpers, SelfCheck) {
  // The test's own helpers, checked against known values so that they cannot mislead the rest.
  EXPECT_EQ(half_value(0x3c00), 1.0);
  EXPECT_EQ(half_value(0xc000), -2.0);
  EXPECT_EQ(half_value(0x0001), std::ldexp(1.0, -24));
  EXPECT_EQ(half_value(0x7bff), 65504.0);
  EXPECT_EQ(bf16_value(0x3f80), 1.0);
  EXPECT_EQ(bf16_value(0xc040), -3.0);
  EXPECT_EQ(round_half(1.0 + std::ldexp(1.0, -11)), 1.0);                              // tie -> even
  EXPECT_EQ(round_half(1.0 + 3 * std::ldexp(1.0, -11)), 1.0 + std::ldexp(1.0, -9));   // tie -> even
  EXPECT_EQ(round_bf16(1.0 + std::ldexp(1.0, -8)), 1.0);
  EXPECT_EQ(round_half(std::ldexp(3.0, -26)), std::ldexp(1.0, -24));  // subnormal rounding
  const auto h = hadamard_matrix(4);
  // H4 = 1/2 [[1,1,1,1],[1,-1,1,-1],[1,1,-1,-1],[1,-1,-1,1]]
  const double expected[16] = {1, 1, 1, 1, 1, -1, 1, -1, 1, 1, -1, -1, 1, -1, -1, 1};
  for (int i = 0; i < 16; ++i) EXPECT_EQ(h[i], 0.5 * expected[i]);
  EXPECT_EQ(pack_row_ref({0xABC, 0x123}, 12), (std::vector<uint8_t>{0xBC, 0x3A, 0x12}));
}

// ------------------------------------------------------------------------------------------
// Transform
// ------------------------------------------------------------------------------------------

class HadamardTest : public ::testing::TestWithParam<int> {};

TEST_P(HadamardTest, TwiceIsIdentity) {
  const int d = GetParam();
  const RowLayout l = make_layout(2, 3, 17, d);
  Rng rng(1000 + d);
  const auto x = random_floats(rng, l.num_rows * d);
  Transform t;
  t.hadamard = true;
  std::vector<float> y(x.size()), z(x.size());
  ASSERT_TRUE(cpu::transform(DType::kFloat32, x.data(), y.data(), l, t, TransformKind::kKey).ok());
  ASSERT_TRUE(cpu::transform(DType::kFloat32, y.data(), z.data(), l, t, TransformKind::kKey).ok());
  double moved = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_NEAR(z[i], x[i], 1e-5) << "index " << i;
    moved += std::fabs(y[i] - x[i]);
  }
  EXPECT_GT(moved, 0.1 * x.size());  // a single application must not be the identity
  // In place (in == out) twice gives the same.
  std::vector<float> w = x;
  ASSERT_TRUE(cpu::transform(DType::kFloat32, w.data(), w.data(), l, t, TransformKind::kKey).ok());
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(w[i], y[i]) << "in-place differs at " << i;
  ASSERT_TRUE(cpu::transform(DType::kFloat32, w.data(), w.data(), l, t, TransformKind::kKeyInverse).ok());
  for (size_t i = 0; i < x.size(); ++i) ASSERT_NEAR(w[i], x[i], 1e-5) << "index " << i;
}

TEST_P(HadamardTest, MatchesExplicitMatrix) {
  const int d = GetParam();
  const RowLayout l = make_layout(1, 3, 17, d);
  Rng rng(2000 + d);
  auto x = random_floats(rng, l.num_rows * d);
  // Make a few rows basis vectors: their image is one column of H.
  for (int r = 0; r < 3; ++r) {
    std::fill(x.begin() + r * d, x.begin() + (r + 1) * d, 0.f);
    x[r * d + (r * 37 + 5) % d] = 1.f;
  }
  const auto h = hadamard_matrix(d);
  for (TransformKind kind : {TransformKind::kKey, TransformKind::kQuery, TransformKind::kKeyInverse}) {
    Transform t;
    t.hadamard = true;
    std::vector<float> y(x.size());
    ASSERT_TRUE(cpu::transform(DType::kFloat32, x.data(), y.data(), l, t, kind).ok());
    for (int64_t r = 0; r < l.num_rows; ++r) {
      std::vector<double> xr(x.begin() + r * d, x.begin() + (r + 1) * d);
      const auto ref = mat_vec(h, xr.data(), d);
      for (int i = 0; i < d; ++i) ASSERT_NEAR(y[r * d + i], ref[i], 1e-5) << where("hadamard", r, i);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(HeadDims, HadamardTest, ::testing::Values(64, 128, 256));

TEST(Transform, IdentityTransformCopies) {
  const RowLayout l = make_layout(1, 3, 17, 64);
  Rng rng(7);
  const auto x = random_floats(rng, l.num_rows * 64);
  std::vector<float> y(x.size(), -1.f);
  for (TransformKind kind : {TransformKind::kKey, TransformKind::kQuery, TransformKind::kKeyInverse}) {
    ASSERT_TRUE(cpu::transform(DType::kFloat32, x.data(), y.data(), l, Transform{}, kind).ok());
    EXPECT_EQ(0, std::memcmp(x.data(), y.data(), x.size() * sizeof(float)));
  }
}

// Every kind against the double reference with per-head tables, for a GQA layout: the
// tables have 3 rows (KV heads) and are read by 6 heads, head h using entry h / 2.
TEST(Transform, MatchesReferenceWithPerHeadTablesAndGqa) {
  const int d = 128;
  const int64_t kv_heads = 3;
  const auto h = hadamard_matrix(d);
  Rng rng(31);
  const auto scale = random_scales(rng, kv_heads * d);
  const auto mean = random_floats(rng, kv_heads * d, 0.5);
  for (int64_t group : {1, 2, 4}) {
    const RowLayout l = make_layout(2, kv_heads * group, 17, d);
    const auto x = random_floats(rng, l.num_rows * d);
    for (TransformKind kind : {TransformKind::kKey, TransformKind::kQuery, TransformKind::kKeyInverse}) {
      for (bool had : {false, true}) {
        Transform t;
        t.scale = scale.data();
        t.mean = kind == TransformKind::kQuery ? nullptr : mean.data();
        t.table_rows = kv_heads;
        t.hadamard = had;
        std::vector<float> y(x.size());
        ASSERT_TRUE(cpu::transform(DType::kFloat32, x.data(), y.data(), l, t, kind).ok());
        for (int64_t r = 0; r < l.num_rows; ++r) {
          const int64_t e = table_entry(head_of_row(l, r), l.num_heads, kv_heads);
          ASSERT_EQ(e, head_of_row(l, r) / group);
          std::vector<double> xr(x.begin() + r * d, x.begin() + (r + 1) * d);
          const auto ref = ref_transform(xr.data(), d, t.scale + e * d, t.mean ? t.mean + e * d : nullptr,
                                         had, kind, h);
          for (int i = 0; i < d; ++i)
            ASSERT_NEAR(y[r * d + i], ref[i], 1e-5 * (1.0 + std::fabs(ref[i])))
                << where("transform", r, i) << " group " << group << " kind " << static_cast<int>(kind)
                << " hadamard " << had;
        }
      }
    }
  }
}

// Scale only, mean only, and both, with a table of one row shared by all heads.
TEST(Transform, SharedTableAndPartialTables) {
  const int d = 64;
  const RowLayout l = make_layout(1, 3, 17, d);
  const auto h = hadamard_matrix(d);
  Rng rng(32);
  const auto scale = random_scales(rng, d);
  const auto mean = random_floats(rng, d);
  const auto x = random_floats(rng, l.num_rows * d);
  for (int variant = 0; variant < 3; ++variant) {
    Transform t;
    t.scale = variant != 1 ? scale.data() : nullptr;
    t.mean = variant != 0 ? mean.data() : nullptr;
    t.table_rows = 1;
    t.hadamard = true;
    std::vector<float> y(x.size());
    ASSERT_TRUE(cpu::transform(DType::kFloat32, x.data(), y.data(), l, t, TransformKind::kKey).ok());
    for (int64_t r = 0; r < l.num_rows; ++r) {
      std::vector<double> xr(x.begin() + r * d, x.begin() + (r + 1) * d);
      const auto ref = ref_transform(xr.data(), d, t.scale, t.mean, true, TransformKind::kKey, h);
      for (int i = 0; i < d; ++i)
        ASSERT_NEAR(y[r * d + i], ref[i], 1e-5 * (1.0 + std::fabs(ref[i]))) << where("variant", r, i) << variant;
    }
  }
}

// transform(q, kQuery) . transform(k, kKey) = q . k - q . mu, with per-KV-head tables and GQA.
TEST(Transform, QueryKeyDotProductIdentityGqa) {
  const int d = 128;
  const int64_t kv_heads = 3, group = 2, q_heads = kv_heads * group, batch = 2;
  const int64_t q_tokens = 5, k_tokens = 17;
  Rng rng(41);
  const auto scale = random_scales(rng, kv_heads * d);
  const auto mean = random_floats(rng, kv_heads * d, 1.0);
  const RowLayout lq = make_layout(batch, q_heads, q_tokens, d);
  const RowLayout lk = make_layout(batch, kv_heads, k_tokens, d);
  const auto q = random_floats(rng, lq.num_rows * d);
  const auto k = random_floats(rng, lk.num_rows * d);
  Transform t;
  t.scale = scale.data();
  t.mean = mean.data();
  t.table_rows = kv_heads;
  t.hadamard = true;
  Transform tq = t;
  tq.mean = nullptr;
  std::vector<float> qt(q.size()), kt(k.size());
  ASSERT_TRUE(cpu::transform(DType::kFloat32, q.data(), qt.data(), lq, tq, TransformKind::kQuery).ok());
  ASSERT_TRUE(cpu::transform(DType::kFloat32, k.data(), kt.data(), lk, t, TransformKind::kKey).ok());
  int checked = 0;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t hq = 0; hq < q_heads; ++hq) {
      const int64_t hk = hq / group;  // GQA: query head h attends to KV head h / group
      for (int64_t i = 0; i < q_tokens; ++i) {
        const int64_t qr = (b * q_heads + hq) * q_tokens + i;
        double q_mu = 0.0;
        for (int e = 0; e < d; ++e) q_mu += double(q[qr * d + e]) * mean[hk * d + e];
        for (int64_t j = 0; j < k_tokens; ++j) {
          const int64_t kr = (b * kv_heads + hk) * k_tokens + j;
          double lhs = 0.0, rhs = 0.0, mag = 0.0;
          for (int e = 0; e < d; ++e) {
            lhs += double(qt[qr * d + e]) * kt[kr * d + e];
            rhs += double(q[qr * d + e]) * k[kr * d + e];
            mag += std::fabs(double(qt[qr * d + e]) * kt[kr * d + e]);
          }
          rhs -= q_mu;
          ASSERT_NEAR(lhs, rhs, 1e-5 * (mag + 1.0)) << "batch " << b << " q head " << hq << " q " << i << " k " << j;
          ++checked;
        }
      }
    }
  EXPECT_EQ(checked, batch * q_heads * q_tokens * k_tokens);
}

TEST(Transform, KeyInverseUndoesKey) {
  const int d = 256;
  const int64_t kv_heads = 3;
  Rng rng(51);
  const auto scale = random_scales(rng, kv_heads * d);
  const auto mean = random_floats(rng, kv_heads * d, 2.0);
  for (int64_t group : {1, 2}) {
    const RowLayout l = make_layout(2, kv_heads * group, 17, d);
    const auto x = random_floats(rng, l.num_rows * d, 3.0);
    Transform t;
    t.scale = scale.data();
    t.mean = mean.data();
    t.table_rows = kv_heads;
    t.hadamard = true;
    std::vector<float> y(x.size());
    ASSERT_TRUE(cpu::transform(DType::kFloat32, x.data(), y.data(), l, t, TransformKind::kKey).ok());
    double moved = 0.0;
    for (size_t i = 0; i < x.size(); ++i) moved += std::fabs(y[i] - x[i]);
    EXPECT_GT(moved, 0.1 * x.size());
    // Inverse in place.
    ASSERT_TRUE(cpu::transform(DType::kFloat32, y.data(), y.data(), l, t, TransformKind::kKeyInverse).ok());
    for (size_t i = 0; i < x.size(); ++i) ASSERT_NEAR(y[i], x[i], 1e-5 * (1.0 + std::fabs(x[i]))) << "index " << i;
  }
}

// Identity transform on every finite float16 / bfloat16 bit pattern: values come back bit-exact
// (the load/store conversions are exact for representable values), NaN stays NaN.
TEST(Transform, HalfAndBf16IdentityIsBitExactForAllPatterns) {
  const int d = 64;
  const RowLayout l = make_layout(1, 1, 65536 / d, d);
  std::vector<uint16_t> in(65536), out(65536);
  for (uint32_t i = 0; i < 65536; ++i) in[i] = static_cast<uint16_t>(i);
  for (DType dt : {DType::kFloat16, DType::kBFloat16}) {
    std::fill(out.begin(), out.end(), 0);
    ASSERT_TRUE(cpu::transform(dt, in.data(), out.data(), l, Transform{}, TransformKind::kKey).ok());
    for (uint32_t i = 0; i < 65536; ++i) {
      const double v = dt == DType::kFloat16 ? half_value(in[i]) : bf16_value(in[i]);
      const double w = dt == DType::kFloat16 ? half_value(out[i]) : bf16_value(out[i]);
      if (std::isnan(v))
        ASSERT_TRUE(std::isnan(w)) << std::hex << i;
      else
        ASSERT_EQ(out[i], in[i]) << "dtype " << static_cast<int>(dt) << " pattern 0x" << std::hex << i;
    }
  }
}

// y = x * lambda with lambda of few mantissa bits is exact in float32, so the float16 / bfloat16
// output must be exactly the round-to-nearest-even of the exact product (ties included).
TEST(Transform, HalfAndBf16OutputRoundsToNearestEven) {
  const int d = 64;
  const RowLayout l = make_layout(1, 3, 17, d);
  const float lambdas[] = {1.5f, 0.75f, 1.25f, 3.0f, 0.625f, 1.125f, 2.5f, 1.75f};
  std::vector<float> scale(3 * d);
  for (size_t i = 0; i < scale.size(); ++i) scale[i] = lambdas[(i * 5 + i / d) % 8];
  Rng rng(61);
  Transform t;
  t.scale = scale.data();
  t.table_rows = 3;
  for (DType dt : {DType::kFloat16, DType::kBFloat16}) {
    std::vector<uint16_t> x(l.num_rows * d), y(x.size());
    for (auto& b : x) b = dt == DType::kFloat16 ? random_half(rng) : random_bf16(rng);
    // Some subnormal float16 inputs too.
    if (dt == DType::kFloat16)
      for (int i = 0; i < 40; ++i) x[i * 7] = static_cast<uint16_t>(rng.bits(10) | (rng.bits(1) << 15));
    ASSERT_TRUE(cpu::transform(dt, x.data(), y.data(), l, t, TransformKind::kQuery).ok());
    int ties = 0;
    for (int64_t r = 0; r < l.num_rows; ++r) {
      const int64_t e = table_entry(head_of_row(l, r), l.num_heads, 3);
      for (int i = 0; i < d; ++i) {
        const size_t k = r * d + i;
        const double in = dt == DType::kFloat16 ? half_value(x[k]) : bf16_value(x[k]);
        const double exact = in * scale[e * d + i];
        const double expected = dt == DType::kFloat16 ? round_half(exact) : round_bf16(exact);
        const double got = dt == DType::kFloat16 ? half_value(y[k]) : bf16_value(y[k]);
        ASSERT_EQ(got, expected) << where("rounding", r, i) << " dtype " << static_cast<int>(dt)
                                 << " input " << in << " scale " << scale[e * d + i];
        // A tie: the exact value sits halfway between two neighbours, i.e. it is representable
        // with one more mantissa bit but not in the format itself.
        const double finer = dt == DType::kFloat16 ? round_to_format(exact, 11, -14) : round_to_format(exact, 8, -126);
        if (exact != expected && finer == exact) ++ties;
      }
    }
    EXPECT_GT(ties, 10) << "the data should contain round-half-even ties";
  }
}

// Full key transform on float16 / bfloat16 input and output, against the double reference, and
// the round trip key -> key inverse within the formats' precision.
TEST(Transform, HalfAndBf16KeyTransformAndRoundTrip) {
  const int d = 128;
  const int64_t kv_heads = 3;
  const RowLayout l = make_layout(2, kv_heads, 17, d);
  const auto h = hadamard_matrix(d);
  Rng rng(71);
  const auto scale = random_scales(rng, kv_heads * d);
  const auto mean = random_floats(rng, kv_heads * d, 0.5);
  Transform t;
  t.scale = scale.data();
  t.mean = mean.data();
  t.table_rows = kv_heads;
  t.hadamard = true;
  const double max_scale = *std::max_element(scale.begin(), scale.end());
  for (DType dt : {DType::kFloat16, DType::kBFloat16}) {
    const double u = dt == DType::kFloat16 ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);  // unit roundoff
    auto value = [&](uint16_t b) { return dt == DType::kFloat16 ? half_value(b) : bf16_value(b); };
    std::vector<uint16_t> x(l.num_rows * d), y(x.size()), z(x.size());
    for (auto& b : x) b = dt == DType::kFloat16 ? random_half(rng) : random_bf16(rng);
    ASSERT_TRUE(cpu::transform(dt, x.data(), y.data(), l, t, TransformKind::kKey).ok());
    z = y;
    ASSERT_TRUE(cpu::transform(dt, z.data(), z.data(), l, t, TransformKind::kKeyInverse).ok());
    for (int64_t r = 0; r < l.num_rows; ++r) {
      const int64_t e = table_entry(head_of_row(l, r), l.num_heads, kv_heads);
      std::vector<double> xr(d);
      for (int i = 0; i < d; ++i) xr[i] = value(x[r * d + i]);
      const auto ref = ref_transform(xr.data(), d, t.scale + e * d, t.mean + e * d, true, TransformKind::kKey, h);
      double ref_norm = 0.0;
      for (int i = 0; i < d; ++i) ref_norm += ref[i] * ref[i];
      ref_norm = std::sqrt(ref_norm);
      for (int i = 0; i < d; ++i) {
        // Output rounding (half an ulp) plus float32 arithmetic.
        ASSERT_NEAR(value(y[r * d + i]), ref[i], u * std::fabs(ref[i]) + 1e-5 * (1.0 + ref_norm / 8))
            << where("key", r, i) << " dtype " << static_cast<int>(dt);
      }
      for (int i = 0; i < d; ++i) {
        // The intermediate rounding error (norm <= u * ||y||) goes through H and lambda, then
        // the final rounding.
        const double tol = 2.0 * (max_scale * u * ref_norm + u * std::fabs(xr[i])) + 1e-5;
        ASSERT_NEAR(value(z[r * d + i]), xr[i], tol) << where("round trip", r, i) << " dtype " << static_cast<int>(dt);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// VQ encode / decode
// ------------------------------------------------------------------------------------------

struct CodecCase {
  int head_dim;
  int sub_dim;
  int code_bits;
};

std::string case_name(const ::testing::TestParamInfo<CodecCase>& info) {
  return "D" + std::to_string(info.param.head_dim) + "_S" + std::to_string(info.param.sub_dim) + "_B" +
         std::to_string(info.param.code_bits);
}

class NearestCentroidTest : public ::testing::TestWithParam<CodecCase> {};

// Checks that every code of `codes` names a centroid at the best squared distance (double).
// xs: transformed rows in double [num_rows, d]; book(r) = codebook index of row r.
template <class BookOf>
void expect_nearest(const std::vector<double>& xs, const uint8_t* codes, const RowLayout& l, const Codebook& cb,
                    const std::vector<float>& centroids, BookOf book_of, double abs_tol_factor) {
  const int d = l.head_dim, s = cb.sub_dim;
  const int64_t nc = cb.num_centroids();
  const int64_t row_bytes = vecinfer::code_row_bytes(d, s, cb.code_bits);
  std::vector<double> dist(nc);
  for (int64_t r = 0; r < l.num_rows; ++r) {
    const float* book = centroids.data() + book_of(r) * nc * s;
    for (int j = 0; j < d / s; ++j) {
      const double* x = xs.data() + r * d + j * s;
      double best = std::numeric_limits<double>::infinity(), xx = 0.0;
      for (int e = 0; e < s; ++e) xx += x[e] * x[e];
      for (int64_t c = 0; c < nc; ++c) {
        double acc = 0.0;
        for (int e = 0; e < s; ++e) {
          const double diff = x[e] - double(book[c * s + e]);
          acc += diff * diff;
        }
        dist[c] = acc;
        best = std::min(best, acc);
      }
      const uint32_t code = unpack_code_ref(codes + r * row_bytes, j, cb.code_bits);
      ASSERT_LT(code, static_cast<uint32_t>(nc));
      ASSERT_LE(dist[code], best * (1.0 + 1e-5) + abs_tol_factor * (1.0 + xx))
          << "row " << r << " sub-vector " << j << " code " << code << " best distance " << best;
    }
  }
}

TEST_P(NearestCentroidTest, IdentityTransformFloat32) {
  const CodecCase p = GetParam();
  const int d = p.head_dim;
  // Keep the 12-bit cases small (the reference scan is rows * D * 4096).
  const RowLayout l = p.code_bits == 12 ? make_layout(1, 3, 5, d) : make_layout(2, 3, 17, d);
  Rng rng(100 * p.sub_dim + p.code_bits);
  Codebook cb;
  cb.sub_dim = p.sub_dim;
  cb.code_bits = p.code_bits;
  const auto centroids = random_floats(rng, cb.num_centroids() * p.sub_dim);
  cb.centroids = centroids.data();
  const auto x = random_floats(rng, l.num_rows * d);
  const int64_t row_bytes = vecinfer::code_row_bytes(d, p.sub_dim, p.code_bits);
  ASSERT_GT(row_bytes, 0);
  std::vector<uint8_t> codes(l.num_rows * row_bytes + 16, 0xEE);
  ASSERT_TRUE(cpu::vq_encode(DType::kFloat32, x.data(), codes.data(), l, cb, Transform{}).ok());
  for (size_t i = l.num_rows * row_bytes; i < codes.size(); ++i) ASSERT_EQ(codes[i], 0xEE) << "wrote past the end";
  std::vector<double> xs(x.begin(), x.end());
  expect_nearest(xs, codes.data(), l, cb, centroids, [](int64_t) { return int64_t{0}; }, 1e-6);

  // decode(encode(x)) is exactly the chosen centroids.
  std::vector<float> out(x.size(), NAN);
  ASSERT_TRUE(cpu::vq_decode(DType::kFloat32, codes.data(), out.data(), l, cb, Transform{}).ok());
  for (int64_t r = 0; r < l.num_rows; ++r)
    for (int j = 0; j < d / p.sub_dim; ++j) {
      const uint32_t code = unpack_code_ref(codes.data() + r * row_bytes, j, p.code_bits);
      for (int e = 0; e < p.sub_dim; ++e)
        ASSERT_EQ(out[r * d + j * p.sub_dim + e], centroids[code * p.sub_dim + e]) << where("decode", r, j);
    }
}

INSTANTIATE_TEST_SUITE_P(Shapes, NearestCentroidTest,
                         ::testing::Values(CodecCase{64, 2, 4}, CodecCase{128, 2, 5}, CodecCase{128, 2, 8},
                                           CodecCase{64, 2, 12}, CodecCase{128, 4, 4}, CodecCase{256, 4, 5},
                                           CodecCase{128, 4, 8}, CodecCase{64, 4, 12}, CodecCase{64, 8, 4},
                                           CodecCase{128, 8, 5}, CodecCase{256, 8, 8}, CodecCase{128, 8, 12},
                                           CodecCase{128, 4, 6}, CodecCase{64, 8, 7}, CodecCase{64, 2, 9},
                                           CodecCase{64, 4, 10}, CodecCase{64, 8, 11}),
                         case_name);

// Ties: duplicate centroids; the documented rule is the lowest index among equals.
TEST(VqEncode, TiesPickLowestIndex) {
  const int d = 64, s = 4;
  Codebook cb;
  cb.sub_dim = s;
  cb.code_bits = 4;
  Rng rng(5);
  std::vector<float> centroids = random_floats(rng, 16 * s);
  for (int e = 0; e < s; ++e) centroids[11 * s + e] = centroids[3 * s + e];  // 3 and 11 equal
  cb.centroids = centroids.data();
  const RowLayout l = make_layout(1, 1, 2, d);
  std::vector<float> x(l.num_rows * d);
  for (int j = 0; j < 2 * d / s; ++j)
    for (int e = 0; e < s; ++e) x[j * s + e] = centroids[3 * s + e] + (j % 2 ? 1e-3f : 0.f);
  std::vector<uint8_t> codes(l.num_rows * vecinfer::code_row_bytes(d, s, 4));
  ASSERT_TRUE(cpu::vq_encode(DType::kFloat32, x.data(), codes.data(), l, cb, Transform{}).ok());
  for (int j = 0; j < 2 * d / s; ++j) EXPECT_EQ(unpack_code_ref(codes.data(), j, 4), 3u) << "sub-vector " << j;
}

// Fused transform + encode with float16 / bfloat16 / float32 input, per-KV-head tables, GQA heads
// and per-head codebooks: the reference transforms in double and scans in double.
TEST(VqEncode, FusedTransformNearestCentroid) {
  const int d = 128;
  const int64_t kv_heads = 3;
  const auto h = hadamard_matrix(d);
  Rng rng(81);
  const auto scale = random_scales(rng, kv_heads * d);
  const auto mean = random_floats(rng, kv_heads * d, 0.5);
  for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16})
    for (const CodecCase p : {CodecCase{d, 4, 8}, CodecCase{d, 2, 5}, CodecCase{d, 8, 6}})
      for (int64_t num_books : {int64_t{1}, kv_heads}) {
        const int64_t group = 2;
        const RowLayout l = make_layout(2, kv_heads * group, 7, d);
        Codebook cb;
        cb.sub_dim = p.sub_dim;
        cb.code_bits = p.code_bits;
        cb.num_codebooks = num_books;
        const auto centroids = random_floats(rng, num_books * cb.num_centroids() * p.sub_dim);
        cb.centroids = centroids.data();
        Transform t;
        t.scale = scale.data();
        t.mean = mean.data();
        t.table_rows = kv_heads;
        t.hadamard = true;
        std::vector<double> xd(l.num_rows * d);
        std::vector<float> xf(xd.size());
        std::vector<uint16_t> xh(xd.size());
        for (size_t i = 0; i < xd.size(); ++i) {
          if (dt == DType::kFloat32) {
            xf[i] = static_cast<float>(rng.normal());
            xd[i] = xf[i];
          } else {
            xh[i] = dt == DType::kFloat16 ? random_half(rng) : random_bf16(rng);
            xd[i] = dt == DType::kFloat16 ? half_value(xh[i]) : bf16_value(xh[i]);
          }
        }
        const void* xp = dt == DType::kFloat32 ? static_cast<const void*>(xf.data()) : xh.data();
        const int64_t row_bytes = vecinfer::code_row_bytes(d, p.sub_dim, p.code_bits);
        std::vector<uint8_t> codes(l.num_rows * row_bytes);
        ASSERT_TRUE(cpu::vq_encode(dt, xp, codes.data(), l, cb, t).ok());
        std::vector<double> xs(xd.size());
        for (int64_t r = 0; r < l.num_rows; ++r) {
          const int64_t e = table_entry(head_of_row(l, r), l.num_heads, kv_heads);
          const auto y = ref_transform(xd.data() + r * d, d, t.scale + e * d, t.mean + e * d, true,
                                       TransformKind::kKey, h);
          std::copy(y.begin(), y.end(), xs.begin() + r * d);
        }
        SCOPED_TRACE("dtype " + std::to_string(static_cast<int>(dt)) + " sub " + std::to_string(p.sub_dim) +
                     " bits " + std::to_string(p.code_bits) + " books " + std::to_string(num_books));
        expect_nearest(xs, codes.data(), l, cb, centroids,
                       [&](int64_t r) { return table_entry(head_of_row(l, r), l.num_heads, num_books); }, 1e-6);
      }
}

// Known codes -> exactly the documented bytes. Centroid c of the codebook is a distinct point,
// inputs are chosen centroids, so the nearest centroid (distance 0) is known. The points form a
// grid of spacing 0.5 in the first two coordinates (every pair of points is at squared distance
// >= 0.25) with moderate magnitudes (|c|^2 <= ~2200), so float rounding cannot blur neighbours.
std::vector<float> distinct_centroids(int code_bits, int sub_dim, int rotate = 0) {
  const int nc = 1 << code_bits;
  std::vector<float> c(static_cast<size_t>(nc) * sub_dim);
  for (int i = 0; i < nc; ++i) {
    const int point = (i + rotate) % nc;  // codebook entry i holds point `point`
    for (int e = 0; e < sub_dim; ++e)
      c[i * sub_dim + e] =
          static_cast<float>((e % 2 == 0 ? (point % 64) * 0.5 : (point / 64) * 0.5) - 16.0 + e * 0.125);
  }
  return c;
}

std::vector<float> rows_from_codes(const std::vector<uint32_t>& codes, const std::vector<float>& centroids, int sub_dim) {
  std::vector<float> x(codes.size() * sub_dim);
  for (size_t j = 0; j < codes.size(); ++j)
    for (int e = 0; e < sub_dim; ++e) x[j * sub_dim + e] = centroids[codes[j] * sub_dim + e];
  return x;
}

TEST(CodeLayout, FiveBitRowByHand) {
  // D 64, sub_dim 8: 8 codes of 5 bits = 5 bytes per row.
  const int d = 64, s = 8, bits = 5;
  const auto centroids = distinct_centroids(bits, s);
  Codebook cb;
  cb.centroids = centroids.data();
  cb.sub_dim = s;
  cb.code_bits = bits;
  // Row 0 worked out by hand: codes 31,1,16,3,21,0,3,16 ->
  //   bits 0-4 = 11111, bit 5 (code 1), bit 14 (code 16 << 10), bits 15,16 (3 << 15),
  //   bits 20,22,24 (21 << 20), bits 30,31 (3 << 30), bit 39 (16 << 35).
  // Row 1: all codes 0b10000 except the first (0b00001).
  const std::vector<uint32_t> codes = {31, 1, 16, 3, 21, 0, 3, 16, 1, 16, 16, 16, 16, 16, 16, 16};
  // Row 1 by hand: code 1 -> bit 0; then 16 << 5j sets bit 5j + 4: bits 9, 14, 19, 24, 29, 34, 39.
  const std::vector<uint8_t> expected = {0x3F, 0xC0, 0x51, 0xC1, 0x80,   // row 0
                                         0x01, 0x42, 0x08, 0x21, 0x84};  // row 1
  const RowLayout l = make_layout(1, 1, 2, d);
  const auto x = rows_from_codes(codes, centroids, s);
  std::vector<uint8_t> out(10, 0xEE);
  ASSERT_EQ(vecinfer::code_row_bytes(d, s, bits), 5);
  ASSERT_TRUE(cpu::vq_encode(DType::kFloat32, x.data(), out.data(), l, cb, Transform{}).ok());
  // Both rows against the hand-computed literal (rows follow each other without padding).
  for (int b = 0; b < 10; ++b) EXPECT_EQ(out[b], expected[b]) << "byte " << b;
  // Both rows against the bit-by-bit reference packer (rows are unpadded and independent).
  const auto row0 = pack_row_ref({codes.begin(), codes.begin() + 8}, bits);
  const auto row1 = pack_row_ref({codes.begin() + 8, codes.end()}, bits);
  for (int b = 0; b < 5; ++b) {
    EXPECT_EQ(out[b], row0[b]) << "row 0 byte " << b;
    EXPECT_EQ(out[5 + b], row1[b]) << "row 1 byte " << b;
  }
}

TEST(CodeLayout, TwelveBitRowByHand) {
  // D 64, sub_dim 4: 16 codes of 12 bits = 24 bytes per row; codes 2k, 2k+1 share bytes 3k..3k+2:
  //   byte 3k = a & 0xff, byte 3k+1 = (a >> 8) | (b & 0xf) << 4, byte 3k+2 = b >> 4.
  const int d = 64, s = 4, bits = 12;
  const auto centroids = distinct_centroids(bits, s);
  Codebook cb;
  cb.centroids = centroids.data();
  cb.sub_dim = s;
  cb.code_bits = bits;
  std::vector<uint32_t> codes(3 * 16);
  codes[0] = 0xABC;
  codes[1] = 0x123;
  codes[2] = 0xFFF;
  codes[3] = 0x000;
  codes[4] = 0x001;
  codes[5] = 0x800;
  Rng rng(9);
  for (size_t j = 6; j < codes.size(); ++j) codes[j] = rng.bits(12);
  const RowLayout l = make_layout(1, 3, 1, d);  // 3 heads of one token, shared codebook
  const auto x = rows_from_codes(codes, centroids, s);
  const int64_t row_bytes = vecinfer::code_row_bytes(d, s, bits);
  ASSERT_EQ(row_bytes, 24);
  std::vector<uint8_t> out(3 * row_bytes, 0xEE);
  ASSERT_TRUE(cpu::vq_encode(DType::kFloat32, x.data(), out.data(), l, cb, Transform{}).ok());
  const uint8_t literal[9] = {0xBC, 0x3A, 0x12, 0xFF, 0x0F, 0x00, 0x01, 0x00, 0x80};
  for (int b = 0; b < 9; ++b) EXPECT_EQ(out[b], literal[b]) << "byte " << b;
  for (int r = 0; r < 3; ++r)
    for (int k = 0; k < 8; ++k) {
      const uint32_t a = codes[r * 16 + 2 * k], b = codes[r * 16 + 2 * k + 1];
      EXPECT_EQ(out[r * 24 + 3 * k], a & 0xff) << "row " << r << " pair " << k;
      EXPECT_EQ(out[r * 24 + 3 * k + 1], (a >> 8) | ((b & 0xf) << 4)) << "row " << r << " pair " << k;
      EXPECT_EQ(out[r * 24 + 3 * k + 2], b >> 4) << "row " << r << " pair " << k;
    }
}

// Every supported (sub_dim, code_bits): known random codes -> encode gives the reference bytes,
// and decode of reference bytes (built without the library) gives the centroids back.
TEST(CodeLayout, AllShapesMatchReferencePacking) {
  for (int d : {64, 256})
    for (int s : {2, 4, 8})
      for (int bits = 4; bits <= 12; ++bits) {
        SCOPED_TRACE("D " + std::to_string(d) + " sub " + std::to_string(s) + " bits " + std::to_string(bits));
        const auto centroids = distinct_centroids(bits, s);
        Codebook cb;
        cb.centroids = centroids.data();
        cb.sub_dim = s;
        cb.code_bits = bits;
        const RowLayout l = make_layout(1, 3, 1, d);
        Rng rng(1000 * d + 10 * s + bits);
        std::vector<uint32_t> codes(l.num_rows * (d / s));
        for (auto& c : codes) c = rng.bits(bits);
        codes[0] = (1u << bits) - 1;  // extremes
        codes[1] = 0;
        const auto x = rows_from_codes(codes, centroids, s);
        const int64_t row_bytes = vecinfer::code_row_bytes(d, s, bits);
        std::vector<uint8_t> ref_bytes;
        for (int64_t r = 0; r < l.num_rows; ++r) {
          const auto row = pack_row_ref({codes.begin() + r * (d / s), codes.begin() + (r + 1) * (d / s)}, bits);
          ASSERT_EQ(static_cast<int64_t>(row.size()), row_bytes);
          ref_bytes.insert(ref_bytes.end(), row.begin(), row.end());
        }
        std::vector<uint8_t> out(ref_bytes.size() + 8, 0xEE);
        ASSERT_TRUE(cpu::vq_encode(DType::kFloat32, x.data(), out.data(), l, cb, Transform{}).ok());
        for (size_t b = 0; b < ref_bytes.size(); ++b) ASSERT_EQ(out[b], ref_bytes[b]) << "byte " << b;
        for (size_t b = ref_bytes.size(); b < out.size(); ++b) ASSERT_EQ(out[b], 0xEE) << "wrote past the end";
        std::vector<float> dec(x.size(), NAN);
        ASSERT_TRUE(cpu::vq_decode(DType::kFloat32, ref_bytes.data(), dec.data(), l, cb, Transform{}).ok());
        for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(dec[i], x[i]) << "element " << i;
      }
}

// Decode with float16 / bfloat16 output rounds the centroids to nearest even; decode with the
// inverse transform matches the double reference.
TEST(VqDecode, HalfBf16OutputAndInverseTransform) {
  const int d = 128, s = 4, bits = 8;
  const int64_t kv_heads = 3, group = 2;
  const auto h = hadamard_matrix(d);
  Rng rng(91);
  Codebook cb;
  cb.sub_dim = s;
  cb.code_bits = bits;
  cb.num_codebooks = kv_heads;
  const auto centroids = random_floats(rng, kv_heads * cb.num_centroids() * s);
  cb.centroids = centroids.data();
  const auto scale = random_scales(rng, kv_heads * d);
  const auto mean = random_floats(rng, kv_heads * d);
  const RowLayout l = make_layout(2, kv_heads * group, 17, d);
  const int64_t row_bytes = vecinfer::code_row_bytes(d, s, bits);
  std::vector<uint8_t> codes(l.num_rows * row_bytes);
  for (auto& c : codes) c = static_cast<uint8_t>(rng.bits(8));
  auto centroid_value = [&](int64_t r, int i) {
    const int64_t book = table_entry(head_of_row(l, r), l.num_heads, kv_heads);
    const uint32_t code = unpack_code_ref(codes.data() + r * row_bytes, i / s, bits);
    return double(centroids[(book * cb.num_centroids() + code) * s + i % s]);
  };
  for (DType dt : {DType::kFloat16, DType::kBFloat16}) {
    std::vector<uint16_t> out(l.num_rows * d);
    ASSERT_TRUE(cpu::vq_decode(dt, codes.data(), out.data(), l, cb, Transform{}).ok());
    for (int64_t r = 0; r < l.num_rows; ++r)
      for (int i = 0; i < d; ++i) {
        const double c = centroid_value(r, i);
        const double got = dt == DType::kFloat16 ? half_value(out[r * d + i]) : bf16_value(out[r * d + i]);
        ASSERT_EQ(got, dt == DType::kFloat16 ? round_half(c) : round_bf16(c)) << where("decode", r, i);
      }
  }
  Transform t;
  t.scale = scale.data();
  t.mean = mean.data();
  t.table_rows = kv_heads;
  t.hadamard = true;
  std::vector<float> out(l.num_rows * d);
  ASSERT_TRUE(cpu::vq_decode(DType::kFloat32, codes.data(), out.data(), l, cb, t).ok());
  for (int64_t r = 0; r < l.num_rows; ++r) {
    std::vector<double> c(d);
    for (int i = 0; i < d; ++i) c[i] = centroid_value(r, i);
    const int64_t e = table_entry(head_of_row(l, r), l.num_heads, kv_heads);
    const auto ref = ref_transform(c.data(), d, t.scale + e * d, t.mean + e * d, true, TransformKind::kKeyInverse, h);
    for (int i = 0; i < d; ++i)
      ASSERT_NEAR(out[r * d + i], ref[i], 1e-5 * (1.0 + std::fabs(ref[i]))) << where("inverse decode", r, i);
  }
}

// Per-head codebooks: codebook g holds the same points in a different order (entry i holds
// point (i + 7g) mod C), so input point P in head h must get code (P - 7 g(h)) mod C, g(h) being
// h / (num_heads / num_codebooks), and decode must give P back.
TEST(VqEncode, PerHeadCodebooksPickTheRightBook) {
  const int d = 64, s = 4, bits = 6;
  const int nc = 1 << bits;
  const int64_t configs[][2] = {{3, 3}, {6, 3}, {6, 6}, {6, 2}};  // {num_heads, num_codebooks}
  for (const auto& cfg : configs) {
      const int64_t num_heads = cfg[0], num_books = cfg[1];
      SCOPED_TRACE("heads " + std::to_string(num_heads) + " books " + std::to_string(num_books));
      std::vector<float> centroids;
      for (int64_t g = 0; g < num_books; ++g) {
        const auto book = distinct_centroids(bits, s, static_cast<int>(7 * g));
        centroids.insert(centroids.end(), book.begin(), book.end());
      }
      const auto points = distinct_centroids(bits, s, 0);  // point P at index P
      Codebook cb;
      cb.centroids = centroids.data();
      cb.sub_dim = s;
      cb.code_bits = bits;
      cb.num_codebooks = num_books;
      const RowLayout l = make_layout(2, num_heads, 17, d);
      Rng rng(123 + num_heads * 10 + num_books);
      std::vector<uint32_t> pts(l.num_rows * (d / s));
      for (auto& p : pts) p = rng.bits(bits);
      const auto x = rows_from_codes(pts, points, s);
      const int64_t row_bytes = vecinfer::code_row_bytes(d, s, bits);
      std::vector<uint8_t> codes(l.num_rows * row_bytes);
      ASSERT_TRUE(cpu::vq_encode(DType::kFloat32, x.data(), codes.data(), l, cb, Transform{}).ok());
      for (int64_t r = 0; r < l.num_rows; ++r) {
        const int64_t g = table_entry(head_of_row(l, r), num_heads, num_books);
        for (int j = 0; j < d / s; ++j) {
          const uint32_t expected = static_cast<uint32_t>(((pts[r * (d / s) + j] - 7 * g) % nc + nc) % nc);
          ASSERT_EQ(unpack_code_ref(codes.data() + r * row_bytes, j, bits), expected)
              << "row " << r << " head " << head_of_row(l, r) << " sub-vector " << j;
        }
      }
      std::vector<float> dec(x.size());
      ASSERT_TRUE(cpu::vq_decode(DType::kFloat32, codes.data(), dec.data(), l, cb, Transform{}).ok());
      for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(dec[i], x[i]) << "element " << i;
    }
}

// ------------------------------------------------------------------------------------------
// Bad arguments: the right status code, and no memory touched
// ------------------------------------------------------------------------------------------

// A region no access is allowed to (PROT_NONE): any read or write of it crashes the test.
class Untouchable {
 public:
  Untouchable() {
#ifdef VECINFER_TEST_HAVE_MMAP
    void* p = mmap(nullptr, kSize, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p != MAP_FAILED) ptr_ = p;
#endif
    if (!ptr_) {  // fallback: an ordinary buffer (then only the output sentinels are checked)
      fallback_.assign(kSize, 0);
      ptr_ = fallback_.data();
    }
  }
  ~Untouchable() {
#ifdef VECINFER_TEST_HAVE_MMAP
    if (fallback_.empty()) munmap(ptr_, kSize);
#endif
  }
  Untouchable(const Untouchable&) = delete;
  Untouchable& operator=(const Untouchable&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  static constexpr size_t kSize = 1 << 20;
  void* ptr_ = nullptr;
  std::vector<uint8_t> fallback_;
};

class BadArguments : public ::testing::Test {
 protected:
  static constexpr size_t kOut = 1 << 16;
  BadArguments() : out_(kOut, 0x5A) {}

  // Runs transform, vq_encode and vq_decode with the given arguments; inputs are untouchable,
  // outputs sentinel-filled; every call must return `code` and leave the outputs unchanged.
  void expect_all(const RowLayout& l, const Codebook& cb_in, const Transform& t_in, TransformKind kind,
                  StatusCode code, const char* what, bool codec = true, bool xform = true) {
    SCOPED_TRACE(what);
    Transform t = t_in;
    Codebook cb = cb_in;
    for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
      if (xform) {
        std::fill(out_.begin(), out_.end(), 0x5A);
        const Status s = cpu::transform(dt, in_.as<float>(), out_.data(), l, t, kind);
        EXPECT_EQ(s.code, code) << "transform: " << s.message;
        if (!s.ok()) EXPECT_GT(std::strlen(s.message), 0u);
        EXPECT_TRUE(untouched()) << "transform wrote its output";
      }
      if (codec) {
        std::fill(out_.begin(), out_.end(), 0x5A);
        const Status e = cpu::vq_encode(dt, in_.as<float>(), out_.data(), l, cb, t);
        EXPECT_EQ(e.code, code) << "vq_encode: " << e.message;
        if (!e.ok()) EXPECT_GT(std::strlen(e.message), 0u);
        EXPECT_TRUE(untouched()) << "vq_encode wrote its codes";
        const Status dcd = cpu::vq_decode(dt, in_.as<uint8_t>(), out_.data(), l, cb, t);
        EXPECT_EQ(dcd.code, code) << "vq_decode: " << dcd.message;
        if (!dcd.ok()) EXPECT_GT(std::strlen(dcd.message), 0u);
        EXPECT_TRUE(untouched()) << "vq_decode wrote its output";
      }
    }
  }

  bool untouched() const {
    return std::all_of(out_.begin(), out_.end(), [](uint8_t b) { return b == 0x5A; });
  }

  // A valid setup whose inputs are all untouchable: shapes small enough for out_.
  RowLayout layout(int d = 64) const { return make_layout(1, 6, 4, d); }
  Codebook codebook(int sub = 4, int bits = 8) const {
    Codebook cb;
    cb.centroids = tables_.as<float>();
    cb.sub_dim = sub;
    cb.code_bits = bits;
    cb.num_codebooks = 1;
    return cb;
  }
  Transform tables(int64_t rows = 3) const {
    Transform t;
    t.scale = tables_.as<float>();
    t.mean = tables_.as<float>() + 4096;
    t.table_rows = rows;
    t.hadamard = true;
    return t;
  }

  Untouchable in_, tables_;
  std::vector<uint8_t> out_;
};

TEST_F(BadArguments, NullPointers) {
  const RowLayout l = layout();
  const Codebook cb = codebook();
  Transform t = tables();
  t.mean = nullptr;  // valid for every kind
  for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    std::fill(out_.begin(), out_.end(), 0x5A);
    EXPECT_EQ(cpu::transform(dt, nullptr, out_.data(), l, t, TransformKind::kKey).code, StatusCode::kInvalidArgument);
    EXPECT_EQ(cpu::transform(dt, in_.as<float>(), nullptr, l, t, TransformKind::kKey).code,
              StatusCode::kInvalidArgument);
    EXPECT_EQ(cpu::transform(dt, nullptr, nullptr, l, t, TransformKind::kQuery).code, StatusCode::kInvalidArgument);
    EXPECT_EQ(cpu::vq_encode(dt, nullptr, out_.data(), l, cb, t).code, StatusCode::kInvalidArgument);
    EXPECT_EQ(cpu::vq_encode(dt, in_.as<float>(), nullptr, l, cb, t).code, StatusCode::kInvalidArgument);
    EXPECT_EQ(cpu::vq_decode(dt, nullptr, out_.data(), l, cb, t).code, StatusCode::kInvalidArgument);
    EXPECT_EQ(cpu::vq_decode(dt, in_.as<uint8_t>(), nullptr, l, cb, t).code, StatusCode::kInvalidArgument);
    Codebook no_centroids = cb;
    no_centroids.centroids = nullptr;
    EXPECT_EQ(cpu::vq_encode(dt, in_.as<float>(), out_.data(), l, no_centroids, t).code,
              StatusCode::kInvalidArgument);
    EXPECT_EQ(cpu::vq_decode(dt, in_.as<uint8_t>(), out_.data(), l, no_centroids, t).code,
              StatusCode::kInvalidArgument);
    EXPECT_EQ(vecinfer::check_codebook(l, no_centroids).code, StatusCode::kInvalidArgument);
    EXPECT_TRUE(untouched());
  }
}

TEST_F(BadArguments, UnsupportedHeadDim) {
  for (int d : {96, 32, 512, 0, -64, 65}) {
    const RowLayout l = layout(d);
    EXPECT_EQ(vecinfer::check_layout(l).code, StatusCode::kUnsupported) << d;
    expect_all(l, codebook(), tables(), TransformKind::kKey, StatusCode::kUnsupported,
               ("head_dim " + std::to_string(d)).c_str());
  }
}

TEST_F(BadArguments, UnsupportedSubDim) {
  for (int s : {3, 1, 16, 0, 6}) {
    const Codebook cb = codebook(s, 8);
    EXPECT_EQ(vecinfer::check_codebook(layout(), cb).code, StatusCode::kUnsupported) << s;
    expect_all(layout(), cb, tables(), TransformKind::kKey, StatusCode::kUnsupported,
               ("sub_dim " + std::to_string(s)).c_str(), true, false);
  }
}

TEST_F(BadArguments, UnsupportedCodeBits) {
  for (int b : {3, 13, 0, -1, 16, 32}) {
    const Codebook cb = codebook(4, b);
    EXPECT_EQ(vecinfer::check_codebook(layout(), cb).code, StatusCode::kUnsupported) << b;
    expect_all(layout(), cb, tables(), TransformKind::kKey, StatusCode::kUnsupported,
               ("code_bits " + std::to_string(b)).c_str(), true, false);
  }
}

TEST_F(BadArguments, TableRowsNotDividingHeads) {
  // 6 heads: 4 and 5 table rows do not divide them, 0 and -3 are not valid counts.
  for (int64_t rows : {4, 5, 12, 0, -3}) {
    const std::string what = "table_rows " + std::to_string(rows);
    Transform t = tables(rows);
    EXPECT_EQ(vecinfer::check_transform(layout(), t, TransformKind::kKey).code, StatusCode::kInvalidArgument);
    expect_all(layout(), codebook(), t, TransformKind::kKey, StatusCode::kInvalidArgument, what.c_str());
    // Scale alone and mean alone are checked too.
    Transform scale_only = t;
    scale_only.mean = nullptr;
    expect_all(layout(), codebook(), scale_only, TransformKind::kQuery, StatusCode::kInvalidArgument,
               (what + " scale only").c_str(), false);
    Transform mean_only = t;
    mean_only.scale = nullptr;
    expect_all(layout(), codebook(), mean_only, TransformKind::kKeyInverse, StatusCode::kInvalidArgument,
               (what + " mean only").c_str());
  }
  // Without tables, table_rows is not read.
  Transform none;
  none.table_rows = 5;
  EXPECT_TRUE(vecinfer::check_transform(layout(), none, TransformKind::kKey).ok());
}

TEST_F(BadArguments, CodebooksNotDividingHeads) {
  for (int64_t books : {4, 5, 12, 0, -2}) {
    Codebook cb = codebook();
    cb.num_codebooks = books;
    EXPECT_EQ(vecinfer::check_codebook(layout(), cb).code, StatusCode::kInvalidArgument) << books;
    expect_all(layout(), cb, tables(), TransformKind::kKey, StatusCode::kInvalidArgument,
               ("num_codebooks " + std::to_string(books)).c_str(), true, false);
  }
}

TEST_F(BadArguments, QueryTransformWithMean) {
  const Transform t = tables();
  EXPECT_EQ(vecinfer::check_transform(layout(), t, TransformKind::kQuery).code, StatusCode::kInvalidArgument);
  expect_all(layout(), codebook(), t, TransformKind::kQuery, StatusCode::kInvalidArgument, "query with mean", false);
  Transform mean_only;
  mean_only.mean = tables_.as<float>();
  expect_all(layout(), codebook(), mean_only, TransformKind::kQuery, StatusCode::kInvalidArgument,
             "query with mean only", false);
}

TEST_F(BadArguments, BadTransformKind) {
  const auto bad = static_cast<TransformKind>(7);
  EXPECT_EQ(vecinfer::check_transform(layout(), tables(), bad).code, StatusCode::kInvalidArgument);
  expect_all(layout(), codebook(), tables(), bad, StatusCode::kInvalidArgument, "kind 7", false);
  expect_all(layout(), codebook(), Transform{}, bad, StatusCode::kInvalidArgument, "kind 7 identity", false);
}

TEST_F(BadArguments, BadDType) {
  const RowLayout l = layout();
  for (int v : {3, -1, 100}) {
    const auto dt = static_cast<DType>(v);
    std::fill(out_.begin(), out_.end(), 0x5A);
    EXPECT_EQ(cpu::transform(dt, in_.as<float>(), out_.data(), l, tables(), TransformKind::kKey).code,
              StatusCode::kInvalidArgument);
    EXPECT_EQ(cpu::vq_encode(dt, in_.as<float>(), out_.data(), l, codebook(), tables()).code,
              StatusCode::kInvalidArgument);
    EXPECT_EQ(cpu::vq_decode(dt, in_.as<uint8_t>(), out_.data(), l, codebook(), tables()).code,
              StatusCode::kInvalidArgument);
    EXPECT_TRUE(untouched());
  }
}

TEST_F(BadArguments, EmptyOrInconsistentLayout) {
  struct Case {
    RowLayout l;
    const char* what;
  };
  std::vector<Case> cases;
  RowLayout l = layout();
  l.num_rows = 0;
  cases.push_back({l, "zero rows"});
  l = layout();
  l.num_rows = -24;
  cases.push_back({l, "negative rows"});
  l = layout();
  l.num_heads = 0;
  cases.push_back({l, "zero heads"});
  l = layout();
  l.tokens_per_head = 0;
  cases.push_back({l, "zero tokens"});
  l = layout();
  l.tokens_per_head = -4;
  l.num_heads = -6;
  cases.push_back({l, "negative heads and tokens"});
  l = layout();
  l.num_rows = 25;  // not a multiple of 6 * 4
  cases.push_back({l, "rows not a multiple of heads * tokens"});
  RowLayout empty;  // default: no rows, head_dim 0
  empty.head_dim = 64;
  cases.push_back({empty, "default layout"});
  for (const Case& c : cases) {
    EXPECT_EQ(vecinfer::check_layout(c.l).code, StatusCode::kInvalidArgument) << c.what;
    expect_all(c.l, codebook(), Transform{}, TransformKind::kKey, StatusCode::kInvalidArgument, c.what);
  }
}

TEST_F(BadArguments, ValidSetupIsAccepted) {
  // The fixtures' valid arguments pass every check (so the failures above come from the one
  // argument each test changes).
  EXPECT_TRUE(vecinfer::check_layout(layout()).ok());
  EXPECT_TRUE(vecinfer::check_codebook(layout(), codebook()).ok());
  EXPECT_TRUE(vecinfer::check_transform(layout(), tables(), TransformKind::kKey).ok());
  EXPECT_TRUE(vecinfer::check_transform(layout(), tables(), TransformKind::kKeyInverse).ok());
  Transform q = tables();
  q.mean = nullptr;
  EXPECT_TRUE(vecinfer::check_transform(layout(), q, TransformKind::kQuery).ok());
  Codebook per_head = codebook(8, 12);
  per_head.num_codebooks = 6;
  EXPECT_TRUE(vecinfer::check_codebook(layout(), per_head).ok());
  EXPECT_TRUE(vecinfer::check_codebook(layout(), codebook(2, 4)).ok());
}

// ------------------------------------------------------------------------------------------
// Hardening: sizes that overflow, overlapping buffers, non-finite values
// ------------------------------------------------------------------------------------------

TEST(Hardening, CodeBitsOfAnyCountNeverShiftsOutOfRange) {
  EXPECT_EQ(vecinfer::code_bits_of(2), 1);
  EXPECT_EQ(vecinfer::code_bits_of(256), 8);
  EXPECT_EQ(vecinfer::code_bits_of(int64_t{1} << 62), 62);
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{3}, int64_t{100}, (int64_t{1} << 62) + 1,
                    std::numeric_limits<int64_t>::max(), int64_t{-256}, std::numeric_limits<int64_t>::min()})
    EXPECT_EQ(vecinfer::code_bits_of(n), -1) << n;
}

TEST(Hardening, SizesOverflowing64BitsAreRejected) {
  RowLayout rows = make_layout(1, 1, 1, 64);
  rows.num_rows = rows.tokens_per_head = int64_t{1} << 60;  // * 64 elements * 4 bytes wraps
  EXPECT_EQ(vecinfer::check_layout(rows).code, StatusCode::kInvalidArgument);
  RowLayout heads = make_layout(1, 1, 1, 64);
  heads.num_rows = 1 << 20;
  heads.num_heads = heads.tokens_per_head = int64_t{1} << 40;  // their product wraps
  EXPECT_EQ(vecinfer::check_layout(heads).code, StatusCode::kInvalidArgument);
  float c[64] = {};
  Codebook cb;
  cb.centroids = c;
  cb.sub_dim = 4;
  for (int bits : {13, 63, 64, 200, -1}) {
    cb.code_bits = bits;
    EXPECT_EQ(vecinfer::check_codebook(make_layout(1, 1, 1, 64), cb).code, StatusCode::kUnsupported) << bits;
  }
}

TEST(Hardening, TransformRejectsPartiallyOverlappingOutput) {
  std::vector<float> buf(64 * 8, 1.f);
  const RowLayout l = make_layout(1, 1, 4, 64);
  Transform h;
  h.hadamard = true;
  for (int shift : {1, 64, 3 * 64})
    EXPECT_EQ(cpu::transform(DType::kFloat32, buf.data(), buf.data() + shift, l, h, TransformKind::kKey).code,
              StatusCode::kInvalidArgument) << shift;
  EXPECT_TRUE(cpu::transform(DType::kFloat32, buf.data(), buf.data() + 4 * 64, l, h, TransformKind::kKey).ok());
  EXPECT_TRUE(cpu::transform(DType::kFloat32, buf.data(), buf.data(), l, h, TransformKind::kKey).ok());  // in place
}

TEST(Hardening, NonFiniteOrNonPositiveTablesAndCodebooksAreRejected) {
  const RowLayout l = make_layout(1, 2, 3, 64);
  std::vector<float> x(6 * 64, 0.5f), out(6 * 64), scale(2 * 64, 1.f), mean(2 * 64, 0.f), centroids(16 * 4, 0.25f);
  std::vector<uint8_t> codes(6 * 32, 0);
  Codebook cb;
  cb.centroids = centroids.data();
  cb.sub_dim = 4;
  cb.code_bits = 4;
  Transform t;
  t.scale = scale.data();
  t.mean = mean.data();
  t.table_rows = 2;
  auto all_codes = [&] {
    return std::vector<StatusCode>{
        cpu::transform(DType::kFloat32, x.data(), out.data(), l, t, TransformKind::kKey).code,
        cpu::vq_encode(DType::kFloat32, x.data(), codes.data(), l, cb, t).code,
        cpu::vq_decode(DType::kFloat32, codes.data(), out.data(), l, cb, t).code};
  };
  EXPECT_EQ(all_codes(), std::vector<StatusCode>(3, StatusCode::kOk));
  for (float bad : {0.f, -1.f, NAN, INFINITY}) {
    scale[70] = bad;
    EXPECT_EQ(all_codes(), std::vector<StatusCode>(3, StatusCode::kInvalidArgument)) << "scale " << bad;
    scale[70] = 1.f;
  }
  mean[5] = NAN;
  EXPECT_EQ(all_codes(), std::vector<StatusCode>(3, StatusCode::kInvalidArgument));
  mean[5] = 0.f;
  centroids[17] = NAN;
  EXPECT_EQ(cpu::vq_encode(DType::kFloat32, x.data(), codes.data(), l, cb, t).code, StatusCode::kInvalidArgument);
  EXPECT_EQ(cpu::vq_decode(DType::kFloat32, codes.data(), out.data(), l, cb, t).code, StatusCode::kInvalidArgument);
}

TEST(Hardening, EncodeRejectsNonFiniteInputs) {
  const RowLayout l = make_layout(1, 1, 3, 64);
  std::vector<float> x(3 * 64, 0.5f), centroids(16 * 4, 0.25f), scale(64, 1.f);
  std::vector<uint8_t> codes(3 * 32);
  Codebook cb;
  cb.centroids = centroids.data();
  cb.sub_dim = 4;
  cb.code_bits = 4;
  for (float bad : {NAN, INFINITY, -INFINITY}) {
    x[100] = bad;
    EXPECT_EQ(cpu::vq_encode(DType::kFloat32, x.data(), codes.data(), l, cb, Transform{}).code,
              StatusCode::kInvalidArgument) << bad;
  }
  x[100] = 3e38f;  // finite, but divided by a scale of 1e-3 it overflows to infinity
  scale[100 % 64] = 1e-3f;
  Transform t;
  t.scale = scale.data();
  EXPECT_EQ(cpu::vq_encode(DType::kFloat32, x.data(), codes.data(), l, cb, t).code, StatusCode::kInvalidArgument);
}

TEST(Hardening, EncodeOfHugeKeysPicksTheNearestCentroid) {
  // Keys and centroids around 1e19: their squared norms overflow float32; the distances must not.
  Rng rng(15);
  const RowLayout l = make_layout(1, 1, 8, 64);
  std::vector<float> x(8 * 64), centroids(256 * 4);
  for (float& v : x) v = static_cast<float>(rng.normal() * 1e19);
  for (float& v : centroids) v = static_cast<float>(rng.normal() * 1e19);
  std::vector<uint8_t> codes(8 * 16);
  Codebook cb;
  cb.centroids = centroids.data();
  cb.sub_dim = 4;
  cb.code_bits = 8;
  ASSERT_TRUE(cpu::vq_encode(DType::kFloat32, x.data(), codes.data(), l, cb, Transform{}).ok());
  for (int64_t j = 0; j < 8 * 16; ++j) {  // one code per byte with 8 bits
    const float* xs = x.data() + j * 4;
    auto dist = [&](int c) {
      double d = 0;
      for (int e = 0; e < 4; ++e) d += std::pow(double{xs[e]} - centroids[c * 4 + e], 2);
      return d;
    };
    int best = 0;
    for (int c = 1; c < 256; ++c) best = dist(c) < dist(best) ? c : best;
    EXPECT_EQ(codes[j], best) << "sub-vector " << j;
  }
}

TEST(CudaEntryPoints, ReportNotBuiltInCpuOnlyBuild) {
  if (vecinfer::cuda::built()) GTEST_SKIP() << "built with CUDA";
  const RowLayout l = make_layout(1, 1, 1, 64);
  float x[64] = {};
  uint8_t codes[64] = {};
  float c[64] = {};
  Codebook cb;
  cb.centroids = c;
  cb.sub_dim = 4;
  cb.code_bits = 4;
  EXPECT_EQ(vecinfer::cuda::check_device().code, StatusCode::kNotBuiltWithCuda);
  EXPECT_EQ(vecinfer::cuda::transform(DType::kFloat32, x, x, l, Transform{}, TransformKind::kKey, nullptr).code,
            StatusCode::kNotBuiltWithCuda);
  EXPECT_EQ(vecinfer::cuda::vq_encode(DType::kFloat32, x, codes, l, cb, Transform{}, nullptr).code,
            StatusCode::kNotBuiltWithCuda);
  EXPECT_EQ(vecinfer::cuda::vq_decode(DType::kFloat32, codes, x, l, cb, Transform{}, nullptr).code,
            StatusCode::kNotBuiltWithCuda);
}

}  // namespace
