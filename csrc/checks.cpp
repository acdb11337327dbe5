#include "checks.h"

#include <c10/util/Exception.h>

#include "codes.h"

namespace spallm {

namespace {
bool is_float(at::ScalarType t, bool allow_double) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || (allow_double && t == at::kDouble);
}

LutShape shape_from_codes(const char* op, const at::Tensor& codes, int bits, int64_t groups) {
  SPALLM_CHECK_TYPE(codes.scalar_type() == at::kByte, op, ": argument 'codes' must be a packed uint8 "
                    "tensor, got ", codes.scalar_type());
  SPALLM_CHECK_VALUE(codes.dim() == 2, op, ": argument 'codes' must be 2-D [out_features, row_bytes] "
                     "(the canonical packed layout), got shape ", codes.sizes());
  SPALLM_CHECK_VALUE(codes.is_contiguous(), op, ": argument 'codes' must be contiguous");
  LutShape s;
  s.bits = bits;
  s.N = codes.size(0);
  s.row_bytes = codes.size(1);
  SPALLM_CHECK_VALUE(bits != 3 || s.row_bytes % 3 == 0, op, ": argument 'codes' has ", s.row_bytes,
                     " bytes per row, which is not a whole number of 3-bit chunks (3 bytes per 8 codes)");
  s.K = unpacked_row_len(s.row_bytes, bits);
  SPALLM_CHECK_VALUE(s.K > 0, op, ": argument 'codes' has no columns");
  SPALLM_CHECK_VALUE(groups >= 1 && s.K % groups == 0, op, ": in_features (", s.K,
                     ") must be divisible by groups_per_row (", groups, ")");
  s.G = groups;
  s.E = int64_t(1) << bits;
  s.group_size = s.K / groups;
  return s;
}
}  // namespace

int bits_from_entries(int64_t entries, const char* op, const char* arg) {
  switch (entries) {
    case 4: return 2;
    case 8: return 3;
    case 16: return 4;
    default:
      SPALLM_CHECK_VALUE(false, op, ": argument '", arg, "' must give 4, 8 or 16 LUT entries "
                         "(2, 3 or 4-bit codes), got ", entries);
  }
  return 0;
}

LutShape check_codes_lut(const char* op, const at::Tensor& codes, const at::Tensor& lut) {
  SPALLM_CHECK_TYPE(is_float(lut.scalar_type(), /*allow_double=*/true), op,
                    ": argument 'lut' must be float32, bfloat16 or float16, got ", lut.scalar_type());
  SPALLM_CHECK_VALUE(lut.dim() == 3, op, ": argument 'lut' must be 3-D [out_features, groups_per_row, "
                     "2^bits], got shape ", lut.sizes());
  SPALLM_CHECK_VALUE(lut.is_contiguous(), op, ": argument 'lut' must be contiguous");
  const int bits = bits_from_entries(lut.size(2), op, "lut");
  check_same_device(op, "codes", codes, "lut", lut);
  LutShape s = shape_from_codes(op, codes, bits, lut.size(1));
  SPALLM_CHECK_VALUE(lut.size(0) == s.N, op, ": argument 'lut' has ", lut.size(0),
                     " rows but 'codes' has ", s.N, " (out_features must match)");
  return s;
}

LutShape check_codes_groups(const char* op, const at::Tensor& codes, int64_t groups, int64_t entries) {
  const int bits = bits_from_entries(entries, op, "num_entries");
  SPALLM_CHECK_VALUE(groups >= 1, op, ": argument 'groups_per_row' must be >= 1, got ", groups);
  return shape_from_codes(op, codes, bits, groups);
}

void check_activation(const char* op, const char* arg, const at::Tensor& t, int64_t features,
                      bool allow_double) {
  SPALLM_CHECK_TYPE(is_float(t.scalar_type(), allow_double), op, ": argument '", arg, "' must be ",
                    allow_double ? "float64, " : "", "float32, bfloat16 or float16, got ", t.scalar_type());
  SPALLM_CHECK_VALUE(t.dim() >= 1, op, ": argument '", arg, "' must have at least one dimension");
  SPALLM_CHECK_VALUE(t.size(-1) == features, op, ": argument '", arg, "' has last dimension ",
                     t.size(-1), " but the sketched weight needs ", features);
}

void check_same_device(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                       const at::Tensor& ref) {
  SPALLM_CHECK(t.device() == ref.device(), op, ": argument '", arg, "' is on ", t.device(),
               " but '", ref_arg, "' is on ", ref.device(), " (all arguments must be on one device)");
}

void check_bias(const char* op, const at::Tensor& bias, const at::Tensor& x, int64_t out_features) {
  SPALLM_CHECK_TYPE(bias.scalar_type() == x.scalar_type(), op, ": argument 'bias' must have x's dtype (",
                    x.scalar_type(), "), got ", bias.scalar_type());
  SPALLM_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == out_features, op, ": argument 'bias' must have "
                     "shape [", out_features, "], got ", bias.sizes());
  check_same_device(op, "bias", bias, "x", x);
}

}  // namespace spallm
