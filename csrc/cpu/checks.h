// Argument checks shared by the CPU and CUDA kernels of the block formats and RVQ: every error
// names the op and the shapes, dtypes or devices that failed.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <sstream>

namespace tinykern {

inline bool is_activation_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Every tensor on one device of type `device_type`.
inline void check_devices(const char* op, c10::DeviceType device_type,
                          std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  const at::Device first = tensors.begin()->second->device();
  bool ok = first.type() == device_type;
  for (const auto& named : tensors) ok = ok && named.second->device() == first;
  if (ok) return;
  std::ostringstream got;
  for (const auto& [name, t] : tensors) got << (got.tellp() > 0 ? ", " : "") << name << " on " << t->device();
  TORCH_CHECK(false, op, ": the ", c10::DeviceTypeName(device_type, true),
              " kernel needs every tensor on one ", c10::DeviceTypeName(device_type, true), " device, got ",
              got.str());
}

// blocks [..., nb*block_bytes] uint8; returns the total number of blocks.
inline int64_t check_blocks(const char* op, const at::Tensor& blocks, int64_t block_bytes,
                            c10::DeviceType device_type) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte, op, ": blocks must be uint8, got ", blocks.scalar_type(),
              " with shape ", blocks.sizes());
  TORCH_CHECK(blocks.dim() >= 1 && blocks.size(-1) % block_bytes == 0, op, ": blocks of shape ", blocks.sizes(),
              " must end in a dim that is a multiple of ", block_bytes, " bytes");
  check_devices(op, device_type, {{"blocks", &blocks}});
  return blocks.numel() / block_bytes;
}

inline void check_output_dtype(const char* op, at::ScalarType dtype) {
  TORCH_CHECK(is_activation_dtype(dtype), op, ": dtype must be float32, float16 or bfloat16, got ", dtype);
}

struct MatmulShape {
  int64_t m, k, n, nb;
};

// x [M, K] float, w [N, nb*block_bytes] uint8 with (nb-1)*block < K <= nb*block, bias [N].
inline MatmulShape check_matmul(const char* op, int64_t block, int64_t block_bytes, const at::Tensor& x,
                                const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                                c10::DeviceType device_type) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK(is_activation_dtype(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ",
              x.scalar_type(), " with shape ", x.sizes());
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.size(1) % block_bytes == 0, op,
              ": w must be uint8 [N, nb*", block_bytes, "], got ", w.scalar_type(), " with shape ", w.sizes());
  const int64_t nb = w.size(1) / block_bytes;
  const int64_t k = x.size(1);
  TORCH_CHECK(k <= nb * block && k > (nb - 1) * block, op, ": x of shape ", x.sizes(), " has ", k,
              " features but w of shape ", w.sizes(), " holds rows of ", nb * block, " weights; expected ",
              (nb - 1) * block + 1, "..", nb * block, " features");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0) && at::isFloatingType(bias->scalar_type()), op,
                ": bias must be a float vector [", w.size(0), "], got ", bias->scalar_type(), " with shape ",
                bias->sizes());
    check_devices(op, device_type, {{"x", &x}, {"w", &w}, {"bias", &*bias}});
  } else {
    check_devices(op, device_type, {{"x", &x}, {"w", &w}});
  }
  return {x.size(0), k, w.size(0), nb};
}

struct RvqShape {
  int64_t n, d, levels, k;
};

inline RvqShape check_rvq_encode(const at::Tensor& x, const at::Tensor& codebooks, c10::DeviceType device_type) {
  TORCH_CHECK(x.dim() == 2 && codebooks.dim() == 3 && x.size(1) == codebooks.size(2),
              "rvq_encode: expected x [N, D] and codebooks [L, K, D], got shapes ", x.sizes(), " and ",
              codebooks.sizes());
  TORCH_CHECK(is_activation_dtype(x.scalar_type()) && codebooks.scalar_type() == at::kFloat,
              "rvq_encode: x must be float32, float16 or bfloat16 and codebooks float32, got ", x.scalar_type(),
              " and ", codebooks.scalar_type());
  TORCH_CHECK(codebooks.size(1) > 0 || codebooks.size(0) == 0, "rvq_encode: codebooks of shape ",
              codebooks.sizes(), " have no codewords to choose from");
  check_devices("rvq_encode", device_type, {{"x", &x}, {"codebooks", &codebooks}});
  return {x.size(0), x.size(1), codebooks.size(0), codebooks.size(1)};
}

inline RvqShape check_rvq_decode(const at::Tensor& codes, const at::Tensor& codebooks,
                                 c10::DeviceType device_type) {
  TORCH_CHECK(codes.dim() == 2 && codebooks.dim() == 3 && codes.size(1) <= codebooks.size(0),
              "rvq_decode: expected codes [N, L'] and codebooks [L, K, D] with L' <= L, got shapes ",
              codes.sizes(), " and ", codebooks.sizes());
  TORCH_CHECK((codes.scalar_type() == at::kInt || codes.scalar_type() == at::kLong) &&
                  is_activation_dtype(codebooks.scalar_type()),
              "rvq_decode: codes must be int32 or int64 and codebooks float32, float16 or bfloat16, got ",
              codes.scalar_type(), " and ", codebooks.scalar_type());
  check_devices("rvq_decode", device_type, {{"codes", &codes}, {"codebooks", &codebooks}});
  return {codes.size(0), codebooks.size(2), codes.size(1), codebooks.size(1)};
}

}  // namespace tinykern
