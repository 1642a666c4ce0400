// The block_* ops on CPU: every GGML block format by its type id, through the drivers of
// blockquant.h with the traits of formats.h (Q4_K and Q8_0 through their own kernels in q4k.cpp
// and q8_0.cpp, the quantizers in quantize.cpp).
#include "cpu/formats.h"  // first: it includes the intrinsics headers

#include <torch/library.h>

#include <sstream>

namespace tinykern::cpu {
namespace {

struct TypeName {
  int64_t id;
  const char* name;
};

// In GGML type id order; gguf's names.
constexpr TypeName kTypes[] = {{2, "q4_0"}, {3, "q4_1"},  {6, "q5_0"},  {7, "q5_1"}, {8, "q8_0"},
                               {10, "q2_k"}, {11, "q3_k"}, {12, "q4_k"}, {13, "q5_k"}, {14, "q6_k"}};

std::string known_types() {
  std::ostringstream s;
  for (const TypeName& t : kTypes) s << (s.tellp() > 0 ? ", " : "") << t.id << " (" << t.name << ")";
  return s.str();
}

[[noreturn]] void unknown_type(const char* op, int64_t ggml_type) {
  TORCH_CHECK(false, op, ": unknown GGML type ", ggml_type, "; the CPU kernels know ", known_types());
}

// Runs fn(Format{}) for the trait of the formats.h types; false for Q4_K, Q8_0 and unknown ids.
template <class Fn>
bool with_format(int64_t ggml_type, Fn&& fn) {
  switch (ggml_type) {
    case 2: fn(Q4_0{}); return true;
    case 3: fn(Q4_1{}); return true;
    case 6: fn(Q5_0{}); return true;
    case 7: fn(Q5_1{}); return true;
    case 10: fn(Q2_K{}); return true;
    case 11: fn(Q3_K{}); return true;
    case 13: fn(Q5_K{}); return true;
    case 14: fn(Q6_K{}); return true;
    default: return false;
  }
}

at::Tensor dequantize(const at::Tensor& blocks, int64_t ggml_type, at::ScalarType dtype) {
  constexpr const char* op = "block_dequantize";
  if (ggml_type == 12) return q4k_dequantize_as(op, blocks, dtype);
  if (ggml_type == 8) return q8_0_dequantize_as(op, blocks, dtype);
  at::Tensor out;
  if (!with_format(ggml_type, [&](auto f) { out = block_dequantize<decltype(f)>(op, blocks, dtype); })) {
    unknown_type(op, ggml_type);
  }
  return out;
}

at::Tensor matmul(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                  int64_t ggml_type, bool exact) {
  constexpr const char* op = "block_matmul";
  if (ggml_type == 12) return q4k_matmul_as(op, x, w, bias, exact);
  if (ggml_type == 8) return q8_0_matmul_as(op, x, w, bias, exact);
  at::Tensor out;
  if (!with_format(ggml_type, [&](auto f) { out = block_matmul<decltype(f)>(op, x, w, bias, exact); })) {
    unknown_type(op, ggml_type);
  }
  return out;
}

at::Tensor quantize(const at::Tensor& x, int64_t ggml_type) {
  constexpr const char* op = "block_quantize";
  at::Tensor out = quantize_native(op, x, ggml_type);  // every type of kTypes has one
  if (!out.defined()) unknown_type(op, ggml_type);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tinykern, CPU, m) {
  m.impl("block_dequantize", &dequantize);
  m.impl("block_matmul", &matmul);
  m.impl("block_quantize", &quantize);
}

}  // namespace tinykern::cpu
